"""Speed and memory of attribution patching over SAE features (saeforge.circuits.attribution; docs/circuits.md).

1. wall time of attribution patching (every node of every SAE of the run) for ``--pairs`` pairs of a task;
2. peak resident memory of attribution patching on one random-token prompt pair of growing length (run the lengths
   in increasing order in a fresh process with ``--pairs 1``, so that an earlier, larger peak does not hide them),
   and a quadratic fit that says how long a prompt fits in 24 GiB.

    .venv/bin/python benchmarks/circuit_speed.py RUN --task induction --pairs 32 --lengths 64,256,1024
    .venv/bin/python benchmarks/circuit_speed.py RUN --pairs 1 --lengths 512,1024,2048 --out circuit_memory

Writes ``benchmarks/results/circuit_speed.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import machine, peak_rss_mb, write_result
from saeforge.circuits.attribution import attribute_nodes, circuit_saes
from saeforge.circuits.tasks import EncodedTask, Task, encode_task, load_task
from saeforge.data.prompts import PromptEncoder
from saeforge.runs import load_run


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--task", default="induction")
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--lengths", default="64,256,1024")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="circuit_speed", help="result name under benchmarks/results/")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = load_run(args.run, device="cpu")
    lm = run.lm
    saes = circuit_saes(lm, run.saes)
    enc = encode_task(load_task(args.task).head(args.pairs), lm, PromptEncoder(lm, run.token_policy()))
    t0 = time.perf_counter()
    attribute_nodes(lm, enc, saes, method="atp", batch_size=args.pairs)
    seconds = time.perf_counter() - t0
    print(f"atp: {len(enc)} pairs of {enc.clean_ids.shape[1]} tokens, {len(saes)} sites: {seconds:.1f} s")
    memory = []
    for length in (int(x) for x in args.lengths.split(",")):
        before = peak_rss_mb()
        t0 = time.perf_counter()
        attribute_nodes(lm, random_pair(lm, length, length), saes, method="atp", batch_size=1)
        memory.append({"tokens": length, "seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb(),
                       "peak_before_mb": before})
        print(memory[-1])
    # peak = a + b·T + c·T² through the last three points (attention's backward keeps T² scores), solved for 24 GiB
    fit = None
    if len(memory) >= 3:
        t = torch.tensor([m["tokens"] for m in memory[-3:]], dtype=torch.float64)
        mb = torch.tensor([m["peak_rss_mb"] for m in memory[-3:]], dtype=torch.float64)
        a, b, c = torch.linalg.solve(torch.stack([torch.ones(3), t, t * t], 1), mb).tolist()
        grid = torch.arange(1, 200_001, dtype=torch.float64)
        fits = grid[(a + b * grid + c * grid * grid) <= 24 * 1024]
        fit = {"mb": a, "mb_per_token": b, "mb_per_token_squared": c,
               "tokens_in_24_gib": int(fits.max()) if len(fits) else 0}
    result = {"task": args.task, "pairs": len(enc), "tokens_per_prompt": int(enc.clean_ids.shape[1]),
              "sites": [c.site for c in saes], "atp_seconds": seconds, "memory": memory, "fit": fit,
              "machine": machine()}
    print({k: v for k, v in result.items() if k != "machine"})
    write_result(args.out, result)


if __name__ == "__main__":
    main()
