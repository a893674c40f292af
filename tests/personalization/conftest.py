"""Synthetic users over the tiny models' text, so the personalization tests need neither the embedded corpus nor
the embedded model."""

from __future__ import annotations

import re

import pytest

from tests.conftest import TEXT


def tiny_passages(n: int = 40) -> list[str]:
    """``n`` distinct six-word windows (every other start) of the fixture text (items the users comment on)."""
    words = re.findall(r"[A-Za-z']+", TEXT)
    return list(dict.fromkeys(" ".join(words[2 * i:2 * i + 6]) for i in range(2 * n)))[:n]


@pytest.fixture(scope="session")
def opposite_styles() -> list[dict[str, str]]:
    return [{"voice": "archaic", "mark": "exclaim", "focus": "words", "length": "long"},
            {"voice": "plain", "mark": "calm", "focus": "story", "length": "short"}]
