"""Generation with and without steering, side by side, and the measured effect of the steering.

For each prompt the baseline and the steered continuation are sampled with the same seed. Everything that says
whether steering worked is read **by the plain model on the generated text** (teacher-forced, no edit in force):

- the target feature's mean activation over the generated tokens (baseline text vs steered text): does the text
  itself evoke the feature, not only the injected direction?
- the **theme rate**: the share of generations containing a theme word (whole word, any case); the words are given
  (``theme_words``) or, by default, the words among the tokens each steered feature promotes (its edit applied to
  neutral prompts: the tokens whose log-probability rises most);
- the cost: each continuation's perplexity under the plain model (summarised over the prompts as the perplexity of
  all their tokens, :func:`pooled_perplexity`), and KL(p_plain ‖ p_steered) of the next-token distributions over the
  prompt (0 by construction when only generated positions are edited).

The target activation *with the edit in force* on the steered text is reported separately as
``target_activation_injected``: it measures the injection itself (adding S·d_i raises f_i whatever the text says),
never the effect.
"""

from __future__ import annotations

import argparse
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from simple_parsing.helpers import field

from saeforge.data.prompts import PromptBatch, PromptEncoder
from saeforge.data.texts import read_texts
from saeforge.errors import SaeforgeError
from saeforge.interventions.selection import theme_hits
from saeforge.interventions.steering import FeatureEdit, Steerer, parse_feature
from saeforge.options import DeviceOptions, RunModelOptions, flat_dict, flat_options
from saeforge.runs import compact_sites
from saeforge.utils.atomic import atomic_write_json


class SteeringCancelled(SaeforgeError):
    """Generation was stopped because the caller's ``cancel`` event was set (a client gone, a time limit reached).

    A :class:`~saeforge.errors.SaeforgeError`, so a caller that only catches those still reports it cleanly; catch it
    first to answer a cancellation differently from bad input."""

    def __init__(self):
        super().__init__("steering was cancelled before it finished", "run it again (with fewer prompts or "
                         "new tokens if it was stopped for taking too long)")


