"""``saeforge convert``: read an SAE in any supported format, write it in another, and check the encodings match."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from simple_parsing.helpers import field

from saeforge.errors import SaeforgeError
from saeforge.formats.common import FORMAT_NAMES, WRITABLE_FORMATS

__all__ = ["ConvertConfig", "check_encodings", "run_convert"]

_SAE_FILES = ("cfg.json", "sae_weights.safetensors", "sae.safetensors", "saeforge_state.safetensors",
              "sparsity.safetensors", "params.safetensors", "config.json", "config.yaml")


@dataclass(frozen=True)
class ConvertConfig:
    """Convert an SAE, transcoder or CLT between formats: read saeforge, SAELens, sparsify, Gemma Scope 1/2,
    circuit-tracer or dictionary_learning; write saeforge, SAELens, sparsify, Gemma Scope 2 or circuit-tracer. The
    encodings of the written SAE are checked against the source's."""

    source: str = field(default="", positional=True)
    """The SAE: a folder (saeforge, SAELens, sparsify, Gemma Scope 2) or file (Gemma Scope params.npz,
    dictionary_learning ae.pt)."""
    out: str = ""
    """Folder to write the converted SAE to (created)."""
    to: str = "saeforge"
    """Output format: saeforge (native; SAELens loads it too), saelens (plain SAELens v6), sparsify (TopK SAEs and
    transcoders), gemmascope2 / circuit_tracer (JumpReLU SAEs and transcoders), gemmascope2_clt / circuit_tracer_clt
    (JumpReLU cross-layer transcoders)."""
    from_format: str = "auto"
    """Input format: auto (detected from the files), saeforge, saelens, sparsify, gemmascope, gemmascope2,
    gemmascope2_clt, circuit_tracer, circuit_tracer_clt, dictionary_learning."""
    d_in: int = 0
    """Hint: the input width, checked against the file (0: from the file)."""
    architecture: str = ""
    """Hint for files whose keys fit several architectures: a dictionary_learning ae.pt without config.json holds
    AutoEncoderTopK or BatchTopKSAE ('topk' or 'batchtopk')."""
    orientation: str = ""
    """Hint for a square W_enc (d_in == d_sae) in a file without metadata (Gemma Scope 1 params.npz, ae.pt without
    config.json): 'x_at_W' (stored [d_in, d_sae], used as x @ W_enc) or 'linear' (stored [d_sae, d_in])."""
    scaling_factor: float = 0.0
    """SAELens normalize_activations='expected_average_only_in': the activation scaling factor to fold in
    (0: read activation_scaler.json beside cfg.json, else refuse)."""
    hook_name: str = ""
    """Metadata override: the site the SAE reads (a saeforge site name such as layers.5.resid_post, or a module
    path); empty: keep the source's."""
    model: str = ""
    """Metadata override: the model the SAE belongs to (hub id or local folder); empty: keep the source's."""
    overwrite: bool = False
    """Replace the SAE files already in --out."""
    check: bool = True
    """After writing, read the output back and check its encodings equal the source's on random inputs."""


def check_encodings(a, b, *, n: int = 512, seed: int = 0) -> dict:
    """Encode the same random inputs with SAEs ``a`` and ``b``: max |difference|, active-set agreement, L0.

    Inputs are Gaussian around ``a``'s b_dec (when it lives in the input space), scaled to the decoder's scale, so
    thresholds and TopK selections are exercised rather than everything being zero.
    """
    g = torch.Generator().manual_seed(seed)
    cfg = a.cfg
    with torch.no_grad():
        w_dec = a.W_dec if isinstance(a.W_dec, torch.Tensor) else a.W_dec[0]  # a CLT: layer 0's decoders
        scale = float(w_dec.detach().float().reshape(w_dec.shape[0], -1).norm(dim=1).mean()) or 1.0
        x = torch.randn(n, cfg.d_in, generator=g) * scale * 2.0
        if not cfg.is_transcoder:
            x = x + a.b_dec.detach().float().cpu()
        fa = a.encode(x.to(a.device)).float().cpu()
        fb = b.encode(x.to(b.device)).float().cpu()
    diff = (fa - fb).abs()
    return {"rows": n, "max_abs_diff": float(diff.max()), "identical": bool(torch.equal(fa, fb)),
            "active_set_equal": bool(torch.equal(fa > 0, fb > 0)), "l0": float((fa > 0).sum(1).float().mean())}


