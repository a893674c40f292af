"""The edited weights: the MLP's down (output) projection of one layer, one column (Linear) or row (GPT-2's Conv1D)
per neuron of the site ``layers.L.mlp_hidden``.

An edit is a delta ``[n_neurons, d_model]`` on the chosen neurons' output weights. While it is optimised it is a
forward hook that adds ``x[..., neurons] @ delta`` to the projection's output (the model's weights stay untouched
and need no gradients); :func:`commit` then adds it to those weights in place, so weights outside the mask are not
touched at all (bit for bit).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from saeforge.errors import SaeforgeError

__all__ = ["commit", "down_projection", "neuron_axis", "with_delta"]


def down_projection(lm, layer: int) -> nn.Module:
    """The module whose input is ``layers.{layer}.mlp_hidden`` (the MLP's down projection); clear errors for a
    layer out of range or a model family without the site."""
    if not 0 <= layer < lm.n_layers:
        raise SaeforgeError(f"layer {layer} is out of range: the model has layers 0..{lm.n_layers - 1}",
                            f"pass --layer between 0 and {lm.n_layers - 1}")
    site = lm.site(f"layers.{layer}.mlp_hidden")
    module = lm._modules[site.module_path]
    neuron_axis(module)
    return module


def neuron_axis(module: nn.Module) -> int:
    """The axis of the module's weight that indexes the MLP's neurons: 1 for ``nn.Linear`` (``[d_model, d_mlp]``),
    0 for GPT-2's ``Conv1D`` (``[d_mlp, d_model]``)."""
    if isinstance(module, nn.Linear):
        return 1
    if type(module).__name__ == "Conv1D":
        return 0
    raise SaeforgeError(f"the MLP's down projection is a {type(module).__name__}, which saeforge cannot edit "
                        "(it edits nn.Linear and GPT-2's Conv1D weights)", "edit a llama/gemma2/gpt2/neox-style model")


@contextlib.contextmanager
def with_delta(module: nn.Module, neurons: torch.Tensor | None, delta: torch.Tensor) -> Iterator[None]:
    """Inside the block the module's output gains ``x[..., neurons] @ delta`` (``neurons`` None: every neuron)."""

    def hook(mod, args, output):
        x = args[0]
        part = x if neurons is None else x.index_select(-1, neurons)
        return output + (part.to(delta.dtype) @ delta).to(output.dtype)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def commit(module: nn.Module, neurons: torch.Tensor | None, delta: torch.Tensor) -> None:
    """Add ``delta`` to the output weights of ``neurons`` in place (only those weights change)."""
    weight = module.weight
    d = delta.detach().to(weight.dtype)
    if neuron_axis(module) == 1:
        if neurons is None:
            weight.add_(d.T)
        else:
            weight[:, neurons] += d.T
    else:
        if neurons is None:
            weight.add_(d)
        else:
            weight[neurons, :] += d
