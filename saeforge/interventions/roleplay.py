"""SRPS, role-play steering through SAE latents (Wang, Shu, Wang, Ma, Du; Findings of EMNLP 2025; arXiv 2506.07335).

Role prompts ("You are a mathematics teacher...") help reasoning but are brittle. SRPS reads which SAE latents a role
prompt switches on and injects them instead:

1. contrast pairs: each training question with a role prompt before it (the roles rotate over a few templates) and
   alone; each prompt's SAE latents averaged over its non-special tokens (a^w_i with the role, a^wo_i without;
   the paper also drops stopwords and punctuation, which this version keeps);
2. sensitivity of latent j: s_j = mean_i(a^w_ij − a^wo_ij) + β·(P_i[a^w_ij > τ] − P_i[a^wo_ij > τ]), β = 3, τ = 0.2;
3. the top k = 15 latents by s_j; v = Σ_j c · mean_i a^w_ij · W_dec[j] (c = 8; the bench sets the norm itself);
4. injection at the **last prompt position, during the prefill pass only**, the position then rescaled to its own
   L2 norm (a rotation, not a push: large strengths saturate).

The paper's controls are prompt-based role-play (the role written before the question) and DiffMeans (the mean
residual difference between role and plain prompts, injected the same way).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from saeforge.errors import SaeforgeError

ARITHMETIC_ROLES = (
    "You are a mathematics teacher who explains every calculation carefully.",
    "As a professor of mathematics, you solve arithmetic problems step by step.",
    "You are a patient maths teacher checking a pupil's sums.",
    "As an expert mathematician, you never make a mistake in addition.",
    "You are a mathematics professor grading an arithmetic exam.")


def role_prompts(questions: list[str], roles: tuple[str, ...] = ARITHMETIC_ROLES) -> list[str]:
    """Each question with a role before it, the roles taken in turn."""
    if not roles:
        raise SaeforgeError("no role prompt given", "give at least one role, e.g. 'You are a mathematics teacher.'")
    return [f"{roles[i % len(roles)]} {q}" for i, q in enumerate(questions)]


def sensitivity(with_role: torch.Tensor, without: torch.Tensor, beta: float = 3.0, tau: float = 0.2
                ) -> torch.Tensor:
    """s_j = mean(a^w − a^wo) + β·(P[a^w > τ] − P[a^wo > τ]) over paired prompts ([n, d_sae] each)."""
    if with_role.shape != without.shape:
        raise SaeforgeError(f"{with_role.shape[0]} role prompts for {without.shape[0]} plain ones",
                            "give each question once with and once without the role")
    return (with_role - without).mean(0) + beta * ((with_role > tau).float().mean(0) - (without > tau).float().mean(0))


def srps_vector(sae, with_role: torch.Tensor, without: torch.Tensor, *, k: int = 15, beta: float = 3.0,
                tau: float = 0.2, c: float = 8.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(v = Σ_{top-k s_j} c·mean a^w_j·W_dec[j], the top-k latents)."""
    if k < 1:
        raise SaeforgeError(f"k = {k} latents", "use k ≥ 1 (the paper's k is 15)")
    s = sensitivity(with_role, without, beta, tau)
    top = torch.argsort(s, descending=True)[:k]
    weights = c * with_role.mean(0)[top]
    if not bool((weights != 0).any()):
        raise SaeforgeError("the role prompts switch on no SAE latent", "use other role prompts or more questions")
    return weights @ sae.W_dec.detach().float().cpu()[top], top


def rotation_edit(v: torch.Tensor):
    """The edit function of :func:`last_prompt_rotation`."""

    def fn(x: torch.Tensor, ctx) -> torch.Tensor | None:
        if ctx.is_generated:
            return None
        out = x.clone()
        last = out[:, -1].float()
        moved = last + v.to(last)
        out[:, -1] = (moved * (last.norm(dim=-1, keepdim=True) / moved.norm(dim=-1, keepdim=True).clamp_min(1e-12))
                      ).to(x.dtype)
        return out

    return fn


@contextlib.contextmanager
def last_prompt_rotation(lm, site: str, v: torch.Tensor) -> Iterator[None]:
    """Add ``v`` at the last prompt position of the prefill pass only, then rescale that position back to its own
    norm; cached generation steps are left alone. Prompts must be left-padded (as for generation), so the last
    column is every row's last prompt token."""
    with lm.edit({site: rotation_edit(v)}):
        yield
