"""End to end, from the embedded model to a trained TopK SAE: saeforge vs SAELens's runner vs sparsify's Trainer.

Each tool reads the residual stream after decoder layer 6 (saeforge `layers.5.resid_post`, SAELens/HF hook
`model.layers.5`, sparsify layer 5) of SmolLM2-135M-Instruct (the embedded model, as a plain HF folder), context 128,
4096 tokens a step, d_sae 4608, k 32, float32 SAEs, on the Shakespeare training plays; each runs in its own process
(its own peak memory), one after the other on a quiet machine, and reports tokens/s over its whole training call.
saeforge runs twice: with the model in float32 (the same arithmetic as the peers) and in bfloat16 (its fast
setting; the SAE stays float32).

    SAEFORGE_PEERS=/work/peers python benchmarks/end_to_end.py [--tokens 131072] [--tools saeforge saeforge_bf16 saelens sparsify]

Target: saeforge ≥ 2× SAELens end to end. The trained SAEs stay in benchmarks/.work/e2e/ for benchmarks/quality.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import machine, write_result  # noqa: E402

TOOLS = ("saeforge", "saeforge_bf16", "saelens", "sparsify")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=131_072)
    ap.add_argument("--tools", nargs="+", default=list(TOOLS), choices=TOOLS)
    ap.add_argument("--peers", default=os.environ.get("SAEFORGE_PEERS", str(HERE / ".work" / "peers")))
    ap.add_argument("--work", default=str(HERE / ".work" / "e2e"))
    args = ap.parse_args()

    from saeforge.data.text_source import TextSource
    from saeforge.models.embedded import ensure_embedded_model

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = ensure_embedded_model()
    texts = work / "shakespeare_train.json"
    texts.write_text(json.dumps(list(TextSource("embedded:train").documents())))

    # Tools not re-run keep their figures from the last run with the same token budget (so one tool can be redone).
    previous = HERE / "results" / "end_to_end.json"
    results = {}
    if previous.exists():
        last = json.loads(previous.read_text())
        if last.get("tokens") == args.tokens:
            results = {k: v for k, v in last["results"].items() if k not in args.tools}
    for tool in args.tools:
        out = work / tool
        if out.exists():
            import shutil

            shutil.rmtree(out)
        common = ["--tokens", str(args.tokens), "--out", str(out)]
        if tool.startswith("saeforge"):
            cmd = [sys.executable, str(HERE / "peers" / "e2e_saeforge.py"), *common]
            if tool == "saeforge_bf16":
                cmd += ["--model-dtype", "bfloat16"]
        else:
            python = Path(args.peers) / tool / "bin" / "python"
            if not python.exists():
                sys.exit(f"no {tool} venv at {python.parent.parent}: run benchmarks/setup_peers.sh "
                         f"(or set SAEFORGE_PEERS)")
            cmd = [str(python), str(HERE / "peers" / f"e2e_{tool}.py"), "--model-dir", str(model_dir),
                   "--texts", str(texts), *common]
        print(f"running {tool} ...", flush=True)
        t = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("@@E2E ")]
        if proc.returncode != 0 or not lines:
            sys.exit(f"{tool} failed:\n{proc.stderr[-4000:]}")
        results[tool] = json.loads(lines[-1][len("@@E2E "):])
        (out / "e2e.json").write_text(json.dumps(results[tool], indent=1))
        print(f"  {tool}: {results[tool]['tokens_per_s']:.0f} tokens/s ({time.time() - t:.0f} s wall)", flush=True)

    print(f"\nend to end, embedded model → TopK SAE (layer 6 residual, ctx 128, d_sae 4608, k 32), "
          f"{args.tokens:,} tokens")
    print(f"{'tool':<15}{'tokens/s':>10}{'vs SAELens':>12}{'vs sparsify':>13}{'peak RSS MB':>13}")
    for tool in [t for t in TOOLS if t in results]:
        r = results[tool]
        vs = lambda peer: f"{r['tokens_per_s'] / results[peer]['tokens_per_s']:.2f}x" if peer in results else "-"  # noqa
        print(f"{tool:<15}{r['tokens_per_s']:>10.0f}{vs('saelens'):>12}{vs('sparsify'):>13}{r['peak_rss_mb']:>13.0f}")
    ratios = {f"{a}/{b}": results[a]["tokens_per_s"] / results[b]["tokens_per_s"]
              for a in results if a.startswith("saeforge") for b in ("saelens", "sparsify") if b in results}
    path = write_result("end_to_end", {"machine": machine(), "tokens": args.tokens, "results": results,
                                       "ratios": ratios})
    print(f"written {path}")


if __name__ == "__main__":
    main()
