"""``saeforge circuit tasks`` and ``saeforge circuit find`` on the tiny run."""

import json
import os
import subprocess
import sys

import pytest

from saeforge.circuits.circuit import Circuit
from saeforge.circuits.cli import FindConfig, TasksConfig, run_find, run_tasks
from saeforge.errors import SaeforgeError


@pytest.fixture
def task_file(tmp_path, tiny_llama):
    words = [w for w in "the and of to that is his my not with your be for".split()
             if len(tiny_llama.tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1]
    pairs = [{"clean": f"{a} {b} {a} {b} {a}", "corrupt": f"{a} {c} {a} {c} {a}", "clean_answer": " " + b,
              "corrupt_answer": " " + c}
             for a, b, c in zip(words, words[1:], words[2:])]
    path = tmp_path / "task.json"
    path.write_text(json.dumps({"name": "repeat", "pairs": pairs}))
    return path


def test_tasks_reports_accuracy(task_file, tiny_llama_dir, tmp_path, capsys):
    rows = run_tasks(TasksConfig(tasks=(str(task_file),), model=str(tiny_llama_dir), device="cpu",
                                 out=str(tmp_path / "acc.json")))
    assert rows[0]["task"] == "repeat" and 0 <= rows[0]["accuracy"] <= 1
    assert json.loads((tmp_path / "acc.json").read_text())["tasks"] == rows
    assert "repeat" in capsys.readouterr().out


def test_find_writes_the_circuit(task_file, tiny_run, tmp_path):
    out = tmp_path / "circuit"
    cfg = FindConfig(run=str(tiny_run), task=str(task_file), min_accuracy=0.0, method="ig", steps=3, top=6,
                     curve=(2, 4), random_draws=2, out=str(out), device="cpu", progress=False)
    result = run_find(cfg)
    circuit = Circuit.from_json(json.loads((out / "circuit.json").read_text()))
    assert circuit.size == 6 and result["nodes"] == circuit.to_json()["nodes"]
    ev = circuit.evaluation
    assert {"faithfulness", "completeness", "random_faithfulness_mean", "curve"} <= set(ev)
    assert [r["top"] for r in ev["curve"]] == [2, 4]
    assert (out / "circuit.dot").read_text().startswith("digraph")
    assert (out / "faithfulness.png").stat().st_size > 1000
    assert json.loads((out / "effects.json").read_text())["method"] == "ig"


def test_find_refuses_a_task_the_model_fails(task_file, tiny_run, tmp_path):
    with pytest.raises(SaeforgeError, match="a circuit of a behaviour the model does not have"):
        run_find(FindConfig(run=str(tiny_run), task=str(task_file), min_accuracy=1.01, out=str(tmp_path / "c"),
                            device="cpu", progress=False))


def test_cli_bad_input_is_a_clear_error(tiny_run, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "x", "pairs": [{"clean": "a"}]}))
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    proc = subprocess.run([sys.executable, "-m", "saeforge", "circuit", "find", str(tiny_run), "--task", str(bad),
                           "--device", "cpu"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "pair 0 has no 'corrupt'" in proc.stderr and "fix:" in proc.stderr


@pytest.mark.parametrize("changes, words", [({"method": "exact"}, "unknown method"),
                                            ({"layers": "3-1"}, "runs backwards"),
                                            ({"layers": "x"}, "not a layer range"),
                                            ({"steps": 0}, "must be ≥ 1"),
                                            ({"run": ""}, "no run given")])
def test_options_are_checked_before_any_work(changes, words, tmp_path):
    cfg = FindConfig(**({"run": str(tmp_path / "nothing-here")} | changes))
    with pytest.raises(SaeforgeError, match=words):
        run_find(cfg)


def test_help(capsys):
    from saeforge.cli import main

    with pytest.raises(SystemExit):
        main(["circuit", "find", "--help"])
    text = capsys.readouterr().out
    assert "--node-threshold" in text and "integrated gradients" in text


def test_lasso_writes_its_circuit_and_the_comparison(task_file, tiny_run, tmp_path):
    from saeforge.circuits.cli import LassoConfig, run_lasso

    out = tmp_path / "lasso"
    result = run_lasso(LassoConfig(run=str(tiny_run), task=str(task_file), min_accuracy=0.0, lam=0.01,
                                   random_draws=2, out=str(out), device="cpu"))
    written = json.loads((out / "lasso.json").read_text())
    assert written["nodes"] == result["nodes"] and written["sites"] == ["layers.1.resid_post"]
    n = sum(len(v) for v in written["nodes"].values())
    assert n == len(written["to_metric"])  # one site: the features chosen for the metric
    comparison = written["comparison"]
    assert comparison["overlap"]["a"] == n == comparison["overlap"]["b"]
    assert {"faithfulness", "completeness"} <= set(comparison["lasso"]) and "faithfulness" in comparison["attribution"]
    assert Circuit.from_json(json.loads((out / "lasso" / "circuit.json").read_text())).nodes == written["nodes"]
    assert (out / "lasso" / "circuit.dot").read_text().startswith("digraph")
    with pytest.raises(SaeforgeError, match="--lam must be"):
        run_lasso(LassoConfig(run=str(tiny_run), lam=-1.0))


def test_lasso_from_a_cache(task_file, tiny_run, tiny_cache, tmp_path):
    from saeforge.circuits.cli import LassoConfig, run_lasso

    out = tmp_path / "lasso"
    result = run_lasso(LassoConfig(run=str(tiny_run), task=str(task_file), min_accuracy=0.0, lam=0.01,
                                   cache=str(tiny_cache.folder), cache_tokens=3000, compare=False, out=str(out),
                                   device="cpu"))
    assert result["tokens"] == 3000 and result["source"] == str(tiny_cache.folder)
    assert json.loads((out / "lasso" / "circuit.json").read_text())["settings"]["tokens"] == 3000
    with pytest.raises(SaeforgeError, match="not an activation cache"):
        run_lasso(LassoConfig(run=str(tiny_run), task=str(task_file), cache=str(tmp_path), device="cpu"))


def test_hagd_writes_its_comparison(task_file, tiny_run, tmp_path):
    from saeforge.circuits.cli import HagdConfig, run_hagd

    out = tmp_path / "hagd"
    result = run_hagd(HagdConfig(run=str(tiny_run), task=str(task_file), min_accuracy=0.0, graph_nodes=20,
                                 sizes=(2, 5), random_draws=2, out=str(out), device="cpu", progress=False))
    saved = json.loads((out / "hagd.json").read_text())
    assert [r["size"] for r in saved["rows"]] == [2, 5] == [r["size"] for r in result["rows"]]
    assert {"hagd", "greedy", "random_mean", "empty"} <= set(saved["rows"][0])
    circuit = Circuit.from_json(json.loads((out / "hagd" / "circuit.json").read_text()))
    assert circuit.n_features == 5 and circuit.settings["method"] == "hagd"
    assert (out / "hagd.png").stat().st_size > 1000 and (out / "hagd" / "circuit.dot").is_file()
    with pytest.raises(SaeforgeError, match="--sizes 5 50 must lie between 1 and --graph-nodes"):
        run_hagd(HagdConfig(run=str(tiny_run), task=str(task_file), graph_nodes=20, sizes=(5, 50), device="cpu"))


def test_hagd_help(capsys):
    from saeforge.cli import main

    with pytest.raises(SystemExit):
        main(["circuit", "hagd", "--help"])
    text = capsys.readouterr().out
    assert "--graph-nodes" in text and "--branching" in text and "2601.12879" in text
