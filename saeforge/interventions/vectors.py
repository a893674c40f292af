"""Steering vectors from two sets of texts, beyond a single feature.

- **CAA** (contrastive activation addition): v = mean over positive texts − mean over negative texts of the site's
  activation, each text averaged over its SAE-data positions (the run's token policy: no BOS or special tokens).
- **STA** (steering target atoms, Wang et al. 2025; arXiv 2505.20322): per SAE latent j, Δa_j = mean activation on
  positives − on negatives and Δf_j = #positive texts it fires on − #negative texts. Both are min–max normalised by
  absolute value keeping the sign; latents whose Δa and Δf agree in sign are kept if both |normalised Δf| and
  |normalised Δa| lie in the top ``trim`` fraction (among the sign-consistent latents); v = Δa_kept · W_dec, rescaled
  to the CAA vector's norm.
- **SAE-refined CAA** (in the spirit of SAE-RSV, whose exact recipe is not public): keep the CAA
  vector's components on the *relevant* features and drop the rest as noise. Relevant = latents that fire
  significantly more on the positives (one-sided Mann–Whitney on per-text activations, Benjamini–Hochberg FDR
  ``fdr``); v = the least-squares projection of v_CAA onto the span of their decoder directions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from saeforge.data.prompts import PromptEncoder
from saeforge.data.token_stream import TokenPolicy
from saeforge.errors import SaeforgeError


@dataclass
class TextActivations:
    acts: torch.Tensor  # [n_texts, d] mean activation over each text's non-special tokens
    feats: torch.Tensor  # [n_texts, d_sae] mean SAE activation over the same tokens


TEXTS_PER_BATCH = 16


@torch.inference_mode()
def collect(lm, sae, site: str, texts: list[str], policy: TokenPolicy | None = None) -> TextActivations:
    """Mean activation and mean SAE latents of each text over its SAE-data positions, the texts tokenized under the
    run's ``policy`` (default :class:`TokenPolicy`) and cut at its context length."""
    policy = policy or TokenPolicy()
    prompts = PromptEncoder(lm, policy, max_tokens=policy.context_length)
    acts, feats = [], []
    for start in range(0, len(texts), TEXTS_PER_BATCH):
        batch = prompts.batch(texts[start:start + TEXTS_PER_BATCH], truncate=True)
        x_all = lm.read(batch.input_ids, [site], attention_mask=batch.attention_mask)[site]
        for row in range(len(batch)):
            keep = batch.keep[row].to(x_all.device)
            if not bool(keep.any()):
                continue
            x = x_all[row][keep].float()
            acts.append(x.mean(0).cpu())
            feats.append(sae.encode(x).mean(0).cpu())
    if len(acts) < 2:
        raise SaeforgeError("fewer than 2 usable texts", "give more texts")
    return TextActivations(torch.stack(acts), torch.stack(feats))


def caa_vector(pos: TextActivations, neg: TextActivations) -> torch.Tensor:
    return pos.acts.mean(0) - neg.acts.mean(0)


def _signed_minmax(v: torch.Tensor) -> torch.Tensor:
    a = v.abs()
    span = (a.max() - a.min()).clamp_min(1e-12)
    return torch.sign(v) * (a - a.min()) / span


def sta_vector(sae, pos: TextActivations, neg: TextActivations, caa: torch.Tensor, trim: float = 0.35
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(v_STA rescaled to ‖v_CAA‖, indices of the target atoms)."""
    if not 0 < trim <= 1:
        raise SaeforgeError(f"trim must lie in (0, 1], got {trim}", "use e.g. 0.35 (the paper's value)")
    da = pos.feats.mean(0) - neg.feats.mean(0)
    df = (pos.feats > 0).float().sum(0) - (neg.feats > 0).float().sum(0)
    na, nf = _signed_minmax(da), _signed_minmax(df)
    consistent = (torch.sign(na) == torch.sign(nf)) & (na != 0)
    if not bool(consistent.any()):
        raise SaeforgeError("no SAE latent differs consistently between the two sets", "use more or clearer texts")
    qa = torch.quantile(na[consistent].abs(), 1 - trim)
    qf = torch.quantile(nf[consistent].abs(), 1 - trim)
    keep = consistent & (na.abs() >= qa) & (nf.abs() >= qf)
    v = (da * keep) @ sae.W_dec.detach().float().cpu()
    return v * (caa.norm() / v.norm().clamp_min(1e-12)), keep.nonzero().squeeze(1)


def refined_caa_vector(sae, pos: TextActivations, neg: TextActivations, caa: torch.Tensor, fdr: float = 0.05
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(v_CAA projected onto the decoder directions of the relevant features, their indices)."""
    from saeforge.features.contrast import benjamini_hochberg, mann_whitney

    _, p = mann_whitney(pos.feats.numpy(), neg.feats.numpy())
    q = benjamini_hochberg(p)
    da = (pos.feats.mean(0) - neg.feats.mean(0)).numpy()
    relevant = torch.from_numpy(np.nonzero((q <= fdr) & (da > 0))[0])
    if relevant.numel() == 0:
        raise SaeforgeError(f"no feature fires significantly more on the positive texts (FDR {fdr})",
                            "use more or clearer texts, or a higher --fdr")
    D = sae.W_dec.detach().float().cpu()[relevant]  # [r, d]
    coef = torch.linalg.lstsq(D.T, caa[:, None]).solution  # min ‖Dᵀc − v‖
    return (D.T @ coef).squeeze(1), relevant
