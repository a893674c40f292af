"""ROUGE-1 and ROUGE-L F-measures against cases worked out by hand."""

from __future__ import annotations

import pytest

from saeforge.personalization.rouge import rouge_1, rouge_l, rouge_tokens


def test_tokens_are_lower_case_alphanumeric_runs():
    assert rouge_tokens("Methinks, the VERSE doth-sing 2 times!") == ["methinks", "the", "verse", "doth", "sing", "2",
                                                                     "times"]


def test_rouge_1_counts_overlap_with_multiplicity():
    # prediction "the cat the cat" (4 tokens), reference "the cat sat" (3): overlap min(2,1)+min(2,1) = 2
    # P = 2/4, R = 2/3, F = 2PR/(P+R) = (2/3)/(7/6) = 4/7
    assert rouge_1("the cat the cat", "the cat sat") == pytest.approx(4 / 7, abs=1e-12)
    assert rouge_1("a b c", "a b c") == 1.0
    assert rouge_1("a b c", "d e") == 0.0
    assert rouge_1("", "a") == 0.0 and rouge_1("a", "") == 0.0


def test_rouge_l_uses_the_longest_common_subsequence():
    # reference "police killed the gunman", prediction "police kill the gunman": LCS police-the-gunman = 3
    # P = R = 3/4, F = 3/4
    assert rouge_l("police kill the gunman", "police killed the gunman") == pytest.approx(0.75, abs=1e-12)
    # prediction "the gunman kill police" (4): LCS with the reference is "the gunman" = 2, F = 1/2
    assert rouge_l("the gunman kill police", "police killed the gunman") == pytest.approx(0.5, abs=1e-12)
    # order matters for ROUGE-L, not for ROUGE-1
    assert rouge_1("the gunman killed police", "police killed the gunman") == 1.0
    # a b c d e vs a x c y e z: LCS a c e = 3; P = 3/5, R = 3/6, F = 2·(3/5)(1/2)/(3/5+1/2) = 6/11
    assert rouge_l("a b c d e", "a x c y e z") == pytest.approx(6 / 11, abs=1e-12)
