"""CircuitLasso against attribution on the built-in tasks (saeforge.circuits.lasso; docs/circuits.md): for each task,
each source of the regressions between sites (the task's prompts, and with ``--cache`` the tokens of an activation
cache: many tokens of text, no interventions) and each L1 penalty, the CircuitLasso circuit (features; every error
node kept), the attribution circuit with as many features (top features by |attribution-patching effect|, every
error node kept), random circuits of that size; faithfulness under mean ablation, the overlap of the node sets, and
the wall time of each method (CircuitLasso: its pass over the prompts and the cache plus the solve; attribution:
attribution patching of every node).

    .venv/bin/python benchmarks/circuit_lasso.py RUN --tasks country-capital,induction --pairs 16 --layers 12-13 \
        --cache CACHE --cache-tokens 32768

Writes ``benchmarks/results/circuit_lasso.json``.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from benchmarks.common import machine, write_result
from saeforge.circuits.attribution import attribute_nodes, circuit_saes
from saeforge.circuits.circuit import Evaluator, select_nodes
from saeforge.circuits.lasso import lasso_circuit, lasso_data, overlap
from saeforge.circuits.tasks import encode_task, load_task
from saeforge.data.prompts import PromptEncoder
from saeforge.runs import load_run, site_position
from saeforge.utils.threads import busy_cpus


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--tasks", default="country-capital")
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--layers", default="12-13")
    ap.add_argument("--lams", default="0.3,0.15")
    ap.add_argument("--cache", default="", help="an activation cache of the SAEs' sites (saeforge cache)")
    ap.add_argument("--cache-tokens", type=int, default=32768)
    ap.add_argument("--random-draws", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = load_run(args.run, device="cpu")
    lm = run.lm
    lo, hi = (int(x) for x in args.layers.split("-"))
    saes = [c for c in circuit_saes(lm, run.saes) if lo <= site_position(c.site)[0] <= hi]
    cache = None
    if args.cache:
        from saeforge.data.activation_cache import ActivationCache

        cache = ActivationCache(args.cache)
    tasks = []
    for name in args.tasks.split(","):
        enc = encode_task(load_task(name).head(args.pairs), lm, PromptEncoder(lm, run.token_policy()))
        t0 = time.perf_counter()
        effects = attribute_nodes(lm, enc, saes, method="atp", batch_size=args.pairs)
        t_atp = time.perf_counter() - t0
        ev = Evaluator(lm, enc, saes, batch_size=args.pairs)
        sources = {"task": lasso_data(lm, enc, saes, batch_size=args.pairs)}
        if cache is not None:
            sources["cache"] = lasso_data(lm, enc, saes, batch_size=args.pairs, cache=cache,
                                          cache_tokens=args.cache_tokens)
        circuits = {}
        rows = []
        for lam in (float(x) for x in args.lams.split(",")):
            for source, data in sources.items():
                lasso = lasso_circuit(lm, enc, saes, lam=lam, data=data)
                circuits[(source, lam)] = lasso.nodes
                n = sum(len(v) for v in lasso.nodes.values())
                attribution = select_nodes(effects, top=n, errors=False) if n else {c.site: [] for c in saes}
                lasso_eval = ev.evaluate(lasso.with_error_nodes(saes), random_draws=args.random_draws)
                attr_eval = ev.evaluate({c.site: attribution[c.site] + [c.d_sae] for c in saes}, random_draws=0)
                rows.append({"lam": lam, "source": source, "tokens": lasso.tokens, "features": n,
                             "lasso_seconds": lasso.seconds, "lasso_data_seconds": data.seconds,
                             "atp_seconds": t_atp,
                             "lasso": {k: lasso_eval[k] for k in ("faithfulness", "completeness")},
                             "attribution": {k: attr_eval[k] for k in ("faithfulness", "completeness")},
                             "random_faithfulness_mean": lasso_eval["random_faithfulness_mean"],
                             "random_faithfulness_std": lasso_eval["random_faithfulness_std"],
                             "empty": ev.faithfulness({c.site: [c.d_sae] for c in saes}),
                             "overlap_with_attribution": overlap(lasso.nodes, attribution),
                             "lasso_nodes_per_site": {s: len(v) for s, v in lasso.nodes.items()},
                             "busy_cpus": round(busy_cpus(0.5), 2), "load_1min": os.getloadavg()[0]})
                print(name, {k: v for k, v in rows[-1].items() if k != "lasso_nodes_per_site"}, flush=True)
            if cache is not None:
                rows[-1]["overlap_cache_vs_task"] = overlap(circuits[("cache", lam)], circuits[("task", lam)])
        tasks.append({"task": name, "pairs": len(enc), "m_model": ev.m_model, "m_empty": ev.m_empty, "rows": rows})
    write_result("circuit_lasso", {"sites": [c.site for c in saes], "cache": args.cache,
                                   "cache_tokens": args.cache_tokens, "tasks": tasks, "machine": machine()})


if __name__ == "__main__":
    main()
