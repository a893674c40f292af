"""Latent sharding (--parallel latent) under torchrun (gloo, 2 CPU processes) against one process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from saeforge.distributed.latent import select_global_top
from saeforge.training import TrainConfig, train
from tests.conftest import TRAIN_SITES as SITES
from tests.distributed.test_training import (
    _assert_same_run,
    _cfg,
    _errors,
    _f64,
    _interrupted_run,
    _metrics,
    _ok,
    torchrun,
)


@pytest.fixture(scope="module")
def one_process_topk(tiny_cache, tmp_path_factory):
    """The reference: one process, TopK (d_sae 128, k 8) with AuxK active, 24 steps of 256, float64 (see FLOAT64 in
    test_training.py: summed partial decodes round otherwise than one process's)."""
    run = tmp_path_factory.mktemp("reference") / "run"
    train(TrainConfig.from_dict(_cfg(tiny_cache, run, **_f64())))
    assert any(r["saes"][SITES[0]]["loss_auxk"] > 0 for r in _metrics(run))  # AuxK was active
    return run


def test_two_latent_shards_train_what_one_process_trains(tiny_cache, tmp_path, one_process_topk):
    """Each rank holds 64 of the 128 latents; the distributed top-k, the summed partial decodes, AuxK over both
    ranks' dead latents, b_dec's summed gradient and the global clipping norm give the one-process run: the saved
    SAE (gathered from the slices), every logged metric (L0, FVU, AuxK, the global dead fraction) and the
    checkpoint's Adam moments and dead-latent counters."""
    run = tmp_path / "run"
    final = _ok(torchrun({"cfg": _cfg(tiny_cache, run, parallel="latent", **_f64())}))
    _assert_same_run(one_process_topk, run)
    assert final[SITES[0]]["l0"] == pytest.approx(8.0)
    one = torch.load(one_process_topk / "checkpoints" / "checkpoint.pt", weights_only=False)["saes"][SITES[0]]
    two = torch.load(run / "checkpoints" / "checkpoint.pt", weights_only=False)["saes"][SITES[0]]
    assert torch.equal(one["tokens_since_fired"], two["tokens_since_fired"])
    for i, state in one["optimizer"]["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(two["optimizer"]["state"][i][key], value, rtol=1e-9, atol=1e-15)
    info = json.loads((run / "run.json").read_text())
    assert info["distributed"]["segments"] == [{"from_step": 0, "world_size": 2, "parallel": "latent"}]


@pytest.mark.slow  # two launches, over 20 s
def test_a_latent_run_stopped_on_one_rank_resumes_in_one_process(tiny_cache, tmp_path, one_process_topk):
    """Rank 1's batch of step 9 is NaN: both ranks stop with rank 1's error (no hang); the checkpoint of step 6 (the
    whole SAE, gathered from the two slices) resumes in one process and ends where the one-process run ends."""
    run = tmp_path / "run"
    errors = _errors(torchrun({"cfg": _cfg(tiny_cache, run, parallel="latent", **_f64()), "nan": [1, 9]}))
    assert len(errors) == 2 and errors[0] == errors[1]
    assert errors[0].startswith("rank 1: NaN or Inf in the activations") and "batch of step 9" in errors[0]
    saved = torch.load(run / "checkpoints" / "checkpoint.pt", weights_only=False)
    assert saved["step"] == 6 and saved["saes"][SITES[0]]["model"]["W_enc"].shape == (32, 128)
    train(TrainConfig(resume=str(run), progress=False, threads=1))
    _assert_same_run(one_process_topk, run)
    assert json.loads((run / "run.json").read_text())["distributed"]["segments"] == [
        {"from_step": 0, "world_size": 2, "parallel": "latent"}, {"from_step": 6, "world_size": 1, "parallel": None}]


@pytest.mark.slow  # two launches, over 20 s
def test_a_one_process_run_resumes_as_two_latent_shards(tiny_cache, tmp_path, one_process_topk, monkeypatch):
    run = tmp_path / "run"
    _interrupted_run(tiny_cache, run, monkeypatch)
    _ok(torchrun({"cfg": {"resume": str(run), "parallel": "latent", "progress": False, "threads": 1}}))
    _assert_same_run(one_process_topk, run)
    assert json.loads((run / "run.json").read_text())["distributed"]["segments"] == [
        {"from_step": 0, "world_size": 1, "parallel": None}, {"from_step": 6, "world_size": 2, "parallel": "latent"}]


@pytest.mark.parametrize("spec, message", [
    ({"d_sae": 129}, "d_sae 129 does not split evenly over 2 ranks"),
    pytest.param({"architecture": "batchtopk"}, "batchtopk cannot be latent-sharded", marks=pytest.mark.slow),
])
def test_what_cannot_be_latent_sharded_fails_on_every_rank_with_one_clear_error(tiny_cache, tmp_path, spec, message):
    errors = _errors(torchrun({"cfg": _cfg(tiny_cache, tmp_path / "run", parallel="latent", **spec)}))
    assert len(errors) == 2 and errors[0] == errors[1] and message in errors[0], errors


def _select_on_rank(rank: int, folder: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=2, init_method=f"file://{folder}/rendezvous")
    inf = float("-inf")
    candidates = [[[5.0, 1.0, inf]], [[4.0, 3.0, 2.0]]][rank]
    keep, top = select_global_top(torch.tensor(candidates), 3, rank)
    (Path(folder) / f"rank{rank}.json").write_text(json.dumps([keep.tolist(), sorted(top[0].tolist())]))
    dist.destroy_process_group()


def test_the_global_top_k_is_chosen_from_both_ranks_candidates(tmp_path):
    """Rank 0 offers [5, 1, -inf], rank 1 [4, 3, 2] in one row: the top 3 are 5 (rank 0) and 4, 3 (rank 1); each
    rank keeps its own winners, position 0 on both ranks (a position number both ranks' winners share)."""
    torch.multiprocessing.spawn(_select_on_rank, args=(str(tmp_path),), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert results[0] == [[[True, False, False]], [3.0, 4.0, 5.0]]
    assert results[1] == [[[True, True, False]], [3.0, 4.0, 5.0]]
