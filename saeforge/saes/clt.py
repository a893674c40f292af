"""Cross-layer transcoders (CLTs): one dictionary replacing the MLPs of layers l0..l1 together (Ameisen, Lindsey et
al., "Circuit Tracing", transformer-circuits.pub 2025; Lindsey et al., crosscoders, 2024).

Layer i (of the CLT's L layers) has its own encoder, reading that layer's MLP input, and F features; a feature of
layer i writes to the MLP outputs of layer i and of every later layer of the CLT:

    f_i  = code(x_i W_enc[i] + b_enc[i])                                   x_i = layers.(l0+i).mlp_in, f_i [F]
    ŷ_j  = Σ_{i <= j} f_i W_dec[i][:, j - i] + b_dec[j]  (+ x_j W_skip[j]ᵀ)   ŷ_j predicts layers.(l0+j).mlp_out
    L    = Σ_j ||y_j - ŷ_j||² + the code's own terms

trained from one pass over the data: the trainer reads all 2L sites of each batch in one forward of the model.
Codes: ``topk_clt`` (TopK per layer, k latents per token and layer, AuxK on the whole residual; through the sparse
kernels), ``batchtopk_clt`` (BatchTopK per layer, one learnt inference threshold per layer) and ``jumprelu_clt``
(JumpReLU with the straight-through L0 penalty of :mod:`saeforge.saes.jumprelu`, over every layer's features;
dense). Every feature's decoder, all its output layers concatenated, is kept at unit norm (as the single-layer
architectures keep theirs), so the code's sparsity compares features across layers fairly.

As a dictionary (``encode``/``decode``/``forward``, the trainer, save and load) a CLT reads the concatenation of its
L input sites ([N, L·d_in_layer]), has ``d_sae = L·F`` latents (layer i's are ``i·F .. (i+1)·F - 1``) and writes
the concatenation of its L output sites. :meth:`CrossLayerTranscoder.encode_layer` and
:meth:`~CrossLayerTranscoder.decode_layer` run it one layer at a time, in forward order, as the replacement model
(:mod:`saeforge.evals.replacement`) does. Parameters: ``W_enc`` [L, d_in_layer, F], ``b_enc`` [L, F], ``W_dec.i``
[F, L - i, d_out_layer] (circuit-tracer's layout), ``b_dec`` [L, d_out_layer], optionally ``W_skip`` [L,
d_out_layer, d_in_layer].

Memory: the decoders hold F·d·L(L+1)/2 weights (each layer's features write to all later layers), so a CLT over
all 30 layers of SmolLM2-135M with F = 4608 has 1.2 G decoder weights; :func:`clt_memory` gives the bytes a
training run needs (docs/coders.md has the table).

Saving: saeforge's native folder (``save_sae``); SAELens has no CLT, so only saeforge loads it, and
:mod:`saeforge.formats` writes Gemma Scope 2 and circuit-tracer CLT files.
"""

from __future__ import annotations

import math
from dataclasses import KW_ONLY, dataclass
from typing import Any, ClassVar, Sequence

import torch
from torch import Tensor, nn

from saeforge.errors import SaeforgeError
from saeforge.kernels import decode_sparse_blocks, encode_topk
from saeforge.saes.base import DTYPES, SAE, SAEConfig, TrainOutput, TrainState, _flatten, _is_int, _require
from saeforge.saes.batchtopk import BatchTopKConfig, update_threshold
from saeforge.saes.clt_kernels import StepBuffers, cat_into_buffer, decode_into_layers, layer_views
from saeforge.saes.geometric_median import geometric_median
from saeforge.saes.jumprelu import JumpReLUConfig, JumpReLUFunction, StepFunction
from saeforge.saes.normalization import site_scales
from saeforge.saes.registry import register_sae
from saeforge.saes.topk import TopKConfig, _dense_topk, auxk_loss

__all__ = ["BatchTopKCLT", "BatchTopKCLTConfig", "CrossLayerTranscoder", "JumpReLUCLT", "JumpReLUCLTConfig",
           "TopKCLT", "TopKCLTConfig", "clt_memory"]


