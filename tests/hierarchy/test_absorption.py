"""First-letter absorption and splitting on constructed data with a known answer, and the probe fitting."""

from __future__ import annotations

import string

import numpy as np
import pytest
import torch

from saeforge.errors import SaeforgeError
from saeforge.hierarchy.absorption import FirstLetterData, absorption_scores, fit_logistic, letter_words
from saeforge.saes import JumpReLUConfig, make_sae

D, LETTERS, PER = 64, 4, 200


def _data(seed=0):
    """Residuals = the letter's direction + noise; one in 25 words of letter a is "special"."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.linalg.qr(torch.randn(D, D, generator=g))[0][:, :LETTERS + 1].T  # orthonormal
    labels = np.repeat(np.arange(LETTERS), PER)
    x = 3 * dirs[torch.as_tensor(labels)] + 0.3 * torch.randn(len(labels), D, generator=g)
    special = (labels == 0) & (np.arange(len(labels)) % 25 == 0)  # too few to raise the F1 by the split step
    x[torch.as_tensor(special)] += 3 * dirs[LETTERS]  # the special words also carry their own direction
    train = np.random.default_rng(seed).random(len(labels)) < 0.8
    words = [string.ascii_lowercase[lab] + "x" for lab in labels]
    return FirstLetterData(words, labels, x, train), dirs, special


def _sae(dirs, absorbing: bool):
    """One latent per letter reading its direction; with ``absorbing``, the special words fire a latent that points
    along letter a's direction plus their own, and silence the letter-a latent."""
    n = LETTERS + 1
    sae = make_sae(JumpReLUConfig(d_in=D, d_sae=n, threshold_init=1.0))
    with torch.no_grad():
        enc = dirs[:LETTERS].clone()
        dec = dirs[:LETTERS].clone()
        extra_enc = dirs[LETTERS].clone()
        extra_dec = dirs[LETTERS].clone()
        if absorbing:
            enc[0] = dirs[0] - 2 * dirs[LETTERS]  # letter a's latent stays off on the special words
            extra_dec = (dirs[0] + dirs[LETTERS]) / 2 ** 0.5
        sae.W_enc.copy_(torch.cat([enc, extra_enc[None]]).T)
        sae.W_dec.copy_(torch.cat([dec, extra_dec[None]]))
        sae.b_enc.zero_()
    return sae


def test_logistic_probe_separates_separable_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 5, generator=g)
    y = x[:, 0] + 0.5 * x[:, 1] > 0.2
    w, b = fit_logistic(x, y)
    assert bool(((x.double() @ w + b > 0) == y).float().mean() > 0.98)


def test_a_clean_sae_has_no_absorption_and_one_latent_per_letter():
    data, dirs, _ = _data()
    out = absorption_scores(data, _sae(dirs, absorbing=False))
    assert out["letters"] == LETTERS and out["mean_absorption"] == 0.0 and out["mean_full_absorption"] == 0.0
    assert out["mean_split"] == 1.0
    assert out["per_letter"]["a"]["main_latents"] == [0]


def test_an_absorbing_latent_is_found_on_the_words_it_takes():
    data, dirs, special = _data()
    out = absorption_scores(data, _sae(dirs, absorbing=True))
    a = out["per_letter"]["a"]
    # the main latent misses the special words and the extra latent carries their letter
    test_share = float(special[~data.train].sum() / ((data.labels == 0) & ~data.train).sum())
    assert test_share > 0 and a["absorption"] == pytest.approx(test_share, rel=0.1)
    assert a["full_absorption"] == pytest.approx(test_share, rel=0.1) and a["split"] == 1
    assert out["per_letter"]["b"]["absorption"] == 0.0


def test_tiny_vocabularies_are_refused(tiny_tokenizer):
    with pytest.raises(SaeforgeError, match="single-token words"):
        letter_words(tiny_tokenizer)
