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


# ------------------------------------------------------------------------------------------------ re-harvesting
def _fresh_run(tiny_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("features.sqlite*", "checkpoints"))
    return run


def _cfg(run, text_file, **kw):
    settings = dict(path=str(run), corpus=str(text_file), tokens=64 * 8, batch_size=8, top_examples=3,
                    quantile_bins=2, examples_per_bin=1, random_examples=2, window_before=4, window_after=2,
                    n_logits=2, n_neighbors=2, device="cpu", progress=False)
    return HarvestConfig(**{**settings, **kw})


def _kill_after_write(store_path, idx: int):
    """In another process: explain feature ``idx`` and mark the store, commit, then die without closing the store, as
    a killed `saeforge explain` (or a dashboard killed after a write) does: the committed pages stay in the -wal."""
    import os
    import subprocess
    import sys

    code = (f"import os\nfrom saeforge.features.store import FeatureStore\n"
            f"s = FeatureStore({str(store_path)!r})\n"
            f"s.set_explanation({SITE!r}, {idx}, 'written just before a kill', 0.75, 'test:killed')\n"
            f"s.set_meta('marker', 'the old store')\ns.commit()\nos._exit(0)\n")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ}, timeout=60)
    wal = store_path.with_name(store_path.name + "-wal")
    assert wal.is_file() and wal.stat().st_size > 0  # the write is only in the log


def _feature_stats(store):
    return [(r["idx"], r["density"], r["max_act"], r["top_tokens"]) for r in store.list_features(SITE, order="index",
                                                                                                 limit=1000)]


def test_reharvest_over_a_store_with_unsaved_log_pages_is_clean(tiny_run, text_file, tmp_path):
    run = _fresh_run(tiny_run, tmp_path)
    path = harvest(_cfg(run, text_file, tokens=64 * 12))
    with FeatureStore(path, readonly=True) as s:
        idx = next(r["idx"] for r in s.list_features(SITE) if r["density"] > 0)
    _kill_after_write(path, idx)
    reader = FeatureStore(path, readonly=True)  # a dashboard connection open across the re-harvest
    assert reader.meta("marker") == "the old store" and reader.meta("n_tokens") == 64 * 12
    harvest(_cfg(run, text_file))
    with FeatureStore(path, readonly=True) as s:
        assert s.integrity_check() == "ok"
        assert s.meta("marker") is None and s.meta("n_tokens") == 64 * 8  # nothing of the old store replayed
        rec = s.feature(SITE, idx, with_examples=False)
        assert (rec["explanation"], rec["score"], rec["explainer"]) == ("written just before a kill", 0.75,
                                                                         "test:killed")  # carried over: same SAE
        assert s.meta("explanations_kept") == {SITE: 1} and s.meta("explanations_dropped") == {}
        assert s.count_explained(SITE) == 1
        new = _feature_stats(s)
    # the open reader now sees the new store, whole
    assert reader.meta("marker") is None and reader.meta("n_tokens") == 64 * 8
    assert _feature_stats(reader) == new and reader.integrity_check() == "ok"
    reader.close()
    # and the store equals a harvest from scratch
    other = _fresh_run(tiny_run, tmp_path / "b")
    with FeatureStore(harvest(_cfg(other, text_file)), readonly=True) as s:
        assert _feature_stats(s) == new
    assert not [p for p in run.iterdir() if p.name.startswith(".tmp-")]


def _change_weights(run):
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = run / "saes" / SITE / "sae_weights.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    tensors["W_dec"] = tensors["W_dec"] + 0.01 * torch.randn_like(tensors["W_dec"])
    save_file(tensors, str(path), metadata=meta)


def test_reharvest_of_a_changed_sae_asks_before_dropping_explanations(tiny_run, text_file, tmp_path, monkeypatch):
    run = _fresh_run(tiny_run, tmp_path)
    path = harvest(_cfg(run, text_file))
    with FeatureStore(path) as s:
        s.set_explanation(SITE, 5, "five", 0.6, "test")
        s.set_explanation(SITE, 9, "nine", None, "test")
    _change_weights(run)
    import saeforge.data.token_stream as token_stream

    def no_streaming(*a, **k):
        raise AssertionError("the text was streamed before the explanations were checked")

    with monkeypatch.context() as m:
        m.setattr(token_stream.TokenStream, "batches", no_streaming)
        with pytest.raises(SaeforgeError, match=r"would drop 2 explanation\(s\).*weights changed") as err:
            harvest(_cfg(run, text_file))
    assert "--explanations discard" in err.value.fix and "--explanations keep" in err.value.fix
    with FeatureStore(path, readonly=True) as s:
        assert s.explanations(SITE, [5, 9]) == {5: "five", 9: "nine"}  # untouched
    harvest(_cfg(run, text_file, explanations="keep"))
    with FeatureStore(path, readonly=True) as s:
        assert s.explanations(SITE, [5, 9]) == {5: "five", 9: "nine"} and s.meta("explanations_kept") == {SITE: 2}
    _change_weights(run)
    harvest(_cfg(run, text_file, explanations="discard"))
    with FeatureStore(path, readonly=True) as s:
        assert s.count_explained(SITE) == 0
        assert s.meta("explanations_dropped") == {SITE: {"count": 2, "reason": "--explanations discard"}}


