"""Steering vectors from two sets of texts, beyond a single feature.

- **CAA** (contrastive activation addition): v = mean over positive texts − mean over negative texts of the site's
  activation, each text averaged over its SAE-data positions (the run's token policy: no BOS or special tokens).
- **STA** (steering target atoms, Wang et al. 2025; arXiv 2505.20322): per SAE latent j, Δa_j = mean activation on
  positives − on negatives and Δf_j = the share of positive texts it fires on − the share of negative texts (the
  paper counts texts, which its paired sets make equal in number; with sets of different sizes counts would favour the
  larger set, and since the normalisation below is scale-free, rates give the paper's selection whenever the sizes
  agree). Both are min–max normalised by absolute value keeping the sign; latents whose Δa and Δf agree in sign are
  kept if both |normalised Δf| and |normalised Δa| lie in the top ``trim`` fraction (among the sign-consistent
  latents); v = Δa_kept · W_dec, rescaled to the CAA vector's norm.

Each text's activation is its mean over its SAE-data positions; given prompts (:func:`collect` with ``prompts``), a
text is the *answer* to its prompt and only the answer's tokens are averaged, as STA does with its (question, safe
answer, unsafe answer) triples.
- **SAE-refined CAA** (in the spirit of SAE-RSV, whose exact recipe is not public): keep the CAA
  vector's components on the *relevant* features and drop the rest as noise. Relevant = latents that fire
  significantly more on the positives (one-sided Mann–Whitney on per-text activations, Benjamini–Hochberg FDR
  ``fdr``); v = the least-squares projection of v_CAA onto the span of their decoder directions. This is the
  statistical selection stage of SAE-RSV.
- **SAE-RSV** (Wang et al. 2025, arXiv 2509.23799; no official code): v' = α1·v_CAA − α2·v_noise + α3·v_useful on top
  of that selection, each stage switchable. *Denoise*: the latents most active on the positive texts that are not
  relevant to the behaviour (not significant by the test above, or judged irrelevant by their meaning when a judge is
  given) are noise; v_noise = Σ w_j d̂_j with w = their mean activations on the positives normalised to sum 1.
  *Augment*: latents that never fire on the small positive set but whose decoder directions are closest (cosine) to
  the relevant latents' are the task-relevant features the data missed; v_useful = the mean of their d̂_j. d̂ are
  unit decoder rows and both terms are scaled by ‖v_CAA‖, so α2 and α3 are fractions of the CAA vector's length
  (the paper's absolute scale and α values are not published; α = (1, 0.5, 0.5) follows a public
  re-implementation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

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


def _answer_batch(encoder: PromptEncoder, prompts: list[str], answers: list[str]):
    """(ids, attention mask, keep) of prompt + answer rows padded on the right, keep only at answer positions.

    Prompt and answer are tokenized apart and joined as ids, so the answer's tokens are exactly those of the answer
    text; an answer is read with a leading space unless it or the prompt has one at the seam (text files strip
    lines, and "Answer: 43" is what the model reads)."""
    rows, starts = [], []
    for i, (prompt, answer) in enumerate(zip(prompts, answers, strict=True), 1):
        head = encoder.ids(prompt, which=f"prompt {i}")
        if not answer.strip():
            raise SaeforgeError(f"the answer to prompt {i} is empty", "give every prompt a non-empty answer")
        if not answer[:1].isspace() and not prompt[-1:].isspace():
            answer = " " + answer
        tail = [int(t) for t in encoder.lm.tokenizer(answer, add_special_tokens=False)["input_ids"]]
        row = (head + tail)[:encoder.max_tokens]
        if len(row) <= len(head):
            raise SaeforgeError(f"prompt {i} fills the context ({encoder.max_tokens} tokens): no room for its answer",
                                "shorten the prompt")
        rows.append(row)
        starts.append(len(head))
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), encoder.pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    keep = encoder.keep_mask(ids, mask) & (torch.arange(width)[None, :] >= torch.tensor(starts)[:, None])
    return ids, mask, keep


@torch.inference_mode()
def collect(lm, sae, site: str, texts: list[str], policy: TokenPolicy | None = None,
            prompts: list[str] | None = None) -> TextActivations:
    """Mean activation and mean SAE latents of each text over its SAE-data positions, the texts tokenized under the
    run's ``policy`` (default :class:`TokenPolicy`) and cut at its context length.

    With ``prompts`` (one per text) each text is the answer to its prompt: the model reads prompt + answer and only
    the answer's positions are averaged."""
    policy = policy or TokenPolicy()
    encoder = PromptEncoder(lm, policy, max_tokens=policy.context_length)
    if prompts is not None and len(prompts) != len(texts):
        raise SaeforgeError(f"{len(prompts)} prompts for {len(texts)} answers", "give one prompt per answer")
    acts, feats = [], []
    for start in range(0, len(texts), TEXTS_PER_BATCH):
        chunk = texts[start:start + TEXTS_PER_BATCH]
        if prompts is None:
            batch = encoder.batch(chunk, truncate=True)
            ids, mask, keep_all = batch.input_ids, batch.attention_mask, batch.keep
        else:
            ids, mask, keep_all = _answer_batch(encoder, prompts[start:start + TEXTS_PER_BATCH], chunk)
        x_all = lm.read(ids, [site], attention_mask=mask)[site]
        for row in range(len(ids)):
            keep = keep_all[row].to(x_all.device)
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
    df = (pos.feats > 0).float().mean(0) - (neg.feats > 0).float().mean(0)  # firing rates: sets may differ in size
    na, nf = _signed_minmax(da), _signed_minmax(df)
    consistent = (torch.sign(na) == torch.sign(nf)) & (na != 0)
    if not bool(consistent.any()):
        raise SaeforgeError("no SAE latent differs consistently between the two sets", "use more or clearer texts")
    qa = torch.quantile(na[consistent].abs(), 1 - trim)
    qf = torch.quantile(nf[consistent].abs(), 1 - trim)
    keep = consistent & (na.abs() >= qa) & (nf.abs() >= qf)
    v = (da * keep) @ sae.W_dec.detach().float().cpu()
    return v * (caa.norm() / v.norm().clamp_min(1e-12)), keep.nonzero().squeeze(1)


