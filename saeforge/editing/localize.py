"""Localising a fact to a few SAE latents and the MLP neurons they involve.

This is the reconstruction described in ``docs/editing.md`` (MicroEdit, Wang et al., EMNLP 2025, has no public
code, so the details below are saeforge's, not the paper's): an SAE on ``layers.L.mlp_hidden`` (one input per MLP
neuron) is spliced into the forward (:func:`saeforge.models.gradients.spliced_forward`) over the prompt and the
target answer, and each latent j gets the attribution-patching estimate of how much the target's log-probability
depends on the latent's fact-specific activity,

    score_j = | Σ_p ∂m/∂f_j(p) · (f_j(p) − f̄_j) |,

with m = log p(target | prompt) (teacher-forced, summed over its tokens), p the positions that predict a target
token, and f̄_j the latent's baseline: the larger of its mean activation on unrelated retain text and on the last
tokens of neighbour prompts (the same relations about other subjects), so latents that fire everywhere, or on every
prompt of the relation, score little (the specificity of the reconstruction, with Marks et al.'s attribution
patching, arXiv 2403.19647). The top
``latents`` active latents are kept; each maps to the ``neurons_per_latent`` neurons with the largest decoder
weights |W_dec[j, i]|, and the union is the mask. Neurons already owned by earlier edits can be avoided (the next
largest are taken instead; once too few unowned neurons are left, owned ones are reused). When no latent is active, neurons are ranked directly by the same attribution on the
activation (the error node's gradient times the neuron's activation above its retain mean).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Sequence

import torch

from saeforge.editing.facts import EncodedFact
from saeforge.editing.scoring import block_input_for
from saeforge.errors import SaeforgeError
from saeforge.models.suffix import skipping_blocks

__all__ = ["Localization", "localize", "retain_means"]


@dataclass(frozen=True)
class Localization:
    """Where a fact lives: the chosen latents with their scores and the neuron mask."""

    latents: tuple[int, ...]
    latent_scores: tuple[float, ...]
    neurons: tuple[int, ...]
    source: str
    """``sae`` (neurons of the chosen latents) or ``attribution`` (no latent was active: neurons ranked directly)."""


@torch.no_grad()
def retain_means(sae, groups: Sequence[torch.Tensor], quantile: float = 0.9) -> tuple[torch.Tensor, torch.Tensor]:
    """The baseline of each SAE latent ``[d_sae]`` and of each neuron ``[d_mlp]``: the largest over the groups of
    retain activations (``[n, d_mlp]`` each: the tokens of unrelated text, the last tokens of neighbour prompts) of
    its ``quantile`` in that group, so a latent that fires on a tenth of the text or of the neighbour prompts is not
    specific to the fact (a mean would leave a latent that fires on every prompt of one relation half its score)."""
    f_base, x_base = [], []
    for acts in groups:
        f = torch.cat([sae.encode(a.to(sae.dtype)).float() for a in acts.split(1024)])
        f_base.append(torch.quantile(f, quantile, dim=0))
        x_base.append(torch.quantile(acts.float(), quantile, dim=0))
    return torch.stack(f_base).max(0).values, torch.stack(x_base).max(0).values


def _top_preferring(scores: torch.Tensor, count: int, avoid: Collection[int], taken: Collection[int]) -> list[int]:
    """The ``count`` highest-scoring indices not in ``taken``, those outside ``avoid`` first: once the layer has too
    few unowned neurons left, owned ones are reused (in score order) rather than giving the edit fewer neurons."""
    order = [i for i in torch.argsort(scores, descending=True).tolist() if i not in taken]
    fresh = [i for i in order if i not in avoid]
    return (fresh + [i for i in order if i in avoid])[:count]


def localize(lm, sae, site, fact: EncodedFact, *, block: int, means: tuple[torch.Tensor, torch.Tensor],
             latents: int = 8, neurons_per_latent: int = 8, avoid: Collection[int] = ()) -> Localization:
    """The latents most responsible for ``fact``'s answer and their neurons (see the module docstring).

    ``block``: the forward starts there (the edited layer: nothing before it changes). ``means``: from
    :func:`retain_means`. ``avoid``: neurons not to take (owned by earlier edits)."""

    if latents < 1 or neurons_per_latent < 1:
        raise SaeforgeError("--latents and --neurons-per-latent must be at least 1",
                            "pass e.g. --latents 8 --neurons-per-latent 8")
    f_mean, x_mean = means
    ids = torch.tensor([fact.ids], dtype=torch.long)
    bi = block_input_for(lm, ids, None, block)
    with skipping_blocks(lm, bi):
        out = lm.spliced_forward(bi.input_ids, {site: sae})
    pos = torch.tensor(fact.positions, device=out.logits.device)
    targets = torch.tensor(fact.answer_ids, device=out.logits.device)
    logp = torch.log_softmax(out.logits[0, pos].float(), -1).gather(-1, targets[:, None]).sum()
    node = out[site.name]
    g_f, g_e = out.gradients(logp)[site.name]
    f = node.latents.detach()[0, pos].float()
    active = (f > 0).any(0)
    score = ((g_f[0, pos].float() * (f - f_mean.to(f.device))).sum(0)).abs()
    score = torch.where(active, score, torch.zeros_like(score))
    avoid = set(int(i) for i in avoid)
    n_active = int((score > 0).sum())
    if n_active > 0:
        chosen = torch.argsort(score, descending=True)[:min(latents, n_active)].tolist()
        w_dec = sae.W_dec.detach().float().abs()
        neurons: list[int] = []
        for j in chosen:
            neurons.extend(_top_preferring(w_dec[j], neurons_per_latent, avoid, set(neurons)))
        if neurons:
            return Localization(tuple(chosen), tuple(float(score[j]) for j in chosen), tuple(sorted(neurons)), "sae")
    x = node.activation.detach()[0, pos].float()
    neuron_score = ((g_e[0, pos].float() * (x - x_mean.to(x.device))).sum(0)).abs()
    neurons = _top_preferring(neuron_score, latents * neurons_per_latent, avoid, ())
    return Localization((), (), tuple(sorted(neurons)), "attribution")