def _stop_when_set(event: threading.Event):
    """A transformers stopping criterion that stops every sequence at the next token once ``event`` is set."""
    from transformers import StoppingCriteria, StoppingCriteriaList  # imported here: the CLI starts without it

    class StopWhenSet(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
            return torch.full((input_ids.shape[0],), event.is_set(), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([StopWhenSet()])


def _check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise SteeringCancelled()


def prompt_batch(steerer: Steerer, prompts: Sequence[str], max_new_tokens: int) -> PromptBatch:
    """Prompts under the run's token rules, left-padded for generation; refuses prompts that leave no room for
    ``max_new_tokens`` in the model's context."""
    return PromptEncoder(steerer.lm, steerer.policy).batch(list(prompts), padding="left", reserve=max_new_tokens)


@torch.inference_mode()
def sample(lm, ids: torch.Tensor, mask: torch.Tensor, *, max_new_tokens: int, temperature: float, seed: int,
           cancel: threading.Event | None = None) -> torch.Tensor:
    """New token ids [batch, max_new_tokens] (padded with EOS after an early stop).

    ``cancel``: when set during generation, generation stops at the next token and :class:`SteeringCancelled` is
    raised."""
    _check_cancel(cancel)
    torch.manual_seed(seed)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.tokenizer.eos_token_id
    kwargs = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(
        do_sample=False)
    if cancel is not None:
        kwargs["stopping_criteria"] = _stop_when_set(cancel)
    out = lm.model.generate(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device),
                            max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, pad_token_id=pad, **kwargs)
    _check_cancel(cancel)
    return out[:, ids.shape[1]:].cpu()


@torch.inference_mode()
def _teacher_forced(lm, ids, mask, new, sites):
    """Logits and site activations of prompt + continuation in one pass (edits in force apply)."""
    full = torch.cat([ids, new], 1)
    full_mask = torch.cat([mask, torch.ones_like(new)], 1)
    with lm.record(sites) as captured:
        logits = lm.model(input_ids=full.to(lm.device), attention_mask=full_mask.to(lm.device),
                          use_cache=False).logits
    return full, logits.float(), captured


def _perplexity(logits, full, n_prompt) -> list[float]:
    logp = F.log_softmax(logits[:, n_prompt - 1:-1], -1)
    nll = -logp.gather(-1, full[:, n_prompt:, None].to(logp.device)).squeeze(-1)
    return [math.exp(float(v)) for v in nll.mean(1)]


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def pooled_perplexity(perplexities: Sequence[float]) -> float:
    """The perplexity of all the continuations together, exp(mean NLL over every generated token): the geometric
    mean of per-prompt perplexities of equal length, so one degenerate continuation does not dominate."""
    return math.exp(mean([math.log(p) for p in perplexities])) if perplexities else float("nan")


@dataclass
class SteeringRun:
    prompts: list[str]
    baseline: list[str]
    steered: list[str]
    metrics: dict


class Continuations:
    """Prompts encoded once under the run's token rules; continuations sampled with one seed and read back by the
    plain model (:meth:`read`), with any edits in force."""

    def __init__(self, steerer: Steerer, prompts: Sequence[str], *, max_new_tokens: int = 32,
                 temperature: float = 0.7, seed: int = 0, cancel: threading.Event | None = None):
        self.steerer, self.lm = steerer, steerer.lm
        self.prompts = list(prompts)
        batch = prompt_batch(steerer, self.prompts, max_new_tokens)
        self.ids, self.mask, self.keep = batch.input_ids, batch.attention_mask, batch.keep
        self.n_prompt = self.ids.shape[1]
        self.cancel = cancel
        self.settings = dict(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, cancel=cancel)

    def sample(self) -> torch.Tensor:
        """New token ids ``[n, max_new_tokens]`` under whatever edits are in force."""
        return sample(self.lm, self.ids, self.mask, **self.settings)

    def decode(self, new: torch.Tensor) -> list[str]:
        return [self.lm.tokenizer.decode(t, skip_special_tokens=True) for t in new]

    def read(self, new: torch.Tensor, sites: Sequence[str]):
        """(full ids, logits, activations at ``sites``) of prompt + ``new`` in one teacher-forced pass."""
        _check_cancel(self.cancel)
        return _teacher_forced(self.lm, self.ids, self.mask, new, sites)

    def perplexity(self, logits: torch.Tensor, full: torch.Tensor) -> list[float]:
        return _perplexity(logits, full, self.n_prompt)

    @torch.inference_mode()
    def feature_means(self, acts: dict, features: Sequence[tuple[str, int]]) -> list[float]:
        """Each (sae, feature)'s mean activation over the generated tokens (encoded from the sites the SAE reads)."""
        out = []
        for name, feature in features:
            bound = self.steerer.bound[name]
            x = bound.input(acts)[:, self.n_prompt:].float()
            out.append(float(bound.sae.encode(x)[..., feature].mean()))
        return out


def default_theme_words(steerer: Steerer, edits: Sequence[FeatureEdit]) -> tuple[list[str], str]:
    """The words among the promoted tokens of the features pushed up (add/clamp with a positive strength) by
    dictionaries that write the residual stream, and a note on where they come from."""
    from saeforge.interventions.selection import promoted_words

    words, named = [], []
    for e in edits:
        bound = steerer.bound[e.sae]
        if e.mode == "scale" or e.strength <= 0 or len(bound.writes) != 1 or bound.write_site.d != steerer.lm.d_model:
            continue
        added = steerer.value(e) * bound.sae.W_dec[e.feature].detach().float().cpu()  # c·d_i (clamp: its target)
        words += promoted_words(steerer.lm, bound, e.feature, vector=added, policy=steerer.policy, lens=steerer.lens)
        named.append(f"{e.sae}:{e.feature}")
    words = list(dict.fromkeys(words))
    if not named:
        return [], "none (no feature pushed up)"
    return words, f"promoted tokens of {', '.join(named)}" + ("" if words else " (none is a word)")


def steer_points(steerer: Steerer, prompts: Sequence[str], edit_sets: Sequence[Sequence[FeatureEdit]], *,
                 vector_sets: Sequence[dict[str, torch.Tensor]] | None = None,
                 watch: Sequence[tuple[str, int]] = (), positions: str = "all", max_new_tokens: int = 32,
                 temperature: float = 0.7, seed: int = 0, theme_words: Sequence[str] | None = None,
                 cancel: threading.Event | None = None, progress: bool = False, on_point=None) -> list[SteeringRun]:
    """One baseline and one steered generation per point (a sweep), all measured by the plain model.

    Point i applies ``edit_sets[i]`` and, given ``vector_sets``, the raw vectors ``vector_sets[i]`` ({site: v}, e.g.
    a CAA vector; ``edit_sets[i]`` may then be empty). ``watch``: (sae, feature) pairs read besides the edited
    features (``metrics["watched"]``). ``theme_words``: words whose presence counts as the theme; None derives them
    from the last point's features' promoted tokens. ``on_point(i, run)`` is called as each point finishes."""
    from tqdm.auto import tqdm

    _check_cancel(cancel)
    if not edit_sets:
        raise SaeforgeError("no steering to measure", "give at least one set of feature edits")
    vector_sets = list(vector_sets) if vector_sets is not None else [{} for _ in edit_sets]
    if len(vector_sets) != len(edit_sets):
        raise SaeforgeError(f"{len(edit_sets)} sets of edits but {len(vector_sets)} sets of vectors",
                            "give one set of vectors per point (an empty dict for none)")
    for edits in edit_sets:
        steerer.check(edits)
        for e in edits:
            if e.mode != "scale":
                steerer.value(e)  # units that cannot be resolved fail before any generation
    for name, _ in watch:
        if name not in steerer.bound:
            raise SaeforgeError(f"no SAE {name!r} in this run", f"the run has: {', '.join(steerer.bound)}")
    gen = Continuations(steerer, prompts, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                        cancel=cancel)
    sites = sorted({s.name for edits in edit_sets for e in edits for s in steerer.bound[e.sae].reads} |
                   {s.name for name, _ in watch for s in steerer.bound[name].reads})
    if theme_words is None:
        words, source = default_theme_words(steerer, edit_sets[-1])
    else:
        words, source = list(theme_words), "given"
    bar = tqdm(total=len(edit_sets) + 1, desc="steering", unit="generation", disable=not progress, leave=False)
    base_new = gen.sample()
    full_b, logits_b, acts_b = gen.read(base_new, sites)
    base_texts = gen.decode(base_new)
    base_hits = theme_hits(base_texts, words)
    base_ppl = gen.perplexity(logits_b, full_b)
    bar.update()
    runs = []
    for i, (edits, vectors) in enumerate(zip(edit_sets, vector_sets)):
        bar.set_postfix_str(", ".join(f"{e.mode} {e.strength:g} {e.unit}" for e in edits)[:60])
        with steerer.steering(edits, positions, vectors):
            new = gen.sample()
        full_s, logits_plain, acts_plain = gen.read(new, sites)
        with steerer.steering(edits, positions, vectors, prompt_length=gen.n_prompt):  # as during generation
            _, logits_edited, acts_edited = gen.read(new, sites)
        texts = gen.decode(new)
        hits = theme_hits(texts, words)
        metrics: dict = {"edits": [], "watched": []}
        pairs = [(e.sae, e.feature) for e in edits]
        for e, fb, fs, fi in zip(edits, gen.feature_means(acts_b, pairs), gen.feature_means(acts_plain, pairs),
                                 gen.feature_means(acts_edited, pairs)):
            bound = steerer.bound[e.sae]
            metrics["edits"].append({
                "sae": e.sae, "feature": e.feature, "mode": e.mode, "strength": e.strength, "unit": e.unit,
                "activation_value": steerer.value(e) if e.mode != "scale" else None,
                "read_site": compact_sites([s.name for s in bound.reads]),
                "write_site": compact_sites(list(bound.written_rows(e.feature))),
                "mean_norm": steerer.mean_norm(e.sae, e.feature)[0] if e.unit == "norm" and e.mode != "scale" else None,
                "target_activation_baseline": fb, "target_activation_steered": fs,
                "target_activation_injected": fi})
        for (name, f), fb, fs, fi in zip(watch, gen.feature_means(acts_b, watch),
                                         gen.feature_means(acts_plain, watch), gen.feature_means(acts_edited, watch)):
            metrics["watched"].append({"sae": name, "feature": f, "activation_baseline": fb,
                                       "activation_steered": fs, "activation_injected": fi})
        if vectors:
            metrics["vectors"] = {site: float(v.norm()) for site, v in vectors.items()}
        metrics["theme_words"], metrics["theme_source"] = words, source
        metrics["theme_hits_baseline"], metrics["theme_hits_steered"] = base_hits, hits
        metrics["theme_rate_baseline"] = mean(base_hits) if words else None
        metrics["theme_rate_steered"] = mean(hits) if words else None
        metrics["perplexity_baseline"] = base_ppl
        metrics["perplexity_steered"] = gen.perplexity(logits_plain, full_s)
        # KL over the prompt's own next-token predictions (non-pad positions), plain vs steered
        n = gen.n_prompt
        p_plain = F.log_softmax(logits_plain[:, :n - 1], -1)
        p_steer = F.log_softmax(logits_edited[:, :n - 1], -1)
        kl = (p_plain.exp() * (p_plain - p_steer)).sum(-1)
        valid = gen.mask[:, 1:].bool().to(kl.device)
        metrics["kl_prompt"] = float(kl[valid].mean()) if bool(valid.any()) else 0.0
        run = SteeringRun(gen.prompts, base_texts, texts, metrics)
        runs.append(run)
        bar.update()
        if on_point is not None:
            on_point(i, run)
    bar.close()
    return runs


def run_steering(steerer: Steerer, prompts: Sequence[str], edits: Sequence[FeatureEdit], *,
                 positions: str = "all", max_new_tokens: int = 32, temperature: float = 0.7, seed: int = 0,
                 theme_words: Sequence[str] | None = None, cancel: threading.Event | None = None) -> SteeringRun:
    """Baseline and steered continuations of ``prompts`` with the measured effect (see the module docstring).

    ``cancel``: when set (from another thread), generation stops at the next token and :class:`SteeringCancelled`
    is raised; the remaining steps are skipped."""
    return steer_points(steerer, prompts, [list(edits)], positions=positions, max_new_tokens=max_new_tokens,
                        temperature=temperature, seed=seed, theme_words=theme_words, cancel=cancel)[0]


class ExtendTuple(argparse.Action):
    """A list option whose values accumulate over repeated flags (``--prompt A --prompt B`` and ``--prompt A B``
    both give ``("A", "B")``); argparse's own ``extend`` cannot extend the tuple defaults of config dataclasses."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, tuple(getattr(namespace, self.dest, None) or ()) + tuple(values))


DEFAULT_STRENGTH = {"norm": 0.25, "max": 2.0, "raw": 4.0}
"""The strength when --strength is not given (add and clamp). On the embedded model, norm 0.25 kept the perplexity of
the generations within 3× the baseline for every feature and vector measured (docs/steering.md, "Strength")."""


@flat_options
@dataclass(frozen=True)
class SteerConfig:
    """Generate with and without steering through SAE features, side by side, with the effect measured by the plain
    model on the generated text (feature activation, theme rate, perplexity)."""

    path: str = field(default="", positional=True)
    """A run directory (every SAE under saes/) or one SAE folder."""
    prompt: tuple[str, ...] = field(default=(), action=ExtendTuple)
    """Prompts (repeat the flag, or give several after it, for a batch)."""
    prompts_file: str = ""
    """A file of prompts, one per line, or .jsonl with a "text" field (added to --prompt)."""
    feature: tuple[str, ...] = field(default=(), action=ExtendTuple)
    """Features to steer, as SITE:INDEX (repeat the flag, or give several after it, for several features)."""
    mode: str = "add"
    """add (x + S·d), clamp (set the feature to S, keeping the SAE error), or scale (multiply it by S; 0 ablates)."""
    strength: float | None = None
    """S in --unit; unset: the unit's default for add and clamp (norm 0.25, max 2, raw 4), 0 (ablation) for
    scale."""
    unit: str = "norm"
    """norm (the added vector is S × the mean ‖x‖ at the write site), max (S × the feature's max activation), or
    raw (S in activation units)."""
    positions: str = "all"
    """all (prompt and generated tokens) or generated (only the new tokens)."""
    max_new_tokens: int = 32
    """Tokens generated per prompt."""
    temperature: float = 0.7
    """Sampling temperature (0: greedy); baseline and steered use the same seed."""
    seed: int = 0
    """Sampling seed."""
    sweep: tuple[float, ...] = ()
    """Strengths to sweep; the baseline (no edit) is always measured. Writes steering_sweep.png (theme rate against
    perplexity, and the plain-model feature activation against S) to --out."""
    theme_words: str = ""
    """Comma-separated words that count as the theme (e.g. king,queen,crown); empty: the words among the steered
    features' promoted tokens."""
    out: str = ""
    """Folder for steering.json (and the sweep plot). Empty: a single run only prints; a sweep writes to a new
    folder ./steering-YYYYmmdd-HHMMSS. The run folder is never written unless named here."""
    model_options: RunModelOptions = field(default_factory=RunModelOptions)
    """The model the SAEs read and that generates."""
    device_options: DeviceOptions = field(default_factory=DeviceOptions)
    """Where the model runs."""


def _edits(cfg: SteerConfig, names: Sequence[str], strength: float) -> list[FeatureEdit]:
    if not cfg.feature:
        raise SaeforgeError("no feature to steer", "pass --feature SITE:INDEX")
    out = []
    for spec in cfg.feature:
        name, idx = parse_feature(spec, list(names))
        out.append(FeatureEdit(name, idx, cfg.mode, strength, cfg.unit))
    return out


def _prompts(cfg: SteerConfig) -> list[str]:
    prompts = list(cfg.prompt)
    if cfg.prompts_file:
        prompts += read_texts(cfg.prompts_file)
    if not prompts:
        raise SaeforgeError("no prompt given", 'pass --prompt "text" (or --prompts-file)')
    return prompts


def _out_folder(cfg: SteerConfig) -> Path | None:
    if cfg.out:
        return Path(cfg.out)
    if cfg.sweep:
        import time

        return Path.cwd() / f"steering-{time.strftime('%Y%m%d-%H%M%S')}"
    return None


def _side_by_side(prompts, baseline, steered, width: int = 60) -> str:
    import textwrap

    lines = []
    for p, b, s in zip(prompts, baseline, steered):
        lines.append(f"prompt: {p!r}")
        left = textwrap.wrap(b.replace("\n", " ⏎ "), width) or [""]
        right = textwrap.wrap(s.replace("\n", " ⏎ "), width) or [""]
        lines.append(f"  {'baseline':<{width}} | steered")
        for a, c in zip(left + [""] * (len(right) - len(left)), right + [""] * (len(left) - len(right))):
            lines.append(f"  {a:<{width}} | {c}")
    return "\n".join(lines)


def effect_summary(run: SteeringRun) -> str:
    """The measured effect in words: plain-model readings first, the injection's own value labelled as such."""
    m = run.metrics
    lines = []
    for e in m["edits"]:
        lines.append(f"  feature {e['sae']}:{e['feature']}, mean activation on the generated tokens read by the plain "
                     f"model: {e['target_activation_baseline']:.2f} (baseline text) → "
                     f"{e['target_activation_steered']:.2f} (steered text); with the edit in force (the injection "
                     f"itself): {e['target_activation_injected']:.2f}")
    if m["theme_words"]:
        words = ", ".join(m["theme_words"][:12]) + (" ..." if len(m["theme_words"]) > 12 else "")
        lines.append(f"  theme rate (generations containing {words}; {m['theme_source']}): "
                     f"{m['theme_rate_baseline']:.0%} → {m['theme_rate_steered']:.0%}")
    lines.append(f"  perplexity under the plain model: baseline {pooled_perplexity(m['perplexity_baseline']):.1f}, "
                 f"steered {pooled_perplexity(m['perplexity_steered']):.1f}; KL on the prompt {m['kl_prompt']:.4f}")
    return "\n".join(lines)


def run_steer(cfg: SteerConfig) -> dict:
    import time

    from saeforge.interventions.selection import parse_words
    from saeforge.interventions.steering import MODES, UNITS, loading_message
    from saeforge.runs import find_saes
    from saeforge.utils.locking import exclusive_lock

    # everything that can be checked without the model, before the slow load
    if cfg.unit not in UNITS:
        raise SaeforgeError(f"unknown strength unit {cfg.unit!r}", f"use one of {', '.join(UNITS)}")
    if cfg.mode not in MODES:
        raise SaeforgeError(f"unknown steering mode {cfg.mode!r}", f"use one of {', '.join(MODES)}")
    prompts = _prompts(cfg)
    names = list(find_saes(cfg.path))
    strength = cfg.strength if cfg.strength is not None else (
        0.0 if cfg.mode == "scale" else DEFAULT_STRENGTH[cfg.unit])
    strengths = [s for s in cfg.sweep if not (s == 0 and cfg.mode == "add")] if cfg.sweep else [strength]
    if cfg.sweep and not strengths:
        raise SaeforgeError("the sweep holds only S = 0, which is the baseline", "e.g. --sweep 0.25 0.5 1")
    edit_sets = [_edits(cfg, names, s) for s in strengths]
    words = parse_words(cfg.theme_words) if cfg.theme_words else None
    out = _out_folder(cfg)

    print(loading_message(cfg.path, cfg.model), flush=True)
    t0 = time.time()
    steerer = Steerer.from_run(cfg.path, model=cfg.model, device=cfg.device)
    print(f"loaded in {time.time() - t0:.0f} s; generating {len(prompts)} prompt(s) × {cfg.max_new_tokens} tokens, "
          f"baseline and {len(strengths)} steered", flush=True)
    for e in edit_sets[0]:
        if cfg.unit == "norm" and cfg.mode != "scale":
            value, source = steerer.mean_norm(e.sae, e.feature)
            where = compact_sites(list(steerer.bound[e.sae].written_rows(e.feature)))
            print(f"  unit norm: mean ‖x‖ at {where} = {value:.2f} ({source})")

    from tqdm.auto import tqdm

    tqdm_write = tqdm.write

    def show(i, run):
        s = strengths[i]
        tqdm_write(f"=== {cfg.mode} S={s:g} ({cfg.unit}) on {', '.join(cfg.feature)}, positions: {cfg.positions}")
        tqdm_write(_side_by_side(run.prompts, run.baseline, run.steered))
        tqdm_write(effect_summary(run))

    runs = steer_points(steerer, prompts, edit_sets, positions=cfg.positions, max_new_tokens=cfg.max_new_tokens,
                        temperature=cfg.temperature, seed=cfg.seed, theme_words=words, progress=True, on_point=show)
    report: dict = {"config": flat_dict(cfg), "unit": cfg.unit, "features": list(cfg.feature),
                    "mean_norms": {e.sae: steerer.mean_norm(e.sae, e.feature)[0] for e in edit_sets[0]
                                   if cfg.unit == "norm" and cfg.mode != "scale"},
                    "runs": [{"strength": s, "prompts": r.prompts, "baseline": r.baseline, "steered": r.steered,
                              **r.metrics} for s, r in zip(strengths, runs)]}
    if len(runs) > 1:
        print(format_sweep(report))
    if out is None:
        print("(nothing written; add --out DIR to keep steering.json)")
        return report
    with exclusive_lock(out, "saeforge steer"):
        path = atomic_write_json(out / "steering.json", report)
        print(f"written {path}")
        if len(runs) > 1:
            plot = sweep_plot(report, out / "steering_sweep.png")
            print(f"sweep plot: {plot}" if plot else "no sweep plot: matplotlib is not installed (the plots extra)")
    report["out"] = str(out)
    return report


def sweep_points(report: dict) -> list[dict]:
    """The sweep as points, the baseline (no edit) first: label, strength, theme rate, perplexity, plain-model
    activation of the first feature."""
    runs = report["runs"]
    first = runs[0]
    points = [{"label": "baseline", "strength": 0.0 if report["config"]["mode"] == "add" else None,
               "theme_rate": first["theme_rate_baseline"],
               "perplexity": pooled_perplexity(first["perplexity_baseline"]),
               "activation": first["edits"][0]["target_activation_baseline"]}]
    for r in runs:
        points.append({"label": f"S={r['strength']:g}", "strength": r["strength"],
                       "theme_rate": r["theme_rate_steered"], "perplexity": pooled_perplexity(r["perplexity_steered"]),
                       "activation": r["edits"][0]["target_activation_steered"]})
    return points


def format_sweep(report: dict) -> str:
    lines = [f"| S ({report['unit']}) | theme rate | perplexity | activation (plain model) |", "|---|---|---|---|"]
    for p in sweep_points(report):
        rate = "n/a" if p["theme_rate"] is None else f"{p['theme_rate']:.0%}"
        lines.append(f"| {p['label']} | {rate} | {p['perplexity']:.1f} | {p['activation']:.2f} |")
    return "\n".join(lines)


def sweep_plot(report: dict, path: Path) -> Path | None:
    """Theme rate against perplexity (one point per strength, the baseline included) and the plain-model activation
    of the first feature against S."""
    from saeforge.evals.plots import have_matplotlib

    if not have_matplotlib():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from saeforge.utils.atomic import atomic_write

    points = sweep_points(report)
    cfg = report["config"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    if all(p["theme_rate"] is not None for p in points):
        ax.plot([p["perplexity"] for p in points], [100 * p["theme_rate"] for p in points], "o-", color="#4c72b0")
        for p in points:
            ax.annotate(p["label"], (p["perplexity"], 100 * p["theme_rate"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
        words = report["runs"][0]["theme_words"]
        ax.set_ylabel(f"theme rate, % ({', '.join(words[:4])}{', ...' if len(words) > 4 else ''})")
    else:
        ax.text(0.5, 0.5, "no theme words", ha="center", transform=ax.transAxes)
    ax.set_xlabel("perplexity under the plain model")
    ax.set_title("theme rate × perplexity (read on the generated text)", fontsize=9)
    steered = [p for p in points if p["strength"] is not None]
    ax2.plot([p["strength"] for p in steered], [p["activation"] for p in steered], "s-", color="#c44e52")
    ax2.axhline(points[0]["activation"], color="grey", ls="--", lw=0.8, label="baseline")
    ax2.set_xlabel(f"strength S ({report['unit']}" + (" × mean ‖x‖" if report["unit"] == "norm" else "") + ")")
    ax2.set_ylabel("feature activation, plain model")
    ax2.legend(fontsize=8)
    fig.suptitle(f"{cfg['mode']} {', '.join(report['features'])}, S in unit {report['unit']}", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path
