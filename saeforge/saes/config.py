"""The SAE config every architecture subclasses, with the rules the trainer reads from it, and its validation helpers.

An architecture declares here what the trainer must not guess: the field its generic ``--sparsity-coefficient``
sets, whether ``-k`` applies, and its default learning rate (:meth:`SAEConfig.default_lr`); the trainer turns its
options into a config with :meth:`SAEConfig.from_training_options` and never names an architecture.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from saeforge.errors import SaeforgeError

__all__ = ["B_DEC_INITS", "DTYPES", "SAEConfig", "option_fix", "torch_dtype"]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
B_DEC_INITS = ("geometric_median", "mean", "zeros")


def torch_dtype(name: str) -> torch.dtype:
    """``"float32"`` -> ``torch.float32`` (also accepts ``"torch.float32"``, as SAELens sometimes writes)."""
    key = name.removeprefix("torch.") if isinstance(name, str) else name
    if key not in DTYPES:
        raise SaeforgeError(f"unknown dtype {name!r}", f"use one of {', '.join(DTYPES)}")
    return DTYPES[key]


def _require(ok: bool, problem: str, fix: str) -> None:
    if not ok:
        raise SaeforgeError(problem, fix)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# `saeforge train` flags that set an SAE config field directly; every other field is set through --sae-options.
TRAIN_FLAGS = {"d_sae": "--d-sae", "k": "-k", "dead_after_tokens": "--dead-after-tokens"}


def option_fix(config: SAEConfig | type[SAEConfig] | None, name: str, example: Any, note: str = "") -> str:
    """The command line that sets SAE option ``name`` to ``example``: its ``saeforge train`` flag where it has one
    (the architecture's sparsity coefficient is ``--sparsity-coefficient``), else ``--sae-options '{JSON}'``."""
    flag = TRAIN_FLAGS.get(name)
    if config is not None and name == config.sparsity_coefficient_field:
        flag = "--sparsity-coefficient"
    command = f"{flag} {example}" if flag else "--sae-options '" + json.dumps({name: example}) + "'"
    return f"pass {command}" + (f" {note}" if note else "")


# --------------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SAEConfig:
    """Hyper-parameters shared by every architecture. Each architecture subclasses it and sets ``architecture``.

    Fields left ``None`` take the architecture's default in ``__post_init__`` (so the stored config, and
    ``to_dict``, always hold the resolved value).
    """

    d_in: int
    d_sae: int
    d_out: int | None = None
    dtype: str = "float32"
    # Subtract b_dec from the input before the encoder ("tied pre-encoder bias"). None -> architecture default;
    # always False for transcoders (b_dec lives in the output space).
    apply_b_dec_to_input: bool | None = None
    # What init_from_data sets b_dec to: "geometric_median" (Towards Monosemanticity, OpenAI TopK), "mean", or
    # "zeros" (keep the zero init). None -> architecture default.
    b_dec_init: str | None = None

    architecture: ClassVar[str] = ""

    # ---- rules the trainer reads; each architecture declares its own ----
    # The field that `saeforge train --sparsity-coefficient` sets (an L1 or L0 coefficient); None: there is none
    # (TopK-style SAEs fix the sparsity with k).
    sparsity_coefficient_field: ClassVar[str | None] = None
    # Whether `saeforge train -k` (active latents per token) sets this architecture's `k`.
    uses_k: ClassVar[bool] = False
    # Adam learning rate when --lr is not given (an architecture may scale it with d_sae: see default_lr).
    default_learning_rate: ClassVar[float] = 1e-4
    # The site bindings (saeforge.runs.SiteBinding.kind) this architecture trains: an ordinary SAE reads and writes
    # one site, and (as before transcoders had architectures of their own) may be given a target site; a transcoder,
    # cross-layer transcoder or crosscoder architecture names its own kind. See for_binding.
    binding_kinds: ClassVar[tuple[str, ...]] = ("sae", "transcoder")
    # A transcoder architecture names the ordinary architecture whose code it shares ("topk" for topk_transcoder):
    # asked to train that one with a target site, the trainer trains the transcoder (for_binding).
    plain_architecture: ClassVar[str | None] = None
    # Runs of fewer steps than this get the default rate times sqrt(short_run_steps / steps) (0: no such rule).
    # Adam moves a weight by about lr per step, so a run of a few dozen steps at the rate tuned for hundreds ends
    # short of where it could be (docs/architecture.md, "Learning rate").
    short_run_steps: ClassVar[int] = 0

    @classmethod
    def default_lr(cls, d_sae: int) -> float:
        """Learning rate for an SAE of ``d_sae`` latents when none is given."""
        return cls.default_learning_rate

    def learning_rate(self) -> float:
        """The default learning rate of this SAE (``default_lr`` at its size; an architecture made of several
        dictionaries, such as a cross-layer transcoder, applies the rule to one of them)."""
        return type(self).default_lr(self.d_sae)

    def learning_rate_for_run(self, total_steps: int) -> float:
        """The learning rate a run of ``total_steps`` steps gets when none is given: :meth:`learning_rate`, raised
        for runs shorter than ``short_run_steps``."""
        lr = self.learning_rate()
        if 0 < total_steps < self.short_run_steps:
            lr *= math.sqrt(self.short_run_steps / total_steps)
        return lr

    @classmethod
    def label_site_for(cls, options: dict[str, Any]) -> str | None:
        """The activation-cache site holding per-token labels this architecture trains on, given its
        ``--sae-options`` (the trainer passes that site's rows as ``TrainState.labels``); None: it needs none."""
        return None

    @classmethod
    def for_binding(cls, kind: str) -> type[SAEConfig]:
        """The config class that trains a dictionary of binding ``kind`` when this architecture is asked for: this
        one when it trains that kind, except that an ordinary SAE given a target site is trained as its transcoder
        architecture where there is one (``topk`` -> ``topk_transcoder``); an error naming the architectures that
        do train the kind otherwise."""
        from saeforge.saes.registry import get_config_class, known_architectures

        if kind == "transcoder" and "sae" in cls.binding_kinds:
            for name in known_architectures():
                if get_config_class(name).plain_architecture == cls.architecture:
                    return get_config_class(name)
        if kind in cls.binding_kinds:
            return cls
        able = [a for a in known_architectures() if kind in get_config_class(a).binding_kinds]
        what = {"sae": "read and write one site", "transcoder": "read one site and write another",
                "clt": "read one site per layer and write the MLP outputs of that layer and later ones",
                "crosscoder": "read (and write) several sites"}.get(kind, kind)
        fix = f"pass --architecture with one of: {', '.join(able)}"
        if kind in ("sae", "crosscoder") and {"transcoder", "clt"} & set(cls.binding_kinds):
            fix = "give the sites it writes (--target-sites, e.g. layers.5.mlp_out), or " + fix[0].lower() + fix[1:]
        raise SaeforgeError(f"architecture {cls.architecture!r} trains {', '.join(cls.binding_kinds)} dictionaries, "
                            f"but this one is a {kind} (it would {what})", fix)

    @classmethod
    def trains_several_sites(cls) -> bool:
        """Whether one dictionary of this architecture reads several sites (so the trainer gives it every site of a
        layer list instead of training one per site)."""
        return bool({"clt", "crosscoder"} & set(cls.binding_kinds))

    @classmethod
    def binding_options(cls, read_widths: tuple[int, ...], write_widths: tuple[int, ...]) -> dict[str, Any]:
        """Config fields that follow from the widths of the sites read and written (one entry per site); an
        architecture over several sites sets its layer count here. Ordinary SAEs read one site and write one."""
        if len(read_widths) > 1 or len(write_widths) > 1:
            raise SaeforgeError(f"architecture {cls.architecture!r} reads one site and writes one, but this "
                                f"dictionary reads {len(read_widths)} and writes {len(write_widths)}",
                                "pass a cross-layer transcoder or crosscoder --architecture (e.g. topk_clt, "
                                "topk_crosscoder), or one site per SAE")
        return {}

    @classmethod
    def from_training_options(cls, *, d_in: int, d_sae: int, d_out: int | None = None, k: int,
                              sparsity_coefficient: float, dead_after_tokens: int,
                              options: dict[str, Any] | None = None, read_widths: tuple[int, ...] = (),
                              write_widths: tuple[int, ...] = ()) -> SAEConfig:
        """The config the trainer's generic options describe. ``d_out`` given: a transcoder (``b_dec`` lives in the
        output space, so it is never subtracted from the input). ``sparsity_coefficient`` < 0: the default.
        ``read_widths``/``write_widths``: the width of each site read/written (several for a multi-site dictionary,
        whose ``d_in``/``d_out`` are their sums; see :meth:`binding_options`). ``options`` (``--sae-options``) win
        over everything else."""
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        kw: dict[str, Any] = {"d_in": d_in, "d_sae": d_sae, **cls.binding_options(tuple(read_widths),
                                                                                  tuple(write_widths))}
        if d_out is not None:
            kw.update(d_out=d_out, apply_b_dec_to_input=False)
        if cls.uses_k:
            kw["k"] = k
        if sparsity_coefficient >= 0:
            if cls.sparsity_coefficient_field is None:
                raise SaeforgeError(f"architecture {cls.architecture!r} has no sparsity coefficient",
                                    "leave --sparsity-coefficient out for it (TopK-style SAEs fix L0 with -k)")
            kw[cls.sparsity_coefficient_field] = sparsity_coefficient
        if "dead_after_tokens" in names:  # the architecture uses the trainer's dead-latent horizon itself
            kw["dead_after_tokens"] = dead_after_tokens
        return cls.from_dict({**kw, **(options or {})})

    # ---- defaults each architecture may override ----
    def _default_apply_b_dec_to_input(self) -> bool:
        return True

    def _default_b_dec_init(self) -> str:
        return "geometric_median"

    # ---- validation ----
    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)  # frozen dataclass: only __post_init__ resolves defaults

    def __post_init__(self) -> None:
        name = self.architecture or type(self).__name__
        for f in ("d_in", "d_sae"):
            v = getattr(self, f)
            _require(_is_int(v) and v > 0, f"{name}: {f} must be a positive integer, got {v!r}",
                     option_fix(self, f, 4096) if f == "d_sae" else "check the activations: they must be [N, d]")
        if self.d_out is not None:
            _require(_is_int(self.d_out) and self.d_out > 0,
                     f"{name}: d_out must be a positive integer or None, got {self.d_out!r}",
                     "leave d_out unset for an ordinary SAE; a transcoder takes its width from its target site")
        if isinstance(self.dtype, str) and self.dtype.startswith("torch."):
            self._set("dtype", self.dtype.removeprefix("torch."))
        _require(self.dtype in DTYPES, f"{name}: unknown dtype {self.dtype!r}",
                 option_fix(self, "dtype", "float32", f"(one of {', '.join(DTYPES)})"))
        if self.apply_b_dec_to_input is None:
            self._set("apply_b_dec_to_input", self._default_apply_b_dec_to_input() and not self.is_transcoder)
        _require(isinstance(self.apply_b_dec_to_input, bool),
                 f"{name}: apply_b_dec_to_input must be true or false, got {self.apply_b_dec_to_input!r}",
                 option_fix(self, "apply_b_dec_to_input", True, "(or false; leave it out for the default)"))
        _require(not (self.apply_b_dec_to_input and self.is_transcoder),
                 f"{name}: apply_b_dec_to_input must be false for a transcoder (b_dec lives in the output space; "
                 f"d_in={self.d_in}, d_out={self.d_out})",
                 option_fix(self, "apply_b_dec_to_input", False, "for a transcoder (b_dec lives in the output space)"))
        if self.b_dec_init is None:
            self._set("b_dec_init", self._default_b_dec_init())
        _require(self.b_dec_init in B_DEC_INITS, f"{name}: unknown b_dec_init {self.b_dec_init!r}",
                 option_fix(self, "b_dec_init", "mean", f"(one of {', '.join(B_DEC_INITS)})"))

    # ---- derived ----
    @property
    def d_output(self) -> int:
        """Width of the reconstruction: ``d_out`` for a transcoder, else ``d_in``."""
        return self.d_in if self.d_out is None else self.d_out

    @property
    def is_transcoder(self) -> bool:
        return self.d_out is not None and self.d_out != self.d_in

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    # ---- (de)serialisation ----
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: every field (resolved) plus ``"architecture"``; tuples become lists."""
        out: dict[str, Any] = {"architecture": self.architecture}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAEConfig:
        """Inverse of :meth:`to_dict`. Called on ``SAEConfig`` itself it dispatches on ``d["architecture"]``."""
        if not isinstance(d, dict):
            raise SaeforgeError(f"an SAE config must be a dict, got {type(d).__name__}",
                                "pass the dict that SAEConfig.to_dict() produced")
        d = dict(d)
        arch = d.pop("architecture", None)
        target = cls
        if not cls.architecture:
            if arch is None:
                raise SaeforgeError("the SAE config has no 'architecture' field",
                                    "add \"architecture\": one of the names saeforge.saes.known_architectures() lists")
            from saeforge.saes.registry import get_config_class

            target = get_config_class(arch)
        elif arch is not None and arch != cls.architecture:
            raise SaeforgeError(f"config says architecture {arch!r} but {cls.__name__} is {cls.architecture!r}",
                                f"load it with SAEConfig.from_dict (dispatches on the name) or fix the name")
        names = {f.name for f in dataclasses.fields(target) if f.init}
        unknown = sorted(set(d) - names)
        if unknown:
            raise SaeforgeError(f"unknown field(s) for a {target.architecture!r} SAE config: {', '.join(unknown)}",
                                f"remove them from --sae-options; known fields: {', '.join(sorted(names))}")
        hints = typing.get_type_hints(target)
        kwargs = {k: (tuple(v) if isinstance(v, list) and _is_tuple_type(hints.get(k)) else v) for k, v in d.items()}
        try:
            return target(**kwargs)
        except TypeError as err:  # a missing required field (e.g. k)
            raise SaeforgeError(f"invalid {target.architecture!r} SAE config: {err}",
                                "give every required field (`saeforge train` sets them from its options)") from err


def _is_tuple_type(tp: Any) -> bool:
    if tp is None:
        return False
    if typing.get_origin(tp) is tuple or tp is tuple:
        return True
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_is_tuple_type(a) for a in typing.get_args(tp))
    return False


