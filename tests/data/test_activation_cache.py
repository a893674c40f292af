import errno
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from saeforge.data.activation_cache import ActivationCache, CacheConfig, build_cache
from saeforge.data.text_source import TextSource
from saeforge.data.token_stream import TokenStream
from saeforge.errors import SaeforgeError


def _cfg(model_dir, text_file, out, **kw):
    base = dict(out=str(out), model=str(model_dir), sites=("layers.1.resid_post", "layers.0.mlp_out"),
                tokens=1000, corpus=str(text_file), context_length=32, batch_size=4, shard_tokens=300, device="cpu")
    base.update(kw)
    return CacheConfig(**base)


def _arrays(cache: ActivationCache, site: str) -> np.ndarray:
    return cache.load(site).numpy()


def test_cache_holds_exactly_the_model_activations_of_the_kept_positions(tiny_llama, tiny_llama_dir, text_file,
                                                                         tmp_path):
    cfg = _cfg(tiny_llama_dir, text_file, tmp_path / "c")
    cache = build_cache(cfg, lm=tiny_llama, progress=False)
    m = cache.manifest
    assert m["token_count"] == 1000 == sum(s["tokens"] for s in m["shards"]) and m["complete"]
    assert len(m["shards"]) >= 3 and m["sites"]["layers.1.resid_post"]["d"] == 32
    ts = TokenStream.for_model(TextSource(str(text_file)), tiny_llama, cfg.token_policy())
    ids = torch.stack([torch.from_numpy(c) for c in ts.contexts()])[: m["shards"][-1]["context_end"]]
    keep = ts.keep_mask(ids)
    ref = tiny_llama.read(ids, ["layers.1.resid_post", "layers.0.mlp_out"])
    for site in cfg.sites:
        expected = ref[site][keep][:1000]
        assert torch.equal(cache.load(site), expected)
        norms = expected.norm(dim=-1)
        assert m["mean_norm"][site] == pytest.approx(norms.mean().item(), rel=1e-6)
    tokens = np.concatenate([cache.shard_tokens(i) for i in range(len(m["shards"]))])
    assert np.array_equal(tokens, ids[keep][:1000].numpy())
    assert not (tokens == tiny_llama.bos_token_id()).any()


def test_bfloat16_cache_round_trips(tiny_llama_dir, text_file, tmp_path):
    cache = build_cache(_cfg(tiny_llama_dir, text_file, tmp_path / "c", dtype="bfloat16", tokens=200),
                        progress=False)
    x = cache.load("layers.1.resid_post")
    assert x.dtype == torch.bfloat16 and x.shape == (200, 32) and torch.isfinite(x.float()).all()


def test_extending_a_cache_resumes_and_equals_one_run(tiny_llama, tiny_llama_dir, text_file, tmp_path):
    whole = build_cache(_cfg(tiny_llama_dir, text_file, tmp_path / "whole", tokens=900), lm=tiny_llama,
                        progress=False)
    build_cache(_cfg(tiny_llama_dir, text_file, tmp_path / "parts", tokens=600), lm=tiny_llama, progress=False)
    parts = build_cache(_cfg(tiny_llama_dir, text_file, tmp_path / "parts", tokens=900), lm=tiny_llama,
                        progress=False)
    assert parts.token_count == 900
    assert np.array_equal(_arrays(parts, "layers.1.resid_post"), _arrays(whole, "layers.1.resid_post"))


def test_crash_mid_shard_leaves_a_valid_cache_that_resumes(tiny_llama, tiny_llama_dir, text_file, tmp_path,
                                                           monkeypatch):
    ref = build_cache(_cfg(tiny_llama_dir, text_file, tmp_path / "ref"), lm=tiny_llama, progress=False)
    out = tmp_path / "c"
    real_save, calls = np.save, {"n": 0}

    def failing_save(path, arr, *a, **k):
        calls["n"] += 1
        if calls["n"] == 5:  # inside the second shard
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(path, arr, *a, **k)

    monkeypatch.setattr(np, "save", failing_save)
    with pytest.raises(SaeforgeError, match="disk full") as err:
        build_cache(_cfg(tiny_llama_dir, text_file, out), lm=tiny_llama, progress=False)
    assert "re-run" in str(err.value)
    monkeypatch.setattr(np, "save", real_save)
    half = ActivationCache(out)
    assert len(half.shards) == 1 and not half.complete
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["00000"]  # no half-written shard
    done = build_cache(_cfg(tiny_llama_dir, text_file, out), lm=tiny_llama, progress=False)
    assert np.array_equal(_arrays(done, "layers.0.mlp_out"), _arrays(ref, "layers.0.mlp_out"))


def test_unrecorded_shard_is_discarded_on_resume(tiny_llama, tiny_llama_dir, text_file, tmp_path):
    out = tmp_path / "c"
    build_cache(_cfg(tiny_llama_dir, text_file, out, tokens=300), lm=tiny_llama, progress=False)
    stray = out / "shards" / "00001"
    stray.mkdir()
    (stray / "layers.1.resid_post.npy").write_bytes(b"garbage")
    (out / "shards" / ".tmp-00002.abc").mkdir()
    cache = build_cache(_cfg(tiny_llama_dir, text_file, out, tokens=700), lm=tiny_llama, progress=False)
    assert cache.token_count == 700 and cache.load("layers.1.resid_post").shape == (700, 32)
    assert not any(p.name.startswith(".tmp-") for p in (out / "shards").iterdir())


