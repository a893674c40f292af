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


SHARED = ("model", "dtype", "model_dtype", "corpus", "text_field", "context_length", "device", "threads", "progress")


def test_the_commands_take_their_shared_options_from_the_groups(capsys):
    """Every command on a model or on trained SAEs gets model/dtype/corpus/context/device/progress options from an
    option group, so each option has one help text everywhere (explain's and convert's `--model` mean something else:
    the explainer, a metadata override)."""
    from saeforge.cli import _command, main
    from saeforge.options import flat_field_names

    helps: dict[str, set[str]] = {}
    for command in ("cache", "train", "eval", "harvest", "inspect", "contrast", "steer", "compare-steering", "serve",
                    "demo", "explain"):
        cls = _command(command)[0]
        names = flat_field_names(cls)
        # contrast reads two files of short texts, not a corpus: its --text-field and --context-length are its own
        # explain's --model is the explainer, not the model the SAEs read
        own = [n for n in SHARED if n in names and names[n][0] is None
               and not (command == "contrast" and n in ("text_field", "context_length"))
               and not (command == "explain" and n in ("model", "progress"))]
        assert not own, f"{command} defines {own} itself"
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        for flag in ("--device str", "--threads int", "--text-field str"):
            if flag in text and not (command == "contrast" and flag == "--text-field str"):
                helps.setdefault(flag, set()).add(text.rsplit(flag, 1)[1].split(" (default")[0].split(" --")[0].strip())
    assert helps["--device str"] == {"auto, cpu or cuda (auto: cuda when available)."}
    assert len(helps["--threads int"]) == 1 and len(helps["--text-field str"]) == 1


def test_eval_config_is_flat_for_callers_and_in_eval_json():
    from saeforge.evals.evaluate import EvalConfig
    from saeforge.options import flat_dict

    cfg = EvalConfig(path="run", model="gpt2", dtype="bfloat16", corpus="x.txt", context_length=64, device="cpu")
    assert (cfg.model, cfg.dtype, cfg.corpus, cfg.context_length, cfg.device) == ("gpt2", "bfloat16", "x.txt", 64,
                                                                                   "cpu")
    assert cfg.model_options.model == "gpt2" and cfg.text_options.corpus == "x.txt"
    saved = flat_dict(cfg)
    assert {"path", "model", "dtype", "corpus", "text_field", "context_length", "device", "progress", "tokens",
            "batch_size", "site", "plots", "allow_training_text"} <= set(saved)
    assert saved["dtype"] == "bfloat16" and not any(isinstance(v, dict) for v in saved.values())
