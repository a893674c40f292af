"""The post-hoc baseline and Matryoshka groups read as levels: HSAE's assignment rule on independently trained SAEs."""

from __future__ import annotations

import pytest
import torch

from saeforge.errors import SaeforgeError
from saeforge.hierarchy import link_saes, matryoshka_tree
from saeforge.saes.hsae import assign_by_score, assign_parents

from .helpers import activations, random_jumprelu, random_matryoshka, saved


def test_each_latent_takes_the_most_similar_latent_of_the_narrower_sae(tmp_path):
    small, big = random_jumprelu(6, 0), random_jumprelu(20, 1)
    a, b = saved(small, tmp_path / "a"), saved(big, tmp_path / "b")
    for rule, vec in (("encoder", lambda s: s.W_enc.T), ("decoder", lambda s: s.W_dec)):
        tree = link_saes([a, b], similarity=rule, unassigned_fraction=0.25)
        expected, best = assign_parents(vec(big).detach(), vec(small).detach(), 0.25)
        assert tree.parents[0].tolist() == expected.tolist()
        assert tree.similarity[0] == pytest.approx(best.numpy(), abs=1e-6)
        assert tree.info["similarity"] == rule and tree.kind == "posthoc"


def test_coactivation_links_each_latent_to_the_one_it_fires_with_most(tmp_path):
    small, big = random_jumprelu(6, 0), random_jumprelu(20, 1)
    a, b = saved(small, tmp_path / "a"), saved(big, tmp_path / "b")
    x = activations(3000)
    tree = link_saes([a, b], similarity="coactivation", unassigned_fraction=0.25,
                     activations=[x[i:i + 1000] for i in range(0, 3000, 1000)])
    with torch.no_grad():
        fa, fb = (small.encode(x) > 0).double(), (big.encode(x) > 0).double()
    p_parent = (fb.T @ fa) / fb.sum(0)[:, None].clamp_min(1)
    expected, best = assign_by_score(p_parent, 0.25)
    assert tree.parents[0].tolist() == expected.tolist() and tree.info["similarity"] == "coactivation"
    assert tree.similarity[0] == pytest.approx(best.numpy(), abs=1e-6)
    with pytest.raises(SaeforgeError, match="needs activations") as err:
        link_saes([a, b], similarity="coactivation")
    assert "activations=" in err.value.fix
    with pytest.raises(SaeforgeError, match="no activations"):
        link_saes([a, b], similarity="coactivation", activations=[])


def test_three_levels(tmp_path):
    folders = [saved(random_jumprelu(w, i), tmp_path / str(w)) for i, w in enumerate((4, 9, 30))]
    tree = link_saes(folders, unassigned_fraction=0.0)
    assert tree.widths == [4, 9, 30] and all((p >= 0).all() for p in tree.parents)


@pytest.mark.parametrize("widths, message", [((20, 6), "must grow"), ((6, 6), "must grow")])
def test_widths_that_do_not_grow_are_refused(tmp_path, widths, message):
    folders = [saved(random_jumprelu(w, i), tmp_path / f"s{i}") for i, w in enumerate(widths)]
    with pytest.raises(SaeforgeError, match=message) as err:
        link_saes(folders)
    assert "narrowest first" in err.value.fix


def test_saes_of_other_sites_or_widths_are_refused(tmp_path):
    a = saved(random_jumprelu(6, 0), tmp_path / "a")
    b = saved(random_jumprelu(20, 1), tmp_path / "b", site="layers.2.resid_post")
    with pytest.raises(SaeforgeError, match="different sites or models"):
        link_saes([a, b])
    c = saved(random_jumprelu(20, 1, d_in=5), tmp_path / "c")
    with pytest.raises(SaeforgeError, match="different widths"):
        link_saes([a, c])
    with pytest.raises(SaeforgeError, match="at least two"):
        link_saes([a])
    with pytest.raises(SaeforgeError, match="not an SAE folder"):
        link_saes([a, tmp_path])
    with pytest.raises(SaeforgeError, match="unknown similarity"):
        link_saes([a, saved(random_jumprelu(20, 1), tmp_path / "d")], similarity="cosine")


def test_matryoshka_groups_as_levels(tmp_path):
    sae = random_matryoshka((4, 12, 16))
    folder = saved(sae, tmp_path / "m")
    tree = matryoshka_tree(folder, tree_folder=tmp_path)
    assert tree.kind == "matryoshka" and tree.widths == [4, 12, 16]
    assert [lv.latents for lv in tree.levels] == [(0, 4), (4, 16), (16, 32)]
    expected, _ = assign_parents(sae.W_enc[:, 16:].T.detach(), sae.W_enc[:, 4:16].T.detach(), 0.2)
    assert tree.parents[1].tolist() == expected.tolist()
    two = matryoshka_tree(folder, boundaries=(16,))
    assert two.widths == [16, 16]
    with pytest.raises(SaeforgeError, match="must grow and end"):
        matryoshka_tree(folder, boundaries=(20, 10))
    plain = saved(random_jumprelu(20, 0), tmp_path / "plain")
    with pytest.raises(SaeforgeError, match="no latent groups"):
        matryoshka_tree(plain)
    levels = two.load_levels()
    assert levels[0][0] is levels[1][0]  # one SAE, loaded once
    torch.testing.assert_close(levels[0][0].W_dec, sae.W_dec)
