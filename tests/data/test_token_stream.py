import itertools

import pytest
import torch

from saeforge.data.text_source import TextSource
from saeforge.data.token_stream import TokenPolicy, TokenStream
from saeforge.errors import SaeforgeError


def _stream(tiny_llama, text_file, **policy):
    return TokenStream.for_model(TextSource(str(text_file)), tiny_llama, TokenPolicy(**policy))


def test_contexts_are_packed_with_bos_and_fixed_length(tiny_llama, text_file):
    ts = _stream(tiny_llama, text_file, context_length=16)
    ctxs = list(ts.contexts())
    assert len(ctxs) > 10 and all(len(c) == 16 and c[0] == tiny_llama.bos_token_id() for c in ctxs)
    body = [t for c in ctxs for t in c[1:]]
    expected = tiny_llama.tokenizer(text_file.read_text(), add_special_tokens=False)["input_ids"]
    assert body == expected[: len(body)]


def test_contexts_from_an_index_match_the_full_sequence(tiny_llama, text_file):
    ts = _stream(tiny_llama, text_file, context_length=16)
    full = list(ts.contexts())
    assert all((a == b).all() for a, b in zip(full[7:], ts.contexts(7)))
    starts = [first for first, _ in ts.batches(4, start=3)]
    assert starts[:3] == [3, 7, 11]


def test_keep_mask_drops_bos_and_special_tokens_by_default(tiny_llama, text_file):
    ts = _stream(tiny_llama, text_file, context_length=16)
    ids = torch.tensor([[0, 5, 6, 1, 7], [0, 2, 9, 10, 11]])  # 0 bos, 1 eos, 2 pad
    assert ts.keep_mask(ids).tolist() == [[False, True, True, False, True], [False, False, True, True, True]]
    keep_all = _stream(tiny_llama, text_file, context_length=16, exclude_special_tokens=False)
    assert keep_all.keep_mask(ids).all()


def test_documents_are_separated_by_eos(tiny_llama, tmp_path):
    (tmp_path / "a.txt").write_text("To be, or not to be")
    (tmp_path / "b.txt").write_text("that is the question")
    ts = TokenStream.for_model(TextSource(str(tmp_path)), tiny_llama, TokenPolicy(context_length=4,
                                                                                    prepend_bos=False))
    flat = list(itertools.chain.from_iterable(ts.contexts()))
    assert tiny_llama.tokenizer.eos_token_id in flat


def test_context_length_limits(tiny_llama, text_file):
    with pytest.raises(SaeforgeError, match="above the model's maximum"):
        _stream(tiny_llama, text_file, context_length=100_000)
    with pytest.raises(SaeforgeError, match="too short"):
        _stream(tiny_llama, text_file, context_length=1)
