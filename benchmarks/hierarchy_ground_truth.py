"""Ground truth for feature trees (docs/hierarchy.md, "Ground truth"): on synthetic data whose tree is known
(saeforge.hierarchy.synthetic: 16 roots with 4 children each in R^64, a child fires only with its parent), an HSAE
with levels 16 / 64 against the post-hoc tree of two independently trained SAEs of the same widths, the same
learning rate and the same target L0s (600k samples each). Per seed: edge recovery (true edges whose one-to-one
matched latents are parent and child in the learned tree; and with each node matched to its best latent, the older
score), P(parent | child), P(child | parent), Hamming distance per 1,000 samples, and each level's L0 / FVU; over
the seeds (default 0–29), the means and the paired HSAE − post-hoc gap with its standard error. The post-hoc tree
is built by the HSAE's rule (``tree_similarity``, ``unassigned_fraction``); unless that rule is co-activation the
same SAEs are also linked by co-firing (``posthoc_coactivation``, and its gap over ``posthoc``). The same trainings
as the slow test
``tests/hierarchy/test_synthetic.py::test_hsae_recovers_the_true_tree_as_well_as_the_post_hoc_baseline``.

    PYTHONPATH=. .venv/bin/python benchmarks/hierarchy_ground_truth.py [--seeds 0 1 2 ...] [--jobs 2] [--options JSON]
        [--tokens 600000] [--regime JSON] [--out hierarchy_ground_truth]

``--options``: HSAE options for all three SAEs (default none: the defaults). ``--regime``: another data set and
levels (generator options, level widths, target L0s; docs/hierarchy.md, "Data that should favour joint
training"). ``--jobs``: seeds trained at once
(default 2, one thread each; the scores do not depend on it). ``--tokens``: training samples per SAE (passes over
200k). About 12 s per seed and job on a quiet machine at 600k. Writes ``benchmarks/results/<--out>.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile

from benchmarks.common import machine, write_result
from tests.hierarchy.test_synthetic import _score_seeds

KEYS = ("edge_recovery", "edge_recovery_best_match", "p_parent_given_child", "p_child_given_parent",
        "hamming_per_1k", "mean_jaccard")


def row(seed: int, scores: dict) -> dict:
    out = {"seed": seed}
    for method in scores:
        s = scores[method]
        out[method] = {k: round(float(s[k]), 4) for k in KEYS}
        out[method]["levels"] = [{"l0": round(lv["l0"], 2), "fvu": round(lv["fvu"], 4)} for lv in s["levels"]]
    return out


def paired(rows: list[dict], key: str, a: str = "hsae", b: str = "posthoc") -> dict:
    """``a`` − ``b`` (default HSAE − post-hoc) over the seeds: mean, spread, standard error, and in how many seeds
    ``a`` is better (for the Hamming distance: lower)."""
    gaps = [r[a][key] - r[b][key] for r in rows]
    n = len(gaps)
    mean = sum(gaps) / n
    sd = math.sqrt(sum((g - mean) ** 2 for g in gaps) / (n - 1)) if n > 1 else float("nan")
    sign = -1 if key == "hamming_per_1k" else 1
    return {"mean_gap": round(mean, 4), "sd_gap": round(sd, 4), "se_gap": round(sd / math.sqrt(n), 4),
            "hsae_better": sum(sign * g > 0 for g in gaps), "tied": sum(g == 0 for g in gaps), "seeds": n}


def summary(rows: list[dict]) -> dict:
    methods = [m for m in rows[0] if m != "seed"]
    mean = {m: {k: round(sum(r[m][k] for r in rows) / len(rows), 4) for k in KEYS} for m in methods}
    gap = {k: paired(rows, k) for k in ("edge_recovery", "edge_recovery_best_match", "p_parent_given_child",
                                         "p_child_given_parent", "hamming_per_1k")}
    out = {"mean": mean, "hsae_minus_posthoc": gap}
    if "posthoc_coactivation" in methods:  # the same post-hoc SAEs, linked by co-firing instead of the HSAE's rule
        out["posthoc_coactivation_minus_posthoc"] = {
            k: paired(rows, k, "posthoc_coactivation", "posthoc") for k in ("edge_recovery", "p_parent_given_child")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(30)))
    ap.add_argument("--jobs", type=int, default=2, help="seeds trained at once, one thread each")
    ap.add_argument("--options", default="{}", help="HSAE options (JSON) for the three SAEs")
    ap.add_argument("--tokens", type=int, default=600_000, help="training samples per SAE (586 steps of 1,024)")
    ap.add_argument("--regime", default="{}",
                    help='the data and levels (JSON), changes to tests.hierarchy.test_synthetic.DEFAULT_REGIME: '
                         '{"truth": {HierarchicalFeatureModel.create options}, "widths": [...], "targets": [...]}')
    ap.add_argument("--out", default="hierarchy_ground_truth", help="result name under benchmarks/results/")
    args = ap.parse_args()
    options = json.loads(args.options)
    regime = json.loads(args.regime)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed, scores in zip(args.seeds, _score_seeds(tmp, args.seeds, options, jobs=args.jobs,
                                                         tokens=args.tokens, regime=regime)):
            rows.append(row(seed, scores))
            print(json.dumps(rows[-1]), flush=True)
    result = summary(rows)
    print(json.dumps(result, indent=1))
    write_result(args.out, {"machine": machine(), "options": options, "regime": regime, "tokens": args.tokens,
                            "seeds": rows,
                            **result})


if __name__ == "__main__":
    main()
