import itertools

import pytest
import torch

from saeforge.data.activation_cache import CacheConfig, build_cache
from saeforge.data.activation_stream import ActivationStream, CachedActivations, LiveActivations
from saeforge.data.text_source import TextSource
from saeforge.data.token_stream import TokenPolicy, TokenStream
from saeforge.errors import SaeforgeError

SITE = "layers.1.resid_post"


@pytest.fixture(scope="module")
def cache(tiny_llama, tiny_llama_dir, tmp_path_factory):
    import random

    from tests.conftest import TEXT

    folder = tmp_path_factory.mktemp("stream")
    words = TEXT.split()
    rng = random.Random(0)  # non-repeating text, so every cached vector is distinct and can be traced back
    (folder / "t.txt").write_text(" ".join(rng.choice(words) for _ in range(6000)))
    cfg = CacheConfig(out=str(folder / "cache"), model=str(tiny_llama_dir), sites=(SITE,), tokens=2400,
                      corpus=str(folder / "t.txt"), context_length=32, batch_size=4, shard_tokens=300,
                      device="cpu")
    return build_cache(cfg, lm=tiny_llama, progress=False)


def _take(stream, n):
    return [b[SITE] for b in itertools.islice(iter(stream), n)]


def test_same_seed_same_batches_other_seed_other_batches(cache):
    a = _take(ActivationStream(CachedActivations(cache, seed=1), batch_size=64, seed=1), 12)
    b = _take(ActivationStream(CachedActivations(cache, seed=1), batch_size=64, seed=1), 12)
    c = _take(ActivationStream(CachedActivations(cache, seed=2), batch_size=64, seed=2), 12)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def _numbered_cache(folder, shard_sizes, d=4):
    """A cache whose vector number i is filled with the value i, so served rows can be traced to their shard."""
    import json

    import numpy as np

    shards, start = [], 0
    for j, n in enumerate(shard_sizes):
        (folder / "shards" / f"{j:05d}").mkdir(parents=True)
        rows = np.repeat(np.arange(start, start + n, dtype=np.float32)[:, None], d, axis=1)
        np.save(folder / "shards" / f"{j:05d}" / f"{SITE}.npy", rows)
        np.save(folder / "shards" / f"{j:05d}" / "tokens.npy", np.zeros(n, dtype=np.int32))
        shards.append({"name": f"{j:05d}", "tokens": n})
        start += n
    (folder / "manifest.json").write_text(json.dumps({
        "format": "saeforge-activation-cache", "version": 1, "sites": {SITE: {"d": d}}, "dtype": "float32",
        "token_count": start, "complete": True, "shards": shards}))
    from saeforge.data.activation_cache import ActivationCache

    return ActivationCache(folder)


def test_one_epoch_serves_every_vector_at_most_once_mixing_across_shards(tmp_path):
    sizes = [100, 120, 90, 110, 100]
    cache = _numbered_cache(tmp_path, sizes)
    src = CachedActivations(cache, shards_per_fill=2, seed=0, epochs=1)
    batches = list(ActivationStream(src, batch_size=32, seed=0))
    served = torch.cat([b[SITE][:, 0] for b in batches]).long()
    assert served.unique().numel() == served.numel()  # nothing served twice within an epoch
    assert sum(sizes) - served.numel() < 32 * src.fills_per_epoch  # only each fill's remainder is dropped
    bounds = torch.tensor([0] + list(itertools.accumulate(sizes)))
    shard_of = torch.bucketize(served, bounds[1:], right=True)
    first = shard_of[:32]
    assert first.unique().numel() == 2  # one batch mixes the two shards of its fill
    # the shard visiting order itself is shuffled, so consecutive epochs differ
    assert src.shard_order(0) != src.shard_order(1)


