"""The gradient path: spliced forwards against central finite differences in float64, at one and two sites, with and
without freeze points; the exactness of the splice; bad input.

Finite differences need float64 throughout. transformers' RMSNorm rounds to float32 even in a float64 model, so the
float64 test models get an RMSNorm forward with the same formula in the input's dtype, and the float64 Gemma 2 uses
sdpa attention without logit soft-capping (its eager attention takes the softmax in float32). The reference for a
frozen forward holds the attention patterns / norm scales at their clean values with hooks, computed independently
of saeforge's implementation.
"""

import contextlib
import types

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from saeforge.errors import SaeforgeError
from saeforge.models.gradients import Splice
from saeforge.models.language_model import LanguageModel
from saeforge.saes import TopKConfig, make_sae
from tests.conftest import FAMILIES

FREEZES = [(), ("attention",), ("norm",), ("attention", "norm")]
VARIANTS = ["llama", "gemma2", "gpt2", "gpt2_eager", "gpt_neox"]
H = 1e-5  # central differences: truncation ~H² · f''' and rounding ~1e-16 / H, both far below the tolerance
RTOL = 1e-8


# ------------------------------------------------------------------------------------------------- float64 models
def _rms_forward(offset):
    def forward(self, x):
        eps = getattr(self, "variance_epsilon", getattr(self, "eps", 1e-6))
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (self.weight + offset)

    return forward


def float64_model(model_dir, variant: str) -> LanguageModel:
    lm = LanguageModel.load(str(model_dir), device="cpu")
    lm.model.double()
    offset = 1.0 if variant == "gemma2" else 0.0
    for m in lm.model.modules():
        if type(m).__name__.endswith("RMSNorm"):
            m.forward = types.MethodType(_rms_forward(offset), m)
        if hasattr(m, "attn_logit_softcapping"):
            m.attn_logit_softcapping = None
    if variant == "gemma2":
        lm.model.config._attn_implementation = "sdpa"
    if variant == "gpt2_eager":
        lm.model.config._attn_implementation = "eager"
    return lm


@pytest.fixture(scope="module")
def f64(tiny_model_dirs):
    cache = {}

    def get(variant):
        if variant not in cache:
            cache[variant] = float64_model(tiny_model_dirs[variant.removesuffix("_eager")], variant)
        return cache[variant]

    return get


def _sae(d=32, d_sae=48, k=6, seed=0, dtype=torch.float64, d_out=None):
    torch.manual_seed(seed)
    sae = make_sae(TopKConfig(d_in=d, d_sae=d_sae, k=k, d_out=d_out, apply_b_dec_to_input=False))
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.1)
        sae.b_enc.normal_(0, 0.1)
    return sae.to(dtype).eval()


def _batch(lm, seed=0, n=2, t=7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, lm.vocab_size, (n, t), generator=g)
    targets = torch.randint(0, lm.vocab_size, (n, t), generator=g)
    weights = torch.rand(n, t, generator=g, dtype=torch.float64) + 0.5
    return ids, targets, weights


def _metric(logits, targets, weights):
    logp = logits.log_softmax(-1)
    return (logp.gather(-1, targets[..., None]).squeeze(-1) * weights).sum()


# ------------------------------------------------------------------------------------------------- held reference
_HELD = "saeforge_test_held_pattern"


def _repeat_kv(t, n):
    return t if n == 1 else t.repeat_interleave(n, dim=1)


