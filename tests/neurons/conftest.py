"""Fixtures of the neuron-level tests: an SNMF fitted on the tiny Llama's MLP neurons, and tiny models of families
without a dense MLP hidden site."""

from __future__ import annotations

import pytest
import torch


def fit_on_text(lm, site: str, rank: int = 8, contexts: int = 24):
    from saeforge.neurons.fit import collect_activations
    from saeforge.neurons.snmf import SNMFSettings, fit_snmf

    x = collect_activations(lm, site, corpus=_text_file(), tokens=contexts * 64, context_length=64, progress=False)
    return fit_snmf(x, SNMFSettings(rank=rank, sparsity=0.1, max_iter=300, patience=40, seed=0),
                    info={"site": site}), x


_TEXT: dict = {}


def _text_file():
    import random
    import tempfile
    from pathlib import Path

    from tests.conftest import TEXT

    if "path" not in _TEXT:
        folder = Path(tempfile.mkdtemp(prefix="snmf_text_"))
        words = TEXT.split()
        rng = random.Random(3)
        (folder / "t.txt").write_text(" ".join(rng.choice(words) for _ in range(6000)))
        _TEXT["path"] = str(folder / "t.txt")
    return _TEXT["path"]


@pytest.fixture(scope="session")
def text_path():
    return _text_file()


@pytest.fixture(scope="session")
def tiny_snmf(tiny_llama):
    """(fit, activations): rank 8, 10 % of the tiny Llama's 64 neurons per feature, layer 1."""
    torch.manual_seed(0)
    return fit_on_text(tiny_llama, "layers.1.mlp_hidden")


@pytest.fixture(scope="session")
def no_mlp_model_dirs(tiny_tokenizer, tmp_path_factory):
    """{"opt": a family saeforge has no mapping for, "mixtral": a mixture-of-experts MLP}."""
    import transformers as tf

    root = tmp_path_factory.mktemp("no_mlp")
    common = dict(vocab_size=len(tiny_tokenizer), bos_token_id=0, eos_token_id=1, pad_token_id=2)
    configs = {
        "opt": tf.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                            word_embed_proj_dim=32, max_position_embeddings=128, **common),
        "mixtral": tf.MixtralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1,
                                    max_position_embeddings=128, **common),
    }
    out = {}
    for name, cfg in configs.items():
        torch.manual_seed(0)
        model = tf.AutoModelForCausalLM.from_config(cfg)
        model.save_pretrained(root / name)
        tiny_tokenizer.save_pretrained(root / name)
        out[name] = root / name
    return out
