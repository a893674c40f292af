"""The MLP hidden site an SNMF decomposes, and where its features go: through the down projection into the residual
stream, and through the unembedding into the vocabulary."""

from __future__ import annotations

import re

import torch

from saeforge.errors import SaeforgeError

MLP_HIDDEN_RE = re.compile(r"^layers\.(\d+)\.mlp_hidden$")
# config keys of mixture-of-experts models: their MLP is several experts behind a router, with no one down projection
MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
_MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")


def mlp_layer(site: str) -> int:
    """The layer of a ``layers.N.mlp_hidden`` site; any other site is refused with the site to use."""
    match = MLP_HIDDEN_RE.match(site or "")
    if not match:
        layer = re.match(r"^layers\.(\d+)\.", site or "")
        example = f"layers.{layer.group(1) if layer else 'N'}.mlp_hidden"
        raise SaeforgeError(f"site {site!r} is not an MLP hidden site: SNMF decomposes the MLP's neurons (the input "
                            f"of its down projection)", f"pass --site {example}")
    return int(match.group(1))


def check_mlp_model(model: str, site: str, rank: int | None = None) -> None:
    """Refuse, from the model's config alone (before it loads), a site that is not an MLP hidden site, a layer it
    does not have, a model family without a dense MLP mapping, and a rank above its number of neurons."""
    from saeforge.models.sites import FAMILIES, family_for, model_config_on_disk

    layer = mlp_layer(site)
    cfg = model_config_on_disk(model)
    if cfg is None:
        return  # a hub model not downloaded yet, a .gguf: checked once loaded
    model_type = cfg.get("model_type")
    moe = next((k for k in MOE_KEYS if cfg.get(k)), None)
    if family_for(str(model_type)) is None or moe:
        why = (f"its MLP is a mixture of experts ({moe} = {cfg.get(moe)}), with no single down projection" if moe
               else "saeforge has no MLP mapping for this family")
        raise SaeforgeError(f"model {model!r} ({model_type}) has no MLP hidden site: {why}",
                            "fit SNMF on a model with a dense MLP: model types "
                            f"{', '.join(t for f in FAMILIES for t in f.model_types if t not in _MOE_TYPES)}")
    n_layers = cfg.get("num_hidden_layers") or cfg.get("n_layer")
    if isinstance(n_layers, int) and layer >= n_layers:
        raise SaeforgeError(f"site {site!r}: the model has {n_layers} layers (0..{n_layers - 1})",
                            f"pass --site layers.{n_layers // 2}.mlp_hidden")
    d_mlp = cfg.get("intermediate_size") or cfg.get("n_inner") or 4 * int(cfg.get("hidden_size")
                                                                          or cfg.get("n_embd") or 0)
    if rank is not None and d_mlp:
        from saeforge.neurons.snmf import check_rank

        check_rank(rank, int(d_mlp))


def mlp_site(lm, site: str):
    """The resolved MLP hidden site of a loaded model (its down projection must exist)."""
    mlp_layer(site)
    if lm.family is None:
        raise SaeforgeError(f"model type {lm.model_type!r} has no MLP hidden site: saeforge has no MLP mapping for "
                            "this family", "fit SNMF on a llama, gemma2, gpt2 or gpt_neox family model")
    try:
        return lm.site(site)
    except SaeforgeError as err:
        raise SaeforgeError(f"{lm.model_type} model has no MLP hidden site {site!r}: {err.problem}",
                            "fit SNMF on a model with a dense MLP (a mixture of experts has no single down "
                            "projection)") from err


@torch.no_grad()
def output_directions(lm, site: str, features: torch.Tensor) -> torch.Tensor:
    """Each feature's effect on the residual stream ``[k, d_model]``: its neuron pattern through the down projection
    (the linear part, bias left out), and for Gemma 2/3, whose MLP output passes a norm before the residual add,
    through that norm's scale."""
    s = mlp_site(lm, site)
    down = lm._modules[s.module_path]
    z = features.to(lm.device, lm.dtype)
    out = (down(z) - down(torch.zeros_like(z[:1]))).float()
    fam = lm.family
    if fam.mlp_out != fam.mlp:  # a norm after the MLP (Gemma): its scale, not its normalisation
        norm = lm._modules[f"{fam.layers}.{s.layer}.{fam.mlp_out}"]
        out = out * (norm.weight.float() + fam.norm_weight_offset)
    return out


@torch.no_grad()
def vocabulary_projection(lm, site: str, features: torch.Tensor, n: int = 10) -> list[tuple[list, list]]:
    """Per feature: ([token, logit] most promoted, [token, logit] most suppressed), its output direction through the
    final norm's scale and the unembedding (the paper's output-side description, arXiv 2506.10920)."""
    if n <= 0:
        return [([], []) for _ in range(features.shape[0])]
    logits = lm.direction_logits(output_directions(lm, site, features)).float()
    top, bot = logits.topk(n, dim=-1), logits.topk(n, dim=-1, largest=False)
    decode = lambda ids: [lm.tokenizer.decode([i]) for i in ids]  # noqa: E731
    return [([[t, float(v)] for t, v in zip(decode(ti.tolist()), tv.tolist())],
             [[t, float(v)] for t, v in zip(decode(bi.tolist()), bv.tolist())])
            for tv, ti, bv, bi in zip(top.values, top.indices, bot.values, bot.indices)]
