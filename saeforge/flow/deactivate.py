"""Deactivating a residual feature through its matched predecessors (arXiv 2502.03032, §5 and App. A.2).

At the token t where target feature i of R_L fires with z_old, the predecessor features V chosen by a matching
strategy are rescaled at their sites (R_{L-1}, M_L, A_L): h_t ← h_t + (r − 1)·(a_t · V), with a_t their activations
computed from the live activation (so an edit upstream is seen downstream). Then z_new is read at R_L.
Metrics: activation change 1 − z_new/z_old, success (z_new = 0: the target no longer fires) and the relative change
of the LM loss on the tokens from t on.

Strategies: ``top1`` (the best decoder match at each predecessor site), ``top5`` (the five best), ``random_top5``
(one of the five at random), ``permutation`` (the one-to-one Hungarian partner), ``pearson`` (the best match by
activation correlation; needs ``saeforge flow match --methods pearson`` first) and ``random`` (a control: as many
randomly chosen *active* features at each site as ``top1`` has active ones there).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from simple_parsing.helpers import field

from saeforge.errors import SaeforgeError
from saeforge.options import DeviceOptions, RunModelOptions, flat_options
from saeforge.flow.data import with_threads
from saeforge.flow.suite import open_suite, parse_layers, site_name

STRATEGIES = ("top1", "top5", "random_top5", "permutation", "pearson", "random")
DEFAULT_STRATEGIES = ("top1", "top5", "random_top5", "permutation", "random")
# Table 1 of arXiv 2502.03032: mean activation change, success rate
PAPER_TABLE = {"top1": (0.75, 0.65), "pearson": (0.74, 0.65)}


@flat_options
@dataclass(frozen=True)
class DeactivateConfig:
    """Deactivation experiment: rescale a residual feature's matched predecessors by r at the token where it fires,
    and measure the change of its activation (1 - z_new/z_old), the success rate (it stops firing) and the relative
    change of the LM loss, for several matching strategies and a random control. Writes SUITE/flow/deactivate.json."""

    suite: str = field(default="", positional=True)
    """The suite."""
    layers: str = ""
    """Layers of the target residual features (e.g. 12); empty: every layer with all its predecessors."""
    strategies: tuple[str, ...] = DEFAULT_STRATEGIES
    """Matching strategies: top1, top5, random_top5, permutation, pearson (after flow match --methods pearson),
    random (control)."""
    r: float = 0.0
    """Rescaling factor of the predecessors (0 removes them; negative flips them)."""
    corpus: str = "embedded:validation"
    """Text the tokens come from."""
    contexts: int = 20
    """Contexts sampled (the paper: 35 texts)."""
    tokens_per_context: int = 3
    """Random tokens per context (the paper: 5)."""
    max_features: int = 10
    """Target features per token at most (the most active ones with an active predecessor; the paper: 25)."""
    context_length: int = 64
    """Tokens per context."""
    seed: int = 0
    """Seed for the token sample and the random strategies."""
    model_options: RunModelOptions = field(default_factory=RunModelOptions)
    """The model the SAEs read."""
    device_options: DeviceOptions = field(default_factory=DeviceOptions)
    """Where the model runs."""
    out: str = ""
    """Output folder; empty: SUITE/flow/."""
    threads: int = 0
    """CPU threads for PyTorch; 0: automatic (fewer when other work keeps the CPUs busy)."""


def strategy_sets(strategy: str, i: int, tables: dict, active: dict[str, torch.Tensor], gen: torch.Generator
                  ) -> dict[str, list[int]]:
    """The predecessor features of target ``i`` that ``strategy`` rescales, per predecessor key (R, M, A).
    ``tables[key]``: {"top1": [d], "top5": [d, 5], "permutation": [d]} indices (−1: none); ``active[key]``: bool [d_pred]
    at the token."""
    out: dict[str, list[int]] = {}
    for key, t in tables.items():
        if strategy == "top1":
            js = [int(t["top1"][i])]
        elif strategy == "top5":
            js = [int(j) for j in t["top5"][i]]
        elif strategy == "random_top5":
            cand = [int(j) for j in t["top5"][i] if j >= 0]
            js = [cand[int(torch.randint(len(cand), (1,), generator=gen))]] if cand else []
        elif strategy in ("permutation", "pearson"):
            js = [int(t[strategy][i])]
        elif strategy == "random":
            n = int(t["top1"][i] >= 0 and bool(active[key][t["top1"][i]]))
            pool = torch.nonzero(active[key]).flatten()
            pool = pool[pool != t["top1"][i]]
            js = pool[torch.randperm(len(pool), generator=gen)[:n]].tolist() if n else []
        else:
            raise SaeforgeError(f"unknown strategy {strategy!r}", f"use {', '.join(STRATEGIES)}")
        out[key] = [j for j in js if j >= 0]
    return out


def _tables(suite, L: int, strategies: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
    from saeforge.flow.links import load_matches
    from saeforge.flow.matching import predecessor_matches

    target = site_name(L, "resid_post")
    preds = {"R": site_name(L - 1, "resid_post"), "M": site_name(L, "mlp_out"), "A": site_name(L, "attn_out")}
    out: dict[str, dict[str, torch.Tensor]] = {k: {} for k in preds}
    needed = {"top1": ("top1", 1), "top5": ("topk", 5)}
    if "permutation" in strategies:
        needed["permutation"] = ("permutation", 1)
    if "pearson" in strategies:
        needed["pearson"] = ("pearson", 1)
    for name, (method, k) in needed.items():
        stored = {key: load_matches(suite.path, target, p, method) for key, p in preds.items()}
        if method == "pearson" and any(m is None for m in stored.values()):
            raise SaeforgeError(f"no Pearson matches stored for layer {L}",
                                f"saeforge flow match {suite.path} --methods top1 pearson --layers {L}")
        if any(m is None or m.k < k for m in stored.values()):
            stored = predecessor_matches(suite, L, method, k=k)
        for key, m in stored.items():
            out[key][name] = m.indices[:, 0] if k == 1 else m.indices[:, :k]
    return out


@torch.no_grad()
def deactivate_layer(lm, bound: dict, L: int, ids: torch.Tensor, positions: torch.Tensor, tables: dict, *,
                     strategies: tuple[str, ...], r: float, max_features: int, gen: torch.Generator,
                     progress=None) -> list[dict]:
    """One record per (token, target feature, strategy): z_old, z_new, set size, loss change."""
    target_site = site_name(L, "resid_post")
    pred_sites = {"R": site_name(L - 1, "resid_post"), "M": site_name(L, "mlp_out"), "A": site_name(L, "attn_out")}
    records = []
    for c in range(ids.shape[0]):
        for t in positions[c].tolist():
            row = ids[c:c + 1, :]
            with lm.record([target_site, *pred_sites.values()]) as captured:
                clean_logits = lm.logits(row).float()
            enc = {k: bound[s].sae.encode(captured[s][0, t].float()) for k, s in pred_sites.items()}
            z_clean = bound[target_site].sae.encode(captured[target_site][0, t].float())
            active = {k: v > 0 for k, v in enc.items()}
            # targets: active features with at least one active top-1 predecessor (not "from nowhere")
            feats = torch.nonzero(z_clean > 0).flatten()
            has_pred = torch.zeros(len(feats), dtype=torch.bool)
            for k in pred_sites:
                j = tables[k]["top1"][feats]
                has_pred |= (j >= 0) & active[k][j.clamp_min(0)]
            feats = feats[has_pred]
            feats = feats[z_clean[feats].argsort(descending=True)][:max_features].tolist()
            if not feats:
                continue
            jobs = [(i, s, strategy_sets(s, i, tables, active, gen)) for i in feats for s in strategies]
            n = len(jobs)
            masks = {k: torch.zeros(n, bound[s].d_sae, device=lm.device) for k, s in pred_sites.items()}
            for b, (_, _, sets) in enumerate(jobs):
                for k, js in sets.items():
                    if js:
                        masks[k][b, js] = 1.0

            def edit_for(key: str):
                sae = bound[pred_sites[key]].sae
                mask = masks[key]

                def fn(x: torch.Tensor) -> torch.Tensor:
                    x = x.clone()
                    a = sae.encode(x[:, t].float()) * mask  # the chosen predecessors' live activations
                    x[:, t] += ((r - 1.0) * (a @ sae.W_dec.float())).to(x.dtype)
                    return x
                return fn

            batch = row.expand(n, -1)
            with lm.edit({pred_sites[k]: edit_for(k) for k in pred_sites}), lm.record([target_site]) as cap:
                logits = lm.logits(batch).float()
            z_new = bound[target_site].sae.encode(cap[target_site][:, t].float())
            loss_clean = _loss_from(clean_logits, row, t)
            loss_new = _loss_from(logits, batch, t)
            for b, (i, s, sets) in enumerate(jobs):
                zo, zn = float(z_clean[i]), float(z_new[b, i])
                records.append({"layer": L, "context": c, "token": t, "feature": i, "strategy": s, "z_old": zo,
                                "z_new": zn, "change": 1.0 - zn / zo, "deactivated": zn <= 0.0,
                                "set_size": sum(len(v) for v in sets.values()),
                                "loss_change": float((loss_new[b] - loss_clean[0]) / loss_clean[0])})
            if progress is not None:
                progress.update(1)
    return records


def _loss_from(logits: torch.Tensor, ids: torch.Tensor, t: int) -> torch.Tensor:
    """Mean next-token cross-entropy over the predictions made at positions t..T-2, per row."""
    pred = logits[:, t:-1]
    target = ids[:, t + 1:].to(pred.device)
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="none").view(
        pred.shape[0], -1).mean(1)


def summarise(records: list[dict], strategies: tuple[str, ...]) -> dict[str, dict[str, float]]:
    out = {}
    for s in strategies:
        rs = [r for r in records if r["strategy"] == s]
        if not rs:
            continue
        out[s] = {"n": len(rs), "mean_change": sum(r["change"] for r in rs) / len(rs),
                  "success_rate": sum(r["deactivated"] for r in rs) / len(rs),
                  "mean_loss_change": sum(r["loss_change"] for r in rs) / len(rs),
                  "mean_set_size": sum(r["set_size"] for r in rs) / len(rs)}
    return out


def format_table(summary: dict[str, dict[str, float]]) -> str:
    lines = ["| strategy | targets | mean activation change | success rate | LM loss change | features rescaled | "
             "paper (change, success) |", "|---|---:|---:|---:|---:|---:|---|"]
    for s, m in summary.items():
        paper = PAPER_TABLE.get(s)
        lines.append(f"| {s} | {m['n']} | {m['mean_change']:.2f} | {m['success_rate']:.0%} | "
                     f"{m['mean_loss_change']:+.1%} | {m['mean_set_size']:.1f} | "
                     + (f"{paper[0]:.2f}, {paper[1]:.0%}" if paper else "—") + " |")
    return "\n".join(lines)


@with_threads
def run_deactivate(cfg: DeactivateConfig) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from saeforge.flow.data import sample_tokens
    from saeforge.utils.atomic import atomic_write_json
    from saeforge.utils.locking import exclusive_lock

    bad = [s for s in cfg.strategies if s not in STRATEGIES]
    if bad:
        raise SaeforgeError(f"unknown strategy {', '.join(bad)}", f"use {', '.join(STRATEGIES)}")
    if not math.isfinite(cfg.r):
        raise SaeforgeError(f"r must be a finite number, got {cfg.r}", "pass e.g. --r 0")
    if cfg.max_features < 1:
        raise SaeforgeError("--max-features must be at least 1", "pass e.g. --max-features 10")
    suite = open_suite(cfg.suite)
    layers = parse_layers(cfg.layers) if cfg.layers else suite.analysable_layers()
    if not layers:
        raise SaeforgeError(f"the suite {cfg.suite} has no layer with R_L, M_L, A_L and R_(L-1)",
                            "train a suite over a layer range: saeforge flow suite --layers 8-12")
    suite.require(layers)
    tables = {L: _tables(suite, L, cfg.strategies) for L in layers}
    out = Path(cfg.out) if cfg.out else Path(cfg.suite) / "flow"
    with exclusive_lock(out, "saeforge flow deactivate"):  # one writer per output folder, refused before the slow work
        lm = suite.load_model(cfg.model, cfg.device)
        bound = suite.bind(lm)
        sample = sample_tokens(lm, cfg.corpus, contexts=cfg.contexts, context_length=cfg.context_length,
                               per_context=cfg.tokens_per_context, seed=cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        t0 = time.time()
        records: list[dict] = []
        with tqdm(total=len(layers) * sample.positions.numel(), unit="token", desc="deactivating") as bar:
            for L in layers:
                records += deactivate_layer(lm, bound, L, sample.ids, sample.positions, tables[L],
                                            strategies=cfg.strategies, r=cfg.r, max_features=cfg.max_features, gen=gen,
                                            progress=bar)
        summary = summarise(records, cfg.strategies)
        if not summary:
            raise SaeforgeError("no target feature had an active matched predecessor on the sampled tokens",
                                "sample more text: --contexts 100")
        result = {"layers": layers, "r": cfg.r, "summary": summary, "seconds": time.time() - t0,
                  "tokens": int(sample.positions.numel()), "records": records}
        atomic_write_json(out / "deactivate.json", result)
        print(format_table(summary))
        print(f"written: {out / 'deactivate.json'}")
        return result
