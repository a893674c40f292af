"""Contrastive feature discovery: which features fire specifically on texts A rather than texts B.

Each text is one unit: a feature's score for a text is its maximum activation over the text's tokens (BOS/special
positions excluded). Per feature, over the two sets:
- ``freq_pos`` / ``freq_neg``: fraction of texts it fires on, and their difference (the seed method's frequency
  difference); ``mean_pos`` / ``mean_neg`` and ``ratio`` = mean_pos / mean_neg (its mean-activation ratio; null
  when the feature never fires on the negatives);
- ``auroc``: the probability that a random positive text scores higher than a random negative one (ties count ½),
  i.e. the Mann–Whitney U statistic / (n_pos · n_neg);
- ``p_value``: one-sided Mann–Whitney test (normal approximation with tie correction) that positives score higher;
- ``q_value``: Benjamini–Hochberg adjusted p-value over all features, so the features reported as significant
  (q ≤ ``fdr``) control the false-discovery rate across the thousands of features tested at once.
Features are ranked by AUROC among the significant ones, then the rest (``rank_by="auroc"``).

A feature that detects the texts is not necessarily one that makes the model write them. With ``theme_words`` each
reported feature also gets its **output effect** on the theme (``saeforge.interventions.selection``: by default the
gradient of log P(theme words) on neutral prompts, the best candidates then steered for real; or the direct logit
effect of the decoder direction) and the tokens steering with it promotes, flagged as junk when they are mostly word
pieces or punctuation; ``rank_by="output-effect"`` ranks by that effect instead, junk dropped (the features to steer
with). Without theme words the output ranking uses the words that mark the positive texts
(:func:`theme_words_from_texts`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from simple_parsing.helpers import field

from saeforge.data.texts import read_texts
from saeforge.errors import SaeforgeError
from saeforge.options import DeviceOptions, RunModelOptions, flat_options
from saeforge.utils.atomic import atomic_write_json


@flat_options
@dataclass(frozen=True)
class ContrastConfig:
    """Rank features by how specifically they fire on one set of texts versus another."""

    path: str = field(default="", positional=True)
    """A run directory (every SAE under saes/) or one SAE folder."""
    positive: str = ""
    """Texts the features should fire on: a .txt file (one text per line) or .jsonl (see --text-field)."""
    negative: str = ""
    """Texts to contrast with, in the same formats."""
    text_field: str = "text"
    """Field holding the text in .jsonl files."""
    top: int = 20
    """Features reported per SAE."""
    fdr: float = 0.05
    """False-discovery rate of the Benjamini–Hochberg cut-off."""
    examples: int = 3
    """Positive texts shown per reported feature, with the feature's activations."""
    context_length: int = 0
    """Tokens per text (longer texts are cut); 0: the SAE's training context length."""
    rank_by: str = "auroc"
    """auroc (features that detect the positive texts) or output-effect (features whose decoder direction makes the
    model write the theme words; junk features dropped: the ones to steer with)."""
    theme_words: str = ""
    """Comma-separated theme words (king,queen,crown) for the output-effect column; empty with --rank-by
    output-effect: the words that mark the positive texts."""
    min_word_fraction: float = 0.5
    """Junk rule: with --rank-by output-effect, features whose top 10 promoted tokens hold fewer whole words than
    this share (word pieces, punctuation) are dropped."""
    effect: str = "gradient"
    """Output effect: gradient (∂ log P(theme) through the later layers on neutral prompts, the best candidates then
    steered for real: theme shift and promoted tokens) or direct (the logit lens of the decoder direction: cheap,
    meaningful near the last layer only)."""
    model_options: RunModelOptions = field(default_factory=RunModelOptions)
    """The model the SAEs read."""
    device_options: DeviceOptions = field(default_factory=DeviceOptions)
    """Where the model runs."""


