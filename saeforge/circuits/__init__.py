"""Sparse feature circuits (Marks et al., arXiv 2403.19647): contrastive tasks, node and edge attribution over SAE
features and error nodes, circuit extraction and evaluation. See docs/circuits.md."""
