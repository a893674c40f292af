"""Dictionaries evaluated as replacements (one path for every kind: ``evaluate_dictionaries``, which ``saeforge eval``
runs): a perfect replacement gives the clean figures exactly, the replaced forward compounds layer by layer (checked
against swapping the MLP modules themselves), a crosscoder's figures equal plain full forwards, and the baselines are
what they say."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from saeforge.errors import SaeforgeError
from saeforge.evals.evaluate import EvalConfig, evaluate, evaluate_dictionaries
from saeforge.models.language_model import LanguageModel
from saeforge.runs import BoundSAE, SiteBinding
from saeforge.saes import (JumpReLUSkipTranscoderConfig, TopKCLTConfig, TopKConfig, TopKCrosscoderConfig, make_sae,
                           save_sae)

MLP_IN = [f"layers.{i}.mlp_in" for i in range(3)]
MLP_OUT = [f"layers.{i}.mlp_out" for i in range(3)]


def _batches(lm, n_batches=2, batch=3, length=12, seed=0):
    """Random token ids with BOS first; BOS is not kept (not replaced, not scored), as in saeforge eval."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(3, lm.vocab_size, (batch, length), generator=g)
        ids[:, 0] = 0
        keep = torch.ones_like(ids, dtype=torch.bool)
        keep[:, 0] = False
        out.append((ids, keep))
    return out


def _bound(lm, dictionary, reads, writes, name="d"):
    return BoundSAE(name, dictionary, tuple(lm.site(s) for s in reads), tuple(lm.site(s) for s in writes))


def _evaluate(lm, dictionary, reads, writes, batches):
    results, _, _ = evaluate_dictionaries(lm, {"d": _bound(lm, dictionary, reads, writes)}, lambda: batches)
    return results["d"]


def _mlp(lm, layer):
    """The MLP as a function, through ``forward`` so that the edit hooks on the module do not fire."""
    block = lm.model.get_submodule(f"{lm.family.layers}.{layer}")
    if lm.model_type == "gemma2":
        return lambda x: block.post_feedforward_layernorm.forward(block.mlp.forward(x))
    return block.mlp.forward


class PerfectTranscoder:
    """Exactly the MLP it replaces: latents = the MLP's input, output = the MLP of it."""

    def __init__(self, lm, layer):
        self.mlp = _mlp(lm, layer)
        self.cfg = SimpleNamespace(d_sae=lm.d_model, architecture="perfect_transcoder")

    def encode(self, x):
        return x

    def __call__(self, x):
        return self.mlp(x)


class PerfectCLT:
    """A cross-layer transcoder that is exactly the MLPs of layers 0..L-1 (no cross-layer terms)."""

    def __init__(self, lm, layers):
        self.mlps = [_mlp(lm, i) for i in layers]
        self.cfg = SimpleNamespace(d_sae=len(layers) * lm.d_model, skip_connection=False, architecture="perfect_clt")

    def encode_layer(self, i, x):
        return x

    def decode_layer(self, j, latents):
        return self.mlps[j](latents[j])


def _assert_clean(result, sites):
    assert result["ce_loss_sae"] == pytest.approx(result["ce_loss_clean"], abs=1e-6)
    assert abs(result["kl_div"]) < 1e-6 and abs(result["delta_lm_loss"]) < 1e-6
    assert result["fvu"] < 1e-10
    for s in sites if len(sites) > 1 else ():
        assert result["sites"][s]["fvu"] < 1e-10
    assert result["ce_recovered"] == pytest.approx(1.0, abs=1e-5)


def _plain_figures(lm, ids, keep, edits):
    """CE loss and KL of one full forward with ``edits`` against the clean model, by the plain formulas."""
    clean = lm.logits(ids)
    with lm.edit(edits):
        edited = lm.logits(ids)
    pos = keep.clone()
    pos[:, -1] = False
    pos = pos[:, :-1]
    logp, logq = F.log_softmax(clean[:, :-1].float(), -1), F.log_softmax(edited[:, :-1].float(), -1)
    ce = float(-logq.gather(-1, ids[:, 1:, None]).squeeze(-1)[pos].double().mean())
    kl = float((logp.exp() * (logp - logq)).sum(-1)[pos].double().mean())
    return ce, kl


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2", "gpt_neox"])
def test_a_perfect_transcoder_gives_the_clean_figures(tiny_model_dirs, family):
    lm = LanguageModel.load(str(tiny_model_dirs[family]), device="cpu")
    result = _evaluate(lm, PerfectTranscoder(lm, 1), ["layers.1.mlp_in"], ["layers.1.mlp_out"], _batches(lm))
    assert result["kind"] == "transcoder" and result["writes"] == "layers.1.mlp_out"
    _assert_clean(result, ["layers.1.mlp_out"])
    assert result["ce_loss_zero_ablation"] != pytest.approx(result["ce_loss_clean"], abs=1e-4)


