import pytest

from saeforge.flow.links import link_rows, load_matches, predecessors, save_matches, successors
from saeforge.flow.matching import predecessor_matches
from saeforge.flow.suite import open_suite


def test_stored_links_answer_predecessors_and_successors(planted, tmp_path):
    suite = open_suite(planted)
    for m in predecessor_matches(suite, 3, "topk", k=3).values():
        save_matches(tmp_path, m)
    m = load_matches(tmp_path, "layers.3.resid_post", "layers.2.resid_post", "topk")
    assert m is not None and m.k == 3
    preds = predecessors(tmp_path, "layers.3.resid_post", 5, "topk")
    best = {p["sae"]: p["idx"] for p in preds if p["rank"] == 0}
    assert set(best) == {"layers.2.resid_post", "layers.3.mlp_out", "layers.3.attn_out"}
    assert best["layers.2.resid_post"] == 9 and best["layers.3.mlp_out"] == 11
    succ = successors(tmp_path, "layers.2.resid_post", 9, "topk")
    assert succ[0] == {"sae": "layers.3.resid_post", "idx": 5, "weight": pytest.approx(preds[0]["weight"]),
                       "rank": 0}
    rows = list(link_rows(m))
    assert rows[0][:5] == ("flow:topk", "layers.2.resid_post", int(m.indices[0, 0]), "layers.3.resid_post", 0)
    assert load_matches(tmp_path, "layers.3.resid_post", "layers.2.resid_post", "top1") is None


def test_a_table_that_fails_to_write_leaves_nothing_half_written(planted, tmp_path, monkeypatch):
    import safetensors.torch

    from saeforge.flow.links import matches_folder, stored_tables

    suite = open_suite(planted)
    first, second = list(predecessor_matches(suite, 3, "top1").values())[:2]
    save_matches(tmp_path, first)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as if the process were stopped while writing

    monkeypatch.setattr(safetensors.torch, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        save_matches(tmp_path, second)
    monkeypatch.undo()
    assert [t["b"] for t in stored_tables(tmp_path)] == [first.b]  # the index lists only the complete table
    assert sorted(p.name for p in matches_folder(tmp_path).iterdir()) == sorted(
        ["links.json", f"{first.a}__{first.b}__top1.safetensors"])  # no partial file left behind
    assert load_matches(tmp_path, second.a, second.b, "top1") is None
