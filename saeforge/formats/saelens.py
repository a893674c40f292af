"""SAELens v6 folders: ``cfg.json`` + ``sae_weights.safetensors`` (+ optional ``sparsity.safetensors``).

Reading (a plain SAELens folder, i.e. one without saeforge's own "saeforge" section in cfg.json):

==========================  ==================================================================================
SAELens ``architecture``    saeforge SAE
==========================  ==================================================================================
standard                    relu (``apply_b_dec_to_input`` from cfg.json, default true as in SAELens)
transcoder                  relu with ``d_out``
topk                        topk (``k``); ``rescale_acts_by_decoder_norm`` is folded into the weights
jumprelu                    jumprelu (``threshold``; SAELens applies ReLU first, so negative thresholds act as 0)
jumprelu_transcoder         jumprelu_transcoder (whatever the widths: the architecture says it is a transcoder)
jumprelu_skip_transcoder    jumprelu_skip_transcoder (``W_skip`` [d_out, d_in])
gated                       gated
others                      refused by name (ReLU skip transcoders, temporal, matching pursuit, abstopk, ...)
==========================  ==================================================================================

``normalize_activations``: "none" is plain; "expected_average_only_in" needs its scaling factor, which is folded the
way SAELens folds it (``W_enc *= s``, ``W_dec /= s``, ``b_dec /= s``; the latents then equal SAELens' folded SAE):
from the ``scaling_factor`` hint or an ``activation_scaler.json`` beside cfg.json, else refused. Per-input
normalisations ("constant_norm_rescale", "layer_norm") and train-time whitening cannot be folded and are refused.
Pre-6.0 flat configs (``hook_point``, ``activation_fn_str``/``activation_fn_kwargs.k``, boolean
``normalize_activations``, a ``scaling_factor`` tensor) are migrated; configs from a SAELens major version newer
than 6 are refused.

Writing: a plain SAELens v6 folder, exactly what SAELens' ``SAE.load_from_disk`` loads: relu -> standard/transcoder,
topk -> topk, jumprelu -> jumprelu/jumprelu_transcoder, the (BatchTopK, JumpReLU) skip transcoders ->
jumprelu_skip_transcoder, gated -> gated, batchtopk/matryoshka -> jumprelu with their learned global threshold for
every latent (as SAELens saves them); TopK transcoders, CLTs and crosscoders have no SAELens form and are refused. ``metadata.sae_lens_version`` is set to "6.0.0"
unless given (SAELens treats a config without it as pre-6.0 and drops the nested metadata).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saeforge.errors import SaeforgeError
from saeforge.formats.common import (
    ImportedSAE,
    assemble,
    check_keys,
    check_vector,
    dtype_name,
    orient,
    read_json,
    read_safetensors,
)
from saeforge.saes import (
    SAE,
    GatedConfig,
    JumpReLUConfig,
    JumpReLUSkipTranscoderConfig,
    JumpReLUTranscoderConfig,
    ReLUConfig,
    TopKConfig,
)
from saeforge.saes.io import CFG_FILENAME, EXTRA_STATE_FILENAME, SPARSITY_FILENAME, WEIGHTS_FILENAME
from saeforge.utils.atomic import atomic_save_safetensors, atomic_write_json

__all__ = ["SAELENS_FORMAT_VERSION", "read_saelens", "write_saelens"]

# The metadata.sae_lens_version saeforge writes: it marks the v6 layout (SAELens migrates configs without one).
SAELENS_FORMAT_VERSION = "6.0.0"
NEWEST_MAJOR = 6
SCALER_FILENAME = "activation_scaler.json"

# Top-level keys that SAELens keeps in metadata{} (pre-6.0 configs had them at the top level).
_METADATA_KEYS = ("model_name", "hook_name", "model_class_name", "hook_head_index", "model_from_pretrained_kwargs",
                  "prepend_bos", "exclude_special_tokens", "neuronpedia_id", "context_size", "seqpos_slice",
                  "dataset_path", "sae_lens_version", "sae_lens_training_version", "hook_name_out",
                  "hook_head_index_out", "hf_hook_name", "hf_hook_name_out")

_ARCH_TENSORS = {
    "standard": ({"W_enc", "b_enc", "W_dec", "b_dec"}, set()),
    "transcoder": ({"W_enc", "b_enc", "W_dec", "b_dec"}, set()),
    "topk": ({"W_enc", "b_enc", "W_dec", "b_dec"}, set()),
    "jumprelu": ({"W_enc", "b_enc", "W_dec", "b_dec"}, {"threshold", "log_threshold"}),
    "jumprelu_transcoder": ({"W_enc", "b_enc", "W_dec", "b_dec"}, {"threshold", "log_threshold"}),
    "jumprelu_skip_transcoder": ({"W_enc", "b_enc", "W_dec", "b_dec", "W_skip"}, {"threshold", "log_threshold"}),
    "gated": ({"W_enc", "b_gate", "b_mag", "r_mag", "W_dec", "b_dec"}, set()),
}
_REFUSED = {
    "skip_transcoder": "saeforge has no ReLU skip transcoder (its skip transcoders are TopK, BatchTopK and JumpReLU)",
    "temporal": "saeforge has no temporal SAE",
    "matching_pursuit": "saeforge has no matching-pursuit SAE",
    "abstopk": "saeforge has no absolute-value TopK SAE",
    "batchtopk": "this is a SAELens *training* config (SAELens itself loads BatchTopK SAEs only as jumprelu); "
                 "save it with SAELens' save_inference_model, which writes the jumprelu form",
    "matryoshka_batchtopk": "this is a SAELens *training* config (SAELens itself loads Matryoshka SAEs only as "
                            "jumprelu); save it with SAELens' save_inference_model, which writes the jumprelu form",
}


# --------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------


def _version_major(v: Any) -> int | None:
    if not isinstance(v, str):
        return None
    m = re.match(r"\s*v?(\d+)", v)
    return int(m.group(1)) if m else None


def _migrate_pre6(cfg: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """The pre-6.0 flat config -> the v6 fields saeforge reads (what SAELens' handle_pre_6_0_config does)."""
    renames = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index",
               "activation_fn_str": "activation_fn"}
    new = {renames.get(k, k): v for k, v in cfg.items()}
    new.setdefault("architecture", "standard")
    new.setdefault("apply_b_dec_to_input", True)
    kwargs = new.get("activation_fn_kwargs") or {}
    if new.get("activation_fn") == "topk" and isinstance(kwargs, dict) and kwargs.get("k") is not None:
        new["architecture"] = "topk"
        new["k"] = kwargs["k"]
    if isinstance(new.get("normalize_activations"), bool):
        new["normalize_activations"] = "expected_average_only_in" if new["normalize_activations"] else "none"
    if new.get("normalize_activations") is None:
        new["normalize_activations"] = "none"
    meta = dict(new.get("metadata") or {})
    for key in _METADATA_KEYS:
        if key in new and key not in meta:
            meta[key] = new[key]
    new["metadata"] = meta
    notes.append("pre-6.0 SAELens config migrated to the v6 fields")
    return new


