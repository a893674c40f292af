"""Activation caching throughput against its bound, in one run.

Measures, on the embedded model (SmolLM2-135M-Instruct) at the site after decoder layer 6 (`layers.5.resid_post`):
  bare   the truncated forward pass alone: the model cut to its first 6 layers, on pre-tokenized contexts (the bound);
  full   the full forward pass to logits (what a tool that cannot stop early pays);
  cache  `saeforge cache` end to end (tokenizing, reading with early stop, dropping special positions, writing shards).
Each mode runs in its own process (so peak memory is its own), interleaved A B C A B C; medians are reported.
Throughput counts model positions processed per second; the cache also reports vectors stored per second (BOS and
EOS positions are not stored). Target: cache ≥ 90 % of bare.

    python benchmarks/activations.py [--tokens 32768] [--repeats 3] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median, peak_rss_mb, write_result  # noqa: E402

LAYER = 5
SITE = f"layers.{LAYER}.resid_post"


def _contexts(lm, n_tokens, context_length):
    from saeforge.data.text_source import TextSource
    from saeforge.data.token_stream import TokenPolicy, TokenStream

    import torch

    ts = TokenStream.for_model(TextSource("embedded:train"), lm, TokenPolicy(context_length=context_length))
    n = -(-n_tokens // context_length)
    out = []
    for ctx in ts.contexts():
        out.append(torch.from_numpy(ctx))
        if len(out) == n:
            break
    return torch.stack(out)


def child(mode: str, args) -> dict:
    import torch
    from torch import nn

    from saeforge.models.language_model import LanguageModel

    lm = LanguageModel.load("embedded", dtype=args.dtype, device="cpu")
    if mode == "cache":
        from saeforge.data.activation_cache import CacheConfig, build_cache

        with tempfile.TemporaryDirectory() as tmp:
            warm = CacheConfig(out=f"{tmp}/warm", sites=(SITE,), tokens=args.batch_size * args.context_length // 2,
                               context_length=args.context_length, batch_size=args.batch_size, dtype=args.dtype)
            build_cache(warm, lm=lm, progress=False)
            cfg = CacheConfig(out=f"{tmp}/cache", sites=(SITE,), tokens=args.tokens, context_length=args.context_length,
                              batch_size=args.batch_size, dtype=args.dtype)
            t = time.perf_counter()
            cache = build_cache(cfg, lm=lm, progress=False)
            dt = time.perf_counter() - t
            positions = cache.shards[-1]["context_end"] * args.context_length
            return {"seconds": dt, "positions_per_s": positions / dt, "stored_per_s": cache.token_count / dt,
                    "peak_rss_mb": peak_rss_mb()}
    ids = _contexts(lm, args.tokens, args.context_length)
    model = lm.model
    if mode == "bare":
        model.model.layers = nn.ModuleList(list(model.model.layers)[: LAYER + 1])
        run = lambda x: model.model(input_ids=x, use_cache=False).last_hidden_state  # noqa: E731
    else:
        run = lambda x: model(input_ids=x, use_cache=False).logits  # noqa: E731
    with torch.inference_mode():
        run(ids[: args.batch_size])
        t = time.perf_counter()
        for b in range(0, ids.shape[0], args.batch_size):
            run(ids[b:b + args.batch_size])
        dt = time.perf_counter() - t
    return {"seconds": dt, "positions_per_s": ids.numel() / dt, "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--context-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--child", choices=["bare", "full", "cache"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    runs = {"bare": [], "full": [], "cache": []}
    for r in range(args.repeats):
        for mode in runs:
            cmd = [sys.executable, __file__, "--child", mode] + [f"--{k.replace('_', '-')}={v}" for k, v in
                                                                 vars(args).items() if k != "child"]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"{mode} failed:\n{out.stderr[-3000:]}")
            runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  run {r + 1}/{args.repeats} {mode:<5} {runs[mode][-1]['positions_per_s']:8.0f} positions/s",
                  flush=True)
    summary = {m: {"positions_per_s": median([x["positions_per_s"] for x in rs]),
                   "peak_rss_mb": max(x["peak_rss_mb"] for x in rs)} for m, rs in runs.items()}
    summary["cache"]["stored_per_s"] = median([x["stored_per_s"] for x in runs["cache"]])
    bare = summary["bare"]["positions_per_s"]
    print(f"\nembedded model, {SITE}, context {args.context_length}, batch {args.batch_size} contexts, "
          f"{args.dtype}, {args.tokens} tokens, median of {args.repeats}")
    print(f"{'mode':<8}{'positions/s':>14}{'vs bare':>10}{'peak RSS MB':>14}")
    for m in ("bare", "full", "cache"):
        s = summary[m]
        print(f"{m:<8}{s['positions_per_s']:>14.0f}{s['positions_per_s'] / bare:>9.0%}{s['peak_rss_mb']:>14.0f}")
    ratio = summary["cache"]["positions_per_s"] / bare
    print(f"cache stores {summary['cache']['stored_per_s']:.0f} vectors/s; cache/bare = {ratio:.1%} "
          f"(target ≥ 90 %: {'met' if ratio >= 0.9 else 'NOT met'})")
    path = write_result(f"activations_{args.dtype}", {"machine": machine(), "settings": vars(args),
                                                        "summary": summary, "runs": runs,
                                                        "cache_over_bare": ratio})
    print(f"written {path}")


if __name__ == "__main__":
    main()
