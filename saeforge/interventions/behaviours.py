"""Two small behaviours to try the steering bench on, written out as the files ``saeforge bench-steering`` reads.

- ``love``: sentences that speak of love against sentences of the same shape that do not; neutral prompts; the
  keyword scorer. A topic a 135M model can be pushed towards.
- ``arithmetic``: templated additions (two worked examples, then the question) with the right answer (positive) and a
  wrong one (negative) as answers to the same questions, so only the answer tokens are read (``--pair-prompts``);
  held-out questions scored by accuracy. The answers differ in a number only, so v_CAA is short: bench it with
  ``--unit residual``.

``python -m saeforge.interventions.behaviours love FOLDER`` writes ``positive.txt``, ``negative.txt``,
``prompts.txt`` (for arithmetic ``prompts.jsonl``, ``pairs.jsonl`` and ``answers.txt``: its prompts span several
lines) and prints the bench command.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from saeforge.errors import SaeforgeError

SUBJECTS = ["my sister", "the old king", "a young sailor", "the farmer", "our neighbour", "the poet", "his mother",
            "the soldier", "a quiet girl", "the merchant", "her brother", "the teacher"]
LOVING = ["loves {o} with all her heart", "wrote a love letter to {o}", "kissed {o} and called him dear",
          "fell in love with {o} at first sight", "would give her heart to {o}", "dreams of {o}, her sweet love"]
PLAIN = ["walks to {o} every morning", "wrote a short report about {o}", "counted the sacks of grain near {o}",
         "asked {o} for directions to the market", "repaired the fence beside {o}", "sold two horses to {o}"]
OBJECTS = ["the miller's son", "a stranger", "the captain", "her cousin", "the baker", "a travelling singer"]
NEUTRAL_PROMPTS = ["The weather this morning was", "He opened the door and", "In the middle of the town there is",
                   "The letter said that", "After dinner we", "She looked out of the window and",
                   "The road to the village", "My favourite thing about summer is", "When the ship reached the harbour",
                   "The old man told us", "Tomorrow I will", "The best way to spend an evening is",
                   "At the market she bought", "The children were playing", "Yesterday the teacher said",
                   "The house on the hill"]
LOVE_WORDS = "love,loved,loves,lover,loving,heart,hearts,dear,darling,kiss,kissed,sweet,romance,beloved"


def love() -> dict[str, list[str]]:
    rng = random.Random(0)
    pos, neg = [], []
    for i, s in enumerate(SUBJECTS * 2):
        o = OBJECTS[i % len(OBJECTS)]
        pos.append(f"{s.capitalize()} {rng.choice(LOVING).format(o=o)}.")
        neg.append(f"{s.capitalize()} {rng.choice(PLAIN).format(o=o)}.")
    return {"positive": pos, "negative": neg, "prompts": NEUTRAL_PROMPTS}


SHOTS = "Question: What is 4 plus 3? Answer: 7\nQuestion: What is 12 plus 5? Answer: 17\n"
"""Two worked examples before each question: the embedded model then answers with a number (33 % right on the
held-out questions, against 0 % without them, when it restates the sum)."""


def _question(a: int, b: int) -> str:
    return f"{SHOTS}Question: What is {a} plus {b}? Answer:"


def arithmetic() -> dict[str, list[str]]:
    rng = random.Random(0)
    pairs, pos, neg = [], [], []
    for _ in range(48):
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        wrong = a + b + rng.choice([-3, -2, -1, 1, 2, 3])
        pairs.append(_question(a, b))
        pos.append(f" {a + b}")
        neg.append(f" {wrong}")
    held = [(rng.randint(2, 30), rng.randint(2, 30)) for _ in range(24)]
    return {"positive": pos, "negative": neg, "pairs": pairs, "prompts": [_question(a, b) for a, b in held],
            "answers": [str(a + b) for a, b in held]}


BEHAVIOURS = {"love": love, "arithmetic": arithmetic}


def write_behaviour(name: str, folder: str | Path) -> dict[str, Path]:
    if name not in BEHAVIOURS:
        raise SaeforgeError(f"no example behaviour {name!r}", f"use one of {', '.join(BEHAVIOURS)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for part, lines in BEHAVIOURS[name]().items():
        if any("\n" in line for line in lines):  # several lines per text: JSON lines keep them whole
            paths[part] = folder / f"{part}.jsonl"
            paths[part].write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
        else:
            paths[part] = folder / f"{part}.txt"
            paths[part].write_text("\n".join(lines) + "\n")
    return paths


def bench_command(name: str, folder: str | Path, run: str = "RUN") -> str:
    f = Path(folder)
    ext = "txt" if name == "love" else "jsonl"
    common = f"saeforge bench-steering {run} --positive {f}/positive.txt --negative {f}/negative.txt " \
             f"--prompts-file {f}/prompts.{ext}"
    if name == "love":
        return f"{common} --keywords {LOVE_WORDS} --instruction 'Write about love.'"
    return f"{common} --pair-prompts {f}/pairs.jsonl --scorer accuracy --answers-file {f}/answers.txt " \
           "--instruction 'Answer with the correct sum.' --unit residual --multipliers 0.05 0.1 0.2 0.4 " \
           "--temperature 0 --max-new-tokens 4"


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(f"usage: python -m saeforge.interventions.behaviours {{{','.join(BEHAVIOURS)}}} FOLDER")
    write_behaviour(sys.argv[1], sys.argv[2])
    print(bench_command(sys.argv[1], sys.argv[2]))
