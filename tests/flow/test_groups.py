import json

import torch

from saeforge.flow.groups import GROUPS, GroupsConfig, count_groups, group_codes, run_groups


def test_group_codes_read_which_top1_predecessors_are_active():
    # 2 tokens; R_L has 3 features; predecessors have 4 features each
    acts = {"T": torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0]]),
            "R": torch.tensor([[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]),
            "M": torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]),
            "A": torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 5.0]])}
    top1 = {"R": torch.tensor([1, 0, 3]), "M": torch.tensor([2, 2, 2]), "A": torch.tensor([0, 3, -1])}
    where, code = group_codes(acts, top1)
    assert where.tolist() == [[0, 0, 1], [0, 2, 1]]
    # token 0 feature 0: R(1) active, M(2) active, A(0) not -> RES & MLP; token 0 feature 2: R(3) no, M(2) yes,
    # A none -> MLP; token 1 feature 1: R(0) active, M(2) not, A(3) active -> RES & ATT
    assert code.tolist() == [3, 2, 5]
    counts = dict(zip(GROUPS, count_groups(code)))
    assert counts == {"From RES": 0, "From MLP": 1, "From ATT": 0, "From RES & MLP": 1, "From RES & ATT": 1,
                      "From MLP & ATT": 0, "From RES & MLP & ATT": 0, "From nowhere": 0}


def test_run_groups_on_a_tiny_suite(tiny_suite):
    suite, corpus = tiny_suite
    result = run_groups(GroupsConfig(suite=str(suite), corpus=str(corpus), contexts=6, tokens_per_context=5,
                                     context_length=32, device="cpu"))
    assert set(result["layers"]) == {"1", "2"}
    for layer in result["layers"].values():
        # a TopK SAE (k 4) has exactly 4 active features per token: every one is counted in exactly one group
        assert layer["active"] == 30 * 4 == sum(layer["counts"].values())
        assert abs(sum(layer["shares"].values()) - 1) < 1e-9
    assert json.loads((suite / "flow" / "groups.json").read_text())["tokens"] == 30
    assert (suite / "flow" / "groups.png").read_bytes()[:4] == b"\x89PNG"
