"""The SAE zoo: one module per architecture, all sharing :class:`~saeforge.saes.base.SAE`, built by name.

    from saeforge.saes import TopKConfig, make_sae
    sae = make_sae(TopKConfig(d_in=768, d_sae=24576, k=32))
    sae = make_sae({"architecture": "topk", "d_in": 768, "d_sae": 24576, "k": 32})
"""

from saeforge.saes.base import SAE
from saeforge.saes.config import SAEConfig
from saeforge.saes.geometric_median import geometric_median
from saeforge.saes.training_step import DeadLatentTracker, TrainOutput, TrainState
from saeforge.saes.registry import get_config_class, get_sae_class, known_architectures, make_sae, register_sae

# Importing the architecture modules registers them.
from saeforge.saes.relu import ReLUConfig, ReLUSAE  # isort: skip
from saeforge.saes.topk import TopKConfig, TopKSAE  # isort: skip
from saeforge.saes.batchtopk import BatchTopKConfig, BatchTopKSAE  # isort: skip
from saeforge.saes.matryoshka import MatryoshkaConfig, MatryoshkaSAE  # isort: skip
from saeforge.saes.gated import GatedConfig, GatedSAE  # isort: skip
from saeforge.saes.jumprelu import JumpReLUConfig, JumpReLUSAE  # isort: skip
from saeforge.saes.transcoder import (  # isort: skip
    BatchTopKSkipTranscoder,
    BatchTopKSkipTranscoderConfig,
    BatchTopKTranscoder,
    BatchTopKTranscoderConfig,
    JumpReLUSkipTranscoder,
    JumpReLUSkipTranscoderConfig,
    JumpReLUTranscoder,
    JumpReLUTranscoderConfig,
    TopKSkipTranscoder,
    TopKSkipTranscoderConfig,
    TopKTranscoder,
    TopKTranscoderConfig,
)
from saeforge.saes.clt import (  # isort: skip
    BatchTopKCLT,
    BatchTopKCLTConfig,
    CrossLayerTranscoder,
    JumpReLUCLT,
    JumpReLUCLTConfig,
    TopKCLT,
    TopKCLTConfig,
    clt_memory,
)
from saeforge.saes.crosscoder import (  # isort: skip
    BatchTopKCrosscoder,
    BatchTopKCrosscoderConfig,
    JumpReLUCrosscoder,
    JumpReLUCrosscoderConfig,
    TopKCrosscoder,
    TopKCrosscoderConfig,
)
from saeforge.saes.hsae import HSAE, HSAEConfig  # isort: skip
from saeforge.saes.alignsae import AlignSAE, AlignSAEConfig  # isort: skip
from saeforge.saes.normalization import NORMALIZATION_METHODS, ActivationScaler, estimate_scale  # isort: skip
from saeforge.saes.io import load_feature_stats, load_sae, read_sae_config, save_sae  # isort: skip

__all__ = [
    "ActivationScaler",
    "AlignSAE",
    "AlignSAEConfig",
    "BatchTopKCLT",
    "BatchTopKCLTConfig",
    "BatchTopKConfig",
    "BatchTopKCrosscoder",
    "BatchTopKCrosscoderConfig",
    "BatchTopKSAE",
    "BatchTopKSkipTranscoder",
    "BatchTopKSkipTranscoderConfig",
    "BatchTopKTranscoder",
    "BatchTopKTranscoderConfig",
    "CrossLayerTranscoder",
    "DeadLatentTracker",
    "GatedConfig",
    "GatedSAE",
    "JumpReLUCLT",
    "JumpReLUCLTConfig",
    "HSAE",
    "HSAEConfig",
    "JumpReLUConfig",
    "JumpReLUCrosscoder",
    "JumpReLUCrosscoderConfig",
    "JumpReLUSAE",
    "JumpReLUSkipTranscoder",
    "JumpReLUSkipTranscoderConfig",
    "JumpReLUTranscoder",
    "JumpReLUTranscoderConfig",
    "MatryoshkaConfig",
    "MatryoshkaSAE",
    "NORMALIZATION_METHODS",
    "ReLUConfig",
    "ReLUSAE",
    "SAE",
    "SAEConfig",
    "TopKCLT",
    "TopKCLTConfig",
    "TopKConfig",
    "TopKCrosscoder",
    "TopKCrosscoderConfig",
    "TopKSAE",
    "TopKSkipTranscoder",
    "TopKSkipTranscoderConfig",
    "TopKTranscoder",
    "TopKTranscoderConfig",
    "TrainOutput",
    "TrainState",
    "clt_memory",
    "estimate_scale",
    "geometric_median",
    "get_config_class",
    "get_sae_class",
    "known_architectures",
    "load_feature_stats",
    "load_sae",
    "make_sae",
    "read_sae_config",
    "register_sae",
    "save_sae",
]
