"""Generation with and without steering, side by side, and the measured effect of the steering.

For each prompt the baseline and the steered continuation are sampled with the same seed. The report gives, per
edit, the target feature's mean activation over the generated tokens (baseline continuation under the plain model,
steered continuation under the steered model: did it move as asked?), and the cost: the perplexity of each
continuation under the unsteered model, and the KL divergence KL(p_plain ‖ p_steered) of the next-token
distributions over the prompt (0 by construction when only generated positions are edited).
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
from saeforge.interventions.steering import FeatureEdit, Steerer, parse_feature
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


@dataclass
class SteeringRun:
    prompts: list[str]
    baseline: list[str]
    steered: list[str]
    metrics: dict


def run_steering(steerer: Steerer, prompts: Sequence[str], edits: Sequence[FeatureEdit], *,
                 positions: str = "all", max_new_tokens: int = 32, temperature: float = 0.7, seed: int = 0,
                 cancel: threading.Event | None = None) -> SteeringRun:
    """Baseline and steered continuations of ``prompts`` with the measured effect (see the module docstring).

    ``cancel``: when set (from another thread), generation stops at the next token and :class:`SteeringCancelled`
    is raised; the remaining steps are skipped."""
    lm = steerer.lm
    steerer.check(edits)
    batch = prompt_batch(steerer, prompts, max_new_tokens)
    ids, mask = batch.input_ids, batch.attention_mask
    n_prompt = ids.shape[1]
    settings = dict(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, cancel=cancel)
    base_new = sample(lm, ids, mask, **settings)
    with steerer.steering(edits, positions):
        steer_new = sample(lm, ids, mask, **settings)
    sites = sorted({steerer.saes[e.sae][1].name for e in edits})
    full_b, logits_b, acts_b = _teacher_forced(lm, ids, mask, base_new, sites)
    full_s, logits_plain_on_steered, _ = _teacher_forced(lm, ids, mask, steer_new, sites)
    _check_cancel(cancel)
    # the steered continuation re-read under the same edits as while it was generated
    with steerer.steering(edits, positions, prompt_length=n_prompt):
        _, logits_steered_prompt, acts_s = _teacher_forced(lm, ids, mask, steer_new, sites)
    metrics: dict = {"edits": []}
    for e in edits:
        sae, site = steerer.saes[e.sae]
        with torch.inference_mode():
            fb = sae.encode(acts_b[site.name][:, n_prompt:].float())[..., e.feature]
            fs = sae.encode(acts_s[site.name][:, n_prompt:].float())[..., e.feature]
        metrics["edits"].append({"sae": e.sae, "feature": e.feature, "mode": e.mode, "strength": e.strength,
                                 "unit": e.unit, "activation_value": steerer.value(e) if e.mode != "scale" else None,
                                 "target_activation_baseline": float(fb.mean()),
                                 "target_activation_steered": float(fs.mean())})
    metrics["perplexity_baseline"] = _perplexity(logits_b, full_b, n_prompt)
    metrics["perplexity_steered"] = _perplexity(logits_plain_on_steered, full_s, n_prompt)
    # KL over the prompt's own next-token predictions (non-pad positions), plain vs steered
    p_plain = F.log_softmax(logits_plain_on_steered[:, :n_prompt - 1], -1)
    p_steer = F.log_softmax(logits_steered_prompt[:, :n_prompt - 1], -1)
    kl = (p_plain.exp() * (p_plain - p_steer)).sum(-1)
    valid = mask[:, 1:].bool().to(kl.device)
    metrics["kl_prompt"] = float(kl[valid].mean()) if bool(valid.any()) else 0.0
    decode = lambda t: lm.tokenizer.decode(t, skip_special_tokens=True)  # noqa: E731
    return SteeringRun(list(prompts), [decode(t) for t in base_new], [decode(t) for t in steer_new], metrics)


class ExtendTuple(argparse.Action):
    """A list option whose values accumulate over repeated flags (``--prompt A --prompt B`` and ``--prompt A B``
    both give ``("A", "B")``); argparse's own ``extend`` cannot extend the tuple defaults of config dataclasses."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, tuple(getattr(namespace, self.dest, None) or ()) + tuple(values))


