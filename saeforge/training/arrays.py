"""Training on activations you already have: no model, no corpus, no manifest to write by hand.

    from saeforge.training import TrainConfig, train_on_arrays
    final = train_on_arrays({"layers.5.resid_post": acts}, TrainConfig(out="run/", k=32, tokens=2_000_000))

The arrays are copied (a shard at a time) into a cache inside the run directory (``run/activations``), so the run
resumes like any other (``saeforge train --resume run/``) and its SAEs record where their data came from. The
cache's manifest says its source is user arrays: no model, no fingerprint, no token policy; ``saeforge eval`` and
``harvest`` then need the model passed with ``--model``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

from saeforge.data.activation_cache import write_array_cache
from saeforge.data.array_import import ArrayInput
from saeforge.errors import SaeforgeError
from saeforge.training.config import TrainConfig, non_default_fields
from saeforge.training.trainer import train

__all__ = ["CACHE_FOLDER", "train_on_arrays"]

CACHE_FOLDER = "activations"


def train_on_arrays(arrays: Mapping[str, ArrayInput], cfg: TrainConfig | None = None, *,
                    cache_dir: str | Path = "", **options: Any) -> dict[str, Any]:
    """Train SAEs on ``{site: [N, d] array}`` (numpy arrays, torch tensors, or paths of .npy / .safetensors / .pt
    files; the same N everywhere) and return the final metrics per SAE.

    ``cfg`` (or keyword ``options`` laid over it, e.g. ``k=32``) sets the training as for ``saeforge train``; its
    ``sites`` default to every array given. The activations are copied into ``cache_dir`` (default:
    ``<out>/activations``). Every input is checked before anything is written or trained.
    """
    cfg = dataclasses.replace(cfg or TrainConfig(), **options)
    if cfg.resume:
        raise SaeforgeError("train_on_arrays starts new runs",
                            f"resume with `saeforge train --resume {cfg.resume}` (the run holds its activations)")
    if not cfg.out:
        raise SaeforgeError("no run directory given", "pass out='RUN_DIR' (the activations are copied into it)")
    if (Path(cfg.out) / "run.json").exists():
        raise SaeforgeError(f"{cfg.out} already holds a run",
                            f"resume it with `saeforge train --resume {cfg.out}`, or pass another out=")
    if not cfg.saes and "sites" not in options and not set(cfg.sites) <= set(arrays):
        cfg = dataclasses.replace(cfg, sites=tuple(arrays))
    folder = Path(cache_dir) if cache_dir else Path(cfg.out) / CACHE_FOLDER
    cfg = dataclasses.replace(cfg, cache=str(folder))
    cfg.validate()
    missing = [s for s in cfg.needed_sites() if s not in arrays]
    if missing:
        raise SaeforgeError(f"no array for site(s) {', '.join(missing)}",
                            f"train on the sites given: sites=({', '.join(map(repr, arrays))},)")
    write_array_cache(folder, arrays, progress=cfg.progress, threads=cfg.threads)
    return train(cfg, non_default_fields(cfg))
