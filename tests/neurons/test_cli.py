"""``saeforge snmf fit | inspect | steer | compare`` end to end on the tiny models."""

from __future__ import annotations

import json

import pytest
import torch

from saeforge.cli import main
from saeforge.errors import SaeforgeError
from saeforge.neurons.fit import SNMFFitConfig, fit_command


def _fit_args(model, text, out, *extra):
    return ["snmf", "fit", str(out), "--model", str(model), "--site", "layers.1.mlp_hidden", "--corpus", text,
            "--tokens", "800", "--context-length", "32", "--batch-size", "8", "--rank", "6", "--sparsity", "0.1",
            "--max-iter", "60", "--patience", "60", "--store-corpus", text, "--store-tokens", "256",
            "--device", "cpu", "--noprogress", *extra]


def test_fit_inspect_and_steer_from_the_command_line(tiny_llama_dir, text_path, tmp_path, capsys):
    out = tmp_path / "fit"
    assert main(_fit_args(tiny_llama_dir, text_path, out, "--coarse-rank", "2")) in (0, None)
    printed = capsys.readouterr().out
    assert "6 features × 7 of 64 neurons" in printed and "saeforge serve" in printed
    assert {p.name for p in out.iterdir()} >= {"snmf.safetensors", "snmf.json", "features.sqlite"}
    assert not (out / "checkpoint.safetensors").exists()
    assert (out / "plots" / "snmf_loss.png").read_bytes()[:4] == b"\x89PNG"
    meta = json.loads((out / "snmf.json").read_text())
    assert meta["info"]["site"] == "layers.1.mlp_hidden" and meta["coarse_rank"] == 2
    assert main(["snmf", "inspect", str(out), "--features", "0", "5"]) in (0, None)
    printed = capsys.readouterr().out
    assert "#0" in printed and "#5" in printed and "promotes" in printed
    assert main(["snmf", "steer", str(out), "--feature", "1", "--target-kl", "0.004", "--prompts", "To be",
                 "--max-new-tokens", "4", "--device", "cpu"]) in (0, None)
    printed = capsys.readouterr().out
    assert "calibrated to KL 0.004" in printed and "steered:" in printed
    # a second fit into the same folder is refused before any work
    assert main(_fit_args(tiny_llama_dir, text_path, out)) == 2
    assert "already holds an SNMF fit" in capsys.readouterr().err


def test_a_fit_from_a_cache_streams_its_shards_and_resumes(tiny_llama, tiny_llama_dir, text_path, tmp_path):
    from saeforge.data.activation_cache import CacheConfig, build_cache
    from saeforge.neurons.snmf import SNMF

    cache = build_cache(CacheConfig(out=str(tmp_path / "cache"), model=str(tiny_llama_dir),
                                    sites=("layers.1.mlp_hidden",), tokens=1200, corpus=text_path, context_length=32,
                                    batch_size=8, shard_tokens=300, device="cpu"), lm=tiny_llama, progress=False)
    assert len(cache.shards) >= 3
    cfg = SNMFFitConfig(out=str(tmp_path / "a"), cache=str(cache.folder), site="layers.1.mlp_hidden", tokens=1200,
                        rank=5, sparsity=0.1, max_iter=40, patience=40, checkpoint_every=10, store=False,
                        progress=False)
    whole = fit_command(cfg)
    assert whole.info["tokens"] == 1200 and whole.info["source"].startswith("cache")
    # a killed fit (a checkpoint at iteration 20 left behind) resumes to the same features
    from dataclasses import replace

    from saeforge.neurons.snmf import CacheChunks, fit_snmf

    class Killed(Exception):
        pass

    def kill(it, _):
        if it == 25:
            raise Killed

    with pytest.raises(Killed):
        fit_snmf(CacheChunks(cache, "layers.1.mlp_hidden", 1200), cfg.settings(), checkpoint=tmp_path / "b",
                 checkpoint_every=10, on_iteration=kill)
    resumed = fit_command(replace(cfg, out=str(tmp_path / "b")))
    assert torch.equal(resumed.features, whole.features) and resumed.history == whole.history
    assert torch.equal(SNMF.load(tmp_path / "b").features, whole.features)


@pytest.mark.parametrize("argv,message", [
    (["--site", "layers.1.resid_post"], "not an MLP hidden site"),
    (["--rank", "65"], "above the number of neurons (64)"),
    (["--site", "layers.9.mlp_hidden"], "3 layers"),
    (["--coarse-rank", "6"], "not below --rank"),
    (["--sparsity", "2"], "sparsity 2.0 is not a fraction"),
])
def test_bad_input_exits_2_before_loading_the_model(tiny_llama_dir, text_path, tmp_path, capsys, argv, message):
    assert main(_fit_args(tiny_llama_dir, text_path, tmp_path / "x") + argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x" / "snmf.json").exists()


@pytest.mark.parametrize("family", ["opt", "mixtral"])
def test_a_family_without_an_mlp_hidden_site_is_refused(no_mlp_model_dirs, text_path, tmp_path, family):
    with pytest.raises(SaeforgeError, match="has no MLP hidden site"):
        fit_command(SNMFFitConfig(out=str(tmp_path / "x"), model=str(no_mlp_model_dirs[family]),
                                  site="layers.0.mlp_hidden", rank=4, progress=False))


def test_compare_runs_every_method_on_the_tiny_model(tiny_run, tmp_path):
    from saeforge.neurons.compare import SNMFCompareConfig, compare, format_report

    cfg = SNMFCompareConfig(sae=str(tiny_run), layer=1, rank=6, sparsity=0.1, max_iter=80, patience=40,
                            concepts=("colours", "weekdays"), target_kls=(0.003,), max_new_tokens=4,
                            out=str(tmp_path / "cmp"), device="cpu", progress=False)
    report = compare(cfg)
    assert set(report["detection"]) == {"colours", "weekdays"}
    for row in report["detection"].values():
        for m in ("snmf", "sae", "diffmeans"):
            assert 0.0 <= row[m]["test_auroc"] <= 1.0 and 0.0 <= row[m]["selection_auroc"] <= 1.0
        assert 0 <= row["snmf"]["feature"] < 6 and 0 <= row["sae"]["feature"] < 128
    methods = [(r["concept"], r["method"]) for r in report["steering"]]
    assert len(methods) == 2 * 4 and ("colours", "none") in methods
    for r in report["steering"]:
        assert 0 <= r["behaviour"] <= 1 and r["perplexity"] > 0 and r["coherence"] <= 1
        if r["method"] != "none" and r["reached"]:
            assert abs(r["kl"] - 0.003) <= 0.1 * 0.003
    assert json.loads((tmp_path / "cmp" / "snmf_compare.json").read_text())["layer"] == 1
    text = format_report(report)
    assert "| mean |" in text and "| diffmeans | 0.003 |" in text


def test_auroc_counts_ties_as_half():
    from saeforge.neurons.compare import auroc

    pos, neg = torch.tensor([[3.0], [2.0]]), torch.tensor([[1.0], [2.0]])
    assert float(auroc(pos, neg)[0]) == pytest.approx((1 + 1 + 1 + 0.5) / 4)
