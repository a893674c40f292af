"""Contrastive tasks for circuit discovery: clean/corrupt prompt pairs and a logit-difference metric.

A task is a list of prompt pairs. Each pair has a *clean* prompt and a *corrupt* prompt of the same length in
tokens, and one answer token for each (``clean_answer`` is right after the clean prompt, ``corrupt_answer`` after the
corrupt one). The metric of a forward on prompt row i is the logit difference at its last token

    m = logit[clean_answer] − logit[corrupt_answer],

positive when the model prefers the clean answer. Patching the corrupt activations into the clean forward moves m
toward its corrupt value; that change is what node attribution estimates (Marks et al., arXiv 2403.19647).

The task file (JSON)::

    {"name": "successor-days",
     "description": "the next day of the week",
     "pairs": [{"clean": "The day after Monday is", "clean_answer": " Tuesday",
                "corrupt": "The day after Friday is", "corrupt_answer": " Saturday"}, ...]}

Answers are written as the tokenizer sees them after the prompt (usually with a leading space) and must be one
token each. Clean and corrupt prompts must have the same number of tokens: node attribution patches position p of
the corrupt forward into position p of the clean one, and there is no position-for-position alignment of prompts of
different lengths that keeps that meaning, so they are refused rather than padded.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from saeforge.errors import SaeforgeError

PAIR_FIELDS = ("clean", "corrupt", "clean_answer", "corrupt_answer")
SOLVED_ACCURACY = 0.8
"""A built-in task is used for circuits only if the model gets at least this share of its pairs right."""


@dataclass(frozen=True)
class PromptPair:
    """One clean/corrupt pair: the prompts and the token the model should put after each."""

    clean: str
    corrupt: str
    clean_answer: str
    corrupt_answer: str


@dataclass(frozen=True)
class Task:
    """A contrastive task: a name, what it tests, and its prompt pairs."""

    name: str
    pairs: tuple[PromptPair, ...]
    description: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "pairs": [asdict(p) for p in self.pairs]}

    def head(self, n: int) -> "Task":
        """The first ``n`` pairs (all when ``n`` is 0)."""
        return self if not n else Task(self.name, self.pairs[:n], self.description)


# ------------------------------------------------------------------------------------------------- reading
def task_from_json(data: Any, *, where: str = "the task") -> Task:
    """A :class:`Task` from parsed JSON; missing or mistyped fields are errors naming the pair and the field."""
    fix = ('write {"name": ..., "pairs": [{"clean": ..., "corrupt": ..., "clean_answer": ..., '
           '"corrupt_answer": ...}]} (see docs/circuits.md)')
    if not isinstance(data, dict):
        raise SaeforgeError(f"{where} is not a JSON object", fix)
    missing = [k for k in ("name", "pairs") if k not in data]
    if missing:
        raise SaeforgeError(f"{where} has no {' or '.join(repr(m) for m in missing)} field", fix)
    if not isinstance(data["pairs"], list) or not data["pairs"]:
        raise SaeforgeError(f"{where}: 'pairs' must be a non-empty list", fix)
    pairs = []
    for i, pair in enumerate(data["pairs"]):
        if not isinstance(pair, dict):
            raise SaeforgeError(f"{where}: pair {i} is not an object", fix)
        absent = [k for k in PAIR_FIELDS if k not in pair]
        if absent:
            raise SaeforgeError(f"{where}: pair {i} has no {', '.join(repr(a) for a in absent)}", fix)
        bad = [k for k in PAIR_FIELDS if not isinstance(pair[k], str) or not pair[k].strip()]
        if bad:
            raise SaeforgeError(f"{where}: pair {i} field {bad[0]!r} must be a non-empty string", fix)
        pairs.append(PromptPair(*(pair[k] for k in PAIR_FIELDS)))
    return Task(str(data["name"]), tuple(pairs), str(data.get("description", "")))


def load_task(spec: str) -> Task:
    """A built-in task by name (see :data:`BUILTIN_TASKS`) or a task JSON file."""
    if spec in BUILTIN_TASKS:
        return BUILTIN_TASKS[spec]()
    path = Path(spec)
    if not path.is_file():
        raise SaeforgeError(f"no built-in task or task file {spec!r}",
                            f"use one of {', '.join(BUILTIN_TASKS)}, or a JSON file (saeforge circuit tasks "
                            "lists the built-in ones)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SaeforgeError(f"task file {path} is not valid JSON: {err}", "fix the file (see docs/circuits.md)")
    return task_from_json(data, where=f"task file {path}")


# ------------------------------------------------------------------------------------------------- encoding
@dataclass
class EncodedTask:
    """A task as model input: the clean and corrupt prompts padded on the right to one width."""

    task: Task
    clean_ids: torch.Tensor
    """``[n, T]`` token ids of the clean prompts."""
    corrupt_ids: torch.Tensor
    """``[n, T]`` token ids of the corrupt prompts (same lengths row by row)."""
    attention_mask: torch.Tensor
    """``[n, T]`` 1 at tokens, 0 at padding (shared by both)."""
    keep: torch.Tensor
    """``[n, T]`` bool: positions that are SAE data under the run's token policy (BOS and padding are not)."""
    last: torch.Tensor
    """``[n]`` index of each row's last token, where the answer is predicted."""
    clean_answers: torch.Tensor
    """``[n]`` token id of each clean answer."""
    corrupt_answers: torch.Tensor
    """``[n]`` token id of each corrupt answer."""

    def __len__(self) -> int:
        return int(self.clean_ids.shape[0])

    @property
    def aligned(self) -> bool:
        """Every pair has the same number of tokens (needed for per-position results)."""
        return bool(self.attention_mask.all())

    def rows(self, index) -> "EncodedTask":
        """A subset of the pairs (a slice or index tensor), trimmed of columns that are padding in every row."""
        mask = self.attention_mask[index]
        width = int(mask.sum(1).max())
        cut = (slice(None), slice(0, width))
        return EncodedTask(self.task, self.clean_ids[index][cut], self.corrupt_ids[index][cut], mask[cut],
                           self.keep[index][cut], self.last[index], self.clean_answers[index],
                           self.corrupt_answers[index])

    def metric(self, logits: torch.Tensor) -> torch.Tensor:
        """``[n]`` logit[clean answer] − logit[corrupt answer] at each row's last token."""
        rows = torch.arange(logits.shape[0], device=logits.device)
        at_last = logits[rows, self.last.to(logits.device)]
        return (at_last.gather(-1, self.clean_answers.to(logits.device)[:, None])
                - at_last.gather(-1, self.corrupt_answers.to(logits.device)[:, None])).squeeze(-1)


