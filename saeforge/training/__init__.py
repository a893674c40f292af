"""Training SAEs: one loop for one or many SAEs fed from one activation stream, with exact resume."""

from saeforge.training.config import TrainConfig
from saeforge.training.trainer import Trainer, train
from saeforge.training.arrays import train_on_arrays  # isort: skip

__all__ = ["TrainConfig", "Trainer", "train", "train_on_arrays"]
