"""What an edit sees (EditContext) in plain forwards, padded batches, cached generation and nested blocks; the
one-parameter form; edits that return something unusable."""

import functools

import pytest
import torch

from saeforge.errors import SaeforgeError
from saeforge.models.language_model import EditContext, LanguageModel, takes_context

SITE = "layers.1.resid_post"


@pytest.fixture(scope="module")
def models(tiny_model_dirs):
    return {f: LanguageModel.load(str(tiny_model_dirs[f]), device="cpu") for f in ("llama", "gpt2")}


def _ids(lm, n=2, t=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, lm.vocab_size, (n, t), generator=g)


def _recorder(seen: list):
    def fn(x, ctx):
        seen.append(ctx)
        return None

    return fn


def test_plain_forward_context(models):
    lm = models["llama"]
    ids = _ids(lm)
    seen: list[EditContext] = []
    with lm.edit({SITE: _recorder(seen)}):
        lm.logits(ids)
        lm.logits(ids[:, :4])
    first, second = seen
    assert first.site.name == SITE and first.site.d == lm.d_model
    assert torch.equal(first.input_ids, ids) and first.attention_mask is None
    assert first.past_length == 0 and first.is_prompt and not first.is_generated
    assert torch.equal(first.positions, torch.arange(7).expand(2, -1))
    assert torch.equal(first.columns, torch.arange(7))
    assert (first.call, second.call) == (0, 1) and torch.equal(second.input_ids, ids[:, :4])


def test_padding_is_not_counted_in_positions(models):
    lm = models["llama"]
    ids = _ids(lm, t=5)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    seen: list[EditContext] = []
    with lm.edit({SITE: _recorder(seen)}):
        lm.logits(ids, attention_mask=mask)
    (ctx,) = seen
    assert torch.equal(ctx.attention_mask, mask)
    assert ctx.positions.tolist() == [[-1, -1, 0, 1, 2], [0, 1, 2, 3, -1]]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cached_generation_prompt_call_then_one_call_per_token(models, family):
    lm = models[family]
    ids = _ids(lm, t=6, seed=1)
    ids[0, :2] = lm.tokenizer.pad_token_id  # row 0 is left-padded: 4 real tokens, row 1 has 6
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    seen: list[EditContext] = []
    with lm.edit({SITE: _recorder(seen), "layers.0.mlp_out": lambda x: None}):
        out = lm.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4,
                                do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
    assert [c.call for c in seen] == [0, 1, 2, 3]  # the prompt pass, then one call per fed token
    prompt = seen[0]
    assert prompt.is_prompt and torch.equal(prompt.input_ids, ids) and torch.equal(prompt.attention_mask, mask)
    assert prompt.positions.tolist() == [[-1, -1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]]
    for t, ctx in enumerate(seen[1:], 1):
        assert ctx.is_generated and ctx.past_length == 6 + t - 1
        assert torch.equal(ctx.input_ids, out[:, 6 + t - 1:6 + t])  # the token generated at the previous step
        assert ctx.attention_mask.shape == (2, 6 + t)
        assert ctx.positions.tolist() == [[4 + t - 1], [6 + t - 1]]
        assert ctx.columns.tolist() == [6 + t - 1]


def test_nested_blocks_count_their_own_calls_and_compose(models):
    lm = models["llama"]
    ids = _ids(lm)
    outer: list[EditContext] = []
    inner: list[EditContext] = []
    seen_by_inner = []

    def outer_fn(x, ctx):
        outer.append(ctx)
        return x + 1.0

    def inner_fn(x, ctx):
        inner.append(ctx)
        seen_by_inner.append(x.clone())
        return None

    plain = lm.read(ids, [SITE])[SITE]
    with lm.edit({SITE: outer_fn}):
        lm.logits(ids)
        with lm.edit({SITE: inner_fn}):
            lm.logits(ids)
    assert [c.call for c in outer] == [0, 1] and [c.call for c in inner] == [0]
    torch.testing.assert_close(seen_by_inner[0], plain + 1.0)  # the inner edit sees the outer one's result
    with lm.edit({SITE: _recorder(inner)}):  # a fresh block counts from 0 again
        lm.logits(ids)
    assert inner[-1].call == 0


def test_one_parameter_edits_still_work(models):
    lm = models["llama"]
    ids = _ids(lm)
    plain = lm.read(ids, [SITE])[SITE]

    class Half:
        def __call__(self, x):
            return x * 0.5

    def scale(x, factor):
        return x * factor

    for fn in (lambda x: x * 0.5, Half(), functools.partial(scale, factor=0.5)):
        with lm.edit({SITE: fn}):
            torch.testing.assert_close(lm.read(ids, [SITE])[SITE], plain * 0.5)
    assert not takes_context(lambda x: x) and not takes_context(torch.neg) and not takes_context(Half())
    assert takes_context(lambda x, ctx: x) and takes_context(lambda x, ctx=None: x) and takes_context(lambda *a: 0)
    assert takes_context(lambda x, c: x) and not takes_context(lambda x, v=1.0: x + v)  # the closure idiom


def test_identity_edits_with_context_are_bit_identical(models):
    lm = models["gpt2"]
    ids = _ids(lm)
    clean = lm.logits(ids)
    with lm.edit({SITE: lambda x, ctx: x, "layers.0.resid_pre": lambda x, ctx: x.clone()}):
        assert torch.equal(lm.logits(ids), clean)


def test_unusable_edit_results_are_refused_by_site(models):
    lm = models["llama"]
    ids = _ids(lm)
    bad = {
        "returned shape (2, 7, 16); expected (2, 7, 32)": lambda x, ctx: x[..., :16],
        "returned a float, not a tensor": lambda x: 1.0,
        "returned dtype torch.int64": lambda x: x.long(),
        "returned a tensor on meta": lambda x: torch.empty(x.shape, device="meta"),
    }
    for message, fn in bad.items():
        with pytest.raises(SaeforgeError, match=f"the edit at site '{SITE}' " + message.replace("(", r"\(")
                           .replace(")", r"\)")):
            with lm.edit({SITE: fn}):
                lm.logits(ids)
    with lm.edit({SITE: lambda x: x.double()}):  # another float dtype is cast to the activation's
        assert lm.read(ids, [SITE])[SITE].dtype == torch.float32
