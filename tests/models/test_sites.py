import pytest
import torch

from saeforge.errors import SaeforgeError
from saeforge.models.language_model import LanguageModel
from tests.conftest import FAMILIES


@pytest.fixture(scope="module")
def models(tiny_model_dirs):
    return {f: LanguageModel.load(str(p), device="cpu") for f, p in tiny_model_dirs.items()}


def _ids(lm, n=2, t=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, lm.vocab_size, (n, t), generator=g)


@pytest.mark.parametrize("family", FAMILIES)
def test_canonical_sites_resolve_with_dimensions(models, family):
    lm = models[family]
    sites = lm.sites()
    assert len(sites) == 6 * lm.n_layers
    acts = lm.read(_ids(lm), [s.name for s in sites])
    for s in sites:
        d = lm.d_mlp if s.kind == "mlp_hidden" else lm.d_model
        assert s.d == d
        assert acts[s.name].shape == (2, 12, d)
    assert lm.d_mlp == (128 if family == "gpt2" else 64)  # GPT-2: 4 x d_model when n_inner is unset


@pytest.mark.parametrize("family", FAMILIES)
def test_residual_decomposes_into_attention_and_mlp_outputs(models, family):
    """resid_post = resid_pre + attn_out + mlp_out holds only if attn_out/mlp_out are the tensors the block adds to
    the residual stream, so this checks the per-family module mapping (including Gemma 2's post-norms and
    GPT-NeoX's parallel residual)."""
    lm = models[family]
    for layer in range(lm.n_layers):
        names = [f"layers.{layer}.{k}" for k in ("resid_pre", "attn_out", "mlp_out", "resid_post")]
        a = lm.read(_ids(lm, seed=layer), names)
        recombined = a[names[0]] + a[names[1]] + a[names[2]]
        torch.testing.assert_close(recombined, a[names[3]], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(a[names[1]], torch.zeros_like(a[names[1]]))
        assert not torch.allclose(a[names[2]], torch.zeros_like(a[names[2]]))


@pytest.mark.parametrize("family", FAMILIES)
def test_resid_post_of_one_layer_is_resid_pre_of_the_next(models, family):
    lm = models[family]
    a = lm.read(_ids(lm), ["layers.0.resid_post", "layers.1.resid_pre"])
    assert torch.equal(a["layers.0.resid_post"], a["layers.1.resid_pre"])


def test_unknown_site_lists_valid_ones(models):
    lm = models["llama"]
    with pytest.raises(SaeforgeError) as err:
        lm.site("layers.1.resid_middle")
    msg = str(err.value)
    assert "unknown site 'layers.1.resid_middle'" in msg
    assert "layers.0.resid_pre" in msg and "resid_post" in msg and "saeforge sites" in msg
    with pytest.raises(SaeforgeError, match="layer 7 does not exist, the model has 3 layers"):
        lm.site("layers.7.resid_post")


def test_raw_module_path_is_a_site_and_its_width_is_probed(models):
    lm = models["llama"]
    site = lm.site("model.layers.1.mlp.act_fn")
    assert site.kind == "module" and site.layer == 1 and site.d == 64
    a = lm.read(_ids(lm), [site])
    assert a[site.name].shape == (2, 12, 64)


def test_read_stops_after_the_deepest_site(models):
    lm = models["llama"]
    calls = {i: 0 for i in range(lm.n_layers)}
    handles = [lm.model.model.layers[i].register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
               for i in range(lm.n_layers)]
    try:
        lm.read(_ids(lm), ["layers.1.mlp_out", "layers.0.resid_post"])
    finally:
        for h in handles:
            h.remove()
    assert calls == {0: 1, 1: 0, 2: 0}  # layer 1 started (its MLP ran) but layer 2 never did


def test_identity_edit_is_bit_identical_and_real_edit_changes_logits(models):
    lm = models["llama"]
    ids = _ids(lm)
    clean = lm.logits(ids)
    with lm.edit({"layers.1.resid_post": lambda x: x}):
        same = lm.logits(ids)
    with lm.edit({"layers.1.resid_pre": lambda x: x.clone()}):
        same_pre = lm.logits(ids)
    assert torch.equal(clean, same) and torch.equal(clean, same_pre)
    direction = torch.randn(lm.d_model)
    with lm.edit({"layers.1.resid_post": lambda x: x + 3.0 * direction}):
        edited = lm.logits(ids)
        seen = lm.read(ids, ["layers.1.resid_post"])["layers.1.resid_post"]
    assert (edited - clean).abs().max() > 1e-3
    plain = lm.read(ids, ["layers.1.resid_post"])["layers.1.resid_post"]
    torch.testing.assert_close(seen, plain + 3.0 * direction)
    assert torch.equal(lm.logits(ids), clean)  # hooks are gone after the block


def test_edits_at_attn_and_mlp_sites_reach_the_residual(models):
    lm = models["gpt2"]
    ids = _ids(lm)
    base = lm.read(ids, ["layers.1.resid_post"])["layers.1.resid_post"]
    with lm.edit({"layers.1.mlp_out": lambda x: torch.zeros_like(x)}):
        ablated = lm.read(ids, ["layers.1.resid_post", "layers.1.mlp_out"])
    mlp = lm.read(ids, ["layers.1.mlp_out"])["layers.1.mlp_out"]
    torch.testing.assert_close(ablated["layers.1.resid_post"], base - mlp, rtol=1e-5, atol=1e-5)


def test_bfloat16_loading_reads_bfloat16(tiny_llama_dir):
    lm = LanguageModel.load(str(tiny_llama_dir), dtype="bfloat16", device="cpu")
    acts = lm.read(_ids(lm), ["layers.0.resid_post"])
    assert acts["layers.0.resid_post"].dtype == torch.bfloat16


def test_context_length_above_maximum_is_refused(models):
    with pytest.raises(SaeforgeError, match="above the model's maximum of 256"):
        models["llama"].check_context_length(1024)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_direction_logits_equal_the_head_on_unit_rms_vectors(models, family):
    """RMSNorm is the identity on its own scale for a vector of RMS 1, so there the direct logit effect must equal
    the model's own final norm + unembedding (this checks the norm path and Gemma's (1 + weight))."""
    lm = models[family]
    v = torch.randn(3, lm.d_model, dtype=torch.float64).float()
    v = v / v.pow(2).mean(-1, keepdim=True).sqrt()
    norm = lm._modules[lm.family.final_norm]
    with torch.no_grad():
        expected = lm.model.get_output_embeddings()(norm(v))
    torch.testing.assert_close(lm.direction_logits(v), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_mlp_in_is_what_the_mlp_reads(models, family):
    """mlp_in is the MLP module's input: running the MLP on it gives mlp_out (Gemma 2 adds its post-MLP norm), and
    an edit there changes the MLP's output and the residual stream only through it."""
    lm = models[family]
    ids = _ids(lm)
    names = ["layers.1.resid_pre", "layers.1.attn_out", "layers.1.mlp_in", "layers.1.mlp_out", "layers.1.resid_post"]
    a = lm.read(ids, names)
    block = lm.model.get_submodule(f"{lm.family.layers}.1")
    with torch.no_grad():
        out = block.mlp(a["layers.1.mlp_in"])
        if family == "gemma2":
            out = block.post_feedforward_layernorm(out)
    torch.testing.assert_close(out, a["layers.1.mlp_out"], rtol=1e-5, atol=1e-6)
    with lm.edit({"layers.1.mlp_in": lambda x: torch.zeros_like(x)}):
        b = lm.read(ids, names)
    assert torch.equal(b["layers.1.attn_out"], a["layers.1.attn_out"])
    assert not torch.allclose(b["layers.1.mlp_out"], a["layers.1.mlp_out"])
    torch.testing.assert_close(b["layers.1.resid_pre"] + b["layers.1.attn_out"] + b["layers.1.mlp_out"],
                               b["layers.1.resid_post"], rtol=1e-5, atol=1e-5)
    assert lm.site("layers.1.mlp_in").order < lm.site("layers.1.mlp_out").order


@pytest.mark.parametrize("family", FAMILIES)
def test_mlp_hidden_is_what_the_down_projection_reads(models, family):
    """mlp_hidden is one value per neuron: the down projection applied to it gives mlp_out, and zeroing it leaves
    only the down projection's bias in the MLP's output."""
    lm = models[family]
    ids = _ids(lm)
    names = ["layers.1.mlp_in", "layers.1.mlp_hidden", "layers.1.mlp_out"]
    a = lm.read(ids, names)
    block = lm.model.get_submodule(f"{lm.family.layers}.1")
    down = block.get_submodule(lm.family.mlp_down)

    def out_of(hidden):
        out = down(hidden)
        return block.post_feedforward_layernorm(out) if family == "gemma2" else out

    with torch.no_grad():
        torch.testing.assert_close(out_of(a["layers.1.mlp_hidden"]), a["layers.1.mlp_out"], rtol=1e-5, atol=1e-6)
        with lm.edit({"layers.1.mlp_hidden": lambda h: torch.zeros_like(h)}):
            b = lm.read(ids, names)
        torch.testing.assert_close(b["layers.1.mlp_out"], out_of(torch.zeros_like(a["layers.1.mlp_hidden"])))
    assert torch.equal(b["layers.1.mlp_in"], a["layers.1.mlp_in"])
    assert lm.site("layers.1.mlp_in").order < lm.site("layers.1.mlp_hidden").order < lm.site("layers.1.mlp_out").order
