"""The architecture registry and config dispatch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest

from saeforge.errors import SaeforgeError
from saeforge.saes import (
    GatedSAE,
    ReLUSAE,
    SAEConfig,
    TopKConfig,
    TopKSAE,
    get_config_class,
    get_sae_class,
    known_architectures,
    make_sae,
    register_sae,
)

ALL = ["alignsae", "batchtopk", "batchtopk_clt", "batchtopk_crosscoder", "batchtopk_skip_transcoder", "batchtopk_transcoder",
       "gated", "hsae", "jumprelu", "jumprelu_clt", "jumprelu_crosscoder", "jumprelu_skip_transcoder",
       "jumprelu_transcoder",
       "matryoshka", "relu", "topk", "topk_clt", "topk_crosscoder", "topk_skip_transcoder", "topk_transcoder"]


def test_known_architectures():
    assert known_architectures() == ALL


def test_lookup_by_name():
    assert get_sae_class("topk") is TopKSAE and get_sae_class("gated") is GatedSAE
    assert get_config_class("topk") is TopKConfig
    for name in ALL:
        assert get_sae_class(name).config_class.architecture == name


def test_unknown_architecture_lists_the_known_ones():
    with pytest.raises(SaeforgeError) as err:
        get_sae_class("vanilla")
    assert "unknown SAE architecture 'vanilla'" in str(err.value)
    for name in ALL:
        assert name in err.value.fix


def test_make_sae_from_config_and_from_dict():
    sae = make_sae(TopKConfig(d_in=8, d_sae=16, k=2))
    assert isinstance(sae, TopKSAE)
    sae = make_sae({"architecture": "relu", "d_in": 8, "d_sae": 16, "variant": "classic"})
    assert isinstance(sae, ReLUSAE) and sae.cfg.variant == "classic"
    with pytest.raises(SaeforgeError, match="unknown SAE architecture 'nope'"):
        make_sae({"architecture": "nope", "d_in": 8, "d_sae": 16})
    with pytest.raises(SaeforgeError, match="no 'architecture' field"):
        make_sae({"d_in": 8, "d_sae": 16})
    with pytest.raises(SaeforgeError, match="SAEConfig or a dict"):
        make_sae("topk")  # type: ignore[arg-type]


def test_from_dict_errors():
    with pytest.raises(SaeforgeError, match="unknown field.*colour"):
        SAEConfig.from_dict({"architecture": "topk", "d_in": 8, "d_sae": 16, "k": 2, "colour": "red"})
    with pytest.raises(SaeforgeError, match="invalid 'topk' SAE config"):
        SAEConfig.from_dict({"architecture": "topk", "d_in": 8, "d_sae": 16})  # k missing
    with pytest.raises(SaeforgeError, match="but TopKConfig is 'topk'"):
        TopKConfig.from_dict({"architecture": "relu", "d_in": 8, "d_sae": 16, "k": 2})
    with pytest.raises(SaeforgeError, match="k=40 is larger than d_sae=16"):
        SAEConfig.from_dict({"architecture": "topk", "d_in": 8, "d_sae": 16, "k": 40})


def test_the_class_must_match_its_config():
    with pytest.raises(SaeforgeError, match="needs a TopKConfig"):
        TopKSAE(SAEConfig.from_dict({"architecture": "relu", "d_in": 8, "d_sae": 16}))


def test_register_refuses_a_second_class_under_a_taken_name():
    @dataclass(frozen=True)
    class OtherConfig(SAEConfig):
        architecture: ClassVar[str] = "topk"

    class OtherSAE(TopKSAE):
        config_class = OtherConfig

    with pytest.raises(SaeforgeError, match="already registered"):
        register_sae(OtherSAE)
    assert get_sae_class("topk") is TopKSAE
