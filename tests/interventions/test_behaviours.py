"""The example behaviours: files the bench reads, right and wrong sums, a name that does not exist."""

import re

import pytest

from saeforge.data.texts import read_texts
from saeforge.errors import SaeforgeError
from saeforge.interventions.behaviours import bench_command, write_behaviour
from saeforge.interventions.selection import theme_rate


def test_love_sets_differ_by_the_keywords(tmp_path):
    paths = write_behaviour("love", tmp_path)
    pos, neg = read_texts(paths["positive"]), read_texts(paths["negative"])
    assert len(pos) == len(neg) == 24
    words = ["love", "heart", "kissed", "dear", "sweet"]
    assert theme_rate(pos, words) == 1.0 and theme_rate(neg, words) == 0.0
    assert "--keywords love," in bench_command("love", tmp_path)


def test_arithmetic_pairs_hold_the_right_and_a_wrong_sum(tmp_path):
    paths = write_behaviour("arithmetic", tmp_path)
    pairs, pos, neg = (read_texts(paths[k]) for k in ("pairs", "positive", "negative"))
    assert len(pairs) == len(pos) == len(neg) == 48
    for q, right, wrong in zip(pairs, pos, neg):
        a, b = map(int, re.findall(r"\d+", q)[-2:])  # the question after the two worked examples
        assert int(right) == a + b and int(wrong) != a + b and abs(int(wrong) - a - b) <= 3
    prompts, answers = read_texts(paths["prompts"]), read_texts(paths["answers"])
    assert len(prompts) == len(answers) == 24
    assert len(set(prompts) & set(pairs)) <= 1  # held out (random draws, one collision at most)
    assert all(int(ans) == sum(map(int, re.findall(r"\d+", q)[-2:])) for q, ans in zip(prompts, answers))
    assert all(q.startswith("Question: What is 4 plus 3? Answer: 7\n") for q in prompts + pairs)
    with pytest.raises(SaeforgeError, match="no example behaviour 'poetry'"):
        write_behaviour("poetry", tmp_path)
