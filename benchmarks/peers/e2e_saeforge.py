"""End-to-end worker for saeforge (run by benchmarks/end_to_end.py in the main venv): `saeforge train` from the
live embedded model, timed around ``train()`` (which includes loading the model and tokenizing)."""

from __future__ import annotations

import argparse
import json
import os
import resource
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--d-sae", type=int, default=4608)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--model-dtype", default="float32")
    ap.add_argument("--matmul-dtype", default="")
    args = ap.parse_args()

    from saeforge import __version__
    from saeforge.training import TrainConfig, train

    opts = json.dumps({"matmul_dtype": args.matmul_dtype}) if args.matmul_dtype else ""
    cfg = TrainConfig(out=os.path.join(args.out, "run"), model="embedded", sites=("layers.5.resid_post",),
                      corpus="embedded:train", context_length=args.context, tokens=args.tokens, batch_size=4096,
                      d_sae=args.d_sae, k=args.k, model_dtype=args.model_dtype, sae_options=opts, progress=False,
                      checkpoint_every=10**9, device="cpu")
    t = time.perf_counter()
    train(cfg)
    dt = time.perf_counter() - t
    tokens = (args.tokens // 4096) * 4096
    print("@@E2E " + json.dumps({"tool": "saeforge", "version": __version__, "seconds": dt, "tokens": tokens,
                                 "tokens_per_s": tokens / dt, "model_dtype": args.model_dtype,
                                 "matmul_dtype": args.matmul_dtype or None,
                                 "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                 "sae_dir": os.path.join(args.out, "run", "saes", "layers.5.resid_post")}))


if __name__ == "__main__":
    main()
