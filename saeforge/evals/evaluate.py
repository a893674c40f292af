"""``saeforge eval``: evaluate the SAEs of a run (or one SAE folder) on held-out text and write ``eval.json``."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from simple_parsing.helpers import field

from saeforge.errors import SaeforgeError
from saeforge.evals.downstream import DownstreamStats, LogitReference, replace_at
from saeforge.evals.reconstruction import ReconstructionStats
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
    Transcoders, cross-layer transcoders and crosscoders are evaluated as replacements of every site they write
    (docs/coders.md): FVU per written site, CE loss / KL with all of them replaced."""

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
    replacement: Any  # saeforge.evals.replacement.Replacement
    recon: ReconstructionStats  # over every written site together (all latents)
    site_recon: dict[str, ReconstructionStats]  # per written site, when it writes several
    down: DownstreamStats
    per_site: dict[str, DownstreamStats]  # a crosscoder: each written site replaced alone

    @property
    def reads(self) -> list[str]:
        return self.replacement.reads

    @property
    def writes(self) -> tuple[str, ...]:
        return tuple(self.replacement.writes)


def _target(name: str, bound, device) -> _Target:
    from saeforge.evals.replacement import replacement_for

    rep = replacement_for(bound)
    d_out, d_sae = sum(rep.widths), int(bound.sae.cfg.d_sae)
    per_layer = d_sae // len(rep.writes) if rep.layerwise else d_sae  # a CLT layer's own features write it
    sites = {w: ReconstructionStats(d, per_layer, device) for w, d in zip(rep.writes, rep.widths)} \
        if len(rep.writes) > 1 else {}
    return _Target(name, bound, rep, ReconstructionStats(d_out, d_sae, device), sites, DownstreamStats(),
                   {w: DownstreamStats() for w in rep.writes} if rep.per_site else {})


def _targets(cfg: EvalConfig, run) -> list[_Target]:
    targets = []
    for name, b in run.saes.items():
        if not cfg.allow_training_text and b.meta.get("dataset_path") == cfg.corpus:
            raise SaeforgeError(f"SAE {name} was trained on {cfg.corpus}; evaluating on its training text "
                                "overstates it",
                                "evaluate on held-out text (--corpus embedded:validation, or another file), or pass "
                                "--allow-training-text")
        targets.append(_target(name, b, run.lm.device))
    return targets


class _Plan:
    """What the forwards of one batch read and from which block each starts.

    Targets are grouped by the sites they write: the zero- and mean-ablation forwards of a group are shared by every
    target in it. The first pass (:meth:`first_pass`) stops at the input of the earliest block any forward edits,
    having read the input of every block a forward starts from, the written sites (for their means) and the sites
    read that a forward from there cannot see; later forwards run only the blocks from their first edited one on
    (``saeforge.models.suffix``), with logits bit-identical to full forwards."""

    def __init__(self, lm, targets: list[_Target]):
        from saeforge.models.suffix import first_block

        self.lm = lm
        self.groups: dict[tuple[str, ...], list[_Target]] = {}
        for t in targets:
            self.groups.setdefault(t.writes, []).append(t)
        self.group_start = {w: first_block(lm, list(w)) for w in self.groups}
        self.target_start = {t.name: first_block(lm, t.replacement.edited_sites) for t in targets}
        self.site_start = {w: first_block(lm, [w]) for t in targets if t.per_site for w in t.writes}
        self.starts = set(self.group_start.values()) | set(self.target_start.values()) | set(self.site_start.values())
        self.start = min(self.starts)
        reads = sorted({s for t in targets for s in t.reads})
        self.written = sorted({w for t in targets for w in t.writes})
        self.early = [s for s in reads if first_block(lm, [s]) < self.start]  # read in the first pass
        self.late = sorted((set(reads) - set(self.early)) | set(self.written))  # recorded in the clean forward
        self.buffers: dict[str, torch.Tensor] = {}  # LogitReference's, reused batch after batch

    def first_pass(self, ids: torch.Tensor):
        """({block: BlockInput}, {site: activation}) of a batch: the written sites and the early reads."""
        from saeforge.models.suffix import read_block_inputs

        return read_block_inputs(self.lm, ids, self.starts, sorted(set(self.written) | set(self.early)))

    @torch.inference_mode()
    def run(self, ids: torch.Tensor, keep: torch.Tensor, first, means: dict[str, torch.Tensor]) -> None:
        """Every forward of one batch: the clean one, then per group of written sites each target's replaced
        forward (and a crosscoder's per-site ones) and the two ablations, each measured against the clean
        distributions."""
        from saeforge.models.suffix import logits_from

        lm = self.lm
        inputs, early = first
        with lm.record(self.late) as acts:
            clean = logits_from(lm, inputs[self.start])
        acts = {**acts, **{s: early[s] for s in self.early}}
        reference = LogitReference(ids, keep, clean, self.buffers)
        del clean
        kept = keep.to(lm.device)

        def measure(edits: dict, start: int) -> tuple[float, float]:
            with lm.edit(edits):
                return reference.measure(logits_from(lm, inputs[start]))

        for writes, group in self.groups.items():
            ys = [acts[w][kept].float() for w in writes]
            for t in group:
                out = t.replacement.clean([acts[r][kept].float() for r in t.reads])
                t.recon.update(torch.cat(ys, -1) if len(ys) > 1 else ys[0],
                               torch.cat(out.outputs, -1) if len(ys) > 1 else out.outputs[0], out.latents)
                for j, w in enumerate(t.site_recon):
                    t.site_recon[w].update(ys[j], out.outputs[j], out.site_latents[j])
                t.down.add_clean(reference)
                t.down.add("sae", measure(t.replacement.edits(keep, out), self.target_start[t.name]))
                for j, w in enumerate(t.per_site):
                    t.per_site[w].add_clean(reference)
                    t.per_site[w].add("sae", measure({w: replace_at(keep, out.outputs[j])}, self.site_start[w]))
            for mode in ("zero", "mean"):
                measured = measure({w: replace_at(keep, None if mode == "zero" else means[w]) for w in writes},
                                   self.group_start[writes])
                for t in group:
                    t.down.add(mode, measured)