def test_a_perfect_clt_gives_the_clean_figures(tiny_llama):
    result = _evaluate(tiny_llama, PerfectCLT(tiny_llama, range(3)), MLP_IN, MLP_OUT, _batches(tiny_llama))
    assert result["kind"] == "clt"
    assert (result["reads"], result["writes"]) == ("layers.0-2.mlp_in", "layers.0-2.mlp_out")
    assert set(result["sites"]) == set(MLP_OUT)
    _assert_clean(result, MLP_OUT)


@pytest.fixture(scope="module")
def linear_gpt2_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny GPT-2 whose MLPs are affine maps (activation "linear"), which real dictionaries can match exactly."""
    import transformers as tf

    folder = tmp_path_factory.mktemp("linear_gpt2")
    torch.manual_seed(0)
    cfg = tf.GPT2Config(n_embd=32, n_layer=3, n_head=4, n_positions=256, vocab_size=len(tiny_tokenizer),
                        bos_token_id=0, eos_token_id=1, pad_token_id=2, activation_function="linear")
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def linear_gpt2(linear_gpt2_dir):
    return LanguageModel.load(str(linear_gpt2_dir), device="cpu")


def _affine(lm, layer):
    """(M, c) with mlp(x) = x M + c for the linear GPT-2 (Conv1D weights are [in, out])."""
    mlp = lm.model.transformer.h[layer].mlp
    w_fc, b_fc, w_proj, b_proj = (t.detach().double() for t in (mlp.c_fc.weight, mlp.c_fc.bias,
                                                                   mlp.c_proj.weight, mlp.c_proj.bias))
    return (w_fc @ w_proj).float(), (b_fc @ w_proj + b_proj).float()


def test_an_exact_skip_transcoder_gives_the_clean_figures(linear_gpt2):
    lm = linear_gpt2
    sae = make_sae(JumpReLUSkipTranscoderConfig(d_in=32, d_sae=16, d_out=32))
    m, c = _affine(lm, 1)
    with torch.no_grad():
        sae.W_skip.copy_(m.T)
        sae.b_dec.copy_(c)
        sae.log_threshold.fill_(30.0)  # no latent ever fires: the skip connection is the whole map
    result = _evaluate(lm, sae, ["layers.1.mlp_in"], ["layers.1.mlp_out"], _batches(lm))
    assert result["ce_loss_sae"] == pytest.approx(result["ce_loss_clean"], abs=1e-5)
    # float32 reassociation (x (W_fc W_proj) against (x W_fc) W_proj) is all that differs
    assert result["kl_div"] < 1e-7 and result["fvu"] < 1e-9 and result["l0"] == 0


def _exact_clt(lm, d=32):
    """TopK with k = d over the features [x, -x] keeps exactly the positive parts, so f[:d] - f[d:] = x; decoders
    [M; -M] then give x M, and b_dec the affine part: every MLP of the linear GPT-2, exactly."""
    sae = make_sae(TopKCLTConfig(d_in=3 * d, d_sae=3 * 2 * d, d_out=3 * d, n_layers=3, k=d))
    with torch.no_grad():
        for i in range(3):
            m, c = _affine(lm, i)
            sae.W_enc[i].copy_(torch.cat([torch.eye(d), -torch.eye(d)], 1))
            sae.b_enc[i].zero_()
            sae.W_dec[i].zero_()
            sae.W_dec[i][:, 0].copy_(torch.cat([m, -m], 0))
            sae.b_dec[i].copy_(c)
    return sae


def test_an_exact_topk_clt_gives_the_clean_figures(linear_gpt2):
    lm = linear_gpt2
    result = _evaluate(lm, _exact_clt(lm), MLP_IN, MLP_OUT, _batches(lm))
    assert result["ce_loss_sae"] == pytest.approx(result["ce_loss_clean"], abs=1e-5)
    assert result["kl_div"] < 1e-7 and result["fvu"] < 1e-9
    assert result["l0"] == pytest.approx(3 * 32, abs=0.01)  # every layer's 32 latents
    for s in MLP_OUT:
        assert result["sites"][s]["fvu"] < 1e-9 and result["sites"][s]["l0"] == pytest.approx(32, abs=0.01)


def test_saeforge_eval_of_a_saved_exact_clt(linear_gpt2_dir, linear_gpt2, text_file, tmp_path):
    """End to end: a CLT saved as saeforge trains it, then `saeforge eval`: the clean figures, every written site
    named with its own FVU, the zero ablation of all three MLPs far from clean."""
    folder = tmp_path / "clt"
    save_sae(_exact_clt(linear_gpt2), folder,
             metadata={**SiteBinding(tuple(MLP_IN), tuple(MLP_OUT)).to_metadata(), "model_name": str(linear_gpt2_dir),
                       "context_size": 32, "dataset_path": "train.txt"})
    report = evaluate(EvalConfig(path=str(folder), corpus=str(text_file), tokens=32 * 8, batch_size=4, device="cpu",
                                 progress=False, plots=False))
    m = report["saes"]["clt"]
    assert m["kind"] == "clt" and m["architecture"] == "topk_clt" and set(m["sites"]) == set(MLP_OUT)
    assert m["ce_loss_sae"] == pytest.approx(m["ce_loss_clean"], abs=1e-5) and m["kl_div"] < 1e-6
    assert m["kl_div_zero_ablation"] > 1e-3  # (this random model barely needs its MLPs for its CE loss)
    assert all(site["fvu"] < 1e-8 for site in m["sites"].values())
    from saeforge.evals.evaluate import format_table

    row = format_table(report).splitlines()[1].split()
    assert row[:3] == ["clt", "layers.0-2.mlp_in", "layers.0-2.mlp_out"]


def _random_clt(seed=0):
    torch.manual_seed(seed)
    sae = make_sae(TopKCLTConfig(d_in=3 * 32, d_sae=3 * 48, d_out=3 * 32, n_layers=3, k=6, skip_connection=True))
    with torch.no_grad():
        sae.W_skip.copy_(0.1 * torch.randn(sae.W_skip.shape))
        for w in sae.W_dec:
            w.mul_(0.3)
    return sae


def test_the_replaced_forward_compounds_like_swapped_mlps(tiny_llama):
    """A random CLT: the figures equal those of the model with its MLP modules swapped for the CLT, each layer
    encoding the input the replaced model gives it (an implementation that shares no code with the edits)."""
    lm = tiny_llama
    sae = _random_clt()
    batches = _batches(lm, n_batches=1)
    result = _evaluate(lm, sae, MLP_IN, MLP_OUT, batches)

    ids, keep = batches[0]
    clean = lm.logits(ids)
    blocks = [lm.model.model.layers[i] for i in range(3)]
    originals = [b.mlp for b in blocks]
    latents = {}

    class Swapped(torch.nn.Module):
        def __init__(self, j, original):
            super().__init__()
            self.j, self.original = j, original

        def forward(self, x):
            out = self.original(x).clone()
            latents[self.j] = sae.encode_layer(self.j, x[keep])
            new = sae.decode_layer(self.j, [latents[i] for i in range(self.j + 1)]) + sae.skip_layer(self.j, x[keep])
            out[keep] = new
            return out

    try:
        for j, b in enumerate(blocks):
            b.mlp = Swapped(j, originals[j])
        with torch.no_grad():
            swapped = lm.model(input_ids=ids).logits
    finally:
        for b, original in zip(blocks, originals):
            b.mlp = original
    pos = keep.clone()
    pos[:, -1] = False
    pos = pos[:, :-1]
    targets = ids[:, 1:]
    logp, logq = F.log_softmax(clean[:, :-1].float(), -1), F.log_softmax(swapped[:, :-1].float(), -1)
    ce = float(-logq.gather(-1, targets[..., None]).squeeze(-1)[pos].double().mean())
    kl = float((logp.exp() * (logp - logq)).sum(-1)[pos].double().mean())
    assert result["ce_loss_sae"] == pytest.approx(ce, rel=1e-5)
    assert result["kl_div"] == pytest.approx(kl, rel=1e-4)
    assert kl > 1e-3  # an imperfect replacement: the comparison has teeth
    # the per-site FVUs are those of the CLT on the clean reads, not on the replaced model's
    with lm.record(MLP_IN + MLP_OUT) as acts, torch.no_grad():
        lm.logits(ids)
        xs = [acts[s][keep] for s in MLP_IN]
        fs = [sae.encode_layer(i, x) for i, x in enumerate(xs)]
        y2 = acts[MLP_OUT[2]][keep].double()
        y2_hat = (sae.decode_layer(2, fs) + sae.skip_layer(2, xs[2])).double()
    fvu = float((y2 - y2_hat).pow(2).sum() / (y2 - y2.mean(0)).pow(2).sum())
    assert result["sites"][MLP_OUT[2]]["fvu"] == pytest.approx(fvu, rel=1e-6)


def test_baselines_ablate_every_written_site_together(tiny_llama):
    lm = tiny_llama
    batches = _batches(lm, n_batches=1)
    ids, keep = batches[0]
    result = _evaluate(lm, PerfectCLT(lm, range(3)), MLP_IN, MLP_OUT, batches)

    def zero(x):
        out = x.clone()
        out[keep] = 0
        return out

    ce, kl = _plain_figures(lm, ids, keep, {s: zero for s in MLP_OUT})
    assert result["ce_loss_zero_ablation"] == pytest.approx(ce, rel=1e-6)
    assert result["kl_div_zero_ablation"] == pytest.approx(kl, rel=1e-5)
    assert result["ce_loss_mean_ablation"] != result["ce_loss_zero_ablation"]


def test_a_crosscoder_is_spliced_from_its_clean_encoding(tiny_llama):
    lm = tiny_llama
    sites = ["layers.1.resid_post", "layers.2.resid_post"]

    class Identity:
        cfg = SimpleNamespace(d_sae=64, architecture="identity")

        def encode(self, x):
            return x

        def __call__(self, x):
            return x

    perfect = _evaluate(lm, Identity(), sites, sites, _batches(lm))
    assert perfect["kind"] == "crosscoder"
    _assert_clean(perfect, sites)
    assert set(perfect["per_site"]) == set(sites)

    # a random crosscoder: every figure equals plain full forwards with its clean outputs spliced in
    torch.manual_seed(0)
    sae = make_sae(TopKCrosscoderConfig(d_in=64, d_sae=64, n_sites=2, k=8))
    batches = _batches(lm, n_batches=1)
    real = _evaluate(lm, sae, sites, sites, batches)
    ids, keep = batches[0]
    with lm.record(sites) as acts:
        lm.logits(ids)
    out = sae(torch.cat([acts[s][keep] for s in sites], -1))
    outs = dict(zip(sites, out.split(32, -1)))

    def put(site):
        def edit(x):
            y = x.clone()
            y[keep] = outs[site]
            return y

        return edit

    ce, kl = _plain_figures(lm, ids, keep, {s: put(s) for s in sites})
    assert real["ce_loss_sae"] == pytest.approx(ce, rel=1e-5) and real["kl_div"] == pytest.approx(kl, rel=1e-4)
    ce1, kl1 = _plain_figures(lm, ids, keep, {sites[0]: put(sites[0])})
    assert real["per_site"][sites[0]]["kl_div"] == pytest.approx(kl1, rel=1e-4)
    assert real["per_site"][sites[0]]["ce_loss_sae"] == pytest.approx(ce1, rel=1e-5)
    assert kl > 1e-3 and kl != pytest.approx(kl1, rel=1e-3)
    assert real["l0"] == pytest.approx(8, abs=0.01)


def test_every_kind_together_gives_the_figures_of_each_alone(tiny_llama):
    """An SAE, a transcoder, a CLT and a crosscoder evaluated together (one clean forward per batch, the others
    starting at blocks 0 to 3) give exactly what each gives alone."""
    lm = tiny_llama
    torch.manual_seed(1)
    saes = {
        "sae": _bound(lm, make_sae(TopKConfig(d_in=32, d_sae=64, k=4)), ["layers.2.resid_post"],
                      ["layers.2.resid_post"], "sae"),
        "tc": _bound(lm, make_sae(TopKConfig(d_in=32, d_sae=64, k=4, apply_b_dec_to_input=False)),
                     ["layers.0.resid_post"], ["layers.2.mlp_out"], "tc"),
        "clt": _bound(lm, _random_clt(2), MLP_IN, MLP_OUT, "clt"),
        "xc": _bound(lm, make_sae(TopKCrosscoderConfig(d_in=64, d_sae=64, n_sites=2, k=8)),
                     ["layers.1.resid_post", "layers.2.resid_post"], ["layers.1.resid_post", "layers.2.resid_post"],
                     "xc"),
    }
    batches = _batches(lm, n_batches=2)
    together, _, positions = evaluate_dictionaries(lm, saes, lambda: batches)
    assert positions == 2 * 3 * 12
    for name, bound in saes.items():
        alone, _, _ = evaluate_dictionaries(lm, {name: bound}, lambda: batches)
        assert together[name] == alone[name], name  # bit for bit: the suffix forwards equal full ones
    assert together["clt"]["kl_div"] > 0 and together["xc"]["kl_div"] > 0


def test_wrong_bindings_are_refused(tiny_llama):
    lm = tiny_llama
    with pytest.raises(SaeforgeError, match="computes before"):
        _evaluate(lm, PerfectTranscoder(lm, 1), ["layers.1.mlp_out"], ["layers.1.mlp_in"], _batches(lm))
    with pytest.raises(SaeforgeError, match="one site per layer and writes one per layer"):
        _evaluate(lm, PerfectCLT(lm, range(3)), MLP_IN, MLP_OUT[:2], _batches(lm))
    with pytest.raises(SaeforgeError, match="out of order"):
        _evaluate(lm, PerfectCLT(lm, range(3)), MLP_IN[::-1], MLP_OUT[::-1], _batches(lm))
