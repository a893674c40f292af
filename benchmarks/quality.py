"""Quality at equal tokens and equal L0: the TopK SAEs that benchmarks/end_to_end.py trained (every tool: the same
model, site, context, token budget, d_sae 4608 and k 32, each with its own defaults) evaluated by saeforge's `eval`
on the same held-out tokens (the validation plays), so one set of (correct) formulas scores them all.

    python benchmarks/quality.py [--tokens 8192]

Each foreign SAE is read with `saeforge.formats.load_any` (its own format) and written as a saeforge folder with the
site's metadata; the BOS position is excluded for all. Target: saeforge no worse on FVU and CE recovered than the
best peer.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import machine, write_result  # noqa: E402

KEYS = ("fvu", "explained_variance", "l0", "dead_fraction", "ce_loss_clean", "ce_loss_sae", "ce_recovered",
        "ce_recovered_mean_ablation", "kl_div")


def sae_folder(tool_dir: Path) -> Path:
    """The saved SAE inside a tool's end-to-end output."""
    report = json.loads((tool_dir / "e2e.json").read_text())
    folder = Path(report["sae_dir"])
    if folder.name == "sparsify" or not (folder / "cfg.json").exists():
        hits = sorted(p.parent for p in folder.rglob("cfg.json"))
        if not hits:
            raise SystemExit(f"no saved SAE under {folder}")
        folder = hits[0]
    return folder


def evaluate_tools(folders: dict[str, Path], training_tokens: dict[str, int], eval_tokens: int, run: Path,
                   result_name: str, title: str, extra: dict | None = None) -> dict:
    """Evaluate each tool's saved SAE with saeforge's `eval` on the same held-out tokens, print the table and the
    verdict (saeforge no worse than the best peer on FVU and CE recovered), and write ``results/{result_name}.json``."""
    from saeforge.evals.evaluate import EvalConfig, evaluate
    from saeforge.formats import load_any, save_as

    if run.exists():
        shutil.rmtree(run)
    meta = {"hook_name": "layers.5.resid_post", "model_name": "embedded", "context_size": 128, "prepend_bos": True,
            "exclude_special_tokens": True, "dataset_path": "embedded:train"}
    for tool, folder in folders.items():
        save_as(load_any(folder, d_in=576), run / "saes" / tool, "saeforge", metadata=meta)
    report = evaluate(EvalConfig(path=str(run), corpus="embedded:validation", tokens=eval_tokens, plots=False))
    print(f"\n{title}, evaluated by saeforge on {report['n_token_positions']:,} held-out token positions "
          f"(training tokens: {training_tokens})")
    widths = [max(10, len(k)) + 2 for k in KEYS]
    print(f"{'tool':<15}" + "".join(f"{k:>{w}}" for k, w in zip(KEYS, widths)))
    for tool, m in report["saes"].items():
        print(f"{tool:<15}" + "".join(f"{m[k]:>{w}.4f}" if isinstance(m[k], float) else f"{str(m[k]):>{w}}"
                                      for k, w in zip(KEYS, widths)))
    results = {tool: {k: m[k] for k in KEYS} for tool, m in report["saes"].items()}
    peers = [t for t in results if not t.startswith("saeforge")]
    verdict = {}
    for ours in (t for t in results if t.startswith("saeforge")):
        if peers:
            best_fvu = min(results[p]["fvu"] for p in peers)
            best_ce = max(results[p]["ce_recovered"] for p in peers)
            verdict[ours] = {"fvu_no_worse": results[ours]["fvu"] <= best_fvu,
                             "ce_recovered_no_worse": results[ours]["ce_recovered"] >= best_ce}
    print(json.dumps(verdict, indent=1))
    data = {"machine": machine(), "eval_tokens": report["n_token_positions"], "training_tokens": training_tokens,
            **(extra or {}), "results": results, "verdict": verdict}
    path = write_result(result_name, data)
    print(f"written {path}")
    return data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--work", default=str(HERE / ".work" / "e2e"))
    args = ap.parse_args()

    work = Path(args.work)
    tools = [p.name for p in sorted(work.iterdir()) if (p / "e2e.json").exists()]
    if not tools:
        raise SystemExit(f"no end-to-end outputs in {work}: run benchmarks/end_to_end.py first")
    folders = {tool: sae_folder(work / tool) for tool in tools}
    tokens = {tool: json.loads((work / tool / "e2e.json").read_text())["tokens"] for tool in tools}
    evaluate_tools(folders, tokens, args.tokens, work / "quality_run", "quality",
                   "quality of the end-to-end SAEs")


if __name__ == "__main__":
    main()
