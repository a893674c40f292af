"""End-to-end worker for saeforge (run by benchmarks/end_to_end.py in the main venv): `saeforge train` from the
live embedded model, timed around ``train()`` (which includes loading the model and tokenizing); the trainer's own
split of that time (run.json "seconds": load, init, data, steps, finish) comes with it."""

from __future__ import annotations

import argparse
import json
import os
import resource
import time


SITE = "layers.5.resid_post"


def run_config(argv=None, extra=()):
    """The run both saeforge workers measure (this one and ``e2e_bound.py``), from their command line."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--d-sae", type=int, default=4608)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--model-dtype", default="float32")
    ap.add_argument("--matmul-dtype", default="")
    ap.add_argument("--threads", type=int, default=0, help="0: saeforge's automatic choice")
    args = ap.parse_args(argv)

    from saeforge.training import TrainConfig

    opts = json.dumps({"matmul_dtype": args.matmul_dtype}) if args.matmul_dtype else ""
    cfg = TrainConfig(out=os.path.join(args.out, "run"), model="embedded", sites=(SITE,), corpus="embedded:train",
                      context_length=args.context, tokens=args.tokens, batch_size=4096, d_sae=args.d_sae, k=args.k,
                      model_dtype=args.model_dtype, sae_options=opts, progress=False, checkpoint_every=10**9,
                      device="cpu", threads=args.threads)
    return args, cfg


def main() -> None:
    args, cfg = run_config()

    from saeforge import __version__
    from saeforge.training import train

    t = time.perf_counter()
    train(cfg)
    dt = time.perf_counter() - t
    tokens = (args.tokens // 4096) * 4096
    run = json.load(open(os.path.join(args.out, "run", "run.json")))
    print("@@E2E " + json.dumps({"tool": "saeforge", "version": __version__, "seconds": dt, "tokens": tokens,
                                 "tokens_per_s": tokens / dt, "model_dtype": args.model_dtype,
                                 "matmul_dtype": args.matmul_dtype or None, "threads": run.get("threads_used"),
                                 "phase_seconds": run.get("seconds"),
                                 "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                 "sae_dir": os.path.join(args.out, "run", "saes", SITE)}))


if __name__ == "__main__":
    main()
