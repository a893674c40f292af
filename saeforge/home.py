"""Where saeforge keeps converted models and fetched corpora: ``$SAEFORGE_HOME`` (default ``~/.cache/saeforge``)."""

from __future__ import annotations

import os
from pathlib import Path


def saeforge_home() -> Path:
    """The cache root. Read on every call so tests and users can point ``SAEFORGE_HOME`` elsewhere at any time."""
    env = os.environ.get("SAEFORGE_HOME")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "saeforge"
    return root


def models_dir() -> Path:
    return saeforge_home() / "models"


def corpora_dir() -> Path:
    return saeforge_home() / "corpora"
