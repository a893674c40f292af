"""A feature tree's parent → child pairs in the feature store's ``links`` table (schema 2,
:mod:`saeforge.features.store`), so that whatever reads the store (the feature pages, the API) finds a feature's parent and children without the tree
file: ``store.successors(sae, i, kind="parent")`` are the children of latent ``i``, ``store.predecessors(...)`` its
parent. One link per assigned pair, from the parent's SAE and index to the child's (indices in the whole SAE, not
within the level), weighted by the pair's similarity; ``data`` holds the tree's kind and the parent's level.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from saeforge.errors import SaeforgeError
from saeforge.hierarchy.tree import FeatureTree

__all__ = ["TREE_LINK_KIND", "store_names", "write_tree_links"]

TREE_LINK_KIND = "parent"


def store_names(tree: FeatureTree, store) -> list[tuple[str, int]]:
    """(store SAE name, index offset) of every level: the store SAE whose folder is the level's SAE folder."""
    by_path = {str(Path(s["path"]).resolve()): s["name"] for s in store.saes() if s.get("path")}
    out = []
    for lv in range(tree.n_levels):
        folder = str(tree.sae_folder(lv).resolve())
        if folder not in by_path:
            raise SaeforgeError(f"the feature store has no SAE for level {lv} ({folder}); it holds "
                                f"{', '.join(s['name'] for s in store.saes())}",
                                f"harvest that SAE first: saeforge harvest {folder}")
        out.append((by_path[folder], tree.levels[lv].latents[0]))
    return out


def write_tree_links(tree: FeatureTree, store) -> int:
    """Write every assigned parent → child pair of ``tree`` into ``store`` as links of kind ``"parent"``, replacing
    the links of that kind between the same SAEs (a rebuilt tree replaces the old one). Returns the links written.
    Every level's SAE must be in the store (checked before anything is written)."""
    names = store_names(tree, store)
    for lv, (name, offset) in enumerate(names):
        width = int(store.sae(name)["d_sae"])
        if offset + tree.levels[lv].width > width:
            raise SaeforgeError(f"level {lv} of the tree spans latents {offset}..{offset + tree.levels[lv].width - 1}, "
                                f"but the store's SAE {name!r} has {width}",
                                "harvest the SAEs the tree was built from (saeforge harvest RUN_DIR)")
    written = 0
    replaced: set[tuple[str, str]] = set()
    for lv in range(tree.n_levels - 1):
        (src, src_off), (dst, dst_off) = names[lv], names[lv + 1]
        parents, children = tree.pairs(lv)
        sims = tree.similarity[lv][children]
        rows = [(int(p) + src_off, int(c) + dst_off, float(s) if np.isfinite(s) else None,
                 {"tree": tree.kind, "level": lv})
                for p, c, s in zip(parents, children, sims)]
        # An HSAE's levels are one SAE: replace its old links once, before the first level pair, not per pair.
        written += store.add_links(TREE_LINK_KIND, src, dst, rows, replace=(src, dst) not in replaced)
        replaced.add((src, dst))
    return written
