"""Checkpoints: everything that determines the next step, written atomically, read back exactly.

``checkpoints/checkpoint.pt`` holds, per SAE, its weights, optimiser and scheduler state, dead-latent counter and
input scaling; and for the run the step, the stream position, the RNG states and the length of ``metrics.jsonl`` at
that step (so metrics recorded after it are dropped on resume and recorded again).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch

from saeforge.errors import SaeforgeError
from saeforge.saes import SAE, ActivationScaler, DeadLatentTracker
from saeforge.training.scaling import SiteScaler, scaler_from_dict
from saeforge.utils.atomic import atomic_write

__all__ = ["CHECKPOINT_FORMAT", "FORMAT_VERSION", "checkpoint_state", "load_checkpoint", "read_checkpoint",
           "rng_state", "save_checkpoint", "set_rng_state", "write_checkpoint"]

CHECKPOINT_FORMAT = "saeforge-checkpoint"
FORMAT_VERSION = 1


class Checkpointed(Protocol):
    """What a checkpoint holds of one SAE being trained (the trainer's ``Trainee``)."""

    name: str
    sae: SAE
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    tracker: DeadLatentTracker
    scaler: ActivationScaler | SiteScaler


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_state(*, run_id: str, step: int, stream_state: dict, metrics_path: Path,
                     trainees: list[Checkpointed]) -> dict[str, Any]:
    """What a checkpoint holds, taken now (the tensors by reference: write it before they change)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "version": FORMAT_VERSION,
        "run_id": run_id,
        "step": step,
        "stream": stream_state,
        "metrics_bytes": metrics_path.stat().st_size if metrics_path.exists() else 0,
        "rng": rng_state(),
        "saes": {t.name: {"model": t.sae.state_dict(), "optimizer": t.optimizer.state_dict(),
                          "scheduler": t.scheduler.state_dict(),
                          "tokens_since_fired": t.tracker.tokens_since_fired,
                          "scaler": t.scaler.to_dict()} for t in trainees},
    }


def write_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write a :func:`checkpoint_state` to ``path`` atomically."""
    atomic_write(path, lambda p: torch.save(state, p))


def save_checkpoint(path: Path, *, run_id: str, step: int, stream_state: dict, metrics_path: Path,
                    trainees: list[Checkpointed]) -> None:
    write_checkpoint(path, checkpoint_state(run_id=run_id, step=step, stream_state=stream_state,
                                            metrics_path=metrics_path, trainees=trainees))


def read_checkpoint(path: Path, device: torch.device) -> dict[str, Any] | None:
    """The contents of the checkpoint at ``path`` (None when there is none yet), its format checked."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except Exception as err:
        raise SaeforgeError(f"checkpoint {path} is unreadable: {err}",
                            f"it was not written by saeforge or is damaged; start a new run with "
                            f"`saeforge train --out NEW_DIR` (or delete {path} to restart this run)") from err
    if state.get("format") != CHECKPOINT_FORMAT or state.get("version", 99) > FORMAT_VERSION:
        raise SaeforgeError(f"{path} is not a saeforge checkpoint this version can read",
                            "start a new run with `saeforge train --out NEW_DIR`, or upgrade saeforge")
    return state


def load_checkpoint(path: Path, *, run_id: str, trainees: list[Checkpointed], metrics_path: Path | None,
                    device: torch.device, read: Callable[[Path], dict[str, Any] | None] | None = None,
                    ) -> tuple[int, dict] | None:
    """Restore every trainee, the RNG states and ``metrics.jsonl`` (unless ``metrics_path`` is None) from ``path``;
    return (step, stream state), or None when there is no checkpoint yet. ``read`` reads the file (default
    :func:`read_checkpoint`; under torchrun one rank reads it and sends it to the others)."""
    state = read(path) if read is not None else read_checkpoint(path, device)
    if state is None:
        return None
    if state["run_id"] != run_id:
        raise SaeforgeError(f"{path} belongs to another run ({state['run_id']}, this run is {run_id})",
                            "resume the run that wrote it (`saeforge train --resume ITS_DIR`), or start afresh")
    by_name = {t.name: t for t in trainees}
    if set(state["saes"]) != set(by_name):
        raise SaeforgeError(f"checkpoint holds SAEs {sorted(state['saes'])}, the config has {sorted(by_name)}",
                            "resume with the run's own config: `saeforge train --resume RUN_DIR` alone")
    for name, s in state["saes"].items():
        t = by_name[name]
        t.sae.load_state_dict(s["model"])
        t.optimizer.load_state_dict(s["optimizer"])
        t.scheduler.load_state_dict(s["scheduler"])
        t.tracker.tokens_since_fired.copy_(s["tokens_since_fired"])
        t.scaler = scaler_from_dict(s["scaler"])
    set_rng_state(state["rng"])
    if metrics_path is not None and metrics_path.exists():  # drop metrics recorded after the checkpoint; they will be recorded again
        with open(metrics_path, "r+b") as fh:
            fh.truncate(state["metrics_bytes"])
    return state["step"], state["stream"]
