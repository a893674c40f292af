"""Node attribution on the real model against exact activation patching (saeforge.circuits.attribution;
docs/circuits.md).

On the embedded model with a suite of SAEs (a run directory, e.g. 15 SAEs at layers 9-13), for one task:

1. attribution patching (one forward + backward) and integrated gradients over every node of the chosen sites,
   timed;
2. exact patching of a sample of nodes — the ``--top`` largest by |attribution patching| and ``--random`` others
   drawn among the nodes active on the task — timed per node, and the time to patch every node extrapolated;
3. the Pearson and Spearman correlations of both estimates with the exact effects on the sample.

    .venv/bin/python benchmarks/circuit_attribution.py RUN --task country-capital --pairs 8 --sites 11-13

Writes ``benchmarks/results/circuit_attribution.json``.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import machine, peak_rss_mb, write_result
from saeforge.circuits.attribution import attribute_nodes, circuit_saes, exact_node_effects
from saeforge.circuits.tasks import encode_task, load_task
from saeforge.data.prompts import PromptEncoder
from saeforge.runs import load_run, site_position


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--task", default="country-capital")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--sites", default="", help="layers to keep, e.g. 11-13 (default: every SAE of the run)")
    ap.add_argument("--steps", type=int, default=4, help="integrated-gradient steps")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--random", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    run = load_run(args.run, device="cpu")
    lm = run.lm
    saes = circuit_saes(lm, run.saes)
    if args.sites:
        lo, hi = (int(x) for x in args.sites.split("-"))
        saes = [c for c in saes if lo <= site_position(c.site)[0] <= hi]
    enc = encode_task(load_task(args.task).head(args.pairs), lm, PromptEncoder(lm, run.token_policy()))

    t0 = time.perf_counter()
    atp = attribute_nodes(lm, enc, saes, method="atp", batch_size=args.pairs)
    t_atp = time.perf_counter() - t0
    t0 = time.perf_counter()
    ig = attribute_nodes(lm, enc, saes, method="ig", steps=args.steps, batch_size=args.pairs)
    t_ig = time.perf_counter() - t0

    ranked = atp.ranked()
    top = [(s, i) for s, i, _ in ranked[: args.top]]
    rest = [(s, i) for s, i, e in ranked[args.top:] if e != 0.0]  # nodes the corrupt prompts move at all
    g = torch.Generator().manual_seed(0)
    sample = top + [rest[j] for j in torch.randperm(len(rest), generator=g)[: args.random].tolist()]
    t0 = time.perf_counter()
    exact = exact_node_effects(lm, enc, saes, sample, batch_size=args.pairs)
    t_exact = time.perf_counter() - t0
    n_nodes = sum(c.d_sae + 1 for c in saes)

    def estimate(effects):
        return torch.tensor([float(effects.effects[s][i]) for s, i in sample])

    features = torch.tensor([i != next(c.d_sae for c in saes if c.site == s) for s, i in sample])
    result = {
        "task": args.task, "pairs": len(enc), "tokens_per_prompt": int(enc.clean_ids.shape[1]),
        "sites": [c.site for c in saes], "nodes": n_nodes, "ig_steps": args.steps,
        "clean_logit_diff": atp.clean_metric, "corrupt_logit_diff": atp.corrupt_metric,
        "seconds": {"atp": t_atp, "ig": t_ig, "exact_sample": t_exact,
                    "exact_per_node": t_exact / len(sample), "exact_all_nodes_extrapolated":
                        t_exact / len(sample) * n_nodes},
        "speedup_atp_vs_exact_all": t_exact / len(sample) * n_nodes / t_atp,
        "sample": len(sample),
        "correlation": {
            "atp_pearson": pearson(estimate(atp), exact), "atp_spearman": spearman(estimate(atp), exact),
            "ig_pearson": pearson(estimate(ig), exact), "ig_spearman": spearman(estimate(ig), exact),
            "atp_pearson_features_only": pearson(estimate(atp)[features], exact[features]),
            "ig_pearson_features_only": pearson(estimate(ig)[features], exact[features]),
        },
        "nodes_sampled": [{"site": s, "node": i, "exact": float(x), "atp": float(a), "ig": float(b)}
                          for (s, i), x, a, b in zip(sample, exact, estimate(atp), estimate(ig))],
        "peak_rss_mb": peak_rss_mb(), "machine": machine(),
    }
    print({k: v for k, v in result.items() if k not in ("nodes_sampled", "machine")})
    write_result("circuit_attribution", result)


if __name__ == "__main__":
    main()
