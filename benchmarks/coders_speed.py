"""Training-step speed of transcoders and cross-layer transcoders against the TopK SAE they build on.

1. A TopK transcoder step (and the skip and BatchTopK forms) against the TopK SAE step on the same shapes (d 576,
   d_sae 4608, k 32, batch 4096, Adam, float32, the sparse kernels of ``saeforge.kernels``). Target: within 10 %.
2. A TopK CLT over L layers (F = d_sae features per layer) against L separate TopK transcoders of d_sae latents
   each (one step of each of the L), for L in ``--layers``. Target: within 1.2x. The CLT's extra work is its
   decoders into later layers: F·d·L(L+1)/2 weights instead of F·d·L, touched sparsely (k latents per token and
   layer, one [F, d] block at a time as a transcoder's), plus the sum of the partial outputs.

A step is forward + backward + the decoder-norm hooks + Adam; every variant is timed in rounds that alternate
between the variants (``--rounds`` of ``--steps`` steps each, after a warm-up), so load from other processes hits
them alike, and the median step time is reported. The activations are Gaussian with the embedded model's width and
norm scale (a step's cost does not depend on what the numbers are); ``--threads`` as for ``saeforge train``.

    PYTHONPATH=. python benchmarks/coders_speed.py --layers 2,4,6

Writes ``benchmarks/results/coders_speed.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def make_step(cfg, batch: int, n_in: int, n_out: int, seed: int = 0):
    """A closure running one training step of a fresh dictionary on fixed random batches."""
    from saeforge.saes import DeadLatentTracker, TrainState, make_sae

    torch.manual_seed(seed)
    sae = make_sae(cfg)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n_in, generator=g)
    y = torch.randn(batch, n_out, generator=g) if cfg.is_transcoder else None
    tracker = DeadLatentTracker(cfg.d_sae, 10**9)
    state = {"step": 0}

    def step() -> None:
        out = sae.training_loss(x, y, state=TrainState(step=state["step"], dead_mask=tracker.dead_mask))
        out.loss.backward()
        sae.before_optimizer_step()
        opt.step()
        sae.after_optimizer_step()
        opt.zero_grad(set_to_none=True)
        tracker.update(out.fired, batch)
        state["step"] += 1

    return step, sum(p.numel() for p in sae.parameters())


def time_rounds(variants: dict, steps: int, rounds: int, warmup: int, clock=time.perf_counter
                ) -> dict[str, list[float]]:
    """Median-friendly step times: each round runs ``steps`` steps of every variant in turn; ``clock`` is wall time
    or, on a shared machine, this process's CPU time (``time.process_time``: no time spent waiting for a core)."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            for _ in range(steps):
                t0 = clock()
                fn()
                times[name].append(clock() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--d-sae", type=int, default=4608)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--layers", default="2,4,6", help="CLT layer counts to measure")
    ap.add_argument("--steps", type=int, default=2, help="steps per variant per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="0: saeforge's automatic choice")
    ap.add_argument("--skip-transcoders", action="store_true", help="only the CLT comparison")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall time, or this process's CPU time (steadier on a machine shared with other jobs)")
    ap.add_argument("--out", default="coders_speed")
    args = ap.parse_args()

    from common import machine, write_result

    from saeforge.saes import (
        BatchTopKTranscoderConfig,
        TopKCLTConfig,
        TopKConfig,
        TopKSkipTranscoderConfig,
        TopKTranscoderConfig,
        clt_memory,
    )
    from saeforge.utils.threads import thread_policy

    d, m, k, n = args.d, args.d_sae, args.k, args.batch
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    # the machine may be shared: the load average before and after says how much (the ratios, timed in alternating
    # rounds, hold up under load better than the absolute times)
    results: dict = {"config": vars(args), "load_average_before": os.getloadavg()}
    with thread_policy(args.threads) as threads:
        results["threads"] = threads
        if not args.skip_transcoders:
            variants = {
                "topk (SAE)": make_step(TopKConfig(d_in=d, d_sae=m, k=k), n, d, d)[0],
                "topk_transcoder": make_step(TopKTranscoderConfig(d_in=d, d_sae=m, k=k), n, d, d)[0],
                "topk_skip_transcoder": make_step(TopKSkipTranscoderConfig(d_in=d, d_sae=m, k=k), n, d, d)[0],
                "batchtopk_transcoder": make_step(BatchTopKTranscoderConfig(d_in=d, d_sae=m, k=k), n, d, d)[0],
            }
            print(f"transcoders vs the TopK SAE (d {d}, d_sae {m}, k {k}, batch {n}, {threads} threads) ...",
                  flush=True)
            times = time_rounds(variants, args.steps, args.rounds, args.warmup, clock)
            base = statistics.median(times["topk (SAE)"])
            rows = {}
            for name, ts in times.items():
                med = statistics.median(ts)
                rows[name] = {"median_step_s": med, "tokens_per_s": n / med, "relative_to_topk": med / base}
                print(f"  {name:<22} {med * 1000:8.1f} ms/step  {n / med:9.0f} tokens/s  {med / base:5.2f}x TopK")
            results["transcoders"] = rows
        clt_rows = {}
        for n_layers in [int(v) for v in args.layers.split(",") if v]:
            clt_step, clt_params = make_step(
                TopKCLTConfig(d_in=n_layers * d, d_sae=n_layers * m, d_out=n_layers * d, n_layers=n_layers, k=k),
                n, n_layers * d, n_layers * d)
            singles = [make_step(TopKTranscoderConfig(d_in=d, d_sae=m, k=k), n, d, d, seed=i)[0]
                       for i in range(n_layers)]

            def all_singles(singles=singles) -> None:
                for s in singles:
                    s()

            print(f"CLT over {n_layers} layers vs {n_layers} transcoders ...", flush=True)
            times = time_rounds({"clt": clt_step, "transcoders": all_singles}, args.steps, args.rounds, args.warmup,
                                clock)
            t_clt, t_tc = statistics.median(times["clt"]), statistics.median(times["transcoders"])
            mem = clt_memory(n_layers, d, d, m, batch_size=n, k=k)
            clt_rows[str(n_layers)] = {"clt_step_s": t_clt, "transcoders_step_s": t_tc, "ratio": t_clt / t_tc,
                                       "clt_parameters": clt_params, "memory": mem}
            print(f"  L={n_layers}: CLT {t_clt * 1000:.0f} ms/step, {n_layers} transcoders {t_tc * 1000:.0f} ms "
                  f"-> {t_clt / t_tc:.2f}x; CLT weights {mem['weights_bytes'] / 2**20:.0f} MiB, training state "
                  f"{mem['training_state_bytes'] / 2**20:.0f} MiB", flush=True)
        results["clt"] = clt_rows
    results["load_average_after"] = os.getloadavg()
    results["machine"] = machine()
    print(f"wrote {write_result(args.out, results)}")


if __name__ == "__main__":
    main()
