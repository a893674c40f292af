"""The registry of a model's lifelong edits: what each edit asked for, which latents and neurons it used, how it
went, and how the edits' neuron masks overlap (overlapping masks bring back the interference that localisation is
meant to avoid).

Saved in a folder (the edited model's own folder, beside its weights) as ``edits.json`` (the records and the model
it belongs to) and ``edits.safetensors`` (one boolean mask over the layer's neurons per edit), each written
atomically. The registry names the model by its weight fingerprint (:meth:`LanguageModel.fingerprint`, which edits
of MLP down projections leave unchanged), so a registry is refused on any other model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from saeforge.errors import SaeforgeError

__all__ = ["REGISTRY_FILE", "EditRecord", "EditRegistry"]

REGISTRY_FILE = "edits.json"
MASKS_FILE = "edits.safetensors"
FORMAT = "saeforge-edit-registry"


@dataclass(frozen=True)
class EditRecord:
    """One applied edit."""

    prompt: str
    target: str
    method: str
    neurons: tuple[int, ...]
    latents: tuple[int, ...] = ()
    latent_scores: tuple[float, ...] = ()
    source: str = ""
    """How the neurons were chosen: ``sae``, ``attribution`` (no latent active), ``random`` or ``all``."""
    steps: int = 0
    nll_before: float = float("nan")
    nll_after: float = float("nan")
    retain_change: float = float("nan")
    """RMS change of the layer's MLP output on the retain tokens, relative to the output's RMS."""
    delta_norm: float = 0.0


@dataclass
class EditRegistry:
    """Every edit applied to one layer of one model, in order."""

    model_fingerprint: str
    model_name: str
    layer: int
    d_mlp: int
    sae: str = ""
    records: list[EditRecord] = field(default_factory=list)

    @classmethod
    def for_model(cls, lm, layer: int, sae: str = "") -> "EditRegistry":
        return cls(lm.fingerprint(), str(lm.name), int(layer), int(lm.d_mlp), sae)

    # ------------------------------------------------------------------------------------------ contents
    def add(self, record: EditRecord) -> None:
        bad = [i for i in record.neurons if not 0 <= i < self.d_mlp]
        if bad:
            raise SaeforgeError(f"neurons {bad[:3]} are outside the layer's {self.d_mlp} neurons",
                                "localise the edit on this model's layer")
        self.records.append(record)

    def masks(self) -> torch.Tensor:
        """``[edits, d_mlp]`` boolean: the neurons of each edit."""
        out = torch.zeros(len(self.records), self.d_mlp, dtype=torch.bool)
        for i, r in enumerate(self.records):
            out[i, list(r.neurons)] = True
        return out

    def owned(self) -> set[int]:
        """Neurons used by any edit so far."""
        return {i for r in self.records for i in r.neurons}

    def overlap(self) -> dict[str, Any]:
        """How the masks overlap: ``pairs`` (pairs of edits sharing a neuron), ``mean_jaccard`` over all pairs,
        ``max_jaccard``, ``shared_neurons`` (neurons in two or more masks), ``union`` (neurons in any) and
        ``mean_mask`` (neurons per edit)."""
        masks = self.masks().float()
        n = len(self.records)
        out = {"edits": n, "union": int(masks.any(0).sum()) if n else 0,
               "mean_mask": float(masks.sum(1).mean()) if n else 0.0,
               "shared_neurons": int((masks.sum(0) >= 2).sum()) if n else 0,
               "pairs": 0, "mean_jaccard": 0.0, "max_jaccard": 0.0}
        if n < 2:
            return out
        inter = masks @ masks.T
        sizes = masks.sum(1)
        union = sizes[:, None] + sizes[None, :] - inter
        jac = torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(inter))
        upper = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
        out.update(pairs=int((inter[upper] > 0).sum()), mean_jaccard=float(jac[upper].mean()),
                   max_jaccard=float(jac[upper].max()))
        return out

    # ------------------------------------------------------------------------------------------ checks
    def check_model(self, lm, where: str = "the registry") -> None:
        """Refuse a model other than the one the registry was made on (fingerprint, layer width)."""
        fp = lm.fingerprint()
        if fp != self.model_fingerprint or int(lm.d_mlp) != self.d_mlp:
            raise SaeforgeError(f"{where} belongs to another model ({self.model_name}, fingerprint "
                                f"{self.model_fingerprint}); this model {lm.name} has fingerprint {fp}",
                                f"edit {self.model_name} (--model {self.model_name}), or start a new registry "
                                "(leave --registry out)")

    # ------------------------------------------------------------------------------------------ files
    def save(self, folder: str | Path) -> Path:
        from saeforge.utils.atomic import atomic_save_safetensors, atomic_write_json

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "version": 1, "model_fingerprint": self.model_fingerprint,
                "model_name": self.model_name, "layer": self.layer, "d_mlp": self.d_mlp, "sae": self.sae,
                "overlap": self.overlap(), "records": [asdict(r) for r in self.records]}
        # the masks first: a registry JSON on disk always has its masks beside it
        atomic_save_safetensors(folder / MASKS_FILE, {"masks": self.masks().to(torch.uint8)},
                                metadata={"format": FORMAT, "model_fingerprint": self.model_fingerprint})
        atomic_write_json(folder / REGISTRY_FILE, meta)
        return folder / REGISTRY_FILE

    @classmethod
    def exists(cls, folder: str | Path) -> bool:
        return (Path(folder) / REGISTRY_FILE).is_file()

    @classmethod
    def load(cls, folder: str | Path, lm=None) -> "EditRegistry":
        """Read a registry (checked against ``lm`` when given)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        path = folder / REGISTRY_FILE if folder.is_dir() or not folder.suffix else folder
        folder = path.parent
        if not path.is_file():
            raise SaeforgeError(f"no edit registry at {folder} ({REGISTRY_FILE} is missing)",
                                "pass the folder `saeforge edit apply` wrote (the edited model's folder)")
        try:
            meta = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise SaeforgeError(f"{path} is not a saeforge edit registry ({err})",
                                "pass the folder `saeforge edit apply` wrote") from err
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise SaeforgeError(f"{path} is not a saeforge edit registry", "pass the folder `saeforge edit apply` "
                                "wrote")
        records = [EditRecord(**{**r, "neurons": tuple(r["neurons"]), "latents": tuple(r.get("latents", ())),
                                 "latent_scores": tuple(r.get("latent_scores", ()))}) for r in meta["records"]]
        reg = cls(meta["model_fingerprint"], meta["model_name"], int(meta["layer"]), int(meta["d_mlp"]),
                  meta.get("sae", ""), records)
        masks_path = folder / MASKS_FILE
        if not masks_path.is_file():
            raise SaeforgeError(f"{masks_path} is missing beside {path}", "copy the whole registry folder")
        masks = load_file(str(masks_path))["masks"].bool()
        if masks.shape != (len(records), reg.d_mlp) or not torch.equal(masks, reg.masks()):
            raise SaeforgeError(f"the masks in {masks_path} disagree with the records in {path}",
                                "the registry was changed by hand or half-copied; restore both files together")
        if lm is not None:
            reg.check_model(lm, where=f"the edit registry {folder}")
        return reg
