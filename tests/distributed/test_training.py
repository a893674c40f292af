"""Data- and module-parallel training under torchrun (gloo, 2 CPU processes) against one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from saeforge.training import TrainConfig, train
from tests.conftest import TRAIN_SITES as SITES

TIMEOUT_S = 240  # a hang (a rank waiting in a collective for one that left) fails the test instead of the suite

# Two ranks all-reduce two half-batch gradients, which rounds otherwise than one process's whole-batch gradient; in
# float32 that difference (~1e-7) can flip a near-tie of the top-k within 24 steps, and the runs part ways for any
# change of rounding (a faster decoder-gradient projection, a torch upgrade). In float64 it is ~1e-16 and a flip is
# out of reach, so the runs compared across world sizes train float64 SAEs and are held to float64 tolerances. What
# they test (the all-reduce, BatchTopK's global top-k, AuxK's statistics, resampling, HSAE's coefficients) does not
# depend on the dtype; the float32 kernels are held to the PyTorch path by their own tests (tests/kernels).
FLOAT64 = {"dtype": "float64"}

# Two ranks all-reduce two half-batch gradients, which rounds otherwise than one process's whole-batch gradient; in
# float32 that difference (~1e-7) can flip a near-tie of the top-k within 24 steps, and the runs part ways for any
# change of rounding (a faster decoder-gradient projection, a torch upgrade). In float64 it is ~1e-16 and a flip is
# out of reach, so the runs compared across world sizes train float64 SAEs and are held to float64 tolerances. What
# they test (the all-reduce, BatchTopK's global top-k, AuxK's statistics, resampling, HSAE's coefficients) does not
# depend on the dtype; the float32 kernels are held to the PyTorch path by their own tests (tests/kernels).
FLOAT64 = {"dtype": "float64"}


def _cfg(cache, out, **kw) -> dict:
    base = dict(out=str(out), cache=str(cache.folder) if cache else "", sites=[SITES[0]], tokens=256 * 24, batch_size=256, d_sae=128,
                k=8, checkpoint_every=6, log_every=4, progress=False, device="cpu", lr_warmup_steps=3,
                dead_after_tokens=512, threads=1)
    base.update(kw)
    return base


def torchrun(spec: dict, nproc: int = 2) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """Run the worker on ``nproc`` ranks; the process and each rank's report, in rank order."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as report:
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               f"--nproc-per-node={nproc}", "-m", "tests.distributed.worker",
                               json.dumps({**spec, "report": report})],
                              capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
        reports = [json.loads(p.read_text()) for p in sorted(Path(report).glob("rank*.json"))]
    return proc, reports


def _ok(run: tuple[subprocess.CompletedProcess, list[dict]]) -> dict:
    proc, reports = run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(reports) == 2 and reports[0] == reports[1]  # every rank returns the same final metrics
    return reports[0]["final"]


def _weights(run, name=SITES[0]) -> dict[str, torch.Tensor]:
    return load_file(str(run / "saes" / name / "sae_weights.safetensors"))


def _metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _f64(options: dict | None = None) -> dict:
    """TrainConfig fields for a float64 SAE, with the architecture's other ``options``."""
    return {"sae_options": json.dumps({**(options or {}), **FLOAT64})}


def _assert_same_run(one, two, exact: bool = False) -> None:
    """Bit for bit (``exact``), or float64 runs equal up to float64 rounding of a gradient summed in another order,
    carried through 24 Adam steps."""
    for name in json.loads((one / "run.json").read_text())["final"]:
        a, b = _weights(one, name), _weights(two, name)
        assert a.keys() == b.keys()
        for key in a:
            if exact:
                assert torch.equal(a[key], b[key]), (name, key)
            else:
                if a[key].is_floating_point() and key in ("W_enc", "W_dec", "b_enc", "b_dec"):
                    assert a[key].dtype == torch.float64, (name, key)
                torch.testing.assert_close(b[key], a[key], rtol=1e-9, atol=1e-12)
    m1, m2 = _metrics(one), _metrics(two)
    assert [r["step"] for r in m1] == [r["step"] for r in m2]
    for r1, r2 in zip(m1, m2):
        for name, s1 in r1["saes"].items():
            for key, v in s1.items():
                if isinstance(v, float):
                    assert r2["saes"][name][key] == pytest.approx(v, rel=1e-9, abs=1e-12), (r1["step"], name, key)


CLASSIC_RELU = {"variant": "classic", "resample_every": 8}


