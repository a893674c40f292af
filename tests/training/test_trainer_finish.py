"""The end of a run: the statistics written beside the SAE are the saved SAE's on the initialisation sample (the
definition and its sparse computation: tests/saes/test_feature_stats.py)."""

from __future__ import annotations

import dataclasses

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
