"""Shared option groups: defined once, flat on the command line, in config files and in the Python API."""

import dataclasses

import pytest

from saeforge.cli import main
from saeforge.data.activation_cache import CacheConfig
from saeforge.errors import SaeforgeError
from saeforge.options import ModelOptions, RuntimeOptions, TextOptions, flat_dict
from saeforge.training import TrainConfig


@pytest.mark.parametrize("cls", [TrainConfig, CacheConfig])
def test_flat_keywords_build_and_read_the_groups(cls):
    cfg = cls(model="gpt2", context_length=64, prepend_bos=False, device="cpu", threads=2, dtype="bfloat16")
    assert cfg.model_options == ModelOptions(model="gpt2", model_dtype="bfloat16")
    assert cfg.text_options == TextOptions(context_length=64, prepend_bos=False)
    assert cfg.runtime_options == RuntimeOptions(device="cpu", threads=2)
    assert (cfg.model, cfg.context_length, cfg.model_dtype, cfg.dtype, cfg.threads) == ("gpt2", 64, "bfloat16",
                                                                                         "bfloat16", 2)
    changed = dataclasses.replace(cfg, corpus="x.txt", progress=False)
    assert changed.corpus == "x.txt" and not changed.progress and changed.context_length == 64
    with pytest.raises(AttributeError):
        cfg.no_such_option  # noqa: B018


def test_config_dicts_are_flat_and_read_nested_groups_too():
    cfg = TrainConfig(model="gpt2", k=16)
    d = cfg.to_dict()
    assert d["model"] == "gpt2" and d["k"] == 16 and "model_options" not in d and "dtype" not in d
    assert TrainConfig.from_dict(d) == cfg
    assert TrainConfig.from_dict({"model_options": {"model": "gpt2"}, "k": 16}) == cfg
    with pytest.raises(SaeforgeError, match="unknown training option"):
        TrainConfig.from_dict({"modle": "gpt2"})
    assert flat_dict(CacheConfig())["model_dtype"] == "float32"


@pytest.mark.parametrize("command", ["train", "cache"])
def test_shared_options_have_one_help_text(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, doc in (("--model str", "a hub id, a local Hugging Face folder or a .gguf file"),
                      ("--context-length int", "Tokens per context, BOS included."),
                      ("--noprepend-bos bool", "Start every context with BOS."),
                      ("--device str", "auto, cpu or cuda"), ("--threads int", "CPU threads for PyTorch"),
                      ("--dtype str, --model-dtype str", "dtype the model runs in")):
        assert flag in text and doc in text
