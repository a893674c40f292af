"""``saeforge eval``: evaluate the SAEs of a run (or one SAE folder) on held-out text and write ``eval.json``."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from simple_parsing.helpers import field

from saeforge.errors import SaeforgeError
from saeforge.evals.downstream import DownstreamStats, LogitReference, replace_at
from saeforge.evals.reconstruction import ReconstructionStats
from saeforge.models.sites import SITE_KINDS
from saeforge.options import HeldOutTextOptions, RunModelAndDtypeOptions, RuntimeOptions, flat_dict, flat_options
from saeforge.utils.atomic import atomic_write_json

EVAL_SCHEMA = "saeforge-eval"
EVAL_SCHEMA_VERSION = 1
MIN_MEANINGFUL_TOKENS = 4096
PREFIX_CACHE_BYTES = 1 << 30
"""What the first pass keeps for the second (the hidden states entering the first edited block, per batch); the
batches beyond it are read again."""


@flat_options
@dataclass(frozen=True)
class EvalConfig:
    """Evaluate SAEs on held-out text: reconstruction, sparsity, and CE loss / KL with the SAE spliced into the model.
    A transcoder (reads one site, writes another) is evaluated as a replacement of the site it writes."""

    path: str = field(default="", positional=True)
    """A run directory (every SAE under saes/) or one SAE folder (cfg.json + weights)."""
    site: str = ""
    """Site the SAE reads and replaces; empty: the sites its metadata names (for an SAE from elsewhere whose hook
    name is not a saeforge site, give the saeforge site name)."""
    tokens: int = 16_384
    """Token positions to evaluate (contexts × context length)."""
    batch_size: int = 8
    """Contexts per forward pass."""
    model_options: RunModelAndDtypeOptions = field(default_factory=RunModelAndDtypeOptions)
    """The model the SAEs are spliced into."""
    text_options: HeldOutTextOptions = field(default_factory=HeldOutTextOptions)
    """The held-out text (evaluating on the training text is refused unless --allow-training-text)."""
    plots: bool = True
    """Write PNG plots (feature density, L0 per token, activation magnitudes) beside eval.json."""
    allow_training_text: bool = False
    """Allow evaluating on the SAE's training corpus (normally refused)."""
    runtime_options: RuntimeOptions = field(default_factory=RuntimeOptions)
    """Where and how the model runs."""


@dataclass
class _Target:
    name: str
    bound: Any  # saeforge.runs.BoundSAE
    recon: ReconstructionStats
    down: DownstreamStats

    @property
    def reads(self) -> str:
        return self.bound.read_site.name

    @property
    def writes(self) -> str:
        return self.bound.write_site.name


def _targets(cfg: EvalConfig, run) -> list[_Target]:
    targets = []
    for name, b in run.saes.items():
        if b.kind not in ("sae", "transcoder"):
            raise SaeforgeError(f"{name} is a {b.kind} (reads {', '.join(s.name for s in b.reads)}; writes "
                                f"{', '.join(s.name for s in b.writes)})",
                                "saeforge eval handles SAEs and transcoders (one site read, one written); evaluate "
                                "those of the run one folder at a time: saeforge eval RUN_DIR/saes/NAME")
        reads, writes = b.read_site, b.write_site
        if (b.is_transcoder and {reads.kind, writes.kind} <= set(SITE_KINDS) and reads.order > writes.order):
            raise SaeforgeError(f"transcoder {name} reads {reads.name}, which the model computes after "
                                f"{writes.name}, the site it replaces", "check its metadata.reads and .writes")
        if not cfg.allow_training_text and b.meta.get("dataset_path") == cfg.corpus:
            raise SaeforgeError(f"SAE {name} was trained on {cfg.corpus}; evaluating on its training text overstates it",
                                "evaluate on held-out text (--corpus embedded:validation, or another file), or pass "
                                "--allow-training-text")
        targets.append(_Target(name, b, ReconstructionStats(writes.d, b.sae.cfg.d_sae, run.lm.device),
                               DownstreamStats()))
    return targets


