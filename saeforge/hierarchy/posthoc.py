"""Trees built after training: the post-hoc baseline (independently trained SAEs of growing widths, each latent
of a wider SAE linked to the most similar latent of the next narrower one, by HSAE's own rule) and a Matryoshka
SAE's groups read as levels."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from saeforge.errors import SaeforgeError
from saeforge.hierarchy.tree import FeatureTree, TreeLevel, decoder_fingerprint
from saeforge.saes.hsae import TREE_SIMILARITIES, assign_by_score, assign_parents

__all__ = ["coactivation_scores", "link_levels", "link_saes", "matryoshka_tree"]


def _vectors(sae, sl: slice, similarity: str):
    if similarity == "encoder":
        return sae.W_enc.detach()[:, sl].T
    return sae.W_dec.detach()[sl]


def _check_rule(similarity: str, unassigned_fraction: float, has_activations: bool = False) -> None:
    if similarity not in TREE_SIMILARITIES:
        raise SaeforgeError(f"unknown similarity {similarity!r}", f"pass --similarity {' or '.join(TREE_SIMILARITIES)}")
    if similarity == "coactivation" and not has_activations:
        raise SaeforgeError("the co-activation rule needs activations to count co-firing on",
                            "pass activations=[batch, ...] (the SAEs' training data), or similarity='encoder'")
    if not 0 <= unassigned_fraction < 1:
        raise SaeforgeError(f"the unassigned fraction must be in [0, 1), got {unassigned_fraction!r}",
                            "pass --unassigned-fraction 0.2 (the paper's)")


@torch.no_grad()
def coactivation_scores(levels: Sequence[tuple[Any, slice]], activations: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """P(parent fires | child fires) counted on ``activations`` (batches ``[N, d_in]``), per pair of consecutive
    ``levels`` = (SAE, latent slice): ``[n_child, n_parent]``, 0 for a child that never fires."""
    fired = [torch.zeros(sl.stop - sl.start, dtype=torch.float64) for _, sl in levels]
    both = [torch.zeros(b.stop - b.start, a.stop - a.start, dtype=torch.float64)
            for (_, a), (_, b) in zip(levels, levels[1:])]
    seen = 0
    for x in activations:
        codes: dict[int, torch.Tensor] = {}  # one encode per SAE and batch (a Matryoshka's levels share one SAE)
        for sae, _ in levels:
            if id(sae) not in codes:
                codes[id(sae)] = sae.encode(x.to(sae.device, sae.dtype)) > 0
        active = [codes[id(sae)][:, sl].double().cpu() for sae, sl in levels]
        seen += x.shape[0]
        for lv, a in enumerate(active):
            fired[lv] += a.sum(0)
            if lv:
                both[lv - 1] += a.T @ active[lv - 1]
    if not seen:
        raise SaeforgeError("no activations to count co-firing on", "pass at least one batch of the SAEs' inputs")
    return [torch.where(f[:, None] > 0, c / f[:, None].clamp_min(1), torch.zeros_like(c)).float()
            for f, c in zip(fired[1:], both)]


def link_levels(kind: str, levels: Sequence[tuple[Any, slice, str, str]], *, similarity: str = "encoder",
                unassigned_fraction: float = 0.2, folder: str | Path | None = None, info: dict | None = None,
                activations: Iterable[torch.Tensor] | None = None) -> FeatureTree:
    """A tree over ``levels`` = (SAE, latent slice, name, folder as written in the tree): each latent of a level
    takes as parent the most similar latent of the level above (cosine of encoder or decoder vectors, or with
    ``similarity="coactivation"`` P(parent fires | child fires) counted on ``activations``), the
    ``unassigned_fraction`` least similar take none."""
    _check_rule(similarity, unassigned_fraction, activations is not None)
    d_in = {int(sae.cfg.d_in) for sae, *_ in levels}
    if len(d_in) > 1:
        raise SaeforgeError(f"the SAEs read inputs of different widths ({sorted(d_in)}): they are not of one site",
                            "link SAEs trained on the same site of the same model")
    parents, sims = [], []
    scores = coactivation_scores([lv[:2] for lv in levels], activations) if similarity == "coactivation" else None
    for lv, ((sae_a, sl_a, *_), (sae_b, sl_b, *_)) in enumerate(zip(levels, levels[1:])):
        if scores is not None:
            index, best = assign_by_score(scores[lv], unassigned_fraction)
        else:
            index, best = assign_parents(_vectors(sae_b, sl_b, similarity), _vectors(sae_a, sl_a, similarity),
                                         unassigned_fraction)
        parents.append(index.cpu().numpy())
        sims.append(best.cpu().numpy())
    tree_levels = [TreeLevel(name, where, (sl.start, sl.stop), decoder_fingerprint(sae, sl.start, sl.stop))
                   for sae, sl, name, where in levels]
    return FeatureTree(kind, tree_levels, parents, sims,
                       {"similarity": similarity, "unassigned_fraction": unassigned_fraction, **(info or {})},
                       Path(folder).resolve() if folder else None)


def _relative(path: Path, base: Path | None) -> str:
    if base is None:
        return str(path.resolve())
    return os.path.relpath(path.resolve(), base.resolve())


def link_saes(folders: Sequence[str | Path], *, similarity: str = "encoder", unassigned_fraction: float = 0.2,
              tree_folder: str | Path | None = None, saes: Sequence[Any] | None = None,
              activations: Iterable[torch.Tensor] | None = None) -> FeatureTree:
    """The post-hoc baseline: SAE folders of strictly growing widths (one per level, narrowest first), linked level
    by level. Paths in the tree are relative to ``tree_folder`` (where tree.json will be written), else absolute.
    ``saes`` may pass the loaded SAEs of ``folders`` (same order); ``activations``: batches to count co-firing on
    (``similarity="coactivation"``: the SAEs' training data, as an HSAE counts it while training)."""
    from saeforge.runs import _read_folder

    _check_rule(similarity, unassigned_fraction, activations is not None)
    if len(folders) < 2:
        raise SaeforgeError(f"a tree needs at least two SAEs (levels), got {len(folders)}",
                            "pass the SAE folders narrowest first: saeforge hierarchy link A/ B/ --out tree.json")
    base = Path(tree_folder) if tree_folder else None
    loaded, metas = [], []
    for i, f in enumerate(folders):
        folder = Path(f)
        if saes is not None:
            loaded.append(saes[i])
            metas.append({})
            continue
        if not (folder / "cfg.json").is_file():
            raise SaeforgeError(f"{folder} is not an SAE folder (no cfg.json)",
                                "pass SAE folders such as RUN/saes/NAME")
        sae, meta = _read_folder(folder)
        loaded.append(sae.eval())
        metas.append(meta)
    widths = [int(s.cfg.d_sae) for s in loaded]
    if any(b <= a for a, b in zip(widths, widths[1:])):
        raise SaeforgeError(f"level widths must grow from each SAE to the next, got {widths}",
                            "pass the SAE folders narrowest first, each wider than the one before")
    sites = {m.get("hook_name") for m in metas if m.get("hook_name")}
    models = {m.get("model_fingerprint") or m.get("model_name") for m in metas
              if m.get("model_fingerprint") or m.get("model_name")}
    if len(sites) > 1 or len(models) > 1:
        raise SaeforgeError(f"the SAEs come from different sites or models ({sorted(map(str, sites | models))})",
                            "link SAEs trained on the same site of the same model")
    levels = [(sae, slice(0, w), f"level_{i}", _relative(Path(f), base))
              for i, (sae, w, f) in enumerate(zip(loaded, widths, folders))]
    return link_levels("posthoc", levels, similarity=similarity, unassigned_fraction=unassigned_fraction,
                       folder=base, activations=activations)


def matryoshka_tree(folder: str | Path, *, boundaries: Sequence[int] = (), similarity: str = "encoder",
                    unassigned_fraction: float = 0.2, tree_folder: str | Path | None = None, sae=None,
                    activations: Iterable[torch.Tensor] | None = None) -> FeatureTree:
    """A Matryoshka SAE's latent groups read as levels (group 0 the coarsest), linked by the same rule.

    ``boundaries``: the prefix sizes that end each level (default: the SAE's own ``prefix_sizes``), e.g. ``(1152,
    5760)`` for levels 0..1151 and 1152..5759. Groups are disjoint blocks of one dictionary, so unlike the post-hoc
    levels their widths need not grow.
    """
    from saeforge.runs import _read_folder

    folder = Path(folder)
    if sae is None:
        if not (folder / "cfg.json").is_file():
            raise SaeforgeError(f"{folder} is not an SAE folder (no cfg.json)", "pass a Matryoshka SAE folder")
        sae = _read_folder(folder)[0].eval()
    d_sae = int(sae.cfg.d_sae)
    if not boundaries:
        boundaries = tuple(getattr(sae.cfg, "prefix_sizes", ()) or ())
        if not boundaries:
            raise SaeforgeError(f"{folder} is a {sae.architecture} SAE, which has no latent groups",
                                "pass a Matryoshka SAE, or give the level boundaries (--boundaries 1152 5760)")
    bounds = [int(b) for b in boundaries]
    if bounds[-1] != d_sae:
        bounds.append(d_sae)
    if any(b <= a for a, b in zip([0, *bounds], bounds)) or bounds[-1] > d_sae:
        raise SaeforgeError(f"level boundaries must grow and end at d_sae = {d_sae}, got {list(boundaries)}",
                            f"pass growing prefix sizes ending at {d_sae}, e.g. --boundaries {d_sae // 5} {d_sae}")
    if len(bounds) < 2:
        raise SaeforgeError("a tree needs at least two levels (groups)", "give two or more boundaries")
    base = Path(tree_folder) if tree_folder else None
    where = _relative(folder, base)
    levels = [(sae, slice(a, b), f"group_{i}", where) for i, (a, b) in enumerate(zip([0, *bounds], bounds))]
    return link_levels("matryoshka", levels, similarity=similarity, unassigned_fraction=unassigned_fraction,
                       folder=base, info={"boundaries": bounds}, activations=activations)

