"""Latent sharding (--parallel latent) under torchrun (gloo, 2 CPU processes) against one process."""

from __future__ import annotations

import json

import pytest
import torch

from saeforge.distributed.latent import select_global_top
from saeforge.training import TrainConfig, train
from tests.conftest import TRAIN_SITES as SITES
from tests.distributed.test_training import _assert_same_run, _cfg, _errors, _metrics, _ok, torchrun


@pytest.fixture(scope="module")
def one_process_topk(tiny_cache, tmp_path_factory):
    """The reference: one process, TopK (d_sae 128, k 8) with AuxK active, 24 steps of 256."""
    run = tmp_path_factory.mktemp("reference") / "run"
    train(TrainConfig.from_dict(_cfg(tiny_cache, run)))
    assert any(r["saes"][SITES[0]]["loss_auxk"] > 0 for r in _metrics(run))  # AuxK was active
    return run


def test_two_latent_shards_train_what_one_process_trains(tiny_cache, tmp_path, one_process_topk):
    """Each rank holds 64 of the 128 latents; the distributed top-k, the summed partial decodes, AuxK over both
    ranks' dead latents, b_dec's summed gradient and the global clipping norm give the one-process run: the saved
    SAE (gathered from the slices), every logged metric (L0, FVU, AuxK, the global dead fraction) and the
    checkpoint's Adam moments and dead-latent counters."""
    run = tmp_path / "run"
    final = _ok(torchrun({"cfg": _cfg(tiny_cache, run, parallel="latent")}))
    _assert_same_run(one_process_topk, run)
    assert final[SITES[0]]["l0"] == pytest.approx(8.0)
    one = torch.load(one_process_topk / "checkpoints" / "checkpoint.pt", weights_only=False)["saes"][SITES[0]]
    two = torch.load(run / "checkpoints" / "checkpoint.pt", weights_only=False)["saes"][SITES[0]]
    assert torch.equal(one["tokens_since_fired"], two["tokens_since_fired"])
    for i, state in one["optimizer"]["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(two["optimizer"]["state"][i][key], value, rtol=1e-4, atol=1e-6)
    info = json.loads((run / "run.json").read_text())
    assert info["distributed"]["segments"] == [{"from_step": 0, "world_size": 2, "parallel": "latent"}]