@contextlib.contextmanager
def held(lm, freeze):
    """A forward whose attention patterns / norm scales are recorded by its first call and held afterwards."""
    store, handles = {"record": True}, []
    config = lm.model.config
    previous = config._attn_implementation
    if "attention" in freeze:
        def attention(module, q, k, v, mask, scaling=None, softcap=None, **kwargs):
            k_, v_ = (_repeat_kv(t, getattr(module, "num_key_value_groups", 1)) for t in (k, v))
            if store["record"]:
                s = q @ k_.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scaling is None else scaling)
                if softcap is not None:
                    s = torch.tanh(s / softcap) * softcap
                if mask is not None:
                    s = s + mask[..., : k_.shape[-2]]
                store[id(module)] = s.softmax(-1)
            w = store[id(module)]
            return (w @ v_).transpose(1, 2).contiguous(), w

        AttentionInterface.register(_HELD, attention)
        AttentionMaskInterface.register(_HELD, ALL_MASK_ATTENTION_FUNCTIONS["eager"])
        config._attn_implementation = _HELD
    if "norm" in freeze:
        offset = 1.0 if lm.model_type == "gemma2" else 0.0

        def hook(module, args, output):
            x = args[0]
            layer = isinstance(module, torch.nn.LayerNorm)
            c = x - x.mean(-1, keepdim=True) if layer else x
            if store["record"]:
                var = x.var(-1, keepdim=True, unbiased=False) if layer else x.pow(2).mean(-1, keepdim=True)
                store[id(module)] = torch.rsqrt(var + getattr(module, "variance_epsilon", getattr(module, "eps", 0)))
                return None
            y = c * store[id(module)] * (module.weight + (0.0 if layer else offset))
            return y + module.bias if getattr(module, "bias", None) is not None else y

        handles = [m.register_forward_hook(hook) for m in lm.model.modules()
                   if isinstance(m, torch.nn.LayerNorm) or type(m).__name__.endswith("RMSNorm")]
    try:
        yield store
    finally:
        config._attn_implementation = previous
        for h in handles:
            h.remove()


def _perturbed(lm, ids, targets, weights, freeze, site, delta_fn):
    """m(+H) − m(−H) over 2H, the perturbation ``delta_fn(h)`` added at ``site``, the rest of the model natural
    (or frozen at the clean point)."""
    values = []
    with torch.no_grad(), held(lm, freeze) as store:
        if freeze:
            lm.model(input_ids=ids, use_cache=False)  # records the clean patterns / scales
        store["record"] = False
        for h in (H, -H):
            with lm.edit({site: lambda x, h=h: x + delta_fn(h)}):
                values.append(_metric(lm.model(input_ids=ids, use_cache=False).logits, targets, weights))
    return float((values[0] - values[1]) / (2 * H))


def _check_node(lm, out, grads, name, site, sae, batch, freeze, seed):
    ids, targets, weights = batch
    g_f, g_e = grads[name]
    node = out.nodes[name]
    gen = torch.Generator().manual_seed(seed)
    u_f = torch.randn(node.latents.shape, generator=gen, dtype=torch.float64)
    u_e = torch.randn(node.errors.shape, generator=gen, dtype=torch.float64)
    u_f, u_e = u_f / u_f.norm(), u_e / u_e.norm()  # unit directions: the truncation error stays ~H²
    f = node.latents.detach()
    checks = [(u_f, g_f, lambda h: sae.decode(f + h * u_f) - sae.decode(f)),
              (u_e, g_e, lambda h: h * u_e)]
    active = int((f[0, 3] > 0).nonzero()[0])
    for i in (active, int((f[0, 3] == 0).nonzero()[0])):  # one active and one silent latent, alone
        u = torch.zeros_like(f)
        u[0, 3, i] = 1.0
        checks.append((u, g_f, lambda h, u=u: sae.decode(f + h * u) - sae.decode(f)))
    for u, g, delta in checks:
        analytic = float((g * u).sum())
        numeric = _perturbed(lm, ids, targets, weights, freeze, site, delta)
        assert abs(analytic - numeric) <= RTOL * (abs(numeric) + 1.0), (name, freeze, analytic, numeric)
    assert g_f.abs().sum() > 0 and g_e.abs().sum() > 0


# ------------------------------------------------------------------------------------------------- tests
def _fd_cases():
    """Every variant unfrozen and fully frozen; single freeze points on Llama, the rest of the grid marked slow."""
    for variant in VARIANTS:
        for freeze in FREEZES:
            quick = len(freeze) != 1 or variant == "llama"
            yield pytest.param(variant, freeze, id=f"{variant}-{'+'.join(freeze) or 'none'}",
                               marks=() if quick else pytest.mark.slow)


@pytest.mark.parametrize("variant, freeze", _fd_cases())
def test_gradients_match_finite_differences_at_two_sites(f64, variant, freeze):
    """∂m/∂f and ∂m/∂e at an upstream and a downstream site; the upstream ones include every path through the
    downstream splice (the reference perturbs the upstream site and lets the rest of the model run)."""
    lm = f64(variant)
    up, down = "layers.0.mlp_out", "layers.1.resid_post"
    saes = {up: _sae(seed=1), down: _sae(seed=2)}
    batch = _batch(lm, seed=3)
    out = lm.spliced_forward(batch[0], saes, freeze=freeze)
    grads = out.gradients(_metric(out.logits, *batch[1:]))
    for i, (site, sae) in enumerate(saes.items()):
        _check_node(lm, out, grads, site, site, sae, batch, freeze, seed=10 + i)
    single = lm.spliced_forward(batch[0], {up: saes[up]}, freeze=freeze)
    g_single = single.gradients(_metric(single.logits, *batch[1:]))[up]
    torch.testing.assert_close(g_single[0], grads[up][0], rtol=1e-10, atol=1e-12)  # splicing downstream is exact


