"""Activations the hierarchy analyses measure on: held-out text through the model (the default), or a cache."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from saeforge.errors import SaeforgeError

__all__ = ["cache_batches", "folder_metadata", "text_batches"]


def folder_metadata(folder: str | Path) -> dict:
    """The ``metadata`` of a saved SAE folder (model, site, context, token policy); empty when it has none."""
    from saeforge.saes import read_sae_config

    meta = read_sae_config(folder).get("metadata")
    return dict(meta) if isinstance(meta, dict) else {}


def cache_batches(cache: str | Path, site: str, tokens: int, batch_size: int = 4096) -> Iterator[torch.Tensor]:
    """The first ``tokens`` rows of ``site`` in an activation cache, in batches (float32)."""
    from saeforge.data.activation_cache import ActivationCache

    c = ActivationCache(cache)
    if site not in c.sites:
        raise SaeforgeError(f"the cache {cache} has no site {site!r} (it has {', '.join(c.sites)})",
                            "pass a cache of the site the SAEs read")
    seen = 0
    for i in range(len(c.shards)):
        shard = c.shard_tensor(i, site)
        for s in range(0, shard.shape[0], batch_size):
            part = shard[s:s + batch_size][: tokens - seen]
            if part.shape[0] == 0:
                return
            seen += part.shape[0]
            yield part.float()
            if seen >= tokens:
                return


def text_batches(lm, site: str, corpus: str, tokens: int, *, context_length: int = 128, prepend_bos: bool = True,
                 exclude_special_tokens: bool = True, batch_contexts: int = 8, text_field: str = "text"
                 ) -> Iterator[torch.Tensor]:
    """Activations of ``site`` at the SAE-data positions of ``corpus`` (packed contexts, the training token policy),
    ``tokens`` positions in all (float32)."""
    from saeforge.data.text_source import TextSource
    from saeforge.data.token_stream import TokenPolicy, TokenStream

    stream = TokenStream.for_model(TextSource(corpus, text_field), lm,
                                   TokenPolicy(context_length, prepend_bos, exclude_special_tokens))
    seen = 0
    for _, ids in stream.batches(batch_contexts):
        keep = stream.keep_mask(ids).to(lm.device)
        x = lm.read(ids, [site])[site][keep].float()
        x = x[: tokens - seen]
        seen += x.shape[0]
        yield x
        if seen >= tokens:
            return
    if seen == 0:
        raise SaeforgeError(f"the corpus {corpus!r} gave no tokens", "pass a larger corpus")
