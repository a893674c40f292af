"""circuit-tracer's transcoder files (safety-research / decoderesearch circuit-tracer), read and written.

Per-layer transcoders (a "transcoder set"): one ``layer_{L}.safetensors`` per layer with ``W_enc`` [F, d_in]
(``F.linear`` orientation), ``W_dec`` [F, d_out], ``b_enc`` [F], ``b_dec`` [d_out], optionally
``activation_function.threshold`` [F] (JumpReLU; without it the code is a ReLU) and ``W_skip`` [d_out, d_in] (used as
``x @ W_skip.T``). circuit-tracer encodes ``pre = x W_encᵀ + b_enc; f = pre · 1[pre > θ]`` (ReLU: θ = 0) and decodes
``f W_dec + b_dec (+ x W_skipᵀ)``: saeforge ``jumprelu_transcoder`` / ``jumprelu_skip_transcoder`` (θ = 0 for a ReLU
transcoder: ``exp(log θ)`` with ``log θ = -inf``).

Cross-layer transcoders: ``W_enc_{i}.safetensors`` holding ``W_enc_{i}`` [F, d_in], ``b_enc_{i}``, ``b_dec_{i}`` (layer
i's output bias), optionally ``threshold_{i}`` and ``W_skip_{i}`` [d_in, d_out] (here used as ``x @ W_skip``), and
``W_dec_{i}.safetensors`` holding ``W_dec_{i}`` [F, n_layers - i, d_out] (layer i's features into layers i..n-1):
saeforge ``jumprelu_clt``, whose ``W_dec.i`` has exactly that layout.

Either may come with a ``config.yaml`` (``model_name``, ``model_kind``: ``transcoder_set`` |
``cross_layer_transcoder``, ``feature_input_hook``, ``feature_output_hook``, ``transcoders``: the files). Its hooks are
TransformerLens names relative to a block (``mlp.hook_in`` -> ``layers.L.mlp_in``, ``hook_mlp_out`` ->
``layers.L.mlp_out``); ``hook_resid_mid`` (the residual stream between attention and MLP, which circuit-tracer's
Gemma CLTs read) has no saeforge site and is kept as its name, with a note.

Writing: JumpReLU-shaped dictionaries (JumpReLU, BatchTopK with its learnt threshold, ReLU); TopK has no
circuit-tracer form. A transcoder goes to ``layer_{L}.safetensors`` of a folder (L: the layer of the site it reads)
and is added to the folder's ``config.yaml``, so writing each layer's transcoder into one folder builds a set.
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
    jumprelu_config,
    jumprelu_form,
    layer_of_site,
    read_safetensors,
    site_for_tl_hook,
    tl_hook_for_site,
)
from saeforge.saes import SAE, JumpReLUCLTConfig
from saeforge.utils.atomic import atomic_save_safetensors, atomic_write_text

__all__ = ["CONFIG_FILE", "LAYER_FILE_RE", "read_circuit_tracer", "read_circuit_tracer_clt", "transcoder_files",
           "write_circuit_tracer", "write_circuit_tracer_clt"]

CONFIG_FILE = "config.yaml"
LAYER_FILE_RE = re.compile(r"^layer_(\d+)\.safetensors$")
THRESHOLD_KEY = "activation_function.threshold"
DEFAULT_HOOKS = ("mlp.hook_in", "mlp.hook_out")


def transcoder_files(folder: Path) -> list[Path]:
    """The ``layer_{L}.safetensors`` files of a folder, by layer."""
    files = [p for p in folder.iterdir() if LAYER_FILE_RE.match(p.name)] if folder.is_dir() else []
    return sorted(files, key=lambda p: int(LAYER_FILE_RE.match(p.name).group(1)))


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        return {}
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except Exception as err:  # yaml raises many error types for damaged files
        raise SaeforgeError(f"{path} is not valid YAML: {err}", "the file is damaged; fetch it again") from err
    return data if isinstance(data, dict) else {}


def _binding(config: dict[str, Any], layer: int, notes: list[str]) -> dict[str, Any]:
    hook_in = str(config.get("feature_input_hook") or DEFAULT_HOOKS[0])
    hook_out = str(config.get("feature_output_hook") or DEFAULT_HOOKS[1])
    reads = site_for_tl_hook(hook_in, layer) or f"blocks.{layer}.{hook_in}"
    writes = site_for_tl_hook(hook_out, layer) or f"blocks.{layer}.{hook_out}"
    for hook, site in ((hook_in, reads), (hook_out, writes)):
        if site.startswith("blocks."):
            notes.append(f"hook {hook!r} has no saeforge site (kept as {site!r}); bind it with --site or "
                         "metadata before running it on a model")
    return {"reads": reads, "writes": writes}


def read_circuit_tracer(path: str | Path, **_: Any) -> ImportedSAE:
    """One per-layer transcoder: a ``layer_{L}.safetensors`` file, or a folder holding exactly one."""
    path = Path(path)
    if path.is_dir():
        files = transcoder_files(path)
        if len(files) != 1:
            names = ", ".join(p.name for p in files[:8]) or "none"
            raise SaeforgeError(f"{path} holds {len(files)} circuit-tracer transcoders ({names}), not one",
                                "pass one file, e.g. " + str(files[0] if files else path / "layer_0.safetensors"))
        path = files[0]
    m = LAYER_FILE_RE.match(path.name)
    if not m:
        raise SaeforgeError(f"{path} is not named layer_<L>.safetensors, as circuit-tracer names its transcoders",
                            "pass a circuit-tracer layer file")
    layer = int(m.group(1))
    where = str(path)
    raw = read_safetensors(path, "circuit-tracer transcoder")
    check_keys(raw, {"W_enc", "W_dec", "b_enc", "b_dec"}, {THRESHOLD_KEY, "W_skip"}, where=where,
               layout="circuit-tracer transcoder")
    f_ = check_vector("b_enc", raw["b_enc"], None, where)
    d_out = check_vector("b_dec", raw["b_dec"], None, where)
    w_enc, w_dec = raw["W_enc"], raw["W_dec"]
    if w_enc.dim() != 2 or w_enc.shape[0] != f_ or tuple(w_dec.shape) != (f_, d_out):
        raise SaeforgeError(f"{where}: W_enc {tuple(w_enc.shape)} and W_dec {tuple(w_dec.shape)} do not fit "
                            f"circuit-tracer's [F, d_in] and [F, d_out] with F={f_}, d_out={d_out}",
                            "the file is damaged or not a circuit-tracer transcoder")
    d_in = int(w_enc.shape[1])
    notes: list[str] = []
    if THRESHOLD_KEY in raw:
        theta = raw[THRESHOLD_KEY].to(torch.float64).reshape(-1)
        check_vector(THRESHOLD_KEY, theta, f_, where)
        if bool((theta < 0).any()):
            raise SaeforgeError(f"{where}: negative thresholds, which saeforge's JumpReLU cannot represent",
                                "check where the file came from")
    else:
        theta = torch.zeros(f_, dtype=torch.float64)
        notes.append("a ReLU transcoder: read as a JumpReLU transcoder with threshold 0 (the same function)")
    tensors = {"W_enc": w_enc.T, "b_enc": raw["b_enc"], "W_dec": w_dec, "b_dec": raw["b_dec"], "threshold": theta}
    skip = "W_skip" in raw
    if skip:
        if tuple(raw["W_skip"].shape) != (d_out, d_in):
            raise SaeforgeError(f"{where}: W_skip has shape {tuple(raw['W_skip'].shape)}, expected [{d_out}, {d_in}]",
                                "the file is damaged")
        tensors["W_skip"] = raw["W_skip"]
    cfg = jumprelu_config(d_in=d_in, d_sae=f_, d_out=d_out, transcoder=True, skip=skip, dtype=dtype_name(w_enc))
    sae = assemble(cfg, tensors, where=where)
    config = _read_config(path.parent)
    binding = _binding(config, layer, notes)
    meta: dict[str, Any] = {"reads": [binding["reads"]], "writes": [binding["writes"]], "hook_name": binding["reads"],
                            "hook_name_out": binding["writes"], "layer": layer}
    if isinstance(config.get("model_name"), str):
        meta["model_name"] = config["model_name"]
    return ImportedSAE(sae=sae, fmt="circuit_tracer", path=path, metadata=meta, notes=notes)


def _layer_for(sae: SAE, meta: dict[str, Any]) -> int:
    reads = meta.get("reads") or ([meta["hook_name"]] if meta.get("hook_name") else [])
    layer = layer_of_site(reads[0]) if reads else None
    if layer is None and isinstance(meta.get("layer"), int):
        layer = meta["layer"]
    if layer is None:
        raise SaeforgeError("circuit-tracer names a transcoder by its layer, and the metadata does not say which site "
                            "(layer) it reads", "pass metadata={'hook_name': 'layers.5.mlp_in'} "
                            "(saeforge convert --hook-name layers.5.mlp_in)")
    return layer


def _update_config(folder: Path, meta: dict[str, Any], kind: str, files: list[str]) -> None:
    import yaml

    config = _read_config(folder)
    if config.get("model_kind") not in (None, kind):
        raise SaeforgeError(f"{folder / CONFIG_FILE} describes a {config.get('model_kind')}, not a {kind}",
                            "write into another folder")
    listed = [f for f in config.get("transcoders", []) if isinstance(f, str)] if kind == "transcoder_set" else []
    reads = meta.get("reads") or ([meta["hook_name"]] if meta.get("hook_name") else ["layers.0.mlp_in"])
    writes = meta.get("writes") or ([meta.get("hook_name_out") or reads[0]])
    hooks = {"feature_input_hook": tl_hook_for_site(reads[0]), "feature_output_hook": tl_hook_for_site(writes[0])}
    for key, hook in hooks.items():
        if config.get(key) not in (None, hook):
            raise SaeforgeError(f"{folder / CONFIG_FILE} has {key} {config[key]!r}, but this transcoder's is "
                                f"{hook!r}: a set shares its hooks", "write it into another folder")
    config.update(model_kind=kind, **hooks, transcoders=sorted(set(listed) | set(files), key=_layer_key))
    if meta.get("model_name"):
        config["model_name"] = meta["model_name"]
    atomic_write_text(folder / CONFIG_FILE, yaml.safe_dump(config, sort_keys=False))


def _layer_key(name: str) -> tuple[int, str]:
    m = re.search(r"(\d+)\.safetensors$", name)
    return (int(m.group(1)) if m else 1 << 30, name)


def write_circuit_tracer(sae: SAE, folder: str | Path, *, metadata: dict[str, Any] | None = None,
                         **_: Any) -> Path:
    """Add a JumpReLU-shaped transcoder to a circuit-tracer transcoder-set folder as ``layer_{L}.safetensors``."""
    if sae.architecture.endswith("_clt"):
        raise SaeforgeError("a cross-layer transcoder is written with --to circuit_tracer_clt",
                            "pass --to circuit_tracer_clt")
    meta = dict(metadata or {})
    t = jumprelu_form(sae, "circuit-tracer")
    layer = _layer_for(sae, meta)
    tensors = {"W_enc": t["W_enc"].T, "W_dec": t["W_dec"], "b_enc": t["b_enc"], "b_dec": t["b_dec"]}
    if bool((t["threshold"] != 0).any()):
        tensors[THRESHOLD_KEY] = t["threshold"]
    if "W_skip" in t:
        tensors["W_skip"] = t["W_skip"]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = f"layer_{layer}.safetensors"
    atomic_save_safetensors(folder / name, tensors)
    _update_config(folder, meta, "transcoder_set", [name])
    return folder


def read_circuit_tracer_clt(path: str | Path, **_: Any) -> ImportedSAE:
    """A circuit-tracer cross-layer transcoder: the folder of ``W_enc_{i}`` / ``W_dec_{i}`` files."""
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    enc_files = sorted(folder.glob("W_enc_*.safetensors"), key=lambda p: int(p.stem.rsplit("_", 1)[-1]))
    layers = [int(p.stem.rsplit("_", 1)[-1]) for p in enc_files]
    n = len(enc_files)
    if not n or layers != list(range(n)):
        raise SaeforgeError(f"{folder}: a circuit-tracer CLT has W_enc_0 ... W_enc_{{n-1}}.safetensors, found layers "
                            f"{layers}", "pass the complete CLT folder")
    notes: list[str] = []
    encs, decs = [], []
    for i in range(n):
        enc = read_safetensors(folder / f"W_enc_{i}.safetensors", f"circuit-tracer CLT encoder {i}")
        check_keys(enc, {f"W_enc_{i}", f"b_enc_{i}", f"b_dec_{i}"}, {f"threshold_{i}", f"W_skip_{i}"},
                   where=str(folder / f"W_enc_{i}.safetensors"), layout="circuit-tracer CLT encoder")
        dec_path = folder / f"W_dec_{i}.safetensors"
        dec = read_safetensors(dec_path, f"circuit-tracer CLT decoder {i}")
        check_keys(dec, {f"W_dec_{i}"}, set(), where=str(dec_path), layout="circuit-tracer CLT decoder")
        encs.append(enc)
        decs.append(dec[f"W_dec_{i}"])
    f_, d_in = (int(v) for v in encs[0]["W_enc_0"].shape)
    d_out = int(encs[0]["b_dec_0"].shape[0])
    jump = "threshold_0" in encs[0]
    skip = "W_skip_0" in encs[0]
    cfg = JumpReLUCLTConfig(d_in=n * d_in, d_sae=n * f_, d_out=n * d_out, n_layers=n, skip_connection=skip,
                            dtype=dtype_name(encs[0]["W_enc_0"]))
    t: dict[str, torch.Tensor] = {"W_enc": torch.empty(n, d_in, f_, dtype=torch.float64),
                                  "b_enc": torch.empty(n, f_, dtype=torch.float64),
                                  "b_dec": torch.empty(n, d_out, dtype=torch.float64),
                                  "threshold": torch.zeros(n, f_, dtype=torch.float64)}
    if skip:
        t["W_skip"] = torch.empty(n, d_out, d_in, dtype=torch.float64)
    for i, (enc, w_dec) in enumerate(zip(encs, decs)):
        where = str(folder / f"W_enc_{i}.safetensors")
        if (f"threshold_{i}" in enc) != jump or (f"W_skip_{i}" in enc) != skip:
            raise SaeforgeError(f"{where}: the layers disagree on thresholds or skip connections",
                                "the CLT files are mixed up")
        shapes = {f"W_enc_{i}": (f_, d_in), f"b_enc_{i}": (f_,), f"b_dec_{i}": (d_out,)}
        if jump:
            shapes[f"threshold_{i}"] = (f_,)
        if skip:
            shapes[f"W_skip_{i}"] = (d_in, d_out)
        for key, shape in shapes.items():
            if tuple(enc[key].shape) != shape:
                raise SaeforgeError(f"{where}: {key} has shape {tuple(enc[key].shape)}, expected {list(shape)}",
                                    "the layer files do not belong to one CLT")
        if tuple(w_dec.shape) != (f_, n - i, d_out):
            raise SaeforgeError(f"W_dec_{i} has shape {tuple(w_dec.shape)}, expected [{f_}, {n - i}, {d_out}]",
                                "the layer files do not belong to one CLT")
        t["W_enc"][i] = enc[f"W_enc_{i}"].to(torch.float64).T
        t["b_enc"][i] = enc[f"b_enc_{i}"].to(torch.float64)
        t["b_dec"][i] = enc[f"b_dec_{i}"].to(torch.float64)
        if jump:
            theta = enc[f"threshold_{i}"].to(torch.float64).reshape(-1)
            if bool((theta < 0).any()):
                raise SaeforgeError(f"{where}: negative thresholds, which saeforge's JumpReLU cannot represent",
                                    "check where the files came from")
            t["threshold"][i] = theta
        if skip:
            t["W_skip"][i] = enc[f"W_skip_{i}"].to(torch.float64).T
        t[f"W_dec.{i}"] = w_dec
    if not jump:
        notes.append("a ReLU CLT: read as a JumpReLU CLT with threshold 0 (the same function)")
    from saeforge.formats.gemmascope import _assemble_clt

    sae = _assemble_clt(cfg, t, str(folder))
    config = _read_config(folder)
    reads, writes = [], []
    for i in range(n):
        b = _binding(config, i, notes if i == 0 else [])
        reads.append(b["reads"])
        writes.append(b["writes"])
    meta: dict[str, Any] = {"reads": reads, "writes": writes, "hook_name": reads[0], "hook_name_out": writes[0]}
    if isinstance(config.get("model_name"), str):
        meta["model_name"] = config["model_name"]
    return ImportedSAE(sae=sae, fmt="circuit_tracer_clt", path=folder, metadata=meta, notes=notes)


def write_circuit_tracer_clt(sae: SAE, folder: str | Path, *, metadata: dict[str, Any] | None = None,
                             **_: Any) -> Path:
    """Write a JumpReLU (or learnt-threshold BatchTopK) CLT as circuit-tracer's per-layer encoder/decoder files."""
    from saeforge.formats.gemmascope import clt_jumprelu_form

    t = clt_jumprelu_form(sae, "circuit-tracer")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(sae.cfg.n_layers):
        enc = {f"W_enc_{i}": t["W_enc"][i].T, f"b_enc_{i}": t["b_enc"][i], f"b_dec_{i}": t["b_dec"][i],
               f"threshold_{i}": t["threshold"][i]}
        if "W_skip" in t:
            enc[f"W_skip_{i}"] = t["W_skip"][i].T
        atomic_save_safetensors(folder / f"W_enc_{i}.safetensors", enc)
        atomic_save_safetensors(folder / f"W_dec_{i}.safetensors", {f"W_dec_{i}": t["W_dec"][i]})
    _update_config(folder, dict(metadata or {}), "cross_layer_transcoder", [])
    return folder
