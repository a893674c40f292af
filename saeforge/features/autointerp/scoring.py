"""Choosing examples and scoring explanations.

Split (:func:`split_examples`): the explainer sees the best ``n_top`` top examples and ``n_quantile`` quantile
examples spread over the activation range; the scorers get *held-out* activating examples only: the quantile examples
the explainer did not see plus the top examples it did not see (at most ``n_score``, spread over the activation
range), against the store's ``random`` examples (contexts where the feature never fires).

Detection (delphi): the scorer LM reads the explanation and one unmarked excerpt and says whether the feature fires
in it. Score: balanced accuracy = (TPR + TNR) / 2. delphi shows 5 excerpts per prompt and asks for a list of 0/1
answers; saeforge asks about one excerpt per prompt, which small local models answer far more reliably (at the cost
of more, shorter calls). An answer that is neither yes nor no counts as wrong, whatever the true label.

Fuzzing (delphi, "default" variant, optional): positives are held-out activating excerpts with their true activating
tokens marked; negatives are non-activating excerpts with ``n_incorrect`` = ceil(mean number of marked tokens per
positive) tokens marked at random. The LM says whether the marks fit the explanation; balanced accuracy again. When a
feature has no non-activating excerpts (it fires in every harvested context), the negatives are the same activating
excerpts with ``n_incorrect`` of their *inactive* tokens marked instead (delphi's "active" variant).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from saeforge.features.autointerp import prompts as P


def _spread(items: list[dict], n: int) -> list[dict]:
    """``n`` items spread evenly over ``items`` sorted by activation (all of them when there are at most ``n``)."""
    if n <= 0:
        return []
    items = sorted(items, key=lambda e: -e["max_act"])
    if len(items) <= n:
        return items
    picks = np.linspace(0, len(items) - 1, n).round().astype(int)
    return [items[i] for i in sorted(set(picks.tolist()))]


@dataclass
class Split:
    shown: list[dict]
    """Examples in the explainer prompt (top first, then quantile examples by descending activation)."""
    held_out: list[dict]
    """Activating examples for the scorers, never shown to the explainer."""
    negatives: list[dict]
    """Non-activating examples for the scorers."""


def split_examples(examples: dict[str, list[dict]], *, n_top: int = 10, n_quantile: int = 10,
                   n_score: int = 10) -> Split:
    """Divide a feature's examples (the store's ``top`` / ``quantile`` / ``random`` groups) between explainer and
    scorers; deterministic."""
    top = sorted(examples.get("top", []), key=lambda e: e["rank"])
    quant = list(examples.get("quantile", []))
    # the explainer may take at most half of the quantile examples, so held-out ones cover the activation range
    shown_q = _spread(quant, min(n_quantile, len(quant) // 2))
    shown_t = top[:n_top]
    shown_ids = {id(e) for e in shown_t + shown_q}
    rest = [e for e in quant + top if id(e) not in shown_ids]
    if not rest and len(shown_t) > 1:
        # few contexts fire: everything would be shown, so the weakest third of the shown top examples is held out
        keep = math.ceil(len(shown_t) * 2 / 3)
        shown_t, rest = shown_t[:keep], shown_t[keep:]
    held_out = _spread(rest, n_score)
    negatives = sorted(examples.get("random", []), key=lambda e: e["rank"])[:max(0, n_score)]
    return Split(shown_t + sorted(shown_q, key=lambda e: -e["max_act"]), held_out, negatives)


@dataclass
class Sample:
    prompt: list
    label: bool
    """True: an activating excerpt (detection) or correctly marked excerpt (fuzzing)."""
    text: str


def detection_samples(explanation: str, split: Split) -> list[Sample]:
    out = []
    for label, group in ((True, split.held_out), (False, split.negatives)):
        for e in group:
            text = P.plain_text(e["tokens"])
            out.append(Sample(P.detection_prompt(explanation, text), label, text))
    return out


def fuzzing_samples(explanation: str, split: Split, rng: np.random.Generator, threshold: float = 0.0
                    ) -> list[Sample]:
    out = []
    counts = []
    for e in split.held_out:
        pos = P.active_positions(e["acts"], threshold)
        counts.append(len(pos))
        text = P.mark_tokens(e["tokens"], pos)
        out.append(Sample(P.fuzzing_prompt(explanation, text), True, text))
    if not counts:
        return out
    n_incorrect = max(1, math.ceil(sum(counts) / len(counts)))
    if split.negatives:
        decoys = [(e, list(range(len(e["tokens"])))) for e in split.negatives]
    else:
        decoys = [(e, [i for i, a in enumerate(e["acts"]) if not a > threshold]) for e in split.held_out]
    for e, candidates in decoys:
        if not candidates:
            continue
        marked = rng.choice(candidates, size=min(n_incorrect, len(candidates)), replace=False).tolist()
        text = P.mark_tokens(e["tokens"], marked)
        out.append(Sample(P.fuzzing_prompt(explanation, text), False, text))
    return out


def balanced_accuracy(labels: Sequence[bool], answers: Sequence[bool | None]) -> dict:
    """``{"balanced_accuracy", "tpr", "tnr", "n_pos", "n_neg", "unparsed"}``; an answer of None is wrong. The balanced
    accuracy is None unless both classes are present."""
    pos = [a for lab, a in zip(labels, answers) if lab]
    neg = [a for lab, a in zip(labels, answers) if not lab]
    tpr = sum(a is True for a in pos) / len(pos) if pos else None
    tnr = sum(a is False for a in neg) / len(neg) if neg else None
    bacc = (tpr + tnr) / 2 if tpr is not None and tnr is not None else None
    return {"balanced_accuracy": bacc, "tpr": tpr, "tnr": tnr, "n_pos": len(pos), "n_neg": len(neg),
            "unparsed": sum(a is None for a in answers)}


def chance_level(n_pos: int, n_neg: int) -> dict:
    """What a judge answering at random gets: balanced accuracy 0.5 on average whatever its bias, with standard
    deviation 0.25·sqrt(1/n_pos + 1/n_neg) for a fair coin (None without both classes). With 10 + 10 excerpts that is
    ±0.11: a score of 0.6 is not evidence of a good explanation."""
    sd = 0.25 * math.sqrt(1 / n_pos + 1 / n_neg) if n_pos and n_neg else None
    return {"mean": 0.5, "sd": sd}


def score(samples: Sequence[Sample], replies: Sequence[str]) -> dict:
    return balanced_accuracy([s.label for s in samples], [P.parse_yes_no(r) for r in replies])