@dataclass(frozen=True)
class SteerConfig:
    """Generate with and without steering through SAE features, side by side, with the measured effect."""

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
    strength: float = 4.0
    """S: with --unit max, in units of the feature's typical max activation; with raw, activation units."""
    unit: str = "max"
    """max or raw."""
    positions: str = "all"
    """all (prompt and generated tokens) or generated (only the new tokens)."""
    max_new_tokens: int = 32
    """Tokens generated per prompt."""
    temperature: float = 0.7
    """Sampling temperature (0: greedy); baseline and steered use the same seed."""
    seed: int = 0
    """Sampling seed."""
    sweep: tuple[float, ...] = ()
    """Strengths to sweep (writes steering_sweep.png: target activation and perplexity against S)."""
    model: str = ""
    """Model; empty: the one the SAE was trained on."""
    device: str = "auto"
    """auto, cpu or cuda."""


def _edits(cfg: SteerConfig, steerer: Steerer, strength: float) -> list[FeatureEdit]:
    if not cfg.feature:
        raise SaeforgeError("no feature to steer", "pass --feature SITE:INDEX")
    out = []
    for spec in cfg.feature:
        name, idx = parse_feature(spec, list(steerer.saes))
        out.append(FeatureEdit(name, idx, cfg.mode, strength, cfg.unit))
    return out


def _prompts(cfg: SteerConfig) -> list[str]:
    prompts = list(cfg.prompt)
    if cfg.prompts_file:
        prompts += read_texts(cfg.prompts_file)
    if not prompts:
        raise SaeforgeError("no prompt given", 'pass --prompt "text" (or --prompts-file)')
    return prompts


def run_steer(cfg: SteerConfig) -> dict:
    import textwrap

    steerer = Steerer.from_run(cfg.path, model=cfg.model, device=cfg.device)
    prompts = _prompts(cfg)
    report: dict = {"config": {k: v for k, v in cfg.__dict__.items()}, "runs": []}
    strengths = list(cfg.sweep) or [cfg.strength]
    for s in strengths:
        run = run_steering(steerer, prompts, _edits(cfg, steerer, s), positions=cfg.positions,
                           max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed)
        report["runs"].append({"strength": s, "prompts": run.prompts, "baseline": run.baseline,
                               "steered": run.steered, **run.metrics})
        print(f"=== {cfg.mode} S={s} ({cfg.unit}) on {', '.join(cfg.feature)}, positions: {cfg.positions}")
        for i, p in enumerate(prompts):
            print(f"prompt: {p!r}")
            width = 60
            left = textwrap.wrap(run.baseline[i].replace("\n", " ⏎ "), width) or [""]
            right = textwrap.wrap(run.steered[i].replace("\n", " ⏎ "), width) or [""]
            print(f"  {'baseline':<{width}} | steered")
            for a, b in zip(left + [""] * (len(right) - len(left)), right + [""] * (len(left) - len(right))):
                print(f"  {a:<{width}} | {b}")
        for e in run.metrics["edits"]:
            print(f"  feature {e['sae']}:{e['feature']}: mean activation on generated tokens "
                  f"{e['target_activation_baseline']:.2f} → {e['target_activation_steered']:.2f}")
        pb, ps = run.metrics["perplexity_baseline"], run.metrics["perplexity_steered"]
        print(f"  perplexity under the plain model: baseline {sum(pb) / len(pb):.1f}, steered {sum(ps) / len(ps):.1f};"
              f" KL on the prompt {run.metrics['kl_prompt']:.4f}")
    out = Path(cfg.path) / "steering.json"
    atomic_write_json(out, report)
    if len(strengths) > 1:
        plot = sweep_plot(report, Path(cfg.path) / "steering_sweep.png")
        if plot:
            print(f"sweep plot: {plot}")
    print(f"written {out}")
    return report


def sweep_plot(report: dict, path: Path) -> Path | None:
    from saeforge.evals.plots import have_matplotlib

    if not have_matplotlib():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from saeforge.utils.atomic import atomic_write

    s = [r["strength"] for r in report["runs"]]
    act = [r["edits"][0]["target_activation_steered"] for r in report["runs"]]
    ppl = [sum(r["perplexity_steered"]) / len(r["perplexity_steered"]) for r in report["runs"]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(s, act, "o-", color="#4c72b0", label="target activation")
    ax.set_xlabel("steering strength S")
    ax.set_ylabel("mean target activation", color="#4c72b0")
    ax2 = ax.twinx()
    ax2.plot(s, ppl, "s--", color="#c44e52", label="perplexity")
    ax2.set_ylabel("perplexity under the plain model", color="#c44e52")
    ax.set_title("steering sweep")
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path
