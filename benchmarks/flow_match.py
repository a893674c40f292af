"""Speed and memory of data-free feature matching (saeforge.flow.matching; docs/flow.md).

1. two 4608-wide SAEs (d 576, the embedded model's width × 8): top-1 and top-5 decoder matching, and the
   one-to-one permutation (Hungarian, scipy) — target: top-1 under a second;
   The bound is the bare cosine GEMM of the pair, timed beside it: on a shared machine the ratio is what carries over;
2. every adjacent pair of a 30-layer, 3-site suite of such SAEs (for each layer, R_L against R_{L-1}, M_L and A_L:
   90 top-1 matches) — target: under a minute; peak RSS reported;
3. ``--big`` (instead of 1 and 2, so that the peak RSS is its own): two 65,536-wide SAEs, top-1 in blocks: the 65k ×
   65k cosine matrix (16 GiB in float32) is never formed; the peak RSS shows it. ``--big-rows N`` matches only the first N features of A against all of B: the peak
   memory is the same (it is reached in the first block of A's rows) and the time scales with the rows.

Decoders are random unit rows (the time does not depend on the values). The machine is shared: figures are the
median of ``--repeats`` runs, each as wall time and as the process's CPU time (all threads): on a machine that other
work keeps busy the wall time waits for the cores, the CPU time much less so; on a quiet machine the wall time is
about the CPU time divided by the threads.

    .venv/bin/python benchmarks/flow_match.py [--big [--big-rows 8192]]

Writes ``benchmarks/results/flow_match.json`` (``flow_match_big.json`` with ``--big``).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from benchmarks.common import machine, median, peak_rss_mb, write_result
from saeforge.flow.matching import match_decoders


def timed(fn, repeats: int) -> tuple[float, float]:
    """Median wall and CPU seconds of ``fn``."""
    walls, cpus = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return median(walls), median(cpus)


def big(args, g: torch.Generator, d: int) -> None:
    out: dict = {"machine": machine(), "d": d, "load_average": os.getloadavg()}
    n = 65_536
    big_a, big_b = torch.randn(args.big_rows, d, generator=g), torch.randn(n, d, generator=g)
    rss_before = peak_rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    m = match_decoders(big_a, big_b, "top1")
    out["big"] = {"width": n, "rows_of_a": args.big_rows, "top1_s": time.perf_counter() - t0,
                  "top1_cpu_s": time.process_time() - c0, "peak_rss_mb": peak_rss_mb(),
                  "peak_rss_before_mb": rss_before, "dense_matrix_gib": n * n * 4 / 2**30,
                  "matched": int((m.top1 >= 0).sum())}
    print(f"{args.big_rows} features of a 65,536-wide SAE against another: top-1 in {out['big']['top1_s']:.0f} s "
          f"wall, {out['big']['top1_cpu_s']:.0f} s CPU; peak RSS {out['big']['peak_rss_mb']:.0f} MB (before: "
          f"{rss_before:.0f} MB; the dense matrix would be {out['big']['dense_matrix_gib']:.0f} GiB)", flush=True)
    print(f"written {write_result('flow_match_big', out)}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--big", action="store_true", help="only match two 65,536-wide SAEs")
    ap.add_argument("--big-rows", type=int, default=65_536, help="--big: match only this many features of A")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    d, width = 576, 4608
    if args.big:
        big(args, g, d)
        return
    a, b = torch.randn(width, d, generator=g), torch.randn(width, d, generator=g)
    out: dict = {"machine": machine(), "d": d, "width": width, "load_average": os.getloadavg()}
    match_decoders(a, b, "top1")  # warm-up
    # the bound: the bare cosine GEMM of one pair (no matching can be faster), timed beside it
    ua, ub = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    out["pair_gemm_bound_s"], out["pair_gemm_bound_cpu_s"] = timed(lambda: ua @ ub.T, args.repeats)
    out["pair_top1_s"], out["pair_top1_cpu_s"] = timed(lambda: match_decoders(a, b, "top1"), args.repeats)
    out["pair_top5_s"], out["pair_top5_cpu_s"] = timed(lambda: match_decoders(a, b, "topk", k=5), args.repeats)
    out["pair_permutation_s"], out["pair_permutation_cpu_s"] = timed(lambda: match_decoders(a, b, "permutation"), 1)
    print(f"two {width}-wide SAEs (wall / CPU s): top-1 {out['pair_top1_s']:.3f} / {out['pair_top1_cpu_s']:.3f}, "
          f"top-5 {out['pair_top5_s']:.3f} / {out['pair_top5_cpu_s']:.3f}, permutation {out['pair_permutation_s']:.1f}"
          f" / {out['pair_permutation_cpu_s']:.1f}; bare GEMM (bound) {out['pair_gemm_bound_s']:.3f} / "
          f"{out['pair_gemm_bound_cpu_s']:.3f} -> top-1 at {out['pair_gemm_bound_s'] / out['pair_top1_s']:.0%} of "
          "the bound", flush=True)

    suite = {(L, k): torch.randn(width, d, generator=g) for L in range(30) for k in ("R", "M", "A")}

    def all_pairs():
        for L in range(30):
            for pred in ([(L - 1, "R")] if L else []) + [(L, "M"), (L, "A")]:
                match_decoders(suite[(L, "R")], suite[pred], "top1")

    rss_before = peak_rss_mb()
    out["suite_pairs"] = 29 + 60
    out["suite_all_pairs_s"], out["suite_all_pairs_cpu_s"] = timed(all_pairs, max(1, args.repeats // 2))
    out["peak_rss_mb"] = peak_rss_mb()
    out["suite_weights_mb"] = 90 * width * d * 4 / 2**20
    print(f"30-layer 3-site suite: {out['suite_pairs']} top-1 matches in {out['suite_all_pairs_s']:.1f} s wall, "
          f"{out['suite_all_pairs_cpu_s']:.1f} s CPU; peak RSS {out['peak_rss_mb']:.0f} MB (decoders "
          f"{out['suite_weights_mb']:.0f} MB, before {rss_before:.0f} MB)", flush=True)
    print(f"written {write_result('flow_match', out)}")


if __name__ == "__main__":
    main()
