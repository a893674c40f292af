import pytest
import torch

from saeforge.errors import SaeforgeError
from saeforge.features.inspect import Inspector, inspect_prompt
from saeforge.saes import load_sae

SITE = "layers.1.resid_post"


def test_each_token_lists_its_most_active_features(tiny_run, tiny_llama):
    text = "To be, or not to be, that is the question"
    rows = inspect_prompt(tiny_run, text, top=3, lm=tiny_llama)
    ids = tiny_llama.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(rows) == len(ids) + 1 and rows[0]["special"] and rows[0]["features"][SITE] == []
    sae = load_sae(tiny_run / "saes" / SITE)
    x = tiny_llama.read(torch.tensor([[tiny_llama.bos_token_id()] + ids]), [SITE])[SITE][0]
    with torch.no_grad():
        f = sae.encode(x)
    for t in range(1, len(rows)):
        feats = rows[t]["features"][SITE]
        vals, idx = f[t].topk(3)
        expected = [(int(i), float(v)) for v, i in zip(vals, idx) if v > 0]
        assert [(i, pytest.approx(a, rel=1e-6)) for i, a, _ in feats] == expected


def test_encode_and_top_features_follow_the_run_token_rules(tiny_run, tiny_llama):
    """encode: the latents of every position, zero at BOS (no SAE data); top_features: the largest activations over
    the prompt's SAE-data positions, equal to a hand computation that drops BOS."""
    text = "To be, or not to be, that is the question"
    inspector = Inspector(tiny_run, lm=tiny_llama)
    f = inspector.encode(text)
    ids = [tiny_llama.bos_token_id()] + tiny_llama.tokenizer(text, add_special_tokens=False)["input_ids"]
    x = tiny_llama.read(torch.tensor([ids]), [SITE])[SITE][0]
    with torch.no_grad():
        direct = load_sae(tiny_run / "saes" / SITE).encode(x)
    assert f.shape == direct.shape and bool((f[0] == 0).all()) and bool(direct[0].abs().sum() > 0)
    torch.testing.assert_close(f[1:], direct[1:], rtol=1e-6, atol=0)
    top = inspector.top_features(text, k=4)
    vals, idx = direct[1:].max(0).values.topk(4)
    assert [(i, pytest.approx(v, rel=1e-6)) for i, v, _ in top] == [(int(i), float(v)) for v, i in zip(vals, idx)]
    assert inspector.encode(text, SITE).equal(f)
    with pytest.raises(SaeforgeError, match="no SAE 'nope'"):
        inspector.encode(text, "nope")
    with pytest.raises(SaeforgeError, match="k must be at least 1"):
        inspector.top_features(text, k=0)


def test_over_long_and_empty_prompts_are_refused(tiny_run, tiny_llama):
    inspector = Inspector(tiny_run, lm=tiny_llama)
    with pytest.raises(SaeforgeError, match=r"the prompt has \d+ tokens; the limit is 256"):
        inspector.inspect("word " * 600)
    with pytest.raises(SaeforgeError, match="empty"):
        inspector.inspect("   ")


