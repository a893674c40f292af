"""A dictionary evaluated as a replacement for what it writes: transcoders, skip transcoders, cross-layer transcoders
and crosscoders.

A transcoder reading ``layers.L.mlp_in`` and writing ``layers.L.mlp_out`` replaces that MLP; a cross-layer transcoder
over layers l0..l1 replaces all their MLPs at once. The *replaced* forward pass runs the model with every site the
dictionary writes taken from the dictionary, computed from what it reads **in that same pass**, layer by layer:
layer j's MLP output becomes ``Σ_{i<=j} f_i W_dec[i→j] + b_dec[j]`` with each ``f_i`` encoded from layer i's MLP
input as the replaced model computed it, so errors compound as they would in a replacement model (Ameisen et al.,
"Circuit Tracing", 2025). Only kept positions are replaced (BOS and special tokens keep their clean values, as in
``saeforge eval``), through ``LanguageModel.edit`` (the one intervention mechanism).

Figures (:func:`evaluate_replacement`):

- per written site: FVU of the dictionary's output computed from the *clean* reads against the clean activation
  (pooled, dataset mean; :class:`~saeforge.evals.reconstruction.ReconstructionStats`), with the L0 of the latents that
  write it (a CLT layer: that layer's own features);
- CE loss and KL of the replaced forward against the clean model (``ce_loss_sae``, ``kl_div``), and the baselines
  with the written sites zero-ablated and mean-ablated (``ce_recovered`` = (CE_zero − CE_replaced) / (CE_zero −
  CE_clean)), with the keys of :class:`~saeforge.evals.downstream.DownstreamStats`.

A crosscoder reads and writes the same sites and encodes all of them at once (acausal), so it cannot run inside one
forward pass: its output for every site is computed from the clean activations and spliced in at all its sites
together (the ``sae`` figures), and each site alone (``per_site``: CE loss and KL with only that site replaced).

A perfect replacement gives the clean figures exactly (FVU 0, CE equal to the clean CE, KL 0); the tests check
that with exact dictionaries, and check the compounding against an implementation that swaps the MLP modules.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor

from saeforge.errors import SaeforgeError
from saeforge.evals.downstream import DownstreamStats
from saeforge.evals.reconstruction import ReconstructionStats

__all__ = ["LayerwiseDictionary", "evaluate_replacement", "replacement_edits", "site_means"]


class LayerwiseDictionary:
    """A dictionary that reads ``n`` sites and writes ``n`` sites, run one layer at a time in forward order.

    A cross-layer transcoder has this interface itself (``encode_layer``, ``decode_layer``, ``skip_layer``); a
    transcoder is the one-layer case (its forward adds the skip term).
    """

    def __init__(self, sae: Any, n_reads: int, n_writes: int):
        self.sae = sae
        self.layerwise = hasattr(sae, "encode_layer") and hasattr(sae, "decode_layer")
        if not self.layerwise and (n_reads, n_writes) != (1, 1):
            raise SaeforgeError(f"a {type(sae).__name__} reading {n_reads} site(s) and writing {n_writes} cannot "
                                "run inside one forward pass", "evaluate it as a crosscoder (reads == writes)")
        if self.layerwise and n_reads != n_writes:
            raise SaeforgeError(f"a cross-layer transcoder reads one site per layer and writes one, got {n_reads} "
                                f"and {n_writes}", "bind it to as many written sites as read sites")
        self.n = n_writes

    def latents(self, i: int, x: Tensor) -> Tensor:
        """The latents read at site i ([n, d] -> [n, F])."""
        return self.sae.encode_layer(i, x) if self.layerwise else self.sae.encode(x)

    def output(self, j: int, latents: Sequence[Tensor], inputs: Sequence[Tensor]) -> Tensor:
        """What it writes at site j from the latents of sites 0..j (and their inputs, for a skip connection)."""
        if not self.layerwise:
            return self.sae(inputs[0])
        out = self.sae.decode_layer(j, latents)
        if getattr(self.sae.cfg, "skip_connection", False):
            out = out + self.sae.skip_layer(j, inputs[j])
        return out


def _sites(lm, sites: Sequence[Any]) -> list:
    return [lm.site(s) if isinstance(s, str) else s for s in sites]


def replacement_edits(lm, dictionary: Any, reads: Sequence[Any], writes: Sequence[Any], keep: Tensor, *,
                      mode: str = "sae", means: dict[str, Tensor] | None = None) -> dict:
    """The ``{site: edit}`` that run the replaced forward pass (``mode="sae"``) of a transcoder or CLT, or ablate
    what it writes (``"zero"``, ``"mean"`` with ``means[site]``), at the positions of ``keep`` [batch, seq]."""
    reads, writes = _sites(lm, reads), _sites(lm, writes)
    layered = LayerwiseDictionary(dictionary, len(reads), len(writes)) if mode == "sae" else None
    inputs: dict[int, Tensor] = {}
    latents: dict[int, Tensor] = {}

    def check(x: Tensor, ctx) -> torch.Tensor:
        if tuple(keep.shape) != tuple(x.shape[:2]):
            raise SaeforgeError(f"the replacement at {ctx.site.name} was built for a batch of shape "
                                f"{tuple(keep.shape)} but the forward pass has {tuple(x.shape[:2])}",
                                "build the edits with the keep mask of the batch they run on")
        return keep.to(x.device)

    def read(i: int) -> Callable:
        def edit(x: Tensor, ctx) -> None:
            m = check(x, ctx)
            inputs[i] = x[m].float()
            latents[i] = layered.latents(i, inputs[i])
            return None

        return edit

    def write(j: int) -> Callable:
        def edit(x: Tensor, ctx) -> Tensor:
            m = check(x, ctx)
            out = x.clone()
            if mode == "sae":
                missing = [reads[i].name for i in range(j + 1 if layered.layerwise else 1) if i not in inputs]
                if missing:
                    raise SaeforgeError(f"{writes[j].name} was reached before {', '.join(missing)}: the dictionary "
                                        "would write a site the model computes before one it reads",
                                        "bind it to sites in forward order (reads before writes)")
                new = layered.output(j, [latents[i] for i in range(j + 1)] if layered.layerwise else [],
                                     [inputs[i] for i in sorted(inputs)])
            elif mode == "zero":
                new = torch.zeros_like(x[m])
            elif mode == "mean":
                new = means[writes[j].name].to(x.dtype).expand_as(x[m])
            else:
                raise ValueError(mode)
            out[m] = new.to(x.dtype)
            return out

        return edit

    edits: dict = {}
    if mode == "sae":
        edits.update({site: read(i) for i, site in enumerate(reads)})
    for j, site in enumerate(writes):
        if site in edits:
            raise SaeforgeError(f"{site.name} is both read and written", "evaluate a crosscoder with reads == writes")
        edits[site] = write(j)
    return edits


@torch.no_grad()
def site_means(lm, batches: Iterable[tuple[Tensor, Tensor]], sites: Sequence[Any]) -> dict[str, Tensor]:
    """The mean activation of each site over the kept positions of ``batches`` (for the mean-ablation baseline)."""
    sites = _sites(lm, sites)
    sums: dict[str, Tensor] = {}
    count = 0
    for ids, keep in batches:
        acts = lm.read(ids, sites)
        k = keep.to(lm.device)
        for s in sites:
            a = acts[s.name][k].double().sum(0)
            sums[s.name] = a if s.name not in sums else sums[s.name] + a
        count += int(keep.sum())
    if count == 0:
        raise SaeforgeError("no kept positions to average over", "evaluate on more text")
    return {name: (v / count).float() for name, v in sums.items()}


def _splits(t: Tensor, widths: Sequence[int]) -> list[Tensor]:
    return list(t.split(list(widths), dim=-1))


@torch.no_grad()
def evaluate_replacement(lm, dictionary: Any, reads: Sequence[Any], writes: Sequence[Any],
                         batches: Sequence[tuple[Tensor, Tensor]], *, means: dict[str, Tensor] | None = None,
                         baselines: bool = True) -> dict[str, Any]:
    """Evaluate ``dictionary`` (bound to ``reads`` -> ``writes``, sites or their names) as a replacement on
    ``batches`` of ``(input_ids [B, T], keep [B, T])``. ``means``: per written site (computed here when None and
    ``baselines``). Returns ``{"kind", "reads", "writes", "sites": {site: reconstruction figures}, **downstream}``
    and, for a crosscoder, ``per_site``."""
    from saeforge.runs import SiteBinding, check_site_order

    reads, writes = _sites(lm, reads), _sites(lm, writes)
    binding = SiteBinding(tuple(s.name for s in reads), tuple(s.name for s in writes))
    check_site_order(binding, where=f"{type(dictionary).__name__}")
    acausal = binding.reads == binding.writes
    if baselines and means is None:
        means = site_means(lm, batches, writes)
    widths_in, widths_out = [s.d for s in reads], [s.d for s in writes]
    layered = None if acausal else LayerwiseDictionary(dictionary, len(reads), len(writes))
    n_features = dictionary.cfg.d_sae // (len(writes) if layered is not None and layered.layerwise else 1)
    recon = {s.name: ReconstructionStats(s.d, n_features, lm.device) for s in writes}
    down = DownstreamStats()
    per_site = {s.name: DownstreamStats() for s in writes} if acausal and len(writes) > 1 else {}
    modes = DownstreamStats.MODES if baselines else ("sae",)
    for ids, keep in batches:
        sites = list(dict.fromkeys(reads + writes))
        with lm.record(sites) as captured:
            clean = lm.logits(ids)
        down.update_clean(ids, keep, clean)
        for stats in per_site.values():
            stats.update_clean(ids, keep, clean)
        k = keep.to(lm.device)
        xs = [captured[s.name][k].float() for s in reads]
        ys = [captured[s.name][k].float() for s in writes]
        if acausal:
            f = dictionary.encode(torch.cat(xs, -1))
            outs = _splits(dictionary(torch.cat(xs, -1)), widths_out)
            fs = [f] * len(writes)
        else:
            fs = [layered.latents(i, x) for i, x in enumerate(xs)]
            outs = [layered.output(j, fs, xs) for j in range(len(writes))]
            if not layered.layerwise:
                fs = [fs[0]]
        for j, s in enumerate(writes):
            recon[s.name].update(ys[j], outs[j], fs[j] if j < len(fs) else fs[-1])
        for mode in modes:
            if acausal and mode == "sae":
                edits = {s: _splice_values(keep, outs[j]) for j, s in enumerate(writes)}
            else:
                edits = replacement_edits(lm, dictionary, reads, writes, keep, mode=mode, means=means)
            with lm.edit(edits):
                down.update(mode, lm.logits(ids))
        for j, s in enumerate(writes if per_site else []):
            with lm.edit({s: _splice_values(keep, outs[j])}):
                per_site[s.name].update("sae", lm.logits(ids))
    result: dict[str, Any] = {"kind": binding.kind, "reads": list(binding.reads), "writes": list(binding.writes),
                              "sites": {name: _site_figures(r.result()) for name, r in recon.items()}}
    figures = down.result()
    if not baselines:
        figures = {k: v for k, v in figures.items() if "ablation" not in k and "recovered" not in k
                   and k != "kl_score"}
    result.update(figures)
    if per_site:
        result["per_site"] = {name: {k: v for k, v in st.result().items()
                                     if k in ("ce_loss_sae", "delta_lm_loss", "kl_div")}
                              for name, st in per_site.items()}
    fvus = [r["fvu"] for r in result["sites"].values()]
    result["fvu"] = sum(fvus) / len(fvus)
    return result


def _splice_values(keep: Tensor, values: Tensor) -> Callable:
    """An edit putting precomputed ``values`` [n_kept, d] at the kept positions."""

    def edit(x: Tensor) -> Tensor:
        out = x.clone()
        out[keep.to(x.device)] = values.to(x.dtype)
        return out

    return edit


def _site_figures(r: dict[str, Any]) -> dict[str, Any]:
    keep = ("n_tokens", "fvu", "explained_variance", "mse", "cosine_similarity", "relative_norm", "l0",
            "dead_fraction")
    return {k: r[k] for k in keep if k in r}
