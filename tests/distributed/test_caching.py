"""`saeforge cache` under torchrun (gloo, 2 CPU processes): the same cache as one process, resumable after a kill."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from saeforge.data.activation_cache import ActivationCache, CacheConfig, build_cache
from tests.conftest import TEXT

SITES = ("layers.1.resid_post", "layers.2.mlp_out")
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache_corpus") / "t.txt"
    rng = random.Random(1)
    words = TEXT.split()
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(20, 120))) for _ in range(60)))
    return path


def _options(model_dir, corpus, out, tokens=3000) -> dict:
    # 7 shards, the last cut short to hit the target: an odd count over 2 ranks, rounds with an idle rank
    return dict(out=str(out), model=str(model_dir), sites=SITES, tokens=tokens, corpus=str(corpus), context_length=32,
                batch_size=3, shard_tokens=400, device="cpu", threads=1)


def _cli(options: dict) -> list[str]:
    args = ["cache", "--progress", "false"]
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", *(value if isinstance(value, tuple) else [str(value)])]
    return args


def _torchrun(options: dict, kill_shard: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    program = ["saeforge"] if kill_shard is None else ["tests.distributed.kill_worker", str(kill_shard)]
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", *program, *_cli(options)], capture_output=True, text=True, timeout=TIMEOUT_S,
                          env=env)


def _assert_same_cache(one, two) -> None:
    a, b = ActivationCache(one), ActivationCache(two)
    keys = ("name", "context_start", "context_end", "tokens", "truncated", "norm_sum", "sq_norm_sum")
    assert [{k: s[k] for k in keys} for s in a.shards] == [{k: s[k] for k in keys} for s in b.shards]
    assert a.complete and b.complete and a.token_count == b.token_count
    for k in ("mean_norm", "mean_sq_norm", "model_fingerprint", "sites"):
        assert a.manifest[k] == b.manifest[k]
    for i in range(len(a.shards)):
        assert np.array_equal(a.shard_tokens(i), b.shard_tokens(i))
        for site in SITES:
            assert np.array_equal(a.shard_array(i, site), b.shard_array(i, site)), (i, site)


@pytest.fixture(scope="module")
def one_process_cache(tiny_llama_dir, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "cache"
    cache = build_cache(CacheConfig(**_options(tiny_llama_dir, corpus, out)), progress=False)
    assert len(cache.shards) == 7 and cache.shards[-1]["truncated"]
    return out


@pytest.mark.slow  # a model on each rank, about 20 s
def test_two_ranks_write_the_cache_one_process_writes(tiny_llama_dir, corpus, tmp_path, one_process_cache):
    out = tmp_path / "cache"
    proc = _torchrun(_options(tiny_llama_dir, corpus, out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _assert_same_cache(one_process_cache, out)
    assert not [p for p in (out / "shards").iterdir() if p.name.startswith(".")]


@pytest.mark.slow  # three launches
def test_a_killed_rank_is_resumed(tiny_llama_dir, corpus, tmp_path, one_process_cache):
    """Rank 1 dies while writing its second shard (shard 3): the first round stays recorded, what the dead round
    left is discarded, and the same command completes the cache."""
    out = tmp_path / "cache"
    options = _options(tiny_llama_dir, corpus, out)
    proc = _torchrun(options, kill_shard=3)
    assert proc.returncode != 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["name"] for s in manifest["shards"]] == ["00000", "00001"] and not manifest["complete"]
    proc = _torchrun(options)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _assert_same_cache(one_process_cache, out)
