import json

import pytest
import torch

from saeforge.editing.bench import BenchConfig, bench, bench_table
from saeforge.errors import SaeforgeError
from tests.conftest import TEXT
from tests.editing.helpers import PROMPT, save_tiny_sae

SETTINGS = dict(latents=4, neurons_per_latent=4, steps=60, lr=2.0, lr_full_layer=2.0, locality_weight=1e-5,
                stop_nll=0.0)


@pytest.fixture
def files(tiny_llama, tiny_llama_dir, tmp_path):
    sae = save_tiny_sae(tmp_path / "sae", tiny_llama_dir)
    text = tmp_path / "text.txt"
    text.write_text(TEXT * 8)
    facts = tmp_path / "facts.jsonl"
    rows = [{"prompt": PROMPT, "target": " sea", "paraphrases": ["Whether 'tis nobler,"]},
            {"prompt": "All the world's a", "target": " sun", "paraphrases": []},
            {"prompt": "Now is the winter of", "target": " men", "paraphrases": ["Made glorious summer by"]}]
    facts.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    # locality facts: what the unedited tiny model itself says after some prompts (its greedy next token)
    words = (TEXT * 2).split()
    known = []
    for i in range(30, 90, 5):
        prompt = " ".join(words[i:i + 5])
        ids = torch.tensor([[0] + tiny_llama.tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        top = int(tiny_llama.logits(ids)[0, -1].argmax())
        answer = tiny_llama.tokenizer.decode([top])
        if answer.strip() and tiny_llama.tokenizer(prompt + answer, add_special_tokens=False)["input_ids"][-1] == top:
            known.append({"prompt": prompt, "answer": answer})
    locality = tmp_path / "locality.jsonl"
    locality.write_text("\n".join(json.dumps(r) for r in known) + "\n")
    assert len(known) >= 5
    return sae, text, facts, locality


def _config(files, out, **kw):
    sae, text, facts, locality = files
    options = dict(sae=str(sae), out=str(out), facts=str(facts), locality=str(locality), edits=3, checkpoints=(1, 3),
                   retain_text=str(text), heldout_text=str(text), retain_contexts=4, heldout_contexts=4,
                   context_length=24, device="cpu", progress=False, **SETTINGS)
    return BenchConfig(**{**options, **kw})


def test_bench_measures_methods_and_resumes(files, tmp_path, monkeypatch):
    cfg = _config(files, tmp_path / "b", methods=("masked", "unmasked"))
    result = bench(cfg)
    assert result["base"]["locality_facts"] >= 5
    masked, unmasked = (result["methods"][m]["checkpoints"] for m in ("masked", "unmasked"))
    assert [r["edits"] for r in masked] == [1, 3]
    assert masked[0]["reliability"] == 1.0 and masked[0]["generalisation"] in (0.0, 1.0)
    assert masked[1]["mean_mask"] <= 16 and unmasked[1]["mean_mask"] == 64
    assert masked[1]["shared_neurons"] == 0 and unmasked[1]["shared_neurons"] == 64
    for r in masked + unmasked:
        assert 0 <= r["locality"] <= 1 and r["perplexity"] > 0
    assert masked[1]["locality"] >= unmasked[1]["locality"]
    assert (tmp_path / "b" / "bench.png").stat().st_size > 1000
    assert "| masked | 3 |" in (tmp_path / "b" / "bench.md").read_text() == bench_table(result)

    # a run killed after the first checkpoint resumes to the same numbers
    from saeforge.editing import edit as edit_module

    real = edit_module.Editor.edit
    calls = {"n": 0}

    def dying(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    cfg2 = _config(files, tmp_path / "c", methods=("masked",))
    monkeypatch.setattr(edit_module.Editor, "edit", dying)
    with pytest.raises(KeyboardInterrupt):
        bench(cfg2)
    monkeypatch.setattr(edit_module.Editor, "edit", real)
    resumed = bench(cfg2)["methods"]["masked"]["checkpoints"]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds_per_edit"} for r in rows]  # noqa: E731
    assert strip(resumed) == strip(masked)

    with pytest.raises(SaeforgeError, match="other settings"):
        bench(_config(files, tmp_path / "c", methods=("masked",), steps=5))


def test_bench_refuses_bad_settings(files, tmp_path):
    with pytest.raises(SaeforgeError, match="checkpoints"):
        bench(_config(files, tmp_path / "d", checkpoints=(5,)))
    with pytest.raises(SaeforgeError, match="unknown edit method"):
        bench(_config(files, tmp_path / "d", methods=("rome",)))


def test_bench_refuses_bad_targets_and_foreign_registries_before_slow_work(files, tmp_path, tiny_model_dirs,
                                                                          monkeypatch):
    import sys

    from saeforge.editing.registry import EditRegistry
    from saeforge.models.language_model import LanguageModel

    def slow(*args, **kwargs):
        raise AssertionError("slow work started before the bad input was refused")

    # the module by its full name: saeforge.editing.bench is also the name of a function of the package
    monkeypatch.setattr(sys.modules["saeforge.editing.bench"], "text_contexts", slow)
    sae, text, facts, locality = files
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": PROMPT + " ", "target": "sea"}) + "\n")
    with pytest.raises(SaeforgeError, match="merges it with the prompt"):
        bench(_config(files, tmp_path / "e", facts=str(bad), edits=1, checkpoints=(1,)))
    other = LanguageModel.load(str(tiny_model_dirs["mistral"]), device="cpu")
    EditRegistry.for_model(other, 2).save(tmp_path / "f" / "masked")
    with pytest.raises(SaeforgeError, match="belongs to another model"):
        bench(_config(files, tmp_path / "f", methods=("masked",)))
