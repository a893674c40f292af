import json
import math

import pytest
import torch

from saeforge.errors import SaeforgeError
from saeforge.flow.graph import FlowEdge, FlowGraph, FlowNode
from saeforge.flow.steering import FlowSteerConfig, plan, plan_edits, run_flow_steer, schedule


def test_schedules():
    assert schedule("constant", 4.0, [3, 4, 5], end_value=1.0) == {3: 4.0, 4: 4.0, 5: 4.0}
    lin = schedule("linear", 4.0, [3, 4, 5], end_value=1.0)
    assert lin[3] == pytest.approx(4.0) and lin[4] == pytest.approx(2.5) and lin[5] == pytest.approx(1.0)
    exp = schedule("exponential", 4.0, [10, 12], end_value=1.0)
    assert exp[10] == pytest.approx(4 * math.exp(-0.5)) and exp[12] == pytest.approx(4 * math.exp(-0.6))
    with pytest.raises(SaeforgeError, match="unknown schedule"):
        schedule("cubic", 1.0, [1], end_value=0.0)


def _graph():
    nodes = [FlowNode(f"layers.{L}.resid_post:{i}", f"layers.{L}.resid_post", L, "resid_post", i, role)
             for L, i, role in ((1, 5, "backward"), (2, 7, "target"), (3, 9, "forward"))]
    nodes.append(FlowNode("layers.2.mlp_out:4", "layers.2.mlp_out", 2, "mlp_out", 4, "module"))
    edges = [FlowEdge(nodes[0].id, nodes[1].id, 0.8, "R"), FlowEdge(nodes[1].id, nodes[2].id, 0.7, "R"),
             FlowEdge(nodes[3].id, nodes[1].id, 0.3, "M")]
    return FlowGraph("layers.2.resid_post:7", nodes, edges, 0.5, 0.15, {})


def test_plan_scopes():
    g = _graph()
    assert plan(g, "target", "constant", 2.0, "activate").items == [("layers.2.resid_post", 7, 2.0)]
    assert plan(g, "single", "constant", 2.0, "activate").items == [("layers.2.resid_post", 7, 2.0)]
    assert [s for s, _, _ in plan(g, "single", "constant", 2.0, "activate", with_modules=True).items] == [
        "layers.2.resid_post", "layers.2.mlp_out"]
    cum = plan(g, "cumulative", "linear", 3.0, "deactivate").items
    assert cum == [("layers.1.resid_post", 5, pytest.approx(3.0)), ("layers.2.resid_post", 7, pytest.approx(1.0))]
    assert len(plan(g, "cumulative_all", "constant", 1.0, "activate").items) == 3


def test_activation_edit_adds_the_scaled_direction_at_non_special_tokens(tiny_suite):
    from saeforge.flow.steering import SteeringPlan
    from saeforge.flow.suite import open_suite

    suite = open_suite(tiny_suite[0])
    lm = suite.load_model(device="cpu")
    bound = suite.bind(lm)
    site = "layers.1.resid_post"
    ids = torch.tensor([[lm.bos_token_id(), 5, 6, 7, 8]])
    p = SteeringPlan("activate", [(site, 3, 2.0), (site, 10, -1.0)])
    with torch.no_grad(), lm.record([site]) as clean:
        lm.logits(ids)
    with torch.no_grad(), lm.edit(plan_edits(lm, bound, p, {site: 5.0})), lm.record([site]) as steered:
        lm.logits(ids)
    w = bound[site].sae.W_dec.detach()
    want = 2.0 * 5.0 * w[3] / w[3].norm() - 1.0 * 5.0 * w[10] / w[10].norm()
    diff = steered[site][0] - clean[site][0]
    assert torch.equal(diff[0], torch.zeros_like(diff[0]))  # BOS untouched
    assert torch.allclose(diff[1:], want.expand(4, -1), atol=1e-5)


def test_deactivation_edit_with_r_one_is_the_identity(tiny_suite):
    from saeforge.flow.steering import SteeringPlan
    from saeforge.flow.suite import open_suite

    suite = open_suite(tiny_suite[0])
    lm = suite.load_model(device="cpu")
    bound = suite.bind(lm)
    ids = torch.tensor([[lm.bos_token_id(), 5, 6, 7, 8]])
    base = lm.logits(ids)
    keep = SteeringPlan("deactivate", [("layers.1.resid_post", i, 1.0) for i in range(64)])
    with lm.edit(plan_edits(lm, bound, keep, {})):
        assert torch.equal(lm.logits(ids), base)
    remove = SteeringPlan("deactivate", [("layers.1.resid_post", i, 0.0) for i in range(64)])
    with lm.edit(plan_edits(lm, bound, remove, {})):
        assert not torch.allclose(lm.logits(ids), base)


def test_run_flow_steer_on_a_tiny_suite(tiny_suite, tmp_path):
    suite, _ = tiny_suite
    result = run_flow_steer(FlowSteerConfig(
        suite=str(suite), feature="layers.2.resid_post:0", strengths=(4.0,), scopes=("target", "cumulative"),
        schedules=("constant", "linear"), residual_threshold=0.0, module_threshold=0.0, prompts=("To be",),
        samples=2, max_new_tokens=6, keywords=("king",), device="cpu", out=str(tmp_path)))
    rows = result["rows"]
    assert [(r["scope"], r["schedule"]) for r in rows] == [("none", "-"), ("target", "constant"),
                                                          ("cumulative", "constant"), ("cumulative", "linear")]
    assert rows[2]["features"] == 3  # the residual nodes of layers 0, 1 and 2 (threshold 0 keeps the whole chain)
    assert rows[1]["texts"] != rows[0]["texts"]  # the same sampling seed: only the steering differs
    saved = json.loads((tmp_path / "layers.2.resid_post_0_activate.json").read_text())
    assert len(saved["rows"]) == 4 and (tmp_path / "layers.2.resid_post_0_activate.png").is_file()


def test_bad_input(tiny_suite):
    suite, _ = tiny_suite
    with pytest.raises(SaeforgeError, match="unknown scopes"):
        run_flow_steer(FlowSteerConfig(suite=str(suite), feature="layers.2.resid_post:0", scopes=("all",)))
    with pytest.raises(SaeforgeError, match="out of range"):
        run_flow_steer(FlowSteerConfig(suite=str(suite), feature="layers.2.resid_post:64"))
    with pytest.raises(SaeforgeError, match="strengths"):
        run_flow_steer(FlowSteerConfig(suite=str(suite), feature="layers.2.resid_post:0", strengths=(float("inf"),)))


def test_judge_reads_behaviour_and_coherence_replies():
    from saeforge.flow.steering import judge

    class FakeBackend:
        def generate(self, prompts, max_new_tokens):
            assert all("love" in p[0]["content"] for p in prompts)
            return ["behaviour=5 coherence=4", "Behavior = 1, coherence = 2", "I cannot rate this"]

    scores = judge(FakeBackend(), ["a", "b", "c"], "love")
    assert scores["judge_behaviour"] == pytest.approx(3 / 5)  # the unreadable reply is left out
    assert scores["judge_coherence"] == pytest.approx(3 / 5)
    assert scores["judge_score"] == pytest.approx((5 * 4 + 1 * 2) / 2 / 25)