def relevant_latents(pos: TextActivations, neg: TextActivations, fdr: float = 0.05) -> torch.Tensor:
    """Latents that fire significantly more on the positive texts: one-sided Mann–Whitney on the per-text
    activations, Benjamini–Hochberg at ``fdr``, and a positive mean difference."""
    from saeforge.features.contrast import benjamini_hochberg, mann_whitney

    _, p = mann_whitney(pos.feats.numpy(), neg.feats.numpy())
    q = benjamini_hochberg(p)
    da = (pos.feats.mean(0) - neg.feats.mean(0)).numpy()
    relevant = torch.from_numpy(np.nonzero((q <= fdr) & (da > 0))[0])
    if relevant.numel() == 0:
        raise SaeforgeError(f"no feature fires significantly more on the positive texts (FDR {fdr})",
                            "use more or clearer texts, or a higher --fdr")
    return relevant


def refined_caa_vector(sae, pos: TextActivations, neg: TextActivations, caa: torch.Tensor, fdr: float = 0.05
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(v_CAA projected onto the decoder directions of the relevant features, their indices)."""
    relevant = relevant_latents(pos, neg, fdr)
    D = sae.W_dec.detach().float().cpu()[relevant]  # [r, d]
    coef = torch.linalg.lstsq(D.T, caa[:, None]).solution  # min ‖Dᵀc − v‖
    return (D.T @ coef).squeeze(1), relevant


def sae_rsv_vector(sae, pos: TextActivations, neg: TextActivations, caa: torch.Tensor, *, fdr: float = 0.05,
                   denoise: bool = True, augment: bool = True, candidates: int = 32, n_augment: int = 8,
                   alphas: tuple[float, float, float] = (1.0, 0.5, 0.5),
                   irrelevant: Callable[[list[int]], list[bool]] | None = None) -> tuple[torch.Tensor, dict]:
    """(v' = α1·v_CAA − α2·‖v_CAA‖·v_noise + α3·‖v_CAA‖·v_useful, {"relevant", "noise", "useful": latent indices}).

    ``candidates``: the latents most active on the positives that denoising considers; ``n_augment``: latents added
    by augmentation; ``irrelevant(indices)`` (optional, e.g. an LLM judging each latent's description): True for a
    latent whose meaning has nothing to do with the behaviour, which then counts as noise (and is never added)."""
    if candidates < 1 or n_augment < 1:
        raise SaeforgeError("SAE-RSV needs at least one candidate and one augmented latent",
                            "use --rsv-candidates ≥ 1 and --rsv-augment ≥ 1")
    a1, a2, a3 = alphas
    relevant = relevant_latents(pos, neg, fdr)
    mean_pos = pos.feats.mean(0)
    D = sae.W_dec.detach().float().cpu()
    unit = D / D.norm(dim=1, keepdim=True).clamp_min(1e-12)
    scale = caa.norm()
    v = a1 * caa
    info: dict = {"relevant": relevant.tolist(), "noise": [], "useful": []}
    if denoise:
        order = torch.argsort(mean_pos, descending=True)[:candidates]
        active = [int(j) for j in order if mean_pos[j] > 0]
        keep = set(relevant.tolist())
        judged = dict(zip(active, irrelevant(active))) if irrelevant and active else {}
        noise = [j for j in active if j not in keep or judged.get(j, False)]
        if noise:
            w = mean_pos[noise] / mean_pos[noise].sum()
            v = v - a2 * scale * (w @ unit[noise])
        info["noise"] = noise
    if augment:
        unseen = (pos.feats > 0).sum(0) == 0  # never fired on the (small) positive set
        closeness = (unit @ unit[relevant].T).max(1).values
        closeness[~unseen] = -float("inf")
        order = [int(j) for j in torch.argsort(closeness, descending=True) if closeness[j] > -float("inf")]
        if irrelevant and order:
            verdict = irrelevant(order[:4 * n_augment])
            order = [j for j, bad in zip(order[:4 * n_augment], verdict) if not bad]
        useful = order[:n_augment]
        if useful:
            v = v + a3 * scale * unit[useful].mean(0)
        info["useful"] = useful
    return v, info
