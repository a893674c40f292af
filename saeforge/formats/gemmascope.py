"""Gemma Scope releases (read only).

Gemma Scope 1 (``google/gemma-scope-*``): ``.../layer_L/width_W/average_l0_N/params.npz`` with ``W_enc [d_model,
d_sae]``, ``W_dec [d_sae, d_model]``, ``b_enc``, ``b_dec``, ``threshold [d_sae]`` (some files spell the weights
``w_enc``/``w_dec``). No config file: the layout is inferred from the shapes. Gemma Scope 2
(``google/gemma-scope-2-*``): a folder with ``params.safetensors`` (lowercase ``w_enc``, ``w_dec``, ``b_enc``,
``b_dec``, ``threshold``) and ``config.json`` (``architecture: "jump_relu"``, ``hf_hook_point_in``, ``width``,
``l0``, ``model_name``, ...).

Both are JumpReLU SAEs computing ``pre = x @ W_enc + b_enc; f = pre * (pre > threshold)`` with no ``b_dec``
subtraction: saeforge ``jumprelu`` with ``apply_b_dec_to_input=False`` (a transcoder when ``W_dec``'s output width
differs from d_in). Orientation: decided from the shapes (``b_enc``/``threshold`` give d_sae, ``b_dec`` the output
width). A square ``W_enc`` (d_in == d_sae) in a Gemma Scope 1 file, which has no metadata, is refused unless an
``orientation`` hint is given; Gemma Scope 2's config.json fixes the documented layout. Negative thresholds (which
would pass negative pre-activations) and affine skip connections are refused.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from saeforge.errors import SaeforgeError
from saeforge.formats.common import (
    ImportedSAE,
    assemble,
    check_keys,
    check_vector,
    dtype_name,
    orient,
    read_json,
    read_npz,
    read_safetensors,
)
from saeforge.saes import JumpReLUConfig

__all__ = ["GS1_FILENAME", "GS2_CONFIG", "GS2_FILENAME", "read_gemmascope", "read_gemmascope2"]

GS1_FILENAME = "params.npz"
GS2_FILENAME = "params.safetensors"
GS2_CONFIG = "config.json"
_NAMES = {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"}


def _canonical_names(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``w_enc``/``w_dec`` -> ``W_enc``/``W_dec`` (the spelling differs between releases)."""
    out = {}
    for key, value in raw.items():
        name = "W_" + key[2:] if key.startswith("w_") else key
        if name in out:
            raise SaeforgeError(f"both {name} and {key} are present", "the file is damaged")
        out[name] = value
    return out


def _build(raw: dict[str, torch.Tensor], *, where: str, layout: str, layout_known: bool, d_in: int | None,
           orientation: str | None, notes: list[str]):
    optional = {"scaling_factor"}
    if layout == "Gemma Scope 2 SAE":
        if "affine_skip_connection" in raw:
            raise SaeforgeError(f"{where} has an affine skip connection (a skip transcoder), which saeforge SAEs "
                                "do not have", "only Gemma Scope SAEs and plain transcoders can be imported")
    check_keys(raw, _NAMES, optional, where=where, layout=layout)
    d_sae = check_vector("b_enc", raw["b_enc"], None, where)
    check_vector("threshold", raw["threshold"], d_sae, where)
    d_out = check_vector("b_dec", raw["b_dec"], None, where)
    w_enc = orient("W_enc", raw["W_enc"], rows=d_in, cols=d_sae, native="x_at_W", layout_known=layout_known,
                   hint=orientation, where=where, notes=notes)
    w_dec = orient("W_dec", raw["W_dec"], rows=d_sae, cols=d_out, native="x_at_W", layout_known=layout_known,
                   hint=orientation, where=where, notes=notes, role="decoder")
    real_d_in = int(w_enc.shape[0])
    threshold = raw["threshold"].to(torch.float64)
    neg = int((threshold < 0).sum())
    if neg:
        raise SaeforgeError(f"{where}: {neg} threshold(s) are negative; Gemma Scope's JumpReLU would pass negative "
                            "pre-activations there, which saeforge's JumpReLU (threshold > 0) cannot represent",
                            "this is not a released Gemma Scope file; check where it came from")
    if bool(torch.isnan(threshold).any()):
        raise SaeforgeError(f"{where}: thresholds contain NaN", "the file is damaged")
    w_dec = w_dec.to(torch.float64)
    if "scaling_factor" in raw:
        s = raw["scaling_factor"].to(torch.float64).reshape(-1)
        if s.numel() == 1:
            s = s.expand(d_sae)
        check_vector("scaling_factor", s, d_sae, where)
        if not bool((s == 1).all()):
            w_dec = w_dec * s[:, None]
            notes.append("scaling_factor folded into the decoder rows (encodings unchanged)")
    cfg = JumpReLUConfig(d_in=real_d_in, d_sae=d_sae, d_out=d_out if d_out != real_d_in else None,
                         dtype=dtype_name(raw["W_enc"]), apply_b_dec_to_input=False)
    return assemble(cfg, {"W_enc": w_enc, "b_enc": raw["b_enc"], "W_dec": w_dec, "b_dec": raw["b_dec"],
                          "threshold": threshold}, where=where)


