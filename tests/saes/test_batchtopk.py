"""BatchTopK: mean L0 exactly k in training, the learned global threshold, and its use at inference."""

from __future__ import annotations

import pytest
import torch

from saeforge.errors import SaeforgeError
from saeforge.saes import BatchTopKConfig, TrainState, make_sae

from .helpers import D_IN, D_SAE, batch, num


def fresh(**kw):
    torch.manual_seed(0)
    return make_sae(BatchTopKConfig(d_in=D_IN, d_sae=D_SAE, **{"k": 4, "threshold_start_step": 0, **kw}))


def test_training_l0_is_exactly_k_on_average_but_varies_per_token():
    sae = fresh(k=5)
    x = batch(64) * torch.linspace(0.2, 3.0, 64)[:, None]  # tokens of very different norms
    out = sae.training_loss(x, state=TrainState())
    assert out.l0 == 5.0
    # recover the per-token counts from the reconstruction's codes
    pre = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    kept = pre >= pre.flatten().topk(64 * 5).values.min()
    counts = kept.sum(1)
    assert int(counts.sum()) == 64 * 5
    assert int(counts.min()) < 5 < int(counts.max())
    assert torch.allclose(out.x_hat, (pre * kept) @ sae.W_dec + sae.b_dec, atol=1e-5)


def test_threshold_is_learned_as_ema_of_the_smallest_selected_activation():
    sae = fresh(threshold_beta=0.9, threshold_start_step=10)
    assert num(sae.threshold) == -1.0 and not sae.threshold_learned
    x1, x2 = batch(32, seed=1), batch(32, seed=2)

    def smallest_selected(x):
        pre = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc).detach()
        return num(pre.flatten().topk(32 * 4).values.min())

    sae.training_loss(x1, state=TrainState(step=9))  # before threshold_start_step: untouched
    assert num(sae.threshold) == -1.0
    m1 = smallest_selected(x1)
    sae.training_loss(x1, state=TrainState(step=10))  # first update sets it directly
    assert num(sae.threshold) == pytest.approx(m1, rel=1e-6)
    m2 = smallest_selected(x2)
    sae.training_loss(x2, state=TrainState(step=11))
    assert num(sae.threshold) == pytest.approx(0.9 * m1 + 0.1 * m2, rel=1e-6)
    assert "threshold" in sae.state_dict()


def test_inference_uses_the_global_threshold():
    sae = fresh()
    with torch.no_grad():
        sae.threshold.fill_(0.5)
    x = batch(40)
    pre = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    expected = pre * (pre > 0.5)
    f = sae.encode(x)
    assert torch.equal(f, expected)
    # per-token: a token's code does not depend on the rest of the batch (up to GEMM rounding)
    alone = sae.encode(x[:1])
    assert torch.equal(alone > 0, f[:1] > 0) and torch.allclose(alone, f[:1], atol=1e-6)
    # and it is not the batch selection (which would keep exactly N*k entries)
    assert int((f > 0).sum()) != 40 * 4


def test_before_the_threshold_is_learned_encode_falls_back_to_the_batch_selection():
    sae = fresh()
    f = sae.encode(batch(40))
    assert int((f > 0).sum()) == 40 * 4


def test_threshold_follows_input_scale_folding():
    sae = fresh()
    with torch.no_grad():
        sae.threshold.fill_(0.5)
    sae.fold_input_scale(4.0)
    assert num(sae.threshold) == pytest.approx(0.125)


def test_saelens_view_is_jumprelu_with_the_threshold_everywhere():
    sae = fresh()
    with torch.no_grad():
        sae.threshold.fill_(0.25)
    assert sae.saelens_architecture() == "jumprelu"
    tensors = sae.saelens_tensors()
    assert set(tensors) == {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}
    assert torch.equal(tensors["threshold"], torch.full((D_SAE,), 0.25))
    assert set(sae.extra_tensors()) == {"threshold"}  # the scalar buffer, for an exact saeforge reload
    assert "k" not in sae.saelens_config_extras()


def test_unlearned_threshold_warns_when_saved(tmp_path):
    from saeforge.saes import save_sae

    with pytest.warns(UserWarning, match="not been learned"):
        save_sae(fresh(), tmp_path)


@pytest.mark.parametrize("kwargs, match", [
    ({"threshold_beta": 1.0}, "threshold_beta"),
    ({"threshold_start_step": -1}, "threshold_start_step"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(SaeforgeError, match=match):
        BatchTopKConfig(d_in=D_IN, d_sae=D_SAE, k=4, **kwargs)


def test_a_short_run_learns_its_threshold_over_its_second_half():
    sae = fresh(threshold_start_step=1000)
    x = batch(32, seed=3)
    sae.training_loss(x, state=TrainState(step=9, total_steps=20))  # before the middle of a 20-step run
    assert not sae.threshold_learned
    sae.training_loss(x, state=TrainState(step=10, total_steps=20))
    assert sae.threshold_learned
    long_run = fresh(threshold_start_step=1000)
    long_run.training_loss(x, state=TrainState(step=10, total_steps=5000))  # long runs keep the start step
    assert not long_run.threshold_learned
