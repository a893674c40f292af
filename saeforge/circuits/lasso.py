"""CircuitLasso (Yin et al., "Scalable Circuit Learning for Interpreting Large Language Models", arXiv 2606.16939):
a circuit from sparse linear regressions between the SAE codes of successive sites, without interventions.

For each pair of successive sites (i before j) the codes are regressed with an L1 penalty,

    Â_ij = argmin_A (1/2M) ||Z_j − Z_i A||²_F + λ ||A||₁,

over M observations (every SAE-data token of the task's clean and corrupt prompts), and the last site's codes at the
last token are regressed the same way on the metric y (the logit difference of each prompt). Columns are centred and
scaled to unit variance first, so λ means the same at every site. The problems are solved with FISTA (Beck and
Teboulle 2009), as in the paper; only the features active on the task enter a regression, which keeps each one to
(active features)² numbers.

The circuit is read backwards from the metric: the last site's features with a nonzero coefficient for y, then at
each earlier site the features with a nonzero coefficient into a feature already in the circuit. Error nodes are not
part of the regression (there is no code for them); :func:`lasso_circuit` keeps every site's error node, like the
random control of :mod:`saeforge.circuits.circuit`, so that faithfulness compares the features.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from saeforge.circuits.attribution import CircuitSAE, read_nodes
from saeforge.circuits.tasks import EncodedTask
from saeforge.errors import SaeforgeError


def fista_lasso(x: torch.Tensor, y: torch.Tensor, lam: float, *, iters: int = 1000, tol: float = 1e-7
                ) -> torch.Tensor:
    """``[p, q]`` minimiser of (1/2M)||y − x A||²_F + lam·||A||₁ for ``x [M, p]``, ``y [M, q]`` (no intercept: centre
    first). FISTA with the step 1/L, L the largest eigenvalue of xᵀx/M; stops when an iteration moves A by less than
    ``tol`` relative to its size."""
    if lam < 0:
        raise SaeforgeError(f"the L1 penalty must be ≥ 0, not {lam}", "pass lam=0.05")
    m = x.shape[0]
    gram = x.T @ x / m
    cross = x.T @ y / m
    lipschitz = float(torch.linalg.eigvalsh(gram).max()) if gram.numel() else 0.0
    a = torch.zeros(x.shape[1], y.shape[1], dtype=x.dtype, device=x.device)
    if lipschitz <= 0:
        return a
    z, t = a.clone(), 1.0
    for _ in range(iters):
        step = z - (gram @ z - cross) / lipschitz
        a_next = torch.sign(step) * (step.abs() - lam / lipschitz).clamp(min=0)
        t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
        z = a_next + ((t - 1) / t_next) * (a_next - a)
        moved = float((a_next - a).norm())
        a, t = a_next, t_next
        if moved <= tol * (float(a.norm()) + 1e-12):
            break
    return a


def _standardise(v: torch.Tensor) -> torch.Tensor:
    centred = v - v.mean(0, keepdim=True)
    std = centred.std(0, keepdim=True)
    return centred / torch.where(std > 0, std, torch.ones_like(std))


@dataclass
class LassoCircuit:
    """The nodes CircuitLasso selects and its coefficients."""

    nodes: dict[str, list[int]]
    """``{site: [feature]}`` (no error nodes)."""
    to_metric: dict[int, float]
    """Coefficients of the last site's features for the metric (standardised units)."""
    edges: list[dict[str, Any]] = field(default_factory=list)
    """``{"from": [site, i], "to": [site, j], "coefficient": float}`` among the selected nodes."""
    seconds: float = 0.0

    def with_error_nodes(self, saes: Sequence[CircuitSAE]) -> dict[str, list[int]]:
        return {c.site: sorted(self.nodes.get(c.site, [])) + [c.d_sae] for c in saes}


@torch.no_grad()
def lasso_circuit(lm, enc: EncodedTask, saes: Sequence[CircuitSAE], *, lam: float = 0.05,
                  lam_metric: float | None = None, iters: int = 1000, batch_size: int = 32) -> LassoCircuit:
    """CircuitLasso over ``saes`` on the task's prompts (module docstring); ``lam_metric`` (default ``lam``) is
    the penalty of the regression on the metric."""
    t0 = time.perf_counter()
    codes: dict[str, list[torch.Tensor]] = {c.site: [] for c in saes}
    last_codes, metric = [], []
    for start in range(0, len(enc), batch_size):
        part = enc.rows(slice(start, start + batch_size))
        keep = part.keep.to(lm.device)
        rows = torch.arange(len(part), device=lm.device)
        for ids in (part.clean_ids, part.corrupt_ids):
            values = read_nodes(lm, ids, part.attention_mask, saes).values
            for c in saes:
                codes[c.site].append(values[c.site][0][keep].double().cpu())
            last_codes.append(values[saes[-1].site][0][rows, part.last.to(lm.device)].double().cpu())
            logits = lm.logits(ids.to(lm.device), part.attention_mask.to(lm.device))
            metric.append(part.metric(logits).double().cpu())
    z = {s: torch.cat(v) for s, v in codes.items()}
    active = {s: (v != 0).any(0).nonzero().flatten() for s, v in z.items()}
    last = saes[-1].site
    x_last = torch.cat(last_codes)[:, active[last]]
    coef_y = fista_lasso(_standardise(x_last), _standardise(torch.cat(metric)[:, None]),
                         lam if lam_metric is None else lam_metric, iters=iters)[:, 0]
    chosen = {last: active[last][coef_y != 0].tolist()}
    to_metric = {int(active[last][k]): float(coef_y[k]) for k in coef_y.nonzero().flatten().tolist()}
    edges: list[dict[str, Any]] = []
    for k in range(len(saes) - 1, 0, -1):
        down, up = saes[k].site, saes[k - 1].site
        targets = torch.tensor(chosen.get(down, []), dtype=torch.long)
        if not len(targets):
            chosen[up] = []
            continue
        x = _standardise(z[up][:, active[up]])
        coef = fista_lasso(x, _standardise(z[down][:, targets]), lam, iters=iters)
        used = (coef != 0).any(1)
        chosen[up] = active[up][used].tolist()
        for r, c in coef.nonzero().tolist():
            edges.append({"from": [up, int(active[up][r])], "to": [down, int(targets[c])],
                          "coefficient": float(coef[r, c])})
    return LassoCircuit({c.site: sorted(chosen.get(c.site, [])) for c in saes}, to_metric, edges,
                        time.perf_counter() - t0)


def overlap(a: dict[str, Sequence[int]], b: dict[str, Sequence[int]]) -> dict[str, float]:
    """Sizes and Jaccard overlap of two node sets."""
    sa = {(s, i) for s, v in a.items() for i in v}
    sb = {(s, i) for s, v in b.items() for i in v}
    union = sa | sb
    return {"a": len(sa), "b": len(sb), "shared": len(sa & sb), "jaccard": len(sa & sb) / len(union) if union else 1.0}
