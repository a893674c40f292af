"""The evaluation plots: integer L0 bins around the observed range, dead latents written as everywhere else."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saeforge.evals.plots import MAX_L0_BINS, count_share, eval_plots, have_matplotlib, l0_bins


def _bars(edges, values):
    counts, _ = np.histogram(values, bins=edges)
    return counts


def test_a_topk_l0_is_one_bar_centred_on_k_with_room_around_it():
    l0 = np.full(2000, 32)
    edges = l0_bins(l0)
    assert np.all(np.diff(edges) == 1) and np.all(edges % 1 == 0.5)  # one bin per integer, centred on it
    assert edges[0] <= 29.5 and edges[-1] >= 34.5 and len(edges) <= 10  # the range around k, not 0..k
    counts = _bars(edges, l0)
    assert counts.max() == 2000 and (counts > 0).sum() == 1


def test_every_integer_of_a_narrow_range_has_its_own_bar():
    rng = np.random.default_rng(0)
    l0 = rng.integers(20, 33, 5000)  # a BatchTopK / JumpReLU spread
    edges = l0_bins(l0)
    counts = _bars(edges, l0)
    for value in range(20, 33):
        (i,) = np.nonzero((edges[:-1] < value) & (value < edges[1:]))[0]
        assert counts[i] == (l0 == value).sum()
    assert edges[0] >= 0 - 0.5


def test_a_wide_range_gets_integer_groups_and_at_most_max_bins():
    l0 = np.arange(0, 1000)
    edges = l0_bins(l0)
    widths = np.diff(edges)
    assert len(edges) - 1 <= MAX_L0_BINS + 5 and np.all(widths == widths[0]) and widths[0] == int(widths[0]) > 1
    assert edges[0] == -0.5 and _bars(edges, l0).sum() == 1000


def test_dead_latents_read_the_same_everywhere():
    assert count_share(12, 4096) == "12 (0.29 %)" and count_share(0, 10) == "0 (0.0 %)"
    assert count_share(5, 10) == "5 (50.0 %)"


@pytest.mark.skipif(not have_matplotlib(), reason="matplotlib (the plots extra) is not installed")
def test_eval_plots_titles_say_the_count_and_share(tmp_path, monkeypatch):
    import matplotlib.axes

    titles = []
    original = matplotlib.axes.Axes.set

    def record(self, **kw):
        if "title" in kw:
            titles.append(kw["title"])
        return original(self, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "set", record)
    density = torch.cat([torch.zeros(12), torch.rand(4084) * 0.01 + 1e-4])
    written = eval_plots(tmp_path, "sae", density, torch.full((500,), 32), torch.rand(1000) + 0.1)
    assert {p.name for p in written} == {"feature_density.png", "l0_per_token.png", "activation_magnitudes.png"}
    assert any("dead latents: 12 (0.29 %) of 4,096" in t for t in titles)
    assert any("every token 32" in t for t in titles)
