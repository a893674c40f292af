"""Edges between the nodes of successive sites (Marks et al., arXiv 2403.19647, the stop-gradient recipe).

The effect of an edge u → d (u at an earlier site, d at a later one) is the part of d's effect that goes through u
directly:

    edge(u → d) = −Σ_positions ∇_d m · (∂d/∂u) · (u_corrupt − u_clean),

averaged over the task's pairs (positions summed), with ∇_d m the total gradient of the metric at d (as for node
effects, so edge and node effects share one scale and sign). ∂d/∂u is the *direct* derivative: every spliced site
between u and d is held fixed. saeforge gets that from one forward in which each site's output x̂(f) + e is built
from leaf copies of f and e, while d itself (f = encode(x), e = x − x̂(f)) stays a function of the leaves upstream.
A gradient from d then stops at the nearest spliced sites, which is Marks et al.'s recipe with sites
attn_out, mlp_out, resid_post per layer: resid_{l−1} → resid_l through the skip connection only (attention and MLP
held), resid_{l−1} → mlp_l without the path through attention, attn_l → resid_l without the MLP, and so on.
Edges leave from error nodes too (an error node is a node like any other).

**Per position** (``per_position=True``): the edge from u at token position p to d at position q,

    edge(u@p → d@q) = −∇_{d@q} m · (∂d@q/∂u@p) · (u_corrupt − u_clean)@p,

is zero for p > q (causal attention) and sums over p and q to the summed edge. The positions of every pair must be
the same (a task whose prompts all have one length in tokens).

The cost is one backward per downstream node kept in the circuit (per position: per node and position), each
through the layers between two sites.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from saeforge.circuits.attribution import CircuitSAE, _encode, _no_weight_grads, read_nodes
from saeforge.circuits.tasks import EncodedTask

Edges = dict[tuple[str, str], torch.Tensor]
"""``{(upstream site, downstream site): [len(down nodes), len(up nodes)]}`` edge effects, rows and columns in the
order of the node lists given; per position ``[len(down nodes), T, len(up nodes), T]`` (down node, its position, up
node, its position)."""


def attribute_edges(lm, enc: EncodedTask, saes: Sequence[CircuitSAE], nodes: Mapping[str, Sequence[int]], *,
                    per_position: bool = False, batch_size: int = 16, progress: bool = False) -> Edges:
    """Effects of the edges between ``nodes`` (``{site: [node indices]}``, index ``d_sae`` = the error node) of
    every site and every earlier site it reaches directly, summed over positions or ``per_position`` (module doc);
    pairs of sites with no direct path are left out."""
    from saeforge.circuits.attribution import _bar, check_per_position

    check_per_position(enc, per_position)
    order = [c.site for c in saes]
    nodes = {s: list(nodes.get(s, [])) for s in order}
    sums: Edges = {}
    chunks = range(0, len(enc), batch_size)
    positions = enc.clean_ids.shape[1] if per_position else 1
    bar = _bar(progress, len(chunks) * positions * sum(len(v) for s, v in nodes.items() if s != order[0]),
               "edges per position" if per_position else "edges")
    for start in chunks:
        part = enc.rows(slice(start, start + batch_size))
        for key, value in _chunk_edges(lm, part, saes, nodes, bar, per_position).items():
            sums[key] = sums[key] + value if key in sums else value
    bar.close()
    return {key: (value / len(enc)).float() for key, value in sums.items()}


def _chunk_edges(lm, part: EncodedTask, saes: Sequence[CircuitSAE], nodes: dict[str, list[int]], bar,
                 per_position: bool) -> Edges:
    """Edge effects summed over the rows of ``part`` (not yet averaged)."""
    clean = read_nodes(lm, part.clean_ids, part.attention_mask, saes)
    corrupt = read_nodes(lm, part.corrupt_ids, part.attention_mask, saes)
    ids, mask = part.clean_ids.to(lm.device), part.attention_mask.to(lm.device)
    keep = part.keep.to(lm.device)
    width = ids.shape[1]
    # ∇m at every node: the pass-through forward of the gradient path (total effects)
    out = lm.spliced_forward(ids, {c.site: c.sae for c in saes}, attention_mask=mask)
    grads = out.gradients(part.metric(out.logits).sum())
    del out

    graph: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # f, e as functions of the upstream leaves
    leaves: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def splice_for(c: CircuitSAE):
        def splice(x):
            f, e = _encode(c.sae, x)
            e = x - c.sae.decode(f).to(x.dtype)  # in the graph (the float64 difference of _encode has no gradient)
            graph[c.site] = (f, e)
            f_leaf = f.detach().requires_grad_(True)
            e_leaf = e.detach().requires_grad_(True)
            leaves[c.site] = (f_leaf, e_leaf)
            return torch.where(keep[..., None], c.sae.decode(f_leaf).to(x.dtype) + e_leaf, x.detach())

        return splice

    result: Edges = {}
    with _no_weight_grads(lm), lm.edit({c.site: splice_for(c) for c in saes}):
        lm.model(input_ids=ids, attention_mask=mask, use_cache=False)
        kmask = keep[..., None].to(torch.float32)
        for d_index, down in enumerate(saes):
            if d_index == 0 or not nodes[down.site]:
                continue
            upstream = [c for c in saes[:d_index] if nodes[c.site]]
            if not upstream:
                continue
            g_f, g_e = grads[down.site]
            f_d, e_d = graph[down.site]
            targets = [t for c in upstream for t in leaves[c.site]]
            rows: dict[str, list[torch.Tensor]] = {c.site: [] for c in upstream}
            reached: set[str] = set()
            # the scalars whose gradients give the edges into a node: its effect, or its effect at each position
            at = [slice(None)] if not per_position else [slice(q, q + 1) for q in range(width)]
            for j in nodes[down.site]:
                for q in at:
                    if j == down.d_sae:
                        scalar = (g_e[:, q].detach() * e_d[:, q] * kmask[:, q]).sum()
                    else:
                        scalar = (g_f[:, q, j].detach() * f_d[:, q, j] * keep[:, q]).sum()
                    grads_up = (torch.autograd.grad(scalar, targets, retain_graph=True, allow_unused=True)
                                if scalar.requires_grad else [None] * len(targets))  # None: a silent latent
                    for k, c in enumerate(upstream):
                        gf, ge = grads_up[2 * k], grads_up[2 * k + 1]
                        reached |= {c.site} if gf is not None or ge is not None else set()
                        rows[c.site].append(_upstream_effects(c, gf, ge, clean, corrupt, keep, nodes[c.site],
                                                              per_position))
                    bar.update(1)
            for c in upstream:
                if c.site in reached:
                    stacked = torch.stack(rows[c.site])
                    if per_position:  # [down node · position, position, up node] → [down, T, up, T]
                        stacked = stacked.view(len(nodes[down.site]), width, width, -1).permute(0, 1, 3, 2)
                    result[(c.site, down.site)] = stacked.contiguous()
    return result


def _upstream_effects(c: CircuitSAE, gf, ge, clean, corrupt, keep, chosen: list[int], per_position: bool
                      ) -> torch.Tensor:
    """−grad · Δ of the ``chosen`` nodes of upstream site ``c``, summed over the rows and over positions (``[len
    (chosen)]``) or per position (``[T, len(chosen)]``); zeros where no gradient reached the site."""
    (f0, e0), (f1, e1) = clean.values[c.site], corrupt.values[c.site]
    per_node = torch.zeros(f0.shape[1], c.d_sae + 1, dtype=torch.float64, device=f0.device)
    if gf is not None:
        per_node[:, :-1] = -(gf * (f1 - f0) * keep[..., None]).sum(0).double()
    if ge is not None:
        per_node[:, -1] = -(ge * (e1 - e0) * keep[..., None]).sum((0, 2)).double()
    per_node = per_node[:, chosen].cpu()
    return per_node if per_position else per_node.sum(0)
