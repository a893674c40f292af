"""The user file (every missing field named, before any model loads), synthetic users and the style detector."""

from __future__ import annotations

import json
import random

import pytest

from saeforge.errors import SaeforgeError
from saeforge.personalization.users import (STYLE_TRAITS, detect_style, read_users, style_comment, style_match,
                                            synthetic_users, write_users)
from tests.personalization.conftest import tiny_passages


def _user(uid="u0", **over):
    user = {"user_id": uid, "history": [{"item": "a", "prompt": "Line: x\nComment:", "text": "nice"}],
            "queries": [{"item": "b", "prompt": "Line: y\nComment:", "target": "fine", "split": "test"}]}
    user.update(over)
    return user


def _write(tmp_path, *users, raw: str = ""):
    path = tmp_path / "users.jsonl"
    path.write_text("".join(json.dumps(u) + "\n" for u in users) + raw)
    return path


def test_a_user_file_round_trips(tmp_path):
    users = synthetic_users(3, history=4, train_queries=2, test_queries=1, passages=tiny_passages(10))
    write_users(tmp_path / "u.jsonl", users)
    assert read_users(tmp_path / "u.jsonl") == users


@pytest.mark.parametrize("broken, message", [
    ({"user_id": None}, "'user_id' must be a non-empty string"),
    ({"history": [{"item": "a", "prompt": "p"}]}, r"line 2 \(user u1\), history item 0 has no 'text' field"),
    ({"history": []}, "empty history"),
    ({"history": "nice"}, "'history' must be a list"),
    ({"queries": [{"item": "b", "prompt": "p"}]}, r"query 0 has no 'target' field"),
    ({"queries": [{"item": "b", "prompt": "p", "target": "t", "split": "dev"}]}, "'split' must be train or test"),
])
def test_missing_or_wrong_fields_are_named_with_their_line(tmp_path, broken, message):
    path = _write(tmp_path, _user("u0"), _user("u1", **broken))
    with pytest.raises(SaeforgeError, match=message) as err:
        read_users(path)
    assert "user_id" in err.value.fix or "split" in err.value.fix or "history" in err.value.fix


def test_absent_keys_and_bad_files_are_refused(tmp_path):
    no_queries = _user("u1")
    del no_queries["queries"]
    with pytest.raises(SaeforgeError, match="line 2 .*has no 'queries' field"):
        read_users(_write(tmp_path, _user("u0"), no_queries))
    no_id = _user()
    del no_id["user_id"]
    with pytest.raises(SaeforgeError, match="line 1 has no 'user_id' field"):
        read_users(_write(tmp_path, no_id, _user("u1")))
    with pytest.raises(SaeforgeError, match="line 2 is not JSON"):
        read_users(_write(tmp_path, _user("u0"), raw="{oops\n"))
    with pytest.raises(SaeforgeError, match="appears twice"):
        read_users(_write(tmp_path, _user("u0"), _user("u0")))
    with pytest.raises(SaeforgeError, match="peers need at least two"):
        read_users(_write(tmp_path, _user("u0")))
    with pytest.raises(SaeforgeError, match="does not exist") as err:
        read_users(tmp_path / "none.jsonl")
    assert "saeforge personalize users" in err.value.fix


def test_every_synthetic_comment_shows_its_style_and_not_the_opposite():
    rng = random.Random(0)
    passages = tiny_passages(30)
    import itertools

    for values in itertools.product(*STYLE_TRAITS.values()):
        style = dict(zip(STYLE_TRAITS, values))
        opposite = {t: next(v for v in pair if v != style[t]) for t, pair in STYLE_TRAITS.items()}
        for passage in passages:
            text = style_comment(passage, style, rng)
            assert detect_style(text) == style, text
            assert style_match(text, style)["mean"] == 1.0 and style_match(text, opposite)["mean"] == 0.0


def test_synthetic_users_spread_the_styles_and_share_items():
    users = synthetic_users(32, history=8, train_queries=3, test_queries=2, passages=tiny_passages(36))
    combos = [tuple(u.style.values()) for u in users]
    assert len(set(combos)) == 16 and all(combos.count(c) == 2 for c in set(combos))
    assert all(len(u.history) == 8 and sum(q.split == "test" for q in u.queries) == 2 for u in users)
    items = [h.item for u in users for h in u.history]
    assert len(set(items)) < len(items)  # peers exist
    for u in users:  # a user comments on an item once
        mine = [h.item for h in u.history] + [q.item for q in u.queries]
        assert len(mine) == len(set(mine))
    assert synthetic_users(32, passages=tiny_passages(36), history=8, train_queries=3, test_queries=2) == users


@pytest.mark.embedded
def test_default_synthetic_users_comment_on_lines_of_the_embedded_corpus():
    from tests.conftest import embedded_available

    if not embedded_available():
        pytest.skip("the embedded corpus is not fetched: run `saeforge fetch`")
    users = synthetic_users()
    prompts = {h.prompt for u in users for h in u.history} | {q.prompt for u in users for q in u.queries}
    assert len(users) == 40 and len(prompts) == 60
    assert all(7 <= len(p.removeprefix("Line: ").removesuffix("\nComment:").split()) <= 12 for p in prompts)
    for u in users:
        for text in [h.text for h in u.history] + [q.target for q in u.queries]:
            assert detect_style(text) == u.style
