import json
import subprocess
import sys

import pytest

from saeforge.cli import main

COMMANDS = ("demo", "fetch", "sites", "cache", "train", "eval")


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(c in out for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_from_its_config_docstrings(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "(default:" in out


def test_cache_help_documents_the_fields(capsys):
    with pytest.raises(SystemExit):
        main(["cache", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--context-length" in help_text and "Leave BOS/EOS/padding positions out" in help_text


def test_user_errors_exit_2_with_problem_and_fix(tiny_llama_dir, text_file, tmp_path, capsys):
    code = main(["cache", "--model", str(tiny_llama_dir), "--sites", "layers.9.resid_post", "--corpus",
                 str(text_file), "--out", str(tmp_path / "c"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2
    assert "error: site 'layers.9.resid_post': layer 9 does not exist" in err and "fix:" in err
    assert "Traceback" not in err


def test_sites_command_lists_sites(tiny_llama_dir):
    out = subprocess.run([sys.executable, "-m", "saeforge", "sites", "--model", str(tiny_llama_dir)],
                         capture_output=True, text=True, check=True).stdout
    assert "layers.2.mlp_out" in out and "d=32" in out and "model.layers.2.mlp" in out


@pytest.mark.embedded
def test_demo_runs_on_the_embedded_model(embedded_lm, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "saeforge", "demo", "--cache-tokens", "3000", "--train-tokens",
                           "6144", "--batch-size", "512", "--expansion-factor", "2", "--eval-tokens", "1024",
                           "--harvest-tokens", "2048", "--explain-features", "1", "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "cached 3,000 tokens of layers.15.resid_post" in proc.stdout
    assert "trained a TopK SAE (d_sae 1152, k 32) on 6,144 tokens" in proc.stdout
    assert "evaluated on 1,024 held-out token positions" in proc.stdout and "CE rec." in proc.stdout
    report = json.loads((tmp_path / "run" / "eval.json").read_text())["saes"]["layers.15.resid_post"]
    assert report["ce_loss_clean"] < report["ce_loss_sae"] < report["ce_loss_zero_ablation"]
    assert "[5/7] harvested 2,048 held-out tokens" in proc.stdout and "[6/7] explained 1 features" in proc.stdout
    assert "[7/7] steering towards royalty" in proc.stdout and "refined CAA:" in proc.stdout
    assert "measured by the plain model on the generated text" in proc.stdout
    assert f"saeforge serve {tmp_path / 'run'}" in proc.stdout
    from saeforge.data.activation_cache import ActivationCache
    from saeforge.saes import load_sae

    cache = ActivationCache(tmp_path / "activations")
    assert cache.complete and cache.d("layers.15.resid_post") == 576
    sae = load_sae(tmp_path / "run" / "saes" / "layers.15.resid_post")
    x = cache.load("layers.15.resid_post")
    fvu = ((sae(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
    assert fvu < 0.9  # a dozen steps already explain part of the variance on raw activations
