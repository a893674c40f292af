"""saeforge: sparse-autoencoder interpretability for language models."""

__version__ = "0.1.0"

from saeforge.errors import SaeforgeError

__all__ = ["SaeforgeError", "__version__"]
