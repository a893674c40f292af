"""The base class every SAE architecture shares, its config, and the training-step data types.

Conventions (the same as SAELens v6, so saving needs no transposes):

- ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_out]``, ``b_dec [d_out]``; row-vector
  convention ``x @ W_enc``. ``d_out`` differs from ``d_in`` only for transcoders (input at one site, output at
  another); then ``b_dec`` lives in the output space and is never subtracted from the input.
- Inputs are ``[N, d_in]`` (``encode``/``decode``/``forward`` also accept extra leading dimensions).
- The squared error is summed over the feature dimension and averaged over the batch (``||x - x_hat||^2``, the
  papers' notation), in every architecture, so the "mse" term is comparable across them.
- ``TrainOutput.terms`` holds the *weighted* loss contributions; ``loss == sum(terms.values())``.

How the trainer drives an SAE (see :class:`SAE`)::

    sae.init_from_data(x_sample)
    for step, x in enumerate(batches):
        out = sae.training_loss(x, state=TrainState(step=step, sparsity_scale=warmup(step), dead_mask=dead))
        out.loss.backward()
        sae.before_optimizer_step()      # e.g. project out the gradient parallel to unit-norm decoder rows
        optimizer.step()
        sae.after_optimizer_step()       # e.g. renormalise decoder rows
        optimizer.zero_grad()
        dead = tracker.update(out.fired, n_tokens=len(x))
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from saeforge.errors import SaeforgeError

__all__ = [
    "B_DEC_INITS",
    "DTYPES",
    "DeadLatentTracker",
    "SAE",
    "SAEConfig",
    "TrainOutput",
    "TrainState",
    "geometric_median",
    "torch_dtype",
]

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
                     f"set {f} to the size you want, e.g. {f}=768")
        if self.d_out is not None:
            _require(_is_int(self.d_out) and self.d_out > 0,
                     f"{name}: d_out must be a positive integer or None, got {self.d_out!r}",
                     "leave d_out unset for an ordinary SAE; set it to the output width for a transcoder")
        if isinstance(self.dtype, str) and self.dtype.startswith("torch."):
            self._set("dtype", self.dtype.removeprefix("torch."))
        _require(self.dtype in DTYPES, f"{name}: unknown dtype {self.dtype!r}", f"use one of {', '.join(DTYPES)}")
        if self.apply_b_dec_to_input is None:
            self._set("apply_b_dec_to_input", self._default_apply_b_dec_to_input() and not self.is_transcoder)
        _require(isinstance(self.apply_b_dec_to_input, bool),
                 f"{name}: apply_b_dec_to_input must be true or false, got {self.apply_b_dec_to_input!r}",
                 "set apply_b_dec_to_input=True or False (or leave it unset for the architecture default)")
        _require(not (self.apply_b_dec_to_input and self.is_transcoder),
                 f"{name}: apply_b_dec_to_input=True needs d_out == d_in, but d_in={self.d_in}, d_out={self.d_out}",
                 "set apply_b_dec_to_input=False for a transcoder (b_dec lives in the output space)")
        if self.b_dec_init is None:
            self._set("b_dec_init", self._default_b_dec_init())
        _require(self.b_dec_init in B_DEC_INITS, f"{name}: unknown b_dec_init {self.b_dec_init!r}",
                 f"use one of {', '.join(B_DEC_INITS)}")

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
                                f"remove them; known fields: {', '.join(sorted(names))}")
        hints = typing.get_type_hints(target)
        kwargs = {k: (tuple(v) if isinstance(v, list) and _is_tuple_type(hints.get(k)) else v) for k, v in d.items()}
        try:
            return target(**kwargs)
        except TypeError as err:  # a missing required field (e.g. k)
            raise SaeforgeError(f"invalid {target.architecture!r} SAE config: {err}",
                                "give every required field (see the config class)") from err


def _is_tuple_type(tp: Any) -> bool:
    if tp is None:
        return False
    if typing.get_origin(tp) is tuple or tp is tuple:
        return True
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_is_tuple_type(a) for a in typing.get_args(tp))
    return False


# --------------------------------------------------------------------------------------------------------------
# Training-step types
# --------------------------------------------------------------------------------------------------------------


@dataclass
class TrainState:
    """What the trainer tells the SAE about the current step."""

    step: int = 0
    # Sparsity-coefficient warm-up factor in [0, 1]; multiplies l1 / l0 penalties (TopK-family ignores it).
    sparsity_scale: float = 1.0
    # bool [d_sae]: latents the trainer considers dead (AuxK targets, resampling candidates). None = unknown.
    dead_mask: Tensor | None = None


@dataclass
class TrainOutput:
    loss: Tensor
    # Weighted loss contributions by name ("mse", "l1", "auxk", ...); loss == sum(terms.values()).
    terms: dict[str, Tensor]
    x_hat: Tensor
    # bool [d_sae]: latents with a positive activation somewhere in this batch.
    fired: Tensor
    # Mean number of positive latents per token in this batch.
    l0: float


class DeadLatentTracker:
    """Counts, per latent, the tokens seen since it last fired; ``dead`` = not fired for ``threshold`` tokens.

    (A helper for trainers and tests; the counts live in a tensor so a trainer can checkpoint them.)
    """

    def __init__(self, d_sae: int, threshold_tokens: int, device: torch.device | str = "cpu"):
        self.threshold_tokens = int(threshold_tokens)
        self.tokens_since_fired = torch.zeros(d_sae, dtype=torch.long, device=device)

    def update(self, fired: Tensor, n_tokens: int) -> Tensor:
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired[fired.to(self.tokens_since_fired.device)] = 0
        return self.dead_mask

    @property
    def dead_mask(self) -> Tensor:
        return self.tokens_since_fired >= self.threshold_tokens


# --------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def geometric_median(points: Tensor, *, iterations: int = 20, eps: float = 1e-8, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances to ``points`` [N, d].

    Starts from the mean; each iteration is the distance-weighted mean with weights 1/max(dist, eps) (the
    clamp avoids division by zero when the estimate lands on a data point). Computed in float64 for stability.
    """
    pts = points.detach().reshape(-1, points.shape[-1]).to(torch.float64)
    if pts.shape[0] == 0:
        raise SaeforgeError("geometric_median got an empty sample", "pass at least one activation vector")
    median = pts.mean(0)
    for _ in range(iterations):
        dist = (pts - median).norm(dim=1).clamp_min(eps)
        w = 1.0 / dist
        new = (w[:, None] * pts).sum(0) / w.sum()
        shift = (new - median).norm()
        median = new
        if shift <= tol * (median.norm() + eps):
            break
    return median.to(points.dtype)


