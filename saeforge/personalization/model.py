"""DEP (Qiu et al., "Latent Inter-User Difference Modeling for LLM Personalization", arXiv 2507.20849): what a
user wrote, and how it differs from what peers wrote about the same items, embedded by the frozen model, compressed
by a sparse autoencoder and mapped by two alignment MLPs to soft tokens in front of the frozen model's input.

Embeddings: each text is run through the frozen model; the hidden state of one layer (the last by default), averaged
over the text's tokens and L2-normalised, is its embedding (the paper uses bge-m3's CLS vector; a 135M model has no
separate encoder, so it embeds with itself). For a user's history item j on item a, with peers r who wrote about a::

    diff_j = Σ_r w_r (e_{u,j} − e_{r,a}),   w = softmax(‖μ_u − μ_r‖ / Σ_r ‖μ_u − μ_r‖)

where μ is a user's mean history embedding (the paper's weighting, nearly uniform because its input is already
normalised). μ comes from the history alone, never from the texts a user is scored on. The user's input is the K most
recent history items that have peers: X = [e_1..e_K; diff_1..diff_K] ∈ R^{2K × d}.

The sparse autoencoder is the paper's: z = GELU(W_e x + b_e), x̂ = GELU(W_d z + b_d), trained with smooth-L1
reconstruction and KL(ρ ‖ ρ̂) where ρ̂ is z averaged over the user's slots (a weak sparsity prior, not a dictionary
of features). The history and difference slots' codes go through their own alignment MLP (d_sae → d_model → d_model,
GELU between) to become 2K soft tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from saeforge.personalization.users import User

__all__ = ["DEPAdapter", "DifferenceSAE", "UserInputs", "embed_texts", "generate_greedy", "history_prompt",
           "stack_rows", "user_inputs"]


@torch.no_grad()
def embed_texts(lm, texts: Sequence[str], *, layer: int = -1, batch_size: int = 16,
                progress: bool = False) -> torch.Tensor:
    """``[len(texts), d_model]`` float32: the mean over tokens of the hidden state after ``layer`` (−1: the final
    normalised state the LM head reads; L: the output of block L), L2-normalised."""
    from tqdm.auto import tqdm

    tokenizer, model = lm.tokenizer, lm.model
    bos = lm.bos_token_id()
    out = []
    starts = range(0, len(texts), batch_size)
    for start in tqdm(starts, desc="embedding texts", unit="batch", disable=not progress, dynamic_ncols=True):
        chunk = texts[start:start + batch_size]
        rows = [([bos] if bos is not None else []) + tokenizer(t, add_special_tokens=False)["input_ids"][:254]
                for t in chunk]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), tokenizer.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        states = model.base_model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device),
                                  output_hidden_states=layer >= 0)
        hidden = (states.last_hidden_state if layer < 0 else states.hidden_states[layer + 1]).float()
        keep = mask.to(lm.device).clone()
        if bos is not None:
            keep[:, 0] = 0  # BOS's state is the same for every text (and an outlier): leave it out
        mean = (hidden * keep[..., None]).sum(1) / keep.sum(1, keepdim=True).clamp(min=1)
        out.append(F.normalize(mean, dim=-1).cpu())
    return torch.cat(out) if out else torch.zeros(0, lm.d_model)


@dataclass
class UserInputs:
    """Every user's DEP input, computed once with the frozen model."""

    user_ids: list[str]
    x: torch.Tensor
    """``[users, 2K, d]``: K history embeddings then K peer-difference embeddings (zeros in unused slots)."""
    slots: torch.Tensor
    """``[users]``: how many of the K slots are used (history items with at least one peer, most recent first)."""
    history_index: list[list[int]]
    """Per user, the positions in ``user.history`` of the items in the slots (slot order)."""

    def index(self, user_id: str) -> int:
        return self.user_ids.index(user_id)


def user_inputs(lm, users: Sequence[User], *, slots: int = 8, layer: int = -1, batch_size: int = 16,
                progress: bool = False) -> UserInputs:
    """History and peer-difference embeddings of every user (see the module's docstring)."""
    from saeforge.errors import SaeforgeError

    texts = [h.text for u in users for h in u.history]
    emb = embed_texts(lm, texts, layer=layer, batch_size=batch_size, progress=progress)
    per_user, start = [], 0
    for u in users:
        per_user.append(emb[start:start + len(u.history)])
        start += len(u.history)
    means = torch.stack([e.mean(0) for e in per_user])
    by_item: dict[str, list[tuple[int, int]]] = {}
    for ui, u in enumerate(users):
        for hi, h in enumerate(u.history):
            by_item.setdefault(h.item, []).append((ui, hi))
    d = emb.shape[-1]
    x = torch.zeros(len(users), 2 * slots, d)
    used = torch.zeros(len(users), dtype=torch.long)
    chosen_all = []
    for ui, u in enumerate(users):
        chosen = [hi for hi in reversed(range(len(u.history)))
                  if any(r != ui for r, _ in by_item[u.history[hi].item])][:slots]
        if not chosen:
            raise SaeforgeError(f"user {u.user_id} has no history item that another user also wrote about, so "
                                "there is no peer to differ from",
                                "give the users' histories shared items (the same \"item\" identifier)")
        for s, hi in enumerate(chosen):
            peers = [(r, j) for r, j in by_item[u.history[hi].item] if r != ui]
            distance = torch.stack([(means[ui] - means[r]).norm() for r, _ in peers])
            weights = torch.softmax(distance / distance.sum().clamp(min=1e-12), dim=0)
            own = per_user[ui][hi]
            x[ui, s] = own
            x[ui, slots + s] = sum(w * (own - per_user[r][j]) for w, (r, j) in zip(weights, peers))
        used[ui] = len(chosen)
        chosen_all.append(chosen)
    return UserInputs([u.user_id for u in users], x, used, chosen_all)


