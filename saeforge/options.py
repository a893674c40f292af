"""Options several commands share, each defined once: small frozen dataclasses that a command's config holds as
nested fields (option groups).

simple_parsing flattens nested dataclasses, so the flags stay flat (``--model``, ``--context-length``...) and each
group gets its own section in ``--help`` (the nested field's docstring is the section's text, so a command can say
how the group applies to it). The groups:

- commands that read a model over text: :class:`ModelOptions`, :class:`TextOptions`, :class:`RuntimeOptions`
  (``cache``, ``train``, ``flow suite``);
- commands that work on trained SAEs, whose model and token rules come from the SAEs' metadata:
  :class:`RunModelOptions` (or :class:`RunModelAndDtypeOptions`), :class:`HeldOutTextOptions` and
  :class:`RuntimeOptions` (``eval``, ``harvest``), or :class:`RunModelOptions` and :class:`DeviceOptions`
  (``inspect``, ``contrast``, ``steer``, ``compare-steering``, ``serve``; ``demo`` has :class:`DeviceOptions`).

For example the evaluation::

    @flat_options
    @dataclass(frozen=True)
    class EvalConfig:
        path: str = field(default="", positional=True)
        model_options: RunModelAndDtypeOptions = field(default_factory=RunModelAndDtypeOptions)
        \"\"\"The model the SAEs are spliced into.\"\"\"
        text_options: HeldOutTextOptions = field(default_factory=HeldOutTextOptions)
        runtime_options: RuntimeOptions = field(default_factory=RuntimeOptions)

A command whose defaults differ passes its own instance (``field(default_factory=lambda: TextOptions(...))``).

:func:`flat_options` keeps the config flat for everything that is not the parser: ``EvalConfig(model="gpt2",
context_length=64)`` builds it, ``cfg.context_length`` reads through to the group, ``dataclasses.replace(cfg,
device="cpu")`` works, and :func:`flat_dict` / :func:`from_flat_dict` give the flat mapping config files and
``run.json`` hold (nested mappings, ``{"model_options": {"model": ...}}``, are read too). Field names must therefore be
unique across a config and its groups; the decorator checks that.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass
from typing import Any

from simple_parsing.helpers import field

from saeforge.errors import SaeforgeError

__all__ = ["DeviceOptions", "HeldOutTextOptions", "ModelOptions", "RunModelAndDtypeOptions", "RunModelOptions",
           "RuntimeOptions", "TextOptions", "flat_dict", "flat_field_names", "flat_options", "from_flat_dict",
           "option_groups"]

MODEL_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class ModelOptions:
    """The language model the activations come from."""

    model: str = "embedded"
    """Model: `embedded` (SmolLM2-135M-Instruct), a hub id, a local Hugging Face folder or a .gguf file."""
    model_dtype: str = field(default="float32", alias=["--dtype"])
    """dtype the model runs in: float32 or bfloat16 (a cache also stores its activations in it)."""


@dataclass(frozen=True)
class TextOptions:
    """The text the model reads and how it is cut into contexts."""

    corpus: str = "embedded:train"
    """Text: embedded[:train|validation|all], a .txt file, a folder of .txt files, a .jsonl file, or hf:NAME[:SPLIT]."""
    text_field: str = "text"
    """Field holding the text in .jsonl files and hf: datasets."""
    context_length: int = 128
    """Tokens per context, BOS included."""
    prepend_bos: bool = True
    """Start every context with BOS."""
    exclude_special_tokens: bool = True
    """Leave BOS/EOS/padding positions out of the activations (their norms are outliers)."""

    def token_policy(self):
        from saeforge.data.token_stream import TokenPolicy

        return TokenPolicy(self.context_length, self.prepend_bos, self.exclude_special_tokens)


@dataclass(frozen=True)
class DeviceOptions:
    """Where the model runs."""

    device: str = "auto"
    """auto, cpu or cuda (auto: cuda when available)."""


@dataclass(frozen=True)
class RuntimeOptions(DeviceOptions):
    """Where and how the work runs; none of these change what is computed."""

    threads: int = 0
    """CPU threads for PyTorch; 0: automatic (the CPUs this process may use, fewer when other work keeps them busy;
    OMP_NUM_THREADS, when set, wins)."""
    progress: bool = True
    """Show a progress bar."""


# Commands that work on trained SAEs (eval, harvest, inspect, steer...) read the model and the text the SAEs were
# trained with, from their metadata, unless told otherwise.


@dataclass(frozen=True)
class RunModelOptions:
    """The language model the SAEs read."""

    model: str = ""
    """Model; empty: the one the SAEs were trained on (their metadata). Else `embedded`, a hub id, a local Hugging
    Face folder or a .gguf file."""


@dataclass(frozen=True)
class RunModelAndDtypeOptions(RunModelOptions):
    """The language model the SAEs read, and its dtype."""

    dtype: str = "float32"
    """dtype the model runs in: float32 or bfloat16."""


@dataclass(frozen=True)
class HeldOutTextOptions:
    """Held-out text the SAEs are measured on."""

    corpus: str = "embedded:validation"
    """Held-out text (not the training text): embedded:validation, a .txt file, a folder of .txt files, a .jsonl file,
    or hf:NAME[:SPLIT]."""
    text_field: str = "text"
    """Field holding the text in .jsonl files and hf: datasets."""
    context_length: int = 0
    """Tokens per context, BOS included; 0: the SAEs' training context length."""


