"""Training DEP on the tiny Llama: two users of opposite styles are told apart on held-out comments, a killed run
resumes to the same weights, and bad input is refused before the model loads."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from saeforge.errors import SaeforgeError
from saeforge.personalization.train import (PersonalizeTrainConfig, batch_loss, load_personalizer,
                                            tokenize_examples, train_personalizer)
from saeforge.personalization.users import read_users


def _cfg(model, users, out, **kw):
    return PersonalizeTrainConfig(**{"users": str(users), "out": str(out), "model": str(model), "slots": 4,
                                     "d_sae": 32, "steps": 8, "batch_size": 4, "lr": 3e-2, "warmup_steps": 2,
                                     "checkpoint_every": 3, "device": "cpu", "threads": 1, "progress": False, **kw})


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_training_tells_two_opposite_users_apart(sharp_llama_dir, two_users_file, tmp_path, seed):
    train_personalizer(_cfg(sharp_llama_dir, two_users_file, tmp_path / "run", steps=300, batch_size=8,
                            warmup_steps=10, checkpoint_every=1000, seed=seed))
    p = load_personalizer(tmp_path / "run", device="cpu")
    users = read_users(two_users_file)
    inputs = p.inputs(users)
    held_out = tokenize_examples(p.lm, users, inputs, "test", 96, 48)
    assert len(held_out) == 16
    gaps = []
    with torch.no_grad():
        for e in held_out:
            own = batch_loss(p.lm, p.adapter, inputs, [e], p.cfg)[1]["ce"]
            other = batch_loss(p.lm, p.adapter, inputs, [replace(e, user=1 - e.user)], p.cfg)[1]["ce"]
            gaps.append(other - own)
    # held-out comments are likelier (per token) under their own user's soft tokens than under the other's: at
    # least 12 of 16 (3.8 % by chance) and by more than 0.08 nats a token on average (measured: 13 and 14 of 16,
    # 0.14 and 0.22 nats for seeds 0 and 1; the noise is the item's words, which the tiny tokenizer spells out)
    assert sum(g > 0 for g in gaps) >= 12 and sum(gaps) / len(gaps) > 0.08, gaps


def test_a_killed_run_resumes_to_the_same_weights(tiny_llama_dir, two_users_file, tmp_path, monkeypatch):
    whole = train_personalizer(_cfg(tiny_llama_dir, two_users_file, tmp_path / "whole"))
    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def dying_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # after the checkpoint of step 3
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train_personalizer(_cfg(tiny_llama_dir, two_users_file, tmp_path / "cut"))
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    assert (tmp_path / "cut" / "checkpoint.pt").is_file() and not (tmp_path / "cut" / "adapter.safetensors").exists()
    resumed = train_personalizer(_cfg(tiny_llama_dir, two_users_file, tmp_path / "cut", threads=2))
    a, b = (load_file(str(tmp_path / n / "adapter.safetensors")) for n in ("whole", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["last"] == whole["last"] and not (tmp_path / "cut" / "checkpoint.pt").exists()
    # a finished run is returned as it is; other settings on the same folder are refused
    assert train_personalizer(_cfg(tiny_llama_dir, two_users_file, tmp_path / "whole")) == whole
    (tmp_path / "whole" / "train.json").unlink()
    with pytest.raises(SaeforgeError, match=r"other settings \(d_sae\)"):
        train_personalizer(_cfg(tiny_llama_dir, two_users_file, tmp_path / "whole", d_sae=16))


def test_bad_input_is_refused_before_the_model_loads(two_users_file, tmp_path):
    broken = tmp_path / "broken.jsonl"
    lines = two_users_file.read_text().splitlines()
    user = json.loads(lines[1])
    del user["history"][3]["text"]
    broken.write_text(lines[0] + "\n" + json.dumps(user) + "\n")
    # the model does not exist: the user file's error must come first
    with pytest.raises(SaeforgeError, match=r"line 2 \(user u001\), history item 3 has no 'text' field"):
        train_personalizer(_cfg(tmp_path / "no_model", broken, tmp_path / "run"))
    with pytest.raises(SaeforgeError, match="--d-sae must be positive"):
        train_personalizer(_cfg(tmp_path / "no_model", two_users_file, tmp_path / "run", d_sae=0))
    with pytest.raises(SaeforgeError, match="no user file"):
        train_personalizer(PersonalizeTrainConfig(out="x"))
    with pytest.raises(SaeforgeError, match="not a finished DEP run"):
        load_personalizer(tmp_path)


def test_the_cli_prints_the_problem_and_the_fix(two_users_file, tmp_path):
    broken = tmp_path / "broken.jsonl"
    user = json.loads(two_users_file.read_text().splitlines()[0])
    del user["queries"][0]["target"]
    broken.write_text(json.dumps(user) + "\n" + two_users_file.read_text().splitlines()[1] + "\n")
    done = subprocess.run([sys.executable, "-m", "saeforge", "personalize", "train", "--users", str(broken),
                           "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "saeforge personalize train: error:" in done.stderr and "query 0 has no 'target' field" in done.stderr
    assert "fix:" in done.stderr and "saeforge personalize users" in done.stderr
