"""A small trained run for the hierarchy commands: an HSAE, two single-level SAEs of the same widths, and a Matryoshka
with the same groups, at layer 1 of the tiny Llama, and a TopK SAE at layer 2 (for modules), trained together."""

from __future__ import annotations

import json

import pytest

from tests.conftest import TRAIN_SITES


@pytest.fixture(scope="session")
def hierarchy_run(tiny_cache, tmp_path_factory):
    from saeforge.training import TrainConfig, train

    run = tmp_path_factory.mktemp("hierarchy") / "run"
    site = TRAIN_SITES[0]
    levels = {"level_sizes": [16, 64], "target_l0": [4, 8]}
    saes = ({"site": site, "name": "hsae", "architecture": "hsae", "sae_options": json.dumps(levels)},
            {"site": site, "name": "w16", "architecture": "hsae",
             "sae_options": json.dumps({"level_sizes": [16], "target_l0": [4]})},
            {"site": site, "name": "w64", "architecture": "hsae",
             "sae_options": json.dumps({"level_sizes": [64], "target_l0": [8]})},
            {"site": site, "name": "matryoshka", "architecture": "matryoshka", "k": 8, "d_sae": 80,
             "sae_options": json.dumps({"group_sizes": [16, 64], "threshold_start_step": 2})},
            {"site": TRAIN_SITES[1], "name": "l2", "architecture": "topk", "k": 4, "d_sae": 64})
    train(TrainConfig(out=str(run), cache=str(tiny_cache.folder), tokens=256 * 24, batch_size=256, progress=False,
                      device="cpu", lr_warmup_steps=2, checkpoint_every=100, saes=saes))
    return run
