"""saeforge diff on tiny models: the checks that come before any work, and the whole pipeline (paired
activations, a crosscoder trained through the one training loop, the analysis) with its resumption."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from saeforge.diffing.diff import DiffConfig, check_pair, diff_models
from saeforge.errors import SaeforgeError
from saeforge.models.language_model import LanguageModel


@pytest.fixture(scope="module")
def model_b(tiny_llama_dir, tmp_path_factory, tiny_tokenizer):
    """The tiny Llama with layer 1's MLP changed, and a finetune.json naming the text it was "fine-tuned" on."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import TEXT

    folder = tmp_path_factory.mktemp("model_b")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        model.model.layers[1].mlp.down_proj.weight.add_(0.5 * torch.randn(model.model.layers[1].mlp.down_proj.weight.shape,
                                                                           generator=g))
    model.save_pretrained(folder / "model")
    tiny_tokenizer.save_pretrained(folder / "model")
    focus = folder / "focus.txt"
    focus.write_text("Puck and Oberon and Titania dance in the wood by moonlight. " * 60)
    (folder / "model" / "finetune.json").write_text(json.dumps({"text": str(focus)}))
    return folder / "model"


def _cfg(a, b, out, corpus, **kw):
    return DiffConfig(**{"out": str(out), "model_a": str(a), "model_b": str(b), "site": "layers.1.resid_post",
                         "corpus": str(corpus), "eval_corpus": str(corpus), "tokens": 2048, "context_length": 32,
                         "batch_size": 256, "train_tokens": 256 * 12, "k": 4, "d_sae": 64, "eval_tokens": 512,
                         "progress": False, "threads": 1, **kw})


def test_the_whole_diff_runs_and_resumes(tiny_llama_dir, model_b, text_file, tmp_path):
    report = diff_models(_cfg(tiny_llama_dir, model_b, tmp_path / "diff", text_file))
    out = tmp_path / "diff"
    assert (out / "diff.json").is_file() and (out / "run" / "saes" / "crosscoder" / "cfg.json").is_file()
    assert report["focus_text"].endswith("focus.txt")  # taken from model B's finetune.json
    pairs = json.loads((out / "activations" / "pairs.json").read_text())
    assert pairs["rows"] == 2048 and pairs["rows_by_source"]["focus"] > 0 and pairs["rows_by_source"]["other"] > 0
    meta = json.loads((out / "run" / "saes" / "crosscoder" / "cfg.json").read_text())["metadata"]
    assert meta["reads"] == ["a--layers.1.resid_post", "b--layers.1.resid_post"] and meta["reads"] == meta["writes"]
    c = report["counts"]
    assert sum(c.values()) == 64 and sum(report["histogram"]["counts"]) == 64 - c["dead"]
    for item in report["exclusive_b"]:
        assert item["relative_norm"] >= 0.9 and item["examples"] and set(item["firing_rate"]) == {"focus", "other"}
    for item in report["exclusive_a"]:
        assert item["relative_norm"] <= 0.1
    top = report["most_b_specific"]
    assert [t["relative_norm"] for t in top] == sorted((t["relative_norm"] for t in top), reverse=True)
    ex = top[0]["examples"][0]
    assert set(ex) == {"activation", "source", "before", "token", "after"} and ex["activation"] > 0
    lean = report["lean_by_text"]  # every latent that fired often enough is in exactly one group
    assert 0 < lean["latents"] <= 64 - c["dead"]
    assert sum(g["latents"] for g in lean["groups"].values()) == lean["latents"]
    assert -1 <= lean["spearman_relative_norm"] <= 1
    # run again: the activations and the crosscoder are reused (nothing is retrained)
    trained = (out / "run" / "saes" / "crosscoder" / "sae_weights.safetensors").stat().st_mtime_ns
    again = diff_models(_cfg(tiny_llama_dir, model_b, tmp_path / "diff", text_file))
    assert (out / "run" / "saes" / "crosscoder" / "sae_weights.safetensors").stat().st_mtime_ns == trained
    assert again["counts"] == report["counts"]


def test_models_that_cannot_be_diffed_are_named(tiny_llama_dir, tiny_model_dirs, tmp_path, tiny_tokenizer):
    import transformers as tf

    a = LanguageModel.load(str(tiny_llama_dir), device="cpu")
    wide_dir = tmp_path / "wide"
    cfg = tf.LlamaConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tiny_tokenizer), bos_token_id=0, eos_token_id=1,
                         pad_token_id=2)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(wide_dir)
    tiny_tokenizer.save_pretrained(wide_dir)
    with pytest.raises(SaeforgeError, match="differ in width at layers.1.resid_post: model A .* has 32, model B .* 48"):
        check_pair(a, LanguageModel.load(str(wide_dir), device="cpu"), "layers.1.resid_post")
    other_tok = tmp_path / "other_tok"
    shutil.copytree(tiny_llama_dir, other_tok)
    vocab = json.loads((other_tok / "tokenizer.json").read_text())
    model_vocab = vocab["model"]["vocab"]
    first, second = sorted(model_vocab, key=model_vocab.get)[10:12]
    model_vocab[first], model_vocab[second] = model_vocab[second], model_vocab[first]
    (other_tok / "tokenizer.json").write_text(json.dumps(vocab))
    with pytest.raises(SaeforgeError, match="different tokenizers .*ids differ for") as err:
        check_pair(a, LanguageModel.load(str(other_tok), device="cpu"), "layers.1.resid_post")
    assert "share a tokenizer" in err.value.fix
    with pytest.raises(SaeforgeError, match="layer 7 does not exist"):
        check_pair(a, a, "layers.7.resid_post")


def test_bad_diff_settings_are_refused_before_loading(tmp_path):
    with pytest.raises(SaeforgeError, match="--model-b"):
        diff_models(DiffConfig(out=str(tmp_path / "d")))
    with pytest.raises(SaeforgeError, match="is not a crosscoder"):
        diff_models(DiffConfig(out=str(tmp_path / "d"), model_b="x", architecture="topk"))
    with pytest.raises(SaeforgeError, match="less than one batch"):
        diff_models(DiffConfig(out=str(tmp_path / "d"), model_b="x", tokens=100))