def evaluate_dictionaries(lm, saes: dict[str, Any] | list[_Target],
                          batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]], *, n_tokens: int = 0,
                          progress: bool = False, source: str = "the evaluation text"
                          ) -> tuple[dict[str, dict], list[_Target], int]:
    """Evaluate every dictionary of ``saes`` (``{name: BoundSAE}``, any kind; or targets already built) as a
    replacement of the sites it writes (:mod:`saeforge.evals.replacement`) on the batches ``batches()`` yields
    (``(input_ids [B, T], keep [B, T])``; called twice, it must yield the same batches).

    Returns ``({name: metrics}, targets, token positions)``. The metrics of one dictionary: its reconstruction
    figures over every written site together, its CE/KL figures with every written site replaced
    (:class:`~saeforge.evals.downstream.DownstreamStats`), and for a dictionary writing several sites ``sites``
    (per written site) and, for a crosscoder, ``per_site`` (each site replaced alone)."""
    from tqdm.auto import tqdm

    targets = [_target(name, b, lm.device) for name, b in saes.items()] if isinstance(saes, dict) else saes
    plan = _Plan(lm, targets)

    def bar(desc: str):
        return tqdm(total=n_tokens or None, unit="tok", unit_scale=True, desc=desc, disable=not progress,
                    dynamic_ncols=True)

    # Pass 1 (early-stopped): the evaluation-set mean of each written site, for the mean-ablation baseline; what
    # it reads is kept for pass 2 (within PREFIX_CACHE_BYTES, else read again there).
    sums: dict[str, torch.Tensor | None] = {s: None for s in plan.written}
    count = positions = 0
    firsts, cached_bytes = [], 0
    with bar("reading") as pbar:
        for ids, keep in batches():
            keep = keep.to(lm.device)
            first = plan.first_pass(ids)
            for s in plan.written:
                a = first[1][s][keep].double().sum(0)
                sums[s] = a if sums[s] is None else sums[s] + a
            count += int(keep.sum())
            kept = (first[0], {s: first[1][s] for s in plan.early})  # the written sites are done with
            size = sum(b.nbytes for b in kept[0].values()) + sum(a.numel() * a.element_size() for a in kept[1].values())
            firsts.append(kept if cached_bytes + size <= PREFIX_CACHE_BYTES else None)
            cached_bytes += size if firsts[-1] is not None else 0
            positions += ids.numel()
            pbar.update(ids.numel())
    if count == 0:
        raise SaeforgeError(f"{source} gave no tokens to evaluate", "use a larger corpus")
    means = {s: (sums[s] / count).float() for s in plan.written}

    with bar("evaluating") as pbar:
        for (ids, keep), first in zip(batches(), firsts):
            plan.run(ids, keep, first or plan.first_pass(ids), means)
            pbar.update(ids.numel())
    firsts.clear()
    return {t.name: _metrics(t) for t in targets}, targets, positions


