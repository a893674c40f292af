"""The input scaling of a dictionary that reads or writes several sites: one scale per site.

Each site is scaled on its own (to E‖x‖ = √d, or the chosen method) because their natural scales differ by layer,
and for model diffing by model; one scale for the concatenation would let the largest site dominate the loss. The
scales are folded into the saved dictionary by its ``fold_input_scale`` (lists, one per site). A dictionary of one
site read and one written keeps :class:`~saeforge.saes.ActivationScaler`, whose records older runs hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from saeforge.errors import SaeforgeError
from saeforge.saes import ActivationScaler, estimate_scale

__all__ = ["SiteScaler", "scaler_from_dict"]


@dataclass(frozen=True)
class SiteScaler:
    """Inputs ``* scale_in[s]`` on the columns of read site s, targets ``* scale_out[s]`` on those of written site s."""

    method: str
    scale_in: tuple[float, ...]
    scale_out: tuple[float, ...]
    widths_in: tuple[int, ...]
    widths_out: tuple[int, ...]

    @classmethod
    def fit(cls, xs: Sequence[Tensor], method: str, ys: Sequence[Tensor] | None = None) -> SiteScaler:
        """Per-site scales from samples of the sites read (``xs``) and written (``ys``; None: the same sites)."""
        s_in = tuple(estimate_scale(x, method) for x in xs)
        s_out = s_in if ys is None else tuple(estimate_scale(y, method) for y in ys)
        w_in = tuple(int(x.shape[-1]) for x in xs)
        w_out = w_in if ys is None else tuple(int(y.shape[-1]) for y in ys)
        return cls(method, s_in, s_out, w_in, w_out)

    @staticmethod
    def _vector(scales: tuple[float, ...], widths: tuple[int, ...], like: Tensor) -> Tensor:
        return torch.tensor(scales, dtype=like.dtype, device=like.device).repeat_interleave(
            torch.tensor(widths, device=like.device))

    def scale_input(self, x: Tensor) -> Tensor:
        return x * self._vector(self.scale_in, self.widths_in, x)

    def scale_target(self, y: Tensor) -> Tensor:
        return y * self._vector(self.scale_out, self.widths_out, y)

    def fold_into(self, sae: Any) -> None:
        sae.fold_input_scale(list(self.scale_in), list(self.scale_out))

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "scale_in": list(self.scale_in), "scale_out": list(self.scale_out),
                "widths_in": list(self.widths_in), "widths_out": list(self.widths_out)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SiteScaler:
        try:
            out = cls(d["method"], tuple(float(v) for v in d["scale_in"]), tuple(float(v) for v in d["scale_out"]),
                      tuple(int(v) for v in d["widths_in"]), tuple(int(v) for v in d["widths_out"]))
        except (KeyError, TypeError, ValueError) as err:
            raise SaeforgeError(f"invalid per-site scaler record {d!r}: {err}",
                                "the checkpoint is damaged; start the run again") from err
        if len(out.scale_in) != len(out.widths_in) or len(out.scale_out) != len(out.widths_out):
            raise SaeforgeError(f"invalid per-site scaler record {d!r}: one scale and one width per site",
                                "the checkpoint is damaged; start the run again")
        return out


def scaler_from_dict(d: dict[str, Any]) -> ActivationScaler | SiteScaler:
    """Either record, as a checkpoint holds it."""
    return SiteScaler.from_dict(d) if isinstance(d.get("scale_in"), list) else ActivationScaler.from_dict(d)
