"""A forward pass that keeps gradients, with SAE latents and SAE error terms as tensors whose gradients you can read:
the basis of attribution patching through features (Marks et al., "Sparse Feature Circuits", arXiv 2403.19647).

At each spliced site the activation x is replaced by x' = x̂(f) + e with f = encode(x) (the latents) and
e = x − x̂(f) (the error term). The value of x' is exactly x, so the logits are the clean logits bit for bit, in any
dtype: x' is formed as ``x + (x̂ − x̂.detach()) + (e − e.detach())``, adding exact zeros that carry the gradients.
The gradient conventions:

- f and e are leaves (independent inputs): ∂m/∂f goes through the decoder, ∂m/∂e = ∂m/∂x'.
- The gradient to the upstream activation x passes through the splice as through the identity (x' equals x), so
  ∂m/∂f at an upstream site includes every path through the downstream spliced sites.
- No gradient flows into the encoder: f does not depend on x in the graph.

A dictionary that reads one site and writes another (a transcoder) binds as :class:`Splice` ``(dictionary, reads=A,
writes=B)``: its latents are encode(x_A) and x̂(f) + e replaces the activation at B, with e = x_B − x̂(f); the
original computation of B (the MLP a transcoder stands for) keeps carrying the upstream gradient, as the identity
does for an SAE.

Freeze points, for attribution recipes that linearise parts of the model (values are unchanged, only gradients):

- ``attention``: attention patterns are constants; the gradient flows through the values, not the softmax scores.
  The model's own attention function runs with detached queries and keys, selected for this forward through
  ``transformers.AttentionInterface`` under a private name.
- ``norm``: the scale 1/σ of every LayerNorm/RMSNorm is a constant; LayerNorm's centring stays (it is linear).
  A forward hook returns ``y.detach() + J(x − x.detach())`` with J the norm's Jacobian at fixed σ.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import nn

from saeforge.errors import SaeforgeError
from saeforge.models.language_model import EditContext
from saeforge.models.sites import Site

FREEZE_POINTS = ("attention", "norm")
_FROZEN_ATTENTION = "saeforge_frozen_pattern|"


@dataclass(frozen=True)
class Splice:
    """A dictionary spliced into the forward: latents f = encode(activation at ``reads``); the activation at
    ``writes`` (default: ``reads``, an SAE) is replaced by decode(f) + e.

    ``dictionary`` is any saeforge SAE or transcoder: ``encode``, ``decode``, ``cfg.d_in`` (the width of ``reads``),
    ``cfg.d_sae`` and, for a transcoder, ``cfg.d_output`` (the width of ``writes``)."""

    dictionary: Any
    reads: str | Site
    writes: str | Site | None = None


@dataclass
class SpliceNode:
    """One spliced dictionary in a :class:`SplicedForward`."""

    name: str
    reads: Site
    writes: Site
    dictionary: Any
    latents: torch.Tensor | None = None
    """f ``[batch, seq, d_sae]``, a leaf that requires grad."""
    errors: torch.Tensor | None = None
    """e ``[batch, seq, d]`` at ``writes``, a leaf that requires grad."""
    activation: torch.Tensor | None = None
    """The activation at ``reads`` (before this node's splice) as a tensor of the graph: its value is the clean
    activation, its gradient path leads to every upstream node (``encode(activation)`` gives feature-to-feature
    effects)."""


@dataclass
class SplicedForward:
    """The result of :func:`spliced_forward`: grad-enabled logits and the spliced nodes by name."""

    logits: torch.Tensor
    nodes: dict[str, SpliceNode] = field(default_factory=dict)

    def __getitem__(self, name: str) -> SpliceNode:
        return self.nodes[self._name(name)]

    def _name(self, name: str) -> str:
        if name not in self.nodes:
            raise SaeforgeError(f"no spliced node {name!r} in this forward",
                                f"use one of {', '.join(self.nodes)} (the keys given to spliced_forward)")
        return name

    def grad_of(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(∂m/∂f, ∂m/∂e) of node ``name`` after ``metric.backward()``; an error if it received no gradient."""
        node = self.nodes[self._name(name)]
        if node.latents.grad is None or node.errors.grad is None:
            raise SaeforgeError(
                f"node {name!r} (site {node.writes.name}) received no gradient: it is not on the path from the "
                "spliced sites to the metric, or backward() has not been run",
                "call metric.backward() on a metric computed from out.logits (or from a node's activation "
                "downstream of it) before reading gradients")
        return node.latents.grad, node.errors.grad

    def check_reached(self) -> None:
        """Raise, naming them, if some nodes received no gradient after ``backward()``."""
        missing = [n for n, node in self.nodes.items() if node.latents.grad is None or node.errors.grad is None]
        if missing:
            self.grad_of(missing[0])

    def gradients(self, metric: torch.Tensor, *, retain_graph: bool = False
                  ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{name: (∂m/∂f, ∂m/∂e)} of the scalar ``metric``, without touching ``.grad``; a node the metric does not
        depend on is an error naming it."""
        if metric.numel() != 1:
            raise SaeforgeError(f"the metric has {metric.numel()} elements; gradients need a scalar",
                                "reduce it first, e.g. metric.sum()")
        if not metric.requires_grad:
            raise SaeforgeError("the metric does not depend on any spliced node",
                                "compute it from out.logits or from a node's activation")
        leaves = [t for node in self.nodes.values() for t in (node.latents, node.errors)]
        grads = torch.autograd.grad(metric, leaves, retain_graph=retain_graph, allow_unused=True)
        out = {}
        for i, (name, node) in enumerate(self.nodes.items()):
            g_f, g_e = grads[2 * i], grads[2 * i + 1]
            if g_f is None or g_e is None:
                raise SaeforgeError(f"node {name!r} (site {node.writes.name}) is not on the path to the metric: "
                                    "the metric does not depend on it",
                                    "leave it out of the splices, or compute the metric downstream of it")
            out[name] = (g_f, g_e)
        return out


def spliced_forward(lm, input_ids: torch.Tensor, saes: Mapping[str, Any], *, freeze: Iterable[str] = (),
                    attention_mask: torch.Tensor | None = None) -> SplicedForward:
    """Run ``lm`` on ``input_ids`` with gradients, each dictionary of ``saes`` spliced in with an error node.

    ``saes``: ``{site: sae}`` for SAEs, or ``{name: Splice(dictionary, reads, writes)}`` (a transcoder).
    ``freeze``: any of ``"attention"``, ``"norm"`` (see the module docstring). The model's weights get no gradient.
    """
    if torch.is_inference_mode_enabled():
        raise SaeforgeError("spliced_forward needs gradients, but torch.inference_mode() is active",
                            "call it outside torch.inference_mode() (torch.no_grad() is lifted for it)")
    freeze = (freeze,) if isinstance(freeze, str) else tuple(dict.fromkeys(freeze))
    unknown = [f for f in freeze if f not in FREEZE_POINTS]
    if unknown:
        raise SaeforgeError(f"unknown freeze points {unknown}", f"use any of {', '.join(FREEZE_POINTS)}, "
                            'e.g. freeze=("attention", "norm")')
    nodes = _nodes(lm, saes)
    edits = _site_edits(nodes)
    with contextlib.ExitStack() as stack:
        stack.enter_context(weights_without_grad(lm.model))
        if "norm" in freeze:
            stack.enter_context(_frozen_norms(lm))  # before the edits: a site at a norm's output sees the frozen norm
        if "attention" in freeze:
            stack.enter_context(_frozen_attention(lm.model))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(lm.edit(edits))
        ids = input_ids.to(lm.device)
        mask = attention_mask.to(lm.device) if attention_mask is not None else None
        logits = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    missing = [n.name for n in nodes.values() if n.latents is None or n.errors is None]
    if missing:
        raise SaeforgeError(f"spliced nodes {missing} were never completed in the forward pass (their sites were "
                            "not reached, or a transcoder's output site comes before its input site)",
                            "check the sites: a Splice reads a site at or before the one it writes")
    return SplicedForward(logits, nodes)


# ------------------------------------------------------------------------------------------------- splices
def _width(dictionary, attr: str) -> int:
    cfg = getattr(dictionary, "cfg", None)
    if attr == "d_output":
        value = getattr(cfg, "d_output", None) or getattr(cfg, "d_in", None)
    else:
        value = getattr(cfg, attr, None)
    if value is None or not all(callable(getattr(dictionary, m, None)) for m in ("encode", "decode")):
        raise SaeforgeError(f"{type(dictionary).__name__} is not an SAE (no encode/decode or cfg.{attr})",
                            "pass saeforge SAEs (saeforge.saes.load_sae(folder))")
    return int(value)


def _nodes(lm, saes: Mapping[str, Any]) -> dict[str, SpliceNode]:
    if not saes:
        raise SaeforgeError("nothing to splice", "pass saes={site: sae}, e.g. {'layers.5.resid_post': sae}")
    nodes: dict[str, SpliceNode] = {}
    writers: dict[str, str] = {}
    for key, value in saes.items():
        splice = value if isinstance(value, Splice) else Splice(value, key)
        reads = splice.reads if isinstance(splice.reads, Site) else lm.site(splice.reads)
        writes = reads if splice.writes is None else (
            splice.writes if isinstance(splice.writes, Site) else lm.site(splice.writes))
        name = key.name if isinstance(key, Site) else str(key)
        d_in, d_out = _width(splice.dictionary, "d_in"), _width(splice.dictionary, "d_output")
        if d_in != reads.d:
            raise SaeforgeError(f"node {name!r}: the dictionary reads width {d_in} but site {reads.name} has width "
                                f"{reads.d}", "use the SAE trained on that site (and on this model)")
        if d_out != writes.d:
            raise SaeforgeError(f"node {name!r}: the dictionary writes width {d_out} but site {writes.name} has "
                                f"width {writes.d}", "use the SAE trained on that site (and on this model)")
        if writes.name in writers:
            raise SaeforgeError(f"nodes {writers[writes.name]!r} and {name!r} both write site {writes.name}",
                                "splice one dictionary per written site")
        writers[writes.name] = name
        nodes[name] = SpliceNode(name, reads, writes, splice.dictionary)
    return nodes


def _site_edits(nodes: dict[str, SpliceNode]) -> dict[Site, Any]:
    """One edit per site: first every node reading it takes its latents (from the activation before any splice at
    this site), then the node writing it splices x̂ + e in."""
    sites: dict[str, Site] = {}
    for n in nodes.values():
        sites.setdefault(n.reads.name, n.reads)
        sites.setdefault(n.writes.name, n.writes)

    def edit_for(site: Site):
        readers = [n for n in nodes.values() if n.reads.name == site.name]
        writer = next((n for n in nodes.values() if n.writes.name == site.name), None)

        def splice(x: torch.Tensor, ctx: EditContext) -> torch.Tensor | None:
            for node in readers:
                dictionary = node.dictionary
                with torch.no_grad():
                    f = dictionary.encode(x.detach().to(_dtype(dictionary)))
                node.latents = f.detach().requires_grad_(True)
                node.activation = x
            if writer is None:
                return None
            if writer.latents is None:
                raise SaeforgeError(f"node {writer.name!r} writes site {site.name}, which the forward reached "
                                    f"before the site it reads ({writer.reads.name})",
                                    "a Splice must read a site at or before the one it writes")
            x_hat = writer.dictionary.decode(writer.latents).to(x.dtype)
            with torch.no_grad():  # e = x − x̂, the difference taken in float64
                error = (x.double() - x_hat.double()).to(x.dtype)
            writer.errors = error.requires_grad_(True)
            return x + (x_hat - x_hat.detach()) + (writer.errors - writer.errors.detach())

        return splice

    return {site: edit_for(site) for site in sites.values()}


def _dtype(dictionary) -> torch.dtype:
    dtype = getattr(dictionary, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else next(dictionary.parameters()).dtype


@contextlib.contextmanager
def weights_without_grad(model: nn.Module) -> Iterator[None]:
    """The graph leads to the spliced nodes only: no parameter gradients are built or accumulated."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


# ------------------------------------------------------------------------------------------------- frozen attention
@contextlib.contextmanager
def _frozen_attention(model: nn.Module) -> Iterator[None]:
    """Select, for this forward, the model's own attention function called with detached queries and keys."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    config = model.config
    inner = config._attn_implementation or "eager"
    if inner.startswith(_FROZEN_ATTENTION):
        yield  # already frozen by an enclosing call
        return
    if inner not in ("eager", "sdpa"):
        raise SaeforgeError(f"freezing attention supports the eager and sdpa attention implementations; this model "
                            f"uses {inner!r}", 'load the model with attn_implementation="sdpa"')
    if getattr(config, "reorder_and_upcast_attn", False) and inner == "eager":
        raise SaeforgeError("freezing attention does not support GPT-2's reorder_and_upcast_attn",
                            "set model.config.reorder_and_upcast_attn = False")
    name = _FROZEN_ATTENTION + inner
    if name not in AttentionMaskInterface._global_mapping:
        AttentionInterface.register(name, _detached_pattern(inner))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner])
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = inner


def _detached_pattern(inner: str):
    """An attention function: ``inner``'s, with the softmax scores cut from the graph (queries and keys detached),
    so the output is pattern · values with a constant pattern. Same values as ``inner``, bit for bit."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def attention(module, query, key, value, attention_mask, **kwargs):
        fn = _eager_of(module) if inner == "eager" else ALL_ATTENTION_FUNCTIONS[inner]
        return fn(module, query.detach(), key.detach(), value, attention_mask, **kwargs)

    return attention


def _eager_of(module: nn.Module):
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise SaeforgeError(f"no eager attention function found for {type(module).__name__}",
                            'load the model with attn_implementation="sdpa" to freeze attention')
    return fn


# ------------------------------------------------------------------------------------------------- frozen norms
def _norm_kind(module: nn.Module) -> str | None:
    name = type(module).__name__
    if isinstance(module, nn.LayerNorm) or name.endswith("LayerNorm"):
        return "layer"
    if name.endswith("RMSNorm"):
        return "rms"
    return "other" if "Norm" in name else None


@contextlib.contextmanager
def _frozen_norms(lm) -> Iterator[None]:
    norms = {path: m for path, m in lm.model.named_modules() if _norm_kind(m)}
    unknown = [f"{p} ({type(m).__name__})" for p, m in norms.items() if _norm_kind(m) == "other"]
    if unknown:
        raise SaeforgeError(f"freeze='norm' knows LayerNorm and RMSNorm, not {', '.join(unknown[:3])}",
                            "leave 'norm' out of freeze for this model")
    offsets = (lm.family.norm_weight_offset, 1.0 - lm.family.norm_weight_offset) if lm.family else (0.0, 1.0)
    handles = [m.register_forward_hook(_frozen_norm_hook(path, _norm_kind(m), offsets), with_kwargs=True)
               for path, m in norms.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _frozen_norm_hook(path: str, kind: str, offsets: tuple[float, ...]):
    state: dict[str, float] = {}  # the weight offset found to reproduce this norm's output

    def hook(module, args, kwargs, output):
        x = args[0] if args else next(iter(kwargs.values()))
        if not x.requires_grad or not isinstance(output, torch.Tensor):
            return None  # upstream of every spliced node: no gradient to shape
        compute = torch.promote_types(x.dtype, torch.float32)
        xs = x.detach().to(compute)
        eps = float(getattr(module, "variance_epsilon", getattr(module, "eps", 1e-5)))
        if kind == "layer":
            inv_sigma = torch.rsqrt(xs.var(-1, keepdim=True, unbiased=False) + eps)
        else:
            inv_sigma = torch.rsqrt(xs.pow(2).mean(-1, keepdim=True) + eps)
        weight = getattr(module, "weight", None)
        bias = getattr(module, "bias", None)

        def jacobian(dx: torch.Tensor, offset: float) -> torch.Tensor:
            dx = dx.to(compute)
            if kind == "layer":
                dx = dx - dx.mean(-1, keepdim=True)
            y = dx * inv_sigma
            return y * (weight.to(compute) + offset) if weight is not None else y

        if "offset" not in state:  # which formula this norm follows, checked on its own output
            bias_term = bias.to(compute) if bias is not None else 0.0
            # transformers' norms compute in float32 at least, whatever the model's dtype
            precision = max(torch.finfo(output.dtype).eps, torch.finfo(torch.float32).eps)
            tol = 16 * precision * float(output.detach().abs().max()) + 1e-30
            for offset in offsets:
                if float((jacobian(xs, offset) + bias_term - output.detach().to(compute)).abs().max()) <= tol:
                    state["offset"] = offset
                    break
            else:
                raise SaeforgeError(f"freeze='norm': the norm {path} ({type(module).__name__}) does not compute "
                                    "w·(x − mean)/σ + b or (w + offset)·x/rms as expected",
                                    "leave 'norm' out of freeze for this model")
        return output.detach() + jacobian(x - x.detach(), state["offset"]).to(output.dtype)

    return hook