SITE_KEYS = ("n_tokens", "fvu", "explained_variance", "mse", "cosine_similarity", "relative_norm", "l0",
             "dead_fraction")


def _metrics(t: _Target) -> dict[str, Any]:
    from saeforge.runs import compact_sites

    writes = compact_sites(t.writes)
    metrics = {"site": writes, "kind": t.bound.kind, "reads": compact_sites(t.reads), "writes": writes,
               "sae_path": str(t.bound.folder) if t.bound.folder else None,
               "architecture": t.bound.sae.cfg.architecture,
               "d_sae": t.bound.sae.cfg.d_sae, **t.recon.result(), **t.down.result()}
    if t.site_recon:
        metrics["sites"] = {w: {k: v for k, v in r.result().items() if k in SITE_KEYS} for w, r in t.site_recon.items()}
    if t.per_site:
        metrics["per_site"] = {w: {k: v for k, v in st.result().items()
                                   if k in ("ce_loss_sae", "delta_lm_loss", "kl_div")}
                               for w, st in t.per_site.items()}
    return metrics


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
    _refuse_two_model_dictionaries(Path(cfg.path))
    with thread_policy(cfg.threads):
        return _evaluate(cfg, Path(cfg.path))


def _evaluate(cfg: EvalConfig, path: Path) -> dict[str, Any]:
    from saeforge.data.text_source import TextSource
    from saeforge.data.token_stream import TokenStream
    from saeforge.runs import load_run

    run = load_run(path, model=cfg.model, device=cfg.device, dtype=cfg.dtype, site=cfg.site)
    lm, model_name = run.lm, cfg.model or run.meta.get("model_name")
    targets = _targets(cfg, run)
    ctx = run.context_length(cfg.context_length)
    tokens = TokenStream.for_model(TextSource(cfg.corpus, cfg.text_field), lm, run.token_policy(ctx))
    n_contexts = max(1, -(-cfg.tokens // ctx))

    def batches():
        seen = 0
        for _, ids in tokens.batches(cfg.batch_size):
            ids = ids[: n_contexts - seen]
            seen += ids.shape[0]
            yield ids, tokens.keep_mask(ids)
            if seen >= n_contexts:
                return

    t0 = time.time()
    results, _, n_positions = evaluate_dictionaries(lm, targets, batches, n_tokens=n_contexts * ctx,
                                                    progress=cfg.progress, source=f"the corpus {cfg.corpus!r}")
    for t in targets:
        metrics = results[t.name]
        if cfg.plots:
            from saeforge.evals.plots import eval_plots, have_matplotlib

            if have_matplotlib():
                files = eval_plots(t.bound.folder / "plots", t.name, t.recon.feature_density(),
                                   t.recon.l0_per_token(), t.recon.nonzero_activations())
                metrics["plots"] = [str(p) for p in files]
            else:
                metrics["plots"] = "matplotlib is not installed: pip install 'saeforge[plots]'"
    report = {"schema": EVAL_SCHEMA, "schema_version": EVAL_SCHEMA_VERSION,
              "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "model": model_name, "corpus": cfg.corpus,
              "context_length": ctx, "n_token_positions": n_positions, "seconds": time.time() - t0,
              "config": flat_dict(cfg), "saes": results}
    if n_positions < MIN_MEANINGFUL_TOKENS:
        report["warning"] = (f"only {n_positions} token positions were evaluated; below {MIN_MEANINGFUL_TOKENS} the "
                             "metrics are noisy (pass --tokens with more)")
    out = path / "eval.json"
    atomic_write_json(out, _finite(report))
    report["path"] = str(out)
    return report


def _refuse_two_model_dictionaries(path: Path) -> None:
    """A crosscoder over two models (``a--SITE``, ``b--SITE``) is refused before any model is loaded."""
    from saeforge.evals.replacement import refuse_two_models
    from saeforge.runs import SiteBinding, find_saes
    from saeforge.saes.io import read_sae_config

    for name, folder in find_saes(path).items():
        try:
            meta = read_sae_config(folder).get("metadata")
            binding = SiteBinding.from_metadata(meta, where=f"SAE {folder}") if isinstance(meta, dict) else None
        except SaeforgeError:
            continue  # load_run names what is wrong with it
        if binding is not None:
            refuse_two_models(name, binding)


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
