"""Pieces every format reader/writer shares: the result type, safe file readers, key checks, orientation,
threshold conversion and assembling a saeforge SAE from named tensors.

Conventions on the saeforge side (``saeforge/saes/base.py``): ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_out]``,
row-vector ``x @ W_enc``. Every reader normalises to that and records what it changed in ``ImportedSAE.notes``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor

from saeforge.errors import SaeforgeError
from saeforge.saes import SAE, SAEConfig, make_sae
from saeforge.saes.base import DTYPES

__all__ = [
    "FORMAT_NAMES",
    "ORIENTATIONS",
    "WRITABLE_FORMATS",
    "ImportedSAE",
    "assemble",
    "check_keys",
    "check_vector",
    "dtype_name",
    "fold_decoder_norms_into_tensors",
    "hf_hook_for_site",
    "jumprelu_config",
    "jumprelu_form",
    "layer_of_site",
    "log_threshold_for",
    "orient",
    "read_json",
    "read_npz",
    "read_safetensors",
    "read_torch_state_dict",
    "site_for_hf_hook",
    "site_for_tl_hook",
    "tl_hook_for_site",
]

# Names accepted by load_any(fmt=...) / `saeforge convert --from-format` and by save_as / `--to`.
FORMAT_NAMES = ("saeforge", "saelens", "sparsify", "gemmascope", "gemmascope2", "gemmascope2_clt", "circuit_tracer",
                "circuit_tracer_clt", "dictionary_learning")
WRITABLE_FORMATS = ("saeforge", "saelens", "sparsify", "gemmascope2", "gemmascope2_clt", "circuit_tracer",
                    "circuit_tracer_clt")

# How a W_enc-like matrix is stored when its shape alone cannot tell (d_in == d_sae):
#   "x_at_W": x @ W_enc, W_enc [d_in, d_sae], W_dec [d_sae, d_out]   (SAELens, Gemma Scope, saeforge)
#   "linear": F.linear(x, W_enc), W_enc [d_sae, d_in], W_dec [d_out, d_sae]   (nn.Linear weights)
ORIENTATIONS = ("x_at_W", "linear")


@dataclass
class ImportedSAE:
    """What a reader returns: the SAE plus everything worth carrying into another format."""

    sae: SAE
    fmt: str
    path: Path
    # SAELens-style metadata{} fields (model_name, hook_name, context_size, ...), JSON-ready.
    metadata: dict[str, Any] = field(default_factory=dict)
    # Per-latent statistics ([d_sae] tensors), e.g. SAELens' "sparsity" (log10 feature density).
    feature_stats: dict[str, Tensor] = field(default_factory=dict)
    # Human-readable lines about what the reader did (transposed, folded, clamped ...).
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------------------------


def _need_file(path: Path, what: str, fix: str) -> None:
    if not path.exists():
        raise SaeforgeError(f"{path} is missing ({what})", fix)
    if not path.is_file():
        raise SaeforgeError(f"{path} is not a file ({what})", fix)


def read_json(path: Path, what: str = "config") -> dict[str, Any]:
    """Parse a JSON object; missing, damaged or non-object files become a SaeforgeError naming the file."""
    _need_file(path, what, "pass the complete folder the tool wrote")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SaeforgeError(f"{path} is not valid JSON: {err}",
                            "the file is damaged or truncated; fetch or save it again") from err
    if not isinstance(data, dict):
        raise SaeforgeError(f"{path} does not hold a JSON object (found {type(data).__name__})",
                            "the file is damaged or not the config this format expects")
    return data


def read_safetensors(path: Path, what: str = "weights") -> dict[str, Tensor]:
    _need_file(path, what, "pass the complete folder the tool wrote")
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for damaged headers/data
        raise SaeforgeError(f"{path} is not a readable safetensors file: {err}",
                            "the file is damaged or truncated; fetch or save it again") from err


def read_npz(path: Path, what: str = "weights") -> dict[str, Tensor]:
    """Arrays of an ``.npz`` (no pickles allowed) as tensors."""
    _need_file(path, what, "pass the params.npz file or its folder")
    import zipfile

    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as data:
            out = {key: torch.from_numpy(np.array(data[key])) for key in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as err:
        raise SaeforgeError(f"{path} is not a readable .npz file: {err}",
                            "the file is damaged or truncated; fetch it again") from err
    return out


def read_torch_state_dict(path: Path, ignore: Iterable[str] = ()) -> dict[str, Tensor]:
    """A pickled state_dict loaded with ``torch.load(weights_only=True)``: tensors only, never arbitrary code.

    Non-tensor entries named in ``ignore`` are dropped; any other non-tensor entry is an error naming it.
    """
    _need_file(path, "state_dict", "pass the ae.pt file or its folder")
    import pickle

    import warnings

    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of damaged files; we report instead
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SaeforgeError(f"{path} is not a readable torch state_dict (loaded with weights_only=True): {first}",
                            "the file is damaged, or it pickles objects other than tensors; saeforge only loads "
                            "plain state_dicts and never runs code from a pickle") from err
    if not isinstance(obj, Mapping):
        raise SaeforgeError(f"{path} holds a {type(obj).__name__}, not a state_dict (a dict of tensors)",
                            "save the module's state_dict(), e.g. torch.save(ae.state_dict(), 'ae.pt')")
    out: dict[str, Tensor] = {}
    bad = []
    ignore = set(ignore)
    for key, value in obj.items():
        if isinstance(value, Tensor):
            out[str(key)] = value
        elif key not in ignore:
            bad.append(f"{key} ({type(value).__name__})")
    if bad:
        raise SaeforgeError(f"{path} has non-tensor entries: {', '.join(bad)}",
                            "a state_dict holds tensors only; re-save it with torch.save(module.state_dict(), ...)")
    return out


# --------------------------------------------------------------------------------------------------------------
# Checking tensors
# --------------------------------------------------------------------------------------------------------------


def check_keys(found: Iterable[str], required: Iterable[str], optional: Iterable[str] = (), *, where: str,
               layout: str) -> None:
    """Refuse missing required keys and unknown keys, naming them."""
    found, required, optional = set(found), set(required), set(optional)
    missing = sorted(required - found)
    if missing:
        raise SaeforgeError(f"{where} lacks tensor(s) {', '.join(missing)} that a {layout} needs "
                            f"(found: {', '.join(sorted(found)) or 'none'})",
                            "pass the complete, undamaged file; or name the right format/architecture")
    unknown = sorted(found - required - optional)
    if unknown:
        known = ", ".join(sorted(required | optional))
        raise SaeforgeError(f"{where} has tensor(s) saeforge does not know for a {layout}: {', '.join(unknown)} "
                            f"(known: {known})",
                            "saeforge refuses rather than silently dropping weights: the file is from a different "
                            "architecture or a newer version of its tool, or it needs a feature saeforge lacks")


def check_vector(name: str, t: Tensor, length: int | None, where: str) -> int:
    """A 1-D tensor, optionally of a given length; returns its length."""
    if t.dim() != 1:
        raise SaeforgeError(f"{where}: {name} must be a vector, got shape {tuple(t.shape)}",
                            "the file is damaged or not the layout its name suggests")
    if length is not None and t.shape[0] != length:
        raise SaeforgeError(f"{where}: {name} has length {t.shape[0]}, expected {length}",
                            "the tensors do not fit together; the file is damaged or mixes two SAEs")
    return int(t.shape[0])


def orient(name: str, t: Tensor, *, rows: int | None, cols: int, native: str, layout_known: bool,
           hint: str | None, where: str, notes: list[str], role: str = "encoder") -> Tensor:
    """Return ``t`` as the saeforge orientation, decided from its shape.

    role="encoder": result [d_in, d_sae] with ``cols`` = d_sae, ``rows`` = d_in (None: unknown).
    role="decoder": result [d_sae, d_out] with ``rows`` = d_sae, ``cols`` = d_out.
    ``native`` is the orientation the format documents (one of ORIENTATIONS). When the shape fits both
    orientations (a square matrix), the documented one is used if the file's metadata fixes the layout
    (``layout_known``), else the ``hint``; without either the file is refused.
    """
    if t.dim() != 2:
        raise SaeforgeError(f"{where}: {name} must be a matrix, got shape {tuple(t.shape)}",
                            "the file is damaged or not the layout its name suggests")
    a, b = int(t.shape[0]), int(t.shape[1])
    # saeforge wants [rows, cols]; "x_at_W" stores it so, "linear" stores the transpose
    fits_x = b == cols and (rows is None or a == rows)
    fits_lin = a == cols and (rows is None or b == rows)
    r = "" if rows is None else f"={rows}"
    want = f"[d_in{r}, d_sae={cols}]" if role == "encoder" else f"[d_sae{r}, d_out={cols}]"
    if not fits_x and not fits_lin:
        raise SaeforgeError(f"{where}: {name} has shape {(a, b)}, which fits neither {want} nor its transpose",
                            "the tensors do not fit together (or the d_in you gave is wrong)")
    if fits_x and fits_lin:
        if layout_known:
            choice = native
        elif hint in ORIENTATIONS:
            choice = hint
            notes.append(f"{name} is square {(a, b)}; orientation {hint!r} taken from the hint")
        else:
            raise SaeforgeError(
                f"{where}: {name} is square {(a, b)} (d_in == d_sae), so its shape cannot tell which axis is d_in, "
                "and the file carries no metadata that fixes the layout",
                "pass orientation='x_at_W' (stored [d_in, d_sae], x @ W_enc: SAELens/Gemma Scope) or "
                "orientation='linear' (stored [d_sae, d_in], nn.Linear) -- `saeforge convert --orientation ...`")
    else:
        choice = "x_at_W" if fits_x else "linear"
        if choice != native:
            notes.append(f"{name} was stored {(a, b)} (transposed relative to this format's usual layout); "
                         "orientation decided from the shapes")
    return t if choice == "x_at_W" else t.T


def dtype_name(t: Tensor, preferred: str | None = None) -> str:
    """The saeforge dtype name for the SAE: ``preferred`` when valid, else the tensor's (non-float -> float32)."""
    if isinstance(preferred, str):
        key = preferred.removeprefix("torch.")
        if key in DTYPES:
            return key
    for name, dt in DTYPES.items():
        if t.dtype == dt:
            return name
    return "float32"


