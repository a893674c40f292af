"""Gemma Scope releases: Gemma Scope 1 (read), Gemma Scope 2 SAEs, transcoders and cross-layer transcoders (read and
write).

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
would pass negative pre-activations) are refused.

Gemma Scope 2 transcoders (``transcoder_all/layer_L_width_W_l0_S[_affine]/``): the same files with
``hf_hook_point_out`` in config.json (the MLP's output; input: the pre-MLP norm's output) -> saeforge
``jumprelu_transcoder``, or ``jumprelu_skip_transcoder`` when ``affine_connection`` is set and the params hold
``affine_skip_connection`` [d_in, d_out] (used as ``x @ A``; saeforge's ``W_skip`` is its transpose). Hooks are HF
module paths with ``.input``/``.output``; the ones that are saeforge sites become those sites
(``model.layers.L.pre_feedforward_layernorm.output`` -> ``layers.L.mlp_in``).

Gemma Scope 2 cross-layer transcoders (``clt/width_W_l0_S[_affine]/``): one file per layer,
``params_layer_{i}.safetensors`` with ``w_enc`` [d_in, F], ``b_enc`` [F], ``threshold`` [F], ``b_dec`` [d_out] (layer i's
output bias), ``w_dec`` [F, n_layers, d_out] (all output layers; those before i are zero) and optionally
``affine_skip_connection`` [d_in, d_out] -> saeforge ``jumprelu_clt`` (circuit-tracer's ``load_gemma_scope_2_clt``
reads them the same way). saeforge writes a ``config.json`` beside them (architecture, layers, hooks) and reads one
if present.

Writing (:func:`write_gemmascope2`, :func:`write_gemmascope2_clt`): JumpReLU-shaped dictionaries (JumpReLU, BatchTopK
with its learnt threshold, ReLU with threshold 0; a pre-encoder bias is folded into ``b_enc``), with config.json
fields as Gemma Scope 2 has them plus a ``saeforge`` entry holding the exact site binding.
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
    hf_hook_for_site,
    jumprelu_config,
    jumprelu_form,
    orient,
    read_json,
    read_npz,
    read_safetensors,
    site_for_hf_hook,
)
from saeforge.saes import SAE, JumpReLUCLTConfig
from saeforge.utils.atomic import atomic_save_safetensors, atomic_write_json

__all__ = ["GS1_FILENAME", "GS2_CLT_PATTERN", "GS2_CONFIG", "GS2_FILENAME", "read_gemmascope", "read_gemmascope2",
           "read_gemmascope2_clt", "write_gemmascope2", "write_gemmascope2_clt"]

GS1_FILENAME = "params.npz"
GS2_FILENAME = "params.safetensors"
GS2_CONFIG = "config.json"
GS2_CLT_PATTERN = "params_layer_{i}.safetensors"
_NAMES = {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"}
SKIP_KEY = "affine_skip_connection"


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
           orientation: str | None, notes: list[str], transcoder: bool = False):
    optional = {"scaling_factor"} | ({SKIP_KEY} if layout == "Gemma Scope 2 SAE" else set())
    check_keys(raw, _NAMES, optional, where=where, layout=layout)
    d_sae = check_vector("b_enc", raw["b_enc"], None, where)
    check_vector("threshold", raw["threshold"], d_sae, where)
    d_out = check_vector("b_dec", raw["b_dec"], None, where)
    w_enc = orient("W_enc", raw["W_enc"], rows=d_in, cols=d_sae, native="x_at_W", layout_known=layout_known,
                   hint=orientation, where=where, notes=notes)
    w_dec = orient("W_dec", raw["W_dec"], rows=d_sae, cols=d_out, native="x_at_W", layout_known=layout_known,
                   hint=orientation, where=where, notes=notes, role="decoder")
    real_d_in = int(w_enc.shape[0])
    threshold = _thresholds(raw["threshold"], where)
    w_dec = w_dec.to(torch.float64)
    if "scaling_factor" in raw:
        s = raw["scaling_factor"].to(torch.float64).reshape(-1)
        if s.numel() == 1:
            s = s.expand(d_sae)
        check_vector("scaling_factor", s, d_sae, where)
        if not bool((s == 1).all()):
            w_dec = w_dec * s[:, None]
            notes.append("scaling_factor folded into the decoder rows (encodings unchanged)")
    tensors = {"W_enc": w_enc, "b_enc": raw["b_enc"], "W_dec": w_dec, "b_dec": raw["b_dec"], "threshold": threshold}
    skip = SKIP_KEY in raw
    if skip:
        a = raw[SKIP_KEY]
        if tuple(a.shape) != (real_d_in, d_out):
            raise SaeforgeError(f"{where}: {SKIP_KEY} has shape {tuple(a.shape)}, expected [{real_d_in}, {d_out}]",
                                "the tensors do not fit together; the file is damaged")
        tensors["W_skip"] = a.T
    cfg = jumprelu_config(d_in=real_d_in, d_sae=d_sae, d_out=d_out, transcoder=transcoder or skip, skip=skip,
                          dtype=dtype_name(raw["W_enc"]))
    return assemble(cfg, tensors, where=where)


def _thresholds(raw: torch.Tensor, where: str) -> torch.Tensor:
    threshold = raw.to(torch.float64)
    neg = int((threshold < 0).sum())
    if neg:
        raise SaeforgeError(f"{where}: {neg} threshold(s) are negative; Gemma Scope's JumpReLU would pass negative "
                            "pre-activations there, which saeforge's JumpReLU (threshold > 0) cannot represent",
                            "this is not a released Gemma Scope file; check where it came from")
    if bool(torch.isnan(threshold).any()):
        raise SaeforgeError(f"{where}: thresholds contain NaN", "the file is damaged")
    return threshold


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


def _binding_metadata(cfg: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """metadata (reads/writes, hook names, model) from a Gemma Scope 2 config.json."""
    meta: dict[str, Any] = {}
    own = cfg.get("saeforge") if isinstance(cfg.get("saeforge"), dict) else {}
    if isinstance(cfg.get("model_name"), str):
        name = cfg["model_name"]
        meta["model_name"] = name if "/" in name or own else f"google/{name}"
    hook_in, hook_out = cfg.get("hf_hook_point_in"), cfg.get("hf_hook_point_out")
    if isinstance(hook_in, str):
        meta["hf_hook_name"] = hook_in
    if isinstance(hook_out, str):
        meta["hf_hook_name_out"] = hook_out
    if isinstance(own.get("reads"), list) and isinstance(own.get("writes"), list):
        meta["reads"], meta["writes"] = list(own["reads"]), list(own["writes"])
    elif isinstance(hook_in, str):
        reads = site_for_hf_hook(hook_in) or hook_in.removesuffix(".output")  # a module path: hooked at its output
        writes = (site_for_hf_hook(hook_out) or hook_out.removesuffix(".output")) if isinstance(hook_out, str) \
            else reads
        meta["reads"], meta["writes"] = [reads], [writes]
        if site_for_hf_hook(hook_in) is None:
            notes.append(f"hook {hook_in!r} is no saeforge site: bound to the module path {reads!r} (its output)")
    if "reads" in meta:
        meta["hook_name"] = meta["reads"][0]
        if meta["writes"][0] != meta["reads"][0]:
            meta["hook_name_out"] = meta["writes"][0]
    for key in ("width", "l0", "type"):
        if key in cfg:
            meta[key] = cfg[key]
    return meta


def read_gemmascope2(path: str | Path, *, d_in: int | None = None, orientation: str | None = None,
                     **_: Any) -> ImportedSAE:
    """Gemma Scope 2 SAE or transcoder: a folder with ``params.safetensors`` + ``config.json`` (or the params file)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    notes: list[str] = []
    cfg = read_json(folder / GS2_CONFIG, "Gemma Scope 2 config")
    arch = cfg.get("architecture")
    if arch != "jump_relu":
        raise SaeforgeError(f"{folder / GS2_CONFIG}: architecture {arch!r} is not a Gemma Scope 2 JumpReLU SAE",
                            "saeforge reads Gemma Scope 2 files with architecture 'jump_relu'")
    file = folder / GS2_FILENAME
    raw = _canonical_names(read_safetensors(file, "Gemma Scope 2 params"))
    if bool(cfg.get("affine_connection")) != (SKIP_KEY in raw):
        raise SaeforgeError(f"{folder}: config.json says affine_connection={cfg.get('affine_connection')!r} but the "
                            f"params {'have' if SKIP_KEY in raw else 'lack'} {SKIP_KEY}",
                            "the config and the weights do not belong together")
    transcoder = isinstance(cfg.get("hf_hook_point_out"), str) or "transcoder" in str(cfg.get("type", ""))
    sae = _build(raw, where=str(file), layout="Gemma Scope 2 SAE", layout_known=True, d_in=d_in,
                 orientation=orientation, notes=notes, transcoder=transcoder)
    return ImportedSAE(sae=sae, fmt="gemmascope2", path=folder, metadata=_binding_metadata(cfg, notes), notes=notes)


