"""The tree file: round trip, validation, and the check that a tree matches the SAEs it names."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from saeforge.errors import SaeforgeError
from saeforge.hierarchy.tree import FeatureTree, TreeLevel, decoder_fingerprint

from .helpers import random_jumprelu, saved


def _tree(tmp_path):
    a, b = saved(random_jumprelu(6, 0), tmp_path / "a"), saved(random_jumprelu(20, 1), tmp_path / "b")
    from saeforge.hierarchy import link_saes

    return link_saes([a, b], tree_folder=tmp_path), a, b


def test_round_trip_and_navigation(tmp_path):
    tree, a, b = _tree(tmp_path)
    path = tree.save(tmp_path / "tree.json")
    data = json.loads(path.read_text())
    assert data["format"] == "saeforge-tree" and data["levels"][1]["sae"] == "b"  # relative to the file
    again = FeatureTree.load(path)
    assert again.kind == "posthoc" and again.widths == [6, 20]
    assert np.array_equal(again.parents[0], tree.parents[0])
    assert again.sae_folder(1) == b.resolve()
    parents, children = again.pairs(0)
    assert len(children) == 20 - int(0.2 * 20) and set(parents) <= set(range(6))
    p = int(parents[0])
    assert set(again.children(0, p)) == set(children[parents == p])
    assert again.parent(1, int(children[0])) == int(parents[0]) and again.parent(0, 3) == -1
    s = again.summary()["levels"][0]
    assert s["pairs"] == 16 and s["unassigned"] == 4 and s["parents_with_children"] == len(set(parents.tolist()))
    with pytest.raises(SaeforgeError, match="out of range"):
        again.children(1, 0)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["parents"][0].pop(), "has 20 latents but 19 parents"),
    (lambda d: d["parents"][0].__setitem__(0, 6), "outside level 0"),
    (lambda d: d.__setitem__("parents", []), "need 1 parent lists"),
    (lambda d: d.__setitem__("format", "other"), "not a saeforge tree file"),
    (lambda d: d.__setitem__("version", 99), "version 99"),
    (lambda d: d.__setitem__("kind", "forest"), "unknown kind"),
    (lambda d: d["levels"][0].pop("latents"), "damaged"),
])
def test_damaged_tree_files_are_refused(tmp_path, edit, message):
    tree, *_ = _tree(tmp_path)
    data = tree.to_dict()
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(SaeforgeError, match=message) as err:
        FeatureTree.load(path)
    assert "saeforge hierarchy link" in err.value.fix or "upgrade" in err.value.fix


def test_a_tree_that_does_not_match_its_saes_is_refused(tmp_path):
    tree, a, b = _tree(tmp_path)
    path = tree.save(tmp_path / "tree.json")
    assert len(FeatureTree.load(path).load_levels()) == 2
    saved(random_jumprelu(20, 7), b)  # retrained: same width, other weights
    with pytest.raises(SaeforgeError, match="does not match the weights") as err:
        FeatureTree.load(path).load_levels()
    assert "saeforge hierarchy link" in err.value.fix
    saved(random_jumprelu(12, 7), b)  # narrower than the tree says
    with pytest.raises(SaeforgeError, match="has only 12"):
        FeatureTree.load(path).load_levels()
    import shutil

    shutil.rmtree(b)
    with pytest.raises(SaeforgeError, match="does not exist"):
        FeatureTree.load(path).load_levels()


def test_fingerprint_is_of_the_level_rows_only():
    sae = random_jumprelu(10, 0)
    fp = decoder_fingerprint(sae, 0, 5)
    with torch.no_grad():
        sae.W_dec[7] += 1
    assert decoder_fingerprint(sae, 0, 5) == fp and decoder_fingerprint(sae, 5, 10) != fp


def test_tree_built_in_memory_is_validated():
    with pytest.raises(SaeforgeError, match="empty latent range"):
        FeatureTree("posthoc", [TreeLevel("a", "x", (3, 3)), TreeLevel("b", "y", (0, 2))], [np.array([-1, -1])])
