import numpy as np
import pytest
import torch

from saeforge.data.text_source import TextSource
from saeforge.data.token_stream import TokenPolicy, TokenStream
from saeforge.errors import SaeforgeError
from saeforge.features.harvest import HarvestConfig, harvest
from saeforge.features.store import FeatureStore
from saeforge.saes import load_sae

SITE = "layers.1.resid_post"


@pytest.fixture(scope="module")
def harvested(tiny_run, tiny_llama, tmp_path_factory):
    """The tiny run harvested on a held-out text (a fresh copy of the run, so other tests keep theirs)."""
    import random
    import shutil

    from tests.conftest import TEXT

    folder = tmp_path_factory.mktemp("harvest")
    run = folder / "run"
    shutil.copytree(tiny_run, run)
    words = TEXT.split()
    rng = random.Random(1)
    text = folder / "heldout.txt"
    text.write_text(" ".join(rng.choice(words) for _ in range(3000)))
    cfg = HarvestConfig(path=str(run), corpus=str(text), tokens=64 * 24, batch_size=8, top_examples=5,
                        quantile_bins=4, examples_per_bin=2, random_examples=3, window_before=6, window_after=2,
                        n_logits=5, n_neighbors=4, device="cpu", progress=False)
    path = harvest(cfg)
    # the SAE's activations of every harvested context, recomputed directly
    ts = TokenStream.for_model(TextSource(str(text)), tiny_llama, TokenPolicy(64))
    ids = torch.stack([torch.from_numpy(c) for _, c in zip(range(24), ts.contexts())])
    keep = ts.keep_mask(ids)
    sae = load_sae(run / "saes" / SITE)
    with torch.no_grad():
        f = sae.encode(tiny_llama.read(ids, [SITE])[SITE].float())
    f = f * keep[..., None]  # BOS/special positions are not SAE data
    return FeatureStore(path, readonly=True), f, keep, ids, cfg


def test_statistics_match_a_direct_computation(harvested):
    store, f, keep, _, _ = harvested
    n_kept = int(keep.sum())
    assert store.meta("n_kept_tokens") == n_kept
    for idx in range(0, 128, 7):
        rec = store.feature(SITE, idx, with_examples=False)
        col = f[..., idx][keep]
        fired = col[col != 0]
        assert rec["fire_count"] == fired.numel() and rec["density"] == pytest.approx(fired.numel() / n_kept)
        if fired.numel():
            assert rec["max_act"] == pytest.approx(fired.max().item(), rel=1e-6)
            assert rec["mean_act"] == pytest.approx(fired.mean().item(), rel=1e-5)
            assert sum(rec["histogram"]["counts"]) == fired.numel()


def test_examples_are_right(harvested):
    store, f, keep, ids, cfg = harvested
    checked = 0
    for idx in range(128):
        rec = store.feature(SITE, idx)
        top = rec["examples"]["top"]
        if not top:
            continue
        checked += 1
        maxes = [e["max_act"] for e in top]
        assert maxes == sorted(maxes, reverse=True) and maxes[0] == pytest.approx(rec["max_act"], rel=1e-6)
        assert len({e["context"] for e in top}) == len(top)  # one example per context
        for e in top + rec["examples"]["quantile"]:
            acts = f[e["context"], e["start"]:e["start"] + len(e["acts"]), idx].numpy()
            np.testing.assert_allclose(e["acts"], acts, rtol=1e-3, atol=1e-3)  # stored as float16
            assert e["token_ids"] == ids[e["context"], e["start"]:e["start"] + len(e["acts"])].tolist()
            assert e["max_act"] == pytest.approx(float(f[e["context"], e["peak"], idx]), rel=1e-6)
        edges = np.linspace(0, rec["max_act"], cfg.quantile_bins + 1)
        for e in rec["examples"]["quantile"]:
            assert edges[e["rank"]] < e["max_act"] <= edges[e["rank"] + 1] + 1e-6
        for e in rec["examples"]["random"]:
            assert float(f[e["context"], :, idx].abs().max()) == 0.0  # never fires in that context
    assert checked > 20


def test_logit_effects_and_neighbours(harvested, tiny_llama, tiny_run):
    store, *_ = harvested
    sae = load_sae(tiny_run / "saes" / SITE)
    logits = tiny_llama.direction_logits(sae.W_dec.detach())
    W = torch.nn.functional.normalize(sae.W_dec.detach(), dim=1)
    for idx in (0, 17, 99):
        rec = store.feature(SITE, idx, with_examples=False)
        assert [v for _, v in rec["promoted"]] == pytest.approx(logits[idx].topk(5).values.tolist(), rel=1e-5)
        assert [v for _, v in rec["suppressed"]] == pytest.approx(
            logits[idx].topk(5, largest=False).values.tolist(), rel=1e-5)
        sims = [s for _, s in rec["neighbors"]]
        assert sims == sorted(sims, reverse=True) and all(j != idx for j, _ in rec["neighbors"])
        j, s = rec["neighbors"][0]
        assert s == pytest.approx(float(W[idx] @ W[j]), abs=1e-5)


def test_out_of_range_feature_and_schema_versions(harvested, tmp_path):
    store, *_ = harvested
    with pytest.raises(SaeforgeError, match="feature 128 is out of range"):
        store.feature(SITE, 128)
    import shutil
    import sqlite3

    for version, message in ((99, "newer than this saeforge reads"), (0, "older than any saeforge wrote")):
        copy = tmp_path / f"v{version}.sqlite"
        shutil.copy(store.path, copy)
        con = sqlite3.connect(copy)
        con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(version),))
        con.commit()
        con.close()
        with pytest.raises(SaeforgeError, match=message):
            FeatureStore(copy)


def test_failed_harvest_leaves_no_store(tiny_run, text_file, tmp_path, monkeypatch):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("features.sqlite"))

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(FeatureStore, "add_examples", boom)
    with pytest.raises(OSError):
        harvest(HarvestConfig(path=str(run), corpus=str(text_file), tokens=256, device="cpu", progress=False))
    assert not (run / "features.sqlite").exists()
    assert not [p for p in run.iterdir() if p.name.startswith(".tmp-")]


def test_harvest_writes_the_activation_heatmap(harvested):
    from saeforge.evals.plots import have_matplotlib

    store, *_ = harvested
    if have_matplotlib():
        png = store.path.parent / "saes" / SITE / "plots" / "activation_heatmap.png"
        assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