def _gs2_config(sae: SAE, meta: dict[str, Any], kind: str) -> dict[str, Any]:
    reads = list(meta.get("reads") or ([meta["hook_name"]] if meta.get("hook_name") else []))
    writes = list(meta.get("writes") or ([meta.get("hook_name_out") or meta["hook_name"]]
                                         if meta.get("hook_name") else []))
    model = str(meta.get("model_name", ""))
    out: dict[str, Any] = {"architecture": "jump_relu", "model_name": model, "width": sae.cfg.d_sae,
                           "affine_connection": bool(getattr(sae.cfg, "skip_connection", False)), "type": kind}
    if reads:
        out["hf_hook_point_in"] = meta.get("hf_hook_name") or hf_hook_for_site(reads[0], model) or reads[0]
    if writes and (kind != "sae"):
        out["hf_hook_point_out"] = meta.get("hf_hook_name_out") or hf_hook_for_site(writes[0], model) or writes[0]
    if "l0" in meta:
        out["l0"] = meta["l0"]
    if reads:
        out["saeforge"] = {"reads": reads, "writes": writes}
    return out


def write_gemmascope2(sae: SAE, folder: str | Path, *, metadata: dict[str, Any] | None = None, **_: Any) -> Path:
    """Write a JumpReLU-shaped SAE or (skip) transcoder as a Gemma Scope 2 folder (params.safetensors +
    config.json)."""
    if getattr(sae.cfg, "n_layers", 1) > 1 or sae.architecture.endswith("_clt"):
        raise SaeforgeError("a cross-layer transcoder is written with --to gemmascope2_clt", "pass --to gemmascope2_clt")
    t = jumprelu_form(sae, "Gemma Scope 2")
    tensors = {"w_enc": t["W_enc"], "w_dec": t["W_dec"], "b_enc": t["b_enc"], "b_dec": t["b_dec"],
               "threshold": t["threshold"]}
    if "W_skip" in t:
        tensors[SKIP_KEY] = t["W_skip"].T
    kind = "transcoder" if sae.cfg.is_transcoder or sae.architecture.endswith("transcoder") else "sae"
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(folder / GS2_FILENAME, tensors)
    atomic_write_json(folder / GS2_CONFIG, _gs2_config(sae, dict(metadata or {}), kind))
    return folder


