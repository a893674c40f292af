"""Choosing features to steer with by what they make the model *write*, and measuring a theme in generated text.

A feature that detects a theme (the best AUROC between texts that have it and texts that do not) need not be a
direction that makes the model write about it: on the embedded model the best royalty detector is a detector of the
token " king" whose decoder direction promotes word pieces (docs/steering.md). This module ranks features by their
**output effect** on a theme's tokens instead, and rejects features whose promoted tokens are junk.

Theme tokens: each theme word's single-token forms (" king", " King", "king", "King"); a word with no single-token
form is reported as missing and not scored.

Output effect of feature i, for its unit decoder direction u_i (a dictionary that writes the residual stream):

- ``gradient`` (default): the first-order effect of adding u_i at every SAE-data position of a few neutral texts on
  m, the mean over those positions of log P(next token ∈ theme tokens), through every later layer:
  Σ_p ∂m/∂f_i[p] / ‖d_i‖, for all features at once from :func:`saeforge.models.gradients.spliced_forward`
  (attribution patching, Marks et al., arXiv 2403.19647); features are ranked by it. The best ``candidates`` are
  then steered for real on the same texts (u_i added at ``strength`` × the mean ‖x‖ at the write site): the tokens
  they promote (whose log-probability rises most, averaged over the positions) decide whether they are junk, and
  their **theme shift** (the change of m) is reported. On the embedded model the first-order ranking agreed better
  with the theme rate of real generations than the theme shift did (docs/steering.md).
- ``direct``: the direct logit effect l_i = ``LanguageModel.direction_logits(u_i)`` (through the final norm's scale
  and the unembedding, skipping every later layer), standardised over the vocabulary, z_t = (l_i[t] − mean l_i) /
  std l_i; per word the best of its forms; the effect is the mean over the theme words; promoted tokens are the top
  of l_i. No forward pass at all (mean and standard deviation come from the unembedding's mean and covariance), but
  only meaningful near the last layer: at the middle of a model the logit lens of a direction is mostly noise.

Junk rule (a heuristic, tested on hand-made cases): a promoted token is a **word** when it is a space followed by
≥ 2 letters (inner ' or - allowed) holding a vowel (a e i o u y); a token without a leading space is a word piece
(or a line-initial word, which does not count either). A feature is **junk** when fewer than ``min_word_fraction``
(default ½) of its top ``n_promoted`` (10) promoted tokens are words. On the embedded model the rule rejects
features that promote "ing", "ed", "ation" and keeps those that promote " king", " emperor", " pharaoh".
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from saeforge.errors import SaeforgeError

METHODS = ("gradient", "direct")
N_PROMOTED = 10
MIN_WORD_FRACTION = 0.5
NEUTRAL_PROMPTS = (
    "The weather today is", "Once upon a time, there was", "The best way to cook rice is",
    "My favourite thing to do is", "In the news this morning,", "The history of science shows that",
    "She opened the door and saw", "The most important lesson I learned", "Yesterday at the market,",
    "The city at night is", "He picked up the phone and said", "A good book should",
)
"""Prompts with no theme of their own: the steering prompts of the docs and demo, and the gradient method's texts."""

_WORD = re.compile(r"[A-Za-z]+(?:['\-][A-Za-z]+)*")
_VOWEL = re.compile(r"[aeiouyAEIOUY]")


# ------------------------------------------------------------------------------------------------- words
def is_word_token(token: str) -> bool:
    """Whether a decoded token is a whole word: a space, then ≥ 2 letters (inner ' or -) with a vowel."""
    core = token[1:]
    return (token.startswith(" ") and len(core) >= 2 and _WORD.fullmatch(core) is not None
            and _VOWEL.search(core) is not None)


def word_fraction(tokens: Sequence[str]) -> float:
    """Share of ``tokens`` that are words (0 for no tokens)."""
    return sum(is_word_token(t) for t in tokens) / len(tokens) if tokens else 0.0


def is_junk(tokens: Sequence[str], min_word_fraction: float = MIN_WORD_FRACTION) -> bool:
    """The junk rule on a feature's top promoted tokens."""
    return word_fraction(tokens) < min_word_fraction