# ------------------------------------------------------------------------------------------------------------------
# The flat view of a config with option groups


@functools.cache
def option_groups(cls: type) -> dict[str, type]:
    """``{field name: options dataclass}`` for the fields of ``cls`` that are option groups."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)
            if isinstance(hints.get(f.name), type) and dataclasses.is_dataclass(hints[f.name])}


@functools.cache
def flat_field_names(cls: type) -> dict[str, tuple[str | None, str]]:
    """``{flat name: (group field or None, field name)}``: every option of ``cls``, groups flattened; aliases
    (``dtype`` for ``model_dtype``) map to their field too."""
    groups = option_groups(cls)
    out: dict[str, tuple[str | None, str]] = {}
    for f in dataclasses.fields(cls):
        if f.name in groups:
            for g in dataclasses.fields(groups[f.name]):
                names = [g.name] + [a.lstrip("-").replace("-", "_") for a in g.metadata.get("alias", [])]
                for name in names:
                    if name in out:
                        raise TypeError(f"{cls.__name__}: option {name!r} is defined twice")
                    out[name] = (f.name, g.name)
        else:
            if f.name in out:
                raise TypeError(f"{cls.__name__}: option {f.name!r} is defined twice")
            out[f.name] = (None, f.name)
    return out


def _group_default(cls: type, group: str) -> Any:
    f = next(f for f in dataclasses.fields(cls) if f.name == group)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _nest(cls: type, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Move flat keywords that name a group's field into that group (built from the config's default for it)."""
    names = flat_field_names(cls)
    groups = option_groups(cls)
    out: dict[str, Any] = {}
    per_group: dict[str, dict[str, Any]] = {}
    for key, value in kwargs.items():
        group, name = names.get(key, (None, key))
        if group is None:
            if key in groups and isinstance(value, dict):  # a nested mapping, as in a config file
                per_group.setdefault(key, {}).update(value)
            else:
                out[key] = value
        else:
            per_group.setdefault(group, {})[name] = value
    for group, values in per_group.items():
        base = out.get(group)
        if base is None:
            base = _group_default(cls, group)
        unknown = set(values) - {f.name for f in dataclasses.fields(groups[group])}
        if unknown:
            raise SaeforgeError(f"unknown option(s) {', '.join(sorted(unknown))} in {group}",
                                f"use {', '.join(f.name for f in dataclasses.fields(groups[group]))}")
        out[group] = dataclasses.replace(base, **values)
    return out


def flat_options(cls: type) -> type:
    """Class decorator (outside ``@dataclass``): flat keywords and attribute reads for a config with option groups."""
    flat_field_names(cls)  # checks the names are unique
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **_nest(cls, kwargs))

    def __getattr__(self, name: str) -> Any:
        # Only called when ordinary lookup fails: read a group's option as if it were the config's own.
        where = flat_field_names(cls).get(name) if not name.startswith("_") else None
        if where is None or where[0] is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(self.__dict__[where[0]], where[1])

    cls.__init__ = __init__
    cls.__getattr__ = __getattr__
    return cls


def flat_dict(cfg: Any) -> dict[str, Any]:
    """The config's options as one flat mapping (groups flattened, aliases left out), tuples as lists."""
    groups = option_groups(type(cfg))
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        items = ([(g.name, getattr(value, g.name)) for g in dataclasses.fields(value)] if f.name in groups
                 else [(f.name, value)])
        for name, v in items:
            out[name] = list(v) if isinstance(v, tuple) else v
    return out


def from_flat_dict(cls: type, data: dict[str, Any], *, tuple_fields: tuple[str, ...] = (),
                   what: str = "option") -> Any:
    """Build ``cls`` from a flat (or nested) mapping, refusing unknown keys with the list of known ones."""
    known = set(flat_field_names(cls)) | set(option_groups(cls))
    unknown = sorted(set(data) - known)
    if unknown:
        raise SaeforgeError(f"unknown {what}(s): {', '.join(unknown)}",
                            f"remove them; the options are: {', '.join(sorted(flat_field_names(cls)))}")
    kw = {k: (tuple(v) if k in tuple_fields and isinstance(v, list) else v) for k, v in data.items()}
    return cls(**kw)