def read_gemmascope2_clt(path: str | Path, **_: Any) -> ImportedSAE:
    """A Gemma Scope 2 cross-layer transcoder: the folder holding ``params_layer_{i}.safetensors``."""
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    files = sorted(folder.glob("params_layer_*.safetensors"), key=lambda p: int(p.stem.rsplit("_", 1)[-1]))
    layers = [int(p.stem.rsplit("_", 1)[-1]) for p in files]
    if not files or layers != list(range(len(files))):
        raise SaeforgeError(f"{folder}: a Gemma Scope 2 CLT has params_layer_0.safetensors ... params_layer_{{n-1}}"
                            f".safetensors, found layers {layers}", "pass the complete CLT folder")
    n = len(files)
    notes: list[str] = []
    per_layer = []
    for i, file in enumerate(files):
        raw = read_safetensors(file, f"Gemma Scope 2 CLT layer {i}")
        check_keys(raw, {"w_enc", "w_dec", "b_enc", "b_dec", "threshold"}, {SKIP_KEY}, where=str(file),
                   layout="Gemma Scope 2 CLT layer")
        per_layer.append(raw)
    f_ = check_vector("b_enc", per_layer[0]["b_enc"], None, str(files[0]))
    d_out = check_vector("b_dec", per_layer[0]["b_dec"], None, str(files[0]))
    d_in = int(per_layer[0]["w_enc"].shape[0])
    skip = SKIP_KEY in per_layer[0]
    cfg = JumpReLUCLTConfig(d_in=n * d_in, d_sae=n * f_, d_out=n * d_out, n_layers=n, skip_connection=skip,
                            dtype=dtype_name(per_layer[0]["w_enc"]))
    t: dict[str, torch.Tensor] = {"W_enc": torch.empty(n, d_in, f_, dtype=torch.float64),
                                  "b_enc": torch.empty(n, f_, dtype=torch.float64),
                                  "b_dec": torch.empty(n, d_out, dtype=torch.float64),
                                  "threshold": torch.empty(n, f_, dtype=torch.float64)}
    if skip:
        t["W_skip"] = torch.empty(n, d_out, d_in, dtype=torch.float64)
    for i, (file, raw) in enumerate(zip(files, per_layer)):
        where = str(file)
        if (SKIP_KEY in raw) != skip:
            raise SaeforgeError(f"{where}: some layers have {SKIP_KEY} and others not", "the CLT files are mixed up")
        shapes = {"w_enc": (d_in, f_), "w_dec": (f_, n, d_out), "b_enc": (f_,), "b_dec": (d_out,), "threshold": (f_,)}
        if skip:
            shapes[SKIP_KEY] = (d_in, d_out)
        for key, shape in shapes.items():
            if tuple(raw[key].shape) != shape:
                raise SaeforgeError(f"{where}: {key} has shape {tuple(raw[key].shape)}, expected {list(shape)}",
                                    "the layer files do not belong to one CLT")
        w_dec = raw["w_dec"].to(torch.float64)
        if i and bool(w_dec[:, :i].abs().max() > 0):
            raise SaeforgeError(f"{where}: layer {i}'s features write to earlier layers (w_dec[:, :{i}] is not zero), "
                                "which a cross-layer transcoder cannot", "check where the files came from")
        t["W_enc"][i] = raw["w_enc"].to(torch.float64)
        t["b_enc"][i] = raw["b_enc"].to(torch.float64)
        t["b_dec"][i] = raw["b_dec"].to(torch.float64)
        t["threshold"][i] = _thresholds(raw["threshold"], where)
        t[f"W_dec.{i}"] = w_dec[:, i:]
        if skip:
            t["W_skip"][i] = raw[SKIP_KEY].to(torch.float64).T
    sae = _assemble_clt(cfg, t, str(folder))
    meta: dict[str, Any] = {}
    config_path = folder / GS2_CONFIG
    if config_path.is_file():
        meta = _binding_metadata(read_json(config_path, "Gemma Scope 2 CLT config"), notes)
    if "reads" not in meta or len(meta["reads"]) != n:
        meta["reads"] = [f"layers.{i}.mlp_in" for i in range(n)]
        meta["writes"] = [f"layers.{i}.mlp_out" for i in range(n)]
        meta["hook_name"], meta["hook_name_out"] = meta["reads"][0], meta["writes"][0]
        notes.append(f"bound to the MLP inputs and outputs of layers 0..{n - 1} (a Gemma Scope 2 CLT covers every "
                     "layer of its model)")
    return ImportedSAE(sae=sae, fmt="gemmascope2_clt", path=folder, metadata=meta, notes=notes)


