import pytest
import torch

from saeforge.errors import SaeforgeError
from saeforge.flow.deactivate import DeactivateConfig, format_table, run_deactivate, strategy_sets


def test_strategy_sets():
    tables = {"R": {"top1": torch.tensor([2, 0]), "top5": torch.tensor([[2, 1, 3, -1, -1], [0, 1, 2, 3, 4]]),
                    "permutation": torch.tensor([1, 0])},
              "M": {"top1": torch.tensor([-1, 4]), "top5": torch.full((2, 5), -1),
                    "permutation": torch.tensor([3, 2])}}
    active = {"R": torch.tensor([False, True, True, True, False]), "M": torch.tensor([True, True, False, False, True])}
    g = torch.Generator().manual_seed(0)
    assert strategy_sets("top1", 0, tables, active, g) == {"R": [2], "M": []}
    assert strategy_sets("top5", 0, tables, active, g) == {"R": [2, 1, 3], "M": []}
    assert strategy_sets("permutation", 1, tables, active, g) == {"R": [0], "M": [2]}
    assert strategy_sets("random_top5", 0, tables, active, g)["R"][0] in (2, 1, 3)
    # random control: as many active features as top1 has active ones, never the top-1 itself
    for _ in range(20):
        r = strategy_sets("random", 0, tables, active, g)
        assert len(r["R"]) == 1 and r["R"][0] in (1, 3) and r["M"] == []
        assert strategy_sets("random", 1, tables, active, g)["M"][0] in (0, 1)  # top-1 (4) is active
    with pytest.raises(SaeforgeError, match="unknown strategy"):
        strategy_sets("best", 0, tables, active, g)


def test_r_one_changes_nothing(tiny_suite):
    suite, corpus = tiny_suite
    result = run_deactivate(DeactivateConfig(suite=str(suite), corpus=str(corpus), contexts=3, tokens_per_context=2,
                                             context_length=32, r=1.0, strategies=("top1", "top5"), device="cpu"))
    assert result["records"]
    for rec in result["records"]:
        assert abs(rec["change"]) < 1e-5 and abs(rec["loss_change"]) < 1e-5 and not rec["deactivated"]


def test_batched_deactivation_matches_a_plain_recomputation(tiny_suite):
    from saeforge.flow.deactivate import _tables
    from saeforge.flow.suite import open_suite, site_name

    suite_dir, corpus = tiny_suite
    result = run_deactivate(DeactivateConfig(suite=str(suite_dir), corpus=str(corpus), contexts=2,
                                             tokens_per_context=2, context_length=32, r=0.0, layers="2",
                                             strategies=("top1", "top5", "random"), device="cpu"))
    table = format_table(result["summary"])
    assert "| top1 |" in table and "0.75, 65%" in table
    suite = open_suite(suite_dir)
    lm = suite.load_model(device="cpu")
    bound = suite.bind(lm)
    from saeforge.flow.data import sample_tokens

    sample = sample_tokens(lm, str(corpus), contexts=2, context_length=32, per_context=2)
    tables = _tables(suite, 2, ("top1",))
    preds = {"R": site_name(1, "resid_post"), "M": site_name(2, "mlp_out"), "A": site_name(2, "attn_out")}
    checked = 0
    for rec in [r for r in result["records"] if r["strategy"] == "top1"][:4]:
        ids, t, i = sample.ids[rec["context"]:rec["context"] + 1], rec["token"], rec["feature"]

        def remove(key):
            sae, j = bound[preds[key]].sae, int(tables[key]["top1"][i])

            def fn(x):
                x = x.clone()
                a = sae.encode(x[0, t].float())[j]
                x[0, t] -= a * sae.W_dec[j]
                return x
            return fn

        with torch.no_grad(), lm.edit({preds[k]: remove(k) for k in preds}), lm.record(["layers.2.resid_post"]) as cap:
            lm.logits(ids)
        z_new = float(bound["layers.2.resid_post"].sae.encode(cap["layers.2.resid_post"][0, t].float())[i])
        assert z_new == pytest.approx(rec["z_new"], abs=1e-4)
        checked += 1
    assert checked > 0
    sizes = {s: m["mean_set_size"] for s, m in result["summary"].items()}
    assert sizes["top5"] > sizes["top1"] >= sizes["random"]


def test_bad_input(tiny_suite):
    suite, _ = tiny_suite
    with pytest.raises(SaeforgeError, match="unknown strategy"):
        run_deactivate(DeactivateConfig(suite=str(suite), strategies=("nope",)))
    with pytest.raises(SaeforgeError, match="lacks 3 site"):
        run_deactivate(DeactivateConfig(suite=str(suite), layers="3"))