def answer_token(lm, answer: str, *, where: str) -> int:
    """The one token of ``answer``; an error if it is several tokens or none."""
    ids = lm.tokenizer(answer, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = [lm.tokenizer.decode([i]) for i in ids]
        raise SaeforgeError(f"{where} {answer!r} is {len(ids)} tokens for this model's tokenizer ({pieces}); the "
                            "metric compares the logits of single answer tokens",
                            "use an answer that is one token (often with a leading space, e.g. ' Paris'), or drop "
                            "the pair")
    return int(ids[0])


def encode_task(task: Task, lm, encoder=None) -> EncodedTask:
    """Tokenize ``task`` for ``lm`` under ``encoder`` (a :class:`~saeforge.data.prompts.PromptEncoder`; default:
    BOS first, special tokens not SAE data). Every problem (lengths, answers) is reported before any forward."""
    from saeforge.data.prompts import PromptEncoder

    encoder = encoder or PromptEncoder(lm)
    clean = encoder.batch([p.clean for p in task.pairs])
    corrupt = encoder.batch([p.corrupt for p in task.pairs])
    for i, (a, b) in enumerate(zip(clean.lengths, corrupt.lengths)):
        if a != b:
            pair = task.pairs[i]
            raise SaeforgeError(
                f"task {task.name!r} pair {i}: the clean prompt {pair.clean!r} has {a} tokens and the corrupt prompt "
                f"{pair.corrupt!r} has {b}; attribution patches position by position, so both need the same number "
                "of tokens (no alignment keeps that meaning)",
                "change the corrupt prompt so it tokenizes to as many tokens (e.g. swap in a word of the same token "
                "count), or drop the pair")
    clean_answers = [answer_token(lm, p.clean_answer, where=f"task {task.name!r} pair {i}: clean_answer")
                     for i, p in enumerate(task.pairs)]
    corrupt_answers = [answer_token(lm, p.corrupt_answer, where=f"task {task.name!r} pair {i}: corrupt_answer")
                       for i, p in enumerate(task.pairs)]
    same = [i for i, (a, b) in enumerate(zip(clean_answers, corrupt_answers)) if a == b]
    if same:
        raise SaeforgeError(f"task {task.name!r} pair {same[0]}: the clean and corrupt answers are the same token, so "
                            "the logit difference is always 0", "give the corrupt prompt a different answer")
    return EncodedTask(task, clean.input_ids, corrupt.input_ids, clean.attention_mask, clean.keep & corrupt.keep,
                       clean.attention_mask.sum(1) - 1, torch.tensor(clean_answers), torch.tensor(corrupt_answers))


# ------------------------------------------------------------------------------------------------- accuracy
@dataclass(frozen=True)
class TaskAccuracy:
    """How well a model does a task."""

    task: str
    pairs: int
    accuracy: float
    """Share of pairs where the model ranks the right answer above the other one on both prompts (logit
    difference > 0 on the clean prompt and < 0 on the corrupt one)."""
    top1: float
    """Share of prompts (clean and corrupt) whose most likely next token is their answer."""
    clean_logit_diff: float
    """Mean logit difference on the clean prompts."""
    corrupt_logit_diff: float
    """Mean logit difference on the corrupt prompts."""

    @property
    def solved(self) -> bool:
        return self.accuracy >= SOLVED_ACCURACY

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "solved": self.solved}


