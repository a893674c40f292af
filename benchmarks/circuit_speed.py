"""Speed and memory of attribution patching over SAE features (saeforge.circuits.attribution; docs/circuits.md).

1. wall time of attribution patching (every node of every SAE of the run) for ``--pairs`` pairs of a task, the
   prompts lengthened by a common ``--prefix`` (about 20 tokens with the default prefix and ``induction``);
2. in the same run, exact activation patching of the same nodes: one forward per node (``exact_node_effects``) timed
   on ``--exact-nodes`` nodes drawn at random among them (error nodes included), extrapolated linearly to all of them
   (every node costs the same forwards); the ratio exact / attribution is printed, against attribution patching
   timed before and again after the exact patching (the load of a shared machine changes in between);
3. with ``--lengths``: peak resident memory of attribution patching on one random-token prompt pair of growing
   length (run it in a fresh process with ``--pairs 1``, lengths increasing, so that an earlier, larger peak does
   not hide them), and a quadratic fit that says how long a prompt fits in 24 GiB.

The machine's load (the 1-minute load average and the CPUs other work kept busy, from /proc/stat) is recorded before
and after each timing: on a shared machine every figure depends on it.

    .venv/bin/python benchmarks/circuit_speed.py RUN --task induction --pairs 32 --exact-nodes 24
    .venv/bin/python benchmarks/circuit_speed.py RUN --pairs 1 --exact-nodes 0 --lengths 512,1024,2048 \
        --out circuit_memory

Writes ``benchmarks/results/circuit_speed.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from benchmarks.common import machine, peak_rss_mb, write_result
from saeforge.circuits.attribution import attribute_nodes, circuit_saes, exact_node_effects
from saeforge.circuits.tasks import EncodedTask, PromptPair, Task, encode_task, load_task
from saeforge.data.prompts import PromptEncoder
from saeforge.runs import load_run
from saeforge.utils.threads import busy_cpus

PREFIX = "Please remember these words in order. "


def load() -> dict:
    return {"load_1min": os.getloadavg()[0], "busy_cpus": round(busy_cpus(0.5), 2), "cpus": os.cpu_count()}


def random_pair(lm, length: int, seed: int) -> EncodedTask:
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(1000, lm.vocab_size - 1000, (1, length), generator=g)
    clean[0, 0] = lm.bos_token_id()
    corrupt = clean.clone()
    corrupt[0, length // 2] = clean[0, length // 2] + 1
    keep = torch.ones(1, length, dtype=torch.bool)
    keep[0, 0] = False
    return EncodedTask(Task("random", ()), clean, corrupt, torch.ones(1, length, dtype=torch.long), keep,
                       torch.tensor([length - 1]), torch.tensor([11]), torch.tensor([12]))


def prefixed(task: Task, prefix: str) -> Task:
    return Task(task.name, tuple(PromptPair(prefix + p.clean, prefix + p.corrupt, p.clean_answer, p.corrupt_answer)
                                 for p in task.pairs), task.description)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--task", default="induction")
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--prefix", default=PREFIX, help="text put before both prompts of every pair")
    ap.add_argument("--exact-nodes", type=int, default=24, help="nodes patched exactly (0: no exact patching)")
    ap.add_argument("--lengths", default="", help="prompt lengths of the memory measurement, e.g. 512,1024,2048")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="circuit_speed", help="result name under benchmarks/results/")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = load_run(args.run, device="cpu")
    lm = run.lm
    saes = circuit_saes(lm, run.saes)
    task = prefixed(load_task(args.task).head(args.pairs), args.prefix)
    enc = encode_task(task, lm, PromptEncoder(lm, run.token_policy()))
    n_nodes = sum(c.d_sae + 1 for c in saes)
    tokens = int(enc.clean_ids.shape[1])
    result = {"task": args.task, "prefix": args.prefix, "pairs": len(enc), "tokens_per_prompt": tokens,
              "sites": [c.site for c in saes], "nodes": n_nodes, "threads": args.threads}

    attribute_nodes(lm, enc.rows(slice(0, 2)), saes, method="atp", batch_size=2)  # warm-up (first-call overheads)
    result["load_before_atp"] = load()
    t0 = time.perf_counter()
    effects = attribute_nodes(lm, enc, saes, method="atp", batch_size=args.pairs)
    result["atp_seconds"] = time.perf_counter() - t0
    result["load_after_atp"] = load()
    print(f"attribution patching: {len(enc)} pairs of {tokens} tokens, {len(saes)} sites, {n_nodes} nodes: "
          f"{result['atp_seconds']:.1f} s (load {result['load_before_atp']} → {result['load_after_atp']})")

    if args.exact_nodes:
        g = torch.Generator().manual_seed(0)
        every = [(c.site, i) for c in saes for i in range(c.d_sae + 1)]
        sample = [every[int(k)] for k in torch.randperm(len(every), generator=g)[: args.exact_nodes]]
        result["load_before_exact"] = load()
        t0 = time.perf_counter()
        exact = exact_node_effects(lm, enc, saes, sample, batch_size=args.pairs)
        seconds = time.perf_counter() - t0
        result["load_after_exact"] = load()
        per_node = seconds / len(sample)
        estimate = torch.stack([effects.effects[s][i] for s, i in sample])
        result |= {"exact_sample_nodes": len(sample), "exact_sample_seconds": seconds,
                   "exact_seconds_per_node": per_node, "exact_all_nodes_seconds_extrapolated": per_node * n_nodes,
                   "speedup": per_node * n_nodes / result["atp_seconds"],
                   "break_even_nodes": result["atp_seconds"] / per_node,
                   "sample_max_abs_difference": float((estimate - exact).abs().max()),
                   "sample_max_abs_effect": float(exact.abs().max())}
        # attribution patching again, under the load the exact patching ran under (the machine is shared)
        t0 = time.perf_counter()
        attribute_nodes(lm, enc, saes, method="atp", batch_size=args.pairs)
        result["atp_seconds_after_exact"] = time.perf_counter() - t0
        result["load_after_second_atp"] = load()
        result["speedup_vs_second_atp"] = per_node * n_nodes / result["atp_seconds_after_exact"]
        print(f"exact patching: {per_node:.3f} s per node ({len(sample)} nodes patched, load "
              f"{result['load_before_exact']} → {result['load_after_exact']}), so {per_node * n_nodes:.0f} s for "
              f"all {n_nodes} nodes: attribution patching is {result['speedup']:.0f}x faster "
              f"(it pays off from {result['break_even_nodes']:.0f} nodes); attribution patching again after it: "
              f"{result['atp_seconds_after_exact']:.1f} s, {result['speedup_vs_second_atp']:.0f}x")

    memory = []
    for length in (int(x) for x in args.lengths.split(",") if x):
        before = peak_rss_mb()
        t0 = time.perf_counter()
        attribute_nodes(lm, random_pair(lm, length, length), saes, method="atp", batch_size=1)
        memory.append({"tokens": length, "seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb(),
                       "peak_before_mb": before})
        print(memory[-1])
    # peak = a + b·T + c·T² through the last three points (attention's backward keeps T² scores), solved for 24 GiB
    if len(memory) >= 3:
        t = torch.tensor([m["tokens"] for m in memory[-3:]], dtype=torch.float64)
        mb = torch.tensor([m["peak_rss_mb"] for m in memory[-3:]], dtype=torch.float64)
        a, b, c = torch.linalg.solve(torch.stack([torch.ones(3), t, t * t], 1), mb).tolist()
        grid = torch.arange(1, 200_001, dtype=torch.float64)
        fits = grid[(a + b * grid + c * grid * grid) <= 24 * 1024]
        result["fit"] = {"mb": a, "mb_per_token": b, "mb_per_token_squared": c,
                         "tokens_in_24_gib": int(fits.max()) if len(fits) else 0}
    result |= {"memory": memory, "machine": machine()}
    print({k: v for k, v in result.items() if k not in ("machine", "sites")})
    write_result(args.out, result)


if __name__ == "__main__":
    main()
