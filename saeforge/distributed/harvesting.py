"""``saeforge harvest`` under torchrun: each rank runs the model and the SAEs on its share of the batches (batch
``b`` on rank ``b mod W``); rank 0 merges the (token, feature, value) triples and builds the store alone.

The merge is exact: a triple is computed from its own batch whichever rank reads it, and harvest sorts the triples by
(feature, token), so the merged triples are the one process's and the store is the same (only the timing entries of
its meta differ). Tokenizing is done by every rank for every batch (cheap next to the model), so every rank knows
the contexts without sending them.
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager

import torch.distributed as dist

from saeforge.distributed.process_group import Ranks, launched_by_torchrun, start, stop

__all__ = ["BatchShare"]


class BatchShare:
    """Which batches of one pass over the text this process reads, and the merge of what the ranks found. In one
    process: every batch, and the merge is the identity."""

    def __init__(self, device: str):
        self.ranks: Ranks | None = start(device) if launched_by_torchrun() else None
        self.device = device if self.ranks is None else str(self.ranks.device)

    @property
    def is_main(self) -> bool:
        return self.ranks is None or self.ranks.is_main

    def main_only(self, context: ContextManager) -> ContextManager:
        """``context`` on rank 0 (a writer's lock), nothing elsewhere."""
        return context if self.is_main else contextlib.nullcontext()

    def mine(self, batch_index: int) -> bool:
        return self.ranks is None or batch_index % self.ranks.world_size == self.ranks.rank

    def merge(self, found: dict[str, tuple[list, ...]]) -> dict[str, tuple[list, ...]] | None:
        """Every rank's lists, joined per key on rank 0 (None on the others)."""
        if self.ranks is None:
            return found
        parts: list[Any] = [None] * self.ranks.world_size
        dist.gather_object(found, parts if self.is_main else None, dst=0)
        if not self.is_main:
            return None
        return {key: tuple([item for part in parts for item in part[key][i]] for i in range(len(lists)))
                for key, lists in found.items()}

    def close(self) -> None:
        """Wait until rank 0 has written, then leave the group."""
        if self.ranks is not None:
            dist.barrier()
            stop(self.ranks)
