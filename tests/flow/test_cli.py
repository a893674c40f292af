import json

import pytest
import torch

from saeforge.cli import main
from tests.flow.helpers import noisy, unit, write_suite


@pytest.fixture(scope="module")
def small_suite(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    w = {f"layers.{L}.{k}": unit(50, 128, g) for L in (4, 5) for k in ("resid_post", "mlp_out", "attn_out")}
    w["layers.5.resid_post"][7] = noisy(w["layers.4.resid_post"][3:4], 0.3, g)[0]
    return write_suite(tmp_path_factory.mktemp("cli"), w)


def test_help_lists_the_flow_subcommands(capsys):
    assert main(["flow"]) == 0
    out = capsys.readouterr().out
    for sub in ("suite", "assemble", "match", "links", "graph", "groups", "deactivate", "steer"):
        assert sub in out
    with pytest.raises(SystemExit):
        main(["flow", "graph", "--help"])
    assert "--residual-threshold" in capsys.readouterr().out


def test_match_and_graph_from_the_command_line(small_suite, capsys):
    assert main(["flow", "match", str(small_suite), "--methods", "top1", "topk"]) == 0
    summary = json.loads((small_suite / "flow" / "match_summary.json").read_text())
    assert list(summary["layers"]) == ["5"] and set(summary["layers"]["5"]) == {"top1", "topk", "random_baseline_s"}
    assert 0.1 < summary["layers"]["5"]["random_baseline_s"] < 0.3  # ≈ 0.19 by chance for 50 features in 128 dims
    assert main(["flow", "graph", str(small_suite), "--feature", "layers.5.resid_post:7"]) == 0
    out = capsys.readouterr().out
    assert "layers.4.resid_post:3" in out and (small_suite / "flow/graphs/layers.5.resid_post_7.svg").is_file()


def test_compare_two_saes(small_suite, capsys):
    a, b = small_suite / "saes/layers.4.resid_post", small_suite / "saes/layers.5.resid_post"
    assert main(["flow", "match", "--a", str(a), "--b", str(a), "--thresholds", "0.99"]) == 0
    assert "share with a match ≥ 0.99: a 100.0%, b 100.0%" in capsys.readouterr().out
    assert main(["flow", "match", "--a", str(a), "--b", str(b), "--thresholds", "0.9"]) == 0
    assert "a 2.0%, b 2.0%" in capsys.readouterr().out  # the one planted pair of 50


@pytest.mark.parametrize("argv, message", [
    (["flow", "match", "{suite}", "--residual-threshold", "2"], "must lie in [0, 1]"),
    (["flow", "match", "{suite}", "--layers", "5-6"],
     "lacks 3 site(s) the layer range needs: layers.6.resid_post, layers.6.mlp_out, layers.6.attn_out"),
    (["flow", "match", "{suite}", "--methods", "cosine"], "unknown matching method"),
    (["flow", "graph", "{suite}", "--feature", "layers.5.resid_post:50"], "out of range"),
    (["flow", "graph", "{suite}", "--feature", "layers.5.resid_post:7", "--residual-threshold", "0.99",
      "--module-threshold", "0.99"], "is empty"),
    (["flow", "graph", "{suite}/nowhere", "--feature", "layers.5.resid_post:7"], "does not exist"),
])
def test_bad_input_is_a_clear_error(small_suite, capsys, argv, message):
    assert main([a.replace("{suite}", str(small_suite)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "fix:" in err


@pytest.mark.parametrize("command", ["groups", "deactivate", "steer"])
def test_a_second_process_on_one_output_folder_is_refused_before_the_model_loads(tiny_suite, tmp_path, command,
                                                                                 monkeypatch):
    from saeforge.errors import SaeforgeError
    from saeforge.flow.deactivate import DeactivateConfig, run_deactivate
    from saeforge.flow.groups import GroupsConfig, run_groups
    from saeforge.flow.steering import FlowSteerConfig, run_flow_steer
    from saeforge.flow.suite import Suite
    from saeforge.utils.locking import exclusive_lock

    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded although the output folder is in use")

    monkeypatch.setattr(Suite, "load_model", no_model)
    suite = str(tiny_suite[0])
    run, cfg = {"groups": (run_groups, GroupsConfig(suite=suite, out=str(tmp_path))),
                "deactivate": (run_deactivate, DeactivateConfig(suite=suite, strategies=("top1", "random"),
                                                                out=str(tmp_path))),
                "steer": (run_flow_steer, FlowSteerConfig(suite=suite, feature="layers.2.resid_post:3",
                                                          scopes=("target",), out=str(tmp_path)))}[command]
    with exclusive_lock(tmp_path, "another saeforge flow"):
        with pytest.raises(SaeforgeError, match="is in use"):
            run(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".saeforge.lock"]  # nothing written
