"""The rules each architecture declares on its config class, which the trainer reads instead of naming them."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

import saeforge.training
from saeforge.errors import SaeforgeError
from saeforge.saes import SAEConfig, get_config_class, known_architectures
from saeforge.saes.config import option_fix


def _options(cls, **kw):
    base = dict(d_in=12, d_sae=32, k=4, sparsity_coefficient=-1.0, dead_after_tokens=1000)
    return cls.from_training_options(**{**base, **kw})


def test_default_learning_rates():
    get = get_config_class
    # TopK family: 1e-3 at 2^14 latents, scaled by 1/sqrt(d_sae) (docs/architecture.md, "Learning rate")
    assert get("topk").default_lr(2**14) == pytest.approx(1e-3, rel=1e-12)
    assert get("batchtopk").default_lr(4 * 2**14) == pytest.approx(5e-4, rel=1e-12)
    assert get("matryoshka").default_lr(2**14 // 4) == pytest.approx(2e-3, rel=1e-12)
    # the L1/L0-penalised architectures keep their papers' rates, whatever d_sae
    assert get("relu").default_lr(4608) == get("gated").default_lr(99) == 3e-3
    assert get("jumprelu").default_lr(4608) == 3e-3



def test_short_runs_of_the_topk_family_get_a_higher_default_rate():
    """Under 128 steps the TopK family's rate rises by sqrt(128 / steps); from 128 steps on, and for the L1/L0
    architectures always, it is the size rule alone."""
    for arch in ("topk", "batchtopk", "matryoshka"):
        cfg = _options(get_config_class(arch))
        base = cfg.learning_rate()
        assert cfg.learning_rate_for_run(32) == pytest.approx(2 * base, rel=1e-12)
        assert cfg.learning_rate_for_run(64) == pytest.approx(math.sqrt(2) * base, rel=1e-12)
        assert cfg.learning_rate_for_run(128) == cfg.learning_rate_for_run(10_000) == base
    relu = _options(get_config_class("relu"))
    assert relu.learning_rate_for_run(32) == relu.learning_rate() == 3e-3


def test_the_trainer_uses_the_run_length_rule(tiny_cache, tmp_path):
    import torch

    from saeforge.saes import load_sae
    from saeforge.training import TrainConfig, train
    from tests.conftest import TRAIN_SITES

    for steps, factor in ((8, 4.0), (160, 1.0)):
        out = tmp_path / f"run{steps}"
        train(TrainConfig(out=str(out), cache=str(tiny_cache.folder), sites=(TRAIN_SITES[0],), tokens=64 * steps,
                          batch_size=64, d_sae=64, k=4, progress=False, device="cpu", checkpoint_every=steps))
        base_lrs = torch.load(out / "checkpoints" / "checkpoint.pt", weights_only=False)["saes"][TRAIN_SITES[0]][
            "scheduler"]["base_lrs"]
        sae_cfg = load_sae(out / "saes" / TRAIN_SITES[0]).cfg
        assert base_lrs == [pytest.approx(factor * sae_cfg.learning_rate(), rel=1e-12)]
        assert base_lrs == [pytest.approx(sae_cfg.learning_rate_for_run(steps), rel=1e-12)]


@pytest.mark.parametrize("arch", known_architectures())
def test_generic_options_land_on_the_declared_fields(arch):
    cls = get_config_class(arch)
    cfg = _options(cls, k=3, sparsity_coefficient=0.25) if cls.sparsity_coefficient_field else _options(cls, k=3)
    assert cfg.architecture == arch and (cfg.d_in, cfg.d_sae) == (12, 32)
    if cls.uses_k:
        assert cfg.k == 3
    else:
        assert not hasattr(cfg, "k")
    if cls.sparsity_coefficient_field:
        assert getattr(cfg, cls.sparsity_coefficient_field) == 0.25
    else:
        with pytest.raises(SaeforgeError, match="has no sparsity coefficient") as err:
            _options(cls, sparsity_coefficient=0.25)
        assert "--sparsity-coefficient" in err.value.fix
    if hasattr(cfg, "dead_after_tokens"):
        assert cfg.dead_after_tokens == 1000
    transcoder = _options(cls, d_out=20)
    assert transcoder.is_transcoder and transcoder.apply_b_dec_to_input is False
    # --sae-options win over the generic options
    assert _options(cls, options={"d_sae": 40}).d_sae == 40


def test_every_architecture_declares_its_rules():
    for arch in known_architectures():
        cls = get_config_class(arch)
        assert cls.sparsity_coefficient_field is None or cls.sparsity_coefficient_field in {
            f for f in cls.__dataclass_fields__}
        assert not cls.uses_k or "k" in cls.__dataclass_fields__
        assert math.isfinite(cls.default_lr(4096)) and cls.default_lr(4096) > 0
    # exactly one kind of sparsity control each: k or a coefficient
    assert all(get_config_class(a).uses_k != bool(get_config_class(a).sparsity_coefficient_field)
               for a in known_architectures())


def test_the_trainer_names_no_architecture():
    words = set(known_architectures()) | {"l1_coefficient", "l0_coefficient", "resample", "aux_k", "topk_family"}
    folder = Path(saeforge.training.__file__).parent
    for path in folder.glob("*.py"):
        text = path.read_text().lower()
        found = [w for w in words if re.search(rf"\b{re.escape(w)}", text)]
        assert not found, f"{path.name} names {found}"


def test_fixes_are_command_lines():
    assert option_fix(get_config_class("topk"), "k", 32) == "pass -k 32"
    assert option_fix(get_config_class("relu"), "l1_coefficient", 5.0) == "pass --sparsity-coefficient 5.0"
    assert option_fix(get_config_class("topk"), "aux_k", 256) == """pass --sae-options '{"aux_k": 256}'"""
    with pytest.raises(SaeforgeError) as err:
        SAEConfig.from_dict({"architecture": "topk", "d_in": 4, "d_sae": 8, "k": 2, "aux_k": 99})
    assert err.value.fix.startswith("pass --sae-options '{\"aux_k\": ")
