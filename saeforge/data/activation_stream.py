"""ActivationStream: shuffled batches of activations, from the live model or from an ActivationCache.

The stream is a pure function of (source, seed): it is cut into *fills* of the mixing buffer; fill ``i`` holds a
fixed set of activation vectors (a range of the live model's kept vectors, or a seeded choice of cache shards),
which are permuted with a generator seeded by ``(seed, i)`` and served as consecutive batches. The state is therefore
just ``(fill, batch)``: saving it costs nothing, and restoring it recomputes (live) or reloads (cache) the current
fill and continues with bit-identical batches, which exact training resume relies on. The last ``n mod batch_size``
vectors of a fill are dropped so every batch has the same size; a live fill holds whole batches, so it drops none
(the model's forward passes are the run's largest cost, and a dropped vector is a wasted one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol

import torch

from saeforge.data.activation_cache import ActivationCache
from saeforge.data.activation_reader import read_activations
from saeforge.data.token_stream import TokenStream
from saeforge.errors import SaeforgeError


def mix_seed(*parts: int) -> int:
    """A deterministic 63-bit seed from several integers (FNV-1a), for independent streams per (seed, fill)."""
    h = 1469598103934665603
    for p in parts:
        for byte in int(p).to_bytes(8, "little", signed=True):
            h = ((h ^ byte) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


class ActivationSource(Protocol):
    sites: list[str]

    def fill(self, index: int) -> dict[str, torch.Tensor] | None:
        """The activation vectors of fill ``index`` (``[n, d]`` per site), or None past the end."""


class CachedActivations:
    """Fills from a cache: each epoch visits the shards in a seeded order, ``shards_per_fill`` at a time."""

    def __init__(self, cache: ActivationCache, sites: list[str] | None = None, *, shards_per_fill: int = 2,
                 seed: int = 0, epochs: int | None = None):
        self.cache = cache
        self.sites = list(sites or cache.sites)
        for s in self.sites:
            cache._check_site(s)
        if not cache.shards:
            raise SaeforgeError(f"the cache {cache.folder} holds no shards", "run `saeforge cache` to fill it")
        self.shards_per_fill = max(1, min(shards_per_fill, len(cache.shards)))
        self.seed = seed
        self.epochs = epochs
        self.fills_per_epoch = -(-len(cache.shards) // self.shards_per_fill)

    def shard_order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 1))
        return torch.randperm(len(self.cache.shards), generator=g).tolist()

    def fill(self, index: int) -> dict[str, torch.Tensor] | None:
        epoch, j = divmod(index, self.fills_per_epoch)
        if self.epochs is not None and epoch >= self.epochs:
            return None
        chosen = self.shard_order(epoch)[j * self.shards_per_fill:(j + 1) * self.shards_per_fill]
        return {s: torch.cat([self.cache.shard_tensor(i, s) for i in chosen]) for s in self.sites}


class LiveActivations:
    """Fills computed by the model, cut from the endless sequence of kept vectors (the corpus wraps around: epochs).

    Fills are sized in vectors, not contexts: fill ``i`` holds exactly a whole number of batches, so the stream
    drops nothing, and when the run's length (``total_batches``) is known its batches are shared out as evenly as
    possible over the fewest fills of at most ``buffer_tokens`` vectors, so the last fill is not a whole buffer of
    forward passes for a few batches. Which positions are kept depends on the token ids only (no model), so where a
    fill starts is found by tokenizing; the context that straddles two fills runs through the model for both.
    Without ``batch_size`` every fill holds ``buffer_tokens`` vectors.
    """

    def __init__(self, lm, tokens: TokenStream, sites: list[str], *, buffer_tokens: int = 65_536,
                 batch_contexts: int = 32, epochs: int | None = None, dtype: torch.dtype | None = None,
                 batch_size: int | None = None, total_batches: int | None = None):
        self.lm = lm
        self.tokens = tokens
        self.site_objs = [lm.site(s) for s in sites]
        self.sites = [s.name for s in self.site_objs]
        self.buffer_tokens = max(1, buffer_tokens)
        self.batch_size = batch_size
        self.total_batches = total_batches
        self.batch_contexts = batch_contexts
        self.epochs = epochs
        self.dtype = dtype
        self._n_contexts: int | None = None
        self._last: tuple[int, dict[str, torch.Tensor]] | None = None  # the trainer's init sample is fill 0 too
        self._iter = None
        self._next_context = self._iter_start = 0
        self._starts: dict[int, tuple[int, int]] = {0: (0, 0)}  # fill -> (global context, offset in its vectors)
        self._held: tuple[int, torch.Tensor] | None = None  # the last context read, as (global index, ids)

    @property
    def n_contexts(self) -> int:
        if self._n_contexts is None:
            self._n_contexts = sum(1 for _ in self.tokens.contexts())
            if self._n_contexts == 0:
                raise SaeforgeError("the corpus is shorter than one context",
                                    "use a larger corpus or a shorter --context-length")
        return self._n_contexts

    def fill_size(self, index: int) -> int:
        """Vectors in fill ``index``: whole batches, the run's batches shared evenly over its fills."""
        if not self.batch_size:
            return self.buffer_tokens
        most = max(1, self.buffer_tokens // self.batch_size)  # batches a fill may hold
        if self.total_batches:
            n_fills = -(-self.total_batches // most)
            if index < n_fills:
                return (self.total_batches // n_fills + (index < self.total_batches % n_fills)) * self.batch_size
        return most * self.batch_size

    def _contexts(self, start: int, count: int) -> torch.Tensor:
        """Contexts ``start .. start+count`` of the endless (wrapped) sequence, reusing the open iterator.

        The corpus length is learnt when the first pass ends, so no upfront tokenization pass is needed."""
        out = []
        global_index = start
        while len(out) < count:
            local = global_index if self._n_contexts is None else global_index % self._n_contexts
            if self._iter is None or self._next_context != local:
                self._iter = self.tokens.contexts(local)
                self._next_context = self._iter_start = local
            try:
                out.append(torch.from_numpy(next(self._iter)))
            except StopIteration:
                self._iter = None
                if self._n_contexts is None:
                    if self._next_context > self._iter_start:
                        self._n_contexts = self._next_context  # ran off the end: that is the corpus length
                    else:
                        self.n_contexts  # noqa: B018 - started past the end (a resume): count, and check non-empty
                continue
            self._next_context += 1
            global_index += 1
        return torch.stack(out)

    def _past_the_end(self, context: int) -> bool:
        return self.epochs is not None and context >= self.epochs * self.n_contexts

    def _walk(self, start: tuple[int, int], n: int) -> tuple[list[torch.Tensor], tuple[int, int], int]:
        """From ``start`` (global context, offset), the contexts that hold the next ``n`` kept vectors, where the
        walk ends, and how many vectors it found (fewer than ``n`` only at the end of the last epoch)."""
        context, offset = start
        contexts, found = [], 0
        while found < n and not self._past_the_end(context):
            if self._held is not None and self._held[0] == context:  # the context two fills share: no re-tokenizing
                ids = self._held[1]
            else:
                ids = self._contexts(context, 1)
                self._held = (context, ids)
            kept = int(self.tokens.keep_mask(ids).sum())
            take = min(kept - offset, n - found)
            if take > 0:
                contexts.append(ids[0])
                found += take
            if offset + max(take, 0) < kept:
                return contexts, (context, offset + take), found
            context, offset = context + 1, 0
        return contexts, (context, 0), found

    def fill_start(self, index: int) -> tuple[int, int]:
        """Where fill ``index`` starts: (global context index, offset among that context's kept vectors)."""
        known = max(i for i in self._starts if i <= index)
        while known < index:
            _, end, _ = self._walk(self._starts[known], self.fill_size(known))
            known += 1
            self._starts[known] = end
        return self._starts[index]

    def fill_plan(self, index: int) -> tuple[torch.Tensor, int, int] | None:
        """The contexts ``[m, context_length]`` that fill ``index`` reads, the offset of its first vector among
        their kept vectors and its number of vectors; None past the end."""
        start = self.fill_start(index)
        contexts, end, found = self._walk(start, self.fill_size(index))
        self._starts[index + 1] = end
        if found == 0:
            return None
        return torch.stack(contexts), start[1], found

    def fill(self, index: int) -> dict[str, torch.Tensor] | None:
        if self._last is not None and self._last[0] == index:
            return self._last[1]
        plan = self.fill_plan(index)
        if plan is None:
            return None
        ids, offset, count = plan
        parts: dict[str, list[torch.Tensor]] = {s: [] for s in self.sites}
        for b in range(0, ids.shape[0], self.batch_contexts):
            batch = read_activations(self.lm, self.tokens, ids[b:b + self.batch_contexts], self.site_objs,
                                     dtype=self.dtype)
            for s, act in batch.acts.items():
                parts[s].append(act)
        data = {s: torch.cat(p)[offset:offset + count] for s, p in parts.items()}
        self._last = (index, data)
        return data


@dataclass
class StreamPosition:
    fill: int = 0
    batch: int = 0


class ActivationStream:
    """Iterate over ``dict[site, Tensor[batch_size, d]]``; :meth:`state_dict` marks the next batch to serve."""

    def __init__(self, source: ActivationSource, *, batch_size: int, seed: int = 0):
        if batch_size <= 0:
            raise SaeforgeError(f"batch size must be positive, got {batch_size}", "pass e.g. --batch-size 4096")
        self.source = source
        self.batch_size = batch_size
        self.seed = seed
        self.position = StreamPosition()
        self.tokens_served = 0

    @property
    def sites(self) -> list[str]:
        return self.source.sites

    def state_dict(self) -> dict:
        return {"fill": self.position.fill, "batch": self.position.batch, "seed": self.seed,
                "batch_size": self.batch_size, "tokens_served": self.tokens_served}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed or state["batch_size"] != self.batch_size:
            raise SaeforgeError(
                f"stream state was saved with seed {state['seed']} and batch size {state['batch_size']}, "
                f"this stream has {self.seed} and {self.batch_size}", "resume with the original settings")
        self.position = StreamPosition(state["fill"], state["batch"])
        self.tokens_served = state.get("tokens_served", 0)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            data = self.source.fill(self.position.fill)
            if data is None:
                return
            n = next(iter(data.values())).shape[0]
            n_batches = n // self.batch_size
            g = torch.Generator().manual_seed(mix_seed(self.seed, self.position.fill))
            perm = torch.randperm(n, generator=g)
            while self.position.batch < n_batches:
                idx = perm[self.position.batch * self.batch_size:(self.position.batch + 1) * self.batch_size]
                batch = {s: t[idx.to(t.device)] for s, t in data.items()}
                self.position.batch += 1
                self.tokens_served += self.batch_size
                yield batch
            self.position = StreamPosition(self.position.fill + 1, 0)
