"""A tree's parent → child pairs in the feature store's links table (saeforge.hierarchy.links, `saeforge hierarchy
store-links`)."""

from __future__ import annotations

import pytest

from saeforge.cli import main
from saeforge.errors import SaeforgeError
from saeforge.features.store import FeatureStore
from saeforge.hierarchy import FeatureTree, link_saes
from saeforge.hierarchy.links import TREE_LINK_KIND, write_tree_links

from .helpers import random_hsae, random_jumprelu, saved


def _store(path, saes: dict[str, tuple]) -> FeatureStore:
    store = FeatureStore(path, create=True)
    for name, (folder, d_sae) in saes.items():
        store.add_sae(name, "layers.1.resid_post", d_sae, "jumprelu", str(folder))
    store.commit()
    return store


def test_hsae_tree_links_use_whole_sae_indices_and_replace_older_ones(tmp_path):
    hsae = random_hsae((6, 20))
    folder = saved(hsae, tmp_path / "hsae")
    tree = FeatureTree.load(folder)
    with _store(tmp_path / "features.sqlite", {"hsae": (folder, 26)}) as store:
        n = write_tree_links(tree, store)
        parents, children = tree.pairs(0)
        assert n == len(children) > 0
        for p, c in zip(parents, children):
            up = store.predecessors("hsae", 6 + int(c), kind=TREE_LINK_KIND)
            assert [(x["src_sae"], x["src_idx"]) for x in up] == [("hsae", int(p))]
            assert up[0]["weight"] == pytest.approx(float(tree.similarity[0][c]), abs=1e-6)
            assert up[0]["data"] == {"tree": "hsae", "level": 0}
        p = int(parents[0])
        down = store.successors("hsae", p, kind=TREE_LINK_KIND)
        assert sorted(x["dst_idx"] for x in down) == sorted(6 + int(c) for c in tree.children(0, p))
        unassigned = [c for c in range(20) if tree.parent(1, c) < 0]
        assert unassigned and not store.predecessors("hsae", 6 + unassigned[0], kind=TREE_LINK_KIND)
        # a rebuilt tree (here: every child under latent 0) replaces the old links instead of adding to them
        tree.parents[0][:] = 0
        assert write_tree_links(tree, store) == 20
        assert len(store.links_between(TREE_LINK_KIND, "hsae", "hsae")) == 20


def test_posthoc_tree_links_between_two_saes_via_the_cli(tmp_path, capsys):
    a = saved(random_jumprelu(5, seed=1), tmp_path / "a")
    b = saved(random_jumprelu(12, seed=2), tmp_path / "b")
    link_saes([a, b], tree_folder=tmp_path).save(tmp_path / "tree.json")
    tree = FeatureTree.load(tmp_path / "tree.json")
    _store(tmp_path / "features.sqlite", {"small": (a, 5), "big": (b, 12)}).close()
    assert main(["hierarchy", "store-links", str(tmp_path / "tree.json"), str(tmp_path / "features.sqlite")]) == 0
    assert f"{tree.n_pairs()} parent → child links" in capsys.readouterr().out
    with FeatureStore(tmp_path / "features.sqlite", readonly=True) as store:
        got = {(x["src_idx"], x["dst_idx"]) for x in store.links_between(TREE_LINK_KIND, "small", "big")}
    assert got == {(int(p), int(c)) for p, c in zip(*tree.pairs(0))}


def test_a_store_without_the_trees_saes_is_refused_before_writing(tmp_path):
    a = saved(random_jumprelu(5, seed=1), tmp_path / "a")
    b = saved(random_jumprelu(12, seed=2), tmp_path / "b")
    tree = link_saes([a, b], tree_folder=tmp_path)
    with _store(tmp_path / "features.sqlite", {"small": (a, 5)}) as store:
        with pytest.raises(SaeforgeError, match="no SAE for level 1") as err:
            write_tree_links(tree, store)
        assert "saeforge harvest" in err.value.fix
        assert store.link_summary() == []
    with _store(tmp_path / "narrow.sqlite", {"small": (a, 5), "big": (b, 8)}) as store:
        with pytest.raises(SaeforgeError, match="has 8"):
            write_tree_links(tree, store)
        assert store.link_summary() == []
