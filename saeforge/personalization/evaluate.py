"""``saeforge personalize eval``: generate each test query's text under DEP and its baselines, and score it.

Conditions (greedy decoding, the same prompt and stopping rule for all; the paper samples at temperature 0.8):

- ``no history``: the frozen model and the prompt alone;
- ``history as text``: the user's most recent history texts written out before the prompt;
- ``DEP``: the user's soft tokens before the prompt;
- ``DEP, other user``: the soft tokens of another user (the one whose style differs most, when users have styles):
  if personalization works, this scores worse on the real user's style than ``DEP``.

Scores: ROUGE-1 and ROUGE-L F against the user's text (:mod:`saeforge.personalization.rouge`) and, for users with a
``style``, the style match (:func:`saeforge.personalization.users.style_match`). Written to ``eval.json``, a Markdown
table ``eval.md`` and every generation in ``eval_generations.jsonl``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from simple_parsing.helpers import field

from saeforge.errors import SaeforgeError
from saeforge.personalization.model import generate_greedy, history_prompt, stack_rows
from saeforge.personalization.rouge import rouge_1, rouge_l
from saeforge.personalization.train import ADAPTER_FILE, TrainedPersonalizer, dep_rows, load_personalizer
from saeforge.personalization.users import STYLE_TRAITS, User, read_users, style_match
from saeforge.utils.atomic import atomic_write_json, atomic_write_text
from saeforge.utils.locking import exclusive_lock
from saeforge.utils.threads import thread_policy

__all__ = ["CONDITIONS", "PersonalizeEvalConfig", "evaluate_personalizer", "run_personalize_eval", "score_table",
           "trait_probe"]

CONDITIONS = ("no history", "history as text", "DEP", "DEP, other user")


@dataclass(frozen=True)
class PersonalizeEvalConfig:
    """Score a DEP run on the test queries of a user file: ROUGE-1/L and style match of its generations, against
    the frozen model with no history and with the history written out as text."""

    run: str = field(default="", positional=True)
    """The run folder of `saeforge personalize train`."""
    users: str = ""
    """User file whose test queries are scored; empty: the one the run was trained on."""
    max_new_tokens: int = 40
    """Longest generation, in tokens (generation also stops at a line break or EOS)."""
    batch_size: int = 16
    """Queries generated at once."""
    max_queries: int = 0
    """Score at most this many test queries (the first ones); 0: all."""
    device: str = "auto"
    """auto, cpu or cuda (auto: cuda when available)."""
    threads: int = 0
    """CPU threads; 0: automatic."""
    progress: bool = True
    """Show progress bars."""


def _stop_ids(tokenizer) -> list[int]:
    """EOS and every token whose text holds a line break (each generation is one line)."""
    ids = {i for i in range(len(tokenizer)) if "\n" in tokenizer.decode([i])}
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


def _other_user(users: Sequence[User]) -> list[int]:
    """For each user, another one: the first whose style differs in the most traits, else the user half-way round."""
    out = []
    for i, u in enumerate(users):
        if u.style:
            distance = [sum(u.style.get(t) != v.style.get(t) for t in STYLE_TRAITS) if j != i else -1
                        for j, v in enumerate(users)]
            out.append(max(range(len(users)), key=lambda j: distance[j]))
        else:
            out.append((i + len(users) // 2) % len(users))
    return out


def _generate(p: TrainedPersonalizer, inputs, rows_of: list[tuple[int, str]], dep: bool, stop: list[int],
              max_new_tokens: int, cut: bool = True) -> list[str]:
    """Greedy generations for ``(user row, prompt)`` pairs; prompts cut as in training unless ``cut`` is False."""
    lm, tok = p.lm, p.lm.tokenizer
    prompt_ids = [tok(text, add_special_tokens=False)["input_ids"] for _, text in rows_of]
    if cut:
        prompt_ids = [ids[:p.cfg.max_prompt_tokens] for ids in prompt_ids]
    if dep:
        rows, _ = dep_rows(lm, p.adapter, inputs, [u for u, _ in rows_of], prompt_ids)
    else:
        embed = lm.model.get_input_embeddings()
        bos = lm.bos_token_id()
        rows = [embed(torch.tensor(([bos] if bos is not None else []) + ids, device=lm.device)) for ids in prompt_ids]
    embeds, mask = stack_rows(rows, left=True)
    tokens = generate_greedy(lm.model, embeds, mask, max_new_tokens, stop)
    return [tok.decode(t, skip_special_tokens=True).strip() for t in tokens]


def trait_probe(inputs, users: Sequence[User]) -> dict[str, dict[str, float]]:
    """How well each kind of DEP input tells a style trait apart, before any training: per trait, the accuracy of a
    leave-one-user-out nearest-centroid classifier (cosine) on each user's mean history embedding and mean difference
    embedding. Balanced classes give 0.5 by chance, and less when the embeddings hold nothing of the trait (leaving
    a user out moves its own class's centroid away from it)."""
    import torch.nn.functional as F

    rows = [i for i, u in enumerate(users) if u.style]
    k = inputs.x.shape[1] // 2
    out: dict[str, dict[str, float]] = {}
    for kind, offset in (("history", 0), ("difference", k)):
        feats = F.normalize(torch.stack([inputs.x[inputs.index(users[i].user_id),
                                                  offset:offset + int(inputs.slots[inputs.index(users[i].user_id)])]
                                         .mean(0) for i in rows]), dim=-1)
        out[kind] = {}
        for trait in STYLE_TRAITS:
            values = [users[i].style.get(trait) for i in rows]
            correct, counted = 0, 0
            for j, v in enumerate(values):
                others = [m for m in range(len(rows)) if m != j]
                classes = {c for c in (values[m] for m in others) if c is not None}
                if v is None or v not in classes or len(classes) < 2:
                    continue
                centroid = {c: feats[[m for m in others if values[m] == c]].mean(0) for c in classes}
                correct += max(classes, key=lambda c: float(feats[j] @ centroid[c])) == v
                counted += 1
            if counted:
                out[kind][trait] = correct / counted
    return out


@torch.no_grad()
def evaluate_personalizer(cfg: PersonalizeEvalConfig, *, personalizer: TrainedPersonalizer | None = None
                          ) -> dict[str, Any]:
    """Generate and score every condition; returns (and writes into the run folder) the content of eval.json."""
    from tqdm.auto import tqdm

    if not cfg.run:
        raise SaeforgeError("no run folder given", "saeforge personalize eval RUN_FOLDER")
    if cfg.max_new_tokens <= 0 or cfg.batch_size <= 0 or cfg.max_queries < 0:
        raise SaeforgeError("--max-new-tokens and --batch-size must be positive, --max-queries not negative",
                            "pass e.g. --max-new-tokens 40 --batch-size 16")
    folder = Path(cfg.run)
    if personalizer is None and not (folder / ADAPTER_FILE).is_file():
        load_personalizer(folder)  # names the problem and the fix
    with exclusive_lock(folder, "saeforge personalize eval"), thread_policy(cfg.threads):
        p = personalizer or load_personalizer(folder, device=cfg.device)
        users = read_users(cfg.users or p.cfg.users)
        tests = [(ui, q) for ui, u in enumerate(users) for q in u.queries if q.split == "test"]
        if cfg.max_queries:
            tests = tests[:cfg.max_queries]
        if not tests:
            raise SaeforgeError(f"{cfg.users or p.cfg.users} has no test query",
                                "mark the queries to score with \"split\": \"test\"")
        inputs = p.inputs(users)
        rows_in_inputs = [inputs.index(u.user_id) for u in users]
        other = _other_user(users)
        stop = _stop_ids(p.lm.tokenizer)
        generations: dict[str, list[str]] = {c: [] for c in CONDITIONS}
        batches = [tests[s:s + cfg.batch_size] for s in range(0, len(tests), cfg.batch_size)]
        for batch in tqdm(batches, desc="generating", unit="batch", disable=not cfg.progress, dynamic_ncols=True):
            plain = [(ui, q.prompt) for ui, q in batch]
            by_condition = {  # (user row and prompt, soft tokens or not, prompt cut as in training)
                "no history": (plain, False, True),
                "history as text": ([(ui, history_prompt(users[ui], q.prompt, p.cfg.slots)) for ui, q in batch],
                                    False, False),
                "DEP": ([(rows_in_inputs[ui], q.prompt) for ui, q in batch], True, True),
                "DEP, other user": ([(rows_in_inputs[other[ui]], q.prompt) for ui, q in batch], True, True),
            }
            for condition, (rows_of, dep, cut) in by_condition.items():
                generations[condition] += _generate(p, inputs, rows_of, dep, stop, cfg.max_new_tokens, cut)
        records, results = [], {}
        for condition in CONDITIONS:
            scores = []
            for (ui, q), text in zip(tests, generations[condition]):
                s = {"rouge1": rouge_1(text, q.target), "rougeL": rouge_l(text, q.target)}
                if users[ui].style:
                    s |= {f"style_{k}": v for k, v in style_match(text, users[ui].style).items()}
                scores.append(s)
                records.append({"condition": condition, "user_id": users[ui].user_id, "item": q.item,
                                "target": q.target, "generation": text, **s})
            keys = sorted({k for s in scores for k in s})
            results[condition] = {k: sum(s.get(k, 0.0) for s in scores) / len(scores) for k in keys} | {
                "n": len(scores)}
        report = {"format": "saeforge-dep-eval", "run": str(folder), "users": str(cfg.users or p.cfg.users),
                  "queries": len(tests), "max_new_tokens": cfg.max_new_tokens, "decoding": "greedy",
                  "results": results, "trait_probe": trait_probe(inputs, users)}
        atomic_write_json(folder / "eval.json", report)
        atomic_write_text(folder / "eval.md", score_table(results) + "\n")
        atomic_write_text(folder / "eval_generations.jsonl",
                          "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return report


def score_table(results: dict[str, dict[str, float]]) -> str:
    """Markdown table of the conditions' mean scores."""
    has_style = any("style_mean" in r for r in results.values())
    head = ["condition", "ROUGE-1", "ROUGE-L"] + (["style match"] + [t for t in STYLE_TRAITS] if has_style else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for condition, r in results.items():
        cells = [condition, f"{r['rouge1']:.3f}", f"{r['rougeL']:.3f}"]
        if has_style:
            cells += [f"{r.get('style_mean', float('nan')):.3f}"] + [f"{r.get(f'style_{t}', float('nan')):.2f}"
                                                                      for t in STYLE_TRAITS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_personalize_eval(cfg: PersonalizeEvalConfig) -> dict[str, Any]:
    report = evaluate_personalizer(cfg)
    print(f"{report['queries']} test queries of {report['users']}, greedy, at most {cfg.max_new_tokens} tokens")
    print(score_table(report["results"]))
    for kind, accuracy in report["trait_probe"].items():
        if accuracy:
            print(f"traits told apart by the users' mean {kind} embedding (leave-one-user-out nearest centroid): "
                  + ", ".join(f"{t} {a:.2f}" for t, a in accuracy.items()))
    print(f"written {Path(cfg.run) / 'eval.json'}, eval.md and eval_generations.jsonl")
    return report
