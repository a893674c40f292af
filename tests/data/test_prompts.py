import copy
import types

import pytest
import torch

from saeforge.data.prompts import PromptEncoder
from saeforge.data.text_source import TextSource
from saeforge.data.token_stream import TokenPolicy, TokenStream
from saeforge.errors import SaeforgeError

TEXTS = ["To be, or not to be", "All the world's a stage, and all the men and women merely players"]


def _tokens(lm, text):
    return lm.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_one_prompt_under_the_policy(tiny_llama):
    lm = tiny_llama
    bos = lm.bos_token_id()
    batch = PromptEncoder(lm).one(TEXTS[0])
    assert batch.input_ids.tolist() == [[bos] + _tokens(lm, TEXTS[0])]
    assert batch.attention_mask.all() and batch.keep[0].tolist() == [False] + [True] * len(_tokens(lm, TEXTS[0]))
    no_bos = PromptEncoder(lm, TokenPolicy(prepend_bos=False)).one(TEXTS[0])
    assert no_bos.input_ids.tolist() == [_tokens(lm, TEXTS[0])] and no_bos.keep.all()
    keep_special = PromptEncoder(lm, TokenPolicy(exclude_special_tokens=False)).one(TEXTS[0])
    assert keep_special.keep.all()  # the run said BOS is SAE data


def test_keep_mask_is_the_token_streams(tiny_llama, text_file):
    """A prompt that is exactly a training context gets exactly that context's SAE-data positions."""
    policy = TokenPolicy(context_length=16)
    stream = TokenStream.for_model(TextSource(str(text_file)), tiny_llama, policy)
    context = torch.from_numpy(next(stream.contexts(3)))[None]
    batch = PromptEncoder(tiny_llama, policy).one(tiny_llama.tokenizer.decode(context[0, 1:]))
    assert torch.equal(batch.input_ids, context) and torch.equal(batch.keep, stream.keep_mask(context))
    ids = torch.tensor([[tiny_llama.bos_token_id(), 5, 6, tiny_llama.tokenizer.eos_token_id, 7]])
    assert torch.equal(PromptEncoder(tiny_llama, policy).keep_mask(ids), stream.keep_mask(ids))


@pytest.mark.parametrize("padding", ["right", "left"])
def test_padded_batches(tiny_llama, padding):
    lm = tiny_llama
    batch = PromptEncoder(lm).batch(TEXTS, padding=padding)
    rows = [[lm.bos_token_id()] + _tokens(lm, t) for t in TEXTS]
    width = max(len(r) for r in rows)
    assert batch.input_ids.shape == (2, width) and batch.lengths == [len(r) for r in rows]
    for i, r in enumerate(rows):
        assert batch.tokens(i).tolist() == r
        cols = slice(width - len(r), width) if padding == "left" else slice(0, len(r))
        assert batch.attention_mask[i, cols].all() and batch.attention_mask[i].sum() == len(r)
        assert batch.input_ids[i][batch.attention_mask[i] == 0].eq(lm.tokenizer.pad_token_id).all()
    assert not (batch.keep & (batch.attention_mask == 0)).any()
    assert batch.keep.sum() == sum(len(r) - 1 for r in rows)  # every text token, no BOS, no padding


def test_limits_truncation_and_empty_prompts(tiny_llama):
    enc = PromptEncoder(tiny_llama, max_tokens=8)
    long = "word " * 40
    with pytest.raises(SaeforgeError, match=r"the prompt has \d+ tokens; the limit is 8"):
        enc.one(long)
    assert enc.one(long, truncate=True).input_ids.shape == (1, 8)
    with pytest.raises(SaeforgeError, match=r"prompt 2 has \d+ tokens; with 3 new tokens the model's context of 8 "
                                            r"allows 5"):
        enc.batch(["a", long], reserve=3)
    with pytest.raises(SaeforgeError, match="8 new tokens leave no room"):
        enc.batch(["a"], reserve=8)
    with pytest.raises(SaeforgeError, match="the prompt is empty"):
        enc.one("  \n")
    with pytest.raises(SaeforgeError, match="prompt 2 is empty"):
        enc.batch(["a", ""])
    with pytest.raises(SaeforgeError, match="no prompt given"):
        enc.batch([])
    with pytest.raises(SaeforgeError, match="unknown padding side 'middle'"):
        enc.batch(["a"], padding="middle")
    assert PromptEncoder(tiny_llama).max_tokens == tiny_llama.max_context == 256


def test_tokenizer_without_pad_token_pads_with_eos(tiny_llama):
    tok = copy.deepcopy(tiny_llama.tokenizer)
    tok.pad_token = None
    assert tok.pad_token_id is None
    lm = types.SimpleNamespace(tokenizer=tok, max_context=64, special_token_ids=tiny_llama.special_token_ids,
                               bos_token_id=tiny_llama.bos_token_id)
    batch = PromptEncoder(lm).batch(TEXTS, padding="left")
    assert batch.input_ids[0, 0] == tok.eos_token_id and not batch.keep[0, 0]
