"""Quality at a longer budget: saeforge, SAELens and sparsify each train a TopK SAE (d_sae 4608, k 32, 4096 tokens
a step, each with its own default recipe) on the same cached activations of the embedded model's layer-6 residual
(`layers.5.resid_post`, context 128, the training plays), then saeforge's `eval` scores all of them on the same
held-out tokens (the validation plays).

    SAEFORGE_PEERS=/work/peers python benchmarks/quality_cached.py [--tokens 1048576] [--eval-tokens 8192]

benchmarks/quality.py scores the SAEs of the end-to-end run (131,072 tokens = 32 steps, bounded by the slowest
peer's end-to-end speed); this one trains from a cache so a budget people would use is affordable. The recipes:
- saeforge: `saeforge train --cache` with its defaults (Adam, lr 1e-3 / sqrt(d_sae / 2^14), AuxK, input scaled
  to E||x|| = sqrt(d), linear decay over the last 20 %);
- SAELens: its own `SAETrainer.fit()` with the trainer settings of its runner's defaults (benchmarks/peers/
  quality_saelens.py);
- sparsify: the per-step work of its `Trainer` with its default schedule-free Signum optimizer
  (benchmarks/peers/quality_sparsify.py).
The peers read one file of the cached vectors in a seeded random order; saeforge reads the cache through its own
shuffling stream. Tools left out of --tools keep the SAE their last run saved (so one tool can be redone).
Target: saeforge no worse on FVU and CE recovered than the best peer.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from quality import evaluate_tools  # noqa: E402

SITE = "layers.5.resid_post"
BATCH, D_SAE, K = 4096, 4608, 32


def shuffled_array(cache_dir: Path, out: Path, tokens: int, seed: int = 0) -> Path:
    """The cached vectors in one seeded random order, as one .npy the peers' environments can read."""
    import numpy as np
    import torch

    from saeforge.data.activation_cache import ActivationCache

    if out.exists() and np.load(out, mmap_mode="r").shape[0] == tokens:
        return out
    x = ActivationCache(cache_dir).load(SITE, max_tokens=tokens).float()
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    tmp = out.with_suffix(".tmp.npy")
    np.save(tmp, x[perm].numpy())
    os.replace(tmp, out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1_048_576, help="training tokens per tool (a multiple of 4096)")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--tools", nargs="+", default=["saeforge", "saelens", "sparsify"])
    ap.add_argument("--peers", default=os.environ.get("SAEFORGE_PEERS", str(HERE / ".work" / "peers")))
    ap.add_argument("--work", default=str(HERE / ".work" / "quality_cached"))
    args = ap.parse_args()
    if args.tokens % BATCH:
        sys.exit(f"--tokens must be a multiple of {BATCH}")
    steps = args.tokens // BATCH

    from saeforge.data.activation_cache import CacheConfig, build_cache
    from saeforge.training import TrainConfig, train

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cache_dir = work / "cache"
    build_cache(CacheConfig(out=str(cache_dir), sites=(SITE,), tokens=args.tokens))
    acts = shuffled_array(cache_dir, work / f"acts_{args.tokens}.npy", args.tokens)

    folders, info = {}, {}
    for tool in ("saeforge", "saelens", "sparsify"):
        last = work / tool / "quality.json"
        if tool not in args.tools and last.exists():
            info[tool] = json.loads(last.read_text())
            folders[tool] = Path(info[tool]["sae_dir"])
    for tool in args.tools:
        out = work / tool
        print(f"training {tool} on {args.tokens:,} tokens ({steps} steps) ...", flush=True)
        t = time.perf_counter()
        if tool == "saeforge":
            shutil.rmtree(out, ignore_errors=True)
            train(TrainConfig(out=str(out), cache=str(cache_dir), sites=(SITE,), tokens=args.tokens,
                              batch_size=BATCH, d_sae=D_SAE, k=K))
            info[tool] = {"tool": "saeforge", "tokens": args.tokens, "train_seconds": time.perf_counter() - t,
                          "sae_dir": str(out / "saes" / SITE)}
            (out / "quality.json").write_text(json.dumps(info[tool]))
            folders[tool] = out / "saes" / SITE
            continue
        python = Path(args.peers) / tool / "bin" / "python"
        if not python.exists():
            sys.exit(f"no {tool} venv at {python.parent.parent}: run benchmarks/setup_peers.sh (or set SAEFORGE_PEERS)")
        cmd = [str(python), str(HERE / "peers" / f"quality_{tool}.py"), "--acts", str(acts), "--out", str(out),
               "--steps", str(steps), "--batch", str(BATCH), "--d-sae", str(D_SAE), "--k", str(K)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("@@QUALITY ")]
        if proc.returncode != 0 or not lines:
            sys.exit(f"{tool} failed:\n{proc.stderr[-4000:]}")
        info[tool] = json.loads(lines[-1][len("@@QUALITY "):])
        (out / "quality.json").write_text(json.dumps(info[tool]))
        folders[tool] = Path(info[tool]["sae_dir"])
    stale = [t for t in folders if info[t].get("tokens", args.tokens) != args.tokens]
    if stale:
        sys.exit(f"the saved SAEs of {stale} were trained on another budget: rerun them with --tools")
    evaluate_tools(folders, {t: args.tokens for t in folders}, args.eval_tokens, work / "quality_run",
                   "quality_cached" if args.tokens == 1_048_576 else f"quality_cached_{args.tokens}", f"quality after {args.tokens:,} training tokens from one cache",
                   extra={"recipes": info})


if __name__ == "__main__":
    main()
