"""Sites: named places in a model where activations are read or written.

Canonical names ``layers.{L}.resid_pre | resid_post | attn_out | mlp_in | mlp_hidden | mlp_out`` resolve to module
paths per model family; any other name is taken as a raw module path (``model.layers.3.mlp.act_fn``) and hooked at that module's
output.

Which module output is ``attn_out``/``mlp_out``: the tensor the block adds to the residual stream. For most families
that is the output of the attention/MLP module itself; Gemma 2/3 apply a norm after each (``post_attention_layernorm``,
``post_feedforward_layernorm``) before the residual add, so there the site is that norm's output.

``mlp_in`` is the input of the MLP module (after its pre-MLP norm; read and edited with a forward pre-hook), where a
transcoder or cross-layer transcoder reads: an edit there changes what the MLP computes and nothing else.

``mlp_hidden`` is the MLP's hidden activation — the input of its down (output) projection, one value per neuron
(``intermediate_size`` wide, after the gated product for gated MLPs). Neuron-level methods read and edit it there:
semi-NMF neuron groups (arXiv 2506.10920) and neuron-localised knowledge editing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from saeforge.errors import SaeforgeError

SITE_KINDS = ("resid_pre", "attn_out", "mlp_in", "mlp_hidden", "mlp_out", "resid_post")
CANONICAL_RE = re.compile(r"^layers\.(\d+)\.(resid_pre|resid_post|attn_out|mlp_in|mlp_hidden|mlp_out)$")


@dataclass(frozen=True)
class ModelFamily:
    name: str
    model_types: tuple[str, ...]
    layers: str  # module path of the list of decoder blocks
    attn_out: str  # module, relative to a block, whose output is the attention contribution
    mlp_out: str
    final_norm: str = "model.norm"  # the norm before the unembedding
    mlp: str = "mlp"  # the MLP module, relative to a block; its input is the site mlp_in
    norm_weight_offset: float = 0.0  # Gemma's RMSNorm scales by (1 + weight)
    mlp_down: str = "mlp.down_proj"  # the MLP's output projection, relative to a block; its input is mlp_hidden


FAMILIES = (
    ModelFamily(
        "llama",
        ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "olmo", "olmo2",
         "phi3", "granite", "smollm3", "stablelm", "phi", "cohere", "starcoder2"),
        "model.layers", "self_attn", "mlp",
    ),
    ModelFamily("gemma2", ("gemma2", "gemma3_text"), "model.layers", "post_attention_layernorm",
                "post_feedforward_layernorm", norm_weight_offset=1.0),
    ModelFamily("gpt2", ("gpt2", "gptj", "gpt_bigcode"), "transformer.h", "attn", "mlp", "transformer.ln_f",
                mlp_down="mlp.c_proj"),
    ModelFamily("gpt_neox", ("gpt_neox",), "gpt_neox.layers", "attention", "mlp", "gpt_neox.final_layer_norm",
                mlp_down="mlp.dense_4h_to_h"),
)


def family_for(model_type: str) -> ModelFamily | None:
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    return None


@dataclass(frozen=True)
class Site:
    """A resolved site. ``hook`` is ``"input"`` (read the block's input) or ``"output"`` (the module's output)."""

    name: str
    module_path: str
    hook: str
    kind: str  # one of SITE_KINDS, or module
    layer: int | None
    d: int | None

    @property
    def order(self) -> tuple[int, int]:
        """Position in the forward pass, for sorting; raw modules sort last."""
        if self.layer is None:
            return (1 << 30, 0)
        return (self.layer, SITE_KINDS.index(self.kind))


def canonical_site_names(n_layers: int) -> list[str]:
    return [f"layers.{layer}.{kind}" for layer in range(n_layers) for kind in SITE_KINDS]


def resolve_site(name: str, *, model_type: str, n_layers: int, d_model: int, module_names: set[str]) -> Site:
    """Resolve ``name`` for a model; an unknown name raises an error that lists the valid ones."""
    fam = family_for(model_type)
    match = CANONICAL_RE.match(name)
    if match:
        layer, kind = int(match.group(1)), match.group(2)
        if fam is None:
            raise SaeforgeError(
                f"canonical site {name!r} is not known for model type {model_type!r}",
                f"pass a raw module path instead (e.g. one of {_sample_modules(module_names)}); "
                f"families with canonical sites: {', '.join(t for f in FAMILIES for t in f.model_types)}",
            )
        if layer >= n_layers:
            raise SaeforgeError(
                f"site {name!r}: layer {layer} does not exist, the model has {n_layers} layers (0..{n_layers - 1})",
                f"use a layer between 0 and {n_layers - 1}, e.g. layers.{n_layers // 2}.resid_post",
            )
        block = f"{fam.layers}.{layer}"
        if kind == "resid_pre":
            return Site(name, block, "input", kind, layer, d_model)
        if kind == "resid_post":
            return Site(name, block, "output", kind, layer, d_model)
        if kind == "mlp_in":
            return Site(name, f"{block}.{fam.mlp}", "input", kind, layer, d_model)
        if kind == "mlp_hidden":  # width: the model's intermediate size, filled in by LanguageModel.site
            return Site(name, f"{block}.{fam.mlp_down}", "input", kind, layer, None)
        sub = fam.attn_out if kind == "attn_out" else fam.mlp_out
        return Site(name, f"{block}.{sub}", "output", kind, layer, d_model)
    if name in module_names and name:
        return Site(name, name, "output", "module", _layer_of(name, fam), None)
    valid = canonical_site_names(n_layers) if fam else []
    shown = ", ".join(valid[:8]) + (f", ... ({len(valid)} canonical sites)" if len(valid) > 8 else "")
    raise SaeforgeError(
        f"unknown site {name!r}",
        f"use a canonical site layers.{{0..{n_layers - 1}}}.{{{'|'.join(SITE_KINDS)}}} "
        f"(valid: {shown or 'none for this model type'}) or a raw module path such as "
        f"{_sample_modules(module_names)}; `saeforge sites MODEL` lists them",
    )


def _layer_of(module_path: str, fam: ModelFamily | None) -> int | None:
    if fam is None:
        return None
    match = re.match(re.escape(fam.layers) + r"\.(\d+)(\.|$)", module_path)
    return int(match.group(1)) if match else None


def _sample_modules(module_names: set[str]) -> str:
    picks = sorted((m for m in module_names if m), key=lambda m: (m.count("."), m))[:3]
    return ", ".join(picks) if picks else "(no modules)"


def model_config_on_disk(model: str) -> dict | None:
    """The text config (``config.json``, or its ``text_config``) of ``model`` when it can be read without loading
    the model: the embedded model, a local folder, a hub model already in the cache; None otherwise (a .gguf file,
    a hub model not downloaded yet)."""
    import json

    from saeforge.models.loading import resolve_model_source

    source = resolve_model_source(model)
    path = None
    if source.kind in ("embedded", "folder"):
        path = Path(source.location) / "config.json"
    elif source.kind == "hub":
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(source.location, "config.json")
            path = Path(found) if isinstance(found, str) else None
        except Exception:  # noqa: BLE001 - no cache, no hub library: the loaded model's check still runs
            path = None
    if path is None or not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg


def check_sites_before_loading(model: str, names: Iterable[str]) -> None:
    """Refuse canonical site names ``model`` cannot have (a layer past its last, a model type without canonical
    sites) from its config alone, before the slow model load. Raw module paths, and models whose config is not on
    disk, are checked when the model has loaded."""
    canonical = [n for n in names if CANONICAL_RE.match(n)]
    if not canonical or not model:
        return
    cfg = model_config_on_disk(model)
    if cfg is None:
        return
    n_layers = cfg.get("num_hidden_layers") or cfg.get("n_layer")
    model_type = cfg.get("model_type")
    if not isinstance(n_layers, int) or not isinstance(model_type, str) or family_for(model_type) is None:
        return
    for name in canonical:
        resolve_site(name, model_type=model_type, n_layers=n_layers, d_model=0, module_names=set())
