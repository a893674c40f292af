"""An LLM judge of parent/child pairs (arXiv 2602.11881, section 5): shown a parent's and a child's activating
excerpts, is the child a sub-concept of the parent? The metric is the rate of "yes".

The excerpts come from the feature store (``saeforge harvest``): each feature's top examples and, for the paper's
"sampled in proportion to activation", its quantile examples, with the firing tokens marked ``<<like this>>``. Beside
the tree's pairs the judge sees as many **control pairs**, each parent with a random latent of the level below that is
not its child, so a judge that says "yes" to everything is visible: the figure to read is the gap between the two
rates. Any autointerp back end works (``saeforge.features.autointerp.backends``); the local SmolLM2 is a weak judge.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from saeforge.errors import SaeforgeError
from saeforge.hierarchy.links import store_names
from saeforge.hierarchy.tree import FeatureTree

__all__ = ["JUDGE_SYSTEM", "judge_prompt", "judge_tree", "store_names"]

JUDGE_SYSTEM = (
    "You compare two features of a neural network that reads text. For each feature you get text excerpts in which "
    "it is active, with the tokens where it fires marked <<like this>>. Decide whether feature B is a sub-concept of "
    "feature A: a more specific case of what A responds to (as 'dog' is of 'animal'). Answer Yes or No."
)


def _excerpts(examples: list[dict], limit: int) -> str:
    from saeforge.features.autointerp.prompts import drop_special_tokens, format_example

    lines = []
    for n, e in enumerate(examples[:limit], 1):
        e = drop_special_tokens(e)
        lines.append(f"{n}. " + format_example(e["tokens"], e["acts"], max(e["acts"] or [1.0]),
                                               show_activations=False))
    return "\n".join(lines)


def judge_prompt(parent_examples: list[dict], child_examples: list[dict], limit: int = 15) -> list[dict[str, str]]:
    user = (f"Feature A is active in these excerpts:\n{_excerpts(parent_examples, limit)}\n\n"
            f"Feature B is active in these excerpts:\n{_excerpts(child_examples, limit)}\n\n"
            "Is feature B a sub-concept (a more specific case) of feature A? Answer Yes or No.")
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


@dataclass
class _Pair:
    level: int
    parent: int
    child: int
    control: bool


def judge_tree(tree: FeatureTree, store, backend, *, pairs: int = 100, seed: int = 0, top_examples: int = 10,
               sampled_examples: int = 5, names: list[tuple[str, int]] | None = None, progress: bool = False
               ) -> dict[str, Any]:
    """Ask ``backend`` about ``pairs`` random parent/child pairs of the tree and as many control pairs; returns the
    yes rates, their gap and every verdict."""
    from tqdm.auto import tqdm

    from saeforge.features.autointerp.prompts import parse_yes_no

    names = names or store_names(tree, store)
    rng = random.Random(seed)
    all_pairs = [(lv, int(p), int(c)) for lv in range(tree.n_levels - 1) for p, c in zip(*tree.pairs(lv))]
    if not all_pairs:
        raise SaeforgeError("the tree has no parent/child pairs", "build it from trained SAEs (saeforge hierarchy link)")
    cache: dict[tuple[int, int], list[dict]] = {}

    def examples(level: int, idx: int) -> list[dict]:
        if (level, idx) not in cache:
            name, offset = names[level]
            top = store.examples(name, offset + idx, kind="top")[:top_examples]
            sampled = store.examples(name, offset + idx, kind="quantile")
            sampled = rng.sample(sampled, min(sampled_examples, len(sampled)))
            cache[(level, idx)] = [e for e in top + sampled if max(e["acts"] or [0]) > 0]
        return cache[(level, idx)]

    chosen = []
    for lv, p, c in rng.sample(all_pairs, min(pairs, len(all_pairs))):
        if not examples(lv, p) or not examples(lv + 1, c):
            continue  # a feature that never fired in the harvested text cannot be judged
        chosen.append(_Pair(lv, p, c, False))
        others = [j for j in range(tree.levels[lv + 1].width) if tree.parents[lv][j] != p]
        for _ in range(20):
            j = rng.choice(others)
            if examples(lv + 1, j):
                chosen.append(_Pair(lv, p, j, True))
                break
    if not chosen:
        raise SaeforgeError("no pair of the tree has harvested examples for both features",
                            "harvest the SAEs on more text (saeforge harvest --tokens ...)")
    prompts = [judge_prompt(examples(q.level, q.parent), examples(q.level + 1, q.child)) for q in chosen]
    verdicts: list[bool | None] = []
    bar = tqdm(total=len(prompts), desc="judging", disable=not progress, dynamic_ncols=True)
    for s in range(0, len(prompts), 8):
        batch = prompts[s:s + 8]
        if hasattr(backend, "yes_no"):
            answers = backend.yes_no(batch)
        else:
            answers = [parse_yes_no(r) for r in backend.generate(batch, 4)]
        verdicts.extend(answers)
        bar.update(len(batch))
    bar.close()

    def rate(control: bool) -> float | None:
        v = [a for q, a in zip(chosen, verdicts) if q.control == control and a is not None]
        return sum(v) / len(v) if v else None

    tree_rate, control_rate = rate(False), rate(True)
    return {"judge": getattr(backend, "name", type(backend).__name__), "pairs": sum(not q.control for q in chosen),
            "yes_rate": tree_rate, "control_yes_rate": control_rate,
            "gap": None if tree_rate is None or control_rate is None else tree_rate - control_rate,
            "unanswered": sum(a is None for a in verdicts),
            "verdicts": [{"level": q.level, "parent": q.parent, "child": q.child, "control": q.control, "yes": a}
                         for q, a in zip(chosen, verdicts)]}
