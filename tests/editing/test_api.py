import json
import os
import subprocess
import sys

import pytest
import torch

from saeforge.editing import EditRegistry, EditSettings, Fact, edit_model
from saeforge.errors import SaeforgeError
from tests.conftest import TEXT
from tests.editing.helpers import PROMPT, TARGET, save_tiny_sae

SETTINGS = EditSettings(latents=4, neurons_per_latent=4, steps=150, lr=2.0, locality_weight=1e-5, stop_nll=0.0)


@pytest.fixture
def setup(tiny_llama_dir, tmp_path):
    sae = save_tiny_sae(tmp_path / "sae", tiny_llama_dir)
    text = tmp_path / "retain.txt"
    text.write_text(TEXT * 6)
    return sae, text


def test_edited_model_saves_as_a_folder_saeforge_and_transformers_load(setup, tmp_path):
    from transformers import AutoModelForCausalLM

    from saeforge.models.language_model import LanguageModel

    sae, text = setup
    out = tmp_path / "edited"
    lm, registry = edit_model(str(sae), [Fact(PROMPT, TARGET)], out=str(out), settings=SETTINGS,
                              retain_text=str(text), retain_contexts=4, context_length=24, device="cpu")
    ids = torch.tensor([lm.tokenizer(PROMPT + " " + TEXT[:40], add_special_tokens=False)["input_ids"]])
    expected = lm.logits(ids)
    loaded = LanguageModel.load(str(out), device="cpu")
    assert torch.equal(loaded.logits(ids), expected)
    hf = AutoModelForCausalLM.from_pretrained(str(out))
    with torch.no_grad():
        assert torch.equal(hf(input_ids=ids).logits, expected)
    back = EditRegistry.load(out, loaded)
    assert back.records == registry.records and len(back.records) == 1

    # lifelong: editing the saved folder continues its registry, and avoids the neurons it owns
    out2 = tmp_path / "edited2"
    _, registry2 = edit_model(str(sae), [Fact(PROMPT, " sun")], model=str(out), out=str(out2), settings=SETTINGS,
                              retain_text=str(text), retain_contexts=4, context_length=24, device="cpu")
    assert [r.target for r in registry2.records] == [TARGET, " sun"]
    assert registry2.overlap()["shared_neurons"] == 0
    with pytest.raises(SaeforgeError, match="not empty"):
        edit_model(str(sae), [Fact(PROMPT, " sun")], out=str(out2), retain_text=str(text), retain_contexts=4,
                   context_length=24, device="cpu")


def test_a_registry_from_another_model_is_refused_before_editing(setup, tiny_model_dirs, tmp_path, monkeypatch):
    from saeforge.editing import api
    from saeforge.models.language_model import LanguageModel

    def slow(*args, **kwargs):
        raise AssertionError("slow work started before the bad input was refused")

    monkeypatch.setattr(api, "_retain", slow)
    sae, text = setup
    other = LanguageModel.load(str(tiny_model_dirs["mistral"]), device="cpu")
    EditRegistry.for_model(other, 2).save(tmp_path / "foreign")
    with pytest.raises(SaeforgeError, match="belongs to another model"):
        edit_model(str(sae), [Fact(PROMPT, TARGET)], registry=str(tmp_path / "foreign"), retain_text=str(text),
                   device="cpu")
    with pytest.raises(SaeforgeError, match="merges it with the prompt"):
        edit_model(str(sae), [Fact(PROMPT + " ", "sea")], retain_text=str(text), device="cpu")


def _cli(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "saeforge", "edit", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def test_cli_refuses_a_target_the_tokenizer_cannot_form(setup, tmp_path, capsys):
    from saeforge.cli import main

    sae, text = setup
    code = main(["edit", "apply", str(sae), "--out", str(tmp_path / "bad"), "--prompt", PROMPT + " ", "--target",
                 "sea", "--device", "cpu", "--retain-text", str(text)])
    err = capsys.readouterr().err
    assert code == 2 and "merges it with the prompt" in err and "fix:" in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_cli_applies_an_edit(setup, tmp_path):
    sae, text = setup
    ok = _cli("apply", str(sae), "--out", str(tmp_path / "ok"), "--prompt", PROMPT, "--target", TARGET,
              "--device", "cpu", "--retain-text", str(text), "--retain-contexts", "4", "--context-length", "24",
              "--latents", "4", "--neurons-per-latent", "4", "--steps", "150", "--lr", "2", "--locality-weight",
              "1e-5", "--stop-nll", "0", cwd=os.getcwd())
    assert ok.returncode == 0, ok.stderr
    assert "': ok;" in ok.stdout
    report = json.loads((tmp_path / "ok" / "edit_report.json").read_text())
    assert report["edits"][0]["greedy_gives_target"] is True


def test_apply_config_reads_edit_requests(tmp_path):
    from saeforge.editing import ApplyConfig

    assert [f.target for f in ApplyConfig(prompt="A", target=" b").edit_requests()] == [" b"]
    assert len(ApplyConfig(facts="builtin:7").edit_requests()) == 7
    with pytest.raises(SaeforgeError, match="go together"):
        ApplyConfig(prompt="A").edit_requests()
    with pytest.raises(SaeforgeError, match="builtin:N"):
        ApplyConfig(facts="builtin:x").edit_requests()
    with pytest.raises(SaeforgeError, match="no edit requests"):
        ApplyConfig().edit_requests()