def _assemble_clt(cfg, t: dict[str, torch.Tensor], where: str):
    from saeforge.formats.common import log_threshold_for

    theta = t.pop("threshold")
    t["log_threshold"] = torch.stack([log_threshold_for(theta[i], cfg.torch_dtype) for i in range(cfg.n_layers)])
    return assemble(cfg, t, where=where)


def write_gemmascope2_clt(sae: SAE, folder: str | Path, *, metadata: dict[str, Any] | None = None,
                          **_: Any) -> Path:
    """Write a JumpReLU (or learnt-threshold BatchTopK) cross-layer transcoder as Gemma Scope 2 layer files."""
    t = clt_jumprelu_form(sae, "Gemma Scope 2 CLT")
    n, f_, d_out = sae.cfg.n_layers, sae.cfg.features_per_layer, sae.cfg.d_layer_out
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w_dec = torch.zeros(f_, n, d_out, dtype=t["W_dec"][i].dtype)
        w_dec[:, i:] = t["W_dec"][i]
        tensors = {"w_enc": t["W_enc"][i], "w_dec": w_dec, "b_enc": t["b_enc"][i], "b_dec": t["b_dec"][i],
                   "threshold": t["threshold"][i]}
        if "W_skip" in t:
            tensors[SKIP_KEY] = t["W_skip"][i].T
        atomic_save_safetensors(folder / GS2_CLT_PATTERN.format(i=i), tensors)
    meta = dict(metadata or {})
    cfg = _gs2_config(sae, meta, "clt")
    cfg["n_layers"] = n
    atomic_write_json(folder / GS2_CONFIG, cfg)
    return folder


@torch.no_grad()
def clt_jumprelu_form(sae: SAE, fmt: str) -> dict[str, Any]:
    """A CLT's tensors with one threshold per feature (JumpReLU's own, or BatchTopK's learnt one per layer)."""
    code = getattr(sae, "code", None)
    if code not in ("jumprelu", "batchtopk"):
        raise SaeforgeError(f"{fmt} stores JumpReLU cross-layer transcoders; a {sae.architecture} has no such form "
                            "(TopK selection is not a threshold)", "write it with --to saeforge")
    if code == "batchtopk" and not bool((sae.threshold >= 0).all()):
        raise SaeforgeError(f"this {sae.architecture} has not learned its inference thresholds yet",
                            "train it past threshold_start_step, or write it with --to saeforge")
    st = sae.saelens_tensors()
    out: dict[str, Any] = {"W_enc": st["W_enc"], "b_enc": st["b_enc"], "b_dec": st["b_dec"],
                           "threshold": st["threshold"], "W_dec": [st[f"W_dec.{i}"] for i in range(sae.n_layers)]}
    if sae.cfg.skip_connection:
        out["W_skip"] = st["W_skip"]
    return out
