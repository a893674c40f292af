"""CircuitLasso (Yin et al., "Scalable Circuit Learning for Interpreting Large Language Models", arXiv 2606.16939):
a circuit from sparse linear regressions between the SAE codes of successive sites, without interventions.

For each pair of successive sites (i before j) the codes are regressed with an L1 penalty,

    Â_ij = argmin_A (1/2M) ||Z_j − Z_i A||²_F + λ ||A||₁,

over M observations, and the last site's codes at the last token are regressed the same way on the metric y (the
logit difference of each prompt). The observations between sites are either every SAE-data token of the task's clean
and corrupt prompts, or — without interventions and without the task — the tokens of an activation cache
(``saeforge cache``, many tokens of ordinary text), streamed: only the moments (sums and cross-products of the codes
of successive sites) are kept, so the number of tokens is not bounded by memory. Columns are centred and scaled to
unit variance, so λ means the same at every site. The problems are solved with FISTA (Beck and Teboulle 2009), as in
the paper, on the Gram matrices; only the features active on the task's prompts enter a regression (a feature that
never fires on them does not move under mean ablation), which keeps each one to (active features)² numbers.

The circuit is read backwards from the metric: the last site's features with a nonzero coefficient for y, then at
each earlier site the features with a nonzero coefficient into a feature already in the circuit. Error nodes are not
part of the regression (there is no code for them); :func:`lasso_circuit` keeps every site's error node, like the
random control of :mod:`saeforge.circuits.circuit`, so that faithfulness compares the features.

:meth:`LassoCircuit.to_circuit` makes a :class:`~saeforge.circuits.circuit.Circuit` of it (JSON and Graphviz DOT
like attribution's): the edges are the coefficients, and a node's "effect" is its total effect on y in the linear
surrogate (the sum over paths of the products of coefficients, standardised units), not a logit difference.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from saeforge.circuits.attribution import CircuitSAE, read_nodes
from saeforge.circuits.tasks import EncodedTask
from saeforge.errors import SaeforgeError


def fista_lasso(x: torch.Tensor, y: torch.Tensor, lam: float, *, iters: int = 1000, tol: float = 1e-7
                ) -> torch.Tensor:
    """``[p, q]`` minimiser of (1/2M)||y − x A||²_F + lam·||A||₁ for ``x [M, p]``, ``y [M, q]`` (no intercept: centre
    first)."""
    m = x.shape[0]
    return fista_lasso_gram(x.T @ x / m, x.T @ y / m, lam, iters=iters, tol=tol)


def fista_lasso_gram(gram: torch.Tensor, cross: torch.Tensor, lam: float, *, iters: int = 1000, tol: float = 1e-7
                     ) -> torch.Tensor:
    """The lasso of :func:`fista_lasso` from its moments ``gram`` = xᵀx/M ``[p, p]`` and ``cross`` = xᵀy/M
    ``[p, q]``. FISTA with the step 1/L, L the largest eigenvalue of the Gram matrix; stops when an iteration moves A
    by less than ``tol`` relative to its size."""
    if lam < 0:
        raise SaeforgeError(f"the L1 penalty must be ≥ 0, not {lam}", "pass lam=0.05")
    lipschitz = float(torch.linalg.eigvalsh(gram).max()) if gram.numel() else 0.0
    a = torch.zeros(gram.shape[0], cross.shape[1], dtype=gram.dtype, device=gram.device)
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


class Moments:
    """Streaming moments of the codes of successive sites: per site the sum and the Gram matrix of its columns, per
    pair of successive sites the cross-products, in float64. :meth:`standardised` gives what the lasso on centred
    columns scaled to unit variance (as :func:`_standardise`) needs."""

    def __init__(self, columns: dict[str, torch.Tensor]):
        self.columns = columns
        self.sites = list(columns)
        self.count = 0
        self.sums = {s: torch.zeros(len(c), dtype=torch.float64) for s, c in columns.items()}
        self.grams = {s: torch.zeros(len(c), len(c), dtype=torch.float64) for s, c in columns.items()}
        self.cross = {(a, b): torch.zeros(len(columns[a]), len(columns[b]), dtype=torch.float64)
                      for a, b in zip(self.sites, self.sites[1:])}

    def add(self, codes: dict[str, torch.Tensor]) -> None:
        """Codes ``{site: [m, d_sae]}`` of the same m tokens at every site."""
        z = {s: codes[s][:, self.columns[s].to(codes[s].device)].double().cpu() for s in self.sites}
        self.count += int(next(iter(z.values())).shape[0])
        for s, v in z.items():
            self.sums[s] += v.sum(0)
            self.grams[s] += v.T @ v
        for a, b in self.cross:
            self.cross[(a, b)] += z[a].T @ z[b]

    def _centred(self, a: str, b: str, product: torch.Tensor) -> torch.Tensor:
        return product - torch.outer(self.sums[a], self.sums[b]) / self.count

    def std(self, site: str) -> torch.Tensor:
        var = self._centred(site, site, self.grams[site]).diagonal() / max(self.count - 1, 1)
        std = var.clamp(min=0).sqrt()
        return torch.where(std > 0, std, torch.ones_like(std))

    def standardised(self, up: str, down: str, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Gram ``[p, p]``, cross ``[p, len(targets)]``) of the standardised columns of ``up`` and of ``down``'s
        columns ``targets`` (positions in ``columns[down]``), each divided by the count."""
        su, sd = self.std(up), self.std(down)[targets]
        gram = self._centred(up, up, self.grams[up]) / torch.outer(su, su) / self.count
        cross = self._centred(up, down, self.cross[(up, down)])[:, targets] / torch.outer(su, sd) / self.count
        return gram, cross


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
    source: str = "task"
    """Where the regressions between sites were fitted: ``task`` (its prompts) or a cache folder."""
    tokens: int = 0
    """Observations of the regressions between sites."""

    def with_error_nodes(self, saes: Sequence[CircuitSAE]) -> dict[str, list[int]]:
        return {c.site: sorted(self.nodes.get(c.site, [])) + [c.d_sae] for c in saes}

    def total_effects(self, sites: Sequence[str]) -> dict[tuple[str, int], float]:
        """Each node's total effect on y in the linear surrogate: its coefficient for y at the last site, and
        Σ_j A[i, j] · effect(j) over its edges further back."""
        effect = {(sites[-1], i): v for i, v in self.to_metric.items()}
        for k in range(len(sites) - 1, 0, -1):
            for e in self.edges:
                if e["to"][0] == sites[k]:
                    key = (e["from"][0], e["from"][1])
                    effect[key] = effect.get(key, 0.0) + e["coefficient"] * effect.get(tuple(e["to"]), 0.0)
        return effect

    def to_circuit(self, saes: Sequence[CircuitSAE], task: str, *, settings: Mapping[str, Any] | None = None):
        """A :class:`~saeforge.circuits.circuit.Circuit` (JSON and DOT export): the selected features with their
        total effects, the coefficients as edges, the last site's coefficients for y as edges to ``logits``."""
        from saeforge.circuits.circuit import LOGITS, Circuit

        sites = [c.site for c in saes]
        effect = self.total_effects(sites)
        nodes = {s: sorted(self.nodes.get(s, [])) for s in sites}
        edges = [{"from": e["from"], "to": e["to"], "effect": e["coefficient"]} for e in self.edges]
        edges += [{"from": [sites[-1], i], "to": [LOGITS, 0], "effect": v} for i, v in sorted(self.to_metric.items())]
        return Circuit(task, sites, {c.site: c.d_sae for c in saes}, nodes,
                       {s: [effect.get((s, i), 0.0) for i in v] for s, v in nodes.items()}, edges, [],
                       {"method": "lasso", "source": self.source, "tokens": self.tokens, "seconds": self.seconds,
                        "effects": "total effect on the metric in the linear surrogate (standardised units)",
                        "error_nodes": "not selected (no code); kept in every evaluation"} | dict(settings or {}))


