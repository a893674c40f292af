"""Training SAEs: one loop for one or many SAEs fed from one activation stream, with exact resume."""

from saeforge.training.config import TrainConfig
from saeforge.training.trainer import Trainer, train

__all__ = ["TrainConfig", "Trainer", "train"]
