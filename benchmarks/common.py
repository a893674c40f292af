"""Helpers shared by the benchmarks: machine description, peak memory, result files, saeforge's train step."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "date": time.strftime("%Y-%m-%d"), "python": platform.python_version()}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median(xs):
    return statistics.median(xs)


def write_result(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def saeforge_train_step(sae, opt, tracker):
    """``step(x) -> TrainOutput``: one training step of ``sae`` as saeforge's trainer takes it — the loss through the
    sparse kernels, backward, the decoder-norm projection, ``opt.step()``, renormalisation, ``zero_grad`` and the
    dead-latent tracker (``train_step.py`` and ``gpu_step.py`` time the same step)."""
    from saeforge.saes import TrainState

    state = {"step": 0}

    def step(x):
        out = sae.training_loss(x, state=TrainState(step=state["step"], dead_mask=tracker.dead_mask))
        out.loss.backward()
        sae.before_optimizer_step()
        opt.step()
        sae.after_optimizer_step()
        opt.zero_grad(set_to_none=True)
        tracker.update(out.fired, x.shape[0])
        state["step"] += 1
        return out

    return step
