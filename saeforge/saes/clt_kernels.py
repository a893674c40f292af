"""The fast path of a cross-layer transcoder's training step: per-layer views of its stacked parameters, the
sparse decode of one source layer into its own and every later output layer, and the concatenated prediction, with
the large per-step tensors (stacked gradients, the contiguous copy of a decoder block, the prediction) in buffers
reused from step to step.

Why (measured on the 2-core CPU of ``benchmarks/coders_speed.py``, 4 layers, F 4608, d 576, batch 4096): the plain
autograd path assembles each stacked parameter's gradient with ``torch.stack`` of its per-layer or per-block parts —
the encoder's [L, d, F], each decoder's [F, L - i, d] — into a fresh tensor every step. At tens of MB such a tensor
is a fresh mapping on CPU (glibc maps anything over 32 MB anew), and its page faults cost more than the copy: the
stack of layer 0's four decoder blocks took 37 ms against 19 ms for the same copies into a buffer already mapped.
Here each part is copied into a buffer kept from step to step, and autograd is handed a fresh alias of that buffer,
which it adopts as ``.grad`` without a copy (the layout matches the parameter's). Likewise the sparse kernels want
each [F, d] block of a decoder [F, L - i, d] contiguous and made a fresh contiguous copy of the strided block on
every call (forward and backward); here each block is copied into one reused [F, d] scratch buffer instead (keeping
contiguous copies of whole decoders across the step measured no faster, and would cost 4 bytes per decoder weight).
The prediction [N, L·d] is concatenated into a reused buffer too.

A buffer is reused only when nothing but the cache holds its memory (checked on its storage's reference count): when
the last step's ``.grad`` was set to None (``zero_grad(set_to_none=True)``, as saeforge's trainer does) and its
graph and outputs are gone, it is free; while a ``.grad``, a gradient handed out by ``torch.autograd.grad``, a
prediction someone kept or a graph not yet back-propagated holds it, a new tensor is allocated and nothing anyone
holds is overwritten (when AuxK decodes through a decoder too, its part of the gradient and the main part are
summed by autograd, into either). CUDA's caching allocator makes fresh tensors cheap, so there a new tensor is
always allocated.

These functions import private helpers of :mod:`saeforge.kernels.sparse_topk` (``_Plan``, ``_sparse_matmul``,
``_sparse_t_matmul``, ``_sampled_dots``); a change to those must keep this module in step.

The sparse kernels themselves (``embedding_bag`` for the decode and the weight gradient, ``sampled_addmm`` for the
latents' gradient) are those of :mod:`saeforge.kernels.sparse_topk`, one [F, d] block at a time as
:func:`~saeforge.kernels.decode_sparse_blocks` runs them.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from saeforge.kernels.buffers import StepBuffers
from saeforge.kernels.sparse_topk import SparseLatents, _Plan, _sampled_dots, _sparse_matmul, _sparse_t_matmul

__all__ = ["StepBuffers", "cat_into_buffer", "decode_into_layers", "layer_views"]


class _LayerViewsFn(torch.autograd.Function):
    """``weight.unbind(0)`` whose backward writes the parts' gradients into one reused buffer instead of stacking
    them into a fresh tensor."""

    @staticmethod
    def forward(ctx, weight, buffers, key):
        ctx.buffers, ctx.key = buffers, key
        ctx.shape, ctx.dtype, ctx.device = weight.shape, weight.dtype, weight.device
        return tuple(weight.unbind(0))

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        out = ctx.buffers.get(ctx.key, ctx.shape, ctx.dtype, ctx.device)
        for i, g in enumerate(grads):
            if g is None:
                out[i].zero_()
            else:
                out[i].copy_(g)
        return out, None, None


def layer_views(weight: Tensor, buffers: StepBuffers, key: Any) -> tuple[Tensor, ...]:
    """The per-layer slices ``weight[i]`` of a stacked parameter, differentiable; see the module docstring."""
    return _LayerViewsFn.apply(weight, buffers, key)


class _DecodeIntoLayersFn(torch.autograd.Function):
    """``dense(latents) @ W[:, b]`` for every block b of W [d_sae, B, d_out] (one output per block), as
    ``decode_sparse_blocks``; the weight gradient is written block by block into a reused [d_sae, B, d_out]
    buffer."""

    @staticmethod
    def forward(ctx, values, rows, cols, n, W, buffers, key):
        plan = _Plan.of(rows, cols, n, W.shape[0])
        ctx.plan, ctx.buffers, ctx.key = plan, buffers, key
        ctx.save_for_backward(values, cols, W)
        v, Wd = values.detach(), W.detach()  # detached: embedding_bag's forward-only kernel
        return tuple(_sparse_matmul(plan, cols, v, _block(Wd, b, buffers)) for b in range(W.shape[1]))

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        values, cols, W = (t.detach() for t in ctx.saved_tensors)
        grads = [g.contiguous() for g in grads]
        dv = dW = None
        if ctx.needs_input_grad[0]:
            for b, g in enumerate(grads):
                d = _sampled_dots(ctx.plan, cols, g, _block(W, b, ctx.buffers))
                dv = d if dv is None else dv.add_(d)
            dv = dv.to(values.dtype)
        if ctx.needs_input_grad[4]:
            dW = ctx.buffers.get(ctx.key, W.shape, W.dtype, W.device)
            for b, g in enumerate(grads):
                dW[:, b].copy_(_sparse_t_matmul(ctx.plan, cols, values, g))
        return dv, None, None, None, dW, None, None


def _block(W: Tensor, b: int, buffers: StepBuffers) -> Tensor:
    """Block ``W[:, b]`` of a decoder [d_sae, B, d_out], contiguous (in the scratch buffer unless it already is)."""
    block = W[:, b]
    if block.is_contiguous():
        return block
    return buffers.get("block", block.shape, block.dtype, block.device).copy_(block)


def decode_into_layers(latents: SparseLatents, W: Tensor, buffers: StepBuffers, key: Any) -> tuple[Tensor, ...]:
    """``dense(latents) @ W[:, b]`` for each block b of ``W`` [d_sae, B, d_out] -> B tensors [N, d_out] (a CLT
    source layer's decode into its own and the later output layers); the same result and gradients as
    :func:`saeforge.kernels.decode_sparse_blocks`, with the blocks read through a scratch buffer and the weight
    gradient written into a reused one."""
    if W.dim() != 3 or W.shape[0] != latents.shape[1]:
        raise ValueError(f"W must be [d_sae={latents.shape[1]}, blocks, d_out], got {tuple(W.shape)}")
    return _DecodeIntoLayersFn.apply(latents.values, latents.rows, latents.cols, latents.shape[0], W, buffers, key)


class _CatIntoFn(torch.autograd.Function):
    """``torch.cat(parts, dim=1)`` into a reused buffer."""

    @staticmethod
    def forward(ctx, buffers, key, *parts):
        widths = [p.shape[1] for p in parts]
        ctx.widths = widths
        out = buffers.get(key, torch.Size((parts[0].shape[0], sum(widths))), parts[0].dtype, parts[0].device)
        torch.cat(parts, dim=1, out=out)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        return (None, None, *g.split(ctx.widths, dim=1))


def cat_into_buffer(parts: Sequence[Tensor], buffers: StepBuffers, key: Any) -> Tensor:
    """``torch.cat(parts, dim=1)`` (differentiable) into a buffer reused once nothing holds the last result."""
    return _CatIntoFn.apply(buffers, key, *parts)
