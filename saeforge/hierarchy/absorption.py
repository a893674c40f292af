"""Feature absorption and splitting on the first-letter task (Chanin et al., "A is for Absorption", arXiv 2409.14507;
SAEBench's implementation, arXiv 2503.09532), adapted to any model's tokenizer.

1. **Words**: single tokens of the model's vocabulary that are a space and 2+ ASCII letters (" dog"); their first
   letter is the label. Each is read in an in-context prompt ``"tartan has the first letter: T. mirth has the first
   letter: M. {word} has the first letter:"`` at the word's own position (the word token id is inserted as is, so
   the model sees exactly that token).
2. **Probes**: a logistic-regression probe per letter on the residual (80 % of the words; F1 on the other 20 %). A
   letter counts only if its probe reaches F1 ≥ 0.6 with at least 20 positive words.
3. **Splitting**: for each usable letter, SAE latents ranked by mean activation on the letter's words minus on the
   others; k-sparse probes on the top k (k = 1, 2, ...) while each added latent raises test F1 by at least 0.03.
   Those latents are the letter's *main* latents; their number is the splitting figure (1 = no splitting).
4. **Absorption** (SAEBench's projection rule), on test words of the letter that the probe gets right but the main
   latents' k-sparse probe misses: with p̂ the unit probe direction, P = x·p̂, each latent's share π_j = f_j (d_j·p̂)
   and Π = Σ_main π_j; absorbers are other latents with d_j·p̂ ≥ 0.1 and π_j > 0 (the top 3). The word's absorption
   fraction is 0 when Π ≥ P or the absorbers carry less than 0.4 P, 1 when Π ≤ 0, else
   min(A, P − Π) / (min(A, P − Π) + Π) with A the absorbers' total. A letter's rate is the mean over its test words
   the probe gets right (0 for the words the main latents catch); the score is the mean over letters. *Full*
   absorption: every main latent silent, and one latent with d_j·p̂ ≥ 0.025 carries at least 0.4 P.

SAEBench advises against this evaluation for models under ~1B parameters and SAEs under 16k latents: docs/hierarchy.md
reports what it gives at 135M and says how far to trust it.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from saeforge.errors import SaeforgeError

__all__ = ["FirstLetterData", "absorption_scores", "absorption_table", "first_letter_activations", "fit_logistic",
           "letter_words"]

TEMPLATE_PREFIX = "tartan has the first letter: T. mirth has the first letter: M."
TEMPLATE_SUFFIX = " has the first letter:"
WORD = re.compile(r"^ [A-Za-z]{2,}$")


def letter_words(tokenizer, limit: int = 3000, seed: int = 0) -> list[tuple[int, str]]:
    """(token id, word) of up to ``limit`` vocabulary tokens that are a space and 2+ ASCII letters, a seeded sample."""
    vocab = tokenizer.get_vocab()
    words = []
    for _, i in sorted(vocab.items(), key=lambda kv: kv[1]):
        text = tokenizer.decode([i])
        if WORD.match(text):
            words.append((int(i), text.strip()))
    if len(words) < 100:
        raise SaeforgeError(f"the tokenizer has only {len(words)} single-token words", "use a model with a BPE "
                            "vocabulary of English words")
    rng = np.random.default_rng(seed)
    if len(words) > limit:
        words = [words[i] for i in sorted(rng.choice(len(words), size=limit, replace=False))]
    return words


@dataclass
class FirstLetterData:
    words: list[str]
    labels: np.ndarray    # [n] letter index 0..25
    acts: Tensor          # [n, d] residual at the word
    train: np.ndarray     # [n] bool


@torch.no_grad()
def first_letter_activations(lm, site: str, *, n_words: int = 3000, seed: int = 0, batch_size: int = 64
                             ) -> FirstLetterData:
    """The residual at ``site`` of every word's token in the in-context prompt."""
    tok = lm.tokenizer
    words = letter_words(tok, n_words, seed)
    prefix = tok(TEMPLATE_PREFIX, add_special_tokens=False)["input_ids"]
    suffix = tok(TEMPLATE_SUFFIX, add_special_tokens=False)["input_ids"]
    bos = [lm.bos_token_id()] if lm.bos_token_id() is not None else []
    pos = len(bos) + len(prefix)
    rows = []
    for s in range(0, len(words), batch_size):
        ids = torch.tensor([bos + prefix + [i] + suffix for i, _ in words[s:s + batch_size]], dtype=torch.long)
        rows.append(lm.read(ids, [site])[site][:, pos].float().cpu())
    labels = np.array([string.ascii_lowercase.index(w[0].lower()) for _, w in words])
    train = np.random.default_rng(seed + 1).random(len(words)) < 0.8
    return FirstLetterData([w for _, w in words], labels, torch.cat(rows), train)


