"""``saeforge eval``: evaluate the SAEs of a run (or one SAE folder) on held-out text and write ``eval.json``."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from simple_parsing.helpers import field

from saeforge.errors import SaeforgeError
from saeforge.evals.downstream import DownstreamStats, splice
from saeforge.evals.reconstruction import ReconstructionStats
from saeforge.utils.atomic import atomic_write_json

EVAL_SCHEMA = "saeforge-eval"
EVAL_SCHEMA_VERSION = 1
MIN_MEANINGFUL_TOKENS = 4096


@dataclass(frozen=True)
class EvalConfig:
    """Evaluate SAEs on held-out text: reconstruction, sparsity, and CE loss / KL with the SAE spliced into the model."""

    path: str = field(default="", positional=True)
    """A run directory (every SAE under saes/) or one SAE folder (cfg.json + weights)."""
    model: str = ""
    """Model; empty: the one the SAE was trained on (its metadata)."""
    site: str = ""
    """Site; empty: the SAE's hook_name (for an SAE from elsewhere, give the saeforge site name)."""
    corpus: str = "embedded:validation"
    """Held-out text (never the training text): embedded:validation, a .txt file or folder, .jsonl, hf:NAME."""
    text_field: str = "text"
    """Field holding the text in .jsonl files and hf: datasets."""
    tokens: int = 16_384
    """Token positions to evaluate (contexts × context length)."""
    context_length: int = 0
    """Tokens per context; 0: the SAE's training context length."""
    batch_size: int = 8
    """Contexts per forward pass."""
    dtype: str = "float32"
    """Model dtype."""
    device: str = "auto"
    """auto, cpu or cuda."""
    plots: bool = True
    """Write PNG plots (feature density, L0 per token, activation magnitudes) beside eval.json."""
    allow_training_text: bool = False
    """Allow evaluating on the SAE's training corpus (normally refused)."""
    progress: bool = True
    """Show a progress bar."""


@dataclass
class _Target:
    name: str
    folder: Path
    sae: Any
    site: str
    meta: dict
    recon: ReconstructionStats
    down: DownstreamStats