def test_a_transcoder_encodes_what_it_reads_and_says_what_it_writes(tiny_run, tiny_llama, tiny_llama_dir,
                                                                     tmp_path, capsys, monkeypatch):
    import shutil

    from saeforge.features import inspect as inspect_module
    from saeforge.features.inspect import InspectConfig, run_inspect
    from saeforge.runs import SiteBinding
    from saeforge.saes import TopKConfig, make_sae, save_sae

    run = tmp_path / "run"
    shutil.copytree(tiny_run / "saes", run / "saes")
    torch.manual_seed(0)
    tc = make_sae(TopKConfig(d_in=32, d_sae=64, k=4, d_out=32, apply_b_dec_to_input=False))
    save_sae(tc, run / "saes" / "tc", metadata={
        **SiteBinding.single("layers.0.resid_post", "layers.2.mlp_out").to_metadata(),
        "model_name": str(tiny_llama_dir), "context_size": 32})
    inspector = Inspector(run, lm=tiny_llama)
    assert inspector.sites == ["layers.0.resid_post", SITE]  # what it reads, not layers.2.mlp_out
    assert inspector.bindings()["tc"] == {"kind": "transcoder", "reads": ["layers.0.resid_post"],
                                          "writes": ["layers.2.mlp_out"],
                                          "description": "transcoder: reads layers.0.resid_post, "
                                                         "writes layers.2.mlp_out"}
    text = "To be, or not to be"
    rows = inspector.inspect(text, top=3)
    ids = torch.tensor([[tiny_llama.bos_token_id()] + tiny_llama.tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        f = tc.encode(tiny_llama.read(ids, ["layers.0.resid_post"])["layers.0.resid_post"][0])
    for t in range(1, len(rows)):
        vals, idx = f[t].topk(3)
        assert [(i, pytest.approx(a, rel=1e-6)) for i, a, _ in rows[t]["features"]["tc"]] == [
            (int(i), float(v)) for v, i in zip(vals, idx) if v > 0]
    # the command line says which site each dictionary reads and writes
    monkeypatch.setattr(inspect_module, "Inspector", lambda path, **kw: Inspector(path, lm=tiny_llama))
    run_inspect(InspectConfig(str(run), text, top=2))
    out = capsys.readouterr().out.splitlines()
    assert "tc: transcoder: reads layers.0.resid_post, writes layers.2.mlp_out" in out
    assert f"{SITE}: SAE at {SITE}" in out
    assert any(line.strip().startswith("'") and " tc: #" in line for line in out)


def _no_model(*args, **kwargs):
    raise AssertionError("the model was loaded before the arguments were checked")


@pytest.mark.parametrize("top", ["-3", "0"])
def test_top_below_one_is_refused_before_anything_loads(top, monkeypatch, capsys):
    from saeforge.cli import main
    from saeforge.features import inspect as inspect_module

    monkeypatch.setattr(inspect_module, "Inspector", _no_model)
    assert main(["inspect", "some/run", "hello", "--top", top]) == 2
    err = capsys.readouterr().err
    assert f"--top {top}" in err and "at least 1" in err and "fix: saeforge inspect some/run 'hello' --top 5" in err


def test_the_api_refuses_top_below_one(tiny_run, tiny_llama):
    with pytest.raises(SaeforgeError, match="at least 1"):
        Inspector(tiny_run, lm=tiny_llama).inspect("hello", top=0)


def test_the_command_shows_top_tokens_or_the_explanation_from_the_store(tiny_run, tiny_llama, tmp_path, capsys,
                                                                        monkeypatch):
    import re
    import shutil

    from saeforge.features import inspect as inspect_module
    from saeforge.features.harvest import HarvestConfig, harvest
    from saeforge.features.inspect import InspectConfig, run_inspect
    from saeforge.features.store import FeatureStore
    from tests.conftest import TEXT

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    monkeypatch.setattr(inspect_module, "Inspector", lambda path, **kw: Inspector(path, lm=tiny_llama))
    text = "To be, or not to be, that is the question"
    run_inspect(InspectConfig(str(run), text, top=3))
    out = capsys.readouterr().out
    assert "no feature store" in out and "saeforge harvest" in out and "(top tokens" not in out

    corpus = tmp_path / "heldout.txt"
    corpus.write_text(TEXT * 20)
    store_path = harvest(HarvestConfig(path=str(run), corpus=str(corpus), tokens=64 * 16, batch_size=8,
                                       device="cpu", progress=False))
    run_inspect(InspectConfig(str(run), text, top=3))
    lines = [line for line in capsys.readouterr().out.splitlines() if f" {SITE}: #" in line]
    shown = [(int(i), label) for line in lines for i, label in re.findall(r"#(\d+) [-\d.]+(?: \(([^)]*)\))?", line)]
    assert shown
    with FeatureStore(store_path, readonly=True) as store:
        brief = store.brief_features(SITE, {i for i, _ in shown})
    for i, label in shown:  # every feature that fired on the harvested text carries its top tokens
        expected = "top tokens " + " ".join(repr(t) for t, _ in brief[i]["top_tokens"][:4])
        assert label == (expected if brief[i]["top_tokens"] else "")
    assert sum(bool(label) for _, label in shown) > len(shown) // 2
    explained = shown[0][0]
    with FeatureStore(store_path) as store:
        store.set_explanation(SITE, explained, "the word 'be'", 0.8, "test")
    run_inspect(InspectConfig(str(run), text, top=3))
    assert f"#{explained} " in (out := capsys.readouterr().out) and "(the word 'be')" in out


def test_an_older_store_is_migrated_and_labels_the_features(tiny_run, tiny_llama, tmp_path):
    import shutil
    import sqlite3

    from saeforge.features.store import SCHEMA_VERSION, FeatureStore
    from tests.features.test_store import _v1_store

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    _v1_store(run / "features.sqlite")
    with sqlite3.connect(run / "features.sqlite") as con:  # the version-1 store's first SAE, named as the run's
        con.execute("UPDATE saes SET name = ? WHERE id = 1", (SITE,))
    labels = Inspector(run, lm=tiny_llama).labels(SITE, range(10))
    assert labels[0] == "explanation 0" and labels[7] == "explanation 7"  # explained in the old store
    assert labels[1] == "top tokens ' w1'"
    with FeatureStore(run / "features.sqlite", readonly=True) as store:
        assert store.meta("schema_version") == SCHEMA_VERSION
