"""Caches of the user's own activations: arrays, tensors and .npy / .safetensors / .pt files, checked before any
copying, copied a shard at a time."""

import json
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from saeforge.cli import main
from saeforge.data.activation_cache import ActivationCache, write_array_cache
from saeforge.errors import SaeforgeError


def _data(n=1000, d=16, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def test_arrays_and_tensors_round_trip_exactly(tmp_path):
    a, b = _data(), _data(d=8, seed=1)
    cache = ActivationCache.from_arrays(tmp_path / "c", {"s1": a, "s2": torch.from_numpy(b)}, shard_tokens=300,
                                        progress=False)
    m = cache.manifest
    assert m["source"] == "arrays" and "model" not in m and "model_fingerprint" not in m and "context_length" not in m
    assert cache.complete and cache.token_count == 1000 and [s["tokens"] for s in cache.shards] == [300, 300, 300, 100]
    assert np.array_equal(cache.load("s1").numpy(), a) and np.array_equal(cache.load("s2").numpy(), b)
    assert m["mean_norm"]["s1"] == pytest.approx(float(np.linalg.norm(a, axis=1).mean()), rel=1e-6)
    assert cache.data_info() == {"activation_source": "arrays", "dataset_path": str(tmp_path / "c")}
    with pytest.raises(SaeforgeError, match="no token ids"):
        cache.shard_tokens(0)


def test_dtypes_are_kept_or_converted(tmp_path):
    x = torch.randn(50, 4)
    bf = write_array_cache(tmp_path / "bf", {"s": x.bfloat16()}, progress=False)
    assert bf.manifest["dtype"] == "bfloat16" and torch.equal(bf.load("s"), x.bfloat16())
    f64 = write_array_cache(tmp_path / "f64", {"s": x.double().numpy()}, progress=False)
    assert f64.manifest["dtype"] == "float32" and torch.equal(f64.load("s"), x)
    half = write_array_cache(tmp_path / "half", {"s": x}, dtype="float16", progress=False)
    assert torch.equal(half.load("s"), x.half())


def test_files_of_every_kind(tmp_path):
    a, b, c = _data(200, 8), _data(200, 4, 1), _data(200, 6, 2)
    np.save(tmp_path / "resid.npy", a)
    save_file({"mlp": torch.from_numpy(b), "attn": torch.from_numpy(c)}, str(tmp_path / "more.safetensors"))
    torch.save(torch.from_numpy(a), tmp_path / "one.pt")
    torch.save({"x": torch.from_numpy(b)}, tmp_path / "dict.pt")
    assert main(["import-activations", "--files", str(tmp_path / "resid.npy"), str(tmp_path / "more.safetensors"),
                 "--out", str(tmp_path / "c1"), "--shard-tokens", "64", "--noprogress"]) == 0
    cache = ActivationCache(tmp_path / "c1")
    assert sorted(cache.sites) == ["attn", "mlp", "resid"]
    for site, ref in (("resid", a), ("mlp", b), ("attn", c)):
        assert np.array_equal(cache.load(site).numpy(), ref)
    assert main(["import-activations", "--files", str(tmp_path / "one.pt"), str(tmp_path / "dict.pt"),
                 "--sites", "layers.1.resid_post", "layers.1.mlp_out", "--out", str(tmp_path / "c2"),
                 "--noprogress"]) == 0
    cache = ActivationCache(tmp_path / "c2")
    assert np.array_equal(cache.load("layers.1.resid_post").numpy(), a)
    assert np.array_equal(cache.load("layers.1.mlp_out").numpy(), b)
    assert cache.manifest["sites"]["layers.1.mlp_out"]["from"] == "dict.pt:x"


def test_a_npy_file_is_copied_a_shard_at_a_time(tmp_path):
    """Peak memory while importing stays near one shard, not the file (which is memory-mapped)."""
    arr = np.lib.format.open_memmap(tmp_path / "big.npy", mode="w+", dtype=np.float32, shape=(200_000, 64))
    arr[:] = 1.0
    arr.flush()
    del arr
    tracemalloc.start()
    try:
        write_array_cache(tmp_path / "c", {"s": tmp_path / "big.npy"}, shard_tokens=4096, progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    file_bytes, shard_bytes = 200_000 * 64 * 4, 4096 * 64 * 4
    assert peak < 4 * shard_bytes < file_bytes / 10
    assert ActivationCache(tmp_path / "c").token_count == 200_000


@pytest.mark.parametrize("arrays, message", [
    ({"s": np.zeros(10, np.float32)}, r"must be 2-D \[N, d\], got shape \(10,\)"),
    ({"s": np.zeros((2, 3, 4), np.float32)}, "must be 2-D"),
    ({"s": np.zeros((10, 4), np.int64)}, "must be floating point, got int64"),
    ({"s": torch.zeros(10, 4, dtype=torch.int32)}, "must be floating point"),
    ({"s": np.zeros((0, 4), np.float32)}, "is empty"),
    ({"a": np.zeros((10, 4), np.float32), "b": np.zeros((11, 4), np.float32)}, "different numbers of rows: a 10, b 11"),
    ({"s": "nope.npy"}, "does not exist"),
    ({"s": [[1.0, 2.0]]}, "is not an array"),
    ({"a/b": np.zeros((3, 4), np.float32)}, "cannot name a site"),
    ({}, "no activations given"),
])
def test_bad_input_is_refused_before_anything_is_written(tmp_path, arrays, message):
    with pytest.raises(SaeforgeError, match=message) as err:
        write_array_cache(tmp_path / "c", arrays, progress=False)
    assert err.value.fix
    assert not (tmp_path / "c").exists()


def test_rows_with_nan_or_inf_stop_the_import_and_leave_no_cache(tmp_path):
    a = _data(1000, 8)
    a[700, 3] = np.nan
    a[950, 0] = np.inf
    with pytest.raises(SaeforgeError, match=r"row\(s\) 700 hold NaN or Inf") as err:
        write_array_cache(tmp_path / "c", {"s": a}, shard_tokens=300, progress=False)
    assert "np.isfinite" in err.value.fix
    assert not (tmp_path / "c" / "manifest.json").exists() and not (tmp_path / "c" / "shards").exists()
    # float64 values beyond the float32 range are caught too, after conversion
    with pytest.raises(SaeforgeError, match="too large for float32"):
        write_array_cache(tmp_path / "d", {"s": np.full((5, 2), 1e300)}, progress=False)


def test_cli_errors(tmp_path, capsys):
    np.save(tmp_path / "a.npy", _data(10, 4))
    assert main(["import-activations", "--files", str(tmp_path / "a.npy"), str(tmp_path / "missing.pt"),
                 "--out", str(tmp_path / "c")]) == 2
    assert "missing.pt does not exist" in capsys.readouterr().err
    assert main(["import-activations", "--files", str(tmp_path / "a.npy"), "--sites", "x", "y",
                 "--out", str(tmp_path / "c")]) == 2
    assert "2 site name(s) for 1 array(s)" in capsys.readouterr().err
    (tmp_path / "t.txt").write_text("hello")
    assert main(["import-activations", "--files", str(tmp_path / "t.txt"), "--out", str(tmp_path / "c")]) == 2
    assert "unknown file type .txt" in capsys.readouterr().err
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    assert main(["import-activations", "--files", str(tmp_path / "bad.npy"), "--out", str(tmp_path / "c")]) == 2
    assert "could not read" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_an_import_resumes_after_a_kill_and_refuses_other_data(tmp_path, monkeypatch):
    a = _data(1000, 8)
    real_save, calls = np.save, {"n": 0}

    def dying_save(path, arr, *args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_save(path, arr, *args, **kw)

    monkeypatch.setattr(np, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        write_array_cache(tmp_path / "c", {"s": a}, shard_tokens=300, progress=False)
    monkeypatch.setattr(np, "save", real_save)
    assert len(ActivationCache(tmp_path / "c").shards) == 2
    cache = write_array_cache(tmp_path / "c", {"s": a}, shard_tokens=300, progress=False)
    assert cache.complete and np.array_equal(cache.load("s").numpy(), a)
    with pytest.raises(SaeforgeError, match="already holds another cache"):
        write_array_cache(tmp_path / "c", {"s": a[:500]}, shard_tokens=300, progress=False)


def test_saeforge_cache_refuses_a_folder_of_imported_arrays(tmp_path, tiny_llama_dir, text_file, capsys):
    write_array_cache(tmp_path / "c", {"s": _data(10, 4)}, progress=False)
    assert main(["cache", "--model", str(tiny_llama_dir), "--sites", "layers.1.resid_post", "--corpus",
                 str(text_file), "--out", str(tmp_path / "c"), "--tokens", "50", "--device", "cpu"]) == 2
    assert "holds imported arrays" in capsys.readouterr().err
    info = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert info["token_count"] == 10


def test_a_version_1_manifest_is_a_cache_of_a_model(tiny_cache):
    m = dict(tiny_cache.manifest)
    assert tiny_cache.source == "model" and tiny_cache.data_info()["model_fingerprint"] == m["model_fingerprint"]


def test_import_command_is_listed():
    out = subprocess.run([sys.executable, "-m", "saeforge", "import-activations", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "--files" in out and "--sites" in out and ".safetensors" in out