# --------------------------------------------------------------------------------------------------------------
# Thresholds and folding
# --------------------------------------------------------------------------------------------------------------


def log_threshold_for(theta: Tensor, dtype: torch.dtype) -> Tensor:
    """The ``log_threshold`` (saeforge JumpReLU's parameter) in ``dtype`` whose ``exp`` is as close as possible to
    ``theta``; exactly ``theta`` whenever some value of ``dtype`` maps onto it (always for 1/e <= theta <= e in
    float32; within one unit in the last place otherwise). ``theta == 0`` gives ``-inf`` (exp(-inf) == 0 exactly).
    """
    theta = theta.detach().to(torch.float64).cpu()
    if bool((theta < 0).any()) or bool(torch.isnan(theta).any()):
        raise ValueError("thresholds must be >= 0")
    target = theta.to(dtype).to(torch.float64)  # what a plain cast would give; the value to reproduce
    base = torch.log(target).to(dtype)
    best = base.clone()
    best_err = (torch.exp(best).to(torch.float64) - target).abs()
    up, down = base.clone(), base.clone()
    inf = torch.tensor(math.inf, dtype=dtype)
    for _ in range(8):
        up = torch.nextafter(up, inf)
        down = torch.nextafter(down, -inf)
        for cand in (up, down):
            err = (torch.exp(cand).to(torch.float64) - target).abs()
            better = err < best_err
            best = torch.where(better, cand, best)
            best_err = torch.where(better, err, best_err)
    best = torch.where(target == 0, torch.full_like(best, -math.inf), best)
    return best


