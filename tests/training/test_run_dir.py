"""The run directory: locking against a second writer, and resuming runs whose run.json an older version wrote."""

import json

import pytest
import torch
from safetensors.torch import load_file

from saeforge.cli import main
from saeforge.training import TrainConfig, Trainer, train
from tests.conftest import TRAIN_SITES as SITES
from tests.utils.lock_holder import lock_held_elsewhere

# run.json "config" as saeforge wrote it before the option groups (flat keys, no `threads`), with this test's values.
OLD_LAYOUT = """{"out": "OUT", "resume": "", "config": "", "model": "embedded", "sites": ["SITE"], "cache": "CACHE",
 "corpus": "embedded:train", "text_field": "text", "context_length": 128, "prepend_bos": true,
 "exclude_special_tokens": true, "model_dtype": "float32", "tokens": 5120, "batch_size": 256, "buffer_tokens": 65536,
 "shards_per_fill": 2, "seed": 0, "device": "cpu", "architecture": "topk", "expansion_factor": 8, "d_sae": 128,
 "k": 8, "sparsity_coefficient": -1.0, "sae_options": "", "normalize_activations": "expected_norm",
 "dead_after_tokens": 0, "optimizer": "adam", "lr": 0.0, "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_eps": 1e-08,
 "weight_decay": 0.0, "lr_warmup_steps": 5, "lr_decay": "linear", "lr_decay_fraction": 0.2,
 "sparsity_warmup_fraction": 0.05, "grad_clip_norm": 1.0, "checkpoint_every": 5, "log_every": 5, "progress": false,
 "saes": []}"""


def _cfg(cache, out, **kw):
    base = dict(out=str(out), cache=str(cache.folder), sites=(SITES[0],), tokens=256 * 20, batch_size=256,
                d_sae=128, k=8, checkpoint_every=5, log_every=5, progress=False, device="cpu", lr_warmup_steps=5)
    return TrainConfig(**{**base, **kw})


def test_a_run_json_in_the_old_flat_layout_resumes_bit_identically(tiny_cache, tmp_path, monkeypatch):
    train(_cfg(tiny_cache, tmp_path / "whole"))
    real_step, calls = Trainer._train_step, {"n": 0}

    def dying_step(self, batch):
        calls["n"] += 1
        if calls["n"] == 8:  # after the checkpoint at step 5
            raise KeyboardInterrupt
        return real_step(self, batch)

    monkeypatch.setattr(Trainer, "_train_step", dying_step)
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tiny_cache, cut))
    monkeypatch.setattr(Trainer, "_train_step", real_step)
    info = json.loads((cut / "run.json").read_text())
    old = json.loads(OLD_LAYOUT.replace("OUT", str(cut)).replace("SITE", SITES[0]).replace(
        "CACHE", str(tiny_cache.folder)))
    assert set(old) < set(info["config"]) and "threads" not in old  # really the old layout
    info["config"] = old
    (cut / "run.json").write_text(json.dumps(info))
    assert main(["train", "--resume", str(cut), "--device", "cpu"]) == 0
    a = load_file(str(tmp_path / "whole" / "saes" / SITES[0] / "sae_weights.safetensors"))
    b = load_file(str(cut / "saes" / SITES[0] / "sae_weights.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # and a changed option is still caught against the old layout
    assert main(["train", "--resume", str(cut), "-k", "16"]) == 2


@pytest.mark.parametrize("resume", [False, True])
def test_a_second_train_on_one_run_directory_is_refused(tiny_cache, tmp_path, capsys, resume):
    run = tmp_path / "run"
    if resume:
        train(_cfg(tiny_cache, run, tokens=256 * 5))
    args = ["--resume", str(run)] if resume else ["--out", str(run), "--cache", str(tiny_cache.folder),
                                                  "--sites", SITES[0], "--tokens", "2560", "--batch-size", "256"]
    with lock_held_elsewhere(run, "saeforge train") as pid:
        assert main(["train", *args, "--noprogress"]) == 2
    err = capsys.readouterr().err
    assert f"is in use by pid {pid}" in err and "two saeforge train processes" in err
    if not resume:
        assert not (run / "run.json").exists()  # the loser wrote nothing


def test_a_run_from_a_cache_records_the_versions_without_importing_transformers(tiny_cache, tmp_path):
    import subprocess
    import sys

    import transformers

    # its own process: this one has imported transformers already
    script = ("import sys; from saeforge.training import TrainConfig, train; "
              f"train(TrainConfig(out={str(tmp_path / 'run')!r}, cache={str(tiny_cache.folder)!r}, "
              f"sites=({SITES[0]!r},), tokens=512, batch_size=256, d_sae=32, k=4, progress=False, device='cpu')); "
              "print('imported' if 'transformers' in sys.modules else 'not imported')")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "not imported"
    versions = json.loads((tmp_path / "run" / "run.json").read_text())["versions"]
    assert versions["transformers"] == transformers.__version__ and versions["torch"] == torch.__version__
