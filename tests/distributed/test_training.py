"""Data- and module-parallel training under torchrun (gloo, 2 CPU processes) against one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from saeforge.training import TrainConfig, train
from tests.conftest import TRAIN_SITES as SITES

TIMEOUT_S = 240  # a hang (a rank waiting in a collective for one that left) fails the test instead of the suite


def _cfg(cache, out, **kw) -> dict:
    base = dict(out=str(out), cache=str(cache.folder), sites=[SITES[0]], tokens=256 * 24, batch_size=256, d_sae=128,
                k=8, checkpoint_every=6, log_every=4, progress=False, device="cpu", lr_warmup_steps=3,
                dead_after_tokens=512, threads=1)
    base.update(kw)
    return base


def torchrun(spec: dict, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                           "-m", "tests.distributed.worker", json.dumps(spec)],
                          capture_output=True, text=True, timeout=TIMEOUT_S, env=env)


def _ok(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    finals = [json.loads(line[6:]) for line in proc.stdout.splitlines() if line.startswith("FINAL ")]
    assert len(finals) == 2 and finals[0] == finals[1]  # every rank returns the same final metrics
    return finals[0]


def _weights(run, name=SITES[0]) -> dict[str, torch.Tensor]:
    return load_file(str(run / "saes" / name / "sae_weights.safetensors"))


def _metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_same_run(one, two, exact: bool = False) -> None:
    for name in json.loads((one / "run.json").read_text())["final"]:
        a, b = _weights(one, name), _weights(two, name)
        assert a.keys() == b.keys()
        for key in a:
            if exact:
                assert torch.equal(a[key], b[key]), (name, key)
            else:
                # float32 rounding of a gradient summed in another order, carried through 24 Adam steps
                torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=2e-5)
    m1, m2 = _metrics(one), _metrics(two)
    assert [r["step"] for r in m1] == [r["step"] for r in m2]
    for r1, r2 in zip(m1, m2):
        for name, s1 in r1["saes"].items():
            for key, v in s1.items():
                if isinstance(v, float):
                    assert r2["saes"][name][key] == pytest.approx(v, rel=1e-4, abs=1e-6), (r1["step"], name, key)


CLASSIC_RELU = {"sae_options": '{"variant": "classic", "resample_every": 8}'}


@pytest.mark.parametrize("arch, options", [("topk", {}),
                                           pytest.param("relu", CLASSIC_RELU, marks=pytest.mark.slow)])
def test_two_ranks_train_what_one_process_trains(tiny_cache, tmp_path, arch, options):
    """TopK with AuxK on dead latents (dead after 2 steps) and classic ReLU resampling: the dead-latent statistics,
    AuxK's normalisation and the resampling draws are global, so 2 ranks × 128 rows = one process × 256 rows."""
    one = tmp_path / "one"
    train(TrainConfig.from_dict(_cfg(tiny_cache, one, architecture=arch, **options)))
    records = _metrics(one)
    if arch == "topk":
        assert any(r["saes"][SITES[0]]["loss_auxk"] > 0 for r in records)  # AuxK was active
    two = tmp_path / "two"
    final = _ok(torchrun({"cfg": _cfg(tiny_cache, two, architecture=arch, **options)}))
    _assert_same_run(one, two)
    assert final[SITES[0]]["fvu"] == pytest.approx(records[-1]["saes"][SITES[0]]["fvu"], rel=1e-4)
    info = json.loads((two / "run.json").read_text())
    assert info["status"] == "complete"
    assert info["distributed"]["segments"] == [{"from_step": 0, "world_size": 2, "parallel": "data"}]
    assert "bit-identically" in info["distributed"]["bit_identical"]
