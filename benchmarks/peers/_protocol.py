"""What the peer workers share: the tiny protocol between ``benchmarks/train_step.py`` (the coordinator) and one
worker process per measured tool, and (at the end) the command lines and replies of the ``quality_*`` and
``interop_*`` workers. It must import nothing but numpy and torch: it runs inside each peer's own virtual
environment.

A worker loads the cached activations, builds its tool's SAE, runs its warm-up steps, prints ``ready``, then
answers commands read from stdin, one per line:

    run N SKIP    -> run SKIP + N training steps on the next batches; reply with the N last step times (seconds)
    quit          -> exit

Replies are single lines ``@@BENCH <json>`` on stdout (libraries may print other lines; the coordinator skips
them). While one worker runs, the others block on stdin, so the measured tools never share the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Callable, Iterator

import numpy as np
import torch

MARK = "@@BENCH "


def send(obj: dict) -> None:
    sys.stdout.write(MARK + json.dumps(obj) + "\n")
    sys.stdout.flush()


def load_batches(path: str, batch_size: int, d_in: int) -> list[torch.Tensor]:
    arr = np.load(path, mmap_mode="r")
    if arr.ndim != 2 or arr.shape[1] != d_in:
        raise SystemExit(f"{path}: expected [N, {d_in}] activations, got {arr.shape}")
    n = arr.shape[0] // batch_size
    if n < 1:
        raise SystemExit(f"{path}: fewer than {batch_size} rows")
    return [torch.from_numpy(np.array(arr[i * batch_size : (i + 1) * batch_size], dtype=np.float32)) for i in range(n)]


def environment(extra: dict | None = None) -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "executable": sys.executable, **(extra or {})}


def commands() -> Iterator[tuple[int, int]]:
    """Yield (n, skip) for every ``run`` command until ``quit`` or EOF."""
    for line in sys.stdin:
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "quit":
            return
        if parts[0] == "run":
            yield int(parts[1]), int(parts[2])


def serve(step: Callable[[torch.Tensor], float | None], batches: list[torch.Tensor], warmup: int,
          info: dict | None = None) -> None:
    """Drive a worker whose training step is a plain function of one batch (returns a loss, or None)."""
    i = 0
    losses: list[float] = []
    for _ in range(warmup):
        loss = step(batches[i % len(batches)])
        i += 1
        if loss is not None:
            losses.append(loss)
    send({"ready": True, "env": environment(info), "warmup_losses": losses})
    for n, skip in commands():
        times, losses = [], []
        for j in range(skip + n):
            x = batches[i % len(batches)]
            i += 1
            t0 = time.perf_counter()
            loss = step(x)
            dt = time.perf_counter() - t0
            if j >= skip:
                times.append(dt)
                if loss is not None:
                    losses.append(loss)
        send({"times": times, "losses": losses, "steps_done": i})
    sys.stdout.flush()
    os._exit(0)


# ---- benchmarks/quality_cached.py workers: one training run on a shuffled .npy, one ``@@QUALITY <json>`` reply


def quality_run() -> tuple[argparse.Namespace, np.ndarray]:
    """Parse a quality worker's arguments, seed torch and open the activations (enough rows for the run)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--acts", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--d-sae", type=int, default=4608)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    arr = np.load(args.acts, mmap_mode="r")
    if arr.shape[0] < args.steps * args.batch:
        raise SystemExit(f"{args.acts} holds {arr.shape[0]} rows, fewer than {args.steps} x {args.batch}")
    return args, arr


def batch_at(arr: np.ndarray, step: int, batch: int) -> torch.Tensor:
    """Rows ``[step * batch, (step + 1) * batch)`` as a float32 tensor."""
    return torch.from_numpy(np.array(arr[step * batch:(step + 1) * batch], dtype=np.float32))


def reply_quality(obj: dict) -> None:
    sys.stdout.write("@@QUALITY " + json.dumps(obj) + "\n")
    sys.stdout.flush()


# ---- benchmarks/interop.py workers: ``train`` and ``encode`` subcommands, one ``@@INTEROP <json>`` reply each


def reply_interop(obj: dict) -> None:
    sys.stdout.write("@@INTEROP " + json.dumps(obj) + "\n")
    sys.stdout.flush()


def eval_rows(path: str, n: int) -> torch.Tensor:
    """The last ``n`` rows of the activations: the held-out rows both sides encode."""
    arr = np.load(path, mmap_mode="r")
    return torch.from_numpy(np.array(arr[-n:], dtype=np.float32))


def interop_main(train: Callable[[argparse.Namespace], None], encode: Callable[[argparse.Namespace], None],
                 lr_help: str) -> None:
    """Parse an interop worker's command line and run its ``train`` or ``encode``."""
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--acts", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--eval-rows", type=int, default=2048)
    t.add_argument("--d-sae", type=int, default=2304)
    t.add_argument("--k", type=int, default=32)
    t.add_argument("--batch", type=int, default=1024)
    t.add_argument("--steps", type=int, default=300)
    t.add_argument("--lr", type=float, default=0.0, help=lr_help)
    t.add_argument("--seed", type=int, default=0)
    e = sub.add_parser("encode")
    e.add_argument("--acts", required=True)
    e.add_argument("--eval-rows", type=int, default=2048)
    e.add_argument("--sae", action="append", required=True, help="FOLDER=OUT.npy (repeatable)")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("INTEROP_THREADS", torch.get_num_threads())))
    train(args) if args.cmd == "train" else encode(args)
