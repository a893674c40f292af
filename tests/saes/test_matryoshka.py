"""Matryoshka BatchTopK: nested prefix losses over one shared BatchTopK code."""

from __future__ import annotations

import pytest
import torch

from saeforge.errors import SaeforgeError
from saeforge.saes import MatryoshkaConfig, TrainState

from .helpers import D_IN, D_SAE, batch, build, num


def dense_code(sae, x):
    pre = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    kept = pre >= pre.flatten().topk(x.shape[0] * sae.cfg.k).values.min()
    return pre * kept


def test_prefix_losses_match_their_definition():
    sae = build("matryoshka", group_weights=(0.5, 2.0, 1.0))
    x = batch(48)
    out = sae.training_loss(x, state=TrainState())
    f = dense_code(sae, x)
    expected = {}
    for m, w in zip((4, 16, D_SAE), (0.5, 2.0, 1.0)):
        x_hat = f[:, :m] @ sae.W_dec[:m] + sae.b_dec
        expected[m] = w * (x_hat - x).pow(2).sum(1).mean()
    assert torch.allclose(out.terms["mse_prefix_4"], expected[4], rtol=1e-5)
    assert torch.allclose(out.terms["mse_prefix_16"], expected[16], rtol=1e-5)
    assert torch.allclose(out.terms["mse"], expected[D_SAE], rtol=1e-5)
    assert torch.allclose(out.x_hat, f @ sae.W_dec + sae.b_dec, atol=1e-5)
    assert out.l0 == 4.0
    # the three prefixes really give different reconstructions
    assert len({round(num(v), 4) for v in (expected[4] / 0.5, expected[16] / 2.0, expected[D_SAE])}) == 3


def test_a_prefix_loss_trains_only_its_own_latents():
    sae = build("matryoshka")
    out = sae.training_loss(batch(48), state=TrainState())
    out.terms["mse_prefix_16"].backward()
    assert sae.W_dec.grad[:16].abs().sum() > 0
    assert num(sae.W_dec.grad[16:].abs().sum()) == 0
    assert num(sae.W_enc.grad[:, 16:].abs().sum()) == 0


def test_code_is_computed_once_for_all_prefixes():
    # a latent outside the first group can take the batch budget away from the first prefix: the prefix term
    # uses the shared code, not a fresh BatchTopK restricted to its own latents
    sae = build("matryoshka")
    x = batch(48)
    f = dense_code(sae, x)
    restricted = torch.relu((x - sae.b_dec) @ sae.W_enc[:, :4] + sae.b_enc[:4])
    assert int((f[:, :4] > 0).sum()) < int((restricted > 0).sum())


def test_prefix_sizes_and_defaults():
    cfg = MatryoshkaConfig(d_in=D_IN, d_sae=D_SAE, k=4, group_sizes=[8, 8, 16])
    assert cfg.group_sizes == (8, 8, 16) and cfg.prefix_sizes == (8, 16, 32)
    assert cfg.group_weights == (1.0, 1.0, 1.0)
    assert MatryoshkaConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("d_sae, groups", [
    (4608, (288, 288, 576, 1152, 2304)),   # prefixes d/16, d/8, d/4, d/2, d
    (1000, (62, 63, 125, 250, 500)),       # rounded down: prefixes 62, 125, 250, 500, 1000
    (8, (1, 1, 2, 4)),                     # d/16 rounds to 0 and is dropped
    (1, (1,)),
])
def test_default_group_sizes_are_nested_halvings_of_d_sae(d_sae, groups):
    cfg = MatryoshkaConfig(d_in=D_IN, d_sae=d_sae, k=1)
    assert cfg.group_sizes == groups and sum(groups) == d_sae
    assert cfg.to_dict()["group_sizes"] == list(groups)  # the resolved sizes are what is saved


@pytest.mark.parametrize("kwargs, match", [
    ({"group_sizes": (8, 8)}, "sum to 16"),
    ({"group_sizes": (0, 32)}, "positive integers"),
    ({"group_sizes": (16, 16), "group_weights": (1.0,)}, "group_weights"),
    ({"group_sizes": (16, 16), "group_weights": (1.0, -1.0)}, "group_weights"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(SaeforgeError, match=match) as err:
        MatryoshkaConfig(d_in=D_IN, d_sae=D_SAE, k=4, **kwargs)
    assert err.value.fix.startswith("pass --sae-options '{\"group_")  # a command line, not Python


# ---- random prefixes (Nabeshima's variant) ----
def test_random_prefixes_follow_the_truncated_pareto_law():
    from saeforge.saes.matryoshka import sample_prefixes

    g = torch.Generator().manual_seed(0)
    draws = [sample_prefixes(100, 4, min_prefix=5, power=0.5, generator=g) for _ in range(4000)]
    assert all(d[-1] == 100 and len(set(d)) == 4 and d == sorted(d) and d[0] >= 5 for d in draws)
    first = torch.tensor([m for d in draws for m in d[:-1]], dtype=torch.float64)
    # P(m) ∝ sqrt(m) - sqrt(m - 1) decreases: short prefixes are drawn far more often than long ones
    low, high = float((first < 25).double().mean()), float((first >= 75).double().mean())
    w = torch.arange(5, 100, dtype=torch.float64)
    p = (w / 100).sqrt() - ((w - 1) / 100).sqrt()
    p_low, p_high = float(p[w < 25].sum() / p.sum()), float(p[w >= 75].sum() / p.sum())
    assert high < low
    # without replacement the shares are flattened a little; 12,000 draws: within a few points of the law
    assert abs(low - p_low) < 0.05 and abs(high - p_high) < 0.05


def test_random_prefix_training_loss_sums_the_drawn_prefixes():
    sae = build("matryoshka", prefix_sampling="random", random_prefixes=3, min_prefix=2)
    x = batch(48)
    torch.manual_seed(5)
    out = sae.training_loss(x, state=TrainState())
    assert set(out.terms) == {"mse", "mse_random_prefixes", "auxk"}
    from saeforge.saes.matryoshka import sample_prefixes

    torch.manual_seed(5)
    drawn = sample_prefixes(D_SAE, 3, 2, 0.5)
    f = dense_code(sae, x)
    expected = sum((f[:, :m] @ sae.W_dec[:m] + sae.b_dec - x).pow(2).sum(1).mean() for m in drawn[:-1])
    assert torch.allclose(out.terms["mse_random_prefixes"], expected, rtol=1e-5)
    assert torch.allclose(out.terms["mse"], (f @ sae.W_dec + sae.b_dec - x).pow(2).sum(1).mean(), rtol=1e-5)
    # another draw, other prefixes
    values = {round(num(sae.training_loss(x, state=TrainState()).terms["mse_random_prefixes"]), 3) for _ in range(6)}
    assert len(values) > 1


@pytest.mark.parametrize("kw, message", [({"prefix_sampling": "sometimes"}, "unknown prefix_sampling"),
                                         ({"prefix_sampling": "random", "random_prefixes": 0}, "random_prefixes"),
                                         ({"prefix_sampling": "random", "min_prefix": D_SAE}, "min_prefix"),
                                         ({"prefix_sampling": "random", "pareto_power": 0}, "pareto_power")])
def test_bad_random_prefix_settings(kw, message):
    with pytest.raises(SaeforgeError, match=message) as err:
        MatryoshkaConfig(d_in=D_IN, d_sae=D_SAE, k=4, **kw)
    assert "--sae-options" in err.value.fix