def test_run_harvest_says_what_became_of_the_explanations(tiny_run, text_file, tmp_path, capsys):
    from saeforge.features.harvest import run_harvest

    run = _fresh_run(tiny_run, tmp_path)
    path = harvest(_cfg(run, text_file))
    with FeatureStore(path) as s:
        s.set_explanation(SITE, 5, "five", 0.6, "test")
    capsys.readouterr()
    run_harvest(_cfg(run, text_file))
    assert f"kept 1 explanation(s) of {SITE} from the previous store (same SAE weights)" in capsys.readouterr().out
    run_harvest(_cfg(run, text_file, explanations="discard"))
    assert f"dropped 1 explanation(s) of {SITE}: --explanations discard" in capsys.readouterr().out


@pytest.mark.parametrize("tokens", [0, -1])
def test_non_positive_tokens_are_refused_before_anything_changes(tiny_run, text_file, tmp_path, tokens):
    run = _fresh_run(tiny_run, tmp_path)
    path = harvest(_cfg(run, text_file))
    before = path.read_bytes()
    with pytest.raises(SaeforgeError, match=f"--tokens {tokens} asks for no tokens") as err:
        harvest(_cfg(run, text_file, tokens=tokens))
    assert "--tokens 65536" in err.value.fix
    assert path.read_bytes() == before