@pytest.mark.parametrize("freeze", [(), ("attention", "norm")], ids=["none", "attention+norm"])
def test_gradients_at_an_attention_output_and_the_first_residual(f64, freeze):
    lm = f64("gemma2")  # attn_out is the output of a norm in Gemma 2: the frozen norm comes first
    saes = {"layers.0.resid_pre": _sae(seed=4), "layers.2.attn_out": _sae(seed=5)}
    batch = _batch(lm, seed=6)
    out = lm.spliced_forward(batch[0], saes, freeze=freeze)
    grads = out.gradients(_metric(out.logits, *batch[1:]))
    for i, (site, sae) in enumerate(saes.items()):
        _check_node(lm, out, grads, site, site, sae, batch, freeze, seed=20 + i)


def test_freezing_changes_gradients_not_values(f64):
    lm = f64("llama")
    saes = {"layers.0.resid_post": _sae(seed=7)}
    batch = _batch(lm, seed=8)
    results = {f: lm.spliced_forward(batch[0], saes, freeze=f) for f in FREEZES}
    grads = {f: r.gradients(_metric(r.logits, *batch[1:]))["layers.0.resid_post"][0] for f, r in results.items()}
    for f in FREEZES[1:]:
        assert torch.equal(results[f].logits, results[()].logits)
        assert (grads[f] - grads[()]).abs().max() > 1e-6 * grads[()].abs().max()


def test_transcoder_reads_one_site_and_writes_another(f64):
    lm = f64("llama")
    reads, writes = "model.layers.1.post_attention_layernorm", "layers.1.mlp_out"
    tc = _sae(seed=9, d_sae=40)
    batch = _batch(lm, seed=10)
    out = lm.spliced_forward(batch[0], {"tc": Splice(tc, reads, writes)}, freeze=("norm",))
    node = out["tc"]
    acts = lm.read(batch[0], [reads, writes])
    with torch.no_grad():
        assert torch.equal(node.latents, tc.encode(acts[reads]))
        assert torch.equal(node.activation, acts[reads])
        torch.testing.assert_close(node.errors, acts[writes] - tc.decode(node.latents), rtol=0, atol=1e-12)
    grads = out.gradients(_metric(out.logits, *batch[1:]))
    _check_node(lm, out, grads, "tc", writes, tc, batch, ("norm",), seed=30)


@pytest.mark.parametrize("family", FAMILIES)
def test_splice_is_exact_in_float32(tiny_model_dirs, family):
    lm = LanguageModel.load(str(tiny_model_dirs[family]), device="cpu")
    saes = {s: _sae(seed=i, dtype=torch.float32) for i, s in
            enumerate(["layers.0.resid_pre", "layers.1.attn_out", "layers.1.mlp_out", "layers.2.resid_post"])}
    ids = _batch(lm, seed=11, t=10)[0]
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding too
    for attention_mask in (None, mask):
        clean = lm.logits(ids, attention_mask=attention_mask)
        for freeze in FREEZES:
            out = lm.spliced_forward(ids, saes, freeze=freeze, attention_mask=attention_mask)
            assert torch.equal(out.logits, clean), (family, freeze)
            assert out.logits.requires_grad
            for site, sae in saes.items():
                node = out[site]
                assert node.latents.shape == (2, 10, 48) and node.errors.shape == (2, 10, 32)
                assert node.latents.is_leaf and node.latents.requires_grad and node.errors.requires_grad
    assert all(p.requires_grad for p in lm.model.parameters())  # given back as they were
    assert lm.model.config._attn_implementation in ("sdpa", "eager")