@torch.no_grad()
def fold_decoder_norms_into_tensors(t: dict[str, Tensor], per_latent: Iterable[str], where: str) -> Tensor:
    """For tools whose ``encode`` returns ``f * ||W_dec[i]||`` (and whose ``decode`` divides it back out): scale
    the encoder side by the decoder row norms and make the rows unit norm, so saeforge's plain encode/decode give
    the same latents and reconstruction. ``t`` holds saeforge-oriented tensors; ``per_latent`` names the [d_sae]
    tensors (biases, thresholds) that scale with a latent. Returns the norms."""
    norms = t["W_dec"].norm(dim=1)
    if bool((norms == 0).any()):
        raise SaeforgeError(f"{where}: {int((norms == 0).sum())} decoder row(s) are exactly zero, and this tool "
                            "scales its latents by the decoder norms", "remove those latents first")
    t["W_dec"] = t["W_dec"] / norms[:, None]
    t["W_enc"] = t["W_enc"] * norms[None, :]
    for name in per_latent:
        t[name] = t[name] * norms
    return norms


# --------------------------------------------------------------------------------------------------------------
# Assembling
# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def assemble(cfg: SAEConfig, tensors: Mapping[str, Tensor], *, where: str) -> SAE:
    """Build the saeforge SAE for ``cfg`` and load ``tensors`` (saeforge names/orientation) into it.

    JumpReLU may give ``threshold`` (converted to its ``log_threshold`` parameter, see ``log_threshold_for``)
    instead of ``log_threshold``. Every state entry must be given with the right shape.
    """
    sae = make_sae(cfg)
    given = dict(tensors)
    state = sae.state_dict()
    if "log_threshold" in state and "log_threshold" not in given and "threshold" in given:
        theta = given.pop("threshold")
        check_vector("threshold", theta, cfg.d_sae, where)
        given["log_threshold"] = log_threshold_for(theta, cfg.torch_dtype)
    missing = sorted(set(state) - set(given))
    extra = sorted(set(given) - set(state))
    if missing or extra:  # a reader bug rather than a user error, but say it plainly
        raise SaeforgeError(f"{where}: cannot build a {cfg.architecture} SAE: missing {missing}, unexpected {extra}",
                            "report this: the reader and the SAE class disagree")
    out = {}
    for name, current in state.items():
        value = given[name]
        if tuple(value.shape) != tuple(current.shape):
            raise SaeforgeError(f"{where}: tensor {name} has shape {tuple(value.shape)}, "
                                f"but a {cfg.architecture} SAE with d_in={cfg.d_in}, d_sae={cfg.d_sae} needs "
                                f"{tuple(current.shape)}", "the tensors do not fit together; the file is damaged")
        out[name] = value.detach().to(device=current.device, dtype=current.dtype).contiguous()
    sae.load_state_dict(out, strict=True)
    return sae


