"""Neuron-level decompositions of MLP activations (the site ``layers.N.mlp_hidden``): SNMF neuron groups (arXiv
2506.10920), see ``docs/snmf.md``.

Python API::

    from saeforge.neurons import SNMF, SNMFSettings, fit_snmf, collect_activations, write_feature_store, SNMFSteering

    x = collect_activations(lm, "layers.15.mlp_hidden", corpus="embedded:train", tokens=32768)
    fit = fit_snmf(x, SNMFSettings(rank=50, sparsity=0.01))       # or CacheChunks(cache_dir, site)
    fit.save("snmf_l15"); write_feature_store("snmf_l15", fit, lm, site="layers.15.mlp_hidden")
    steering = SNMFSteering(lm, fit, "layers.15.mlp_hidden")
    cal = steering.calibrate(feature=3, target=0.1)               # strength for next-token KL 0.1
    with steering.steering(3, cal.strength):
        ...                                                       # any forward or generate call
"""

from saeforge.neurons.fit import SNMFFitConfig, SNMFInspectConfig, collect_activations, fit_command, inspect_fit
from saeforge.neurons.mlp import check_mlp_model, mlp_site, output_directions, vocabulary_projection
from saeforge.neurons.snmf import (SNMF, CacheChunks, SNMFSettings, TensorChunks, encode, fit_hierarchy, fit_snmf,
                                   winner_take_all)
from saeforge.neurons.steer import Calibration, SNMFSteering, VectorSteering
from saeforge.neurons.store import write_feature_store

__all__ = ["SNMF", "CacheChunks", "Calibration", "SNMFFitConfig", "SNMFInspectConfig", "SNMFSettings", "SNMFSteering",
           "TensorChunks", "VectorSteering", "check_mlp_model", "collect_activations", "encode", "fit_command",
           "fit_hierarchy", "fit_snmf", "inspect_fit", "mlp_site", "output_directions", "vocabulary_projection",
           "winner_take_all", "write_feature_store"]