class DifferenceSAE(nn.Module):
    """The paper's autoencoder over history and difference embeddings: GELU encoder and GELU decoder."""

    def __init__(self, d_in: int, d_sae: int):
        super().__init__()
        self.encoder = nn.Linear(d_in, d_sae)
        self.decoder = nn.Linear(d_sae, d_in)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = F.gelu(self.encoder(x))
        return z, F.gelu(self.decoder(z))

    @staticmethod
    def losses(x: torch.Tensor, z: torch.Tensor, x_hat: torch.Tensor, slot_mask: torch.Tensor,
               rho: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(smooth-L1 reconstruction, KL(ρ ‖ ρ̂)) over the used slots; ρ̂ is z averaged over a user's slots, clamped
        into (0, 1) as in the paper's code."""
        m = slot_mask[..., None].to(x.dtype)
        recon = (F.smooth_l1_loss(x_hat, x, reduction="none") * m).sum() / (m.sum() * x.shape[-1]).clamp(min=1)
        rho_hat = ((z * m).sum(1) / m.sum(1).clamp(min=1)).clamp(1e-6, 1 - 1e-6)
        kl = rho * torch.log(rho / rho_hat) + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat))
        return recon, kl.mean()


def _alignment_mlp(d_sae: int, d_model: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_sae, d_model), nn.GELU(), nn.Linear(d_model, d_model))


class DEPAdapter(nn.Module):
    """The trainable part of DEP: the sparse autoencoder and the two alignment MLPs (history, difference). The
    language model stays frozen and outside this module."""

    def __init__(self, d_embed: int, d_sae: int, d_model: int, slots: int):
        super().__init__()
        self.slots = slots
        self.sae = DifferenceSAE(d_embed, d_sae)
        self.align_history = _alignment_mlp(d_sae, d_model)
        self.align_difference = _alignment_mlp(d_sae, d_model)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [B, 2K, d_embed]`` → (soft tokens ``[B, 2K, d_model]``, z, x̂)."""
        z, x_hat = self.sae(x)
        k = self.slots
        soft = torch.cat([self.align_history(z[:, :k]), self.align_difference(z[:, k:])], dim=1)
        return soft, z, x_hat

    def slot_mask(self, used: torch.Tensor) -> torch.Tensor:
        """``[B, 2K]`` bool: the slots a user fills (the same count among history and difference slots)."""
        k = torch.arange(self.slots, device=used.device)
        half = k[None, :] < used[:, None]
        return torch.cat([half, half], dim=1)


# ------------------------------------------------------------------------------------ sequences for the frozen model
def history_prompt(user: User, prompt: str, items: int) -> str:
    """The history-as-text baseline: the user's ``items`` most recent texts written out before the prompt."""
    recent = [h.text for h in user.history[-items:]]
    return "Earlier comments by the same reader:\n" + "".join(f"- {t}\n" for t in recent) + "\n" + prompt


def stack_rows(rows: Sequence[torch.Tensor], *, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad ``[n_i, d]`` embedding rows into ``[B, L, d]`` with an attention mask (padding on the left for
    generation, on the right for training)."""
    width = max(r.shape[0] for r in rows)
    d = rows[0].shape[-1]
    out = rows[0].new_zeros(len(rows), width, d)
    mask = torch.zeros(len(rows), width, dtype=torch.long, device=rows[0].device)
    for i, r in enumerate(rows):
        span = slice(width - r.shape[0], width) if left else slice(0, r.shape[0])
        out[i, span] = r
        mask[i, span] = 1
    return out, mask


@torch.no_grad()
def generate_greedy(model, embeds: torch.Tensor, mask: torch.Tensor, max_new_tokens: int,
                    stop_ids: Sequence[int]) -> list[list[int]]:
    """Greedy continuation of left-padded input embeddings (soft tokens included) with the key-value cache; each
    row stops at its first token in ``stop_ids``."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True)
    stop = torch.tensor(list(stop_ids), device=embeds.device)
    done = torch.zeros(embeds.shape[0], dtype=torch.bool, device=embeds.device)
    tokens: list[list[int]] = [[] for _ in range(embeds.shape[0])]
    embedding = model.get_input_embeddings()
    for _ in range(max_new_tokens):
        nxt = out.logits[:, -1].argmax(-1)
        done |= torch.isin(nxt, stop)
        for i in torch.nonzero(~done).flatten().tolist():
            tokens[i].append(int(nxt[i]))
        if bool(done.all()):
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        positions = positions[:, -1:] + 1
        out = model(inputs_embeds=embedding(nxt[:, None]), attention_mask=mask, position_ids=positions,
                    cache=out.cache, use_cache=True)
    return tokens
