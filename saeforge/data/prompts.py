"""One way from prompt text to model input: token ids under the run's token policy, padding, and the positions that
count as SAE data.

A run's :class:`~saeforge.data.token_stream.TokenPolicy` decides whether a prompt starts with BOS and whether BOS and
other special tokens are SAE data, exactly as for the training contexts (the special-token rules are
:class:`~saeforge.data.token_stream.TokenStream`'s own). Batches are padded on the right for analysis (every row starts
at column 0) or on the left for generation (every row ends at the last column, where new tokens are appended).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from saeforge.data.token_stream import TokenPolicy, TokenStream
from saeforge.errors import SaeforgeError

PADDING_SIDES = ("right", "left")
DEFAULT_MAX_TOKENS = 2048  # for models that do not state their context length


@dataclass(frozen=True)
class PromptBatch:
    """Prompts as model input."""

    input_ids: torch.Tensor
    """``[n, width]`` token ids, padded with the pad token (EOS for tokenizers without one)."""
    attention_mask: torch.Tensor
    """``[n, width]`` 1 at tokens, 0 at padding."""
    keep: torch.Tensor
    """``[n, width]`` bool: positions that are SAE data under the policy (never padding)."""
    padding_side: str
    """``right`` (analysis) or ``left`` (generation)."""

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def lengths(self) -> list[int]:
        """Tokens per prompt, padding excluded."""
        return [int(n) for n in self.attention_mask.sum(1)]

    def tokens(self, i: int) -> torch.Tensor:
        """The token ids of prompt ``i`` without padding."""
        return self.input_ids[i][self.attention_mask[i].bool()]


class PromptEncoder:
    """Tokenizes prompts for ``lm`` under ``policy`` (default: BOS first, special tokens not SAE data).

    ``max_tokens`` caps the tokens of one prompt, BOS included (default: the model's context length).
    """

    def __init__(self, lm, policy: TokenPolicy | None = None, *, max_tokens: int | None = None):
        self.lm = lm
        self.policy = policy or TokenPolicy()
        self.rules = TokenStream(None, lm.tokenizer, self.policy, special_ids=lm.special_token_ids(),
                                 bos_id=lm.bos_token_id())
        self.max_tokens = int(max_tokens or lm.max_context or DEFAULT_MAX_TOKENS)
        if self.max_tokens < 1:
            raise SaeforgeError(f"a prompt limit of {self.max_tokens} tokens leaves no room for text",
                                "allow at least 1 token")
        pad = lm.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.rules.sep_id if self.rules.sep_id is not None else 0)

    def ids(self, text: str, *, truncate: bool = False, reserve: int = 0, which: str = "the prompt") -> list[int]:
        """Token ids of one prompt: BOS (if the policy says so) and the text's tokens.

        Longer than ``max_tokens - reserve``: cut to fit with ``truncate``, else an error (``reserve`` keeps room for
        generated tokens). An empty prompt is an error.
        """
        if not isinstance(text, str) or not text.strip():
            raise SaeforgeError(f"{which} is empty", "give every prompt some text" if which != "the prompt"
                                else "type some text")
        limit = self.max_tokens - reserve
        if limit < 1:
            raise SaeforgeError(f"{reserve} new tokens leave no room for a prompt in the model's context of "
                                f"{self.max_tokens} tokens", f"generate at most {self.max_tokens - 1} new tokens")
        ids = [int(i) for i in self.lm.tokenizer(text, add_special_tokens=False)["input_ids"]]
        if self.policy.prepend_bos:
            ids = [int(self.rules.bos_id)] + ids
        if len(ids) > limit:
            if truncate:
                return ids[:limit]
            if reserve:
                raise SaeforgeError(f"{which} has {len(ids)} tokens; with {reserve} new tokens the model's context "
                                    f"of {self.max_tokens} allows {limit}", "shorten the prompt")
            raise SaeforgeError(f"{which} has {len(ids)} tokens; the limit is {limit}",
                                f"shorten it to at most {limit} tokens")
        return ids

    def batch(self, texts: Sequence[str], *, padding: str = "right", truncate: bool = False, reserve: int = 0
              ) -> PromptBatch:
        """Several prompts padded to one width: ``right`` for analysis, ``left`` for generation."""
        if padding not in PADDING_SIDES:
            raise SaeforgeError(f"unknown padding side {padding!r}", f"use one of {', '.join(PADDING_SIDES)}")
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            raise SaeforgeError("no prompt given", "give at least one prompt")
        single = len(texts) == 1
        rows = [self.ids(t, truncate=truncate, reserve=reserve, which="the prompt" if single else f"prompt {i}")
                for i, t in enumerate(texts, 1)]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            cols = slice(width - len(r), width) if padding == "left" else slice(0, len(r))
            ids[i, cols] = torch.tensor(r, dtype=torch.long)
            mask[i, cols] = 1
        keep = self.keep_mask(ids, mask)
        return PromptBatch(ids, mask, keep, padding)

    def one(self, text: str, *, truncate: bool = False) -> PromptBatch:
        """A batch of one prompt (no padding)."""
        return self.batch([text], truncate=truncate)

    def keep_mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Positions that are SAE data: the policy's rule (:meth:`TokenStream.keep_mask`), and never padding."""
        keep = self.rules.keep_mask(input_ids)
        if attention_mask is not None:
            keep &= attention_mask.bool().to(keep.device)
        return keep
