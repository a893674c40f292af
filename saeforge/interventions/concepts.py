"""Concept sets with token-level labels, and the concept swap that tests whether a latent controls its concept.

Used by AlignSAE (:mod:`saeforge.saes.alignsae`, arXiv 2512.02004) and to compare it with an unsupervised SAE's
best latent for the same concept and with CAA (docs/steering.md, "AlignSAE"). ``saeforge concept-swap`` trains an
AlignSAE at an unsupervised SAE's site and runs the comparison (:class:`ConceptSwapConfig`).

The swap moves the model from a source concept to a target one while it generates from list prompts of the source
("Monday, Tuesday, Wednesday,"); what judges it is untouched by the edit: the generated text (does it name a word of
the target concept, of the source?) and its perplexity under the plain model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import torch
from simple_parsing.helpers import field

from saeforge.errors import SaeforgeError

__all__ = ["CONCEPTS", "CONCEPT_WORDS", "ConceptLatents", "ConceptSwapConfig", "SwapResult", "auroc", "best_latents",
           "check_concepts", "concept_activations", "concept_swap", "concept_swap_demo", "corpus_lines",
           "format_concept_swap", "label_text", "list_prompts", "list_texts", "mean_directions", "run_concept_swap",
           "swap_rows", "template_texts"]


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


@dataclass
class ConceptLatents:
    """How one SAE reads and writes each concept: a latent per concept (its decoder row is what it writes) and the
    activation that stands for "present" (1 for AlignSAE's supervised latents, the mean activation on the concept's
    tokens for an unsupervised SAE's best latent)."""

    sae: object
    latents: dict[str, int]
    on_value: dict[str, float]


@dataclass
class SwapResult:
    """One method at one strength: per row the continuation, whether it holds a word of the target and of the
    source concept (read from the text alone), and its perplexity under the plain model."""

    continuations: list[str]
    target_hit: list[bool]
    source_hit: list[bool]
    perplexity: list[float]


def swap_rows(concepts: Sequence[str], n_prompts: int, seed: int = 1) -> list[tuple[str, str, str]]:
    """(source, target, prompt) for every ordered pair of distinct concepts, ``n_prompts`` list prompts of the
    source each."""
    rows = []
    for source in check_concepts(concepts):
        prompts = list_prompts(source, n_prompts, seed)
        rows += [(source, target, p) for target in concepts if target != source for p in prompts]
    return rows


def mean_directions(acts: torch.Tensor, labels: torch.Tensor, concepts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Per concept the mean activation over its tokens (CAA's ingredients: a pair's vector is the target's mean
    minus the source's, arXiv 2312.06681)."""
    out = {}
    for j, c in enumerate(concepts):
        rows = labels[:, j] > 0.5
        if not bool(rows.any()):
            raise SaeforgeError(f"no token of the concept {c!r} in the texts read",
                                "read more texts, or texts that use the concept's words")
        out[c] = acts[rows].mean(0)
    return out


def _row_edit(method: str, rows: Sequence[tuple[str, str, str]], strength: float, norm: float, *,
              latents: ConceptLatents | None = None, means: dict[str, torch.Tensor] | None = None):
    """The edit fn(x, ctx) of one method for a batch laid out as ``rows``: at every position after BOS (prompt
    and generated tokens alike), a latent method sets the source latent to 0 and the target latent to the value
    whose decoder row has norm ``strength × norm`` (the site's mean ‖x‖), keeping what the SAE does not explain
    (x + Δz·W_dec); CAA adds the unit vector mean(target) − mean(source) at that norm."""
    size = strength * norm
    if method == "caa":
        vec = torch.stack([means[t] - means[s] for s, t, _ in rows])
        vec = size * vec / vec.norm(dim=1, keepdim=True).clamp_min(1e-12)

        def edit(x, ctx):
            keep = (ctx.positions >= 1).to(x.dtype)[..., None]
            return x + keep * vec[:, None, :].to(x.dtype)
        return edit
    sae = latents.sae
    src = torch.tensor([latents.latents[s] for s, _, _ in rows])
    tgt = torch.tensor([latents.latents[t] for _, t, _ in rows])
    W = sae.W_dec.detach()
    d_src, d_tgt = W[src], W[tgt]
    value = size / d_tgt.norm(dim=1).clamp_min(1e-12)

    def edit(x, ctx):
        z = sae.encode(x.to(sae.dtype))
        z_src = z.gather(-1, src.to(z.device).view(-1, 1, 1).expand(-1, z.shape[1], 1))
        z_tgt = z.gather(-1, tgt.to(z.device).view(-1, 1, 1).expand(-1, z.shape[1], 1))
        delta = -z_src * d_src[:, None, :] + (value.view(-1, 1, 1) - z_tgt) * d_tgt[:, None, :]
        keep = (ctx.positions >= 1).to(delta.dtype)[..., None]
        return x + (keep * delta).to(x.dtype)
    return edit


@torch.inference_mode()
def concept_swap(lm, site: str, rows: Sequence[tuple[str, str, str]], method: str, strength: float, *,
                 latents: ConceptLatents | None = None, means: dict[str, torch.Tensor] | None = None,
                 norm: float = 1.0, max_new_tokens: int = 8) -> SwapResult:
    """Generate (greedy) from each row's prompt with ``method`` (``caa``, or a latent method given ``latents``)
    moving the model from the row's source concept to its target at ``site``, at ``strength`` × ``norm``
    (0: the plain model). The observer is untouched by the edit: the generated text itself (does it name a word of
    the target concept, of the source?) and its perplexity under the plain model, teacher-forced."""
    from saeforge.interventions.generate import _perplexity, sample
    from saeforge.interventions.selection import theme_hits

    if method != "caa" and latents is None:
        raise SaeforgeError(f"the method {method!r} needs the SAE's concept latents",
                            "pass latents=ConceptLatents(sae, latents, on_value)")
    bos = lm.bos_token_id()
    prefix = [bos] if bos is not None else []
    encoded = [prefix + lm.tokenizer(p, add_special_tokens=False)["input_ids"] for _, _, p in rows]
    width = max(len(e) for e in encoded)
    pad = _pad_id(lm)
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])  # left-padded for generation
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    if strength == 0:
        new = sample(lm, ids, mask, max_new_tokens=max_new_tokens, temperature=0.0, seed=0)
    else:
        edit = _row_edit(method, rows, strength, norm, latents=latents, means=means)
        with lm.edit({site: edit}):
            new = sample(lm, ids, mask, max_new_tokens=max_new_tokens, temperature=0.0, seed=0)
    full = torch.cat([ids, new], 1)
    logits = lm.model(input_ids=full.to(lm.device), attention_mask=torch.cat([mask, torch.ones_like(new)], 1)
                      .to(lm.device), use_cache=False).logits.float()
    texts = [lm.tokenizer.decode(t, skip_special_tokens=True) for t in new]
    return SwapResult(texts, [theme_hits([t], CONCEPT_WORDS[target])[0] for t, (_, target, _) in zip(texts, rows)],
                      [theme_hits([t], CONCEPT_WORDS[source])[0] for t, (source, _, _) in zip(texts, rows)],
                      _perplexity(logits, full, ids.shape[1]))


# ------------------------------------------------------------------------------------------------ the command
SWAP_FILE = "concept_swap.json"


@dataclass(frozen=True)
class ConceptSwapConfig:
    """Train an AlignSAE (arXiv 2512.02004) on the concept set at an unsupervised SAE's site; report how well each
    SAE's latent reads each concept (held-out AUROC), then swap concepts in the model's generations through the
    AlignSAE's supervised latents, the unsupervised SAE's best latents and CAA, judged on the generated text."""

    path: str = field(default="", positional=True)
    """The unsupervised SAE to compare with: an SAE folder (RUN/saes/NAME) or a run with one SAE. The AlignSAE
    trains at its site."""
    out: str = ""
    """Folder for the labelled activation caches (training, held out), the AlignSAE's run and concept_swap.json; a
    rerun with the same text and training settings reuses the caches and a finished AlignSAE (only the swap runs
    again)."""
    concepts: tuple[str, ...] = CONCEPTS
    """Concepts (two or more) of the concept set: royalty, number, day, colour, family."""
    n_templates: int = 400
    """Training texts: template sentences filled with random concept words (a quarter as many held out)."""
    n_lists: int = 150
    """Training texts: comma-separated lists of one concept's words, the form of the swap's prompts (a quarter as
    many held out, other lists)."""
    n_lines: int = 200
    """Training texts: lines of --corpus (a quarter as many of --held-out-corpus held out); 0: none."""
    corpus: str = "embedded:train"
    """Text source of the corpus lines."""
    held_out_corpus: str = "embedded:validation"
    """Text source of the held-out corpus lines."""
    d_sae: int = 512
    """AlignSAE width (free latents plus one per concept)."""
    steps: int = 1500
    """AlignSAE training steps (the first third reconstruction only, as the paper's curriculum)."""
    batch_size: int = 256
    """Tokens per training step."""
    strengths: tuple[float, ...] = (0.25, 0.5, 1.0)
    """Swap strengths: the norm of what is written for the target concept, as a fraction of the site's mean ‖x‖
    (the same for every method)."""
    n_prompts: int = 3
    """List prompts per source concept (each swapped to every other concept)."""
    max_new_tokens: int = 8
    """Tokens generated (greedy) per prompt."""
    model: str = ""
    """Model; empty: the one the SAE was trained on."""
    device: str = "cpu"
    """cpu or cuda."""


def check_swap_config(cfg: ConceptSwapConfig) -> tuple[str, ...]:
    """The concepts, after every check that needs no model (bad input fails before any slow work)."""
    if not cfg.path:
        raise SaeforgeError("no SAE to compare with", "saeforge concept-swap RUN/saes/NAME --out OUT")
    if not cfg.out:
        raise SaeforgeError("no output folder", f"saeforge concept-swap {cfg.path} --out OUT")
    concepts = check_concepts(cfg.concepts)
    if len(set(concepts)) != len(concepts):
        raise SaeforgeError(f"concepts repeat: {list(concepts)}", "name each concept once")
    if len(set(concepts)) < 2:
        raise SaeforgeError(f"a swap needs two concepts or more, got {list(concepts)}",
                            f"saeforge concept-swap {cfg.path} --out {cfg.out} --concepts {' '.join(CONCEPTS[:2])}")
    if not cfg.strengths or any(not (s > 0) for s in cfg.strengths):
        raise SaeforgeError(f"swap strengths must be positive and at least one, got {list(cfg.strengths)}",
                            "--strengths 0.25 0.5 1.0")
    for name in ("n_templates", "n_prompts", "max_new_tokens", "steps", "batch_size"):
        if getattr(cfg, name) < 1:
            raise SaeforgeError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}",
                                f"--{name.replace('_', '-')} {getattr(ConceptSwapConfig, name)}")
    if cfg.n_lists < 0 or cfg.n_lines < 0:
        raise SaeforgeError("--n-lists and --n-lines cannot be negative", "--n-lists 150 --n-lines 200")
    return concepts