def _scaling_factor(folder: Path, hint: float | None, where: str) -> float:
    if hint is not None:
        s = float(hint)
    else:
        path = folder / SCALER_FILENAME
        data = read_json(path, "activation scaler") if path.is_file() else {}
        s = data.get("scaling_factor")
        if s is None:
            raise SaeforgeError(
                f"{where} says normalize_activations='expected_average_only_in', but no scaling factor is known "
                f"(no {SCALER_FILENAME} with a value beside it)",
                "pass the factor SAELens estimated (its norm_scaling_factor): scaling_factor=... "
                "(`saeforge convert --scaling-factor ...`); saeforge folds it into the weights")
        s = float(s)
    if not (math.isfinite(s) and s > 0):
        raise SaeforgeError(f"{where}: the activation scaling factor must be a positive number, got {s}",
                            "pass the factor SAELens estimated")
    return s


def read_saelens(folder: str | Path, *, d_in: int | None = None, scaling_factor: float | None = None,
                 orientation: str | None = None, **_: Any) -> ImportedSAE:
    """Read a plain SAELens v6 folder (any saeforge "saeforge" section in cfg.json is ignored here)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SaeforgeError(f"{folder} is not a folder", "pass the SAELens folder (cfg.json + sae_weights.safetensors)")
    cfg_path = folder / CFG_FILENAME
    cfg = read_json(cfg_path, "SAELens config")
    notes: list[str] = []
    meta_in = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    version = meta_in.get("sae_lens_version", cfg.get("sae_lens_version"))
    major = _version_major(version)
    if major is not None and major > NEWEST_MAJOR:
        raise SaeforgeError(f"{cfg_path} was written by SAELens {version}, a newer layout than the v{NEWEST_MAJOR} "
                            "configs saeforge knows", "upgrade saeforge, or save the SAE with SAELens 6.x")
    if major is None or major < 6:
        cfg = _migrate_pre6(cfg, notes)
    arch = cfg.get("architecture", "standard")
    if arch in _REFUSED:
        raise SaeforgeError(f"{cfg_path}: SAELens architecture {arch!r} cannot be imported: {_REFUSED[arch]}",
                            "saeforge reads standard, transcoder, topk, jumprelu, jumprelu_transcoder, "
                            "jumprelu_skip_transcoder and gated")
    if arch not in _ARCH_TENSORS:
        raise SaeforgeError(f"{cfg_path}: unknown SAELens architecture {arch!r}",
                            f"saeforge reads: {', '.join(_ARCH_TENSORS)}")
    for key in ("d_in", "d_sae"):
        v = cfg.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise SaeforgeError(f"{cfg_path}: '{key}' must be a positive integer, got {v!r}",
                                "the config is damaged; save the SAE again")
    cfg_d_in, d_sae = cfg["d_in"], cfg["d_sae"]
    if d_in is not None and d_in != cfg_d_in:
        raise SaeforgeError(f"{cfg_path} says d_in={cfg_d_in}, but d_in={d_in} was given",
                            "drop the d_in hint or pass the right SAE")
    is_tc = arch.endswith("transcoder")
    norm = cfg.get("normalize_activations", "none") or "none"
    if norm not in ("none", "expected_average_only_in"):
        raise SaeforgeError(
            f"{cfg_path}: normalize_activations={norm!r} normalises every input at run time "
            "(or needs whitening statistics), which cannot be folded into fixed weights",
            "saeforge SAEs take raw activations; only 'none' and 'expected_average_only_in' can be imported")
    if cfg.get("reshape_activations", "none") not in ("none", None):
        notes.append(f"reshape_activations={cfg['reshape_activations']!r} kept in metadata: feed the SAE the "
                     "flattened (concatenated heads) activations")

    where = str(folder / WEIGHTS_FILENAME)
    raw = read_safetensors(folder / WEIGHTS_FILENAME, "SAELens weights")
    required, optional = _ARCH_TENSORS[arch]
    optional = set(optional) | {"scaling_factor", "finetuning_scaling_factor"}
    check_keys(raw, required, optional, where=where, layout=f"SAELens {arch!r} SAE")
    # a transcoder's output width: cfg.json's d_out, else the length of b_dec (which lives in the output space)
    d_out = cfg.get("d_out", int(raw["b_dec"].reshape(-1).shape[0])) if is_tc else cfg_d_in
    if arch.startswith("jumprelu") and not ({"threshold", "log_threshold"} & set(raw)):
        raise SaeforgeError(f"{where} lacks the JumpReLU threshold ('threshold' or 'log_threshold')",
                            "pass the complete, undamaged file")
    if "threshold" in raw and "log_threshold" in raw:
        raise SaeforgeError(f"{where} has both 'threshold' and 'log_threshold'", "the file is damaged")

    dtype = dtype_name(raw["W_enc"], cfg.get("dtype"))
    t: dict[str, Tensor] = {}
    t["W_enc"] = orient("W_enc", raw["W_enc"], rows=cfg_d_in, cols=d_sae, native="x_at_W", layout_known=True,
                        hint=orientation, where=where, notes=notes)
    t["W_dec"] = orient("W_dec", raw["W_dec"], rows=d_sae, cols=d_out, native="x_at_W", layout_known=True,
                        hint=orientation, where=where, notes=notes, role="decoder")
    check_vector("b_dec", raw["b_dec"], d_out, where)
    t["b_dec"] = raw["b_dec"]
    if "W_skip" in required:  # [d_out, d_in], applied as x @ W_skip.T (saeforge's orientation too)
        if tuple(raw["W_skip"].shape) != (d_out, cfg_d_in):
            raise SaeforgeError(f"{where}: W_skip has shape {tuple(raw['W_skip'].shape)}, expected "
                                f"[{d_out}, {cfg_d_in}]", "the file is damaged")
        t["W_skip"] = raw["W_skip"]
    for name in required - {"W_enc", "W_dec", "b_dec", "W_skip"}:
        check_vector(name, raw[name], d_sae, where)
        t[name] = raw[name]
    t = {k: v.to(torch.float64) for k, v in t.items()}  # fold in float64, cast once when assembling

    # finetuning scaling factor (pre-6.0): multiplies the latents before the decoder -> fold into W_dec rows
    for key in ("scaling_factor", "finetuning_scaling_factor"):
        if key in raw:
            s = raw[key].to(torch.float64)
            check_vector(key, s, d_sae, where)
            if not bool((s == 1).all()):
                t["W_dec"] = t["W_dec"] * s[:, None]
                notes.append(f"{key} folded into the decoder rows (encodings unchanged)")

    threshold = None
    if "log_threshold" in raw:  # a training save (SAELens < 6.48 trained log_threshold): take it exactly
        check_vector("log_threshold", raw["log_threshold"], d_sae, where)
    elif arch.startswith("jumprelu"):
        threshold = raw["threshold"].to(torch.float64)
        check_vector("threshold", threshold, d_sae, where)
        neg = int((threshold < 0).sum())
        if neg:  # SAELens computes ReLU(pre) * (pre > threshold): a negative threshold acts exactly like 0
            threshold = threshold.clamp_min(0)
            notes.append(f"{neg} negative threshold(s) set to 0 (identical under SAELens' ReLU-then-threshold)")

    if arch == "topk" and cfg.get("rescale_acts_by_decoder_norm", False):
        norms = t["W_dec"].norm(dim=1)
        if bool((norms == 0).any()):
            raise SaeforgeError(f"{where}: zero decoder rows with rescale_acts_by_decoder_norm",
                                "remove those latents first")
        t["W_enc"] = t["W_enc"] * norms[None, :]
        t["b_enc"] = t["b_enc"] * norms
        t["W_dec"] = t["W_dec"] / norms[:, None]
        notes.append("rescale_acts_by_decoder_norm folded into the weights (decoder rows now unit norm)")

    if norm == "expected_average_only_in":
        s = _scaling_factor(folder, scaling_factor, str(cfg_path))
        t["W_enc"] = t["W_enc"] * s
        t["W_dec"] = t["W_dec"] / s
        t["b_dec"] = t["b_dec"] / s
        # (a W_skip needs nothing: it sees x·s and its output is divided by s like the decoder's)
        notes.append(f"activation scaling factor {s:g} folded in (as SAELens folds it)")

    apply_b_dec = cfg.get("apply_b_dec_to_input", not is_tc)  # SAELens' default; transcoders never subtract it
    if not isinstance(apply_b_dec, bool):
        raise SaeforgeError(f"{cfg_path}: apply_b_dec_to_input must be true or false, got {apply_b_dec!r}",
                            "the config is damaged")
    common = dict(d_in=cfg_d_in, d_sae=d_sae, dtype=dtype, apply_b_dec_to_input=apply_b_dec,
                  d_out=d_out if is_tc else None)
    if arch in ("standard", "transcoder"):
        sae_cfg = ReLUConfig(**common)
    elif arch == "topk":
        k = cfg.get("k")
        if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
            raise SaeforgeError(f"{cfg_path}: a topk SAE needs a positive integer 'k', got {k!r}",
                                "the config is damaged")
        sae_cfg = TopKConfig(**common, k=k)
    elif arch in ("jumprelu_transcoder", "jumprelu_skip_transcoder"):
        # a transcoder by its architecture, whatever its widths (a residual -> residual transcoder is one too)
        config_class = JumpReLUSkipTranscoderConfig if arch == "jumprelu_skip_transcoder" else JumpReLUTranscoderConfig
        sae_cfg = config_class(**{**common, "d_out": d_out})
        if threshold is not None:
            t["threshold"] = threshold
        else:
            t["log_threshold"] = raw["log_threshold"]
    elif arch.startswith("jumprelu"):
        sae_cfg = JumpReLUConfig(**common)
        if threshold is not None:
            t["threshold"] = threshold
        else:
            t["log_threshold"] = raw["log_threshold"]
    else:
        sae_cfg = GatedConfig(**common)
    sae = assemble(sae_cfg, t, where=where)

    metadata = dict(cfg.get("metadata") or {})
    for key in ("hook_name_out", "hook_layer_out", "hook_head_index_out"):
        if key in cfg and key not in metadata:
            metadata[key] = cfg[key]
    if cfg.get("reshape_activations") not in (None, "none"):
        metadata["reshape_activations"] = cfg["reshape_activations"]
    stats = {}
    sp = folder / SPARSITY_FILENAME
    if sp.is_file():
        found = read_safetensors(sp, "feature statistics")
        stats = {k: v for k, v in found.items() if v.dim() == 1 and v.shape[0] == d_sae}
    return ImportedSAE(sae=sae, fmt="saelens", path=folder, metadata=metadata, feature_stats=stats, notes=notes)


# --------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------


def saelens_config(sae: SAE, metadata: dict[str, Any] | None) -> dict[str, Any]:
    """The plain SAELens v6 cfg.json for ``sae`` (refusing what SAELens cannot load)."""
    cfg = sae.cfg
    arch = sae.saelens_architecture()
    if cfg.is_transcoder and sae.architecture in ("topk", "gated", "batchtopk", "matryoshka", "topk_transcoder",
                                                  "topk_skip_transcoder"):
        raise SaeforgeError(f"SAELens has no {sae.architecture.removesuffix('_transcoder')} transcoder "
                            f"(d_out={cfg.d_out}, d_in={cfg.d_in})",
                            "write it in saeforge's own format (--to saeforge); only saeforge loads it")
    if sae.architecture.endswith(("_clt", "_crosscoder")):
        raise SaeforgeError(f"SAELens has no {sae.architecture}", "write it with --to saeforge (or a CLT with --to "
                            "gemmascope2_clt / circuit_tracer_clt)")
    if sae.architecture.startswith(("batchtopk", "matryoshka")) and not bool(sae.threshold >= 0):
        raise SaeforgeError(f"this {sae.architecture} SAE has not learned its inference threshold yet "
                            "(it still encodes by batch selection), so it has no SAELens (jumprelu) form",
                            "train it past threshold_start_step, or write it with --to saeforge")
    meta = dict(metadata or {})
    meta.setdefault("sae_lens_version", SAELENS_FORMAT_VERSION)
    meta.setdefault("sae_lens_training_version", meta["sae_lens_version"])
    out: dict[str, Any] = {
        "architecture": arch,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": cfg.dtype,
        "device": "cpu",
        "apply_b_dec_to_input": bool(cfg.apply_b_dec_to_input),
        "normalize_activations": "none",
        "reshape_activations": meta.pop("reshape_activations", "none"),
        **sae.saelens_config_extras(),
    }
    if cfg.is_transcoder:
        out["d_out"] = cfg.d_out
        for key in ("hook_name_out", "hook_layer_out", "hook_head_index_out"):
            if key in meta:
                out[key] = meta[key]
    out["metadata"] = meta
    try:
        json.dumps(out)
    except (TypeError, ValueError) as err:
        raise SaeforgeError(f"the SAE metadata cannot be written as JSON: {err}",
                            "pass only strings, numbers, booleans, lists and dicts in metadata") from err
    return out


def write_saelens(sae: SAE, folder: str | Path, *, metadata: dict[str, Any] | None = None,
                  feature_stats: dict[str, Tensor] | None = None) -> Path:
    """Write ``sae`` as a plain SAELens v6 folder (no saeforge section). cfg.json is written last."""
    folder = Path(folder)
    cfg_json = saelens_config(sae, metadata)
    import warnings

    with warnings.catch_warnings():  # BatchTopK's "threshold not learned" warning: refused above
        warnings.simplefilter("ignore")
        tensors = sae.saelens_tensors()
    stats = {}
    for name, v in (feature_stats or {}).items():
        if isinstance(v, Tensor) and v.shape == (sae.cfg.d_sae,):
            stats[name] = v.detach()
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(folder / WEIGHTS_FILENAME, tensors)
    (folder / EXTRA_STATE_FILENAME).unlink(missing_ok=True)  # a saeforge leftover would mislead
    if stats:
        atomic_save_safetensors(folder / SPARSITY_FILENAME, stats)
    atomic_write_json(folder / CFG_FILENAME, cfg_json)
    return folder