@torch.no_grad()
def measure_task_accuracy(lm, task: Task | EncodedTask, *, encoder=None, batch_size: int = 32) -> TaskAccuracy:
    """The model's accuracy, top-1 rate and mean logit differences on ``task``."""
    enc = task if isinstance(task, EncodedTask) else encode_task(task, lm, encoder)
    clean_m, corrupt_m, top1 = [], [], 0
    for start in range(0, len(enc), batch_size):
        part = enc.rows(slice(start, start + batch_size))
        rows = torch.arange(len(part))
        for ids, answers, out in ((part.clean_ids, part.clean_answers, clean_m),
                                  (part.corrupt_ids, part.corrupt_answers, corrupt_m)):
            logits = lm.logits(ids.to(lm.device), part.attention_mask.to(lm.device)).float().cpu()
            out.append(part.metric(logits))
            top1 += int((logits[rows, part.last].argmax(-1) == answers).sum())
    clean_m, corrupt_m = torch.cat(clean_m), torch.cat(corrupt_m)
    return TaskAccuracy(enc.task.name, len(enc), float(((clean_m > 0) & (corrupt_m < 0)).float().mean()),
                        top1 / (2 * len(enc)), float(clean_m.mean()), float(corrupt_m.mean()))


# ------------------------------------------------------------------------------------------------- built-in tasks
def _pairs(items: Sequence[tuple[str, str]], template: str, n: int) -> tuple[PromptPair, ...]:
    """Pairs (clean item i, corrupt item j), i ≠ j, spread over the items: j = i + s for s = 1, 2, ... in turn, so
    every item is clean and corrupt equally often."""
    out = []
    for step in range(1, len(items)):
        for i in range(len(items)):
            (a, a_answer), (b, b_answer) = items[i], items[(i + step) % len(items)]
            if a_answer == b_answer:
                continue
            out.append(PromptPair(template.format(a), template.format(b), a_answer, b_answer))
            if len(out) == n:
                return tuple(out)
    return tuple(out)


_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_CAPITALS = (("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
             ("Japan", "Tokyo"), ("China", "Beijing"), ("Russia", "Moscow"), ("England", "London"),
             ("Egypt", "Cairo"), ("Greece", "Athens"), ("Portugal", "Lisbon"), ("Austria", "Vienna"),
             ("Ireland", "Dublin"), ("Poland", "Warsaw"), ("Norway", "Oslo"), ("Cuba", "Havana"),
             ("Kenya", "Nairobi"), ("Hungary", "Budapest"), ("Denmark", "Copenhagen"), ("Finland", "Helsinki"))
_NOUNS = ("dog", "cat", "boy", "girl", "king", "house", "car", "tree", "bird", "horse", "friend", "teacher",
          "doctor", "student", "book", "road")
_WORDS = ("apple", "river", "stone", "cloud", "horse", "table", "window", "garden", "music", "paper", "silver",
          "winter", "forest", "candle", "bridge", "letter", "mountain", "ocean", "pencil", "shadow", "island",
          "castle", "flower", "summer")


def successor_days(n: int = 32) -> Task:
    items = [(d, " " + _DAYS[(i + 1) % 7]) for i, d in enumerate(_DAYS)]
    return Task("successor-days", _pairs(items, "If today is {}, then tomorrow is", n),
                "the day after a day of the week (Monday → Tuesday)")


def country_capital(n: int = 32) -> Task:
    items = [(c, " " + a) for c, a in _CAPITALS]
    return Task("country-capital", _pairs(items, "The capital of {} is the city of", n),
                "the capital of a country (France → Paris)")


def subject_verb(n: int = 32) -> Task:
    pairs = []
    for noun in _NOUNS:
        for singular_clean in (True, False):
            a, b = (noun, noun + "s") if singular_clean else (noun + "s", noun)
            template = "The {} near the cars"
            pairs.append(PromptPair(template.format(a), template.format(b), " is" if singular_clean else " are",
                                    " are" if singular_clean else " is"))
    return Task("subject-verb", tuple(pairs[:n]),
                "subject–verb agreement across a prepositional phrase (The dog near the cars → is / are)")


def induction(n: int = 32) -> Task:
    rng = random.Random(0)  # the task's word lists: fixed, so the task is the same everywhere
    pairs = []
    while len(pairs) < n:
        *seq, swap = rng.sample(_WORDS, 6)
        clean = "Words: " + " ".join(seq) + ". Again: " + " ".join(seq[:3])
        corrupt = "Words: " + " ".join(seq[:3] + [swap] + seq[4:]) + ". Again: " + " ".join(seq[:3])
        pairs.append(PromptPair(clean, corrupt, " " + seq[3], " " + swap))
    return Task("induction", tuple(pairs), "copy the word that followed the same words earlier in the prompt")


BUILTIN_TASKS: dict[str, Callable[..., Task]] = {
    "subject-verb": subject_verb,
    "successor-days": successor_days,
    "induction": induction,
    "country-capital": country_capital,
}
"""Built-in tasks by name; each takes the number of pairs (default 32)."""

