"""Ground truth for feature trees (docs/hierarchy.md): on synthetic data whose tree is known
(saeforge.hierarchy.synthetic: 16 roots with 4 children each in R^64, a child fires only with its parent), an HSAE
with levels 16 / 64 against the post-hoc tree of two independently trained SAEs of the same widths, the same
learning rate and the same target L0s (600k samples each). Per seed: edge recovery (true edges whose matched
latents are parent and child in the learned tree), P(parent | child), P(child | parent), Hamming distance per 1,000
samples, and each level's L0 / FVU. The same trainings as the slow test
``tests/hierarchy/test_synthetic.py::test_hsae_recovers_the_true_tree_as_well_as_the_post_hoc_baseline`` (its seeds
0–11).

    PYTHONPATH=. .venv/bin/python benchmarks/hierarchy_ground_truth.py [--seeds 0 1 2 3 4 5] [--options JSON]

``--options``: HSAE options for all three SAEs (default none: the defaults). docs/hierarchy.md's sweep table has
the defaults over seeds 0–19 and single-seed variations; the committed
``benchmarks/results/hierarchy_ground_truth.json`` is its last row (the HSAE before c3b2942,
``'{"initial_l0_factor": 0, "threshold_lr_scale": 1, "l0_penalty_to_encoder": false, "l0_coefficient": 0.015}'``).

About 12 s per seed on a quiet 2-core machine. Writes ``benchmarks/results/hierarchy_ground_truth.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchmarks.common import machine, write_result
from tests.hierarchy.test_synthetic import _train_and_score

KEYS = ("edge_recovery", "p_parent_given_child", "p_child_given_parent", "hamming_per_1k", "mean_jaccard")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(6)))
    ap.add_argument("--options", default="{}", help="HSAE options (JSON) for the three SAEs")
    args = ap.parse_args()
    options = json.loads(args.options)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            scores = _train_and_score(Path(tmp), seed, options)
            row = {"seed": seed}
            for method in ("hsae", "posthoc"):
                s = scores[method]
                row[method] = {k: round(float(s[k]), 4) for k in KEYS}
                row[method]["levels"] = [{"l0": round(lv["l0"], 2), "fvu": round(lv["fvu"], 4)} for lv in s["levels"]]
            rows.append(row)
            print(row, flush=True)
    mean = {m: {k: round(sum(r[m][k] for r in rows) / len(rows), 4) for k in KEYS} for m in ("hsae", "posthoc")}
    ahead = sum(r["hsae"]["edge_recovery"] > r["posthoc"]["edge_recovery"] for r in rows)
    print("mean", mean, f"HSAE ahead on edge recovery in {ahead} of {len(rows)} seeds")
    write_result("hierarchy_ground_truth", {"machine": machine(), "options": options, "seeds": rows, "mean": mean,
                                            "hsae_ahead_seeds": ahead})


if __name__ == "__main__":
    main()
