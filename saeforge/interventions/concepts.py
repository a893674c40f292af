"""Concept sets with token-level labels, and the concept swap that tests whether a latent controls its concept.

Used by AlignSAE (:mod:`saeforge.saes.alignsae`, arXiv 2512.02004) and to compare it with an unsupervised SAE's
best latent for the same concept (docs/steering.md, "AlignSAE").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import torch

from saeforge.errors import SaeforgeError

__all__ = ["CONCEPTS", "CONCEPT_WORDS", "SwapLatents", "alignment_demo", "auroc", "best_latents", "check_concepts",
           "concept_activations", "corpus_lines", "first_tokens", "format_alignment", "label_text", "list_prompts",
           "swap_effect", "template_texts"]


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the ROC curve of ``scores`` for the bool labels ``positive`` (the Mann-Whitney U statistic of
    contrast, ties counted half); NaN when one class is empty."""
    from saeforge.features.contrast import mann_whitney

    scores = scores.detach().double().reshape(-1).cpu()
    positive = positive.reshape(-1).bool().cpu()
    if bool(positive.all()) or not bool(positive.any()):
        return float("nan")
    area, _ = mann_whitney(scores[positive][:, None].numpy(), scores[~positive][:, None].numpy())
    return float(area[0])


# ------------------------------------------------------------------------------------------------ the concept set
CONCEPT_WORDS: dict[str, tuple[str, ...]] = {
    "royalty": ("king", "queen", "prince", "princess", "duke", "duchess", "lord", "lady", "crown", "throne",
                "majesty", "royal", "emperor", "earl"),
    "number": ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "twelve", "twenty",
               "hundred", "thousand"),
    "day": ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
    "colour": ("red", "blue", "green", "yellow", "white", "black", "purple", "brown", "grey", "pink", "orange",
               "golden"),
    "family": ("father", "mother", "brother", "sister", "son", "daughter", "uncle", "aunt", "cousin", "wife",
               "husband", "grandmother", "grandfather", "nephew", "niece"),
}
"""The offline concept set: a token belongs to a concept when it is part of one of its words (whole word, any
case). Five concepts the embedded 135M model represents well enough to continue lists of them."""
CONCEPTS = tuple(CONCEPT_WORDS)

TEMPLATES = (
    "On {day} the {royalty} gave {number} {colour} roses to his {family}.",
    "My {family} saw {number} {colour} birds near the castle of the {royalty} on {day}.",
    "The {royalty} wore {colour} silk on {day}, and {number} guards walked behind her {family}.",
    "Every {day} our {family} counts to {number} in the {colour} hall.",
    "Her {family} painted the door {colour} last {day}.",
    "We waited {number} hours for the {royalty} and his {family}.",
    "The {colour} flag of the {royalty} was raised on {day}.",
    "I have {number} brothers, and my {family} likes {colour} apples.",
    "He met the {royalty} on a cold {day} morning.",
    "The market opens at {number} on {day}; my {family} sells {colour} cloth there.",
    "There were {number} {colour} horses in the stable of the {royalty}.",
    "See you on {day}, said my {family}.",
)


def _cap(word: str, rng) -> str:
    return word.capitalize() if rng.random() < 0.15 else word


def template_texts(n: int, seed: int = 0) -> list[str]:
    """``n`` sentences filled from :data:`TEMPLATES` with random concept words."""
    import random

    rng = random.Random(seed)
    return [rng.choice(TEMPLATES).format(**{c: _cap(rng.choice(w), rng) for c, w in CONCEPT_WORDS.items()})
            for _ in range(n)]


def check_concepts(concepts: Sequence[str]) -> tuple[str, ...]:
    """The names, each known to the concept set; an error naming the unknown ones otherwise."""
    concepts = tuple(concepts)
    unknown = [c for c in concepts if c not in CONCEPT_WORDS]
    if unknown or not concepts:
        raise SaeforgeError(f"unknown concept(s) {', '.join(map(repr, unknown)) or '(none given)'}; the concept set "
                            f"holds {', '.join(CONCEPTS)}", f"pass concepts from that list, e.g. --concepts "
                            f"{' '.join(CONCEPTS[:2])}")
    return concepts


def _word_pattern(words: Sequence[str]) -> re.Pattern:
    return re.compile(r"\b(?:" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + r")\b",
                      re.IGNORECASE)