def _flatten(x: Tensor, width: int, what: str) -> tuple[Tensor, tuple[int, ...]]:
    if x.shape[-1] != width:
        raise SaeforgeError(f"{what} has last dimension {x.shape[-1]}, expected {width}",
                            "check that the activations come from the site this SAE was trained on")
    lead = tuple(x.shape[:-1])
    return x.reshape(-1, width), lead


# --------------------------------------------------------------------------------------------------------------
# SAE
# --------------------------------------------------------------------------------------------------------------


class SAE(nn.Module):
    """Base class: parameters, decode, folding, unit-norm decoder handling, b_dec initialisation.

    Subclasses set ``config_class`` and implement ``encode`` and ``training_loss``; they may override
    ``_init_weights`` (defaults below), ``_scale_latents`` (when they own extra per-latent tensors) and the
    ``unit_norm_decoder`` property.
    """

    config_class: ClassVar[type[SAEConfig]] = SAEConfig
    # False for architectures without a plain encoder bias (Gated has b_gate / b_mag instead).
    has_b_enc: ClassVar[bool] = True

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        if not isinstance(cfg, self.config_class):
            raise SaeforgeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(cfg).__name__}",
                                "build the SAE with saeforge.saes.make_sae(cfg), which picks the class for you")
        self.cfg = cfg
        dt = cfg.torch_dtype
        self.W_enc = nn.Parameter(torch.empty(cfg.d_in, cfg.d_sae, dtype=dt))
        if self.has_b_enc:
            self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dt))
        self.W_dec = nn.Parameter(torch.empty(cfg.d_sae, cfg.d_output, dtype=dt))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_output, dtype=dt))
        self._init_weights()

    # ---- properties ----
    @property
    def architecture(self) -> str:
        return self.cfg.architecture

    @property
    def unit_norm_decoder(self) -> bool:
        """Whether training keeps decoder rows at unit norm (gradient projection + renormalisation)."""
        return True

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    # ---- init ----
    @torch.no_grad()
    def _init_weights(self, decoder_norm: float = 1.0) -> None:
        """Random decoder directions with norm ``decoder_norm``; encoder tied to the decoder (W_enc = W_dec^T).

        Tied init as in OpenAI TopK, Gated, Gemma Scope and the April update. A transcoder cannot be tied (the
        two sides have different widths), so its encoder gets independent random unit-norm columns scaled the
        same way.
        """
        cfg = self.cfg
        w_dec = torch.randn(cfg.d_sae, cfg.d_output, dtype=torch.float32)
        w_dec = w_dec / w_dec.norm(dim=1, keepdim=True) * decoder_norm
        self.W_dec.copy_(w_dec)
        if cfg.is_transcoder:
            w_enc = torch.randn(cfg.d_in, cfg.d_sae, dtype=torch.float32)
            self.W_enc.copy_(w_enc / w_enc.norm(dim=0, keepdim=True) * decoder_norm)
        else:
            self.W_enc.copy_(w_dec.T)
        self.b_dec.zero_()
        if self.has_b_enc:
            self.b_enc.zero_()

    @torch.no_grad()
    def init_from_data(self, x_sample: Tensor, target_sample: Tensor | None = None) -> None:
        """Data-dependent initialisation: ``b_dec`` from the sample (geometric median, mean, or left at zero).

        ``b_dec`` is an output-space bias, so for a transcoder it is computed from ``target_sample`` (the
        activations at the output site); without one a transcoder keeps ``b_dec`` at zero.
        """
        how = self.cfg.b_dec_init
        if how == "zeros":
            return
        sample = target_sample if target_sample is not None else (None if self.cfg.is_transcoder else x_sample)
        if sample is None:
            return
        sample, _ = _flatten(sample.to(self.device), self.cfg.d_output, "the init sample")
        center = geometric_median(sample) if how == "geometric_median" else sample.to(torch.float64).mean(0)
        self.b_dec.copy_(center.to(self.dtype))

    # ---- forward ----
    def _encoder_input(self, x: Tensor) -> Tensor:
        x = x.to(self.dtype)
        return x - self.b_dec if self.cfg.apply_b_dec_to_input else x

    def encode(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode(self, f: Tensor) -> Tensor:
        f2, lead = _flatten(f, self.cfg.d_sae, "the latent tensor")
        out = f2.to(self.dtype) @ self.W_dec + self.b_dec
        return out.reshape(*lead, self.cfg.d_output)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    def training_loss(self, x: Tensor, target: Tensor | None = None, *, state: TrainState) -> TrainOutput:
        raise NotImplementedError  # pragma: no cover - abstract

    # ---- shared pieces of training_loss ----
    def _check_batch(self, x: Tensor, target: Tensor | None) -> tuple[Tensor, Tensor]:
        if x.dim() != 2 or x.shape[1] != self.cfg.d_in:
            raise SaeforgeError(f"training batch must be [N, {self.cfg.d_in}], got {tuple(x.shape)}",
                                "flatten the token dimensions into one batch dimension first")
        x = x.to(self.dtype)
        if target is None:
            if self.cfg.is_transcoder:
                raise SaeforgeError("a transcoder needs a target batch (activations at the output site)",
                                    "call training_loss(x, target, state=...)")
            return x, x
        if target.shape != (x.shape[0], self.cfg.d_output):
            raise SaeforgeError(f"target must be [{x.shape[0]}, {self.cfg.d_output}], got {tuple(target.shape)}",
                                "pass the output-site activations of the same tokens")
        return x, target.to(self.dtype)

    @staticmethod
    def _squared_error(x_hat: Tensor, target: Tensor) -> Tensor:
        """Mean over the batch of the squared L2 error summed over features."""
        return (x_hat - target).pow(2).sum(-1).mean()

    @staticmethod
    def _sparsity_stats(acts_positive: Tensor) -> tuple[Tensor, float]:
        """From a bool [N, d_sae] 'is active' mask: (fired [d_sae], mean L0)."""
        return acts_positive.any(0), float(acts_positive.sum(1).float().mean())

    # ---- optimiser hooks ----
    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """With a unit-norm decoder: remove the gradient component parallel to each decoder row.

        Together with the renormalisation in ``after_optimizer_step`` this keeps the rows on the unit sphere
        and stops the optimiser from spending its step on a norm change that would be undone (ConstrainedAdam).
        """
        if not self.unit_norm_decoder or self.W_dec.grad is None:
            return
        w = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        g = self.W_dec.grad
        g -= (g * w).sum(1, keepdim=True) * w

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        if self.unit_norm_decoder:
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    # ---- folding ----
    @torch.no_grad()
    def _scale_latents(self, factor: Tensor) -> None:
        """Rescale the encoder so every latent's activation is multiplied by ``factor`` [d_sae] (> 0).

        Subclasses extend this with their own per-latent tensors (thresholds, gate biases).
        """
        self.W_enc.mul_(factor.to(self.dtype)[None, :])
        if self.has_b_enc:
            self.b_enc.mul_(factor.to(self.dtype))

    @torch.no_grad()
    def fold_decoder_norms(self) -> None:
        """Make every decoder row unit norm without changing the function: f_i *= ||d_i||, d_i /= ||d_i||."""
        norms = self.W_dec.norm(dim=1)
        if bool((norms == 0).any()):
            raise SaeforgeError("cannot fold decoder norms: some decoder rows are exactly zero",
                                "remove or re-initialise those latents first")
        self.W_dec.div_(norms[:, None])
        self._scale_latents(norms)

    @torch.no_grad()
    def fold_input_scale(self, scale_in: float, scale_out: float | None = None) -> None:
        """Fold a constant input/output scaling into the weights.

        The SAE was trained on ``x * scale_in`` with targets ``target * scale_out`` (``scale_out`` defaults to
        ``scale_in``; it differs only for transcoders). Afterwards it takes raw ``x`` and returns raw-scale
        outputs: ``folded(x) == trained(x * scale_in) / scale_out``.

        Choice: the decoder keeps its rows (unit norm stays unit norm) and the latents are divided by
        ``scale_out``, i.e. they come out in raw units: W_enc *= scale_in/scale_out, encoder biases and
        thresholds /= scale_out, b_dec /= scale_out. (dictionary_learning's ``scale_biases`` does the same.)
        """
        s_in = float(scale_in)
        s_out = s_in if scale_out is None else float(scale_out)
        _require(_is_number(s_in) and s_in > 0 and _is_number(s_out) and s_out > 0,
                 f"input/output scales must be positive finite numbers, got {scale_in!r}, {scale_out!r}",
                 "pass the scale estimated by saeforge.saes.normalization.estimate_scale")
        _require(not self.cfg.apply_b_dec_to_input or s_in == s_out,
                 "with apply_b_dec_to_input the input and output scales must be equal "
                 f"(b_dec is both), got {s_in} and {s_out}", "pass a single scale")
        self.W_enc.mul_(s_in)
        self._scale_latents(torch.full((self.cfg.d_sae,), 1.0 / s_out, dtype=torch.float64, device=self.device))
        self.b_dec.div_(s_out)

    # ---- saving ----
    def saelens_architecture(self) -> str:
        """The ``architecture`` name SAELens v6 loads this SAE as."""
        raise NotImplementedError  # pragma: no cover - abstract

    def saelens_config_extras(self) -> dict[str, Any]:
        """Architecture-specific top-level cfg.json fields for SAELens (e.g. ``k``)."""
        return {}

    def export_warnings(self) -> list[str]:
        """Things to tell the user when this SAE is saved in the SAELens layout (e.g. a lossy view)."""
        return []

    def saelens_tensors(self) -> dict[str, Tensor]:
        """Inference weights under SAELens v6 names (exactly the keys SAELens' model expects)."""
        out = {"W_enc": self.W_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
        if self.has_b_enc:
            out["b_enc"] = self.b_enc
        return {k: v.detach() for k, v in out.items()}

    def extra_tensors(self) -> dict[str, Tensor]:
        """Everything in ``state_dict()`` that ``saelens_tensors`` does not carry bit-exactly (e.g. a learned
        log-threshold, training buffers). Saved beside the SAELens weights so a saeforge load is exact."""
        saelens = self.saelens_tensors()
        return {k: v.detach() for k, v in self.state_dict().items()
                if k not in saelens or saelens[k].shape != v.shape}

    def extra_repr(self) -> str:
        c = self.cfg
        out = f"architecture={c.architecture!r}, d_in={c.d_in}, d_sae={c.d_sae}"
        return out + (f", d_out={c.d_out}" if c.is_transcoder else "")

