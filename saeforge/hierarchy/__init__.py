"""Feature hierarchies and modules: trees of latents (HSAE, the post-hoc baseline, Matryoshka groups), their
metrics, absorption and splitting, synthetic hierarchical data, and co-activation modules. See docs/hierarchy.md."""

from saeforge.hierarchy.metrics import PairStats, TreeMetrics, tree_metrics
from saeforge.hierarchy.posthoc import link_levels, link_saes, matryoshka_tree
from saeforge.hierarchy.tree import TREE_FILE, FeatureTree, TreeLevel, decoder_fingerprint

__all__ = ["TREE_FILE", "FeatureTree", "PairStats", "TreeLevel", "TreeMetrics", "decoder_fingerprint",
           "link_levels", "link_saes", "matryoshka_tree", "tree_metrics"]
