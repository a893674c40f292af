"""Training on the user's own activations: the API, the command line, resume, and what later commands say."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from saeforge.cli import main
from saeforge.errors import SaeforgeError
from saeforge.saes import load_sae
from saeforge.training import TrainConfig, Trainer, train_on_arrays
from tests.conftest import TRAIN_SITES as SITES

SMALL = dict(tokens=256 * 20, batch_size=256, d_sae=128, k=8, checkpoint_every=5, log_every=5, progress=False,
             device="cpu", lr_warmup_steps=5)


@pytest.fixture(scope="module")
def acts(tiny_cache):
    """Real activations (the tiny Llama's), handed over as a plain array as a user would."""
    return tiny_cache.load(SITES[0]).numpy()


def test_train_on_arrays_needs_no_model_and_records_none(acts, tmp_path):
    final = train_on_arrays({"my_site": acts}, TrainConfig(out=str(tmp_path / "run"), **SMALL))
    m = final["my_site"]
    assert m["l0"] == pytest.approx(8) and m["fvu"] < 0.5
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["data"] == {"activation_source": "arrays", "dataset_path": str(tmp_path / "run" / "activations")}
    assert info["config"]["sites"] == ["my_site"]
    cfg = json.loads((tmp_path / "run" / "saes" / "my_site" / "cfg.json").read_text())
    meta = cfg["metadata"]
    assert meta["hook_name"] == "my_site" and cfg["d_in"] == acts.shape[1]
    assert "model_name" not in meta and "model_fingerprint" not in meta and "context_size" not in meta
    sae = load_sae(tmp_path / "run" / "saes" / "my_site")
    x = torch.from_numpy(acts)
    with torch.no_grad():
        assert float((sae(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()) < 0.5


def test_a_run_on_arrays_resumes_bit_identically(acts, tmp_path, monkeypatch):
    train_on_arrays({"s": acts}, out=str(tmp_path / "whole"), **SMALL)
    real_step, calls = Trainer._train_step, {"n": 0}

    def dying_step(self, batch):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return real_step(self, batch)

    monkeypatch.setattr(Trainer, "_train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train_on_arrays({"s": acts}, out=str(tmp_path / "cut"), **SMALL)
    monkeypatch.setattr(Trainer, "_train_step", real_step)
    assert main(["train", "--resume", str(tmp_path / "cut")]) == 0
    a = load_file(str(tmp_path / "whole" / "saes" / "s" / "sae_weights.safetensors"))
    b = load_file(str(tmp_path / "cut" / "saes" / "s" / "sae_weights.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_import_then_train_from_the_command_line(acts, tmp_path, capsys):
    np.save(tmp_path / "acts.npy", acts)
    assert main(["import-activations", "--files", str(tmp_path / "acts.npy"), "--sites", "mysite",
                 "--out", str(tmp_path / "cache"), "--noprogress"]) == 0
    assert "saeforge train --cache" in capsys.readouterr().out
    # the default --sites is not in this cache: the error names the ones it holds
    assert main(["train", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "run"), "--noprogress"]) == 2
    assert "--sites mysite" in capsys.readouterr().err
    assert not (tmp_path / "run" / "run.json").exists()  # a run that failed to start: the same --out is free
    assert main(["train", "--cache", str(tmp_path / "cache"), "--sites", "mysite", "--out", str(tmp_path / "run"),
                 "--tokens", "5120", "--batch-size", "256", "--d-sae", "128", "-k", "8", "--noprogress",
                 "--device", "cpu"]) == 0
    assert (tmp_path / "run" / "saes" / "mysite" / "cfg.json").is_file()


@pytest.mark.parametrize("command", ["eval", "harvest"])
def test_commands_that_need_a_model_ask_for_one(acts, tmp_path, capsys, command):
    train_on_arrays({"s": acts}, out=str(tmp_path / "run"), **{**SMALL, "tokens": 256 * 5})
    capsys.readouterr()
    assert main([command, str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "does not name its model" in err and "--model" in err and "Traceback" not in err


def test_bad_arrays_are_refused_before_training(acts, tmp_path):
    with pytest.raises(SaeforgeError, match="different numbers of rows"):
        train_on_arrays({"a": acts, "b": acts[:-1]}, out=str(tmp_path / "r1"), **SMALL)
    with pytest.raises(SaeforgeError, match=r"no array for site\(s\) other"):
        train_on_arrays({"a": acts}, out=str(tmp_path / "r2"), sites=("other",), **SMALL)
    with pytest.raises(SaeforgeError, match="less than one batch"):
        train_on_arrays({"a": acts}, out=str(tmp_path / "r3"), **{**SMALL, "tokens": 10})
    with pytest.raises(SaeforgeError, match="no run directory"):
        train_on_arrays({"a": acts}, **SMALL)
    assert not any((tmp_path / name).exists() for name in ("r1", "r2", "r3"))