def check_cache(cache, lm, saes: Sequence[CircuitSAE]) -> None:
    """Refuse a cache that lacks a site of ``saes`` or holds activations of another model, before any work."""
    from saeforge.circuits.attribution import model_fingerprints

    missing = [c.site for c in saes if c.site not in cache.sites]
    if missing:
        raise SaeforgeError(f"the cache {cache.folder} lacks the site(s) {', '.join(missing)} of the SAEs (it holds "
                            f"{', '.join(cache.sites)})", f"cache them: saeforge cache --sites "
                            f"{' '.join(c.site for c in saes)} --tokens 65536 --out DIR")
    fingerprint = cache.manifest.get("model_fingerprint")
    if cache.source != "model" or fingerprint not in model_fingerprints(lm):
        raise SaeforgeError(f"the cache {cache.folder} holds activations of "
                            f"{cache.manifest.get('model') or 'imported arrays'} (fingerprint {fingerprint}), not of "
                            f"{lm.name}", f"cache the SAEs' model: saeforge cache --model {lm.name} --sites "
                            f"{' '.join(c.site for c in saes)} --out DIR")


def cache_batches(cache, saes: Sequence[CircuitSAE], tokens: int, *, chunk: int = 4096):
    """``{site: codes [m, d_sae]}`` of the first ``tokens`` tokens of ``cache`` (every site at once, the same
    tokens), ``chunk`` tokens at a time."""
    seen = 0
    for index, shard in enumerate(cache.shards):
        arrays = {c.site: cache.shard_array(index, c.site) for c in saes}
        for start in range(0, shard["tokens"], chunk):
            stop = min(start + chunk, shard["tokens"], start + tokens - seen)
            if stop <= start:
                return
            codes = {}
            for c in saes:
                x = torch.from_numpy(np.array(arrays[c.site][start:stop]))
                x = x.view(torch.bfloat16) if cache.manifest["dtype"] == "bfloat16" else x
                param = next(c.sae.parameters())
                codes[c.site] = c.sae.encode(x.to(device=param.device, dtype=param.dtype))
            seen += stop - start
            yield codes


