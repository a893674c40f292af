"""Harvest throughput against the bare activation read, in one run.

On the embedded model and a trained SAE (a run directory; default: the demo's), streams the same held-out tokens
(validation plays) through (a) `LanguageModel.read` alone, stopped after the SAE's site — the bound — and (b) the
streaming pass of `saeforge harvest` (read + encode + keep the nonzero latents), interleaved A B A B; then reports the
whole harvest (streaming plus building the feature store). Target: streaming ≥ 80 % of the bare read.

    python benchmarks/harvest.py [RUN_DIR] [--tokens 16384] [--repeats 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import machine, median, write_result  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", nargs="?", default="")
    ap.add_argument("--tokens", type=int, default=16_384)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()

    import shutil

    import torch

    from saeforge.data.text_source import TextSource
    from saeforge.data.token_stream import TokenStream
    from saeforge.features.harvest import HarvestConfig, harvest
    from saeforge.features.store import FeatureStore
    from saeforge.home import saeforge_home
    from saeforge.runs import load_run

    run_dir = Path(args.run or saeforge_home() / "runs" / "demo" / "run")
    run = load_run(run_dir, device="cpu")
    lm = run.lm
    T = run.context_length()
    tokens = TokenStream.for_model(TextSource("embedded:validation"), lm, run.token_policy())
    n_ctx = -(-args.tokens // T)
    batches = []
    for _, ids in tokens.batches(args.batch_size):
        batches.append(ids)
        if sum(b.shape[0] for b in batches) >= n_ctx:
            break

    def bare() -> float:
        t = time.perf_counter()
        for ids in batches:
            lm.read(ids, run.sites)
        return sum(b.numel() for b in batches) / (time.perf_counter() - t)

    bare()  # warm-up
    bare_rates, stream_rates, total_s = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            bare_rates.append(bare())
            copy = Path(tmp) / "run"
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("features.sqlite", "checkpoints"))
            t = time.perf_counter()
            path = harvest(HarvestConfig(path=str(copy), tokens=args.tokens, batch_size=args.batch_size, device="cpu",
                                         progress=False))
            total_s.append(time.perf_counter() - t)
            with FeatureStore(path, readonly=True) as store:
                stream_rates.append(store.meta("stream_tokens_per_s"))
    b, s = median(bare_rates), median(stream_rates)
    print(f"embedded model, {', '.join(run.sites)}, {args.tokens:,} held-out tokens, batch {args.batch_size} contexts, "
          f"median of {args.repeats}")
    print(f"  bare read (stops after the site): {b:8.0f} tokens/s")
    print(f"  harvest streaming pass:           {s:8.0f} tokens/s  ({s / b:.0%} of the bare read; target ≥ 80 %)")
    print(f"  whole harvest incl. the store:    {median(total_s):8.1f} s")
    path = write_result("harvest", {"machine": machine(), "run": str(run_dir), "tokens": args.tokens,
                                    "bare_tokens_per_s": b, "stream_tokens_per_s": s, "ratio": s / b,
                                    "harvest_seconds": median(total_s), "threads": torch.get_num_threads()})
    print(f"written {path}")


if __name__ == "__main__":
    main()