class _Plan:
    """What the forwards of one batch read and from which block they start.

    Targets are grouped by the site they replace: the zero- and mean-ablation forwards of a site are shared by every
    target writing it. The first pass (:meth:`first_pass`) stops at the input of the earliest block any forward
    edits, having read the input of each group's first block, the replaced sites (for their means) and the sites read
    that a forward from there cannot see; later forwards run only the blocks after (``saeforge.models.suffix``),
    with logits bit-identical to full forwards."""

    def __init__(self, lm, targets: list[_Target]):
        from saeforge.models.suffix import first_block

        self.lm = lm
        self.groups: dict[str, list[_Target]] = {}
        for t in targets:
            self.groups.setdefault(t.writes, []).append(t)
        self.starts = {w: first_block(lm, [w]) for w in self.groups}
        self.start = min(self.starts.values())
        reads = sorted({t.reads for t in targets})
        self.early = [s for s in reads if first_block(lm, [s]) < self.start]  # read in the first pass
        self.late = sorted((set(reads) - set(self.early)) | set(self.groups))  # recorded in the clean forward
        self.buffers: dict[str, torch.Tensor] = {}  # LogitReference's, reused batch after batch

    def first_pass(self, ids: torch.Tensor):
        """({block: BlockInput}, {site: activation}) of a batch: the replaced sites and the early reads."""
        from saeforge.models.suffix import read_block_inputs

        return read_block_inputs(self.lm, ids, set(self.starts.values()), sorted(set(self.groups) | set(self.early)))

    @torch.inference_mode()
    def run(self, ids: torch.Tensor, keep: torch.Tensor, first, means: dict[str, torch.Tensor]) -> None:
        """Every forward of one batch: the clean one, then per replaced site each target spliced in and the two
        ablations, each measured against the clean distributions."""
        from saeforge.models.suffix import logits_from

        lm = self.lm
        inputs, early = first
        with lm.record(self.late) as acts:
            clean = logits_from(lm, inputs[self.start])
        acts = {**acts, **{s: early[s] for s in self.early}}
        reference = LogitReference(ids, keep, clean, self.buffers)
        del clean
        kept = keep.to(lm.device)
        for write, group in self.groups.items():
            start = inputs[self.starts[write]]
            target = acts[write][kept].float()
            for t in group:
                x = target if t.reads == write else acts[t.reads][kept].float()
                f = t.bound.sae.encode(x)
                x_hat = t.bound.sae.decode(f)
                t.recon.update(target, x_hat, f)
                t.down.add_clean(reference)
                with lm.edit({write: replace_at(keep, x_hat)}):
                    t.down.add("sae", reference.measure(logits_from(lm, start)))
            for mode, value in (("zero", None), ("mean", means[write])):
                with lm.edit({write: replace_at(keep, value)}):
                    measured = reference.measure(logits_from(lm, start))
                for t in group:
                    t.down.add(mode, measured)


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Run the evaluation; returns the eval.json content."""
    from saeforge.utils.threads import thread_policy

    if not cfg.path:
        raise SaeforgeError("no run or SAE folder given", "saeforge eval RUN_DIR (or an SAE folder)")
    if cfg.tokens <= 0:
        raise SaeforgeError(f"--tokens {cfg.tokens} asks for no tokens; eval.json would be rewritten from a single "
                            "context", f"pass a positive count, e.g. saeforge eval {cfg.path} --tokens 16384")
    from saeforge.data.text_source import TextSource

    TextSource(cfg.corpus, cfg.text_field).check()
    with thread_policy(cfg.threads):
        return _evaluate(cfg, Path(cfg.path))


def _evaluate(cfg: EvalConfig, path: Path) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from saeforge.data.text_source import TextSource
    from saeforge.data.token_stream import TokenStream
    from saeforge.runs import load_run

    run = load_run(path, model=cfg.model, device=cfg.device, dtype=cfg.dtype, site=cfg.site)
    lm, model_name = run.lm, cfg.model or run.meta.get("model_name")
    targets = _targets(cfg, run)
    plan = _Plan(lm, targets)
    ctx = run.context_length(cfg.context_length)
    tokens = TokenStream.for_model(TextSource(cfg.corpus, cfg.text_field), lm, run.token_policy(ctx))
    n_contexts = max(1, -(-cfg.tokens // ctx))

    def batches():
        seen = 0
        for _, ids in tokens.batches(cfg.batch_size):
            ids = ids[: n_contexts - seen]
            seen += ids.shape[0]
            yield ids
            if seen >= n_contexts:
                return

    def bar(desc: str):
        return tqdm(total=n_contexts * ctx, unit="tok", unit_scale=True, desc=desc, disable=not cfg.progress,
                    dynamic_ncols=True)

    # Pass 1 (early-stopped): the evaluation-set mean of each replaced site, for the mean-ablation baseline; what
    # it reads is kept for pass 2 (within PREFIX_CACHE_BYTES, else read again there).
    t0 = time.time()
    sums = {s: None for s in plan.groups}
    count = 0
    firsts, cached_bytes = [], 0
    with bar("reading") as progress:
        for ids in batches():
            keep = tokens.keep_mask(ids).to(lm.device)
            first = plan.first_pass(ids)
            for s in plan.groups:
                a = first[1][s][keep].double().sum(0)
                sums[s] = a if sums[s] is None else sums[s] + a
            count += int(keep.sum())
            kept = (first[0], {s: first[1][s] for s in plan.early})  # the replaced sites are done with
            size = sum(b.nbytes for b in kept[0].values()) + sum(a.numel() * a.element_size() for a in kept[1].values())
            firsts.append(kept if cached_bytes + size <= PREFIX_CACHE_BYTES else None)
            cached_bytes += size if firsts[-1] is not None else 0
            progress.update(ids.numel())
    if count == 0:
        raise SaeforgeError(f"the corpus {cfg.corpus!r} gave no tokens to evaluate", "use a larger corpus")
    means = {s: (sums[s] / count).float() for s in plan.groups}

    n_tokens = 0
    with bar("evaluating") as progress:
        for ids, first in zip(batches(), firsts):
            plan.run(ids, tokens.keep_mask(ids), first or plan.first_pass(ids), means)
            n_tokens += ids.numel()
            progress.update(ids.numel())
    firsts.clear()

    results: dict[str, Any] = {}
    for t in targets:
        metrics = {"site": t.writes, "kind": t.bound.kind, "reads": t.reads, "writes": t.writes,
                   "sae_path": str(t.bound.folder), "architecture": t.bound.sae.cfg.architecture,
                   "d_sae": t.bound.sae.cfg.d_sae, **t.recon.result(), **t.down.result()}
        if cfg.plots:
            from saeforge.evals.plots import eval_plots, have_matplotlib

            if have_matplotlib():
                files = eval_plots(t.bound.folder / "plots", t.name, t.recon.feature_density(),
                                   t.recon.l0_per_token(), t.recon.nonzero_activations())
                metrics["plots"] = [str(p) for p in files]
            else:
                metrics["plots"] = "matplotlib is not installed: pip install 'saeforge[plots]'"
        results[t.name] = metrics
    report = {"schema": EVAL_SCHEMA, "schema_version": EVAL_SCHEMA_VERSION,
              "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "model": model_name, "corpus": cfg.corpus,
              "context_length": ctx, "n_token_positions": n_tokens, "seconds": time.time() - t0,
              "config": flat_dict(cfg), "saes": results}
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
    """One row per SAE: the site it reads, the site it replaces (the same for an SAE; the metrics are of the
    replaced site), then the metrics."""
    rows = [["SAE", "reads", "replaces"] + [h for _, h, _ in TABLE_KEYS]]
    for name, m in report["saes"].items():
        rows.append([name, m.get("reads", m["site"]), m.get("writes", m["site"])] + [
            "nan" if m[k] is None or (isinstance(m[k], float) and math.isnan(m[k])) else format(m[k], fmt)
            for k, _, fmt in TABLE_KEYS])
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