@dataclass
class LassoData:
    """What the regressions of :func:`lasso_circuit` are fitted on: the features active on the task, the moments of
    their codes between sites, and the last site's codes at each prompt's last token with the metric."""

    active: dict[str, torch.Tensor]
    moments: Moments
    last_codes: torch.Tensor
    metric: torch.Tensor
    source: str
    seconds: float


@torch.no_grad()
def lasso_data(lm, enc: EncodedTask, saes: Sequence[CircuitSAE], *, batch_size: int = 32, cache=None,
               cache_tokens: int = 65_536, progress: bool = False) -> LassoData:
    """The data of :func:`lasso_circuit` (one pass over the task's prompts, and over the cache when given), to fit
    several penalties on."""
    from saeforge.circuits.attribution import _bar

    if cache is not None:
        check_cache(cache, lm, saes)
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
                codes[c.site].append(values[c.site][0][keep].cpu())
            last_codes.append(values[saes[-1].site][0][rows, part.last.to(lm.device)].double().cpu())
            logits = lm.logits(ids.to(lm.device), part.attention_mask.to(lm.device))
            metric.append(part.metric(logits).double().cpu())
    z = {s: torch.cat(v) for s, v in codes.items()}
    active = {s: (v != 0).any(0).nonzero().flatten() for s, v in z.items()}
    moments = Moments(active)
    if cache is None:
        moments.add(z)
    else:
        total = min(cache_tokens, cache.token_count)
        bar = _bar(progress, total, "cached codes")
        for batch in cache_batches(cache, saes, total):
            moments.add(batch)
            bar.update(int(next(iter(batch.values())).shape[0]))
        bar.close()
    return LassoData(active, moments, torch.cat(last_codes), torch.cat(metric),
                     "task" if cache is None else str(cache.folder), time.perf_counter() - t0)


def lasso_circuit(lm, enc: EncodedTask, saes: Sequence[CircuitSAE], *, lam: float = 0.05,
                  lam_metric: float | None = None, iters: int = 1000, batch_size: int = 32, cache=None,
                  cache_tokens: int = 65_536, progress: bool = False, data: LassoData | None = None) -> LassoCircuit:
    """CircuitLasso over ``saes`` (module docstring): the regressions between sites fitted on the task's prompts, or
    on the first ``cache_tokens`` tokens of ``cache`` (an :class:`~saeforge.data.activation_cache.ActivationCache`
    of the same sites and model); ``lam_metric`` (default ``lam``) is the penalty of the regression on the metric.
    ``data`` (from :func:`lasso_data`) skips the pass over the prompts and the cache."""
    if data is None:
        data = lasso_data(lm, enc, saes, batch_size=batch_size, cache=cache, cache_tokens=cache_tokens,
                          progress=progress)
    t0 = time.perf_counter()
    active, moments = data.active, data.moments
    last = saes[-1].site
    coef_y = fista_lasso(_standardise(data.last_codes[:, active[last]]), _standardise(data.metric[:, None]),
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
        where = torch.searchsorted(active[down], targets)  # positions of the targets among the active columns
        coef = fista_lasso_gram(*moments.standardised(up, down, where), lam, iters=iters)
        used = (coef != 0).any(1)
        chosen[up] = active[up][used].tolist()
        for r, c in coef.nonzero().tolist():
            edges.append({"from": [up, int(active[up][r])], "to": [down, int(targets[c])],
                          "coefficient": float(coef[r, c])})
    return LassoCircuit({c.site: sorted(chosen.get(c.site, [])) for c in saes}, to_metric, edges,
                        data.seconds + time.perf_counter() - t0, data.source, moments.count)


def overlap(a: dict[str, Sequence[int]], b: dict[str, Sequence[int]]) -> dict[str, float]:
    """Sizes and Jaccard overlap of two node sets."""
    sa = {(s, i) for s, v in a.items() for i in v}
    sb = {(s, i) for s, v in b.items() for i in v}
    union = sa | sb
    return {"a": len(sa), "b": len(sb), "shared": len(sa & sb), "jaccard": len(sa & sb) / len(union) if union else 1.0}
