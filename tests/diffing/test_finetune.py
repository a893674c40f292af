"""saeforge finetune on a tiny model: an ordinary HF folder with its report, deterministic, and a run killed
mid-way resumes to the same weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from saeforge.diffing.finetune import FinetuneConfig, finetune
from saeforge.errors import SaeforgeError
from saeforge.models.language_model import LanguageModel


def _cfg(model, text, out, **kw):
    return FinetuneConfig(**{"out": str(out), "model": str(model), "text": str(text), "steps": 8, "batch_size": 2,
                             "context_length": 16, "lr": 1e-3, "warmup_steps": 2, "eval_contexts": 4,
                             "reference_text": str(text), "checkpoint_every": 3, "progress": False, "threads": 1,
                             **kw})


def test_finetune_writes_a_loadable_model_that_learnt_the_text(tiny_llama_dir, text_file, tmp_path):
    report = finetune(_cfg(tiny_llama_dir, text_file, tmp_path / "ft"))
    assert report["loss_after"]["held_out"] < report["loss_before"]["held_out"]
    assert report["tokens_seen"] == 8 * 2 * 16
    lm = LanguageModel.load(str(tmp_path / "ft"), device="cpu")
    base = LanguageModel.load(str(tiny_llama_dir), device="cpu")
    assert lm.tokenizer.get_vocab() == base.tokenizer.get_vocab() and lm.fingerprint() != base.fingerprint()
    assert json.loads((tmp_path / "ft" / "finetune.json").read_text())["text"] == str(text_file)
    assert not (tmp_path / "ft.checkpoint.pt").exists()
    assert finetune(_cfg(tiny_llama_dir, text_file, tmp_path / "ft")) == report  # finished: returned as it is


def test_a_killed_finetune_resumes_to_the_same_weights(tiny_llama_dir, text_file, tmp_path, monkeypatch):
    finetune(_cfg(tiny_llama_dir, text_file, tmp_path / "whole"))
    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def dying_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # after the checkpoint of step 3
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        finetune(_cfg(tiny_llama_dir, text_file, tmp_path / "cut"))
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    assert (tmp_path / "cut.checkpoint.pt").is_file() and not (tmp_path / "cut").exists()
    finetune(_cfg(tiny_llama_dir, text_file, tmp_path / "cut"))
    a, b = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("whole", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_finetune_settings_are_refused(tiny_llama_dir, text_file, tmp_path):
    from tests.conftest import embedded_available

    if embedded_available():  # the play names are those of the embedded corpus
        with pytest.raises(SaeforgeError, match="is not a work of the embedded corpus"):
            FinetuneConfig(out="x", play="the_tempest_of_nowhere").text_spec()
    with pytest.raises(SaeforgeError, match="--out"):
        finetune(FinetuneConfig())
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("something")
    with pytest.raises(SaeforgeError, match="not a finished fine-tune"):
        finetune(_cfg(tiny_llama_dir, text_file, tmp_path / "full"))