@pytest.mark.parametrize("arch, options", [("topk", {}), ("batchtopk", {}),
                                           pytest.param("matryoshka", {}, marks=pytest.mark.slow),
                                           pytest.param("hsae", {}, marks=pytest.mark.slow),
                                           pytest.param("relu", CLASSIC_RELU, marks=pytest.mark.slow)])
def test_two_ranks_train_what_one_process_trains(tiny_cache, tmp_path, arch, options):
    """TopK with AuxK on dead latents (dead after 2 steps), BatchTopK and Matryoshka (the N·k largest of the global
    batch chosen over the ranks, the inference threshold from the global batch's smallest winner), HSAE (its
    sparsity coefficients follow the global batch's L0 per level) and classic ReLU resampling: the dead-latent
    statistics, AuxK's normalisation and the resampling draws are global, so 2 ranks × 128 rows = one process × 256
    rows."""
    one = tmp_path / "one"
    train(TrainConfig.from_dict(_cfg(tiny_cache, one, architecture=arch, **_f64(options))))
    records = _metrics(one)
    if arch in ("topk", "batchtopk", "matryoshka"):
        assert any(r["saes"][SITES[0]]["loss_auxk"] > 0 for r in records)  # AuxK was active
    if arch in ("batchtopk", "matryoshka"):  # the threshold was learned (over the run's second half) and is saved
        assert float(_weights(one)["threshold"][0]) > 0
    two = tmp_path / "two"
    final = _ok(torchrun({"cfg": _cfg(tiny_cache, two, architecture=arch, **_f64(options))}))
    _assert_same_run(one, two)
    assert final[SITES[0]]["fvu"] == pytest.approx(records[-1]["saes"][SITES[0]]["fvu"], rel=1e-9)
    info = json.loads((two / "run.json").read_text())
    assert info["status"] == "complete"
    assert info["distributed"]["segments"] == [{"from_step": 0, "world_size": 2, "parallel": "data"}]
    assert "bit-identically" in info["distributed"]["bit_identical"]


@pytest.fixture(scope="module")
def one_process_run(tiny_cache, tmp_path_factory):
    """The reference: one process, TopK with AuxK, 24 steps of 256, float64."""
    run = tmp_path_factory.mktemp("reference") / "run"
    train(TrainConfig.from_dict(_cfg(tiny_cache, run, **_f64())))
    return run


def _errors(run: tuple[subprocess.CompletedProcess, list[dict]]) -> list[str]:
    """Each rank's SaeforgeError, in rank order."""
    proc, reports = run
    assert proc.returncode != 0, proc.stdout[-2000:]
    return [r["error"] for r in reports if "error" in r]


@pytest.mark.slow  # two launches, over 20 s
def test_a_nan_on_one_rank_stops_both_and_the_run_resumes_on_one(tiny_cache, tmp_path, one_process_run):
    """Rank 1's share of step 9 is NaN: both ranks stop with the same error naming rank 1 (no hang); the checkpoint
    of step 6 resumes in one process and ends where the uninterrupted one-process run ends."""
    run = tmp_path / "run"
    errors = _errors(torchrun({"cfg": _cfg(tiny_cache, run, **_f64()), "nan": [1, 9]}))
    assert len(errors) == 2 and errors[0] == errors[1]
    assert "NaN or Inf in the activations" in errors[0] and "rank 1's share of the batch of step 9" in errors[0]
    assert torch.load(run / "checkpoints" / "checkpoint.pt", weights_only=False)["step"] == 6
    train(TrainConfig(resume=str(run), progress=False, threads=1))
    _assert_same_run(one_process_run, run)
    info = json.loads((run / "run.json").read_text())
    assert info["distributed"]["segments"] == [{"from_step": 0, "world_size": 2, "parallel": "data"},
                                               {"from_step": 6, "world_size": 1, "parallel": None}]


@pytest.mark.slow  # two launches, over 20 s
def test_a_one_process_run_resumes_on_two_ranks(tiny_cache, tmp_path, one_process_run, monkeypatch):
    run = tmp_path / "run"
    _interrupted_run(tiny_cache, run, monkeypatch)
    assert not (run / "saes").exists()
    _ok(torchrun({"cfg": {"resume": str(run), "progress": False, "threads": 1}}))
    _assert_same_run(one_process_run, run)
    assert json.loads((run / "run.json").read_text())["distributed"]["segments"] == [
        {"from_step": 0, "world_size": 1, "parallel": None}, {"from_step": 6, "world_size": 2, "parallel": "data"}]


