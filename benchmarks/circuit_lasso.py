"""CircuitLasso against attribution on one task (saeforge.circuits.lasso; docs/circuits.md): for each L1 penalty,
the CircuitLasso circuit (features; every error node kept), the attribution circuit with as many features per
total (top features by |effect|, every error node kept), random circuits of that size; faithfulness under mean
ablation, the overlap of the two node sets, and the wall time of each method.

    .venv/bin/python benchmarks/circuit_lasso.py RUN --task country-capital --pairs 16 --layers 12-13

Writes ``benchmarks/results/circuit_lasso.json``.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import machine, write_result
from saeforge.circuits.attribution import attribute_nodes, circuit_saes
from saeforge.circuits.circuit import Evaluator, select_nodes
from saeforge.circuits.lasso import lasso_circuit, overlap
from saeforge.circuits.tasks import encode_task, load_task
from saeforge.data.prompts import PromptEncoder
from saeforge.runs import load_run, site_position


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--task", default="country-capital")
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--layers", default="12-13")
    ap.add_argument("--lams", default="0.2,0.1,0.05")
    ap.add_argument("--random-draws", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = load_run(args.run, device="cpu")
    lm = run.lm
    lo, hi = (int(x) for x in args.layers.split("-"))
    saes = [c for c in circuit_saes(lm, run.saes) if lo <= site_position(c.site)[0] <= hi]
    enc = encode_task(load_task(args.task).head(args.pairs), lm, PromptEncoder(lm, run.token_policy()))

    t0 = time.perf_counter()
    effects = attribute_nodes(lm, enc, saes, method="atp", batch_size=args.pairs)
    t_atp = time.perf_counter() - t0
    ev = Evaluator(lm, enc, saes, batch_size=args.pairs)
    rows = []
    for lam in (float(x) for x in args.lams.split(",")):
        lasso = lasso_circuit(lm, enc, saes, lam=lam)
        n = sum(len(v) for v in lasso.nodes.values())
        attribution = select_nodes(effects, top=n, errors=False) if n else {c.site: [] for c in saes}
        with_errors = {c.site: attribution[c.site] + [c.d_sae] for c in saes}
        lasso_eval = ev.evaluate(lasso.with_error_nodes(saes), random_draws=args.random_draws)
        attr_eval = ev.evaluate(with_errors, random_draws=0)
        rows.append({"lam": lam, "features": n, "lasso_seconds": lasso.seconds, "atp_seconds": t_atp,
                     "lasso": {k: lasso_eval[k] for k in ("faithfulness", "completeness")},
                     "attribution": {k: attr_eval[k] for k in ("faithfulness", "completeness")},
                     "random_faithfulness_mean": lasso_eval["random_faithfulness_mean"],
                     "random_faithfulness_std": lasso_eval["random_faithfulness_std"],
                     "overlap": overlap(lasso.nodes, attribution),
                     "lasso_nodes_per_site": {s: len(v) for s, v in lasso.nodes.items()}})
        print(rows[-1])
    write_result("circuit_lasso", {"task": args.task, "pairs": len(enc), "sites": [c.site for c in saes],
                                   "m_model": ev.m_model, "m_empty": ev.m_empty, "rows": rows,
                                   "machine": machine()})


if __name__ == "__main__":
    main()
