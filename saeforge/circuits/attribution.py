"""Node attribution over SAE features and one error node per site (Marks et al., "Sparse Feature Circuits",
arXiv 2403.19647).

The nodes of a site are its SAE's latents f_i and its error term e = x − x̂(f) (one node: the whole vector). The
*effect* of a node is how much of the clean logit difference it carries: the drop of m = logit[clean answer] −
logit[corrupt answer] (:mod:`saeforge.circuits.tasks`) on the clean prompts when the node alone takes its value from
the corrupt prompts,

    effect(a) = m(clean) − m(clean with a ← a_corrupt),

averaged over the task's pairs, per position or summed over the positions (only positions that are SAE data under
the token policy: BOS and padding keep their activations). Positive: the node helps the clean answer.

- ``atp`` (attribution patching): effect ≈ −∇_a m |clean · (a_corrupt − a_clean), one forward and one backward for
  every node of every site (the gradient path of :mod:`saeforge.models.gradients`: downstream splices pass the
  gradient as the identity, so ∇_a m is the total effect).
- ``ig`` (integrated gradients): effect ≈ −(a_corrupt − a_clean) · (1/N) Σ_k ∇_a m at a_clean + α_k (a_corrupt −
  a_clean), with the features and the error of one site interpolated together and the rest of the model running
  normally. saeforge takes the midpoints α_k = (k + ½)/N (Marks et al. take the left points k/N): the error of the
  sum over a site's nodes against the exact patching of the whole site falls as 1/N² instead of 1/N.
- :func:`exact_node_effects` patches nodes one at a time (one forward each): the reference both are checked against.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import torch

from saeforge.circuits.tasks import EncodedTask
from saeforge.errors import SaeforgeError
from saeforge.runs import site_position

METHODS = ("atp", "ig")


# ------------------------------------------------------------------------------------------------- the SAEs
@dataclass(frozen=True)
class CircuitSAE:
    """One SAE of a circuit: the site it reads and writes, and the dictionary."""

    site: str
    sae: Any

    @property
    def d_sae(self) -> int:
        return int(self.sae.cfg.d_sae)


def circuit_saes(lm, saes: Mapping[str, Any]) -> list[CircuitSAE]:
    """The SAEs in forward order, checked against ``lm``: ``saes`` is ``{site: sae}`` or the ``saes`` of a
    :func:`saeforge.runs.load_run` (BoundSAEs). Transcoders and SAEs of another model are refused."""
    if not saes:
        raise SaeforgeError("no SAEs given for the circuit", "pass saes={site: sae}, or a run folder with SAEs")
    out = []
    prints = model_fingerprints(lm)
    for name, value in saes.items():
        sae, site, meta = value, name, {}
        if hasattr(value, "write_site"):  # a BoundSAE
            if value.is_transcoder or len(value.reads) != 1:
                raise SaeforgeError(f"{value.describe()}: circuits use SAEs (one site read and written)",
                                    "point saeforge circuit find at a folder of SAEs only (move transcoders and "
                                    "crosscoders to another folder)")
            sae, site, meta = value.sae, value.read_site.name, value.meta or {}
        resolved = lm.site(site)
        if int(sae.cfg.d_in) != resolved.d or int(getattr(sae.cfg, "d_output", None) or sae.cfg.d_in) != resolved.d:
            raise SaeforgeError(f"the SAE for {site} has width {sae.cfg.d_in} but the site has width {resolved.d} on "
                                f"{lm.name}: it belongs to another model", "use SAEs trained on this model")
        _check_fingerprint(lm, site, meta, prints)
        out.append(CircuitSAE(resolved.name, sae))
    positions = {c.site: site_position(c.site) for c in out}
    if any(p is None for p in positions.values()):
        bad = next(s for s, p in positions.items() if p is None)
        raise SaeforgeError(f"site {bad} has no place in the forward order", "use sites layers.L.{attn_out,mlp_out,"
                            "resid_pre,resid_post}")
    if len({c.site for c in out}) != len(out):
        raise SaeforgeError("two SAEs on one site", "give one SAE per site")
    return sorted(out, key=lambda c: positions[c.site])


# the precisions a model may have been loaded in while SAEs trained on it, finest first
_LOAD_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def model_fingerprints(lm) -> set[str]:
    """The fingerprints ``lm``'s weights have in its own dtype and in every coarser one it rounds to: the
    fingerprint hashes the weights as loaded, so the same model trained on in bfloat16 records another one."""
    finer = [d for d in _LOAD_DTYPES if torch.finfo(d).eps <= torch.finfo(lm.dtype).eps]
    return {lm.fingerprint()} | {lm.fingerprint(d) for d in _LOAD_DTYPES if d not in finer}


def _check_fingerprint(lm, site: str, meta: Mapping[str, Any], prints: set[str]) -> None:
    """Refuse an SAE whose recorded model fingerprint is none of ``prints`` (:func:`model_fingerprints` of ``lm``),
    whatever the names say."""
    fingerprint = meta.get("model_fingerprint")
    if not fingerprint or fingerprint in prints:
        return
    name = meta.get("model_name")
    if name == lm.name and torch.finfo(lm.dtype).eps > torch.finfo(torch.float32).eps:
        fix = (f"load the model in float32 (load_run(..., dtype='float32'); saeforge circuit does): the SAEs may "
               f"have been trained on it in a finer precision than {str(lm.dtype).removeprefix('torch.')}")
    else:
        fix = f"load the model the SAEs were trained on (--model {name or 'NAME'})"
    raise SaeforgeError(f"the SAE for {site} was trained on model {name!r} with weights of fingerprint "
                        f"{fingerprint}, but {lm.name} has fingerprint {lm.fingerprint()} (or, rounded to a coarser "
                        "dtype, another of its own): other weights, whatever the name", fix)


def _dtype(sae) -> torch.dtype:
    return next(sae.parameters()).dtype


def _encode(sae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(f, e) of activations ``x``: the latents and the error x − x̂(f), taken in float64 (exact splices)."""
    f = sae.encode(x.to(_dtype(sae)))
    error = (x.double() - sae.decode(f).double()).to(x.dtype)
    return f, error