def parse_words(words: str | Iterable[str]) -> list[str]:
    """``"king,queen crown"`` or a list → ``["king", "queen", "crown"]`` (order kept, duplicates and case folded)."""
    items = re.split(r"[,\s]+", words) if isinstance(words, str) else [w for x in words for w in re.split(r"[,\s]+", x)]
    out = list(dict.fromkeys(w.strip().lower() for w in items if w.strip()))
    bad = [w for w in out if not _WORD.fullmatch(w)]
    if bad:
        raise SaeforgeError(f"theme words must be words (letters, inner ' or -), got {bad}",
                            "e.g. --theme-words king,queen,crown")
    return out


def theme_hits(texts: Sequence[str], words: Sequence[str]) -> list[bool]:
    """Per text: whether it contains one of ``words`` as a whole word (case-insensitive)."""
    if not words:
        return [False] * len(texts)
    pattern = re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)
    return [bool(pattern.search(t)) for t in texts]


def theme_rate(texts: Sequence[str], words: Sequence[str]) -> float:
    """Share of ``texts`` that contain a theme word (NaN without words or texts)."""
    if not words or not texts:
        return float("nan")
    hits = theme_hits(texts, words)
    return sum(hits) / len(hits)


def decoded_vocab(tokenizer) -> list[str]:
    """Every token id decoded on its own (index = id)."""
    n = len(tokenizer)
    return tokenizer.batch_decode([[i] for i in range(n)])


def theme_tokens(tokenizer, words: Sequence[str]) -> dict[str, list[int]]:
    """Per word its single-token forms (space-led and bare, lower-case and capitalised); words without one get []."""
    out = {}
    for w in words:
        ids = []
        for form in (" " + w, " " + w.capitalize(), w, w.capitalize()):
            tok = tokenizer(form, add_special_tokens=False)["input_ids"]
            if len(tok) == 1 and int(tok[0]) not in ids:
                ids.append(int(tok[0]))
        out[w] = ids
    return out


# ------------------------------------------------------------------------------------------------- effects
def residual_writer(lm, bound) -> None:
    """Refuse dictionaries whose decoder rows are not residual-stream directions (the logit lens needs them)."""
    width = int(bound.sae.cfg.d_output if hasattr(bound.sae.cfg, "d_output") else bound.sae.cfg.d_in)
    if width != lm.d_model:
        raise SaeforgeError(f"{bound.name} writes {bound.write_site.name} of width {width}, not the residual stream "
                            f"(d_model {lm.d_model}), so its decoder rows have no direct effect on the logits",
                            "rank features by output effect only for dictionaries writing a residual-stream site "
                            "(resid_*, attn_out, mlp_out)")


def unit_directions(sae) -> torch.Tensor:
    """Decoder rows scaled to unit norm, float32 on the CPU ``[d_sae, d]``."""
    d = sae.W_dec.detach().float().cpu()
    return d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)