def fit_logistic(x: Tensor, y: Tensor, *, l2: float = 1e-4, steps: int = 200) -> tuple[Tensor, Tensor]:
    """Binary logistic regression (LBFGS, standardised inputs); returns (w, b) on the original input scale."""
    x = x.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-8)
    z = (x - mean) / std
    y = y.double()
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w_raw = (w / std).detach()
    return w_raw, (b - (w_raw * mean).sum()).detach()


def _f1(pred: Tensor, y: Tensor) -> float:
    tp = float((pred & y).sum())
    fp, fn = float((pred & ~y).sum()), float((~pred & y).sum())
    return 2 * tp / max(2 * tp + fp + fn, 1e-12)


def absorption_scores(data: FirstLetterData, sae, *, probe_min_f1: float = 0.6, min_positives: int = 20,
                      max_k: int = 10, split_threshold: float = 0.03, probes: dict | None = None
                      ) -> dict[str, Any]:
    """Absorption and splitting of ``sae`` (which reads the activations in ``data``); ``probes`` caches the
    residual probes across SAEs (filled on first use)."""
    x = data.acts
    labels = torch.as_tensor(data.labels)
    train = torch.as_tensor(data.train)
    test = ~train
    probes = probes if probes is not None else {}
    with torch.no_grad():
        f = sae.encode(x.to(sae.device, sae.dtype)).float().cpu()
        dec = sae.W_dec.detach().float().cpu()
    dec_unit = dec / dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
    per_letter = {}
    for letter in range(26):
        y = labels == letter
        if int(y[train].sum()) < min_positives or int(y[test].sum()) < 5:
            continue
        if letter not in probes:
            w, b = fit_logistic(x[train], y[train])
            probes[letter] = (w, b, _f1((x[test].double() @ w + b > 0), y[test]))
        w, b, probe_f1 = probes[letter]
        if probe_f1 < probe_min_f1:
            continue
        # k-sparse probes on the latents with the largest mean difference
        diff = f[train][y[train]].mean(0) - f[train][~y[train]].mean(0)
        order = torch.argsort(diff, descending=True)[:max_k]
        main, best_f1, main_w, main_b = [], 0.0, None, None
        for k in range(1, len(order) + 1):
            cols = order[:k]
            kw, kb = fit_logistic(f[train][:, cols], y[train])
            f1 = _f1((f[test][:, cols].double() @ kw + kb > 0), y[test])
            if k > 1 and f1 - best_f1 < split_threshold:
                break
            main, best_f1, main_w, main_b = cols.tolist(), f1, kw, kb
        p_hat = (w / w.norm()).float()
        cos = dec_unit @ p_hat                                   # [d_sae]
        pos = torch.nonzero(test & y & (x.double() @ w + b > 0)).flatten()  # the probe gets them right
        fractions, full = [], 0
        main_t = torch.tensor(main)
        caught = (f[pos][:, main_t].double() @ main_w + main_b > 0)
        for row, hit in zip(pos.tolist(), caught.tolist()):
            if hit:
                fractions.append(0.0)
                continue
            proj = float(x[row] @ p_hat)
            shares = f[row] * cos
            pi_main = float(shares[main_t].sum())
            others = shares.clone()
            others[main_t] = 0
            cand = torch.nonzero((cos >= 0.1) & (others > 0)).flatten()
            absorbers = float(others[cand].topk(min(3, cand.numel())).values.sum()) if cand.numel() else 0.0
            if pi_main >= proj or absorbers < 0.4 * proj:
                fractions.append(0.0)
            elif pi_main <= 0:
                fractions.append(1.0)
            else:
                a = min(absorbers, proj - pi_main)
                fractions.append(a / (a + pi_main))
            if bool((f[row][main_t] == 0).all()):
                top = int(torch.argmax(shares))
                if float(cos[top]) >= 0.025 and float(shares[top]) >= 0.4 * proj:
                    full += 1
        n = max(len(fractions), 1)
        per_letter[string.ascii_lowercase[letter]] = {
            "probe_f1": probe_f1, "main_latents": main, "split": len(main), "sparse_probe_f1": best_f1,
            "words": len(fractions), "absorption": sum(fractions) / n, "full_absorption": full / n}
    if not per_letter:
        raise SaeforgeError("no letter has a usable probe (F1 ≥ 0.6 with 20 positive words)",
                            "use more words (--words), or a site where the model encodes spelling")
    rows = list(per_letter.values())
    return {"letters": len(rows), "mean_absorption": float(np.mean([r["absorption"] for r in rows])),
            "mean_full_absorption": float(np.mean([r["full_absorption"] for r in rows])),
            "mean_split": float(np.mean([r["split"] for r in rows])),
            "mean_probe_f1": float(np.mean([r["probe_f1"] for r in rows])), "per_letter": per_letter}


def absorption_table(data: FirstLetterData, saes: dict[str, Any], **kw) -> dict[str, dict[str, Any]]:
    """:func:`absorption_scores` of several SAEs on the same words (the residual probes are fitted once)."""
    probes: dict = {}
    return {name: absorption_scores(data, sae, probes=probes, **kw) for name, sae in saes.items()}

