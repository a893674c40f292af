"""Steering, clamping and ablation through SAE features, on top of ``LanguageModel.edit``.

Modes, for feature i with decoder direction d_i (a row of W_dec) and activation f_i(x):
- ``add``:   x ← x + S·d_i. With ``unit="max"`` (default) S is in units of the feature's typical maximum activation
  (from the feature store, else the SAE's saved feature statistics), so S = 1 adds one "full" firing; ``raw`` adds S·d_i.
- ``clamp``: x ← x + (c − f_i(x))·d_i, i.e. the SAE reconstruction with f_i set to c plus the untouched SAE error term,
  so nothing but feature i moves (Templeton et al. 2024). c = S (× max activation with ``unit="max"``).
- ``scale``: x ← x + (r − 1)·f_i(x)·d_i with r = S; r = 0 ablates the feature.
Edits apply at every non-special position (``positions="all"``) or only to generated tokens (``"generated"``): the
tokens of cached generation steps, or with ``prompt_length`` every token after the prompt (so a teacher-forced pass
over prompt + continuation is edited as the generation was).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from saeforge.data.token_stream import TokenPolicy
from saeforge.errors import SaeforgeError
from saeforge.models.language_model import EditContext

MODES = ("add", "clamp", "scale")
UNITS = ("max", "raw")
MAX_STRENGTH = {"max": 1000.0, "raw": 1e5}  # beyond these the residual stream is destroyed, not steered


@dataclass(frozen=True)
class FeatureEdit:
    """One feature intervention: ``sae`` is the SAE's name in the run (its site name by default)."""

    sae: str
    feature: int
    mode: str = "add"
    strength: float = 1.0
    unit: str = "max"

    def validate(self, d_sae: int) -> None:
        if self.mode not in MODES:
            raise SaeforgeError(f"unknown steering mode {self.mode!r}", f"use one of {', '.join(MODES)}")
        if self.unit not in UNITS:
            raise SaeforgeError(f"unknown strength unit {self.unit!r}", f"use one of {', '.join(UNITS)}")
        if not 0 <= self.feature < d_sae:
            raise SaeforgeError(f"feature {self.feature} is out of range for SAE {self.sae!r} (0..{d_sae - 1})",
                                f"pick an index below {d_sae}")
        s, limit = self.strength, MAX_STRENGTH[self.unit]
        if not isinstance(s, (int, float)) or not math.isfinite(s) or abs(s) > limit:
            raise SaeforgeError(f"steering strength {s!r} is not allowed",
                                f"use a finite number with |strength| ≤ {limit:g} (unit {self.unit})")
        if self.mode == "scale" and s < 0 and self.unit == "max":
            pass  # a negative scale flips the feature; allowed


def parse_feature(spec: str, known: Sequence[str]) -> tuple[str, int]:
    """``SAE:IDX`` (SAE = its name or site) → (name, idx)."""
    name, sep, idx = spec.rpartition(":")
    if not sep or not idx.lstrip("-").isdigit():
        raise SaeforgeError(f"feature {spec!r} is not SITE:INDEX", "e.g. --feature layers.15.resid_post:1234")
    if name not in known:
        raise SaeforgeError(f"{spec!r}: no SAE {name!r} in this run", f"the run has: {', '.join(known)}")
    return name, int(idx)


