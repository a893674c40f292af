"""HSAE: hierarchical sparse autoencoders (Luo et al., "From Atoms to Trees: Building a Structured Feature Forest with
Hierarchical Sparse Autoencoders", arXiv 2602.11881). See ``docs/hierarchy.md``.

L JumpReLU SAEs of growing widths n_0 < n_1 < ... (the *levels*) read the same input and are trained jointly. Every
level-(ℓ+1) latent may have one parent at level ℓ; with f_{ℓ,i}(x) = d_{ℓ,i} σ(e_{ℓ,i}·x) the vector a latent adds to
its level's reconstruction and C_{ℓ,i} the children of (ℓ, i):

    L = Σ_ℓ [ ||x − x̃_ℓ||² + λ_ℓ L0_ℓ ]  +  ρ Σ_ℓ Σ_i || f_{ℓ,i}(x) − Σ_{j∈C_{ℓ,i}} f_{ℓ+1,j}(x) ||²

- **Tree**: every ``tree_update_every`` steps (default: the paper's 5,000, or a fifth of a shorter run) each child
  takes as parent the level-up latent whose encoder vector (``tree_similarity="decoder"``: decoder vector) has the
  largest cosine with its own; the ``unassigned_fraction`` (20 %) of children with the lowest best cosine stay
  without a parent. ``tree_similarity="coactivation"`` (the paper's App. F.1 alternative) takes instead the parent
  with the highest P(parent fires | child fires), from EMAs of the training batches' firing (window: half the
  update interval; state: n_ℓ × n_{ℓ-1} floats per level pair), and leaves out the lowest. The first tree is built
  after the first ``tree_update_every`` steps (a tree of freshly initialised latents would be noise); until then
  the structural term is 0. A last update follows the last step, so that the saved tree is the rule applied to
  the saved weights.
- **Random perturbation**: in x̃_ℓ each parent that has children is replaced, with probability
  ``perturbation_rate`` (5 %), by the sum of its children's vectors; one draw per parent per step, shared by the
  batch. (The paper's formula, read literally, keeps the parent with probability r; its prose and its r = 5 % say
  substitution with probability r, which is what this does.)
- **Adaptive sparsity**: λ_ℓ follows each level's L0 to ``target_l0`` along the paper's trajectory
  T ← T − η (T − target): an EMA of the level's L0 is compared with T every step and log λ_ℓ moves by
  ``sparsity_adapt_rate`` × the relative gap (clipped to ±1). The paper gives the trajectory (η = 0.001, L0 EMA
  0.999) but not the update itself; this one is saeforge's choice. η defaults to the paper's 0.001 in runs of 20,000
  steps or more and to 20 / steps in shorter ones (the target is reached within the first fifth of the run); the EMA
  decay to 1 − 100 / steps within [0.8, 0.999]: a slow EMA makes the controller overshoot in short runs, and the
  latents an overshoot pushes below their thresholds die. Dead latents get Anthropic's pre-activation loss
  (``pre_act_loss_coefficient``, see :mod:`saeforge.saes.jumprelu`) where the paper used ghost grads. Each
  threshold starts at the quantile of its latent's pre-activations on the initialisation sample where the level
  fires ``initial_l0_factor`` (2) × its target L0 (saeforge's choice: a threshold moves by Adam steps of its
  logarithm, and from a fixed guess it would need thousands of steps to reach its scale).

Parameters: the levels' latents are the consecutive blocks of one ``W_enc [d_in, Σn]``, ``W_dec [Σn, d]`` (unit
rows), ``b_enc`` and ``log_threshold``; the levels share ``b_dec``. Each level is exactly a JumpReLU SAE
(:meth:`HSAE.level_sae`). The HSAE as a whole is the *average* of its levels: ``encode`` gives every level's latents
side by side and ``decode`` averages the level reconstructions (which is again a JumpReLU, with decoder rows
divided by L: what SAELens sees). Saving writes, beside the whole, ``levels/level_<ℓ>/`` (each an ordinary
JumpReLU folder SAELens loads) and ``tree.json`` (:mod:`saeforge.hierarchy.tree`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from saeforge.errors import SaeforgeError
from saeforge.saes.base import SAE, SAEConfig, TrainOutput, TrainState, _flatten, _is_int, _is_number, _require, option_fix
from saeforge.saes.jumprelu import JumpReLUConfig, JumpReLUFunction, JumpReLUSAE, StepFunction
from saeforge.saes.registry import register_sae

__all__ = ["HSAE", "HSAEConfig", "TREE_SIMILARITIES", "assign_by_score", "assign_parents", "coactivation_decay",
           "default_level_sizes", "default_target_l0", "default_tree_update_every", "structure_loss"]

TREE_SIMILARITIES = ("encoder", "decoder", "coactivation")
L0_ENERGIES = ("mean", "median")
PAPER_TARGET_L0 = 50  # the paper's target L0 per level (Gemma-2-2B)
# Sibling groups up to this size enter the structural loss through one sparse Gram product; larger ones (a parent
# that collected many children) through a dense product each, so the cost stays linear in the number of children.
SMALL_GROUP = 64


def default_level_sizes(d_sae: int) -> tuple[int, ...]:
    """Up to four levels, each twice as wide as the one above (the paper's 2k/4k/8k/16k), adding up to ``d_sae``:
    the most levels whose narrowest is at least 4 latents (the widest takes the rounding remainder)."""
    for n_levels in (4, 3, 2):
        unit = d_sae // (2**n_levels - 1)
        if unit >= 4:
            sizes = [unit * 2**i for i in range(n_levels - 1)]
            return (*sizes, d_sae - sum(sizes))
    return (d_sae,)


def default_tree_update_every(total_steps: int) -> int:
    """The paper's 5,000 steps (a twentieth of its ~100,000), but at least a twentieth and at most a fifth of the run:
    the tree of latents that are still forming is mostly noise, and the structural loss then entrenches it (measured
    on synthetic trees, docs/hierarchy.md)."""
    return max(1, total_steps // 20, min(5000, total_steps // 5))


def coactivation_decay(tree_update_every: int) -> float:
    """Decay of the co-firing EMA behind ``tree_similarity="coactivation"``: an effective window of half the interval
    between tree updates (at most 1,000 steps), so each update reads the recent weights' firing, not that of
    latents long since changed."""
    return min(0.999, max(0.5, 1.0 - 2.0 / max(int(tree_update_every), 1)))


def default_target_l0(width: int) -> float:
    """The paper's 50 active latents per level, at most an eighth of a narrow level's width (and at least 1)."""
    return float(max(1, min(PAPER_TARGET_L0, width // 8)))


@dataclass(frozen=True)
class HSAEConfig(JumpReLUConfig):
    architecture: ClassVar[str] = "hsae"
    sparsity_coefficient_field: ClassVar[str | None] = "l0_coefficient"
    # Adam 1e-3 at 2^14 latents, scaled by 1/sqrt(d_sae) as for the TopK family (measured in docs/hierarchy.md);
    # JumpReLU's 7e-5 is for Gemma Scope's far longer runs.
    lr_coefficient: ClassVar[float] = 1e-3

    # Widths of the levels, strictly growing, adding up to d_sae (with level_sizes given and d_sae not, `saeforge
    # train` takes d_sae from them). Empty: default_level_sizes(d_sae).
    level_sizes: tuple[int, ...] = ()
    # Target L0 of each level (one value: every level). Empty: default_target_l0(width) per level.
    target_l0: tuple[float, ...] = ()
    # Adapt each level's λ towards its target L0 (False: λ keeps its starting value).
    adaptive_sparsity: bool = True
    # λ_ℓ starts at l0_coefficient × E / target_l0_ℓ, E the initialisation sample's energy (see l0_energy), so the
    # penalty of the target L0 is a fixed fraction of the data's energy whatever the input scale; without an
    # initialisation sample, at l0_coefficient. The adaptive λ settles near 0.07 × E / target on both the
    # synthetic trees and SmolLM2's layer-15 residual (docs/hierarchy.md, "Ground truth"): starting a little below
    # it, L0 falls to its target without the overshoot that a λ far above it causes (latents pushed under their
    # thresholds).
    l0_coefficient: float = 0.05
    # E: "median" of ||x − b_dec||², the energy of a typical token, or "mean" of ||x||², which a few
    # massive-activation tokens dominate (SmolLM2's residual at layer 15: norms up to 150× the mean; the mean
    # ||x||² 4.8× the median ||x − b_dec||²).
    l0_energy: str = "median"
    # The thresholds start where each latent fires on this multiple of target_l0 / width of the initialisation
    # sample's tokens (0: at threshold_init): a threshold learns by Adam steps of its logarithm, far too slowly to
    # travel from a guess to its scale in a run of a few hundred steps.
    initial_l0_factor: float = 2.0
    # The thresholds learn this many times faster than the other parameters (the parameter log_threshold holds
    # log θ / threshold_lr_scale): the L0 penalty reaches the latents only through their thresholds, and at one
    # learning rate for all the encoder outgrows them in short runs, so L0 rises however large λ gets.
    threshold_lr_scale: float = 10.0
    # Let the L0 penalty's pseudo-gradient reach the pre-activations (hence the encoder) too, as in Anthropic's 2025
    # JumpReLU, not the thresholds alone: the encoder learns far faster than a threshold moves, and without this the
    # reconstruction pushes L0 up however large λ grows.
    l0_penalty_to_encoder: bool = True
    # ρ, weight of the parent-children structural loss (paper: 0.01).
    structure_coefficient: float = 0.01
    # r, probability that a parent with children is replaced by their sum in its level's reconstruction (paper: 5 %).
    perturbation_rate: float = 0.05
    # Rebuild the tree every this many steps; 0: default_tree_update_every (the paper's 5,000, a fifth of shorter runs).
    tree_update_every: int = 0
    # What a child's parent is chosen by: cosine of encoder vectors (the paper's default), of decoder vectors, or
    # "coactivation": P(parent fires | child fires), from an exponential moving average of the batches' firing
    # during training (the paper's App. F.1 alternative; the post-hoc baseline counts it on data).
    tree_similarity: str = "encoder"
    # Fraction of children, those with the lowest best cosine, left without a parent (paper: 20 %).
    unassigned_fraction: float = 0.2
    # Step size of log λ per step at a relative L0 gap of 1.
    sparsity_adapt_rate: float = 0.02
    # η of the L0 trajectory and the decay of the L0 EMA; 0: the paper's 0.001 / 0.999, faster in short runs.
    l0_trajectory_rate: float = 0.0
    l0_ema_decay: float = 0.0
    # Anthropic's pre-activation loss for dead latents (saes/jumprelu.py), where the paper used ghost grads: without
    # it, latents that the rising λ pushes below their threshold get no gradient again.
    pre_act_loss_coefficient: float = 0.01
    # JumpReLU's ε and initial θ, at the scale of saeforge's default input scaling (E||x|| = sqrt(d), where
    # pre-activations start at unit scale); Gemma Scope's 0.001 suits E||x||² = 1.
    bandwidth: float = 0.05
    threshold_init: float = 0.1

    @classmethod
    def default_lr(cls, d_sae: int) -> float:
        return cls.lr_coefficient / math.sqrt(d_sae / 2**14)

    @classmethod
    def from_training_options(cls, *, d_in: int, d_sae: int, d_out: int | None = None, k: int,
                              sparsity_coefficient: float, dead_after_tokens: int,
                              options: dict[str, Any] | None = None, read_widths: tuple[int, ...] = (),
                              write_widths: tuple[int, ...] = ()) -> SAEConfig:
        """As for every architecture; ``level_sizes`` given without ``d_sae`` sets d_sae to their sum (the generic
        --d-sae / --expansion-factor then do not apply)."""
        options = dict(options or {})
        levels = options.get("level_sizes")
        if isinstance(levels, (list, tuple)) and levels and "d_sae" not in options and all(_is_int(v) for v in levels):
            d_sae = sum(levels)
        return super().from_training_options(d_in=d_in, d_sae=d_sae, d_out=d_out, k=k,
                                             sparsity_coefficient=sparsity_coefficient,
                                             dead_after_tokens=dead_after_tokens, options=options,
                                             read_widths=read_widths, write_widths=write_widths)

    def __post_init__(self) -> None:
        for name in ("level_sizes", "target_l0"):
            v = getattr(self, name)
            if isinstance(v, list):
                self._set(name, tuple(v))
            elif _is_number(v):
                self._set(name, (v,))
        super().__post_init__()
        a = self.architecture
        _require(not self.apply_b_dec_to_input,
                 f"{a}: apply_b_dec_to_input must be false (the levels read the same input and share b_dec)",
                 option_fix(self, "apply_b_dec_to_input", False))
        if self.level_sizes == ():
            self._set("level_sizes", default_level_sizes(self.d_sae))
        sizes = self.level_sizes
        example = list(default_level_sizes(self.d_sae))
        _require(isinstance(sizes, tuple) and len(sizes) > 0 and all(_is_int(s) and s > 0 for s in sizes),
                 f"{a}: level_sizes must be a non-empty list of positive integers, got {sizes!r}",
                 option_fix(self, "level_sizes", example, "(or leave it out for that default)"))
        _require(all(b > s for s, b in zip(sizes, sizes[1:])),
                 f"{a}: level widths must grow from each level to the next, got {list(sizes)}",
                 option_fix(self, "level_sizes", sorted(set(sizes)) if len(set(sizes)) > 1 else example,
                            "(each level wider than the one above)"))
        _require(sum(sizes) == self.d_sae,
                 f"{a}: level_sizes add up to {sum(sizes)}, but d_sae is {self.d_sae}",
                 f"pass --d-sae {sum(sizes)} (or leave --d-sae out: level_sizes set it), or level sizes adding up to "
                 f"{self.d_sae}")
        targets = self.target_l0
        if targets == ():
            targets = tuple(default_target_l0(s) for s in sizes)
        elif len(targets) == 1:
            targets = targets * len(sizes)
        _require(len(targets) == len(sizes) and all(_is_number(t) and t > 0 for t in targets),
                 f"{a}: target_l0 must hold one positive number, or one per level ({len(sizes)}), got {targets!r}",
                 option_fix(self, "target_l0", [default_target_l0(s) for s in sizes]))
        for level, (t, s) in enumerate(zip(targets, sizes)):
            _require(t < s, f"{a}: target L0 {t:g} of level {level} is not below its width {s} (a level cannot "
                            f"have more active latents than it has latents)",
                     option_fix(self, "target_l0", [min(float(t), default_target_l0(s)) for t, s in zip(targets, sizes)],
                                "(each below its level's width)"))
        self._set("target_l0", tuple(float(t) for t in targets))
        _require(self.l0_energy in L0_ENERGIES, f"{a}: l0_energy must be one of {', '.join(L0_ENERGIES)}, got "
                                                 f"{self.l0_energy!r}", option_fix(self, "l0_energy", "median"))
        _require(isinstance(self.adaptive_sparsity, bool),
                 f"{a}: adaptive_sparsity must be true or false, got {self.adaptive_sparsity!r}",
                 option_fix(self, "adaptive_sparsity", True))
        for name, lo, hi, default in (("structure_coefficient", 0.0, math.inf, 0.01),
                                      ("perturbation_rate", 0.0, 1.0, 0.05),
                                      ("unassigned_fraction", 0.0, 1.0, 0.2),
                                      ("sparsity_adapt_rate", 0.0, math.inf, 0.02),
                                      ("l0_trajectory_rate", 0.0, 1.0, 0.0),
                                      ("l0_ema_decay", 0.0, 1.0, 0.0)):
            v = getattr(self, name)
            ok = _is_number(v) and lo <= v and (v < hi if name in ("unassigned_fraction", "l0_ema_decay") else v <= hi)
            _require(ok, f"{a}: {name} must be a number in [{lo:g}, {hi:g}{')' if name in ('unassigned_fraction', 'l0_ema_decay') else ']'}, got {v!r}",
                     option_fix(self, name, default, "(the default)"))
        _require(_is_number(self.initial_l0_factor) and self.initial_l0_factor >= 0,
                 f"{a}: initial_l0_factor must be a non-negative number, got {self.initial_l0_factor!r}",
                 option_fix(self, "initial_l0_factor", 2.0, "(0: start at threshold_init)"))
        _require(_is_number(self.threshold_lr_scale) and self.threshold_lr_scale > 0,
                 f"{a}: threshold_lr_scale must be a positive number, got {self.threshold_lr_scale!r}",
                 option_fix(self, "threshold_lr_scale", 10.0, "(1: the thresholds learn at the common rate)"))
        _require(_is_int(self.tree_update_every) and self.tree_update_every >= 0,
                 f"{a}: tree_update_every must be a non-negative integer, got {self.tree_update_every!r}",
                 option_fix(self, "tree_update_every", 0, "(the default)"))
        _require(self.tree_similarity in TREE_SIMILARITIES, f"{a}: unknown tree_similarity {self.tree_similarity!r}",
                 option_fix(self, "tree_similarity", "encoder", f"(one of {', '.join(TREE_SIMILARITIES)})"))

    def _default_apply_b_dec_to_input(self) -> bool:
        return False

    # ---- derived ----
    @property
    def n_levels(self) -> int:
        return len(self.level_sizes)

    @property
    def level_slices(self) -> tuple[slice, ...]:
        """The latents of each level in the whole HSAE (consecutive blocks)."""
        out, start = [], 0
        for s in self.level_sizes:
            out.append(slice(start, start + s))
            start += s
        return tuple(out)


# --------------------------------------------------------------------------------------------------------------
# The assignment rule and the structural loss (also used by the post-hoc baseline, saeforge.hierarchy.posthoc)
# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def assign_parents(children: Tensor, parents: Tensor, unassigned_fraction: float = 0.2, *,
                   chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """Each child (row of ``children [n_c, d]``) takes as parent the row of ``parents [n_p, d]`` with the largest
    cosine; the ``floor(unassigned_fraction · n_c)`` children with the lowest best cosine get no parent (-1).

    Returns (parent index int64 [n_c], best cosine float32 [n_c]). Ties go to the lower parent index; children
    with equal best cosines are left unassigned in index order, so the result is deterministic.
    """
    if children.dim() != 2 or parents.dim() != 2 or children.shape[1] != parents.shape[1]:
        raise SaeforgeError(f"assign_parents needs [n_c, d] and [n_p, d] vectors, got {tuple(children.shape)} and "
                            f"{tuple(parents.shape)}", "pass the latent vectors of two levels of the same site")
    if not 0 <= unassigned_fraction < 1:
        raise SaeforgeError(f"unassigned_fraction must be in [0, 1), got {unassigned_fraction!r}",
                            "pass e.g. 0.2 (the paper's)")
    c = children.float()
    c = c / c.norm(dim=1, keepdim=True).clamp_min(1e-12)
    p = parents.float().to(c.device)
    p = p / p.norm(dim=1, keepdim=True).clamp_min(1e-12)
    best = torch.empty(c.shape[0], device=c.device)
    index = torch.empty(c.shape[0], dtype=torch.long, device=c.device)
    for s in range(0, c.shape[0], chunk):
        sim = c[s:s + chunk] @ p.T
        best[s:s + chunk], index[s:s + chunk] = sim.max(dim=1)
    return _leave_out(index, best, unassigned_fraction)


def _leave_out(index: Tensor, best: Tensor, unassigned_fraction: float) -> tuple[Tensor, Tensor]:
    """The ``floor(unassigned_fraction · n)`` children with the lowest best score lose their parent (-1)."""
    n_out = int(math.floor(unassigned_fraction * index.shape[0]))
    if n_out:
        order = torch.sort(best, stable=True).indices
        index[order[:n_out]] = -1
    return index, best


@torch.no_grad()
def assign_by_score(score: Tensor, unassigned_fraction: float = 0.2) -> tuple[Tensor, Tensor]:
    """Each child (row of ``score [n_c, n_p]``, e.g. P(parent fires | child fires)) takes the parent of the largest
    score; the ``floor(unassigned_fraction · n_c)`` children with the lowest best score get none (-1). Ties as in
    :func:`assign_parents`."""
    if score.dim() != 2 or score.shape[1] == 0:
        raise SaeforgeError(f"assign_by_score needs an [n_children, n_parents] score matrix, got {tuple(score.shape)}",
                            "pass one score per (child, parent) pair")
    if not 0 <= unassigned_fraction < 1:
        raise SaeforgeError(f"unassigned_fraction must be in [0, 1), got {unassigned_fraction!r}",
                            "pass e.g. 0.2 (the paper's)")
    best, index = score.float().max(dim=1)
    return _leave_out(index, best, unassigned_fraction)


class _TreeLayout:
    """The parent/child index arrays one level pair's structural loss and perturbation need, built once per tree."""

    def __init__(self, parent_index: Tensor, n_parents: int):
        device = parent_index.device
        assigned = torch.nonzero(parent_index >= 0).flatten()
        parent_of = parent_index[assigned]
        order = torch.sort(parent_of, stable=True).indices
        self.children = assigned[order]          # assigned children, grouped by parent
        self.parent_of = parent_of[order]        # their parents
        counts = torch.bincount(self.parent_of, minlength=n_parents)
        self.has_children = torch.nonzero(counts > 0).flatten()
        self.empty = self.children.numel() == 0
        # sibling pairs (i, j), i and j children of one parent, both orders and i == j, for groups up to SMALL_GROUP
        sizes = counts[self.parent_of]
        small = sizes <= SMALL_GROUP
        ends = torch.cumsum(counts, 0)
        starts = (ends - counts)[self.parent_of]
        pos = torch.arange(self.children.numel(), device=device)
        a = torch.repeat_interleave(pos[small], sizes[small])
        offsets = torch.arange(a.numel(), device=device) - torch.repeat_interleave(
            torch.cumsum(sizes[small], 0) - sizes[small], sizes[small])
        b = starts[a] + offsets
        self.pair_a, self.pair_b = self.children[a], self.children[b]
        self.large_groups = [self.children[self.parent_of == i] for i in torch.nonzero(counts > SMALL_GROUP).flatten()]


def structure_loss(f_parent: Tensor, f_child: Tensor, dec_parent: Tensor, dec_child: Tensor, parent_index: Tensor,
                   layout: _TreeLayout | None = None) -> Tensor:
    """Mean over the batch of Σ_i ||f_i d_i − Σ_{j: parent(j)=i} f_j e_j||² over parents with children.

    ``f_parent [N, n_p]``, ``f_child [N, n_c]`` latents; ``dec_parent [n_p, d]``, ``dec_child [n_c, d]`` decoder
    rows; ``parent_index [n_c]`` (-1: no parent). Expanded as Σ f_i²||d_i||² − 2 Σ_j f_{p(j)} f_j (d_{p(j)}·e_j)
    + Σ_i ||Σ_j f_j e_j||², so no [N, n_p, d] tensor is formed: the last term is a sparse Gram product over sibling
    pairs (and a dense product for the few parents with more than SMALL_GROUP children).
    """
    layout = layout or _TreeLayout(parent_index, f_parent.shape[1])
    if layout.empty:
        return f_parent.new_zeros(())
    has = layout.has_children
    own = (f_parent[:, has].pow(2) * dec_parent[has].pow(2).sum(-1)).sum(-1)
    cos = (dec_parent[layout.parent_of] * dec_child[layout.children]).sum(-1)
    cross = (f_parent[:, layout.parent_of] * f_child[:, layout.children] * cos).sum(-1)
    children_sq = f_parent.new_zeros(f_parent.shape[0])
    if layout.pair_a.numel():
        gram = (dec_child[layout.pair_a] * dec_child[layout.pair_b]).sum(-1)
        n_c = f_child.shape[1]
        pairs = torch.sparse_coo_tensor(torch.stack([layout.pair_a, layout.pair_b]), gram, (n_c, n_c),
                                        check_invariants=False)
        children_sq = children_sq + (f_child.T * torch.sparse.mm(pairs, f_child.T)).sum(0)
    for group in layout.large_groups:
        children_sq = children_sq + (f_child[:, group] @ dec_child[group]).pow(2).sum(-1)
    return (own - 2 * cross + children_sq).clamp_min(0).mean()  # rounding can take an exact 0 below it


class StepThroughFunction(torch.autograd.Function):
    """``H(z - θ)`` whose straight-through pseudo-derivative reaches z as well as θ: ∂H/∂z = (1/ε) K((z − θ)/ε) =
    −∂H/∂θ (Anthropic's January 2025 JumpReLU update; the paper's rule gives z none)."""

    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = float(bandwidth)
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        from saeforge.saes.jumprelu import rectangle

        z, theta = ctx.saved_tensors
        g = (1.0 / ctx.bandwidth) * rectangle((z - theta) / ctx.bandwidth) * grad_out
        return g, (-g).sum_to_size(theta.shape), None


# --------------------------------------------------------------------------------------------------------------
# HSAE
# --------------------------------------------------------------------------------------------------------------


@register_sae
class HSAE(JumpReLUSAE):
    config_class: ClassVar[type[SAEConfig]] = HSAEConfig
    cfg: HSAEConfig

    def __init__(self, cfg: HSAEConfig):
        super().__init__(cfg)
        with torch.no_grad():
            self.log_threshold.div_(cfg.threshold_lr_scale)
        n = cfg.n_levels
        # Training state that a checkpoint must carry (buffers are in state_dict, parameters are not optimised):
        self.register_buffer("level_l0_coefficient", torch.full((n,), float(cfg.l0_coefficient), dtype=torch.float32))
        self.register_buffer("level_l0_ema", torch.full((n,), -1.0, dtype=torch.float32))  # -1: not measured yet
        self.register_buffer("level_l0_trajectory", torch.full((n,), -1.0, dtype=torch.float32))
        # the tree: parent of every latent in the level above (local index), -1 for none (and for level 0)
        self.register_buffer("parent_index", torch.full((cfg.d_sae,), -1, dtype=torch.long))
        self.register_buffer("parent_similarity", torch.zeros(cfg.d_sae, dtype=torch.float32))
        self.register_buffer("tree_updates", torch.tensor(0, dtype=torch.long))
        if cfg.tree_similarity == "coactivation":
            # EMAs of each latent's firing rate and, per level from the second, of the rate at which each latent
            # fires together with each latent one level up: P(parent | child) is their ratio (the EMAs start at 0
            # with one decay, so the ratio needs no bias correction)
            self.register_buffer("firing_ema", torch.zeros(cfg.d_sae, dtype=torch.float32))
            for lv in range(1, n):
                self.register_buffer(f"coactivation_ema_{lv}",
                                     torch.zeros(cfg.level_sizes[lv], cfg.level_sizes[lv - 1], dtype=torch.float32))
        self._layouts: dict[int, _TreeLayout] = {}
        self._layout_key: tuple | None = None
        self._step_level_l0: Tensor | None = None  # per-level L0 of the last training forward, read by after_step
        self._step_active: Tensor | None = None    # its firing [N, d_sae], for the co-activation EMA

    @property
    def threshold(self) -> Tensor:
        return torch.exp(self.log_threshold * self.cfg.threshold_lr_scale)

    @torch.no_grad()
    def _scale_latents(self, factor: Tensor) -> None:
        SAE._scale_latents(self, factor)
        self.log_threshold.add_((torch.log(factor.to(torch.float64)) / self.cfg.threshold_lr_scale).to(self.dtype))

    # ---- levels ----
    @property
    def n_levels(self) -> int:
        return self.cfg.n_levels

    def level_latents(self, f: Tensor, level: int) -> Tensor:
        """The latents of one level from the whole HSAE's latents ``[..., d_sae]``."""
        return f[..., self.cfg.level_slices[level]]

    def level_parents(self, level: int) -> Tensor:
        """Parent (index in level ``level - 1``) of each latent of ``level`` (≥ 1); -1: none."""
        if not 1 <= level < self.n_levels:
            raise SaeforgeError(f"level {level} has no parents: this HSAE has levels 0..{self.n_levels - 1}",
                                "ask for a level from 1 on")
        return self.parent_index[self.cfg.level_slices[level]]

    @torch.no_grad()
    def level_sae(self, level: int) -> JumpReLUSAE:
        """Level ``level`` as an ordinary JumpReLU SAE (the same encoder, decoder, thresholds and b_dec)."""
        if not 0 <= level < self.n_levels:
            raise SaeforgeError(f"this HSAE has levels 0..{self.n_levels - 1}, not {level}",
                                f"pick a level below {self.n_levels}")
        c = self.cfg
        sl = c.level_slices[level]
        cfg = JumpReLUConfig(d_in=c.d_in, d_sae=c.level_sizes[level], d_out=c.d_out, dtype=c.dtype,
                             apply_b_dec_to_input=False, b_dec_init=c.b_dec_init,
                             l0_coefficient=float(self.level_l0_coefficient[level]), bandwidth=c.bandwidth,
                             threshold_init=c.threshold_init, pre_act_loss_coefficient=c.pre_act_loss_coefficient)
        sae = JumpReLUSAE(cfg).to(self.device)
        sae.W_enc.copy_(self.W_enc[:, sl])
        sae.b_enc.copy_(self.b_enc[sl])
        sae.W_dec.copy_(self.W_dec[sl])
        sae.b_dec.copy_(self.b_dec)
        sae.log_threshold.copy_(self.log_threshold[sl] * c.threshold_lr_scale)
        return sae

    @torch.no_grad()
    def init_from_data(self, x_sample: Tensor, target_sample: Tensor | None = None) -> None:
        """``b_dec`` as for every SAE, each level's λ from the sample's energy (``l0_energy``), and each
        latent's threshold at the quantile of its pre-activations on the sample where it fires on
        ``initial_l0_factor × target_l0 / width`` of the tokens (at most half of them)."""
        super().init_from_data(x_sample, target_sample)
        x, _ = _flatten(x_sample.to(self.device), self.cfg.d_in, "the init sample")
        y = (target_sample if target_sample is not None else x).float()
        if self.cfg.l0_energy == "median":
            energy = float((y - self.b_dec.float()).pow(2).sum(-1).median())
        else:
            energy = float(y.pow(2).sum(-1).mean())
        targets = torch.tensor(self.cfg.target_l0, dtype=torch.float32, device=self.level_l0_coefficient.device)
        self.level_l0_coefficient.copy_(self.cfg.l0_coefficient * energy / targets)
        factor = self.cfg.initial_l0_factor
        if factor <= 0:
            return
        pre = self._pre(x).float()
        for sl, width, target in zip(self.cfg.level_slices, self.cfg.level_sizes, self.cfg.target_l0):
            rate = min(0.5, factor * target / width)
            k = min(pre.shape[0], max(1, int(math.ceil((1.0 - rate) * pre.shape[0]))))
            theta = torch.kthvalue(pre[:, sl], k, dim=0).values.clamp_min(1e-6)  # (quantile() refuses big inputs)
            self.log_threshold[sl] = (torch.log(theta) / self.cfg.threshold_lr_scale).to(self.dtype)

    # ---- inference: the average of the levels ----
    def decode(self, f: Tensor) -> Tensor:
        f2, lead = _flatten(f, self.cfg.d_sae, "the latent tensor")
        out = (f2.to(self.dtype) @ self.W_dec) / self.n_levels + self.b_dec
        return out.reshape(*lead, self.cfg.d_output)

    def level_reconstruction(self, f: Tensor, level: int) -> Tensor:
        """Level ``level``'s own reconstruction from the whole HSAE's latents ``[N, d_sae]``."""
        sl = self.cfg.level_slices[level]
        return f[:, sl].to(self.dtype) @ self.W_dec[sl] + self.b_dec

    # ---- training ----
    def _tree_layouts(self) -> dict[int, _TreeLayout]:
        key = (int(self.tree_updates), self.parent_index._version, self.parent_index.device)
        if key != self._layout_key:
            slices = self.cfg.level_slices
            self._layouts = {lv: _TreeLayout(self.parent_index[slices[lv + 1]], self.cfg.level_sizes[lv])
                             for lv in range(self.n_levels - 1)}
            self._layout_key = key
        return self._layouts

    def training_loss(self, x: Tensor, target: Tensor | None = None, *, state: TrainState) -> TrainOutput:
        x, target = self._check_batch(x, target)
        c = self.cfg
        pre = x @ self.W_enc + self.b_enc
        theta = self.threshold
        f = JumpReLUFunction.apply(pre, theta, c.bandwidth)
        active = (StepThroughFunction if c.l0_penalty_to_encoder else StepFunction).apply(pre, theta, c.bandwidth)
        slices = c.level_slices
        layouts = self._tree_layouts() if int(self.tree_updates) > 0 else {}
        terms: dict[str, Tensor] = {}
        level_l0 = []
        x_hat_sum = None
        for lv, sl in enumerate(slices):
            f_lv = f[:, sl]
            rec = f_lv @ self.W_dec[sl] + self.b_dec
            x_hat_sum = rec.detach() if x_hat_sum is None else x_hat_sum + rec.detach()
            layout = layouts.get(lv)
            if layout is not None and not layout.empty:
                rec = rec + self._perturbation(f_lv, f[:, slices[lv + 1]], self.W_dec[sl], self.W_dec[slices[lv + 1]],
                                               layout)
            l0 = active[:, sl].sum(-1).mean()
            level_l0.append(l0.detach())
            terms[f"mse_level_{lv}"] = self._squared_error(rec, target)
            terms[f"l0_level_{lv}"] = self.level_l0_coefficient[lv].to(l0.dtype) * float(state.sparsity_scale) * l0
            if layout is not None and c.structure_coefficient > 0:
                terms[f"structure_level_{lv}"] = c.structure_coefficient * structure_loss(
                    f_lv, f[:, slices[lv + 1]], self.W_dec[sl], self.W_dec[slices[lv + 1]],
                    self.parent_index[slices[lv + 1]], layout)
        if c.pre_act_loss_coefficient > 0:
            terms["pre_act"] = self._pre_act_term(pre, theta, state.dead_mask)
        self._step_level_l0 = torch.stack(level_l0).float()
        if c.tree_similarity == "coactivation":
            self._step_active = f.detach() > 0
        fired, l0_total = self._sparsity_stats(f.detach() > 0)
        x_hat = x_hat_sum / self.n_levels
        return TrainOutput(loss=sum(terms.values()), terms=terms, x_hat=x_hat, fired=fired, l0=l0_total)

    def _perturbation(self, f_parent: Tensor, f_child: Tensor, dec_parent: Tensor, dec_child: Tensor,
                      layout: _TreeLayout) -> Tensor:
        """What replacing a random ``perturbation_rate`` of the parents (those with children) by the sum of their
        children adds to the parents' level reconstruction; 0 when no parent is drawn."""
        rate = self.cfg.perturbation_rate
        if rate <= 0:
            return f_parent.new_zeros(())
        drawn = torch.rand(layout.has_children.numel(), device=f_parent.device) < rate
        if not bool(drawn.any()):
            return f_parent.new_zeros(())
        swapped = layout.has_children[drawn]
        children = layout.children[torch.isin(layout.parent_of, swapped)]
        return f_child[:, children] @ dec_child[children] - f_parent[:, swapped] @ dec_parent[swapped]

    def after_step(self, step: int, total_steps: int, dead_mask: Tensor, x: Tensor,
                   optimizer: torch.optim.Optimizer) -> None:
        """Adapt each level's λ to its target L0, and rebuild the tree every ``tree_update_every`` steps and after
        the last step (the saved tree is the rule applied to the saved weights, not to those of up to a fifth of
        the run before: measured on synthetic trees, docs/hierarchy.md)."""
        if self.cfg.adaptive_sparsity and self._step_level_l0 is not None:
            self._adapt_sparsity(self._step_level_l0.to(self.level_l0_ema.device), total_steps)
        self._step_level_l0 = None
        every = self.cfg.tree_update_every or default_tree_update_every(total_steps)
        if self._step_active is not None:
            self._track_coactivation(self._step_active, coactivation_decay(every))
            self._step_active = None
        if self.n_levels > 1 and ((step + 1) % every == 0 or step + 1 == total_steps):
            self.update_tree()

    @torch.no_grad()
    def _adapt_sparsity(self, l0: Tensor, total_steps: int) -> None:
        c = self.cfg
        steps = max(int(total_steps), 1)
        eta = c.l0_trajectory_rate or max(0.001, min(1.0, 20.0 / steps))
        decay = c.l0_ema_decay or min(0.999, max(0.8, 1.0 - 100.0 / steps))
        target = torch.tensor(c.target_l0, dtype=torch.float32, device=l0.device)
        first = self.level_l0_ema < 0
        self.level_l0_ema.copy_(torch.where(first, l0, decay * self.level_l0_ema + (1 - decay) * l0))
        trajectory = torch.where(first, l0, self.level_l0_trajectory)
        self.level_l0_trajectory.copy_(trajectory - eta * (trajectory - target))
        gap = (self.level_l0_ema - self.level_l0_trajectory) / self.level_l0_trajectory.clamp_min(1.0)
        self.level_l0_coefficient.mul_(torch.exp(c.sparsity_adapt_rate * gap.clamp(-1.0, 1.0)))
        self.level_l0_coefficient.clamp_(1e-8, 1e4)

    @torch.no_grad()
    def _track_coactivation(self, active: Tensor, decay: float) -> None:
        """One batch's firing rates and co-firing rates into their EMAs (a sparse product: cost ~ tokens × L0 ×
        the parent level's width)."""
        slices = self.cfg.level_slices
        a = active.to(self.firing_ema.device, torch.float32)
        self.firing_ema.mul_(decay).add_(a.mean(0), alpha=1 - decay)
        for lv in range(1, self.n_levels):
            child = a[:, slices[lv]].T.to_sparse()
            both = torch.sparse.mm(child, a[:, slices[lv - 1]]) / a.shape[0]
            getattr(self, f"coactivation_ema_{lv}").mul_(decay).add_(both, alpha=1 - decay)

    @torch.no_grad()
    def parent_given_child(self, level: int) -> Tensor:
        """With ``tree_similarity="coactivation"``: P(parent fires | child fires) from the training EMAs,
        ``[n_level, n_level_above]``; 0 for a child that has not fired."""
        rate = self.firing_ema[self.cfg.level_slices[level]]
        both = getattr(self, f"coactivation_ema_{level}")
        return torch.where(rate[:, None] > 0, both / rate[:, None].clamp_min(1e-30), torch.zeros_like(both))

    @torch.no_grad()
    def level_vectors(self, level: int) -> Tensor:
        """The vectors the tree is built from: encoder columns or decoder rows of a level's latents, ``[n, d]``."""
        sl = self.cfg.level_slices[level]
        return self.W_enc[:, sl].T if self.cfg.tree_similarity == "encoder" else self.W_dec[sl]

    @torch.no_grad()
    def update_tree(self) -> None:
        """Every child takes the most similar latent one level up as parent (the bottom ``unassigned_fraction``
        by similarity take none); with ``tree_similarity="coactivation"`` the one it has fired with most often,
        P(parent | child) from the training EMAs."""
        for lv in range(1, self.n_levels):
            sl = self.cfg.level_slices[lv]
            if self.cfg.tree_similarity == "coactivation":
                index, best = assign_by_score(self.parent_given_child(lv), self.cfg.unassigned_fraction)
            else:
                index, best = assign_parents(self.level_vectors(lv), self.level_vectors(lv - 1),
                                             self.cfg.unassigned_fraction)
            self.parent_index[sl] = index.to(self.parent_index.device)
            self.parent_similarity[sl] = best.to(self.parent_similarity.device)
        self.tree_updates += 1

    # ---- saving ----
    def saelens_tensors(self) -> dict[str, Tensor]:
        out = super().saelens_tensors()
        out["W_dec"] = (self.W_dec / self.n_levels).detach()  # the level average; see the module docstring
        return out

    def extra_tensors(self) -> dict[str, Tensor]:
        out = super().extra_tensors()
        out["W_dec"] = self.W_dec.detach()  # the SAELens file holds W_dec / L, which does not round-trip exactly
        return out

    def write_extra_files(self, folder: Path, metadata: dict[str, Any],
                          feature_stats: dict[str, Tensor] | None) -> None:
        """``levels/level_<ℓ>/`` (each level as an ordinary JumpReLU folder) and ``tree.json``."""
        from saeforge.hierarchy.tree import FeatureTree
        from saeforge.saes.io import save_sae

        levels = []
        for lv, sl in enumerate(self.cfg.level_slices):
            stats = {k: v[sl] for k, v in (feature_stats or {}).items()}
            meta = {**metadata, "hsae_level": lv, "hsae_levels": list(self.cfg.level_sizes)}
            sub = Path("levels") / f"level_{lv}"
            save_sae(self.level_sae(lv), folder / sub, metadata=meta, feature_stats=stats or None)
            levels.append(sub)
        FeatureTree.from_hsae(self, folder, levels=levels).save(folder / "tree.json")

    def extra_repr(self) -> str:
        return super().extra_repr() + f", level_sizes={list(self.cfg.level_sizes)}"
