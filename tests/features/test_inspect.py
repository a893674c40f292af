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
