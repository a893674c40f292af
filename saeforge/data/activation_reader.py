"""Reading SAE data from a model: one forward pass per batch of contexts, many sites, special positions dropped."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saeforge.data.token_stream import TokenStream
from saeforge.errors import SaeforgeError
from saeforge.models.language_model import LanguageModel
from saeforge.models.sites import Site
from saeforge.utils.finite import all_finite


@dataclass
class ActivationBatch:
    """Activations of the kept positions of a batch of contexts: ``acts[site]`` is ``[n_kept, d]``."""

    acts: dict[str, torch.Tensor]
    tokens: torch.Tensor  # [n_kept] token ids at those positions
    n_contexts: int

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])


def read_activations(lm: LanguageModel, tokens: TokenStream, input_ids: torch.Tensor, sites: list[Site],
                     dtype: torch.dtype | None = None) -> ActivationBatch:
    keep = tokens.keep_mask(input_ids)
    raw = lm.read(input_ids, sites)
    keep_dev = keep.to(lm.device)
    acts = {}
    for name, act in raw.items():
        flat = act[keep_dev]
        if dtype is not None and flat.dtype != dtype:
            flat = flat.to(dtype)
        if not all_finite(flat):
            raise SaeforgeError(f"the model produced NaN or Inf activations at site {name!r}",
                                "run the model in float32 (--dtype float32) or check the weights")
        acts[name] = flat
    return ActivationBatch(acts, input_ids[keep], int(input_ids.shape[0]))