def list_texts(n: int, concepts: Sequence[str] = CONCEPTS, seed: int = 0) -> list[str]:
    """``n`` comma-separated lists of four to seven words of one concept each, ending on a full stop (days and
    numbers in their order, as the model has seen them)."""
    import random

    concepts = check_concepts(concepts)
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        c = rng.choice(concepts)
        words, k = CONCEPT_WORDS[c], rng.randint(4, 7)
        if c == "day":
            start = rng.randrange(len(words))
            picked = [words[(start + i) % len(words)] for i in range(k)]
        elif c == "number":
            start = rng.randrange(0, 4)
            picked = list(words[start:start + k])
        else:
            picked = rng.sample(list(words), k)
        out.append(", ".join(_cap(w, rng) for w in picked) + ".")
    return out


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


def _texts(cfg: ConceptSwapConfig, concepts: Sequence[str], held_out: bool) -> list[str]:
    share = 4 if held_out else 1
    texts = template_texts(max(1, cfg.n_templates // share), seed=int(held_out))
    texts += list_texts(cfg.n_lists // share, concepts, seed=int(held_out))
    if cfg.n_lines // share:
        texts += corpus_lines(cfg.held_out_corpus if held_out else cfg.corpus, cfg.n_lines // share)
    return texts


SETTINGS_FILE = "concept_settings.json"
REUSED = ("concepts", "n_templates", "n_lists", "n_lines", "corpus", "held_out_corpus", "d_sae", "steps",
          "batch_size")


def _check_reusable(cfg: ConceptSwapConfig, folder, site: str) -> None:
    """A folder already holding activations or an AlignSAE must have made them with these settings; write them
    otherwise."""
    import json
    from dataclasses import asdict

    from saeforge.utils.atomic import atomic_write_json

    settings = {"site": site, **{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()
                                 if k in REUSED}}
    path = folder / SETTINGS_FILE
    if path.is_file():
        before = json.loads(path.read_text())
        changed = sorted(k for k in settings if before.get(k) != settings[k])
        if changed:
            raise SaeforgeError(f"{folder} holds activations and an AlignSAE made with other settings "
                                f"({', '.join(f'{k}: {before.get(k)!r}' for k in changed)})",
                                f"use a new folder (--out {folder}_2) or the same settings")
    elif any((folder / d).exists() for d in ("cache", "held_out", "run")):
        raise SaeforgeError(f"{folder} holds files of another command (no {SETTINGS_FILE})",
                            f"use a new folder: --out {folder}_2")
    else:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, settings)


def _activations(lm, site: str, texts: Sequence[str], concepts, cache, progress: bool):
    """The activations and labels of ``texts``, read once and kept as an activation cache in ``cache``."""
    from saeforge.data.activation_cache import ActivationCache

    if (cache / "manifest.json").is_file():
        kept = ActivationCache(cache)
        return kept.load(site).float(), kept.load("concepts").float()
    x, y = concept_activations(lm, site, texts, concepts, progress=progress)
    ActivationCache.from_arrays(cache, {site: x, "concepts": y}, progress=progress)
    return x, y


def _train_alignsae(cfg: ConceptSwapConfig, concepts, site: str, folder, progress: bool):
    import json

    from saeforge.saes import load_sae
    from saeforge.training import TrainConfig, train

    done = folder / "run" / "saes" / site
    if not (done / "cfg.json").is_file():
        train(TrainConfig(out=str(folder / "run"), cache=str(folder / "cache"), sites=(site,),
                          architecture="alignsae", d_sae=cfg.d_sae,
                          sae_options=json.dumps({"concepts": list(concepts)}),
                          tokens=cfg.steps * cfg.batch_size, batch_size=cfg.batch_size,
                          lr_warmup_steps=min(20, cfg.steps // 10), progress=progress, device=cfg.device))
    return load_sae(done, device=cfg.device)


def concept_swap_demo(cfg: ConceptSwapConfig, progress: bool = True) -> dict:
    """The command's work: see :class:`ConceptSwapConfig`. Writes ``out``/concept_swap.json and returns it."""
    from pathlib import Path

    from saeforge.interventions.generate import pooled_perplexity
    from saeforge.runs import load_run
    from saeforge.utils.atomic import atomic_write_json
    from saeforge.utils.locking import exclusive_lock

    concepts = check_swap_config(cfg)
    folder = Path(cfg.out)
    with exclusive_lock(folder, "saeforge concept-swap"):
        run = load_run(cfg.path, model=cfg.model, device=cfg.device)
        if len(run.saes) != 1:
            raise SaeforgeError(f"{cfg.path} holds {len(run.saes)} SAEs", "pass one SAE folder (RUN/saes/NAME)")
        name, bound = next(iter(run.saes.items()))
        lm, site = run.lm, bound.write_site.name
        _check_reusable(cfg, folder, site)
        x, y = _activations(lm, site, _texts(cfg, concepts, False), concepts, folder / "cache", progress)
        x_test, y_test = _activations(lm, site, _texts(cfg, concepts, True), concepts, folder / "held_out", progress)
        align = _train_alignsae(cfg, concepts, site, folder, progress)
        with torch.no_grad():
            z_test = align.encode(x_test.to(align.device)).cpu()
            fvu = float((x_test - align(x_test.to(align.device)).cpu()).pow(2).sum()
                        / (x_test - x_test.mean(0)).pow(2).sum())
        aligned = {c: {"latent": align.concept_index(c), "auroc": auroc(z_test[:, align.concept_index(c)],
                                                                         y_test[:, j] > 0.5),
                       "mean_on": float(z_test[y_test[:, j] > 0.5, align.concept_index(c)].mean())}
                   for j, c in enumerate(concepts)}
        picked = best_latents(bound.sae, x, y, concepts)  # chosen on the training texts, scored on the held-out ones
        with torch.no_grad():
            z_ref = torch.cat([bound.sae.encode(x_test[i:i + 4096].to(bound.sae.device)).cpu()
                               for i in range(0, len(x_test), 4096)])
        for j, c in enumerate(concepts):
            picked[c]["auroc_held_out"] = auroc(z_ref[:, picked[c]["latent"]], y_test[:, j] > 0.5)
        norm = float(x.norm(dim=1).mean())
        handles = {"alignsae": ConceptLatents(align, {c: v["latent"] for c, v in aligned.items()},
                                              {c: 1.0 for c in concepts}),
                   "topk": ConceptLatents(bound.sae, {c: v["latent"] for c, v in picked.items()},
                                          {c: v["mean_on"] for c, v in picked.items()})}
        means = mean_directions(x, y, concepts)
        rows = swap_rows(concepts, cfg.n_prompts)

        def summary(method: str, strength: float, r: SwapResult) -> dict:
            n = len(rows)
            return {"method": method, "strength": strength, "target_rate": sum(r.target_hit) / n,
                    "source_rate": sum(r.source_hit) / n, "perplexity": pooled_perplexity(r.perplexity),
                    "by_target": {c: _rate([h for h, row in zip(r.target_hit, rows) if row[1] == c]) for c in concepts},
                    "examples": [{"source": s, "target": t, "prompt": p, "continuation": g}
                                 for (s, t, p), g in zip(rows, r.continuations)]}

        swaps = [summary("clean", 0.0, concept_swap(lm, site, rows, "caa", 0.0, means=means,
                                                     max_new_tokens=cfg.max_new_tokens))]
        settings = [(m, s) for s in cfg.strengths for m in ("alignsae", "topk", "caa")]
        from tqdm.auto import tqdm

        for method, strength in tqdm(settings, desc="swapping", disable=not progress, leave=False):
            result = concept_swap(lm, site, rows, "caa" if method == "caa" else "latent", strength,
                                  latents=handles.get(method), means=means, norm=norm,
                                  max_new_tokens=cfg.max_new_tokens)
            swaps.append(summary(method, strength, result))
        report = {"site": site, "unsupervised": name, "concepts": list(concepts), "tokens_train": len(x),
                  "tokens_test": len(x_test), "mean_norm": norm,
                  "concept_tokens_train": {c: int(y[:, j].sum()) for j, c in enumerate(concepts)},
                  "alignsae": {"d_sae": align.cfg.d_sae, "steps": cfg.steps, "fvu_held_out": fvu,
                               "binding": align.binding_accuracy(x_test.to(align.device), y_test),
                               "latents": aligned},
                  "topk": picked, "swaps": swaps, "path": str(folder / SWAP_FILE)}
        atomic_write_json(folder / SWAP_FILE, report)
    return report


def _rate(hits: Sequence[bool]) -> float:
    return sum(hits) / len(hits) if hits else float("nan")


def format_concept_swap(report: dict) -> str:
    """The command's tables: how well each SAE's latent reads its concept, and what the swap does."""
    lines = ["| concept | AlignSAE latent AUROC (held out) | binding | TopK best latent | its AUROC (held out) |",
             "|---|---|---|---|---|"]
    for c in report["concepts"]:
        a, t = report["alignsae"]["latents"][c], report["topk"][c]
        lines.append(f"| {c} | {a['auroc']:.3f} | {report['alignsae']['binding'][c]:.0%} | {t['latent']} | "
                     f"{t['auroc_held_out']:.3f} |")
    lines += ["", "| method | strength (× mean ‖x‖) | target word generated | source word generated | "
              "perplexity |",
              "|---|---|---|---|---|"]
    for r in report["swaps"]:
        strength = "—" if r["method"] == "clean" else f"{r['strength']:g}"
        lines.append(f"| {r['method']} | {strength} | {r['target_rate']:.0%} | {r['source_rate']:.0%} | "
                     f"{r['perplexity']:.1f} |")
    return "\n".join(lines)


def run_concept_swap(cfg: ConceptSwapConfig) -> dict:
    report = concept_swap_demo(cfg)
    print(format_concept_swap(report))
    print(f"written {report['path']}")
    return report