class Steerer:
    """The SAEs of a run loaded once, with their features' typical maximum activations."""

    def __init__(self, lm, saes: dict, max_acts: dict[str, torch.Tensor | None], policy: TokenPolicy | None = None):
        self.lm = lm
        self.saes = saes  # name → (SAE, Site)
        self.max_acts = max_acts
        self.policy = policy or TokenPolicy()  # the run's token rules, for tokenizing prompts

    @classmethod
    def from_run(cls, path: str | Path, lm=None, *, model: str = "", device: str = "auto") -> "Steerer":
        from saeforge.features.inspect import Inspector
        from saeforge.features.store import FeatureStore
        from saeforge.saes import load_feature_stats

        insp = Inspector(path, model=model, device=device, lm=lm)
        max_acts: dict[str, torch.Tensor | None] = {}
        for name, (sae, _) in insp.saes.items():
            max_acts[name] = None
            if insp.store_path is not None:
                with FeatureStore(insp.store_path, readonly=True) as store:
                    sae_id = store.sae_id(name)
                    rows = store.con.execute("SELECT idx, max_act FROM features WHERE sae_id = ?", (sae_id,))
                    m = torch.zeros(sae.cfg.d_sae)
                    for idx, v in rows:
                        m[idx] = v
                    max_acts[name] = m
            if max_acts[name] is None:
                stats = load_feature_stats(insp.run.saes[name].folder)
                if stats and "max_activation" in stats:
                    max_acts[name] = stats["max_activation"].float().cpu()
        return cls(insp.lm, insp.saes, max_acts, insp.run.token_policy())

    def value(self, edit: FeatureEdit) -> float:
        """The strength in activation units."""
        if edit.unit == "raw" or edit.mode == "scale":
            return float(edit.strength)
        m = self.max_acts.get(edit.sae)
        if m is None:
            raise SaeforgeError(f"no feature statistics for SAE {edit.sae!r}, so 'max' units are unknown",
                                "harvest the run first (saeforge harvest) or give the strength in raw units (--unit raw)")
        top = float(m[edit.feature])
        if top <= 0:
            raise SaeforgeError(f"feature {edit.feature} never fired in the harvested text, so its max is 0",
                                "use --unit raw, or pick a feature that fires")
        return float(edit.strength) * top

    def check(self, edits: Sequence[FeatureEdit]) -> None:
        for e in edits:
            if e.sae not in self.saes:
                raise SaeforgeError(f"no SAE {e.sae!r} in this run", f"the run has: {', '.join(self.saes)}")
            e.validate(self.saes[e.sae][0].cfg.d_sae)

    def _feature_op(self, e: FeatureEdit):
        sae = self.saes[e.sae][0]
        value = self.value(e) if e.mode != "scale" else float(e.strength)

        def op(flat: torch.Tensor) -> torch.Tensor:
            d = sae.W_dec[e.feature].to(flat)
            if e.mode == "add":
                return flat + value * d
            f_i = sae.encode(flat)[:, e.feature]
            target = value if e.mode == "clamp" else value * f_i
            return flat + (target - f_i)[:, None] * d

        return op

    def _edit_fn(self, ops: list, positions: str, prompt_length: int | None):
        special = torch.tensor(self.lm.special_token_ids())

        def fn(x: torch.Tensor, ctx: EditContext) -> torch.Tensor | None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
            if positions == "generated":
                if prompt_length is not None:
                    mask &= (ctx.columns >= prompt_length).to(x.device)[None, :]
                elif not ctx.is_generated:
                    return None  # the prompt's forward pass
            if ctx.input_ids is not None:
                mask &= ~torch.isin(ctx.input_ids, special.to(ctx.input_ids.device)).to(x.device)  # BOS, padding
            if not bool(mask.any()):
                return None
            out = x.clone()
            flat = out[mask].float()
            for op in ops:
                flat = op(flat)
            out[mask] = flat.to(x.dtype)
            return out

        return fn

    @contextlib.contextmanager
    def steering(self, edits: Sequence[FeatureEdit] = (), positions: str = "all",
                 vectors: dict[str, torch.Tensor] | None = None, *, prompt_length: int | None = None
                 ) -> Iterator[None]:
        """Apply feature ``edits`` (and raw ``vectors`` added at their sites) to every forward pass inside the block
        (generation included). With ``positions="generated"`` only generated tokens are edited: those of cached
        generation steps, or, given ``prompt_length``, every token from that column on."""
        if positions not in ("all", "generated"):
            raise SaeforgeError(f"unknown positions {positions!r}", "use all or generated")
        self.check(edits)
        by_site: dict[str, list] = {}
        for e in edits:
            by_site.setdefault(self.saes[e.sae][1].name, []).append(self._feature_op(e))
        for site, v in (vectors or {}).items():
            if not torch.isfinite(v).all():
                raise SaeforgeError("the steering vector contains NaN or Inf", "check how it was computed")
            by_site.setdefault(self.lm.site(site).name, []).append(lambda flat, v=v: flat + v.to(flat))
        with self.lm.edit({site: self._edit_fn(ops, positions, prompt_length) for site, ops in by_site.items()}):
            yield