def _interrupted_run(tiny_cache, run, monkeypatch) -> None:
    """A one-process run killed between checkpoints at step 9 (its checkpoint is of step 6)."""
    from saeforge.training.trainer import Trainer

    plain = Trainer._batches

    def stop_at_step_9(self):
        for batch in plain(self):
            if self.step == 9:
                raise KeyboardInterrupt  # a kill between checkpoints
            yield batch

    monkeypatch.setattr(Trainer, "_batches", stop_at_step_9)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig.from_dict(_cfg(tiny_cache, run, **_f64())))
    monkeypatch.undo()


@pytest.mark.slow  # a launch and a run, over 20 s
@pytest.mark.parametrize("parallel", ["data", "latent"])
def test_a_checkpoint_of_another_run_is_refused_on_every_rank(tiny_cache, tmp_path, one_process_run, monkeypatch,
                                                              parallel):
    """The run directory's checkpoint was copied from another run: both ranks refuse it with the same error, and
    nothing of the run is changed."""
    import shutil

    run = tmp_path / "run"
    _interrupted_run(tiny_cache, run, monkeypatch)
    shutil.copy(one_process_run / "checkpoints" / "checkpoint.pt", run / "checkpoints" / "checkpoint.pt")
    before = (run / "metrics.jsonl").read_bytes()
    errors = _errors(torchrun({"cfg": {"resume": str(run), "parallel": parallel, "progress": False, "threads": 1}}))
    assert len(errors) == 2 and errors[0] == errors[1] and "belongs to another run" in errors[0], errors
    assert (run / "metrics.jsonl").read_bytes() == before and not (run / "saes").exists()


@pytest.mark.slow  # two launches, over 20 s
def test_module_parallel_trains_the_same_saes_bit_for_bit(tiny_cache, tmp_path):
    """Three SAEs (one BatchTopK) spread over 2 ranks, whole batches each."""
    # float32 on purpose: each SAE sees the whole batch on one rank and runs the same ops as one process, so the
    # bits agree whatever the ops round like (the float32 fast path is the one people train)
    saes = [{"site": SITES[0], "name": "a"}, {"site": SITES[1], "name": "b", "k": 4, "d_sae": 64},
            {"site": SITES[0], "name": "c", "architecture": "batchtopk"}]
    one, two = tmp_path / "one", tmp_path / "two"
    train(TrainConfig.from_dict(_cfg(tiny_cache, one, saes=saes)))
    _ok(torchrun({"cfg": _cfg(tiny_cache, two, saes=saes, parallel="module")}))
    _assert_same_run(one, two, exact=True)
    assert torch.equal(torch.load(one / "checkpoints" / "checkpoint.pt", weights_only=False)["saes"]["b"]["model"]
                       ["W_enc"],
                       torch.load(two / "checkpoints" / "checkpoint.pt", weights_only=False)["saes"]["b"]["model"]
                       ["W_enc"])


@pytest.mark.parametrize("case, spec, message", [
    ("batch split", {"batch_size": 255, "tokens": 255 * 4}, "--batch-size 255 does not split evenly over 2 ranks"),
    ("configs differ", {"rank_cfg": {"1": {"k": 16}}}, "k: rank 0 8, rank 1 16"),
    pytest.param("batch selection", {"architecture": "batchtopk_clt", "target_sites": [SITES[1]]},
                 "cannot be trained data-parallel", marks=pytest.mark.slow),
])
def test_bad_launches_fail_on_every_rank_with_one_clear_error(tiny_cache, tmp_path, case, spec, message):
    spec = dict(spec)
    rank_cfg = spec.pop("rank_cfg", {})
    errors = _errors(torchrun({"cfg": _cfg(tiny_cache, tmp_path / "run", **spec), "rank_cfg": rank_cfg}))
    assert len(errors) == 2 and errors[0] == errors[1] and message in errors[0], errors
    assert not (tmp_path / "run" / "run.json").exists() or case == "batch selection"


@pytest.mark.slow  # a model on each rank
def test_data_parallel_from_the_live_model_shares_the_forward_passes(tiny_llama_dir, text_file, tmp_path):
    """Each rank runs the model on half of each fill's contexts; the gathered fill is the one process's."""
    live = dict(model=str(tiny_llama_dir), corpus=str(text_file), cache="", sites=["layers.1.mlp_out"],
                context_length=32, buffer_tokens=1024, tokens=128 * 12, batch_size=128, d_sae=64, k=4)
    one, two = tmp_path / "one", tmp_path / "two"
    train(TrainConfig.from_dict({**_cfg(None, one, **_f64()), **live}))
    _ok(torchrun({"cfg": {**_cfg(None, two, **_f64()), **live}}))
    _assert_same_run(one, two)