def split_widths(kind: str, read_widths: tuple[int, ...], write_widths: tuple[int, ...]) -> int:
    """The layer count of a multi-site dictionary from its sites' widths (one width for all reads, one for all
    writes), or an error naming the widths."""
    if not read_widths:
        return 1
    if len(set(read_widths)) > 1 or len(set(write_widths)) > 1:
        raise SaeforgeError(f"a {kind} needs sites of one width, got widths {list(read_widths)} read and "
                            f"{list(write_widths)} written", "use the same site kind at every layer")
    return len(read_widths)


class CLTConfigMixin:
    """Rules and derived widths every CLT config shares (the fields ``n_layers``/``skip_connection`` are declared on
    each config)."""

    # one layer of a CLT reads one site and writes one: a transcoder binding
    binding_kinds: ClassVar[tuple[str, ...]] = ("clt", "transcoder")
    code: ClassVar[str] = ""

    @classmethod
    def binding_options(cls, read_widths: tuple[int, ...], write_widths: tuple[int, ...]) -> dict[str, Any]:
        if read_widths and len(read_widths) != len(write_widths):
            raise SaeforgeError(f"a cross-layer transcoder reads one site per layer and writes one per layer, but "
                                f"this one reads {len(read_widths)} and writes {len(write_widths)}",
                                "give as many target sites as sites, e.g. --sites layers.0-3.mlp_in "
                                "--target-sites layers.0-3.mlp_out")
        return {"n_layers": split_widths("cross-layer transcoder", read_widths, write_widths)}

    def learning_rate(self) -> float:
        # each layer's encoder is a dictionary of F latents: the rule of the code at F
        return type(self).default_lr(self.features_per_layer)

    def _default_apply_b_dec_to_input(self) -> bool:
        return False

    def __post_init__(self) -> None:
        a = self.architecture
        if self.d_out is None:
            object.__setattr__(self, "d_out", self.d_in)
        L = self.n_layers
        _require(_is_int(L) and L > 0, f"{a}: n_layers must be a positive integer, got {L!r}",
                 "train it on one site per layer (--sites layers.0-3.mlp_in --target-sites layers.0-3.mlp_out)")
        for name in ("d_in", "d_sae", "d_out"):
            v = getattr(self, name)
            _require(_is_int(v) and v > 0 and v % L == 0, f"{a}: {name}={v!r} is not a multiple of n_layers={L}",
                     "let the trainer set the widths from the sites" if name != "d_sae" else
                     f"pass --d-sae with a multiple of {L} (the CLT has d_sae / {L} features per layer)")
        if getattr(self, "aux_k", 0) is None:  # AuxK per layer: half a layer's output width (TopK's rule)
            object.__setattr__(self, "aux_k", max(1, min(self.d_out // L // 2, self.d_sae // L)))
        super().__post_init__()
        _require(isinstance(self.skip_connection, bool), f"{a}: skip_connection must be true or false",
                 """pass --sae-options '{"skip_connection": true}' (or false)""")
        if hasattr(self, "k"):
            _require(self.k <= self.features_per_layer, f"{a}: k={self.k} is more than the "
                     f"{self.features_per_layer} features of a layer", "pass a smaller -k or a larger --d-sae")
            _require(self.aux_k <= self.features_per_layer, f"{a}: aux_k={self.aux_k} is more than the "
                     f"{self.features_per_layer} features of a layer",
                     """pass --sae-options '{"aux_k": 64}' (latents per layer in the AuxK reconstruction)""")

    @property
    def is_transcoder(self) -> bool:
        return True

    @property
    def features_per_layer(self) -> int:
        return self.d_sae // self.n_layers

    @property
    def d_layer_in(self) -> int:
        return self.d_in // self.n_layers

    @property
    def d_layer_out(self) -> int:
        return self.d_output // self.n_layers


@dataclass(frozen=True)
class TopKCLTConfig(CLTConfigMixin, TopKConfig):
    architecture: ClassVar[str] = "topk_clt"
    code: ClassVar[str] = "topk"
    _: KW_ONLY
    # Layers of the CLT (the trainer sets it: one per site read).
    n_layers: int = 1
    # An affine skip connection per layer (x_i W_skip[i]ᵀ added to ŷ_i; Gemma Scope 2's "affine" CLTs have one).
    skip_connection: bool = False


@dataclass(frozen=True)
class BatchTopKCLTConfig(CLTConfigMixin, BatchTopKConfig):
    architecture: ClassVar[str] = "batchtopk_clt"
    code: ClassVar[str] = "batchtopk"
    _: KW_ONLY
    n_layers: int = 1
    skip_connection: bool = False


@dataclass(frozen=True)
class JumpReLUCLTConfig(CLTConfigMixin, JumpReLUConfig):
    architecture: ClassVar[str] = "jumprelu_clt"
    code: ClassVar[str] = "jumprelu"
    _: KW_ONLY
    n_layers: int = 1
    skip_connection: bool = False


def clt_memory(n_layers: int, d_in: int, d_out: int, features_per_layer: int, batch_size: int = 4096, k: int = 32,
               skip_connection: bool = False, bytes_per_value: int = 4) -> dict[str, int]:
    """Bytes a CLT needs (per-layer widths ``d_in``/``d_out``, ``features_per_layer`` = F): its weights, its
    training state (weights + gradients + Adam's two moments) and the largest per-step activations of the TopK
    code at ``batch_size`` tokens. Decoders grow as L(L+1)/2."""
    L, F, N = n_layers, features_per_layer, batch_size
    enc = L * d_in * F + L * F
    dec = F * d_out * L * (L + 1) // 2 + L * d_out
    skip = L * d_out * d_in if skip_connection else 0
    params = enc + dec + skip
    # inputs and targets (the batch, its per-layer copy, the prediction and its gradient), the encoder's dense
    # pre-activations of one layer at a time, the sparse latents (value, row, column) of every layer, and the
    # fast path's scratch copy of one [F, d_out] decoder block (saeforge.saes.clt_kernels)
    acts = (N * L * (2 * d_in + 3 * d_out) * bytes_per_value + N * F * bytes_per_value
            + N * k * L * (bytes_per_value + 16) + F * d_out * bytes_per_value)
    return {"parameters": params, "decoder_parameters": dec, "weights_bytes": params * bytes_per_value,
            "training_state_bytes": 4 * params * bytes_per_value, "step_activation_bytes": acts,
            "training_total_bytes": 4 * params * bytes_per_value + acts}


class CrossLayerTranscoder(SAE):
    """A CLT of one code (the registered subclasses); see the module docstring."""

    config_class: ClassVar[type[SAEConfig]] = SAEConfig
    code: ClassVar[str] = ""  # topk, batchtopk or jumprelu
    cfg: Any

    def __init__(self, cfg):
        nn.Module.__init__(self)
        if not isinstance(cfg, self.config_class):
            raise SaeforgeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(cfg).__name__}",
                                "build it with saeforge.saes.make_sae(cfg)")
        self.cfg = cfg
        self._step_buffers = StepBuffers()  # the fast training path's reused buffers (clt_kernels)
        L, F, di, do, dt = cfg.n_layers, cfg.features_per_layer, cfg.d_layer_in, cfg.d_layer_out, cfg.torch_dtype
        self.W_enc = nn.Parameter(torch.empty(L, di, F, dtype=dt))
        self.b_enc = nn.Parameter(torch.zeros(L, F, dtype=dt))
        self.W_dec = nn.ParameterList([nn.Parameter(torch.empty(F, L - i, do, dtype=dt)) for i in range(L)])
        self.b_dec = nn.Parameter(torch.zeros(L, do, dtype=dt))
        if cfg.skip_connection:
            self.W_skip = nn.Parameter(torch.zeros(L, do, di, dtype=dt))
        if self.code == "jumprelu":
            theta = math.log(cfg.threshold_init)
            self.log_threshold = nn.Parameter(torch.full((L, F), theta, dtype=dt))
        if self.code == "batchtopk":
            # float32 whatever the parameter dtype (an EMA with beta 0.999 stalls in bfloat16); -1: not learnt yet
            self.register_buffer("threshold", torch.full((L,), -1.0, dtype=torch.float32))
        self._init_weights()

    # ---- shapes ----
    @property
    def n_layers(self) -> int:
        return self.cfg.n_layers

    @property
    def features_per_layer(self) -> int:
        return self.cfg.features_per_layer

    def _decoder(self, i: int) -> Tensor:
        """Layer i's decoder as [F, (L - i) * d_out_layer] (its output layers side by side)."""
        return self.W_dec[i].reshape(self.features_per_layer, -1)

    def _per_layer(self, x: Tensor, width: int) -> Tensor:
        """[N, L*width] -> [L, N, width], contiguous per layer."""
        return x.reshape(x.shape[0], self.n_layers, width).transpose(0, 1).contiguous()

    # ---- init ----
    @torch.no_grad()
    def _init_weights(self, decoder_norm: float = 1.0) -> None:
        for i, w in enumerate(self.W_dec):
            d = torch.randn(w.shape[0], w.shape[1] * w.shape[2], dtype=torch.float32)
            w.copy_((d / d.norm(dim=1, keepdim=True) * decoder_norm).reshape(w.shape))
        e = torch.randn(self.W_enc.shape, dtype=torch.float32)
        self.W_enc.copy_(e / e.norm(dim=1, keepdim=True) * decoder_norm)
        self.b_enc.zero_()
        self.b_dec.zero_()

    @torch.no_grad()
    def init_from_data(self, x_sample: Tensor, target_sample: Tensor | None = None) -> None:
        if self.cfg.b_dec_init == "zeros" or target_sample is None:
            return
        y, _ = _flatten(target_sample.to(self.device), self.cfg.d_output, "the init sample")
        center = geometric_median(y) if self.cfg.b_dec_init == "geometric_median" else y.double().mean(0)
        self.b_dec.copy_(center.reshape(self.b_dec.shape).to(self.dtype))

    # ---- inference ----
    @property
    def thresholds(self) -> Tensor:
        """JumpReLU: θ [L, F]."""
        return torch.exp(self.log_threshold)

    def _pre(self, i: int, x_i: Tensor) -> Tensor:
        return x_i.to(self.dtype) @ self.W_enc[i] + self.b_enc[i]

    def encode_layer(self, i: int, x_i: Tensor) -> Tensor:
        """Layer i's latents [..., F] from its input [..., d_in_layer] alone (a CLT encodes each layer
        independently, so this equals the layer's slice of :meth:`encode`; BatchTopK before its threshold is
        learnt selects over the batch given)."""
        x2, lead = _flatten(x_i, self.cfg.d_layer_in, f"layer {i}'s input")
        pre = self._pre(i, x2)
        if self.code == "jumprelu":
            f = pre * (pre > self.thresholds[i]).to(pre.dtype)
        elif self.code == "batchtopk" and bool(self.threshold[i] >= 0):
            pre = torch.relu(pre)
            f = pre * (pre > self.threshold[i].to(pre.dtype))
        else:
            f = _dense_topk(pre, self.cfg.k, batch=self.code == "batchtopk")
        return f.reshape(*lead, self.features_per_layer)

    def encode(self, x: Tensor) -> Tensor:
        x2, lead = _flatten(x, self.cfg.d_in, "the input")
        xs = self._per_layer(x2, self.cfg.d_layer_in)
        f = torch.cat([self.encode_layer(i, xs[i]) for i in range(self.n_layers)], dim=1)
        return f.reshape(*lead, self.cfg.d_sae)

    def decode_layer(self, j: int, latents: Sequence[Tensor]) -> Tensor:
        """Layer j's output [..., d_out_layer] (without the skip term) from the latents of layers 0..j
        (``latents[i]`` [..., F]; later entries are ignored)."""
        out = None
        for i in range(j + 1):
            f2, lead = _flatten(latents[i], self.features_per_layer, f"layer {i}'s latents")
            part = f2.to(self.dtype) @ self.W_dec[i][:, j - i]
            out = part if out is None else out + part
        return (out + self.b_dec[j]).reshape(*lead, self.cfg.d_layer_out)

    def decode(self, f: Tensor) -> Tensor:
        f2, lead = _flatten(f, self.cfg.d_sae, "the latent tensor")
        F_, do = self.features_per_layer, self.cfg.d_layer_out
        out = self.b_dec.reshape(1, -1).to(self.dtype).repeat(f2.shape[0], 1)
        for i in range(self.n_layers):
            out[:, i * do:] += f2[:, i * F_:(i + 1) * F_].to(self.dtype) @ self._decoder(i)
        return out.reshape(*lead, self.cfg.d_output)

    def skip_layer(self, i: int, x_i: Tensor) -> Tensor:
        """Layer i's skip term x_i W_skip[i]ᵀ."""
        return x_i.to(self.dtype) @ self.W_skip[i].T

    def skip(self, x: Tensor) -> Tensor:
        x2, lead = _flatten(x, self.cfg.d_in, "the input")
        xs = self._per_layer(x2, self.cfg.d_layer_in)
        out = torch.cat([self.skip_layer(i, xs[i]) for i in range(self.n_layers)], dim=1)
        return out.reshape(*lead, self.cfg.d_output)

    def forward(self, x: Tensor) -> Tensor:
        out = self.decode(self.encode(x))
        return out + self.skip(x) if self.cfg.skip_connection else out

    @torch.no_grad()
    def decoder_cosines(self, start: int, stop: int) -> Tensor:
        """[stop - start, d_sae]: the cosine of latents ``start .. stop - 1``'s decoders with every latent's, each
        decoder taken over all the CLT's output layers (zero on the layers before its own), without building that
        [d_sae, L·d_out] matrix: output layer by output layer, over the latents that write it."""
        F_ = self.features_per_layer
        rows = torch.arange(start, stop, device=self.device)
        norms = torch.cat([w.detach().reshape(F_, -1).float().norm(dim=1) for w in self.W_dec]).clamp_min(1e-12)
        sims = torch.zeros(stop - start, self.cfg.d_sae, device=self.device)
        for j in range(self.n_layers):
            writers = (j + 1) * F_  # latents 0 .. writers - 1 (layers 0..j) write layer j, in latent order
            mine = rows < writers
            if bool(mine.any()):
                into_j = torch.cat([self.W_dec[i].detach()[:, j - i].float() for i in range(j + 1)])
                sims[mine, :writers] += into_j[rows[mine]] @ into_j.T
        return sims / (norms[rows][:, None] * norms[None, :])

    # ---- training ----
    def training_loss(self, x: Tensor, target: Tensor | None = None, *, state: TrainState) -> TrainOutput:
        # Per-layer views come from unbind rather than indexing (whose backward zero-fills a whole parameter per
        # layer); each source layer decodes into every output layer separately (one [F, d] block of its decoder at
        # a time, whose rows stay in cache, where the whole (L - i)·d-wide rows did not: the sparse decoder passes
        # of layer 0 of a 4-layer CLT took twice those of four transcoders), and the parts are summed per output
        # layer, so no gradient goes through in-place slice updates. On the fast kernels the stacked parameters'
        # gradients are written part by part into reused buffers (saeforge.saes.clt_kernels) instead of stacked
        # into fresh tensors, the strided decoder blocks are read through a reused scratch buffer and the prediction
        # is concatenated into a reused buffer; the reference kernels run the same step in plain autograd.
        x, target = self._check_batch(x, target)
        cfg, L, F_, do = self.cfg, self.n_layers, self.features_per_layer, self.cfg.d_layer_out
        fast = getattr(cfg, "kernel", "fast") == "fast"
        bufs = self._step_buffers

        def views(name: str) -> tuple[Tensor, ...]:
            p = getattr(self, name)
            return layer_views(p, bufs, name) if fast else p.unbind(0)

        def decode(lat, i: int) -> Sequence[Tensor]:
            if fast:
                return decode_into_layers(lat, self.W_dec[i], bufs, ("W_dec", i))
            return decode_sparse_blocks(lat, self.W_dec[i], impl=cfg.kernel)

        n = x.shape[0]
        # one contiguous copy per layer: a single [L, N, d] copy, as any temporary over tens of MB, is a fresh
        # mapping on CPU whose page faults cost more than the copy
        di = cfg.d_layer_in
        xs = [x[:, i * di:(i + 1) * di].contiguous() for i in range(L)]
        w_enc, b_enc = views("W_enc"), views("b_enc")
        parts: list[list[Tensor]] = [[] for _ in range(L)]  # parts[j]: what each source layer writes to layer j
        aux_parts: list[list[Tensor]] = [[] for _ in range(L)]

        def add(into: list[list[Tensor]], i: int, blocks: Sequence[Tensor]) -> None:
            for offset, part in enumerate(blocks):  # what layer i writes into layer i + offset
                into[i + offset].append(part)

        terms: dict[str, Tensor] = {}
        fired, l0 = [], 0.0
        if self.code in ("topk", "batchtopk"):
            for i in range(L):
                dead = None if state.dead_mask is None else state.dead_mask[i * F_:(i + 1) * F_]
                use_aux = dead is not None and cfg.aux_k > 0 and cfg.auxk_coefficient > 0 and bool(dead.any())
                lat, aux = encode_topk(xs[i], w_enc[i], b_enc[i], k=cfg.k, batch=self.code == "batchtopk",
                                       aux_k=cfg.aux_k if use_aux else 0,
                                       aux_mask=dead.to(self.device).bool() if use_aux else None,
                                       matmul_dtype=None if cfg.matmul_dtype is None else DTYPES[cfg.matmul_dtype],
                                       impl=cfg.kernel)
                add(parts, i, decode(lat, i))
                if aux is not None:
                    add(aux_parts, i, decode(aux, i))
                positive = lat.values.detach() > 0
                f_i = torch.zeros(F_, dtype=torch.bool, device=self.device)
                f_i[lat.cols[positive]] = True
                fired.append(f_i)
                l0 += float(positive.sum()) / n
                if self.code == "batchtopk":
                    update_threshold(self.threshold[i], lat.values, state, cfg)
        else:
            theta = self.thresholds.unbind(0)
            n_active = x.new_zeros(())
            for i in range(L):
                pre = xs[i].to(self.dtype) @ w_enc[i] + b_enc[i]
                f = JumpReLUFunction.apply(pre, theta[i], cfg.bandwidth)
                add(parts, i, (f @ self._decoder(i)).view(n, L - i, do).unbind(1))
                n_active = n_active + StepFunction.apply(pre, theta[i], cfg.bandwidth).sum(-1).mean()
                active = f.detach() > 0
                fired.append(active.any(0))
                l0 += float(active.sum(1).float().mean())
            terms["l0"] = cfg.l0_coefficient * float(state.sparsity_scale) * n_active
        b_dec = views("b_dec")
        skips = views("W_skip") if cfg.skip_connection else None
        outs, mse = [], 0.0
        for j in range(L):  # the output and squared error of each layer on its own (no [N, L·d] temporaries)
            out = parts[j][0] + b_dec[j]
            for part in parts[j][1:]:
                out.add_(part)  # a sum node's output: nothing saved for the backward reads it
            if skips is not None:
                out = out + xs[j].to(self.dtype) @ skips[j].T
            outs.append(out)
            mse = mse + self._squared_error(out, target[:, j * do:(j + 1) * do])
        # the prediction, differentiable; the loss is per layer above
        y_hat = cat_into_buffer(outs, bufs, "y_hat") if fast else torch.cat(outs, dim=1)
        terms = {"mse": mse, **terms}
        if self.code in ("topk", "batchtopk"):
            aux_hat = None
            if any(aux_parts):
                aux_hat = torch.cat([sum(p) if p else y_hat.new_zeros(n, do) for p in aux_parts], dim=1)
            terms["auxk"] = self._auxk_term(aux_hat, target, y_hat)
        return TrainOutput(loss=sum(terms.values()), terms=terms, x_hat=y_hat, fired=torch.cat(fired), l0=l0)

    def _auxk_term(self, e_hat: Tensor | None, target: Tensor, y_hat: Tensor) -> Tensor:
        """TopK's AuxK (saeforge.saes.topk) on the whole residual of the CLT's prediction."""
        zero = y_hat.new_zeros(())
        if e_hat is None:
            return zero
        return auxk_loss(e_hat, (target - y_hat).detach(), target, self.cfg.auxk_coefficient)

    # ---- optimiser hooks: each feature's decoder (all its output layers) stays at unit norm ----
    # In place, with per-feature reductions only: a temporary the size of a whole decoder (tens of MB on the benchmark
    # shape) is a fresh mapping on CPU and costs more in page faults than the arithmetic.
    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        for w in self.W_dec:
            if w.grad is None:
                continue
            flat, grad = w.view(w.shape[0], -1), w.grad.view(w.shape[0], -1)  # views: updated in place
            dots = torch.bmm(grad.unsqueeze(1), flat.unsqueeze(2)).view(-1, 1)
            coef = dots / torch.linalg.vector_norm(flat, dim=1, keepdim=True).square().clamp_min(1e-24)
            grad.addcmul_(coef, flat, value=-1)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        for w in self.W_dec:
            flat = w.view(w.shape[0], -1)
            flat.div_(torch.linalg.vector_norm(flat, dim=1, keepdim=True).clamp_min(1e-12))

    # ---- folding ----
    @torch.no_grad()
    def fold_input_scale(self, scale_in: float | Sequence[float], scale_out: float | Sequence[float] | None = None
                         ) -> None:
        """Fold per-layer input scales ``s_i`` and output scales ``t_j`` (or one of each for every layer): the
        latents keep their training units (so no code's selection or threshold changes), W_enc[i] *= s_i, the
        decoder block i -> j and b_dec[j] are divided by t_j, W_skip[i] *= s_i / t_i."""
        L = self.n_layers
        s_in = site_scales(scale_in, L, "input")
        s_out = site_scales(scale_in if scale_out is None else scale_out, L, "output")
        t = torch.tensor(s_out, dtype=torch.float64, device=self.device)
        for i in range(L):
            self.W_enc[i].mul_(s_in[i])
            self.W_dec[i].div_(t[i:].to(self.dtype)[None, :, None])
            if self.cfg.skip_connection:
                self.W_skip[i].mul_(s_in[i] / s_out[i])
        self.b_dec.div_(t.to(self.dtype)[:, None])

    @torch.no_grad()
    def fold_decoder_norms(self) -> None:
        """JumpReLU: make every feature's decoder unit norm without changing the function (f *= ||d||). TopK
        codes keep unit decoders while training and cannot fold other norms (the selection would change)."""
        norms = torch.stack([w.reshape(w.shape[0], -1).norm(dim=1) for w in self.W_dec])  # [L, F]
        if self.code != "jumprelu":
            tol = max(1e-5, 8 * torch.finfo(self.dtype).eps)
            if float((norms.float() - 1).abs().max()) > tol:
                raise SaeforgeError(f"{self.architecture}: decoder norms are not 1, and a TopK selection is not "
                                    "invariant to rescaling latents", "train it with saeforge, which keeps them at 1")
            return
        if bool((norms == 0).any()):
            raise SaeforgeError("cannot fold decoder norms: some decoder rows are exactly zero",
                                "remove or re-initialise those latents first")
        for i, w in enumerate(self.W_dec):
            w.div_(norms[i][:, None, None])
        self.W_enc.mul_(norms[:, None, :])
        self.b_enc.mul_(norms)
        self.log_threshold.add_(torch.log(norms))

    # ---- saving (saeforge's folder; SAELens has no CLT) ----
    def saelens_architecture(self) -> str:
        return self.architecture

    def saelens_tensors(self) -> dict[str, Tensor]:
        out = {"W_enc": self.W_enc, "b_enc": self.b_enc, "b_dec": self.b_dec}
        out.update({f"W_dec.{i}": w for i, w in enumerate(self.W_dec)})
        if self.cfg.skip_connection:
            out["W_skip"] = self.W_skip
        if self.code == "jumprelu":
            out["threshold"] = self.thresholds
        if self.code == "batchtopk":
            out["threshold"] = self.threshold.clamp_min(0)[:, None].expand(-1, self.features_per_layer).to(self.dtype)
        return {k: v.detach() for k, v in out.items()}

    def saelens_config_extras(self) -> dict[str, Any]:
        return {"n_layers": self.n_layers}

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"architecture={c.architecture!r}, n_layers={c.n_layers}, d_in_layer={c.d_layer_in}, "
                f"features_per_layer={c.features_per_layer}, d_out_layer={c.d_layer_out}")


@register_sae
class TopKCLT(CrossLayerTranscoder):
    config_class: ClassVar[type[SAEConfig]] = TopKCLTConfig
    code: ClassVar[str] = "topk"


@register_sae
class BatchTopKCLT(CrossLayerTranscoder):
    config_class: ClassVar[type[SAEConfig]] = BatchTopKCLTConfig
    code: ClassVar[str] = "batchtopk"


@register_sae
class JumpReLUCLT(CrossLayerTranscoder):
    config_class: ClassVar[type[SAEConfig]] = JumpReLUCLTConfig
    code: ClassVar[str] = "jumprelu"