def test_cli_refuses_non_positive_tokens(tiny_run, tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "saeforge.cli", "harvest", str(tiny_run), "--tokens", "0"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--tokens 0 asks for no tokens" in r.stderr and "Traceback" not in r.stderr


def test_a_second_writer_is_refused_while_harvest_runs(tiny_run, text_file, tmp_path):
    """A real harvest in another process (paused inside the work by a patched step) holds the run's lock: a second
    harvest and an explain on the same run are refused at once, naming the holder."""
    import os
    import subprocess
    import sys
    import time

    from saeforge.features.autointerp import ExplainConfig, explain

    run = _fresh_run(tiny_run, tmp_path)
    harvest(_cfg(run, text_file))
    signal_file = tmp_path / "inside"
    code = (f"import time, pathlib\nimport saeforge.features.harvest as h\n"
            f"def slow(*a, **k):\n    pathlib.Path({str(signal_file)!r}).touch()\n    time.sleep(60)\n"
            f"h._heatmap = slow\n"
            f"h.harvest(h.HarvestConfig(path={str(run)!r}, corpus={str(text_file)!r}, tokens=512, device='cpu', "
            f"progress=False))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ})
    try:
        deadline = time.monotonic() + 120
        while not signal_file.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        with pytest.raises(SaeforgeError, match=f"is in use by pid {proc.pid}") as err:
            harvest(_cfg(run, text_file))
        assert "saeforge harvest/explain" in err.value.problem
        with pytest.raises(SaeforgeError, match=f"is in use by pid {proc.pid}"):
            explain(ExplainConfig(path=str(run), features=("0",), progress=False), backend=object())
    finally:
        proc.kill()
        proc.wait(timeout=30)
    harvest(_cfg(run, text_file))  # the lock went with the process; the killed harvest's temporary file too
    assert not [p for p in run.iterdir() if p.name.startswith(".tmp-")]


def test_reharvest_over_a_damaged_store_replaces_it_and_a_newer_one_is_left_alone(tiny_run, text_file, tmp_path):
    import sqlite3

    run = _fresh_run(tiny_run, tmp_path)
    path = harvest(_cfg(run, text_file))
    path.write_bytes(b"this is not a database" * 200)
    harvest(_cfg(run, text_file))
    with FeatureStore(path, readonly=True) as s:
        assert s.integrity_check() == "ok" and "not a readable feature store" in s.meta("previous_store_unreadable")
    con = sqlite3.connect(path)
    con.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    con.commit()
    con.close()
    before = path.read_bytes()
    with pytest.raises(SaeforgeError, match="newer than this saeforge reads"):
        harvest(_cfg(run, text_file))
    assert path.read_bytes() == before


def test_links_of_unchanged_saes_survive_a_reharvest(tiny_run, text_file, tmp_path, capsys):
    from saeforge.features.harvest import run_harvest

    run = _fresh_run(tiny_run, tmp_path)
    path = harvest(_cfg(run, text_file))
    rows = [(0, 1, 0.5, {"rank": 1}), (2, 3, -0.25, None), (7, 7, None, None)]
    with FeatureStore(path) as s:
        s.add_links("flow:top1", SITE, SITE, rows)
        before = s.links_between("flow:top1", SITE, SITE)
    capsys.readouterr()
    run_harvest(_cfg(run, text_file))
    assert "kept 3 link(s)" in capsys.readouterr().out
    with FeatureStore(path, readonly=True) as s:
        assert s.links_between("flow:top1", SITE, SITE) == before and s.meta("links_dropped") == 0
    _change_weights(run)  # links come from the weights: a changed SAE loses them, and the summary says so
    run_harvest(_cfg(run, text_file, explanations="discard"))
    assert "dropped 3 link(s)" in capsys.readouterr().out
    with FeatureStore(path, readonly=True) as s:
        assert s.link_summary() == [] and s.meta("links_kept") == 0


def test_clts_and_crosscoders_harvest_from_all_the_sites_they_read(tiny_llama, tiny_llama_dir, text_file, tmp_path):
    """A CLT encodes its layers' reads, a crosscoder its sites' concatenated: statistics equal a direct computation,
    the store names the sites read as a layer list, and a CLT's neighbours are by its whole decoder (every output
    layer); the inspector encodes them alike."""
    from saeforge.features.inspect import Inspector
    from saeforge.runs import SiteBinding
    from saeforge.saes import TopKCLTConfig, TopKCrosscoderConfig, make_sae, save_sae

    mlp_in, mlp_out = [f"layers.{i}.mlp_in" for i in range(3)], [f"layers.{i}.mlp_out" for i in range(3)]
    resid = ["layers.1.resid_post", "layers.2.resid_post"]
    meta = {"model_name": str(tiny_llama_dir), "context_size": 32}
    torch.manual_seed(0)
    clt = make_sae(TopKCLTConfig(d_in=96, d_sae=96, d_out=96, n_layers=3, k=3))
    xc = make_sae(TopKCrosscoderConfig(d_in=64, d_sae=48, n_sites=2, k=5))
    run = tmp_path / "run"
    save_sae(clt, run / "saes" / "clt", metadata={**SiteBinding(tuple(mlp_in), tuple(mlp_out)).to_metadata(), **meta})
    save_sae(xc, run / "saes" / "xc", metadata={**SiteBinding(tuple(resid), tuple(resid)).to_metadata(), **meta})
    path = harvest(HarvestConfig(path=str(run), corpus=str(text_file), tokens=32 * 8, batch_size=4, n_neighbors=3,
                                 device="cpu", progress=False))
    store = FeatureStore(path, readonly=True)
    assert {s["name"]: s["site"] for s in store.saes()} == {"clt": "layers.0-2.mlp_in",
                                                            "xc": "layers.1,2.resid_post"}
    ts = TokenStream.for_model(TextSource(str(text_file)), tiny_llama, TokenPolicy(32))
    ids = torch.stack([torch.from_numpy(c) for _, c in zip(range(8), ts.contexts())])
    keep = ts.keep_mask(ids)
    acts = tiny_llama.read(ids, mlp_in + resid)
    with torch.no_grad():
        f_clt = clt.encode(torch.cat([acts[s][keep] for s in mlp_in], -1))
        f_xc = xc.encode(torch.cat([acts[s][keep] for s in resid], -1))
    for name, f in (("clt", f_clt), ("xc", f_xc)):
        counts = (f != 0).sum(0)
        assert int(counts.sum()) > 0
        for idx in range(0, f.shape[1], 5):
            rec = store.feature(name, idx, with_examples=False)
            assert rec["fire_count"] == int(counts[idx])
            if counts[idx]:
                assert rec["max_act"] == pytest.approx(float(f[:, idx].max()), rel=1e-6)
    cos = clt.decoder_cosines(0, 96)
    cos.fill_diagonal_(-2)
    for idx in (0, 40, 95):
        j, s = store.feature("clt", idx, with_examples=False)["neighbors"][0]
        assert j == int(cos[idx].argmax()) and s == pytest.approx(float(cos[idx].max()), abs=1e-5)
    rows = Inspector(run, lm=tiny_llama).inspect("To be, or not to be", top=2)
    assert any(r["features"]["clt"] for r in rows[1:]) and any(r["features"]["xc"] for r in rows[1:])
