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
Features are ranked by AUROC among the significant ones, then the rest.
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
from saeforge.utils.atomic import atomic_write_json


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
    model: str = ""
    """Model; empty: the one the SAE was trained on."""
    device: str = "auto"
    """auto, cpu or cuda."""


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
def _text_scores(inspector, texts: list[str], ctx: int) -> tuple[dict[str, np.ndarray], list]:
    """Per SAE: [n_texts, d_sae] max activation per text over its SAE-data positions; and per text
    (tokens, {sae: [T, d_sae] acts, zero outside SAE data})."""
    from saeforge.data.prompts import PromptEncoder

    lm = inspector.lm
    prompts = PromptEncoder(lm, inspector.run.token_policy(), max_tokens=ctx)
    scores = {name: [] for name in inspector.saes}
    details = []
    for start in range(0, len(texts), TEXTS_PER_BATCH):
        batch = prompts.batch(texts[start:start + TEXTS_PER_BATCH], truncate=True)
        acts = lm.read(batch.input_ids, inspector.sites, attention_mask=batch.attention_mask)
        for row, n in enumerate(batch.lengths):
            keep = batch.keep[row, :n]
            per = {}
            for name, (sae, site) in inspector.saes.items():
                f = sae.encode(acts[site.name][row, :n].float()).cpu() * keep[:, None]
                scores[name].append(f.max(0).values.numpy() if n else np.zeros(sae.cfg.d_sae))
                per[name] = f
            details.append(([lm.tokenizer.decode([int(i)]) for i in batch.input_ids[row, :n]], per))
    return {n: np.stack(v) for n, v in scores.items()}, details


def contrast(cfg: ContrastConfig, inspector=None) -> dict:
    from saeforge.features.inspect import Inspector

    if not cfg.path:
        raise SaeforgeError("no run or SAE folder given", "saeforge contrast RUN_DIR --positive A.txt --negative B.txt")
    if not cfg.positive or not cfg.negative:
        raise SaeforgeError("give both --positive and --negative text files", "one text per line in each")
    if not 0 < cfg.fdr < 1:
        raise SaeforgeError(f"--fdr must lie in (0, 1), got {cfg.fdr}", "use e.g. 0.05")
    pos_texts = read_texts(cfg.positive, cfg.text_field, min_count=2)
    neg_texts = read_texts(cfg.negative, cfg.text_field, min_count=2)
    inspector = inspector or Inspector(cfg.path, model=cfg.model, device=cfg.device)
    ctx = min(inspector.run.context_length(cfg.context_length), inspector.max_tokens)
    pos_scores, pos_details = _text_scores(inspector, pos_texts, ctx)
    neg_scores, _ = _text_scores(inspector, neg_texts, ctx)
    report = {"positive": cfg.positive, "negative": cfg.negative, "n_positive": len(pos_texts),
              "n_negative": len(neg_texts), "fdr": cfg.fdr, "saes": {}}
    for name in inspector.saes:
        a, b = pos_scores[name], neg_scores[name]
        auroc, p = mann_whitney(a, b)
        q = benjamini_hochberg(p)
        freq_pos, freq_neg = (a > 0).mean(0), (b > 0).mean(0)
        mean_pos, mean_neg = a.mean(0), b.mean(0)
        significant = q <= cfg.fdr
        order = np.lexsort((-freq_pos + freq_neg, -auroc, ~significant))
        rows = []
        for j in order[: cfg.top]:
            j = int(j)
            best = np.argsort(-a[:, j])[: cfg.examples]
            examples = [{"tokens": pos_details[t][0], "acts": pos_details[t][1][name][:, j].tolist(),
                         "max_act": float(a[t, j])} for t in best if a[t, j] > 0]
            rows.append({"feature": j, "auroc": float(auroc[j]), "p_value": float(p[j]), "q_value": float(q[j]),
                         "significant": bool(significant[j]), "freq_pos": float(freq_pos[j]),
                         "freq_neg": float(freq_neg[j]), "freq_diff": float(freq_pos[j] - freq_neg[j]),
                         "mean_pos": float(mean_pos[j]), "mean_neg": float(mean_neg[j]),
                         "ratio": float(mean_pos[j] / mean_neg[j]) if mean_neg[j] > 0 else None,
                         "examples": examples})
        report["saes"][name] = {"n_significant": int(significant.sum()), "features": rows}
    out = Path(cfg.path) / "contrast.json"
    atomic_write_json(out, report)
    report["path"] = str(out)
    return report


def run_contrast(cfg: ContrastConfig) -> dict:
    report = contrast(cfg)
    print(f"{report['n_positive']} positive vs {report['n_negative']} negative texts; "
          f"significant at FDR {report['fdr']}:")
    for name, r in report["saes"].items():
        print(f"{name}: {r['n_significant']} significant features")
        print(f"  {'feature':>8} {'AUROC':>6} {'q':>9} {'freq +':>7} {'freq -':>7} {'ratio':>8}  example")
        for row in r["features"]:
            ex = row["examples"][0] if row["examples"] else None
            snippet = ""
            if ex:
                peak = int(np.argmax(ex["acts"]))
                snippet = "".join(ex["tokens"][max(0, peak - 6):peak]) + "[" + ex["tokens"][peak] + "]"
            print(f"  {row['feature']:>8} {row['auroc']:>6.3f} {row['q_value']:>9.2e} {row['freq_pos']:>7.2f} "
                  f"{row['freq_neg']:>7.2f} {'inf' if row['ratio'] is None else format(row['ratio'], '.2f'):>8}  {snippet!r}" + ("" if row["significant"] else "  (n.s.)"))
    print(f"written {report['path']}")
    return report
