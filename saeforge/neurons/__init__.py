"""Neuron-level decompositions of MLP activations (the site ``layers.N.mlp_hidden``)."""
