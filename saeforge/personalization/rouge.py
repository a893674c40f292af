"""ROUGE-1 and ROUGE-L F-measures (Lin 2004), as Google's ``rouge-score`` computes them without stemming: lower
case, every run of characters other than a-z and 0-9 a separator, unigram overlap counted with multiplicity (ROUGE-1)
and the longest common subsequence of the tokens (ROUGE-L, sentence level). Written out here because the package is
not a dependency; ``tests/personalization/test_rouge.py`` checks it against cases computed by hand."""

from __future__ import annotations

import re
from collections import Counter

__all__ = ["rouge_1", "rouge_l", "rouge_tokens"]


def rouge_tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _f_measure(overlap: int, n_pred: int, n_ref: int) -> float:
    if overlap == 0 or n_pred == 0 or n_ref == 0:
        return 0.0
    precision, recall = overlap / n_pred, overlap / n_ref
    return 2 * precision * recall / (precision + recall)


def rouge_1(prediction: str, reference: str) -> float:
    pred, ref = Counter(rouge_tokens(prediction)), Counter(rouge_tokens(reference))
    return _f_measure(sum((pred & ref).values()), sum(pred.values()), sum(ref.values()))


def _lcs_length(a: list[str], b: list[str]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, 1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(prediction: str, reference: str) -> float:
    pred, ref = rouge_tokens(prediction), rouge_tokens(reference)
    return _f_measure(_lcs_length(pred, ref), len(pred), len(ref))