# --------------------------------------------------------------------------------------------------------------
# Sites and the hook names of other tools
# --------------------------------------------------------------------------------------------------------------

# Hugging Face module hooks as Gemma Scope 2 writes them (``<module path>.input|.output``), by canonical site kind.
# Gemma's MLP output is the post-MLP norm's output (saeforge's mlp_out for the Gemma 2/3 family).
_HF_HOOKS = {
    "gemma": {"resid_pre": "model.layers.{L}.input", "resid_post": "model.layers.{L}.output",
              "mlp_in": "model.layers.{L}.pre_feedforward_layernorm.output",
              "mlp_hidden": "model.layers.{L}.mlp.down_proj.input",
              "mlp_out": "model.layers.{L}.post_feedforward_layernorm.output",
              "attn_out": "model.layers.{L}.post_attention_layernorm.output"},
    "llama": {"resid_pre": "model.layers.{L}.input", "resid_post": "model.layers.{L}.output",
              "mlp_in": "model.layers.{L}.mlp.input", "mlp_hidden": "model.layers.{L}.mlp.down_proj.input",
              "mlp_out": "model.layers.{L}.mlp.output",
              "attn_out": "model.layers.{L}.self_attn.output"},
}


def hf_hook_for_site(site: str, model_name: str = "") -> str | None:
    """The Hugging Face module hook (Gemma Scope 2's ``hf_hook_point_in/out``) of a canonical saeforge site, in the
    naming of ``model_name``'s family (Gemma's post-norms, or the Llama layout every other family shares here)."""
    from saeforge.models.sites import CANONICAL_RE

    m = CANONICAL_RE.match(site)
    if not m:
        return None
    table = _HF_HOOKS["gemma" if "gemma" in model_name.lower() else "llama"]
    return table[m.group(2)].format(L=m.group(1)) if m.group(2) in table else None


def site_for_hf_hook(hook: str) -> str | None:
    """The canonical saeforge site of a Hugging Face module hook (either family's naming), or None."""
    import re

    for table in _HF_HOOKS.values():
        for kind, pattern in table.items():
            rx = "^" + re.escape(pattern).replace(re.escape("{L}"), r"(\d+)") + "$"
            m = re.match(rx, hook)
            if m:
                return f"layers.{m.group(1)}.{kind}"
    return None


# TransformerLens hook names circuit-tracer writes (feature_input_hook / feature_output_hook), by canonical kind.
_TL_HOOKS = {"mlp.hook_in": "mlp_in", "mlp.hook_post": "mlp_hidden", "ln2.hook_normalized": "mlp_in", "hook_mlp_in": "mlp_in",
             "mlp.hook_out": "mlp_out", "hook_mlp_out": "mlp_out", "hook_resid_pre": "resid_pre",
             "hook_resid_post": "resid_post", "hook_attn_out": "attn_out"}


