"""``saeforge snmf ACTION``: SNMF neuron groups (arXiv 2506.10920) from the command line."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from simple_parsing.helpers import field

from saeforge.errors import SaeforgeError
from saeforge.neurons.compare import SNMFCompareConfig, run_compare
from saeforge.neurons.fit import SNMFFitConfig, SNMFInspectConfig, run_fit, run_inspect
from saeforge.neurons.steer import CALIBRATION_PROMPTS, MODES

__all__ = ["SNMF_ACTIONS", "SNMFSteerConfig", "run_steer", "steer_command"]


@dataclass(frozen=True)
class SNMFSteerConfig:
    """Steer generation with one SNMF feature (add its neuron pattern, or scale its neurons), the strength
    calibrated to a target next-token KL divergence; prints the continuations with and without it."""

    path: str = field(default="", positional=True)
    """An SNMF folder (saeforge snmf fit)."""
    feature: int = 0
    """The feature to steer with."""
    mode: str = "add"
    """add (x + s·z/‖z‖ at the MLP's hidden layer) or scale (the feature's neurons × (1 + s); s < 0: × 1/(1 + |s|))."""
    target_kl: float = 0.1
    """Next-token KL (nats) on the calibration prompts that the strength is calibrated to."""
    strength: float = 0.0
    """A strength to use as given instead of calibrating (0: calibrate to --target-kl)."""
    negative: bool = False
    """Steer against the feature (a negative strength)."""
    calibration_prompts: tuple[str, ...] = CALIBRATION_PROMPTS
    """Prompts whose last-position next-token KL is calibrated (the paper's "I think that")."""
    prompts: tuple[str, ...] = ("I think that", "The weather today", "My favourite thing is")
    """Prompts to continue."""
    max_new_tokens: int = 32
    """Tokens generated per prompt."""
    temperature: float = 0.7
    """Sampling temperature (0: greedy)."""
    seed: int = 0
    """Sampling seed (the same with and without steering)."""
    model: str = ""
    """Model; empty: the one the SNMF was fitted on."""
    device: str = "auto"
    """auto, cpu or cuda."""


def steer_command(cfg: SNMFSteerConfig, lm=None) -> dict:
    """Calibrate (unless --strength) and generate; returns {calibration, strength, baseline, steered}."""
    from saeforge.interventions.generate import Continuations
    from saeforge.models.language_model import LanguageModel
    from saeforge.neurons.mlp import check_mlp_model
    from saeforge.neurons.snmf import SNMF
    from saeforge.neurons.steer import SNMFSteering

    if cfg.mode not in MODES:
        raise SaeforgeError(f"unknown SNMF steering mode {cfg.mode!r}", f"use --mode {' or '.join(MODES)}")
    if not cfg.prompts:
        raise SaeforgeError("no prompt to continue", "pass --prompts 'I think that'")
    fit = SNMF.load(cfg.path)
    if not 0 <= cfg.feature < fit.rank:
        raise SaeforgeError(f"feature {cfg.feature} is out of range: the fit has features 0..{fit.rank - 1}",
                            f"pass --feature below {fit.rank}")
    site, model = fit.info.get("site", ""), cfg.model or fit.info.get("model") or "embedded"
    check_mlp_model(model, site)
    lm = lm or LanguageModel.load(model, device=cfg.device)
    if fit.info.get("model_fingerprint") and lm.fingerprint() != fit.info["model_fingerprint"]:
        raise SaeforgeError(f"{cfg.path} was fitted on another model than {model}",
                            "pass the model the SNMF was fitted on (--model)")
    steering = SNMFSteering(lm, fit, site, prompts=cfg.calibration_prompts)
    sign = -1.0 if cfg.negative else 1.0
    calibration = None
    if cfg.strength:
        strength = sign * abs(cfg.strength)
    else:
        calibration = steering.calibrate(cfg.feature, cfg.target_kl, mode=cfg.mode, sign=sign)
        strength = calibration.strength
    gen = Continuations(steering.steerer, cfg.prompts, max_new_tokens=cfg.max_new_tokens,
                        temperature=cfg.temperature, seed=cfg.seed)
    baseline = gen.decode(gen.sample())
    with steering.steering(cfg.feature, strength, cfg.mode):
        steered = gen.decode(gen.sample())
    kl = steering.kl(lambda: steering.steering(cfg.feature, strength, cfg.mode))
    return {"calibration": calibration.to_dict() if calibration else None, "strength": strength, "kl": kl,
            "prompts": list(cfg.prompts), "baseline": baseline, "steered": steered}


def run_steer(cfg: SNMFSteerConfig) -> dict:
    out = steer_command(cfg)
    cal = out["calibration"]
    how = (f"calibrated to KL {cal['target']:g}{'' if cal['reached'] else ' (not reached)'}" if cal else "as given")
    print(f"feature {cfg.feature}, {cfg.mode}, strength {out['strength']:.4g} ({how}); next-token KL {out['kl']:.4f}")
    for p, b, s in zip(out["prompts"], out["baseline"], out["steered"]):
        print(f"\n{p!r}\n  plain:   {b.strip()!r}\n  steered: {s.strip()!r}")
    return out


SNMF_ACTIONS: dict[str, tuple[type, Callable, str]] = {
    "fit": (SNMFFitConfig, run_fit, "fit SNMF neuron groups at an MLP hidden site; fill their feature store"),
    "inspect": (SNMFInspectConfig, run_inspect, "show a fit: convergence, neuron groups, top and promoted tokens"),
    "steer": (SNMFSteerConfig, run_steer, "steer by one SNMF feature at a strength calibrated to a target KL"),
    "compare": (SNMFCompareConfig, run_compare,
                "SNMF vs SAE features vs DiffMeans on a built-in concept set: detection AUROC, steering at matched KL"),
}
