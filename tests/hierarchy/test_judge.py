"""The LLM judge of parent/child pairs (saeforge.hierarchy.judge) with a scripted back end, on a harvested run."""

from __future__ import annotations

import pytest

from saeforge.cli import main
from saeforge.errors import SaeforgeError
from saeforge.features.store import FeatureStore
from saeforge.hierarchy import FeatureTree
from saeforge.hierarchy.judge import JUDGE_SYSTEM, judge_tree

from .helpers import harvested_copy


@pytest.fixture(scope="module")
def harvested(hierarchy_run, tmp_path_factory):
    return harvested_copy(hierarchy_run, tmp_path_factory.mktemp("judge"), seed=5)


class ScriptedJudge:
    """Says yes to every other prompt, starting with the first (the judge sends each tree pair, then its control)."""

    name = "scripted"

    def __init__(self, replies=("Yes", "No")):
        self.replies = replies
        self.prompts = []

    def generate(self, prompts, max_new_tokens):
        out = []
        for p in prompts:
            out.append(self.replies[len(self.prompts) % len(self.replies)])
            self.prompts.append(p)
        return out


def test_tree_pairs_and_control_pairs_are_judged_apart(harvested):
    tree = FeatureTree.load(harvested / "saes" / "hsae")
    judge = ScriptedJudge()
    with FeatureStore(harvested / "features.sqlite", readonly=True) as store:
        result = judge_tree(tree, store, judge, pairs=12, seed=3)
    verdicts = result["verdicts"]
    real = [v for v in verdicts if not v["control"]]
    control = [v for v in verdicts if v["control"]]
    assert result["pairs"] == len(real) > 0 and len(control) == len(real)
    for v in real:
        assert tree.parent(1, v["child"]) == v["parent"]
    for v in control:  # a control pair: the same parent with a latent that is not its child
        assert tree.parent(1, v["child"]) != v["parent"]
    assert [v["control"] for v in verdicts] == [False, True] * len(real)
    assert result["yes_rate"] == 1.0 and result["control_yes_rate"] == 0.0 and result["gap"] == 1.0
    first = judge.prompts[0]
    assert first[0] == {"role": "system", "content": JUDGE_SYSTEM}
    assert "<<" in first[1]["content"] and "Feature B is active" in first[1]["content"]


def test_unclear_replies_are_counted_not_scored(harvested):
    tree = FeatureTree.load(harvested / "saes" / "hsae")
    with FeatureStore(harvested / "features.sqlite", readonly=True) as store:
        result = judge_tree(tree, store, ScriptedJudge(("Yes", "Maybe")), pairs=6, seed=1)
    assert result["unanswered"] == result["pairs"]          # every control reply was unclear
    assert result["yes_rate"] == 1.0 and result["control_yes_rate"] is None and result["gap"] is None


def test_a_store_without_the_trees_saes_is_refused_before_a_judge_loads(harvested, tmp_path, capsys):
    saes = harvested / "saes"
    other = tmp_path / "other.sqlite"
    FeatureStore(other, create=True).close()
    # --backend openai with no endpoint would fail on loading; the store is checked first
    assert main(["hierarchy", "judge", str(saes / "hsae"), str(other), "--backend", "openai"]) == 2
    err = capsys.readouterr().err
    assert "no SAE for level 0" in err and "saeforge harvest" in err
    with FeatureStore(harvested / "features.sqlite", readonly=True) as store, pytest.raises(SaeforgeError,
                                                                                          match="no parent/child"):
        empty = FeatureTree.load(saes / "hsae")
        empty.parents[0][:] = -1
        judge_tree(empty, store, ScriptedJudge())