def average_ranks(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column-wise ranks 1..n with ties averaged, and per column Σ(t³ − t) over tie groups (for the variance)."""
    n, m = values.shape
    ranks = np.empty_like(values, dtype=np.float64)
    tie_term = np.zeros(m)
    for j in range(m):
        col = values[:, j]
        order = np.argsort(col, kind="mergesort")
        uniq, inverse, counts = np.unique(col[order], return_inverse=True, return_counts=True)
        ends = np.cumsum(counts)
        avg = ends - (counts - 1) / 2.0
        ranks[order, j] = avg[inverse]
        tie_term[j] = float((counts.astype(np.float64) ** 3 - counts).sum())
    return ranks, tie_term


def mann_whitney(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROC and one-sided p-value (positives higher) per column of ``pos`` [n_pos, m] vs ``neg`` [n_neg, m]."""
    n1, n2 = pos.shape[0], neg.shape[0]
    n = n1 + n2
    ranks, tie_term = average_ranks(np.concatenate([pos, neg]).astype(np.float64))
    u = ranks[:n1].sum(0) - n1 * (n1 + 1) / 2.0
    auroc = u / (n1 * n2)
    sigma = np.sqrt(n1 * n2 / 12.0 * ((n + 1) - tie_term / (n * (n - 1))))
    z = np.where(sigma > 0, (u - n1 * n2 / 2.0) / np.where(sigma > 0, sigma, 1.0), 0.0)
    p = np.array([0.5 * math.erfc(v / math.sqrt(2)) for v in z])
    return auroc, np.where(sigma > 0, p, 1.0)


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    m = len(p)
    order = np.argsort(p)
    scaled = p[order] * m / np.arange(1, m + 1)
    q = np.minimum.accumulate(scaled[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(q, 1.0)
    return out


TEXTS_PER_BATCH = 16


@torch.inference_mode()
def _text_scores(run, texts: list[str], ctx: int) -> tuple[dict[str, np.ndarray], list]:
    """Per SAE: [n_texts, d_sae] max activation per text over its SAE-data positions (at the site it reads); and
    per text (tokens, {sae: [T, d_sae] acts, zero outside SAE data})."""
    from saeforge.data.prompts import PromptEncoder

    lm = run.lm
    prompts = PromptEncoder(lm, run.token_policy(), max_tokens=ctx)
    scores = {name: [] for name in run.saes}
    details = []
    for start in range(0, len(texts), TEXTS_PER_BATCH):
        batch = prompts.batch(texts[start:start + TEXTS_PER_BATCH], truncate=True)
        acts = lm.read(batch.input_ids, run.read_sites, attention_mask=batch.attention_mask)
        for row, n in enumerate(batch.lengths):
            keep = batch.keep[row, :n]
            per = {}
            for name, bound in run.saes.items():
                sae = bound.sae
                f = sae.encode(acts[bound.read_site.name][row, :n].float()).cpu() * keep[:, None]
                scores[name].append(f.max(0).values.numpy() if n else np.zeros(sae.cfg.d_sae))
                per[name] = f
            details.append(([lm.tokenizer.decode([int(i)]) for i in batch.input_ids[row, :n]], per))
    return {n: np.stack(v) for n, v in scores.items()}, details


RANKINGS = ("auroc", "output-effect")
MAX_PROMPT_TOKENS = 1024


def theme_words_from_texts(positive: list[str], negative: list[str], n: int = 8, min_ratio: float = 3.0
                           ) -> list[str]:
    """Words (≥ 3 letters) that mark the positive texts: the ``n`` with the largest difference in the share of texts
    holding them (positives − negatives), among those at least ``min_ratio`` times as common in the positives."""
    import re

    def share(texts):
        counts: dict[str, int] = {}
        for t in texts:
            for w in set(re.findall(r"[a-z]{3,}", t.lower())):
                counts[w] = counts.get(w, 0) + 1
        return {w: c / len(texts) for w, c in counts.items()}

    p, q = share(positive), share(negative)
    marked = [(p[w] - q.get(w, 0.0), w) for w in p if p[w] >= min_ratio * q.get(w, 0.0) and p[w] > q.get(w, 0.0)]
    return [w for _, w in sorted(marked, key=lambda t: (-t[0], t[1]))[:n]]


def contrast(cfg: ContrastConfig, run=None) -> dict:
    """``run``: a :class:`~saeforge.runs.LoadedRun` of ``cfg.path`` already loaded (its model is reused)."""
    if not cfg.path:
        raise SaeforgeError("no run or SAE folder given", "saeforge contrast RUN_DIR --positive A.txt --negative B.txt")
    if not cfg.positive or not cfg.negative:
        raise SaeforgeError("give both --positive and --negative text files", "one text per line in each")
    if not 0 < cfg.fdr < 1:
        raise SaeforgeError(f"--fdr must lie in (0, 1), got {cfg.fdr}", "use e.g. 0.05")
    if cfg.rank_by not in RANKINGS:
        raise SaeforgeError(f"unknown ranking {cfg.rank_by!r}", f"use --rank-by {' or '.join(RANKINGS)}")
    from saeforge.interventions.selection import METHODS, parse_words

    if cfg.effect not in METHODS:
        raise SaeforgeError(f"unknown output effect {cfg.effect!r}", f"use --effect {' or '.join(METHODS)}")
    words = parse_words(cfg.theme_words) if cfg.theme_words else []
    pos_texts = read_texts(cfg.positive, cfg.text_field, min_count=2)
    neg_texts = read_texts(cfg.negative, cfg.text_field, min_count=2)
    if not words and cfg.rank_by == "output-effect":
        words = theme_words_from_texts(pos_texts, neg_texts)
        if not words:
            raise SaeforgeError("no word marks the positive texts, so there is no theme to rank by",
                                "give the theme: --theme-words king,queen,crown")
    if run is None:
        from saeforge.runs import load_run

        run = load_run(cfg.path, model=cfg.model, device=cfg.device)
    lm = run.lm
    ctx = min(run.context_length(cfg.context_length), lm.max_context or MAX_PROMPT_TOKENS, MAX_PROMPT_TOKENS)
    pos_scores, pos_details = _text_scores(run, pos_texts, ctx)
    neg_scores, _ = _text_scores(run, neg_texts, ctx)
    report = {"positive": cfg.positive, "negative": cfg.negative, "n_positive": len(pos_texts),
              "n_negative": len(neg_texts), "fdr": cfg.fdr, "rank_by": cfg.rank_by, "theme_words": words,
              "effect": cfg.effect if words else None, "saes": {}}
    lens = None
    for name, bound in run.saes.items():
        a, b = pos_scores[name], neg_scores[name]
        auroc, p = mann_whitney(a, b)
        q = benjamini_hochberg(p)
        freq_pos, freq_neg = (a > 0).mean(0), (b > 0).mean(0)
        mean_pos, mean_neg = a.mean(0), b.mean(0)
        significant = q <= cfg.fdr
        order = [int(j) for j in np.lexsort((-freq_pos + freq_neg, -auroc, ~significant))[: cfg.top]]
        selection = None
        if words and (cfg.rank_by == "output-effect" or bound.write_site.d == lm.d_model):
            from saeforge.interventions.selection import LogitLens, rank_by_output_effect

            lens = lens or LogitLens(lm)
            from saeforge.interventions.steering import recorded_mean_norm

            selection = rank_by_output_effect(
                lm, bound, words, method=cfg.effect, top=cfg.top, lens=lens, policy=run.token_policy(),
                min_word_fraction=cfg.min_word_fraction, mean_norm=recorded_mean_norm(bound),
                include=() if cfg.rank_by == "output-effect" else order)
            if cfg.rank_by == "output-effect":
                order = [r["feature"] for r in selection.rows]
        rows = []
        for j in order:
            best = np.argsort(-a[:, j])[: cfg.examples]
            examples = [{"tokens": pos_details[t][0], "acts": pos_details[t][1][name][:, j].tolist(),
                         "max_act": float(a[t, j])} for t in best if a[t, j] > 0]
            row = {"feature": j, "auroc": float(auroc[j]), "p_value": float(p[j]), "q_value": float(q[j]),
                   "significant": bool(significant[j]), "freq_pos": float(freq_pos[j]),
                   "freq_neg": float(freq_neg[j]), "freq_diff": float(freq_pos[j] - freq_neg[j]),
                   "mean_pos": float(mean_pos[j]), "mean_neg": float(mean_neg[j]),
                   "ratio": float(mean_pos[j] / mean_neg[j]) if mean_neg[j] > 0 else None,
                   "examples": examples}
            if selection is not None:
                row.update(_output_columns(selection, j))
            rows.append(row)
        report["saes"][name] = {"n_significant": int(significant.sum()), "features": rows}
        if selection is not None:
            report["saes"][name].update(theme_forms=selection.forms, missing_words=selection.missing,
                                        rejected_as_junk=[r["feature"] for r in selection.rejected])
    out = Path(cfg.path) / "contrast.json"
    atomic_write_json(out, report)
    report["path"] = str(out)
    return report


def _output_columns(selection, j: int) -> dict:
    """The output-effect columns of feature ``j``: effect (and steered theme shift), promoted tokens, junk."""
    row = selection.checked[j]
    out = {"output_effect": float(selection.effect[j]), "promoted": row["promoted"],
           "word_fraction": row["word_fraction"], "junk": row["junk"]}
    if "theme_shift" in row:
        out["theme_shift"] = row["theme_shift"]
    return out


def run_contrast(cfg: ContrastConfig) -> dict:
    from saeforge.interventions.steering import loading_message

    print(loading_message(cfg.path, cfg.model), flush=True)
    report = contrast(cfg)
    print(f"{report['n_positive']} positive vs {report['n_negative']} negative texts; "
          f"significant at FDR {report['fdr']}; ranked by {report['rank_by']}" +
          (f"; output effect ({report['effect']}) on {', '.join(report['theme_words'])}"
           if report["theme_words"] else "") + ":")
    for name, r in report["saes"].items():
        print(f"{name}: {r['n_significant']} significant features" +
              (f"; {len(r['rejected_as_junk'])} rejected as junk (promoted tokens mostly word pieces)"
               if "rejected_as_junk" in r else ""))
        effect = bool(report["theme_words"])
        print(f"  {'feature':>8} {'AUROC':>6} {'q':>9} {'freq +':>7} {'freq -':>7} {'ratio':>8}" +
              (f" {'effect':>7}  promotes" if effect else "") + "  example")
        for row in r["features"]:
            ex = row["examples"][0] if row["examples"] else None
            snippet = ""
            if ex:
                peak = int(np.argmax(ex["acts"]))
                snippet = "".join(ex["tokens"][max(0, peak - 6):peak]) + "[" + ex["tokens"][peak] + "]"
            ratio = "inf" if row["ratio"] is None else format(row["ratio"], ".2f")
            promotes = ""
            if effect:
                promotes = (f" {row['output_effect']:>7.2f}  " + " ".join(repr(t) for t, _ in row["promoted"][:4])
                            + (" (junk)" if row["junk"] else ""))
            promotes = promotes if "output_effect" in row else ""
            print(f"  {row['feature']:>8} {row['auroc']:>6.3f} {row['q_value']:>9.2e} {row['freq_pos']:>7.2f} "
                  f"{row['freq_neg']:>7.2f} {ratio:>8}{promotes}  {snippet!r}" +
                  ("" if row["significant"] else "  (n.s.)"))
    print(f"written {report['path']}")
    return report