def test_reading_gradients_after_backward(f64):
    lm = f64("gpt2")
    saes = {"layers.0.resid_post": _sae(seed=12), "layers.2.resid_post": _sae(seed=13)}
    batch = _batch(lm, seed=14)
    out = lm.spliced_forward(batch[0], saes)
    with pytest.raises(SaeforgeError, match="received no gradient"):
        out.grad_of("layers.0.resid_post")  # before backward
    _metric(out.logits, *batch[1:]).backward()
    out.check_reached()
    g_f, g_e = out.grad_of("layers.2.resid_post")
    assert g_f.shape == (2, 7, 48) and g_e.shape == (2, 7, 32)
    assert all(p.grad is None for p in lm.model.parameters())


def test_a_node_off_the_path_to_the_metric_is_named(f64):
    lm = f64("llama")
    saes = {"layers.0.resid_post": _sae(seed=15), "layers.2.resid_post": _sae(seed=16)}
    out = lm.spliced_forward(_batch(lm)[0], saes)
    # a feature-to-feature metric: latent 3 of the downstream SAE as a function of the upstream nodes
    metric = saes["layers.2.resid_post"].encode(out["layers.2.resid_post"].activation)[..., 3].sum()
    with pytest.raises(SaeforgeError, match="node 'layers.2.resid_post' .* is not on the path to the metric"):
        out.gradients(metric, retain_graph=True)
    metric.backward()
    assert out["layers.0.resid_post"].latents.grad is not None
    with pytest.raises(SaeforgeError, match="node 'layers.2.resid_post' .* received no gradient"):
        out.check_reached()


def test_bad_input(f64, tiny_llama):
    lm = f64("llama")
    ids = _batch(lm)[0]
    with pytest.raises(SaeforgeError, match="unknown site 'layers.1.resid'"):
        lm.spliced_forward(ids, {"layers.1.resid": _sae()})
    with pytest.raises(SaeforgeError, match="reads width 16 but site layers.1.resid_post has width 32"):
        lm.spliced_forward(ids, {"layers.1.resid_post": _sae(d=16)})
    with pytest.raises(SaeforgeError, match="writes width 24 but site layers.1.mlp_out has width 32"):
        lm.spliced_forward(ids, {"tc": Splice(_sae(d_out=24), "layers.1.resid_pre", "layers.1.mlp_out")})
    with pytest.raises(SaeforgeError, match="writes site layers.0.resid_pre, which the forward reached before the "
                                            "site it reads"):
        lm.spliced_forward(ids, {"tc": Splice(_sae(), "layers.1.resid_pre", "layers.0.resid_pre")})
    with pytest.raises(SaeforgeError, match="unknown freeze points \\['mlp'\\]"):
        lm.spliced_forward(ids, {"layers.1.resid_post": _sae()}, freeze=("mlp",))
    with pytest.raises(SaeforgeError, match="both write site layers.1.resid_post"):
        lm.spliced_forward(ids, {"layers.1.resid_post": _sae(),
                                 "tc": Splice(_sae(), "layers.0.resid_post", "layers.1.resid_post")})
    with torch.inference_mode(), pytest.raises(SaeforgeError, match="outside torch.inference_mode"):
        lm.spliced_forward(ids, {"layers.1.resid_post": _sae()})
    with pytest.raises(SaeforgeError, match="is not an SAE"):
        lm.spliced_forward(ids, {"layers.1.resid_post": torch.nn.Linear(32, 32)})


@pytest.mark.embedded
@pytest.mark.slow
def test_real_model_splice_is_exact_under_every_freeze(embedded_lm):
    from saeforge.data.prompts import PromptEncoder

    lm = embedded_lm
    batch = PromptEncoder(lm).batch(["To be, or not to be, that is the question", "Now is the winter of"],
                                    padding="left")
    saes = {s: _sae(d=576, d_sae=1152, k=32, seed=i, dtype=torch.float32)
            for i, s in enumerate(["layers.6.resid_post", "layers.15.mlp_out"])}
    clean = lm.logits(batch.input_ids, attention_mask=batch.attention_mask)
    for freeze in FREEZES:
        out = lm.spliced_forward(batch.input_ids, saes, freeze=freeze, attention_mask=batch.attention_mask)
        assert torch.equal(out.logits, clean), freeze
        grads = out.gradients(out.logits[:, -1].log_softmax(-1)[:, 1000].sum())
        for g_f, g_e in grads.values():
            assert torch.isfinite(g_f).all() and torch.isfinite(g_e).all() and g_e.abs().sum() > 0