class LogitLens:
    """The map from residual directions to direct logit effects, M = ``direction_logits(I)`` ``[d, vocab]``, with
    its mean and covariance over the vocabulary (so every feature's standardised effects cost a [d_sae, d] product),
    and the decoded vocabulary; each is computed on first use and kept."""

    def __init__(self, lm):
        self.lm, self.tokenizer = lm, lm.tokenizer
        self._vocab: list[str] | None = None

    @functools.cached_property
    def _stats(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        M = self.lm.direction_logits(torch.eye(self.lm.d_model)).float().cpu()  # linear: row j is e_j's effect
        mean = M.mean(1)
        centred = M - mean[:, None]
        return M, mean, centred @ centred.T / M.shape[1]

    M = property(lambda self: self._stats[0], doc="[d, vocab] direct logit effect of each residual axis")
    mean = property(lambda self: self._stats[1], doc="[d] its mean over the vocabulary")
    cov = property(lambda self: self._stats[2], doc="[d, d] its covariance over the vocabulary")

    @property
    def vocab(self) -> list[str]:
        """Every token decoded on its own (index = id), decoded once."""
        if self._vocab is None:
            self._vocab = decoded_vocab(self.tokenizer)
        return self._vocab

    def promoted(self, direction: torch.Tensor, n: int = N_PROMOTED) -> list[list]:
        """The ``n`` tokens a direction's direct effect raises most: ``[[token, logit], ...]``."""
        vals, idx = self.logits(direction[None])[0].topk(n)
        return [[self.vocab[int(i)], round(float(v), 4)] for v, i in zip(vals, idx)]

    def logits(self, directions: torch.Tensor) -> torch.Tensor:
        return directions.float() @ self.M

    def standardised(self, directions: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
        """z of ``token_ids`` for each direction ``[n, len(token_ids)]``: (l[t] − mean_v l) / std_v l."""
        d = directions.float()
        mu = d @ self.mean
        sd = ((d @ self.cov) * d).sum(1).clamp_min(1e-24).sqrt()
        return (d @ self.M[:, list(token_ids)] - mu[:, None]) / sd[:, None]


def word_scores(z: torch.Tensor, forms: dict[str, list[int]]) -> torch.Tensor:
    """``z`` ``[n, n_tokens]`` over the concatenated forms of each word → ``[n, n_words]``: the best form per word
    (words without forms are skipped)."""
    cols, start = [], 0
    for ids in forms.values():
        if ids:
            cols.append(z[:, start:start + len(ids)].max(1).values)
            start += len(ids)
    return torch.stack(cols, 1)


def direct_effect(lens: LogitLens, directions: torch.Tensor, forms: dict[str, list[int]]) -> torch.Tensor:
    """Mean over the theme words of the best form's standardised direct logit effect, per direction ``[n]``."""
    ids = [t for v in forms.values() for t in v]
    return word_scores(lens.standardised(directions, ids), forms).mean(1)


def gradient_effect(lm, bound, forms: dict[str, list[int]], texts: Sequence[str], policy=None) -> torch.Tensor:
    """d m / d ε for adding ε·u_i at every SAE-data position of ``texts``, m = the mean over those positions of
    log P(next token ∈ theme tokens), for every feature i ``[d_sae]``."""
    from saeforge.data.prompts import PromptEncoder
    from saeforge.models.gradients import Splice

    ids = [t for v in forms.values() for t in v]
    batch = PromptEncoder(lm, policy).batch(list(texts), truncate=True)
    splice = {bound.name: Splice(bound.sae, reads=bound.read_site, writes=bound.write_site)}
    out = lm.spliced_forward(batch.input_ids, splice, attention_mask=batch.attention_mask)
    logp = torch.log_softmax(out.logits.to(torch.promote_types(out.logits.dtype, torch.float32)), -1)
    theme = torch.logsumexp(logp[..., ids], -1)  # log P(theme) at each position
    keep = batch.keep.to(theme.device)
    g_f, _ = out.gradients(theme[keep].mean())[bound.name]
    norms = bound.sae.W_dec.detach().norm(dim=1).clamp_min(1e-12).to(g_f)
    return (g_f[keep].sum(0) / norms).detach().cpu()


@torch.inference_mode()
def steered_shifts(lm, bound, vectors: torch.Tensor, forms: dict[str, list[int]], texts: Sequence[str], *,
                   policy=None, n_promoted: int = N_PROMOTED, vocab: list[str] | None = None, chunk: int = 8
                   ) -> list[dict]:
    """Steer ``texts`` with each row of ``vectors`` ``[k, d]`` added at ``bound``'s write site (every SAE-data
    position) and measure, over those positions, the mean change of log P(next token ∈ theme tokens)
    (``theme_shift``, None without ``forms``) and the ``n_promoted`` tokens whose log-probability rises most
    (``promoted``: [[token, mean change], ...])."""
    from saeforge.data.prompts import PromptEncoder

    vocab = vocab or decoded_vocab(lm.tokenizer)
    ids = [t for v in forms.values() for t in v]
    batch = PromptEncoder(lm, policy).batch(list(texts), truncate=True)
    n = len(batch)
    keep = batch.keep.to(lm.device)

    def logprobs(rows: int, added: torch.Tensor | None) -> torch.Tensor:
        input_ids, mask = batch.input_ids.repeat(rows, 1), batch.attention_mask.repeat(rows, 1)
        if added is None:
            return torch.log_softmax(lm.logits(input_ids, mask).float(), -1)
        where = keep.repeat(rows, 1)[..., None]

        def add(x):
            return x + (added[:, None, :] * where).to(x.dtype)

        with lm.edit({bound.write_site.name: add}):
            return torch.log_softmax(lm.logits(input_ids, mask).float(), -1)

    base = logprobs(1, None)[keep]  # [positions, vocab]
    base_theme = torch.logsumexp(base[:, ids], -1) if ids else None
    out = []
    for start in range(0, vectors.shape[0], chunk):
        part = vectors[start:start + chunk].to(lm.device, torch.float32)
        lp = logprobs(part.shape[0], part.repeat_interleave(n, 0))
        for j in range(part.shape[0]):
            steered = lp[j * n:(j + 1) * n][keep]
            change = (steered - base).mean(0)
            vals, top = change.topk(n_promoted)
            out.append({"theme_shift": float((torch.logsumexp(steered[:, ids], -1) - base_theme).mean())
                        if ids else None,
                        "promoted": [[vocab[int(i)], round(float(v), 4)] for v, i in zip(vals, top)]})
    return out


@torch.inference_mode()
def texts_mean_norm(lm, site: str, texts: Sequence[str], policy=None) -> float:
    """Mean ‖x‖ at ``site`` over the SAE-data positions of ``texts``."""
    from saeforge.data.prompts import PromptEncoder

    batch = PromptEncoder(lm, policy).batch(list(texts), truncate=True)
    x = lm.read(batch.input_ids, [site], attention_mask=batch.attention_mask)[site]
    return float(x[batch.keep.to(x.device)].float().norm(dim=-1).mean())


# ------------------------------------------------------------------------------------------------- ranking
@dataclass
class ThemeSelection:
    """Features ranked by output effect on a theme: JSON-ready through :meth:`to_dict`."""

    sae: str
    write_site: str
    method: str
    words: list[str]
    forms: dict[str, list[str]]  # word → its single-token forms, decoded
    missing: list[str]  # words without a single-token form (not scored)
    effect: torch.Tensor  # [d_sae], every feature's effect
    rows: list[dict]  # the top candidates that pass the junk rule, best first
    rejected: list[dict]  # the candidates that failed it
    checked: dict[int, dict]  # every feature checked (candidates and ``include``) → its row
    strength: float | None  # gradient: the steered check's strength (× the mean ‖x‖ at the write site)

    @property
    def best(self) -> int:
        if not self.rows:
            raise SaeforgeError(f"no feature of {self.sae} passes the junk rule among the top by output effect",
                                "raise top, or lower min_word_fraction")
        return int(self.rows[0]["feature"])

    def to_dict(self) -> dict:
        return {"sae": self.sae, "write_site": self.write_site, "method": self.method, "words": self.words,
                "forms": self.forms, "missing_words": self.missing, "strength": self.strength,
                "features": self.rows, "rejected": self.rejected}


def rank_by_output_effect(lm, bound, words: str | Sequence[str], *, method: str = "gradient", top: int = 20,
                          candidates: int | None = None, strength: float = 0.25, mean_norm: float | None = None,
                          texts: Sequence[str] = NEUTRAL_PROMPTS, policy=None, n_promoted: int = N_PROMOTED,
                          min_word_fraction: float = MIN_WORD_FRACTION, lens: LogitLens | None = None,
                          include: Sequence[int] = ()) -> ThemeSelection:
    """Rank ``bound``'s features by output effect on the theme ``words`` (see the module docstring), dropping junk.

    ``candidates``: how many features, best first-pass effect first, are checked (``gradient``: steered on
    ``texts`` at ``strength`` × ``mean_norm``, the mean ‖x‖ at the write site, measured on ``texts`` when not given;
    default 2 × top; ``direct``: their logit-lens tokens, default 10 × top). ``lens``: a :class:`LogitLens` to reuse
    (it holds a [d_model, vocab] matrix). ``include``: features checked too, whatever their rank (their rows are in
    :attr:`ThemeSelection.checked` with every candidate's)."""
    if method not in METHODS:
        raise SaeforgeError(f"unknown output-effect method {method!r}", f"use one of {', '.join(METHODS)}")
    if top < 1:
        raise SaeforgeError(f"top must be at least 1, got {top}", "e.g. top=20")
    words = parse_words(words)
    if not words:
        raise SaeforgeError("no theme words given", "e.g. --theme-words king,queen,crown")
    residual_writer(lm, bound)
    forms = theme_tokens(lm.tokenizer, words)
    missing = [w for w, ids in forms.items() if not ids]
    if len(missing) == len(words):
        raise SaeforgeError(f"none of the theme words {words} is a single token of this tokenizer",
                            "give common words (each is scored by its single-token forms, e.g. ' king')")
    scored = {w: ids for w, ids in forms.items() if ids}
    lens = lens or LogitLens(lm)
    units = unit_directions(bound.sae)
    rows, rejected = [], []
    if method == "direct":
        effect = direct_effect(lens, units, scored)
        word_z = word_scores(lens.standardised(units, [t for v in scored.values() for t in v]), scored)
        checked = {}
        ranked = effect.argsort(descending=True)[: candidates or 10 * top].tolist()
        for i in ranked + [int(j) for j in include if int(j) not in ranked]:
            tokens = lens.promoted(units[i], n_promoted)
            frac = word_fraction([t for t, _ in tokens])
            checked[i] = {"feature": int(i), "effect": float(effect[i]), "word_fraction": frac, "promoted": tokens,
                          "theme_z": {w: round(float(z), 3) for w, z in zip(scored, word_z[i])},
                          "junk": frac < min_word_fraction}
        for i in ranked:
            (rejected if checked[i]["junk"] else rows).append(checked[i])
            if len(rows) == top:
                break
    else:
        effect = gradient_effect(lm, bound, scored, texts, policy)
        ranked = effect.argsort(descending=True)[: candidates or 2 * top].tolist()
        chosen = ranked + [int(j) for j in include if int(j) not in ranked]
        if mean_norm is None:
            mean_norm = texts_mean_norm(lm, bound.write_site.name, texts, policy)
        shifts = steered_shifts(lm, bound, units[chosen] * strength * mean_norm, scored, texts, policy=policy,
                                n_promoted=n_promoted, vocab=lens.vocab)
        checked = {}
        for i, shift in zip(chosen, shifts):
            frac = word_fraction([t for t, _ in shift["promoted"]])
            checked[i] = {"feature": int(i), "effect": float(effect[i]), "theme_shift": shift["theme_shift"],
                          "word_fraction": frac, "promoted": shift["promoted"], "junk": frac < min_word_fraction}
        rejected = [checked[i] for i in ranked if checked[i]["junk"]]
        rows = [checked[i] for i in ranked if not checked[i]["junk"]][:top]
    return ThemeSelection(bound.name, bound.write_site.name, method, words,
                          {w: [lens.vocab[t] for t in ids] for w, ids in forms.items()}, missing, effect, rows,
                          rejected, checked, strength if method == "gradient" else None)


def theme_features(lm, bound, words: str | Sequence[str], *, method: str = "gradient", top: int = 10,
                   mean_norm: float | None = None, lens: LogitLens | None = None) -> dict:
    """JSON-ready ranking for the dashboard: ``rank_by_output_effect(...).to_dict()``."""
    return rank_by_output_effect(lm, bound, words, method=method, top=top, mean_norm=mean_norm,
                                 lens=lens).to_dict()


def promoted_words(lm, bound, feature: int, *, vector: torch.Tensor | None = None, texts: Sequence[str] =
                   NEUTRAL_PROMPTS, policy=None, n: int = N_PROMOTED, lens: LogitLens | None = None) -> list[str]:
    """The words among a feature's top ``n`` promoted tokens, lower-cased without the space: a theme when the user
    gives none. Given ``vector`` (what the steering adds at the write site), the tokens it promotes when added on
    ``texts``; else the logit lens of the decoder direction."""
    lens = lens or LogitLens(lm)
    if vector is not None:
        tokens = steered_shifts(lm, bound, vector[None], {}, texts, policy=policy, n_promoted=n,
                                vocab=lens.vocab)[0]["promoted"]
    else:
        tokens = lens.promoted(unit_directions(bound.sae)[feature], n)
    return list(dict.fromkeys(t.strip().lower() for t, _ in tokens if is_word_token(t)))
