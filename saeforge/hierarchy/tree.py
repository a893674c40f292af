"""Feature trees: levels of latents with a parent for (some of) the latents of every level below the first.

One file format, ``tree.json``, for every source of a tree: an HSAE (written beside its weights), the post-hoc
baseline (independently trained SAEs linked by the same rule, :mod:`saeforge.hierarchy.posthoc`) and a Matryoshka
SAE whose groups are read as levels. ::

    {
      "format": "saeforge-tree", "version": 1,
      "kind": "hsae" | "posthoc" | "matryoshka",
      "levels": [
        {"name": "level_0", "sae": ".", "latents": [0, 1152], "fingerprint": "3f0c…"},
        {"name": "level_1", "sae": ".", "latents": [1152, 5760], "fingerprint": "a91e…"}
      ],
      "parents":    [[17, -1, 3, …]],         # one list per level from the second: the parent (index within the
      "similarity": [[0.61, 0.12, 0.58, …]],  # level above) of each latent, -1 for none; and its best cosine
      "info": {"similarity": "encoder", "unassigned_fraction": 0.2, …}
    }

A level is a block of latents ``[start, stop)`` of an SAE folder (``sae``, relative to the tree file's folder, or
absolute); indices in ``parents`` are *within* the level (latent ``start + i`` of its SAE is index ``i``). The
fingerprint (SHA-256 of the level's decoder rows, float32) ties the tree to the weights it was built from:
:meth:`FeatureTree.load_levels` refuses SAEs whose widths or weights do not match.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from saeforge.errors import SaeforgeError
from saeforge.utils.atomic import atomic_write_json

__all__ = ["TREE_FILE", "TREE_FORMAT", "TREE_KINDS", "FeatureTree", "TreeLevel", "decoder_fingerprint"]

TREE_FORMAT = "saeforge-tree"
TREE_VERSION = 1
TREE_FILE = "tree.json"
TREE_KINDS = ("hsae", "posthoc", "matryoshka")


def decoder_fingerprint(sae, start: int, stop: int) -> str:
    """SHA-256 (first 16 hex digits) of decoder rows ``[start, stop)`` as float32 bytes."""
    rows = sae.W_dec.detach()[start:stop].to("cpu", torch.float32).contiguous().numpy()
    return hashlib.sha256(rows.tobytes()).hexdigest()[:16]


@dataclass(frozen=True)
class TreeLevel:
    name: str
    sae: str                  # SAE folder, relative to the tree file's folder (or absolute)
    latents: tuple[int, int]  # [start, stop) within that SAE
    fingerprint: str = ""

    @property
    def width(self) -> int:
        return self.latents[1] - self.latents[0]

    @property
    def slice(self) -> slice:
        return slice(*self.latents)


@dataclass
class FeatureTree:
    """Levels and the parent of every latent below the first level. ``parents[l - 1][i]`` is the parent (index in
    level ``l - 1``) of latent ``i`` of level ``l``, or -1."""

    kind: str
    levels: list[TreeLevel]
    parents: list[np.ndarray]
    similarity: list[np.ndarray] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    folder: Path | None = None  # where relative ``sae`` paths resolve (the tree file's folder)

    def __post_init__(self) -> None:
        self.parents = [np.asarray(p, dtype=np.int64) for p in self.parents]
        if not self.similarity:
            self.similarity = [np.zeros(len(p), dtype=np.float32) for p in self.parents]
        self.similarity = [np.asarray(s, dtype=np.float32) for s in self.similarity]
        self.validate()

    # ---- checks ----
    def validate(self, where: str = "the tree") -> None:
        def need(ok: bool, problem: str) -> None:
            if not ok:
                raise SaeforgeError(f"{where}: {problem}",
                                    "rebuild it: `saeforge hierarchy link SAE_FOLDERS... --out tree.json` (an HSAE "
                                    "writes its own tree.json when it is saved)")

        need(self.kind in TREE_KINDS, f"unknown kind {self.kind!r} (known: {', '.join(TREE_KINDS)})")
        need(len(self.levels) >= 1, "it has no levels")
        for lv in self.levels:
            need(0 <= lv.latents[0] < lv.latents[1], f"level {lv.name!r} has an empty latent range {list(lv.latents)}")
        need(len(self.parents) == len(self.levels) - 1,
             f"{len(self.levels)} levels need {len(self.levels) - 1} parent lists, it has {len(self.parents)}")
        need(len(self.similarity) == len(self.parents), "similarity and parents lists differ in number")
        for lv, (p, s) in enumerate(zip(self.parents, self.similarity), start=1):
            width, above = self.levels[lv].width, self.levels[lv - 1].width
            need(p.shape == (width,), f"level {lv} has {width} latents but {p.shape[0] if p.ndim else 0} parents")
            need(s.shape == (width,), f"level {lv} has {width} latents but {s.shape[0] if s.ndim else 0} similarities")
            need(bool(((p >= -1) & (p < above)).all()),
                 f"a parent index of level {lv} lies outside level {lv - 1} (0..{above - 1})")

    # ---- reading ----
    @property
    def n_levels(self) -> int:
        return len(self.levels)

    @property
    def widths(self) -> list[int]:
        return [lv.width for lv in self.levels]

    def children(self, level: int, index: int) -> np.ndarray:
        """Indices (in ``level + 1``) of the children of latent ``index`` of ``level``."""
        self._check_level(level, below=True)
        return np.flatnonzero(self.parents[level] == index)

    def parent(self, level: int, index: int) -> int:
        """Parent (index in ``level - 1``) of latent ``index`` of ``level``, or -1."""
        self._check_level(level)
        if level == 0:
            return -1
        return int(self.parents[level - 1][index])

    def pairs(self, level: int) -> tuple[np.ndarray, np.ndarray]:
        """(parent indices in ``level``, child indices in ``level + 1``) of every assigned pair."""
        self._check_level(level, below=True)
        child = np.flatnonzero(self.parents[level] >= 0)
        return self.parents[level][child], child

    def n_pairs(self) -> int:
        return int(sum((p >= 0).sum() for p in self.parents))

    def _check_level(self, level: int, below: bool = False) -> None:
        top = self.n_levels - (1 if below else 0)
        if not 0 <= level < top:
            raise SaeforgeError(f"level {level} is out of range: the tree has levels 0..{self.n_levels - 1}"
                                + (" (the last has no children)" if below else ""), f"pick a level below {top}")

    def sae_folder(self, level: int) -> Path:
        path = Path(self.levels[level].sae)
        return path if path.is_absolute() or self.folder is None else (self.folder / path).resolve()

    def summary(self) -> dict[str, Any]:
        """Widths, pairs, parents with children and children per parent, per level pair."""
        out = {"kind": self.kind, "widths": self.widths, "levels": []}
        for lv, p in enumerate(self.parents):
            counts = np.bincount(p[p >= 0], minlength=self.levels[lv].width)
            out["levels"].append({"parent_level": lv, "pairs": int((p >= 0).sum()),
                                  "unassigned": int((p < 0).sum()), "parents_with_children": int((counts > 0).sum()),
                                  "max_children": int(counts.max()) if counts.size else 0,
                                  "mean_children": float(counts[counts > 0].mean()) if (counts > 0).any() else 0.0})
        return out

    # ---- SAEs ----
    def load_levels(self, *, device: str | torch.device = "cpu", saes: dict[str, Any] | None = None,
                    check: bool = True) -> list[tuple[Any, slice]]:
        """(SAE, latent slice) of every level, each folder loaded once; ``saes`` maps folders (as resolved paths) to
        already loaded SAEs. With ``check``, widths and decoder fingerprints must match the tree."""
        from saeforge.runs import _read_folder

        loaded: dict[str, Any] = {str(Path(k).resolve()): v for k, v in (saes or {}).items()}
        out = []
        for i, lv in enumerate(self.levels):
            folder = self.sae_folder(i)
            key = str(folder.resolve())
            if key not in loaded:
                if not folder.is_dir():
                    raise SaeforgeError(f"level {lv.name!r} of the tree names the SAE folder {folder}, which does not "
                                        "exist", "keep tree.json beside the SAE folders it names, or rebuild it with "
                                        "`saeforge hierarchy link`")
                loaded[key] = _read_folder(folder)[0].to(device).eval()
            sae = loaded[key]
            if check:
                self._check_level_sae(i, sae, folder)
            out.append((sae, lv.slice))
        return out

    def _check_level_sae(self, i: int, sae, folder: Path) -> None:
        lv = self.levels[i]
        fix = ("rebuild the tree from these SAEs (`saeforge hierarchy link ... --out tree.json`), or point it at the "
               "SAEs it was built from")
        if lv.latents[1] > sae.cfg.d_sae:
            raise SaeforgeError(f"the tree's level {lv.name!r} spans latents {lv.latents[0]}..{lv.latents[1] - 1}, but "
                                f"the SAE {folder} has only {sae.cfg.d_sae}", fix)
        if lv.fingerprint and decoder_fingerprint(sae, *lv.latents) != lv.fingerprint:
            raise SaeforgeError(f"the tree's level {lv.name!r} does not match the weights of {folder} (its decoder "
                                "fingerprint differs: the SAE was retrained or replaced)", fix)

    # ---- files ----
    def to_dict(self, similarity_digits: int = 4) -> dict[str, Any]:
        return {"format": TREE_FORMAT, "version": TREE_VERSION, "kind": self.kind,
                "levels": [{"name": lv.name, "sae": lv.sae, "latents": list(lv.latents),
                            "fingerprint": lv.fingerprint} for lv in self.levels],
                "parents": [p.tolist() for p in self.parents],
                "similarity": [np.round(s.astype(np.float64), similarity_digits).tolist() for s in self.similarity],
                "info": self.info}

    def save(self, path: str | Path) -> Path:
        """Write ``tree.json`` atomically. SAE paths stay as given (relative ones resolve from the file's folder)."""
        path = Path(path)
        atomic_write_json(path, self.to_dict())
        self.folder = path.parent.resolve()
        return path

    @classmethod
    def load(cls, path: str | Path) -> "FeatureTree":
        path = Path(path)
        if path.is_dir():
            path = path / TREE_FILE
        if not path.is_file():
            raise SaeforgeError(f"no tree file at {path}",
                                "pass a tree.json (an HSAE folder has one; `saeforge hierarchy link` writes one)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise SaeforgeError(f"{path} is not valid JSON: {err}", "rebuild it with `saeforge hierarchy link`") from err
        return cls.from_dict(data, folder=path.parent.resolve(), where=str(path))

    @classmethod
    def from_dict(cls, data: Any, *, folder: Path | None = None, where: str = "the tree") -> "FeatureTree":
        fix = "rebuild it with `saeforge hierarchy link SAE_FOLDERS... --out tree.json`"
        if not isinstance(data, dict) or data.get("format") != TREE_FORMAT:
            raise SaeforgeError(f"{where} is not a saeforge tree file (format {TREE_FORMAT!r})", fix)
        if not isinstance(data.get("version"), int) or data["version"] > TREE_VERSION:
            raise SaeforgeError(f"{where} has tree format version {data.get('version')!r}; this saeforge reads up "
                                f"to {TREE_VERSION}", "upgrade saeforge")
        try:
            levels = [TreeLevel(str(lv["name"]), str(lv["sae"]), (int(lv["latents"][0]), int(lv["latents"][1])),
                                str(lv.get("fingerprint", ""))) for lv in data["levels"]]
            parents = [np.asarray(p, dtype=np.int64) for p in data["parents"]]
            similarity = [np.asarray(s, dtype=np.float32) for s in data.get("similarity") or []]
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise SaeforgeError(f"{where} is damaged: {err!r}", fix) from err
        tree = cls.__new__(cls)
        tree.kind, tree.levels, tree.parents = str(data.get("kind")), levels, parents
        tree.similarity = similarity or [np.zeros(len(p), dtype=np.float32) for p in parents]
        tree.info, tree.folder = dict(data.get("info") or {}), folder
        tree.validate(where)
        return tree

    # ---- builders ----
    @classmethod
    def from_hsae(cls, hsae, folder: str | Path | None = None, *, levels: Sequence[Path] | None = None
                  ) -> "FeatureTree":
        """The tree of an HSAE; its levels are latent blocks of the HSAE folder itself (``sae: "."``)."""
        cfg = hsae.cfg
        lvls = [TreeLevel(f"level_{i}", ".", (sl.start, sl.stop), decoder_fingerprint(hsae, sl.start, sl.stop))
                for i, sl in enumerate(cfg.level_slices)]
        parents = [hsae.parent_index[sl].cpu().numpy() for sl in cfg.level_slices[1:]]
        sims = [hsae.parent_similarity[sl].cpu().numpy() for sl in cfg.level_slices[1:]]
        info = {"similarity": cfg.tree_similarity, "unassigned_fraction": cfg.unassigned_fraction,
                "tree_updates": int(hsae.tree_updates), "level_sizes": list(cfg.level_sizes),
                "target_l0": list(cfg.target_l0),
                "l0_coefficient": [float(v) for v in hsae.level_l0_coefficient],
                "training_l0_ema": [float(v) for v in hsae.level_l0_ema]}
        if levels:
            info["level_folders"] = [str(p) for p in levels]
        return cls("hsae", lvls, parents, sims, info, Path(folder).resolve() if folder else None)

