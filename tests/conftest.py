"""Shared fixtures: tiny randomly initialised models of each supported family, with a tiny real tokenizer, saved
as ordinary Hugging Face folders so they load through the same code path as any user model."""

from __future__ import annotations

import os
from pathlib import Path

# Before anything imports huggingface_hub (it reads these once): tests never reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

TEXT = (
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and arrows "
    "of outrageous fortune, or to take arms against a sea of troubles and by opposing end them. "
    "Now is the winter of our discontent made glorious summer by this sun of York. "
    "All the world's a stage, and all the men and women merely players; they have their exits and their entrances. "
)
FAMILIES = ("llama", "mistral", "qwen2", "gemma2", "gpt2", "gpt_neox")


def _tiny_config(family: str, vocab: int):
    import transformers as tf

    common = dict(vocab_size=vocab, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    if family in ("llama", "mistral", "qwen2"):
        cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}[family]
        return cls(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256, **common)
    if family == "gemma2":
        return tf.Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=8, max_position_embeddings=256, sliding_window=64,
                               **common)
    if family == "gpt2":
        return tf.GPT2Config(n_embd=32, n_layer=3, n_head=4, n_positions=256, **common)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                                max_position_embeddings=256, **common)
    raise ValueError(family)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<bos>", "<eos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def make_tiny_model_dir(family: str, tokenizer, folder: Path, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM

    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_tiny_config(family, len(tokenizer)))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory, tiny_tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    return {f: make_tiny_model_dir(f, tiny_tokenizer, root / f) for f in FAMILIES}


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_model_dirs) -> Path:
    return tiny_model_dirs["llama"]


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_dir):
    from saeforge.models.language_model import LanguageModel

    return LanguageModel.load(str(tiny_llama_dir), device="cpu")


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT * 40)
    return path


def embedded_available() -> bool:
    from saeforge.data.corpus import corpus_dir
    from saeforge.models.embedded import embedded_model_dir

    return (embedded_model_dir() / "saeforge_source.json").is_file() and corpus_dir().is_dir()


@pytest.fixture(scope="session")
def embedded_lm():
    if not embedded_available():
        pytest.skip("the embedded model/corpus is not fetched: run `saeforge fetch` (scripts/test.sh does)")
    from saeforge.models.language_model import LanguageModel

    return LanguageModel.load("embedded", device="cpu")


TRAIN_SITES = ("layers.1.resid_post", "layers.2.resid_post")


@pytest.fixture(scope="session")
def tiny_cache(tiny_llama, tiny_llama_dir, tmp_path_factory):
    """~12k activation vectors (d=32) of the tiny Llama at two sites, from non-repeating random-word text."""
    import random

    from saeforge.data.activation_cache import CacheConfig, build_cache

    folder = tmp_path_factory.mktemp("train_cache")
    words = TEXT.split()
    rng = random.Random(0)
    (folder / "t.txt").write_text(" ".join(rng.choice(words) for _ in range(9000)))
    cfg = CacheConfig(out=str(folder / "cache"), model=str(tiny_llama_dir), sites=TRAIN_SITES, tokens=12_000,
                      corpus=str(folder / "t.txt"), context_length=64, batch_size=8, shard_tokens=2000, device="cpu")
    return build_cache(cfg, lm=tiny_llama, progress=False)


@pytest.fixture(scope="session")
def tiny_run(tiny_cache, tmp_path_factory):
    """A finished training run: a TopK SAE (d_sae 128, k 8) on layers.1.resid_post of the tiny Llama."""
    from saeforge.training import TrainConfig, train

    from saeforge.saes.topk import TopKConfig

    run = tmp_path_factory.mktemp("tiny_run") / "run"
    # the size rule's rate, without the short-run rise (40 steps), so the features the tests pick stay put
    train(TrainConfig(out=str(run), cache=str(tiny_cache.folder), sites=(TRAIN_SITES[0],), tokens=256 * 40,
                      batch_size=256, d_sae=128, k=8, progress=False, device="cpu", lr_warmup_steps=5,
                      checkpoint_every=100, lr=TopKConfig.default_lr(128)))
    return run


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # Tests never reach the network: a hub lookup must fail fast and clearly.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
