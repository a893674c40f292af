import json

import pytest
import torch

from saeforge.editing.registry import EditRecord, EditRegistry
from saeforge.errors import SaeforgeError


def _registry(lm) -> EditRegistry:
    reg = EditRegistry.for_model(lm, 2, "sae")
    for prompt, neurons in (("a", (0, 1, 2)), ("b", (2, 3)), ("c", (4,))):
        reg.add(EditRecord(prompt, " x", "masked", neurons, latents=(7,), latent_scores=(0.5,), source="sae",
                           steps=3, nll_before=4.0, nll_after=0.1, retain_change=0.01, delta_norm=2.0))
    return reg


def test_overlap_counts_shared_neurons_and_jaccard(tiny_llama):
    ov = _registry(tiny_llama).overlap()
    assert ov["edits"] == 3 and ov["union"] == 5 and ov["shared_neurons"] == 1 and ov["pairs"] == 1
    assert ov["mean_jaccard"] == pytest.approx((1 / 4) / 3, abs=1e-7)
    assert ov["max_jaccard"] == pytest.approx(0.25, abs=1e-7)
    assert ov["mean_mask"] == pytest.approx(2.0, abs=1e-7)


def test_round_trip_and_refusals(tiny_llama, tiny_model_dirs, tmp_path):
    from saeforge.models.language_model import LanguageModel

    reg = _registry(tiny_llama)
    reg.save(tmp_path / "r")
    back = EditRegistry.load(tmp_path / "r", tiny_llama)
    assert back.records == reg.records and torch.equal(back.masks(), reg.masks())
    assert back.model_fingerprint == tiny_llama.fingerprint() and back.layer == 2

    other = LanguageModel.load(str(tiny_model_dirs["qwen2"]), device="cpu")
    with pytest.raises(SaeforgeError, match="belongs to another model") as err:
        EditRegistry.load(tmp_path / "r", other)
    assert "fingerprint" in err.value.problem

    meta = json.loads((tmp_path / "r" / "edits.json").read_text())
    meta["records"][0]["neurons"] = [0, 1]
    (tmp_path / "r" / "edits.json").write_text(json.dumps(meta))
    with pytest.raises(SaeforgeError, match="disagree"):
        EditRegistry.load(tmp_path / "r")
    with pytest.raises(SaeforgeError, match="no edit registry"):
        EditRegistry.load(tmp_path)
    with pytest.raises(SaeforgeError, match="outside the layer"):
        reg.add(EditRecord("d", " y", "masked", (tiny_llama.d_mlp,)))
