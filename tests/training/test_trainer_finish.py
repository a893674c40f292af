"""The end of a run: the statistics written beside the SAE are the saved SAE's on the initialisation sample (the
definition and its sparse computation: tests/saes/test_feature_stats.py)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from saeforge.saes import load_feature_stats, load_sae
from saeforge.training import TrainConfig, Trainer, train
from tests.conftest import TRAIN_SITES as SITES
from tests.saes.test_feature_stats import dense_reference


def test_a_trained_runs_saved_statistics_are_the_saved_saes_on_the_initialisation_sample(tiny_cache, tmp_path):
    cfg = TrainConfig(out=str(tmp_path / "run"), cache=str(tiny_cache.folder), sites=(SITES[0],), tokens=256 * 8,
                      batch_size=256, d_sae=128, k=8, checkpoint_every=4, log_every=4, progress=False, device="cpu")
    train(cfg)
    folder = tmp_path / "run" / "saes" / SITES[0]
    saved, stats = load_sae(folder), load_feature_stats(folder)
    trainer = Trainer(dataclasses.replace(cfg, resume=str(tmp_path / "run")), tmp_path / "run")
    trainer._build_trainees()  # the same first fill, so the same initialisation sample
    x = trainer.init_sample[SITES[0]].float()
    want = dense_reference(saved, x)
    count = lambda s: torch.round(10 ** s.double() * x.shape[0])
    assert float((count(stats["sparsity"]) - count(want["sparsity"])).abs().max()) <= 1  # at most a tie apart
    assert torch.allclose(stats["max_activation"], want["max_activation"], rtol=1e-5, atol=1e-5)
    assert torch.allclose(stats["mean_activation"], want["mean_activation"], rtol=1e-5, atol=1e-5)


def _tiny_cfg(tiny_cache, tmp_path, **kw):
    return TrainConfig(out=str(tmp_path / "run"), cache=str(tiny_cache.folder), sites=(SITES[0],), tokens=256 * 6,
                       batch_size=256, d_sae=64, k=4, checkpoint_every=4, log_every=2, progress=False, device="cpu",
                       **kw)


def test_the_last_checkpoint_written_during_the_finish_is_the_state_after_the_last_step(tiny_cache, tmp_path):
    train(_tiny_cfg(tiny_cache, tmp_path))
    run = tmp_path / "run"
    state = torch.load(run / "checkpoints" / "checkpoint.pt", weights_only=False)
    assert state["step"] == 6 and state["stream"]["tokens_served"] == 6 * 256
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "complete"
    # the saved SAE is the checkpoint's weights with the input scale folded in: refolding them gives it back
    trainer = Trainer(_tiny_cfg(tiny_cache, tmp_path, resume=str(run)), run)
    trainer._build_trainees()
    t = trainer.trainees[0]
    t.sae.load_state_dict(state["saes"][t.name]["model"])
    t.scaler.fold_into(t.sae)
    saved = load_sae(run / "saes" / t.name)
    for name, value in saved.state_dict().items():
        assert torch.equal(value, t.sae.state_dict()[name]), name
    # and a resume of the complete run changes nothing
    assert train(_tiny_cfg(tiny_cache, tmp_path, resume=str(run))) == info["final"]


def test_a_failed_last_checkpoint_fails_the_run_which_stays_incomplete(tiny_cache, tmp_path, monkeypatch):
    import saeforge.training.trainer as trainer_module

    def failing(path, state):
        if state["step"] == 6:
            raise OSError("disk gone")
        real(path, state)

    real = trainer_module.write_checkpoint
    monkeypatch.setattr(trainer_module, "write_checkpoint", failing)
    with pytest.raises(OSError, match="disk gone"):
        train(_tiny_cfg(tiny_cache, tmp_path))
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["status"] != "complete"
    assert torch.load(tmp_path / "run" / "checkpoints" / "checkpoint.pt", weights_only=False)["step"] == 4