def test_cache_of_another_model_or_other_settings_is_refused(tiny_llama, tiny_llama_dir, tiny_model_dirs,
                                                             text_file, tmp_path):
    out = tmp_path / "c"
    build_cache(_cfg(tiny_llama_dir, text_file, out, tokens=100), lm=tiny_llama, progress=False)
    with pytest.raises(SaeforgeError, match="holds activations of a different model"):
        build_cache(_cfg(tiny_model_dirs["qwen2"], text_file, out, tokens=200, sites=("layers.1.resid_post",
                                                                                     "layers.0.mlp_out")),
                    progress=False)
    with pytest.raises(SaeforgeError) as err:
        build_cache(_cfg(tiny_llama_dir, text_file, out, tokens=200, context_length=16), lm=tiny_llama,
                    progress=False)
    assert "context_length: cache has 32, asked for 16" in str(err.value)


def test_bad_inputs(tiny_llama, tiny_llama_dir, text_file, tmp_path):
    with pytest.raises(SaeforgeError, match="unknown site"):
        build_cache(_cfg(tiny_llama_dir, text_file, tmp_path / "a", sites=("layers.0.nope",)), lm=tiny_llama)
    with pytest.raises(SaeforgeError, match="ran out after"):
        build_cache(_cfg(tiny_llama_dir, text_file, tmp_path / "b", tokens=10_000_000), lm=tiny_llama,
                    progress=False)
    (tmp_path / "notcache").mkdir()
    (tmp_path / "notcache" / "x.txt").write_text("mine")
    with pytest.raises(SaeforgeError, match="is not an activation cache"):
        build_cache(_cfg(tiny_llama_dir, text_file, tmp_path / "notcache"), lm=tiny_llama)
    with pytest.raises(SaeforgeError, match="no manifest.json"):
        ActivationCache(tmp_path / "notcache")


def test_corrupt_shard_is_reported(tiny_llama, tiny_llama_dir, text_file, tmp_path):
    cache = build_cache(_cfg(tiny_llama_dir, text_file, tmp_path / "c", tokens=300), lm=tiny_llama, progress=False)
    path = tmp_path / "c" / "shards" / "00000" / "layers.1.resid_post.npy"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(SaeforgeError, match="missing or corrupt"):
        cache.load("layers.1.resid_post")


def test_killed_cache_process_resumes_to_the_same_result(tiny_llama_dir, text_file, tmp_path):
    """A real `saeforge cache` process killed with SIGKILL mid-run; re-running it finishes the same cache."""
    big_text = tmp_path / "big.txt"
    big_text.write_text(text_file.read_text() * 20)
    args = ["--model", str(tiny_llama_dir), "--sites", "layers.2.resid_post", "--tokens", "60000",
            "--corpus", str(big_text), "--context-length", "32", "--batch-size", "2", "--shard-tokens", "200",
            "--device", "cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "saeforge", "cache"]
    subprocess.run(cmd + args + ["--out", str(tmp_path / "ref")], check=True, env=env, capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen(cmd + args + ["--out", str(out)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if len(json.loads((out / "manifest.json").read_text())["shards"]) >= 3:
                break
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = ActivationCache(out)
    assert not partial.complete, "the run finished before it could be killed; make it longer"
    assert partial.load("layers.2.resid_post").shape[0] == partial.token_count  # what is recorded is readable
    subprocess.run(cmd + args + ["--out", str(out)], check=True, env=env, capture_output=True)
    a, b = ActivationCache(out), ActivationCache(tmp_path / "ref")
    assert a.complete and a.token_count == b.token_count == 60000
    assert np.array_equal(_arrays(a, "layers.2.resid_post"), _arrays(b, "layers.2.resid_post"))


def test_a_second_cache_writer_on_one_folder_is_refused(tiny_llama_dir, text_file, tmp_path, capsys):
    from saeforge.cli import main
    from tests.utils.lock_holder import lock_held_elsewhere

    out = tmp_path / "c"
    with lock_held_elsewhere(out, "saeforge cache") as pid:
        assert main(["cache", "--model", str(tiny_llama_dir), "--sites", "layers.1.resid_post", "--corpus",
                     str(text_file), "--out", str(out), "--tokens", "100", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"in use by pid {pid}" in err and "two saeforge cache processes" in err
    assert "writable" not in err and not (out / "manifest.json").exists()
    # free again: the lock file alone does not make the folder "not a cache"
    cache = build_cache(_cfg(tiny_llama_dir, text_file, out, tokens=100), progress=False)
    assert cache.complete


def test_random_bytes_and_impossible_sites_are_refused_before_the_model_loads(tiny_llama_dir, text_file, tmp_path,
                                                                             monkeypatch, capsys):
    import random

    from saeforge.cli import main
    from saeforge.models.language_model import LanguageModel

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(LanguageModel, "load", no_model)
    junk = tmp_path / "junk.txt"
    junk.write_bytes(random.Random(0).randbytes(4096))
    base = ["cache", "--model", str(tiny_llama_dir), "--out", str(tmp_path / "c"), "--device", "cpu"]
    assert main([*base, "--corpus", str(junk), "--sites", "layers.1.resid_post"]) == 2
    assert "junk.txt is not UTF-8 text" in capsys.readouterr().err
    assert main([*base, "--corpus", str(text_file), "--sites", "layers.1.resid_post", "layers.7.mlp_out"]) == 2
    err = capsys.readouterr().err
    assert "layer 7 does not exist, the model has 3 layers" in err and "fix:" in err
    assert not (tmp_path / "c").exists()
