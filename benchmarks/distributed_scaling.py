"""Training throughput against the number of ranks under torchrun, data- and module-parallel.

Trains TopK SAEs from a cache of random activations (throughput does not depend on the values) with
`saeforge train`, once in one plain process and once per rank count under `torchrun --standalone` (gloo on CPUs,
NCCL on GPUs), and reports tokens per second of the training loop (from metrics.jsonl: the whole loop after the
set-up, including every all-reduce; process start and the first fill are not counted).

- data:   one SAE, every rank its slice of each global batch (gradients all-reduced each step);
- module: `--saes` SAEs spread over the ranks, every rank reading whole batches;
- latent: one SAE split over the ranks by its latents (a distributed top-k), every rank reading whole batches
  (one-process rows are the data rows').

"tokens/s" counts activation vectors through every SAE of the run: a module-parallel run of two SAEs at 1000 tokens/s
trains each at 1000 tokens/s.

    python benchmarks/distributed_scaling.py [--ranks 1,2] [--threads 1] [--device cpu] [--d-in 256] [--d-sae 4096]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_result  # noqa: E402


def _make_cache(folder: Path, d_in: int, tokens: int) -> Path:
    import torch

    from saeforge.data.activation_cache import write_array_cache

    g = torch.Generator().manual_seed(0)
    acts = torch.randn(tokens, d_in, generator=g) @ torch.randn(d_in, d_in, generator=g) / d_in ** 0.5
    write_array_cache(folder, {"layers.0.resid_post": acts}, shard_tokens=16_384, progress=False)
    return folder


def _run(cache: Path, out: Path, args, ranks: int, parallel: str, n_saes: int, threads: int) -> dict:
    saes = [{"site": "layers.0.resid_post", "name": f"sae{i}"} for i in range(n_saes)]
    config = {"cache": str(cache), "out": str(out), "saes": saes, "d_sae": args.d_sae, "k": args.k,
              "batch_size": args.batch_size, "tokens": args.batch_size * args.steps, "log_every": args.steps,
              "checkpoint_every": args.steps, "progress": False, "threads": threads, "device": args.device,
              "parallel": parallel}
    cfg_path = out.with_suffix(".json")
    cfg_path.write_text(json.dumps(config))
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
                if ranks > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run([*launcher, "-m", "saeforge", "train", "--config", str(cfg_path)], capture_output=True,
                          text=True, env=env)
    if proc.returncode:
        raise SystemExit(proc.stdout[-3000:] + proc.stderr[-3000:])
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return {"parallel": parallel if ranks > 1 else "one process", "ranks": ranks, "threads_per_rank": threads,
            "saes": n_saes, "tokens_per_s": last["tokens_per_s"] * n_saes,
            "fvu": [last["saes"][s["name"]]["fvu"] for s in saes]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", default="1,2", help="rank counts to measure, comma-separated")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per rank")
    p.add_argument("--device", default="cpu")
    p.add_argument("--d-in", type=int, default=256)
    p.add_argument("--d-sae", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--saes", type=int, default=2, help="SAEs of the module-parallel runs")
    p.add_argument("--name", default="distributed_scaling")
    args = p.parse_args()
    rank_counts = [int(r) for r in args.ranks.split(",")]
    rows = []
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        cache = _make_cache(Path(tmp) / "cache", args.d_in, 8 * 16_384)
        # one process is also given the threads of all ranks of the largest run: the same cores, one process
        one_wide = [(1, args.threads * max(rank_counts))] if max(rank_counts) > 1 else []
        runs = [(ranks, args.threads) for ranks in rank_counts]
        for parallel, n_saes in (("data", 1), ("module", args.saes), ("latent", 1)):
            for ranks, threads in runs[:1] + one_wide + runs[1:]:
                if (parallel == "module" and ranks > n_saes) or (parallel == "latent" and ranks == 1):
                    continue
                row = _run(cache, Path(tmp) / f"{parallel}-{ranks}-{threads}", args, ranks, parallel, n_saes, threads)
                rows.append(row)
                print(f"{row['parallel']:>12} ranks {ranks} × {threads} threads, {n_saes} SAE(s): "
                      f"{row['tokens_per_s']:,.0f} tokens/s", flush=True)
    # the machine may be shared: the load it was measured under goes with the figures
    result = {"machine": machine(), "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]}, "shape": {k: getattr(args, k) for k in ("d_in", "d_sae", "k", "batch_size",
                                                                          "steps", "device")}, "rows": rows}
    print("wrote", write_result(args.name, result))


if __name__ == "__main__":
    main()
