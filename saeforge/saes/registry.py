"""Architecture name -> SAE class. Each architecture module registers its class with ``@register_sae``."""

from __future__ import annotations

from typing import Any

from saeforge.errors import SaeforgeError
from saeforge.saes.base import SAE, SAEConfig

__all__ = ["DEFAULT_ARCHITECTURE", "get_config_class", "get_sae_class", "known_architectures", "make_sae", "register_sae"]

_REGISTRY: dict[str, type[SAE]] = {}
DEFAULT_ARCHITECTURE = "topk"  # what `saeforge train` builds unless told otherwise


def register_sae(cls: type[SAE]) -> type[SAE]:
    """Class decorator: make ``cls`` buildable by its config's ``architecture`` name."""
    name = getattr(cls.config_class, "architecture", "")
    if not name:
        raise SaeforgeError(f"{cls.__name__}.config_class has no architecture name",
                            "set `architecture: ClassVar[str] = \"...\"` on the config class")
    existing = _REGISTRY.get(name)
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise SaeforgeError(f"architecture {name!r} is already registered by {existing.__qualname__}",
                            "choose another architecture name")
    _REGISTRY[name] = cls
    return cls


def _load_builtin() -> None:
    # The built-in architectures register themselves when the package is imported.
    import saeforge.saes  # noqa: F401


def known_architectures() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def get_sae_class(name: str) -> type[SAE]:
    _load_builtin()
    if name not in _REGISTRY:
        raise SaeforgeError(f"unknown SAE architecture {name!r}",
                            f"use one of: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def get_config_class(name: str) -> type[SAEConfig]:
    return get_sae_class(name).config_class


def make_sae(cfg: SAEConfig | dict[str, Any]) -> SAE:
    """Build an SAE from a config object or from a config dict carrying ``"architecture"``."""
    if isinstance(cfg, dict):
        cfg = SAEConfig.from_dict(cfg)
    if not isinstance(cfg, SAEConfig):
        raise SaeforgeError(f"make_sae needs an SAEConfig or a dict, got {type(cfg).__name__}",
                            "pass e.g. TopKConfig(d_in=..., d_sae=..., k=...)")
    return get_sae_class(cfg.architecture)(cfg)
