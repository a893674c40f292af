"""Prompts with answers, run from the edited layer on: every edit and every measurement of an edit runs the model
only from the edited block (the hidden states entering it are computed once, :mod:`saeforge.models.suffix`), since
edits to one layer's MLP leave everything before it unchanged; logits are computed only at the positions scored.

- :class:`FactBatch`: prompts and their answers (teacher-forced): the answer's negative log-likelihood (with
  gradients, for the edit's loss) and, without gradients, whether each answer token is the argmax (``exact``: all
  of them, which is exactly "greedy decoding produces the answer") and the argmax tokens themselves (locality).
- :class:`TextBatch`: plain text contexts and their perplexity (the drift of held-out perplexity after edits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from saeforge.editing.facts import EncodedFact
from saeforge.models.suffix import BlockInput, read_block_inputs, skipping_blocks

__all__ = ["FactBatch", "TextBatch", "block_input_for", "forward_from", "last_token_activations"]

CHUNK = 32  # rows per forward: enough to amortise the per-call cost, small enough for the logits at kept positions


def block_input_for(lm, ids: torch.Tensor, mask: torch.Tensor | None, block: int) -> BlockInput:
    """The input of ``block`` for this batch, as an ordinary tensor (not an inference tensor), so forwards with
    gradients can start from it."""
    inputs, _ = read_block_inputs(lm, ids, [block], attention_mask=mask)
    got = inputs[block]
    hidden = None if got.hidden is None else got.hidden.clone()
    ids_ = got.input_ids.clone()
    mask_ = None if got.attention_mask is None else got.attention_mask.clone()
    return BlockInput(got.start, hidden, ids_, mask_, got.rest)


def forward_from(lm, block_input: BlockInput, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Logits ``[batch, len(keep) or seq, vocab]`` of the batch, running only the blocks from ``block_input.start``
    on; gradients flow when enabled (the weights do not require them unless the caller asks)."""
    with skipping_blocks(lm, block_input):
        kwargs = {} if keep is None else {"logits_to_keep": keep.to(lm.device)}
        return lm.model(input_ids=block_input.input_ids, attention_mask=block_input.attention_mask,
                        use_cache=False, **kwargs).logits


def _pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask


@dataclass
class _Chunk:
    block_input: BlockInput
    keep: torch.Tensor  # [k] the columns whose logits are computed
    rows: torch.Tensor  # [n] batch row of each scored answer token
    cols: torch.Tensor  # [n] index into keep of each scored answer token
    tokens: torch.Tensor  # [n] the answer token expected there
    owner: torch.Tensor  # [n] which fact (global index) the token belongs to


@dataclass
class FactBatch:
    """Encoded facts, ready to score from block ``block``."""

    chunks: list[_Chunk]
    n_facts: int
    block: int

    @classmethod
    def build(cls, lm, facts: Sequence[EncodedFact], *, block: int | None = None) -> "FactBatch":
        block = 0 if block is None else int(block)
        pad = lm.tokenizer.pad_token_id
        pad = int(pad if pad is not None else 0)
        chunks = []
        for s in range(0, len(facts), CHUNK):
            part = facts[s:s + CHUNK]
            ids, mask = _pad([f.ids for f in part], pad)
            keep = sorted({p for f in part for p in f.positions})
            col = {p: i for i, p in enumerate(keep)}
            rows, cols, tokens, owner = [], [], [], []
            for r, f in enumerate(part):
                for p, t in zip(f.positions, f.answer_ids):
                    rows.append(r)
                    cols.append(col[p])
                    tokens.append(t)
                    owner.append(s + r)
            as_long = lambda x: torch.tensor(x, dtype=torch.long, device=lm.device)  # noqa: E731
            chunks.append(_Chunk(block_input_for(lm, ids, mask, block), as_long(keep), as_long(rows), as_long(cols),
                                 as_long(tokens), as_long(owner)))
        return cls(chunks, len(facts), block)

    def _token_logits(self, lm, chunk: _Chunk) -> torch.Tensor:
        logits = forward_from(lm, chunk.block_input, chunk.keep)
        return logits[chunk.rows, chunk.cols].float()  # [n, vocab]

    def nll(self, lm) -> torch.Tensor:
        """Mean negative log-likelihood per answer token (a scalar that carries gradients when enabled)."""
        total, count = 0.0, 0
        for chunk in self.chunks:
            logits = self._token_logits(lm, chunk)
            total = total + torch.nn.functional.cross_entropy(logits, chunk.tokens, reduction="sum")
            count += len(chunk.tokens)
        return total / max(count, 1)

    @torch.no_grad()
    def score(self, lm) -> dict[str, torch.Tensor]:
        """Per fact: ``exact`` (every answer token is the argmax: greedy decoding gives the answer), ``accuracy``
        (share of answer tokens that are the argmax), ``logprob`` (of the whole answer); and ``argmax`` (the
        predicted token at every scored position, in order, for locality comparisons)."""
        hits, logprob, argmax, owners = [], [], [], []
        for chunk in self.chunks:
            logits = self._token_logits(lm, chunk)
            top = logits.argmax(-1)
            hits.append(top == chunk.tokens)
            logprob.append(torch.log_softmax(logits, -1).gather(-1, chunk.tokens[:, None])[:, 0])
            argmax.append(top)
            owners.append(chunk.owner)
        hit, lp, owner = torch.cat(hits).float(), torch.cat(logprob), torch.cat(owners)
        n = torch.zeros(self.n_facts, device=hit.device).index_add_(0, owner, torch.ones_like(hit))
        acc = torch.zeros(self.n_facts, device=hit.device).index_add_(0, owner, hit) / n
        return {"exact": acc == 1.0, "accuracy": acc,
                "logprob": torch.zeros(self.n_facts, device=hit.device).index_add_(0, owner, lp),
                "argmax": torch.cat(argmax)}


@dataclass
class TextBatch:
    """Plain text contexts (BOS first), scored at every position from block ``block``."""

    chunks: list[BlockInput]
    block: int

    @classmethod
    def build(cls, lm, contexts: torch.Tensor, *, block: int, chunk: int = 8) -> "TextBatch":
        return cls([block_input_for(lm, contexts[s:s + chunk], None, block) for s in range(0, len(contexts), chunk)],
                   block)

    def _logprobs(self, lm, bi: BlockInput) -> torch.Tensor:
        return torch.log_softmax(forward_from(lm, bi)[:, :-1].float(), -1)

    @torch.no_grad()
    def perplexity(self, lm) -> float:
        total, count = 0.0, 0
        for bi in self.chunks:
            lp = self._logprobs(lm, bi)
            target = bi.input_ids[:, 1:]
            total += float(-lp.gather(-1, target[..., None]).sum())
            count += target.numel()
        return math.exp(total / max(count, 1))


@torch.no_grad()
def last_token_activations(lm, encoder, prompts: Sequence[str], site) -> torch.Tensor:
    """``[len(prompts), d]``: the activation at ``site`` on each prompt's last token (BOS first, as every prompt)."""
    out = []
    for s in range(0, len(prompts), CHUNK):
        batch = encoder.batch(list(prompts[s:s + CHUNK]), padding="right")
        acts = lm.read(batch.input_ids, [site], attention_mask=batch.attention_mask)[site.name]
        last = batch.attention_mask.sum(1) - 1
        out.append(acts[torch.arange(len(last)), last.to(acts.device)])
    return torch.cat(out)