def tl_hook_for_site(site: str) -> str:
    """The TransformerLens hook (relative to a block) circuit-tracer names a canonical site by; other names as
    they are."""
    from saeforge.models.sites import CANONICAL_RE

    m = CANONICAL_RE.match(site)
    if not m:
        return site
    return {"mlp_in": "mlp.hook_in", "mlp_hidden": "mlp.hook_post", "mlp_out": "hook_mlp_out", "resid_pre": "hook_resid_pre",
            "resid_post": "hook_resid_post", "attn_out": "hook_attn_out"}[m.group(2)]


def site_for_tl_hook(hook: str, layer: int) -> str | None:
    """``layers.{layer}.<kind>`` for a TransformerLens hook name (``mlp.hook_in``, ``hook_mlp_out``...), or None
    (``hook_resid_mid``, the residual stream between attention and MLP, has no saeforge site)."""
    kind = _TL_HOOKS.get(hook.split("blocks.", 1)[-1].split(".", 1)[-1] if hook.startswith("blocks.") else hook)
    return f"layers.{layer}.{kind}" if kind else None


def layer_of_site(site: str) -> int | None:
    from saeforge.models.sites import CANONICAL_RE

    m = CANONICAL_RE.match(site)
    return int(m.group(1)) if m else None


@torch.no_grad()
def jumprelu_form(sae: SAE, fmt: str) -> dict[str, Tensor]:
    """The inference tensors of a JumpReLU-shaped dictionary (saeforge names and orientation, ``threshold`` per
    latent), for formats that store ``f = pre · 1[pre > θ]`` with ``pre = x W_enc + b_enc``: JumpReLU as it is,
    BatchTopK with its learnt global threshold, ReLU with θ = 0. A pre-encoder bias (``apply_b_dec_to_input``) is
    folded into ``b_enc`` (``b_enc - b_dec W_enc``). ``W_skip`` [d_out, d_in] is included when there is one."""
    arch = sae.architecture
    base = arch.replace("_skip_transcoder", "").replace("_transcoder", "")
    if base not in ("jumprelu", "batchtopk", "relu"):
        raise SaeforgeError(f"{fmt} stores JumpReLU (or ReLU) dictionaries; a {arch} SAE has no such form "
                            "(TopK selection is not a threshold)",
                            "write it with --to saeforge, or train a jumprelu/batchtopk one")
    if base == "batchtopk" and not sae.threshold_learned:
        raise SaeforgeError(f"this {arch} has not learned its inference threshold yet, so it has no JumpReLU form",
                            "train it past threshold_start_step, or write it with --to saeforge")
    t = {k: v.detach().clone() for k, v in sae.saelens_tensors().items() if k in ("W_enc", "b_enc", "W_dec", "b_dec",
                                                                                "threshold", "W_skip")}
    if "threshold" not in t:
        t["threshold"] = torch.zeros(sae.cfg.d_sae, dtype=t["W_enc"].dtype, device=t["W_enc"].device)
    if getattr(sae.cfg, "skip_connection", False) and "W_skip" not in t:
        t["W_skip"] = sae.W_skip.detach().clone()
    if sae.cfg.apply_b_dec_to_input:
        t["b_enc"] = (t["b_enc"].double() - t["b_dec"].double() @ t["W_enc"].double()).to(t["b_enc"].dtype)
    return t


def jumprelu_config(*, d_in: int, d_sae: int, d_out: int, transcoder: bool, skip: bool, dtype: str):
    """The saeforge config a JumpReLU-shaped file becomes: an SAE, a transcoder or a skip transcoder."""
    from saeforge.saes import JumpReLUConfig, JumpReLUSkipTranscoderConfig, JumpReLUTranscoderConfig

    if skip:
        return JumpReLUSkipTranscoderConfig(d_in=d_in, d_sae=d_sae, d_out=d_out, dtype=dtype)
    if transcoder:
        return JumpReLUTranscoderConfig(d_in=d_in, d_sae=d_sae, d_out=d_out, dtype=dtype)
    return JumpReLUConfig(d_in=d_in, d_sae=d_sae, d_out=d_out if d_out != d_in else None, dtype=dtype,
                          apply_b_dec_to_input=False)