def _targets(cfg: EvalConfig, run) -> list[_Target]:
    targets = []
    for name, r in run.saes.items():
        if r.meta.get("hook_name_out"):
            raise SaeforgeError(f"{name} is a transcoder ({r.site.name} → {r.meta['hook_name_out']})",
                                "saeforge eval handles SAEs; transcoder evaluation is not built yet")
        if not cfg.allow_training_text and r.meta.get("dataset_path") == cfg.corpus:
            raise SaeforgeError(f"SAE {name} was trained on {cfg.corpus}; evaluating on its training text overstates it",
                                "evaluate on held-out text (--corpus embedded:validation, or another file), or pass "
                                "--allow-training-text")
        targets.append(_Target(name, r.folder, r.sae, r.site.name, r.meta,
                               ReconstructionStats(r.sae.cfg.d_in, r.sae.cfg.d_sae, run.lm.device), DownstreamStats()))
    return targets


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Run the evaluation; returns the eval.json content."""
    from tqdm.auto import tqdm

    from saeforge.data.text_source import TextSource
    from saeforge.data.token_stream import TokenStream
    from saeforge.runs import load_run

    if not cfg.path:
        raise SaeforgeError("no run or SAE folder given", "saeforge eval RUN_DIR (or an SAE folder)")
    if cfg.tokens <= 0:
        raise SaeforgeError(f"--tokens {cfg.tokens} asks for no tokens; eval.json would be rewritten from a single "
                            "context", f"pass a positive count, e.g. saeforge eval {cfg.path} --tokens 16384")
    path = Path(cfg.path)
    run = load_run(path, model=cfg.model, device=cfg.device, dtype=cfg.dtype, site=cfg.site)
    lm, model_name = run.lm, cfg.model or run.meta.get("model_name")
    targets = _targets(cfg, run)
    ctx = run.context_length(cfg.context_length)
    tokens = TokenStream.for_model(TextSource(cfg.corpus, cfg.text_field), lm, run.token_policy(ctx))
    n_contexts = max(1, -(-cfg.tokens // ctx))
    sites = sorted({t.site for t in targets})

    def batches():
        seen = 0
        for _, ids in tokens.batches(cfg.batch_size):
            ids = ids[: n_contexts - seen]
            seen += ids.shape[0]
            yield ids
            if seen >= n_contexts:
                return

    # Pass 1 (early-stopped reads): the evaluation-set mean of each site, for the mean-ablation baseline.
    sums = {s: None for s in sites}
    count = {s: 0 for s in sites}
    for ids in batches():
        keep = tokens.keep_mask(ids).to(lm.device)
        for s, act in lm.read(ids, sites).items():
            a = act[keep].double().sum(0)
            sums[s] = a if sums[s] is None else sums[s] + a
            count[s] += int(keep.sum())
    if not count or min(count.values()) == 0:
        raise SaeforgeError(f"the corpus {cfg.corpus!r} gave no tokens to evaluate", "use a larger corpus")
    means = {s: (sums[s] / count[s]).float() for s in sites}

    t0 = time.time()
    bar = tqdm(total=n_contexts * ctx, unit="tok", unit_scale=True, desc="evaluating", disable=not cfg.progress,
               dynamic_ncols=True)
    n_tokens = 0
    for ids in batches():
        keep = tokens.keep_mask(ids)
        with lm.record(sites) as captured:
            clean = lm.logits(ids)
        for t in targets:
            t.down.update_clean(ids, keep, clean)
            with torch.inference_mode():
                x = captured[t.site][keep.to(lm.device)].float()
                f = t.sae.encode(x)
                t.recon.update(x, t.sae.decode(f), f)
            for mode in DownstreamStats.MODES:
                with lm.edit({t.site: splice(t.sae, keep, mode, means[t.site])}):
                    t.down.update(mode, lm.logits(ids))
        n_tokens += ids.numel()
        bar.update(ids.numel())
    bar.close()

    results: dict[str, Any] = {}
    for t in targets:
        metrics = {"site": t.site, "sae_path": str(t.folder), "architecture": t.sae.cfg.architecture,
                   "d_sae": t.sae.cfg.d_sae, **t.recon.result(), **t.down.result()}
        if cfg.plots:
            from saeforge.evals.plots import eval_plots, have_matplotlib

            if have_matplotlib():
                files = eval_plots(t.folder / "plots", t.name, t.recon.feature_density(), t.recon.l0_per_token(),
                                   t.recon.nonzero_activations())
                metrics["plots"] = [str(p) for p in files]
            else:
                metrics["plots"] = "matplotlib is not installed: pip install 'saeforge[plots]'"
        results[t.name] = metrics
    report = {"schema": EVAL_SCHEMA, "schema_version": EVAL_SCHEMA_VERSION,
              "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "model": model_name, "corpus": cfg.corpus,
              "context_length": ctx, "n_token_positions": n_tokens, "seconds": time.time() - t0,
              "config": asdict(cfg), "saes": results}
    if n_tokens < MIN_MEANINGFUL_TOKENS:
        report["warning"] = (f"only {n_tokens} token positions were evaluated; below {MIN_MEANINGFUL_TOKENS} the "
                             "metrics are noisy (pass --tokens with more)")
    out = path / "eval.json"
    atomic_write_json(out, _finite(report))
    report["path"] = str(out)
    return report


def _finite(obj):
    """JSON has no NaN: write null instead."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


TABLE_KEYS = (("fvu", "FVU", ".4f"), ("explained_variance", "EV", ".1%"), ("mse", "MSE", ".4g"), ("l0", "L0", ".1f"),
              ("dead_fraction", "dead", ".1%"), ("ce_loss_clean", "CE clean", ".4f"), ("ce_loss_sae", "CE SAE", ".4f"),
              ("ce_loss_zero_ablation", "CE zero", ".4f"), ("ce_recovered", "CE rec.", ".1%"),
              ("kl_div", "KL", ".4f"))


def format_table(report: dict) -> str:
    rows = [["SAE"] + [h for _, h, _ in TABLE_KEYS]]
    for name, m in report["saes"].items():
        rows.append([name] + ["nan" if m[k] is None or (isinstance(m[k], float) and math.isnan(m[k])) else
                              format(m[k], fmt) for k, _, fmt in TABLE_KEYS])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def run_eval(cfg: EvalConfig) -> dict:
    report = evaluate(cfg)
    print(f"evaluated {report['n_token_positions']:,} token positions of {report['corpus']} "
          f"(context {report['context_length']}) in {report['seconds']:.0f} s")
    print(format_table(report))
    if "warning" in report:
        print(f"warning: {report['warning']}")
    print(f"written {report['path']}")
    return report
