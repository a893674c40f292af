"""The run directory: created for a new run, reopened to resume one (its saved config compared with the options
given), and locked against a second ``saeforge train`` on it for as long as the run is open.

``run.json`` holds the format, a run id, the full config (flat, the layout of a ``--config`` file), the versions, the
data the run reads (``data``: the model and its fingerprint, or the user arrays of a cache) and, at the end, the
final metrics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from saeforge.errors import SaeforgeError
from saeforge.training.config import RESUME_FREE_FIELDS, TrainConfig
from saeforge.utils.atomic import atomic_write_json, remove_stale_temporaries
from saeforge.utils.locking import LOCK_FILE, exclusive_lock

__all__ = ["BIT_IDENTITY", "RUN_FORMAT", "FORMAT_VERSION", "open_run", "read_run_info", "record_data",
           "record_ranks"]

RUN_FORMAT = "saeforge-run"
FORMAT_VERSION = 1
LOCK_WHAT = "saeforge train"
# run.json's statement, in runs that ever ran on several ranks (docs/distributed.md)
BIT_IDENTITY = ("Resumed on the same number of ranks with the same --parallel mode, a run continues bit-identically "
                "to an uninterrupted one. Across numbers of ranks in data-parallel mode the gradient of each step is "
                "summed in another order (latent-sharded: the reconstruction and the encoder's dot products too), so "
                "results agree to floating-point rounding, not bit for bit. "
                "Module-parallel training is bit-identical to one process for SAEs that draw no random numbers "
                "while training.")


def _versions() -> dict[str, str]:
    # transformers' version from its installed metadata: importing it costs 0.3 s, and a run from a cache never
    # needs it otherwise
    from importlib.metadata import version

    import torch

    from saeforge import __version__

    return {"saeforge": __version__, "torch": torch.__version__, "transformers": version("transformers")}


def read_run_info(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "run.json"
    if not path.is_file():
        raise SaeforgeError(f"{run_dir} is not a saeforge run (no run.json)",
                            "pass the folder given to --out: `saeforge train --resume RUN_DIR`")
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SaeforgeError(f"{path} is corrupt: {err}",
                            "the run cannot be resumed; start a new one with `saeforge train --out NEW_DIR`") from err
    if info.get("format") != RUN_FORMAT or info.get("version", 99) > FORMAT_VERSION:
        raise SaeforgeError(f"{path} is not a run this saeforge version can resume",
                            "start a new run with `saeforge train --out NEW_DIR`")
    return info


def _new_run(cfg: TrainConfig, run_dir: Path) -> dict[str, Any]:
    if (run_dir / "run.json").exists():
        raise SaeforgeError(f"{run_dir} already holds a run",
                            f"resume it with `saeforge train --resume {run_dir}`, or pick a new --out")
    # The lock file is ours; a cache the run reads may live inside the run directory (train_on_arrays puts it there).
    cache = Path(cfg.cache).resolve() if cfg.cache else None
    others = [p for p in run_dir.iterdir() if p.name != LOCK_FILE and p.resolve() != cache]
    if others:
        raise SaeforgeError(f"--out {run_dir} exists and is not empty", "pass a new or empty folder to --out")
    # Written by record_data once the data source opened: a run that fails to start leaves no run.json behind,
    # so the same command, corrected, can use the same --out.
    return {"format": RUN_FORMAT, "version": FORMAT_VERSION, "run_id": uuid.uuid4().hex,
            "config": cfg.to_dict(), "versions": _versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "status": "running"}


def _resumed_config(cfg: TrainConfig, info: dict[str, Any], run_dir: Path, given: list[str]) -> TrainConfig:
    """The saved config, after checking that every option given equals it; the resume-free options (device,
    threads, progress) are taken from ``cfg`` when given."""
    saved = TrainConfig.from_dict(info["config"])
    diffs = cfg.differences(saved, given)
    if diffs:
        raise SaeforgeError("the run was started with another config; differences:\n    " + "\n    ".join(diffs),
                            f"resume with the saved settings (`saeforge train --resume {run_dir}` alone), or "
                            "start a new run with --out")
    keep = {f: getattr(cfg, f) for f in RESUME_FREE_FIELDS if f in given and f not in ("out", "resume", "config")}
    return dataclasses.replace(saved, resume=str(run_dir), **keep)


@contextlib.contextmanager
def open_run(cfg: TrainConfig, given: list[str]) -> Iterator[tuple[TrainConfig, Path, dict[str, Any]]]:
    """Create (``cfg.out``) or reopen (``cfg.resume``) the run directory and hold its lock for the block.

    Yields the config the run uses (on resume: the saved one), the directory and the contents of ``run.json``.
    Every check that needs no lock runs first, so a mistyped path creates no folder.
    """
    if cfg.resume:
        run_dir = Path(cfg.resume)
        read_run_info(run_dir)
    else:
        cfg.validate()
        if not cfg.out:
            raise SaeforgeError("no run directory given", "pass --out RUN_DIR (or --resume RUN_DIR)")
        run_dir = Path(cfg.out)
        if run_dir.exists() and not run_dir.is_dir():
            raise SaeforgeError(f"--out {run_dir} is a file", "pass a folder path to --out")
    with exclusive_lock(run_dir, LOCK_WHAT):
        if cfg.resume:
            info = read_run_info(run_dir)  # again, under the lock: the run may have moved on meanwhile
            cfg = _resumed_config(cfg, info, run_dir, given)
        else:
            info = _new_run(cfg, run_dir)
        remove_stale_temporaries(run_dir / "checkpoints")
        remove_stale_temporaries(run_dir)
        yield cfg, run_dir, info


def record_data(run_dir: Path, info: dict[str, Any], data: dict[str, Any]) -> None:
    """Write run.json with what the run reads the first time (a new run's run.json appears here); refuse a resume
    that reads something else."""
    if info.get("data") == data:
        return
    if "data" in info:
        raise SaeforgeError(f"the training data changed since the run started (was {info['data']}, now {data})",
                            f"resume with the same model and cache: `saeforge train --resume {run_dir}` alone")
    info["data"] = data
    atomic_write_json(run_dir / "run.json", info)


def record_ranks(run_dir: Path, info: dict[str, Any], step: int, world_size: int, parallel: str | None) -> None:
    """At the start (or resume) of a stretch of the run: run.json's ``distributed`` gets the statement of what is
    bit-identical and the stretches (``from_step``, ``world_size``, ``parallel``: None in one process). Runs that
    never ran on several ranks get nothing."""
    if world_size == 1 and "distributed" not in info:
        return
    record = info.setdefault("distributed", {"bit_identical": BIT_IDENTITY, "segments": []})
    segments = record["segments"]
    if not segments and step > 0:
        segments.append({"from_step": 0, "world_size": 1, "parallel": None})
    if segments and (segments[-1]["world_size"], segments[-1]["parallel"]) == (world_size, parallel):
        return
    segments.append({"from_step": step, "world_size": world_size, "parallel": parallel})
    atomic_write_json(run_dir / "run.json", info)