# ------------------------------------------------------------------------------------------------- reading nodes
@dataclass
class NodeValues:
    """The latents and error terms of every site on one set of prompts: ``{site: (f [n, T, d_sae], e [n, T, d])}``."""

    values: dict[str, tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def read_nodes(lm, ids: torch.Tensor, mask: torch.Tensor, saes: Sequence[CircuitSAE]) -> NodeValues:
    """f and e at every site on an unedited forward."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def reader(c: CircuitSAE):
        def read(x):
            out[c.site] = _encode(c.sae, x)
            return None

        return read

    with lm.edit({c.site: reader(c) for c in saes}):
        lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), use_cache=False)
    return NodeValues(out)


# ------------------------------------------------------------------------------------------------- effects
@dataclass
class NodeEffects:
    """Effects of the nodes of every site, averaged over the task's pairs.

    ``effects[site]`` is ``[d_sae + 1]`` (summed over positions) or ``[T, d_sae + 1]`` (per position); the last
    column is the site's error node."""

    task: str
    method: str
    steps: int
    per_position: bool
    sites: list[str]
    effects: dict[str, torch.Tensor]
    clean_metric: float
    """Mean logit difference on the clean prompts."""
    corrupt_metric: float
    """Mean logit difference on the corrupt prompts."""
    extra: dict[str, Any] = field(default_factory=dict)

    def d_sae(self, site: str) -> int:
        return int(self.effects[site].shape[-1]) - 1

    def ranked(self, k: int = 0) -> list[tuple[str, int, float]]:
        """(site, node, effect) by |effect|, largest first (summed over positions when per position); node ``d_sae``
        is the error node."""
        rows = []
        for site in self.sites:
            eff = self.effects[site]
            eff = eff.sum(0) if eff.dim() == 2 else eff
            rows += [(site, i, float(v)) for i, v in enumerate(eff.tolist())]
        rows.sort(key=lambda r: -abs(r[2]))
        return rows[:k] if k else rows

    def to_json(self, top: int = 200) -> dict[str, Any]:
        return {"task": self.task, "method": self.method, "steps": self.steps, "per_position": self.per_position,
                "sites": self.sites, "clean_metric": self.clean_metric, "corrupt_metric": self.corrupt_metric,
                "top_nodes": [{"site": s, "node": "error" if i == self.d_sae(s) else i, "effect": e}
                              for s, i, e in self.ranked(top)], **self.extra}


def _aggregate(per_row: torch.Tensor, keep: torch.Tensor, per_position: bool) -> torch.Tensor:
    """``[n, T, k]`` effects → mean over rows of the sum over kept positions (or of each position)."""
    per_row = per_row * keep[..., None].to(per_row.dtype)
    return per_row.mean(0) if per_position else per_row.sum(1).mean(0)


def _node_effects(f_grad, e_grad, f_delta, e_delta) -> torch.Tensor:
    """``[n, T, d_sae + 1]``: −grad · Δ per latent, and summed over the width for the error node."""
    return -torch.cat([f_grad * f_delta, (e_grad * e_delta).sum(-1, keepdim=True)], dim=-1)


def check_per_position(enc: EncodedTask, per_position: bool) -> None:
    if per_position and not enc.aligned:
        lengths = sorted(set(enc.attention_mask.sum(1).tolist()))
        raise SaeforgeError(f"per-position effects need every pair to have the same number of tokens; task "
                            f"{enc.task.name!r} has prompts of {lengths} tokens",
                            "sum over positions (--per-position false), or use prompts of one length")


@contextlib.contextmanager
def _no_weight_grads(lm) -> Iterator[None]:
    from saeforge.models.gradients import weights_without_grad

    with weights_without_grad(lm.model), torch.enable_grad():
        yield


def attribute_nodes(lm, enc: EncodedTask, saes: Sequence[CircuitSAE], *, method: str = "atp", steps: int = 10,
                    per_position: bool = False, batch_size: int = 16, progress: bool = False) -> NodeEffects:
    """Node effects of every latent and error node at every site of ``saes`` on the task (see the module doc)."""
    if method not in METHODS:
        raise SaeforgeError(f"unknown attribution method {method!r}", f"use one of {', '.join(METHODS)}")
    if steps < 1:
        raise SaeforgeError(f"integrated gradients needs at least 1 step, not {steps}", "pass --steps 10")
    check_per_position(enc, per_position)
    sums: dict[str, torch.Tensor] = {}
    clean_m, corrupt_m = [], []
    chunks = range(0, len(enc), batch_size)
    bar = _bar(progress, len(chunks) * (1 if method == "atp" else len(saes)), f"{method} attribution")
    for start in chunks:
        part = enc.rows(slice(start, start + batch_size))
        clean = read_nodes(lm, part.clean_ids, part.attention_mask, saes)
        corrupt = read_nodes(lm, part.corrupt_ids, part.attention_mask, saes)
        with torch.no_grad():
            mask = part.attention_mask.to(lm.device)
            clean_m.append(part.metric(lm.logits(part.clean_ids.to(lm.device), mask)).float().cpu())
            corrupt_m.append(part.metric(lm.logits(part.corrupt_ids.to(lm.device), mask)).float().cpu())
        if method == "atp":
            per_site = _atp(lm, part, saes, clean, corrupt)
            bar.update(1)
        else:
            per_site = {}
            for c in saes:
                per_site[c.site] = _ig_site(lm, part, c, clean, corrupt, steps)
                bar.update(1)
        keep = part.keep.to(lm.device)
        if per_position:  # every row has the full width here (aligned task)
            keep = keep[:, : enc.clean_ids.shape[1]]
        for site, eff in per_site.items():
            total = _aggregate(eff, keep, per_position).double().cpu() * len(part)
            sums[site] = sums[site] + total if site in sums else total
    bar.close()
    effects = {c.site: (sums[c.site] / len(enc)).float() for c in saes}
    return NodeEffects(enc.task.name, method, 1 if method == "atp" else steps, per_position,
                       [c.site for c in saes], effects, float(torch.cat(clean_m).mean()),
                       float(torch.cat(corrupt_m).mean()))


def _atp(lm, part: EncodedTask, saes, clean: NodeValues, corrupt: NodeValues) -> dict[str, torch.Tensor]:
    out = lm.spliced_forward(part.clean_ids.to(lm.device), {c.site: c.sae for c in saes},
                             attention_mask=part.attention_mask.to(lm.device))
    grads = out.gradients(part.metric(out.logits).sum())
    result = {}
    for c in saes:
        g_f, g_e = grads[c.site]
        (f0, e0), (f1, e1) = clean.values[c.site], corrupt.values[c.site]
        result[c.site] = _node_effects(g_f, g_e, f1 - f0, e1 - e0).detach()
    return result


def _ig_site(lm, part: EncodedTask, c: CircuitSAE, clean: NodeValues, corrupt: NodeValues, steps: int
             ) -> torch.Tensor:
    """IG effects of one site's nodes: the site's latents and error interpolated together, ``steps`` midpoints
    stacked as rows of one batch."""
    (f0, e0), (f1, e1) = clean.values[c.site], corrupt.values[c.site]
    n = len(part)
    alphas = ((torch.arange(steps, dtype=torch.float64) + 0.5) / steps).repeat_interleave(n).to(f0.device)
    f_alpha = (f0.repeat(steps, 1, 1) + alphas[:, None, None].to(f0.dtype) * (f1 - f0).repeat(steps, 1, 1))
    e_alpha = (e0.repeat(steps, 1, 1) + alphas[:, None, None].to(e0.dtype) * (e1 - e0).repeat(steps, 1, 1))
    f_alpha.requires_grad_(True)
    e_alpha.requires_grad_(True)
    keep = part.keep.repeat(steps, 1).to(lm.device)

    def splice(x):
        spliced = c.sae.decode(f_alpha).to(x.dtype) + e_alpha
        return torch.where(keep[..., None], spliced, x)

    ids = part.clean_ids.repeat(steps, 1).to(lm.device)
    mask = part.attention_mask.repeat(steps, 1).to(lm.device)
    with _no_weight_grads(lm), lm.edit({c.site: splice}):
        logits = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        metric = _stacked_metric(part, logits, steps)
        g_f, g_e = torch.autograd.grad(metric.sum(), (f_alpha, e_alpha))
    g_f = g_f.view(steps, n, *g_f.shape[1:]).mean(0)
    g_e = g_e.view(steps, n, *g_e.shape[1:]).mean(0)
    return _node_effects(g_f, g_e, f1 - f0, e1 - e0).detach()


def _stacked_metric(part: EncodedTask, logits: torch.Tensor, copies: int) -> torch.Tensor:
    """The metric of ``copies`` stacked copies of ``part``'s rows."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    last = part.last.repeat(copies).to(logits.device)
    at_last = logits[rows, last]
    good = part.clean_answers.repeat(copies).to(logits.device)[:, None]
    bad = part.corrupt_answers.repeat(copies).to(logits.device)[:, None]
    return (at_last.gather(-1, good) - at_last.gather(-1, bad)).squeeze(-1)


# ------------------------------------------------------------------------------------------------- exact patching
@torch.no_grad()
def exact_node_effects(lm, enc: EncodedTask, saes: Sequence[CircuitSAE], nodes: Sequence[tuple[str, int]], *,
                       position: int | None = None, batch_size: int = 16, progress: bool = False) -> torch.Tensor:
    """``[len(nodes)]`` exact effects: for each (site, node) (node ``d_sae`` = the error node), the mean over
    pairs of m(clean) − m(clean with that node at its corrupt value, at every kept position or only at
    ``position``). One forward per node and batch of pairs."""
    by_site = {c.site: c for c in saes}
    for site, node in nodes:
        if site not in by_site or not 0 <= node <= by_site[site].d_sae:
            raise SaeforgeError(f"no node {node} at site {site}", "give (site, index) with index ≤ d_sae")
    total = torch.zeros(len(nodes), dtype=torch.float64)
    bar = _bar(progress, len(nodes) * len(range(0, len(enc), batch_size)), "exact patching")
    for start in range(0, len(enc), batch_size):
        part = enc.rows(slice(start, start + batch_size))
        clean = read_nodes(lm, part.clean_ids, part.attention_mask, saes)
        corrupt = read_nodes(lm, part.corrupt_ids, part.attention_mask, saes)
        ids, mask = part.clean_ids.to(lm.device), part.attention_mask.to(lm.device)
        base = part.metric(lm.logits(ids, mask)).double()
        keep = part.keep.to(lm.device).clone()
        if position is not None:
            keep[:, :position] = False
            keep[:, position + 1:] = False
        for j, (site, node) in enumerate(nodes):
            c = by_site[site]
            (f0, e0), (f1, e1) = clean.values[site], corrupt.values[site]
            f, e = f0.clone(), e0
            if node == c.d_sae:
                e = torch.where(keep[..., None], e1, e0)
            else:
                f[..., node] = torch.where(keep, f1[..., node], f0[..., node])

            def patch(x, f=f, e=e, c=c):
                return torch.where(part.keep.to(x.device)[..., None], c.sae.decode(f).to(x.dtype) + e, x)

            with lm.edit({site: patch}):
                patched = part.metric(lm.logits(ids, mask)).double()
            total[j] += (base - patched).sum().cpu()
            bar.update(1)
    bar.close()
    return (total / len(enc)).float()


@torch.no_grad()
def exact_site_effect(lm, enc: EncodedTask, site: str) -> float:
    """m(clean) − m(clean with the whole activation at ``site`` taken from the corrupt prompt at every kept
    position), averaged over pairs: what the effects of all of a site's nodes add up to under integrated
    gradients."""
    ids, mask = enc.clean_ids.to(lm.device), enc.attention_mask.to(lm.device)
    corrupt = lm.read(enc.corrupt_ids.to(lm.device), [site], attention_mask=mask)[site]
    keep = enc.keep.to(lm.device)[..., None]
    base = enc.metric(lm.logits(ids, mask)).double()
    with lm.edit({site: lambda x: torch.where(keep, corrupt.to(x.dtype), x)}):
        patched = enc.metric(lm.logits(ids, mask)).double()
    return float((base - patched).mean())


def _bar(progress: bool, total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not progress, leave=False)
