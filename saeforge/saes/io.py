"""Save and load SAEs in saeforge's native folder format, which is also a SAELens v6 folder.

A saved SAE is a folder::

    cfg.json                      SAELens v6 inference config + a "saeforge" section (exact saeforge config)
    sae_weights.safetensors       inference weights under SAELens v6 names/orientation (and only those: SAELens
                                  loads them with a strict state_dict load)
    saeforge_state.safetensors    (when needed) saeforge tensors SAELens has no slot for, or that its layout
                                  cannot carry bit-exactly: JumpReLU's log_threshold, BatchTopK's scalar threshold
    sparsity.safetensors          (optional) feature statistics; key "sparsity" = log10 feature density

How each architecture appears to SAELens: relu -> "standard" (or "transcoder"), topk -> "topk" with ``k``,
gated -> "gated", jumprelu -> "jumprelu" (or "jumprelu_transcoder"), batchtopk and matryoshka -> "jumprelu" with
``threshold`` = their learned global threshold for every latent (SAELens does the same). Input normalisation must
be folded into the weights before saving (``normalize_activations`` is always "none").

Every file is written atomically and ``cfg.json`` last, so a folder with a cfg.json is complete.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saeforge.errors import SaeforgeError
from saeforge.saes.base import SAE, SAEConfig
from saeforge.saes.registry import make_sae
from saeforge.utils.atomic import atomic_save_safetensors, atomic_write_json

__all__ = [
    "CFG_FILENAME",
    "EXTRA_STATE_FILENAME",
    "FORMAT_VERSION",
    "SPARSITY_FILENAME",
    "WEIGHTS_FILENAME",
    "load_feature_stats",
    "load_sae",
    "log10_density",
    "read_sae_config",
    "save_sae",
]

FORMAT_VERSION = 1
CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
EXTRA_STATE_FILENAME = "saeforge_state.safetensors"
SPARSITY_FILENAME = "sparsity.safetensors"


def _saeforge_version() -> str:
    from saeforge import __version__

    return __version__


def save_sae(sae: SAE, folder: str | Path, *, metadata: dict[str, Any] | None = None,
             feature_stats: dict[str, Tensor] | None = None) -> Path:
    """Write ``sae`` to ``folder`` (created if needed; files inside are replaced). Returns the folder.

    metadata: SAELens ``metadata{}`` fields (``hook_name``, ``model_name``, ``context_size``, ...), JSON-ready.
    feature_stats: per-latent tensors [d_sae] written to sparsity.safetensors; SAELens reads ``"sparsity"``
    (log10 feature density) from it.
    """
    if not isinstance(sae, SAE):
        raise SaeforgeError(f"save_sae needs a saeforge SAE, got {type(sae).__name__}",
                            "build it with saeforge.saes.make_sae or load it with load_sae")
    folder = Path(folder)
    cfg = sae.cfg
    metadata = dict(metadata or {})
    # SAELens reads a cfg.json without metadata.sae_lens_version as a pre-6.0 config and drops metadata{} (hook_name,
    # model_name...); the version marks the v6 layout these files follow.
    metadata.setdefault("sae_lens_version", "6.0.0")
    stats = {}
    for name, t in (feature_stats or {}).items():
        if not isinstance(t, Tensor) or t.shape != (cfg.d_sae,):
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise SaeforgeError(f"feature statistic {name!r} must be a tensor of shape [{cfg.d_sae}], got {shape}",
                                "pass one value per latent")
        stats[name] = t.detach()

    tensors = sae.saelens_tensors()
    extra = sae.extra_tensors()
    for message in sae.export_warnings():
        warnings.warn(message, stacklevel=2)
    cfg_json: dict[str, Any] = {
        "architecture": sae.saelens_architecture(),
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": cfg.dtype,
        "device": str(sae.device),
        "apply_b_dec_to_input": bool(cfg.apply_b_dec_to_input),
        "normalize_activations": "none",
        "reshape_activations": "none",
        **sae.saelens_config_extras(),
    }
    if cfg.is_transcoder:
        cfg_json["d_out"] = cfg.d_out
        for key in ("hook_name_out", "hook_layer_out", "hook_head_index_out"):
            if key in metadata:  # older SAELens transcoder configs keep these at the top level
                cfg_json[key] = metadata[key]
    cfg_json["metadata"] = metadata
    cfg_json["saeforge"] = {
        "format_version": FORMAT_VERSION,
        "architecture": cfg.architecture,
        "config": cfg.to_dict(),
        "extra_state_file": EXTRA_STATE_FILENAME if extra else None,
        "saeforge_version": _saeforge_version(),
    }
    try:
        json.dumps(cfg_json)
    except (TypeError, ValueError) as err:
        raise SaeforgeError(f"the SAE metadata cannot be written as JSON: {err}",
                            "pass only strings, numbers, booleans, lists and dicts in metadata") from err

    folder.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(folder / WEIGHTS_FILENAME, tensors)
    if extra:
        atomic_save_safetensors(folder / EXTRA_STATE_FILENAME, extra)
    else:
        (folder / EXTRA_STATE_FILENAME).unlink(missing_ok=True)  # a stale one from an earlier save would mislead
    if stats:
        atomic_save_safetensors(folder / SPARSITY_FILENAME, stats)
    sae.write_extra_files(folder, metadata, stats or None)
    atomic_write_json(folder / CFG_FILENAME, cfg_json)
    return folder


def read_sae_config(folder: str | Path) -> dict[str, Any]:
    """The parsed cfg.json of a saved SAE folder (SAELens fields plus the "saeforge" section)."""
    path = Path(folder) / CFG_FILENAME
    if not Path(folder).is_dir():
        raise SaeforgeError(f"{folder} is not a folder", "pass the folder save_sae wrote")
    if not path.is_file():
        raise SaeforgeError(f"{path} is missing", "pass a folder written by saeforge.saes.save_sae")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SaeforgeError(f"{path} is not valid JSON: {err}", "re-save the SAE; the file is damaged") from err
    if not isinstance(data, dict):
        raise SaeforgeError(f"{path} does not hold a JSON object", "re-save the SAE; the file is damaged")
    return data


def _read_tensors(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise SaeforgeError(f"{path} is missing", "the save is incomplete; re-save the SAE")
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error type for damaged headers/data
        raise SaeforgeError(f"{path} is not a readable safetensors file: {err}",
                            "re-save the SAE; the file is damaged or truncated") from err


def _check_tensors(path: Path, found: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    missing = sorted(set(expected) - set(found))
    if missing:
        raise SaeforgeError(f"{path} lacks tensor(s) {', '.join(missing)}",
                            "re-save the SAE; the file does not match its cfg.json")
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        raise SaeforgeError(f"{path} has unexpected tensor(s) {', '.join(unexpected)}",
                            "re-save the SAE; the file does not match its cfg.json")
    for name, want in expected.items():
        if tuple(found[name].shape) != tuple(want.shape):
            raise SaeforgeError(f"{path}: tensor {name!r} has shape {tuple(found[name].shape)}, "
                                f"but the config needs {tuple(want.shape)}",
                                "re-save the SAE; the weights do not match its cfg.json")


def load_sae(folder: str | Path, *, device: str | torch.device | None = None) -> SAE:
    """Restore an SAE written by :func:`save_sae` exactly (same config, same tensors bit for bit)."""
    folder = Path(folder)
    data = read_sae_config(folder)
    cfg_path = folder / CFG_FILENAME
    section = data.get("saeforge")
    if not isinstance(section, dict):
        raise SaeforgeError(f"{cfg_path} has no 'saeforge' section: this folder was not written by saeforge "
                            "(perhaps a plain SAELens folder)", "import it with saeforge's format converters")
    version = section.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise SaeforgeError(f"{cfg_path}: invalid saeforge format_version {version!r}",
                            "re-save the SAE; the file is damaged")
    if version > FORMAT_VERSION:
        raise SaeforgeError(f"{cfg_path} was written in saeforge format version {version}, "
                            f"but this saeforge reads versions up to {FORMAT_VERSION}",
                            "upgrade saeforge to load it")
    config = section.get("config")
    if not isinstance(config, dict):
        raise SaeforgeError(f"{cfg_path}: the 'saeforge.config' entry is missing or not an object",
                            "re-save the SAE; the file is damaged")
    try:
        cfg = SAEConfig.from_dict(config)
    except SaeforgeError as err:
        raise SaeforgeError(f"{cfg_path}: {err.problem}", err.fix) from err
    sae = make_sae(cfg)

    expected = sae.saelens_tensors()
    weights_path = folder / WEIGHTS_FILENAME
    found = _read_tensors(weights_path)
    _check_tensors(weights_path, found, expected)
    extra_expected = sae.extra_tensors()
    extra: dict[str, Tensor] = {}
    if extra_expected:
        extra_path = folder / EXTRA_STATE_FILENAME
        extra = _read_tensors(extra_path)
        _check_tensors(extra_path, extra, extra_expected)

    state = {}
    for name, current in sae.state_dict().items():
        source = extra if name in extra else found
        state[name] = source[name].to(current.dtype)
    sae.load_state_dict(state, strict=True)
    if device is not None:
        sae.to(device)
    return sae


def load_feature_stats(folder: str | Path) -> dict[str, Tensor] | None:
    """The tensors of sparsity.safetensors, or None when the folder has none."""
    path = Path(folder) / SPARSITY_FILENAME
    if not path.exists():
        return None
    return _read_tensors(path)


def log10_density(fire_counts: Tensor, n_tokens: int, *, eps: float = 1e-10) -> Tensor:
    """SAELens' "sparsity" statistic from per-latent firing counts: log10(count / n_tokens + eps)."""
    if n_tokens <= 0:
        raise SaeforgeError(f"n_tokens must be positive, got {n_tokens}", "pass the number of tokens counted")
    return torch.log10(fire_counts.double() / n_tokens + eps).float()

