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


@pytest.fixture(scope="session")
def sharp_llama_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny random Llama with its projection and head weights ×10: at the fixtures' initial scale (0.02) its
    next-token distribution hardly depends on the input, so nothing placed in its input could be learnt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("sharp_llama")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if weight.dim() == 2 and "embed" not in name:
                weight.mul_(10)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def two_users_file(opposite_styles, tmp_path_factory):
    """Two users of opposite styles (every trait), 8 history, 16 training and 8 test comments each."""
    from saeforge.personalization.users import synthetic_users, write_users

    users = synthetic_users(2, history=8, train_queries=16, test_queries=8, passages=tiny_passages(36),
                            styles=opposite_styles)
    return write_users(tmp_path_factory.mktemp("two_users") / "users.jsonl", users)