def label_text(tokenizer, text: str, concepts: Sequence[str] = CONCEPTS) -> tuple[list[int], torch.Tensor]:
    """Token ids of ``text`` (no special tokens) and their labels [tokens, len(concepts)]: 1 where a token overlaps
    a word of the concept."""
    concepts = check_concepts(concepts)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = torch.zeros(len(enc["input_ids"]), len(concepts))
    for j, c in enumerate(concepts):
        for m in _word_pattern(CONCEPT_WORDS[c]).finditer(text):
            for t, (a, b) in enumerate(enc["offset_mapping"]):
                if a < m.end() and b > m.start():
                    labels[t, j] = 1.0
    return list(enc["input_ids"]), labels


def _padded(rows: Sequence[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ids padded on the right (a causal model reads each row's own tokens unchanged), and the mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return ids, mask


def _pad_id(lm) -> int:
    tok = lm.tokenizer
    return next(v for v in (tok.pad_token_id, tok.eos_token_id, 0) if v is not None)


@torch.inference_mode()
def concept_activations(lm, site: str, texts: Sequence[str], concepts: Sequence[str] = CONCEPTS,
                        progress: bool = True, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations [N, d] at ``site`` of every token of ``texts`` (each read after BOS, as SAE training data is)
    and their concept labels [N, C]."""
    from tqdm.auto import tqdm

    concepts = check_concepts(concepts)
    bos = lm.bos_token_id()
    prefix = [bos] if bos is not None else []
    labelled = [label_text(lm.tokenizer, t, concepts) for t in texts]
    labelled = [(ids, lab) for ids, lab in labelled if ids]
    if not labelled:
        raise SaeforgeError("no text to read", "give at least one non-empty text")
    acts, labels = [], []
    for start in tqdm(range(0, len(labelled), batch_size), desc="reading", unit="batch", disable=not progress,
                      leave=False):
        chunk = labelled[start:start + batch_size]
        ids, mask = _padded([prefix + ids for ids, _ in chunk], _pad_id(lm))
        x = lm.read(ids, [site], attention_mask=mask)[site].float().cpu()
        for row, (tokens, lab) in enumerate(chunk):
            acts.append(x[row, len(prefix):len(prefix) + len(tokens)])
            labels.append(lab)
    return torch.cat(acts), torch.cat(labels)


def best_latents(sae, acts: torch.Tensor, labels: torch.Tensor, concepts: Sequence[str] = CONCEPTS,
                 chunk: int = 4096) -> dict[str, dict]:
    """Per concept, the latent of ``sae`` whose activation best separates its tokens from the rest (highest AUROC),
    with that AUROC and its mean activation on the concept's tokens."""
    with torch.no_grad():
        z = torch.cat([sae.encode(acts[i:i + chunk].to(sae.device)).float().cpu() for i in range(0, len(acts), chunk)])
    out = {}
    for j, c in enumerate(concepts):
        pos = labels[:, j] > 0.5
        # rank candidates by the gap of the means first: AUROC for every latent of a wide SAE would be slow
        gap = z[pos].mean(0) - z[~pos].mean(0)
        candidates = gap.topk(min(32, z.shape[1])).indices
        scores = {int(i): auroc(z[:, i], pos) for i in candidates}
        best = max(scores, key=scores.get)
        out[c] = {"latent": best, "auroc": scores[best], "mean_on": float(z[pos, best].mean())}
    return out


# ------------------------------------------------------------------------------------------------ the swap
def list_prompts(concept: str, n: int = 8, seed: int = 0) -> list[str]:
    """Prompts that list three words of ``concept`` and end on a comma, so the next word should be a fourth."""
    import random

    check_concepts([concept])
    rng = random.Random(seed)
    words = CONCEPT_WORDS[concept]
    out = []
    for _ in range(n):
        if concept in ("day", "number"):  # ordered lists, as the model has seen them
            start = rng.randrange(0, len(words) - 3 if concept == "day" else 7)
            picked = words[start:start + 3]
        else:
            picked = rng.sample(list(words), 3)
        out.append(", ".join(picked) + ",")
    return out


def first_tokens(tokenizer, words: Sequence[str]) -> list[int]:
    """The first token of each word as it follows a space, capitalised and not, without repeats."""
    ids: list[int] = []
    for w in words:
        for form in {w, w.lower(), w.capitalize()}:
            t = tokenizer(" " + form, add_special_tokens=False)["input_ids"][0]
            if t not in ids:
                ids.append(t)
    return ids


@dataclass
class SwapLatents:
    """How one SAE writes a concept: a latent per concept and the activation that stands for "present"."""

    sae: object
    latents: dict[str, int]
    on_value: dict[str, float]


@torch.inference_mode()
def swap_effect(lm, site: str, spec: SwapLatents, source: str, target: str, prompts: Sequence[str],
                alpha: float) -> dict[str, float]:
    """Swap ``source`` for ``target`` at every token of a source word in each prompt (the source latent set to 0,
    the target latent to α × its "present" value, the SAE's error kept: x + Δz·W_dec), and read the model's next
    token: the probability mass on the target's words, on the source's words, and how often the top token is a
    target word. α = 0: the clean model."""
    words_src = first_tokens(lm.tokenizer, CONCEPT_WORDS[source])
    words_tgt = first_tokens(lm.tokenizer, CONCEPT_WORDS[target])
    sae = spec.sae
    i_src, i_tgt = spec.latents[source], spec.latents[target]
    d_src, d_tgt = sae.W_dec[i_src].detach(), sae.W_dec[i_tgt].detach()
    bos = lm.bos_token_id()
    prefix = [bos] if bos is not None else []
    rows, where = [], []
    for prompt in prompts:
        ids, lab = label_text(lm.tokenizer, prompt, [source])
        rows.append(prefix + ids)
        where += [(r, len(prefix) + t) for r in [len(rows) - 1] for t in lab[:, 0].nonzero().squeeze(1).tolist()]
    ids, mask = _padded(rows, _pad_id(lm))
    r_idx = torch.tensor([r for r, _ in where], dtype=torch.long)
    t_idx = torch.tensor([t for _, t in where], dtype=torch.long)

    def swap(x):
        if alpha == 0 or not where:
            return x
        x = x.clone()
        z = sae.encode(x[r_idx, t_idx].to(sae.dtype))
        delta = (-z[:, i_src])[:, None] * d_src + (alpha * spec.on_value[target] - z[:, i_tgt])[:, None] * d_tgt
        x[r_idx, t_idx] += delta.to(x.dtype)
        return x

    with lm.edit({site: swap}):
        logits = lm.logits(ids, mask).float()
    last = logits[torch.arange(len(rows)), mask.sum(1) - 1]
    p = last.softmax(-1)
    return {"p_target": float(p[:, words_tgt].sum(1).mean()), "p_source": float(p[:, words_src].sum(1).mean()),
            "top_target": float(torch.isin(p.argmax(1), torch.tensor(words_tgt)).float().mean())}


# ------------------------------------------------------------------------------------------------ the demo
def corpus_lines(source: str, n: int, min_words: int = 6) -> list[str]:
    """The first ``n`` lines of ``source`` (e.g. ``embedded:train``) with at least ``min_words`` words."""
    from saeforge.data.text_source import TextSource

    out: list[str] = []
    for doc in TextSource(source, "text").documents():
        for line in doc.splitlines():
            if len(line.split()) >= min_words:
                out.append(line.strip())
                if len(out) >= n:
                    return out
    return out


def alignment_demo(sae_path: str, out: str, *, n_templates: int = 800, n_lines: int = 500, d_sae: int = 1152,
                   epochs: int = 8, alphas: Sequence[float] = (1.0, 2.0, 4.0), n_prompts: int = 6,
                   progress: bool = True) -> dict:
    """Train an AlignSAE on the concept set at the site of the SAE in ``sae_path`` (the unsupervised comparison),
    then swap every concept for every other on list prompts with each SAE's latent for the concept (AlignSAE's
    supervised one, the unsupervised SAE's best-AUROC one). Writes ``out``/alignment.json and returns it."""
    import json
    from pathlib import Path

    from saeforge.data.activation_cache import ActivationCache
    from saeforge.runs import load_run
    from saeforge.saes import load_sae
    from saeforge.training import TrainConfig, train
    from saeforge.utils.atomic import atomic_write_json

    run = load_run(sae_path, device="cpu")
    if len(run.saes) != 1:
        raise SaeforgeError(f"{sae_path} holds {len(run.saes)} SAEs", "pass one SAE folder (RUN/saes/NAME)")
    name, bound = next(iter(run.saes.items()))
    lm, site = run.lm, bound.write_site.name
    folder = Path(out)
    train_texts = template_texts(n_templates, seed=0) + corpus_lines("embedded:train", n_lines)
    test_texts = template_texts(n_templates // 4, seed=1) + corpus_lines("embedded:validation", n_lines // 4)
    x, y = concept_activations(lm, site, train_texts, progress=progress)
    x_test, y_test = concept_activations(lm, site, test_texts, progress=progress)
    cache = folder / "cache"
    if not (cache / "manifest.json").is_file():
        ActivationCache.from_arrays(cache, {site: x, "concepts": y}, progress=progress)
    batch = 1024
    train(TrainConfig(out=str(folder / "run"), cache=str(cache), sites=(site,), architecture="alignsae",
                      d_sae=d_sae, sae_options=json.dumps({"concepts": list(CONCEPTS)}),
                      tokens=(epochs * len(x) // batch) * batch, batch_size=batch, lr_warmup_steps=20,
                      progress=progress, device="cpu"))
    align = load_sae(folder / "run" / "saes" / site)
    with torch.no_grad():
        z_test = align.encode(x_test)
    aligned = {c: {"latent": align.concept_index(c), "auroc": auroc(z_test[:, align.concept_index(c)],
                                                                     y_test[:, j] > 0.5),
                   "mean_on": float(z_test[y_test[:, j] > 0.5, align.concept_index(c)].mean())}
               for j, c in enumerate(CONCEPTS)}
    picked = best_latents(bound.sae, x, y)  # chosen on the training texts, scored on the held-out ones
    with torch.no_grad():
        z_ref = torch.cat([bound.sae.encode(x_test[i:i + 4096]) for i in range(0, len(x_test), 4096)])
    for j, c in enumerate(CONCEPTS):
        picked[c]["auroc_held_out"] = auroc(z_ref[:, picked[c]["latent"]], y_test[:, j] > 0.5)
    with torch.no_grad():
        fvu = float((x_test - align(x_test)).pow(2).sum() / (x_test - x_test.mean(0)).pow(2).sum())
    report = {"site": site, "unsupervised": name, "tokens_train": len(x), "tokens_test": len(x_test),
              "concept_tokens_train": {c: int(y[:, j].sum()) for j, c in enumerate(CONCEPTS)},
              "alignsae": {"d_sae": d_sae, "fvu_held_out": fvu, "binding": align.binding_accuracy(x_test, y_test),
                           "latents": aligned},
              "topk": picked, "swaps": []}
    sides = {"alignsae": SwapLatents(align, {c: v["latent"] for c, v in aligned.items()},
                                     {c: 1.0 for c in CONCEPTS}),
             "topk": SwapLatents(bound.sae, {c: v["latent"] for c, v in picked.items()},
                                 {c: v["mean_on"] for c, v in picked.items()})}
    for source in CONCEPTS:
        prompts = list_prompts(source, n_prompts)
        for target in CONCEPTS:
            if target == source:
                continue
            row = {"source": source, "target": target,
                   "clean": swap_effect(lm, site, sides["alignsae"], source, target, prompts, 0.0)}
            for method, spec in sides.items():
                row[method] = {f"{a:g}": swap_effect(lm, site, spec, source, target, prompts, a) for a in alphas}
            report["swaps"].append(row)
    atomic_write_json(folder / "alignment.json", report)
    return report


def format_alignment(report: dict) -> str:
    """The demo's tables: how well each SAE's latent reads its concept, and what swapping does, averaged over the
    20 source → target pairs."""
    lines = ["| concept | AlignSAE latent AUROC (held out) | binding | TopK best latent | its AUROC (held out) |",
             "|---|---|---|---|---|"]
    for c in CONCEPTS:
        a, t = report["alignsae"]["latents"][c], report["topk"][c]
        lines.append(f"| {c} | {a['auroc']:.3f} | {report['alignsae']['binding'][c]:.0%} | {t['latent']} | "
                     f"{t['auroc_held_out']:.3f} |")
    swaps = report["swaps"]
    alphas = list(swaps[0]["alignsae"])

    def mean(key, method, alpha=None):
        vals = [r["clean"][key] if method == "clean" else r[method][alpha][key] for r in swaps]
        return sum(vals) / len(vals)

    lines += ["", "| latents | α | P(target word) | P(source word) | top token a target word |", "|---|---|---|---|---|",
              f"| clean model | — | {mean('p_target', 'clean'):.3f} | {mean('p_source', 'clean'):.3f} | "
              f"{mean('top_target', 'clean'):.0%} |"]
    for method in ("alignsae", "topk"):
        for a in alphas:
            lines.append(f"| {method} | {a} | {mean('p_target', method, a):.3f} | {mean('p_source', method, a):.3f} | "
                         f"{mean('top_target', method, a):.0%} |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m saeforge.interventions.concepts RUN/saes/NAME OUT
    import sys

    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m saeforge.interventions.concepts RUN/saes/NAME OUT_DIR")
    print(format_alignment(alignment_demo(sys.argv[1], sys.argv[2])))