def _check_out(cfg: ConvertConfig, source: Path) -> tuple[Path, list[str]]:
    """The output folder and the SAE files already in it, refused before anything is read: the source folder itself,
    a folder holding an SAE (without --overwrite), or a non-empty folder holding something else."""
    if not cfg.out:
        raise SaeforgeError("no output folder given", "pass --out DIR")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise SaeforgeError(f"{out} exists and is not a folder", "pass a folder for --out")
    src = source.resolve()
    if out.resolve() == (src if src.is_dir() else src.parent):
        raise SaeforgeError(f"--out {out} is the source folder", "write the converted SAE to another folder")
    present = [name for name in _SAE_FILES if (out / name).exists()] if out.is_dir() else []
    if present and not cfg.overwrite:
        raise SaeforgeError(f"{out} already holds SAE files ({', '.join(present)})",
                            "pass --overwrite to replace them, or choose another --out")
    others = sorted(p.name for p in out.iterdir()) if out.is_dir() and not present else []
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise SaeforgeError(f"--out {out} is not empty and holds no SAE ({shown}); converting into it would mix the "
                            "SAE with unrelated files",
                            f"choose a new or empty folder: saeforge convert {cfg.source} --out {out / 'sae'}")
    return out, present


def _clear_out(out: Path, present: list[str]) -> None:
    if present:
        for name in present:
            p = out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def run_convert(cfg: ConvertConfig) -> None:
    from saeforge.formats import read_any, save_as

    if not cfg.source:
        raise SaeforgeError("no SAE given", "pass the SAE folder or file: saeforge convert PATH --out DIR")
    if cfg.to not in WRITABLE_FORMATS:
        raise SaeforgeError(f"unknown output format {cfg.to!r}", f"use --to {' | '.join(WRITABLE_FORMATS)}")
    if cfg.from_format not in ("auto", *FORMAT_NAMES):
        raise SaeforgeError(f"unknown input format {cfg.from_format!r}",
                            f"use --from-format auto | {' | '.join(FORMAT_NAMES)}")
    source = Path(cfg.source)
    out, present = _check_out(cfg, source)
    src = read_any(source, fmt=cfg.from_format, d_in=cfg.d_in or None, architecture=cfg.architecture or None,
                   orientation=cfg.orientation or None, scaling_factor=cfg.scaling_factor or None)
    sae = src.sae
    c = sae.cfg
    shape = f"d_in {c.d_in}, d_sae {c.d_sae}" + (f", d_out {c.d_out}" if c.is_transcoder else "")
    print(f"read {src.fmt} SAE from {src.path}: {sae.architecture} ({shape}, {c.dtype}, "
          f"apply_b_dec_to_input={c.apply_b_dec_to_input})")
    for note in src.notes:
        print(f"  note: {note}")
    _clear_out(out, present)
    meta = dict(src.metadata)
    if cfg.hook_name:
        meta["hook_name"] = cfg.hook_name
    if cfg.model:
        meta["model_name"] = cfg.model
    save_as(sae, out, cfg.to, metadata=meta, feature_stats=src.feature_stats)
    kept = ", ".join(f"{k}={meta[k]}" for k in ("model_name", "hook_name") if k in meta)
    print(f"wrote {cfg.to} SAE to {out}" + (f" ({kept})" if kept and cfg.to != "sparsify" else ""))
    if cfg.check:
        back = read_any(out, fmt=cfg.to)
        r = check_encodings(sae, back.sae)
        verdict = "identical" if r["identical"] else f"max |diff| {r['max_abs_diff']:.3g}"
        print(f"check: read back as {back.sae.architecture}; encodings on {r['rows']} random inputs {verdict} "
              f"(mean L0 {r['l0']:.1f})")
        if not r["active_set_equal"]:
            raise SaeforgeError(f"the written SAE does not reproduce the source's encodings ({verdict}, active "
                                "latents differ)", "report this: it is a bug in the converter")
