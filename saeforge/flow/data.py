"""Token samples for the data-based flow steps (Pearson matching, origin groups, deactivation)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from saeforge.errors import SaeforgeError


@dataclass
class TokenSample:
    """``ids [n_contexts, T]`` and, per context, ``positions`` ``[n_contexts, per_context]`` of sampled SAE-data
    tokens (never BOS/EOS/padding)."""

    ids: torch.Tensor
    positions: torch.Tensor
    keep: torch.Tensor  # bool [n_contexts, T]: the positions that are SAE data


def sample_tokens(lm, corpus: str, *, contexts: int, context_length: int, per_context: int, seed: int = 0,
                  text_field: str = "text") -> TokenSample:
    """``contexts`` contexts of the corpus (the first ones, so a run is reproducible) and ``per_context`` random
    SAE-data positions in each (the paper samples 5 random non-BOS tokens per text)."""
    from saeforge.data.text_source import TextSource
    from saeforge.data.token_stream import TokenPolicy, TokenStream

    if contexts < 1 or per_context < 1:
        raise SaeforgeError(f"need at least one context and one token per context (got {contexts}, {per_context})",
                            "pass e.g. --contexts 64 --tokens-per-context 5")
    stream = TokenStream.for_model(TextSource(corpus, text_field), lm, TokenPolicy(context_length, True, True))
    rows = []
    for ctx in stream.contexts():
        rows.append(torch.as_tensor(ctx, dtype=torch.long))
        if len(rows) >= contexts:
            break
    if not rows:
        raise SaeforgeError(f"the corpus {corpus!r} gave no context", "use a larger corpus")
    ids = torch.stack(rows)
    keep = stream.keep_mask(ids)
    gen = torch.Generator().manual_seed(seed)
    positions = []
    for row in keep:
        ok = torch.nonzero(row).flatten()
        if len(ok) < per_context:
            raise SaeforgeError(f"a context holds only {len(ok)} SAE-data tokens", "pass a longer --context-length")
        positions.append(ok[torch.randperm(len(ok), generator=gen)[:per_context]].sort().values)
    return TokenSample(ids, torch.stack(positions), keep)


@torch.no_grad()
def encode_sites(lm, saes: dict, ids: torch.Tensor, sites: list[str], *, positions: torch.Tensor | None = None,
                 batch_size: int = 8) -> dict[str, torch.Tensor]:
    """SAE activations at each site (one early-stopped read per batch): ``[n_contexts, T, d_sae]``, or
    ``[n_contexts, m, d_sae]`` at ``positions [n_contexts, m]`` only."""
    out: dict[str, list[torch.Tensor]] = {s: [] for s in sites}
    for i in range(0, ids.shape[0], batch_size):
        acts = lm.read(ids[i:i + batch_size], sites)
        for s in sites:
            a = acts[s].float()
            if positions is not None:
                pos = positions[i:i + batch_size].to(a.device)
                a = a.gather(1, pos[..., None].expand(-1, -1, a.shape[-1]))
            out[s].append(saes[s].sae.encode(a).cpu())
    return {s: torch.cat(v) for s, v in out.items()}


def with_threads(fn: Callable) -> Callable:
    """Run a command under the project's thread policy (``cfg.threads``, 0: automatic): on a shared 2-core machine
    two PyTorch threads that wait on each other made these steps many times slower than one
    (saeforge.utils.threads)."""

    @functools.wraps(fn)
    def run(cfg, *args, **kwargs):
        from saeforge.utils.threads import thread_policy

        with thread_policy(getattr(cfg, "threads", 0)):
            return fn(cfg, *args, **kwargs)

    return run