def _path_metadata(path: Path) -> dict[str, Any]:
    """Best-effort metadata from a Gemma Scope 1 path (``.../gemma-scope-2b-pt-res/.../layer_12/width_16k/...``)."""
    meta: dict[str, Any] = {}
    text = path.as_posix()
    m = re.search(r"layer_(\d+)", text)
    repo = re.search(r"gemma-scope-(\d+b)-(pt|it)-(res|mlp|att|transcoders)", text)
    if repo:
        size, kind, site = repo.groups()
        meta["model_name"] = f"google/gemma-2-{size}" + ("-it" if kind == "it" else "")
        if m and site in ("res", "mlp"):
            layer = int(m.group(1))
            meta["hook_name"] = f"layers.{layer}." + ("resid_post" if site == "res" else "mlp_out")
    if m:
        meta["layer"] = int(m.group(1))
    w = re.search(r"width_(\w+?)(?:/|$)", text)
    if w:
        meta["width"] = w.group(1)
    l0 = re.search(r"average_l0_(\d+)", text)
    if l0:
        meta["average_l0"] = int(l0.group(1))
    return meta


def read_gemmascope(path: str | Path, *, d_in: int | None = None, orientation: str | None = None,
                    **_: Any) -> ImportedSAE:
    """Gemma Scope 1: a ``params.npz`` file, or the folder holding it."""
    path = Path(path)
    file = path / GS1_FILENAME if path.is_dir() else path
    notes: list[str] = []
    raw = _canonical_names(read_npz(file, "Gemma Scope params"))
    sae = _build(raw, where=str(file), layout="Gemma Scope 1 SAE", layout_known=False, d_in=d_in,
                 orientation=orientation, notes=notes)
    return ImportedSAE(sae=sae, fmt="gemmascope", path=file, metadata=_path_metadata(file.resolve()), notes=notes)


def read_gemmascope2(path: str | Path, *, d_in: int | None = None, orientation: str | None = None,
                     **_: Any) -> ImportedSAE:
    """Gemma Scope 2: a folder with ``params.safetensors`` + ``config.json`` (or the params file itself)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    notes: list[str] = []
    cfg = read_json(folder / GS2_CONFIG, "Gemma Scope 2 config")
    arch = cfg.get("architecture")
    if arch != "jump_relu":
        raise SaeforgeError(f"{folder / GS2_CONFIG}: architecture {arch!r} is not a Gemma Scope 2 JumpReLU SAE",
                            "saeforge reads Gemma Scope 2 files with architecture 'jump_relu'")
    if cfg.get("affine_connection"):
        raise SaeforgeError(f"{folder / GS2_CONFIG}: affine_connection=true (a skip transcoder), which saeforge SAEs "
                            "do not have", "only Gemma Scope SAEs and plain transcoders can be imported")
    file = folder / GS2_FILENAME
    raw = _canonical_names(read_safetensors(file, "Gemma Scope 2 params"))
    sae = _build(raw, where=str(file), layout="Gemma Scope 2 SAE", layout_known=True, d_in=d_in,
                 orientation=orientation, notes=notes)
    meta: dict[str, Any] = {}
    hook = cfg.get("hf_hook_point_in")
    if isinstance(hook, str):
        meta["hf_hook_name"] = hook
        meta["hook_name"] = hook.removesuffix(".output")  # a module path; saeforge hooks its output
    if isinstance(cfg.get("hf_hook_point_out"), str):
        meta["hf_hook_name_out"] = cfg["hf_hook_point_out"]
    if isinstance(cfg.get("model_name"), str):
        name = cfg["model_name"]
        meta["model_name"] = name if "/" in name else f"google/{name}"
    for key in ("width", "l0", "type"):
        if key in cfg:
            meta[key] = cfg[key]
    return ImportedSAE(sae=sae, fmt="gemmascope2", path=folder, metadata=meta, notes=notes)