@pytest.mark.parametrize("stop_after", [1, 5, 6, 13])
def test_restored_state_continues_with_identical_batches(cache, stop_after):
    ref = _take(ActivationStream(CachedActivations(cache, seed=3), batch_size=64, seed=3), 20)
    first = ActivationStream(CachedActivations(cache, seed=3), batch_size=64, seed=3)
    it = iter(first)
    for _ in range(stop_after):
        next(it)
    state = first.state_dict()
    resumed = ActivationStream(CachedActivations(cache, seed=3), batch_size=64, seed=3)
    resumed.load_state_dict(state)
    rest = _take(resumed, 20 - stop_after)
    assert all(torch.equal(x, y) for x, y in zip(ref[stop_after:], rest))


def test_live_stream_is_deterministic_and_resumable(tiny_llama, text_file):
    def make():
        ts = TokenStream.for_model(TextSource(str(text_file)), tiny_llama, TokenPolicy(context_length=16))
        return ActivationStream(LiveActivations(tiny_llama, ts, [SITE], buffer_tokens=256, batch_contexts=4),
                                batch_size=32, seed=5)

    ref = _take(make(), 30)  # more than one pass over the corpus: wraps around
    s = make()
    it = iter(s)
    for _ in range(11):
        next(it)
    resumed = make()
    resumed.load_state_dict(s.state_dict())
    assert all(torch.equal(x, y) for x, y in zip(ref[11:], _take(resumed, 19)))
    assert ref[0].shape == (32, 32)


def test_resume_with_other_settings_is_refused(cache):
    s = ActivationStream(CachedActivations(cache), batch_size=64, seed=0)
    other = ActivationStream(CachedActivations(cache), batch_size=32, seed=0)
    with pytest.raises(SaeforgeError, match="batch size"):
        other.load_state_dict(s.state_dict())
    with pytest.raises(SaeforgeError, match="not in the cache"):
        CachedActivations(cache, ["layers.0.mlp_out"])


def test_live_stream_resumed_past_the_first_epoch(tiny_llama, tmp_path):
    """A fresh process resuming in epoch 2 does not know the corpus length yet; it must still continue exactly."""
    from tests.conftest import TEXT

    short = tmp_path / "short.txt"
    short.write_text(TEXT * 4)

    def make():
        ts = TokenStream.for_model(TextSource(str(short)), tiny_llama, TokenPolicy(context_length=16))
        return ActivationStream(LiveActivations(tiny_llama, ts, [SITE], buffer_tokens=512, batch_contexts=8),
                                batch_size=64, seed=2)

    ref = _take(make(), 60)
    n_contexts = make().source.n_contexts
    s = make()
    it = iter(s)
    for _ in range(45):
        next(it)
    assert s.source.fill_start(s.position.fill)[0] >= n_contexts  # really in a later epoch
    resumed = make()
    resumed.load_state_dict(s.state_dict())
    assert all(torch.equal(x, y) for x, y in zip(ref[45:], _take(resumed, 15)))


def test_live_fills_hold_whole_batches_and_drop_nothing(tiny_llama, text_file):
    """Every kept vector of the contexts read is served once, in fills of whole batches shared evenly over the run
    (the forward passes are the run's cost: none is spent on vectors that are thrown away)."""
    ts = TokenStream.for_model(TextSource(str(text_file)), tiny_llama, TokenPolicy(context_length=16))
    batch, total = 32, 11
    source = LiveActivations(tiny_llama, ts, [SITE], buffer_tokens=4 * batch + 5, batch_contexts=4,
                             batch_size=batch, total_batches=total)
    assert [source.fill_size(i) // batch for i in range(4)] == [4, 4, 3, 4]  # 11 batches over 3 fills, then full
    served = torch.cat(_take(ActivationStream(source, batch_size=batch, seed=0), total))
    # the same vectors, in order, straight from the model over the contexts the run needs
    contexts = torch.from_numpy(__import__("numpy").stack(list(itertools.islice(ts.contexts(), 40))))
    from saeforge.data.activation_reader import read_activations

    direct = read_activations(tiny_llama, ts, contexts, [tiny_llama.site(SITE)]).acts[SITE][:total * batch]
    assert served.shape == direct.shape

    def rows(t):
        return sorted(map(tuple, t.tolist()))

    assert rows(served) == rows(direct)  # a permutation of exactly the first total*batch kept vectors
    assert source.fill_start(3)[0] < 40
