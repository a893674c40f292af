"""Forwards from cached block inputs: the logits, activations and edited logits equal the full forward's bit for
bit in every family; hooks the skipped blocks would bypass are refused; the model is given back unchanged."""

import pytest
import torch

from saeforge.errors import SaeforgeError
from saeforge.models.language_model import LanguageModel
from saeforge.models.suffix import first_block, logits_from, read_block_inputs, skipping_blocks
from tests.conftest import FAMILIES


@pytest.fixture(scope="module")
def models(tiny_model_dirs):
    return {f: LanguageModel.load(str(tiny_model_dirs[f]), device="cpu") for f in FAMILIES}


def _ids(lm, n=3, t=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, lm.vocab_size, (n, t), generator=g)


def _masks(ids):
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    mask[1, -3:] = 0  # right padding
    return (None, mask)


def _scale(x):
    return x * 1.7 - 0.3


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_from_every_block_equal_the_full_forward(models, family):
    lm = models[family]
    ids = _ids(lm)
    for mask in _masks(ids):
        full = lm.logits(ids, attention_mask=mask)
        inputs, _ = read_block_inputs(lm, ids, range(lm.n_layers + 1), attention_mask=mask)
        for start, block_input in inputs.items():
            assert torch.equal(logits_from(lm, block_input), full), (family, start, mask is not None)
        # the model is given back: no stub left behind
        assert all("forward" not in lm._modules[lm._block_path(i)].__dict__ for i in range(lm.n_layers))
        assert torch.equal(lm.logits(ids, attention_mask=mask), full)


@pytest.mark.parametrize("family", FAMILIES)
def test_edits_and_reads_in_the_suffix_match_the_full_forward(models, family):
    lm = models[family]
    ids = _ids(lm, seed=1)
    # each site with the first block a forward editing it must run
    cases = {"layers.1.resid_pre": 1, "layers.1.attn_out": 1, "layers.1.mlp_out": 1, "layers.1.resid_post": 2,
             "layers.2.mlp_out": 2, "layers.2.resid_post": 3}
    for site, start in cases.items():
        assert first_block(lm, [site]) == start
    assert first_block(lm, list(cases)) == 1
    recorded = ["layers.1.resid_post", "layers.2.attn_out", "layers.2.resid_post"]
    for mask in _masks(ids):
        for site, start in cases.items():
            with lm.edit({site: _scale}), lm.record([s for s in recorded if first_block(lm, [s]) >= start]) as full:
                expected = lm.logits(ids, attention_mask=mask)
            block_input = read_block_inputs(lm, ids, [start], attention_mask=mask)[0][start]
            with lm.edit({site: _scale}), lm.record(list(full)) as suffix:
                got = logits_from(lm, block_input)
            assert torch.equal(got, expected), (family, site)
            assert not torch.equal(got, lm.logits(ids, attention_mask=mask))  # the edit did something
            assert set(suffix) == set(full) and all(torch.equal(suffix[s], full[s]) for s in full), (family, site)


def test_block_inputs_and_sites_in_one_early_stopped_pass(models):
    lm = models["llama"]
    ids = _ids(lm, seed=2)
    reads = lm.read(ids, ["layers.0.resid_post", "layers.1.resid_post", "layers.1.mlp_out"])
    calls = []
    last = lm._modules[lm._block_path(2)].register_forward_hook(lambda *a: calls.append(1))
    try:
        inputs, acts = read_block_inputs(lm, ids, [0, 1, 2], ["layers.1.mlp_out"])
    finally:
        last.remove()
    assert calls == []  # block 2 never ran
    assert inputs[0].hidden is None and inputs[0].nbytes == 0
    assert torch.equal(inputs[1].hidden, reads["layers.0.resid_post"])
    assert torch.equal(inputs[2].hidden, reads["layers.1.resid_post"])
    assert inputs[2].nbytes == ids.numel() * lm.d_model * 4
    assert torch.equal(acts["layers.1.mlp_out"], reads["layers.1.mlp_out"])
    # a site after the last block input: the pass runs on until it is read
    inputs, acts = read_block_inputs(lm, ids, [1], ["layers.2.mlp_out"])
    assert torch.equal(acts["layers.2.mlp_out"], lm.read(ids, ["layers.2.mlp_out"])["layers.2.mlp_out"])


def test_sites_outside_the_blocks(models):
    lm = models["llama"]
    assert first_block(lm, ["model.embed_tokens"]) == 0
    assert first_block(lm, ["model.norm"]) == first_block(lm, ["lm_head"]) == lm.n_layers
    assert first_block(lm, ["model.layers.1"]) == 2  # a block's output, as a raw module path
    assert first_block(lm, ["model.layers.1.mlp.act_fn"]) == 1


def test_hooks_the_skipped_blocks_would_bypass_are_refused(models):
    lm = models["llama"]
    ids = _ids(lm, seed=3)
    inputs, _ = read_block_inputs(lm, ids, [2])
    for site in ("layers.0.mlp_out", "layers.1.resid_pre", "layers.0.resid_post"):
        with lm.edit({site: _scale}):
            with pytest.raises(SaeforgeError, match=r"lies in blocks 0\.\.1, which this forward skips"):
                logits_from(lm, inputs[2])
    handle = lm._modules["model.layers.0.self_attn"].register_forward_hook(lambda *a: None)  # not saeforge's
    try:
        with pytest.raises(SaeforgeError, match="output of model.layers.0.self_attn"):
            logits_from(lm, inputs[2])
    finally:
        handle.remove()
    assert torch.equal(logits_from(lm, inputs[2]), lm.logits(ids))


def test_bad_input(models):
    lm = models["llama"]
    ids = _ids(lm, seed=4)
    inputs, _ = read_block_inputs(lm, ids, [1])
    with pytest.raises(SaeforgeError, match="block 4 does not exist"):
        read_block_inputs(lm, ids, [4])
    with pytest.raises(SaeforgeError, match=r"shape \(3, 5, 32\) but the cached ones \(3, 11, 32\)"):
        with skipping_blocks(lm, inputs[1]):
            lm.logits(ids[:, :5])
    assert "forward" not in lm._modules["model.layers.0"].__dict__  # put back after the error
    with pytest.raises(SaeforgeError, match="no sites"):
        first_block(lm, [])


@pytest.mark.embedded
def test_real_model_forwards_from_layer_15_are_exact(embedded_lm):
    lm = embedded_lm
    text = ["To be, or not to be, that is the question:", "Now is the winter of our discontent made glorious"]
    batch = lm.tokenizer(text, return_tensors="pt", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    full = lm.logits(ids, attention_mask=mask)
    with lm.edit({"layers.15.resid_post": _scale}):
        edited = lm.logits(ids, attention_mask=mask)
    inputs, _ = read_block_inputs(lm, ids, [15, 16, lm.n_layers], attention_mask=mask)
    for start, block_input in inputs.items():
        assert torch.equal(logits_from(lm, block_input), full), start
    for start in (15, 16):
        with lm.edit({"layers.15.resid_post": _scale}):
            assert torch.equal(logits_from(lm, inputs[start]), edited), start
