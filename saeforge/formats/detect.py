"""Tell which format a folder or file is in, from the files present (and, for SAELens vs saeforge, cfg.json).

=====================================================  ======================
what is there                                          format
=====================================================  ======================
cfg.json (with a "saeforge" section) + sae_weights...  saeforge
cfg.json + sae_weights.safetensors                     saelens
cfg.json + sae.safetensors                             sparsify
params.npz (or any .npz file)                          gemmascope
params.safetensors + config.json                       gemmascope2
params_layer_0.safetensors, params_layer_1...          gemmascope2_clt
layer_<L>.safetensors (one)                            circuit_tracer
W_enc_0.safetensors + W_dec_0.safetensors ...          circuit_tracer_clt
ae.pt (or any .pt / .pth file)                         dictionary_learning
=====================================================  ======================

A file path stands for its folder where the format is a folder (``sae_weights.safetensors``, ``sae.safetensors``,
``cfg.json``, ``params.safetensors``). A folder holding several SAEs (a saeforge run's ``saes/``, a sparsify run with
one folder per hookpoint) is refused with the list of them.
"""

from __future__ import annotations

import json
from pathlib import Path

from saeforge.errors import SaeforgeError

__all__ = ["detect_format"]

_MARKERS = ("cfg.json", "sae_weights.safetensors", "sae.safetensors", "params.npz", "params.safetensors", "ae.pt")


def _cfg_has_saeforge_section(cfg_path: Path) -> bool:
    try:
        data = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False  # the reader reports the damage with the details
    return isinstance(data, dict) and "saeforge" in data


def _folder_format(folder: Path) -> str | None:
    has = {name: (folder / name).is_file() for name in _MARKERS}
    if has["cfg.json"] and has["sae_weights.safetensors"]:
        return "saeforge" if _cfg_has_saeforge_section(folder / "cfg.json") else "saelens"
    if has["cfg.json"] and has["sae.safetensors"]:
        return "sparsify"
    if has["params.npz"]:
        return "gemmascope"
    if has["params.safetensors"]:
        return "gemmascope2"
    if (folder / "params_layer_0.safetensors").is_file():
        return "gemmascope2_clt"
    if (folder / "W_enc_0.safetensors").is_file():
        return "circuit_tracer_clt"
    if has["ae.pt"]:
        return "dictionary_learning"
    if has["sae_weights.safetensors"]:
        return "saelens"  # cfg.json missing: the SAELens reader names it
    if has["sae.safetensors"]:
        return "sparsify"
    if has["cfg.json"]:
        return "saelens"  # weights missing: the SAELens reader names them
    from saeforge.formats.circuit_tracer import transcoder_files

    if len(transcoder_files(folder)) == 1:
        return "circuit_tracer"
    return None


def detect_format(path: str | Path) -> tuple[str, Path]:
    """``(format name, the path its reader takes)`` for an SAE folder or file."""
    path = Path(path)
    if not path.exists():
        raise SaeforgeError(f"{path} does not exist", "pass an SAE folder or file")
    if path.is_file():
        name, suffix = path.name, path.suffix.lower()
        if name in ("cfg.json", "sae_weights.safetensors", "sae.safetensors", "params.safetensors",
                    "sparsity.safetensors", "saeforge_state.safetensors"):
            fmt = _folder_format(path.parent)
            if fmt is None:
                raise SaeforgeError(f"cannot tell the format of {path.parent} (from {name})",
                                    "pass the SAE folder with all its files")
            return fmt, path.parent
        if suffix == ".npz":
            return "gemmascope", path
        from saeforge.formats.circuit_tracer import LAYER_FILE_RE

        if LAYER_FILE_RE.match(name):
            return "circuit_tracer", path
        if name.startswith("params_layer_") and suffix == ".safetensors":
            return "gemmascope2_clt", path.parent
        if name.startswith(("W_enc_", "W_dec_")) and suffix == ".safetensors":
            return "circuit_tracer_clt", path.parent
        if suffix in (".pt", ".pth"):
            return "dictionary_learning", path
        raise SaeforgeError(f"cannot tell the format of the file {path}",
                            "saeforge reads SAE folders (saeforge, SAELens, sparsify, Gemma Scope 2), Gemma Scope "
                            "params.npz files and dictionary_learning ae.pt files; pass from_format=... if it is one")
    fmt = _folder_format(path)
    if fmt is not None:
        return fmt, path
    from saeforge.formats.circuit_tracer import transcoder_files

    layer_files = transcoder_files(path)
    if len(layer_files) > 1:
        names = ", ".join(p.name for p in layer_files[:8]) + (f" (+{len(layer_files) - 8} more)"
                                                              if len(layer_files) > 8 else "")
        raise SaeforgeError(f"{path} holds a circuit-tracer transcoder set of {len(layer_files)} layers ({names}), "
                            "not one SAE", f"pass one of its files, e.g. {layer_files[0]}")
    inner = [p for p in sorted(path.iterdir()) if p.is_dir() and _folder_format(p) is not None]
    saes_dir = path / "saes"
    if saes_dir.is_dir():
        inner += [p for p in sorted(saes_dir.iterdir()) if p.is_dir() and _folder_format(p) is not None]
    if inner:
        names = ", ".join(str(p) for p in inner[:8]) + (f" (+{len(inner) - 8} more)" if len(inner) > 8 else "")
        raise SaeforgeError(f"{path} holds several SAEs, not one: {names}", "pass one of those folders")
    found = ", ".join(sorted(p.name for p in path.iterdir())[:12]) or "nothing"
    raise SaeforgeError(f"cannot tell the format of {path}: no SAE files in it (found: {found})",
                        "pass a folder with cfg.json + sae_weights.safetensors (saeforge/SAELens), cfg.json + "
                        "sae.safetensors (sparsify), params.npz / params.safetensors (Gemma Scope) or ae.pt "
                        "(dictionary_learning)")
