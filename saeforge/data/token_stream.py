"""TokenStream: documents packed into fixed-length contexts.

Packing: documents are tokenized without special tokens, joined with the separator token (EOS), and cut into
contexts; with ``prepend_bos`` every context starts with the BOS token followed by ``context_length - 1`` text tokens.
Context ``i`` is always the same tokens for the same source, tokenizer and settings, which is what lets caching and
training resume exactly by context index.

Which positions become SAE data (:meth:`TokenStream.keep_mask`): by default not the BOS position and no special
token (BOS, EOS/separator, padding), because their activation norms are outliers that dominate an SAE's loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from saeforge.data.text_source import TextSource
from saeforge.errors import SaeforgeError


@dataclass(frozen=True)
class TokenPolicy:
    """How text becomes model input, and which positions count as SAE data."""

    context_length: int = 128
    """Tokens per context fed to the model (BOS included)."""
    prepend_bos: bool = True
    """Start every context with the tokenizer's BOS token (EOS for tokenizers without one)."""
    exclude_special_tokens: bool = True
    """Leave BOS/EOS/padding positions out of SAE data: their activation norms are outliers."""


class TokenStream:
    """Contexts of ``source`` under ``policy``. Without a source (``None``) it only holds the token rules (BOS,
    separator, special ids, :meth:`keep_mask`), as :class:`saeforge.data.prompts.PromptEncoder` uses it."""

    def __init__(self, source: TextSource | None, tokenizer, policy: TokenPolicy, *, special_ids=None, bos_id=None):
        self.source = source
        self.tokenizer = tokenizer
        self.policy = policy
        if policy.context_length < 2:
            raise SaeforgeError(f"context length {policy.context_length} is too short", "use at least 2 tokens")
        self.bos_id = bos_id if bos_id is not None else (tokenizer.bos_token_id or tokenizer.eos_token_id)
        if policy.prepend_bos and self.bos_id is None:
            raise SaeforgeError("the tokenizer has neither a BOS nor an EOS token to start contexts with",
                                "set prepend_bos to false")
        self.sep_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else self.bos_id
        ids = set(special_ids if special_ids is not None else (getattr(tokenizer, "all_special_ids", []) or []))
        ids.update(i for i in (self.bos_id, self.sep_id, tokenizer.pad_token_id) if i is not None)
        self.special_ids = torch.tensor(sorted(ids), dtype=torch.long)

    @classmethod
    def for_model(cls, source: TextSource, lm, policy: TokenPolicy) -> "TokenStream":
        lm.check_context_length(policy.context_length)
        return cls(source, lm.tokenizer, policy, special_ids=lm.special_token_ids(), bos_id=lm.bos_token_id())

    @property
    def body_length(self) -> int:
        return self.policy.context_length - (1 if self.policy.prepend_bos else 0)

    def _token_chunks(self) -> Iterator[np.ndarray]:
        for doc in self.source.documents():
            ids = self.tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"]
            if self.sep_id is not None:
                ids = list(ids) + [self.sep_id]
            yield np.asarray(ids, dtype=np.int64)

    def contexts(self, start: int = 0) -> Iterator[np.ndarray]:
        """Contexts ``start, start+1, ...`` as int64 arrays of ``context_length`` tokens; a final partial one is
        dropped so every context has the same length."""
        body = self.body_length
        pending: list[np.ndarray] = []
        n_pending = 0
        index = 0
        for chunk in self._token_chunks():
            pending.append(chunk)
            n_pending += len(chunk)
            if n_pending < body:
                continue
            flat = np.concatenate(pending)
            n_full = len(flat) // body
            for j in range(n_full):
                if index >= start:
                    ctx = flat[j * body:(j + 1) * body]
                    if self.policy.prepend_bos:
                        ctx = np.concatenate(([self.bos_id], ctx))
                    yield ctx
                index += 1
            rest = flat[n_full * body:]
            pending, n_pending = [rest], len(rest)

    def batches(self, batch_size: int, start: int = 0) -> Iterator[tuple[int, torch.Tensor]]:
        """``(index of the first context, LongTensor [batch, context_length])``; the last batch may be smaller."""
        buf: list[np.ndarray] = []
        first = start
        for ctx in self.contexts(start):
            buf.append(ctx)
            if len(buf) == batch_size:
                yield first, torch.from_numpy(np.stack(buf))
                first += len(buf)
                buf = []
        if buf:
            yield first, torch.from_numpy(np.stack(buf))

    def keep_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Bool mask of positions that are SAE data under the policy."""
        keep = torch.ones_like(input_ids, dtype=torch.bool)
        if self.policy.exclude_special_tokens:
            keep &= ~torch.isin(input_ids, self.special_ids.to(input_ids.device))
            if self.policy.prepend_bos:
                keep[:, 0] = False
        return keep

    def count_tokens(self) -> int:
        """Total tokens in the source (tokenizes everything once)."""
        return sum(len(c) for c in self._token_chunks())
