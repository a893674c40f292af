"""SpARE: steering the knowledge source with SAE features (Zhao et al., NAACL 2025; arXiv 2410.15999).

When a context contradicts what a model knows ("The capital of France is Tokyo. What is the capital of France?") it
answers from the context or from memory. SpARE:

1. runs conflict prompts, labels each by the behaviour observed (1: the context's answer, 0: the remembered one) and
   SAE-encodes the residual at the **last prompt position**;
2. ranks latents by their mutual information with the label and keeps the smallest top set holding ``proportion``
   (0.07) of the total; a latent with a higher mean on the context group joins C ("use context"), else P ("use
   memory");
3. functional vectors: v_C = ``degree`` (2) × the context group's mean latents on C, v_P likewise on P (the paper
   weights examples by their loss ratios; here every example weighs the same);
4. at generation time, at the last position of every forward call (the prompt's last token, then each new token),
   steering to context: h ← h − Σ_P min(v_P, z(h))·d_j + Σ_C max(v_C − z(h), 0)·d_j (remove the memory features,
   add only the missing context activation; the decoder bias cancels); to memory with the roles swapped.

Mutual information is the plug-in estimate on the latent discretised into a "silent" bin and equal-frequency bins of
its non-zero values (the paper uses scikit-learn's k-nearest-neighbour estimator, which is not a dependency here).

:func:`conflict_set` is a small knowledge-conflict set the embedded model can be tested on: world capitals, with a
context naming another country's capital; :func:`run_spare` measures the base rates first (closed-book accuracy,
then context/memory/other rates under conflict) and then the edit in both directions on held-out prompts.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from saeforge.errors import SaeforgeError

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo", "China": "Beijing",
    "Russia": "Moscow", "Egypt": "Cairo", "Greece": "Athens", "England": "London", "Portugal": "Lisbon",
    "Austria": "Vienna", "Poland": "Warsaw", "Ireland": "Dublin", "Norway": "Oslo", "Sweden": "Stockholm",
    "Denmark": "Copenhagen", "Finland": "Helsinki", "Hungary": "Budapest", "Belgium": "Brussels",
    "the Netherlands": "Amsterdam", "Turkey": "Ankara", "India": "Delhi", "Thailand": "Bangkok",
    "South Korea": "Seoul", "Argentina": "Buenos", "Peru": "Lima", "Kenya": "Nairobi", "Cuba": "Havana",
    "Scotland": "Edinburgh", "Iran": "Tehran", "Iraq": "Baghdad", "Canada": "Ottawa", "Australia": "Canberra",
    "Chile": "Santiago", "Colombia": "Bogota", "Vietnam": "Hanoi", "Indonesia": "Jakarta",
    "the Philippines": "Manila"}
LABELS = ("context", "memory", "other")


@dataclass(frozen=True)
class Fact:
    country: str
    memory: str
    substitute: str

    def closed_book(self) -> str:
        # the answer's lead-in is part of the prompt: a 135M model then names a city at once (12 of the first 12
        # capitals, against 9 for a bare "Answer:")
        return f"Q: What is the capital city of {self.country}?\nA: The capital city of {self.country} is"

    def conflict(self) -> str:
        return f"Context: The capital city of {self.country} is {self.substitute}.\n{self.closed_book()}"


SUBSTITUTE_OFFSETS = (2, 7, 13)


def conflict_set(offsets: Sequence[int] = SUBSTITUTE_OFFSETS) -> list[Fact]:
    """Every capital with one substitute per offset: the capital of the country that many places on in the list (a
    real capital, never its own), so each fact is contradicted several ways."""
    items = list(CAPITALS.items())
    return [Fact(c, cap, items[(i + k) % len(items)][1]) for k in offsets for i, (c, cap) in enumerate(items)]


def answer_of(generation: str, fact: Fact) -> str:
    """``context``, ``memory`` or ``other``: which capital the first line of the answer names first."""
    line = generation.strip().split("\n")[0].lower()
    hits = {k: line.find(name.lower()) for k, name in (("context", fact.substitute), ("memory", fact.memory))}
    hits = {k: i for k, i in hits.items() if i >= 0}
    return min(hits, key=hits.get) if hits else "other"


def mutual_information(z: np.ndarray, labels: np.ndarray, bins: int = 2) -> np.ndarray:
    """Plug-in MI (nats) between each column of ``z`` [n, d] and binary ``labels`` [n]: zero is its own bin, the
    non-zero values fall into ``bins`` equal-frequency bins (few bins: the plug-in estimate is biased upwards by
    about (bins)/(2n) nats, which on a few dozen prompts would favour latents with many distinct values)."""
    labels = np.asarray(labels).astype(int)
    if set(np.unique(labels)) - {0, 1}:
        raise SaeforgeError("labels must be 0 or 1", "label each example 1 (context) or 0 (memory)")
    n, d = z.shape
    out = np.zeros(d)
    p_y = np.bincount(labels, minlength=2) / n
    for j in range(d):
        col = z[:, j]
        nz = col != 0
        codes = np.zeros(n, dtype=int)
        if nz.any():
            edges = np.quantile(col[nz], np.linspace(0, 1, bins + 1)[1:-1])
            codes[nz] = 1 + np.searchsorted(edges, col[nz], side="right")
        joint = np.zeros((bins + 1, 2))
        np.add.at(joint, (codes, labels), 1)
        joint /= n
        p_x = joint.sum(1, keepdims=True)
        mask = joint > 0
        out[j] = float((joint[mask] * np.log(joint[mask] / (p_x @ p_y[None, :])[mask])).sum())
    return out


@dataclass
class SpareSelection:
    context: torch.Tensor  # latent indices of C
    memory: torch.Tensor  # latent indices of P
    v_context: torch.Tensor  # [|C|] target activations
    v_memory: torch.Tensor  # [|P|]
    mi: np.ndarray


def select(z: torch.Tensor, labels: Sequence[int], *, proportion: float = 0.07, degree: float = 2.0,
           bins: int = 2) -> SpareSelection:
    """C and P by mutual information (the smallest top set holding ``proportion`` of the total), split by the sign
    of the mean difference (context − memory), and their functional vectors."""
    y = np.asarray(labels).astype(int)
    if min((y == 1).sum(), (y == 0).sum()) < 2:
        raise SaeforgeError(f"SpARE needs both behaviours: {(y == 1).sum()} context and {(y == 0).sum()} memory "
                            "answers", "use more conflict prompts, or facts the model knows better")
    if not 0 < proportion <= 1:
        raise SaeforgeError(f"proportion {proportion} is not in (0, 1]", "use e.g. 0.07 (the paper's value)")
    zn = z.float().cpu().numpy()
    mi = mutual_information(zn, y, bins)
    if mi.sum() <= 0:
        raise SaeforgeError("no latent carries information about the behaviour", "use more conflict prompts")
    order = np.argsort(-mi, kind="stable")
    cumulative = np.cumsum(mi[order])
    top = order[:int(np.searchsorted(cumulative, proportion * mi.sum(), side="right")) + 1]
    expectation = zn[y == 1].mean(0) - zn[y == 0].mean(0)
    c = torch.from_numpy(np.sort(top[expectation[top] > 0]))
    p = torch.from_numpy(np.sort(top[expectation[top] < 0]))
    zt = z.float().cpu()
    ctx, mem = torch.from_numpy(y == 1), torch.from_numpy(y == 0)
    return SpareSelection(c, p, degree * zt[ctx][:, c].mean(0), degree * zt[mem][:, p].mean(0), mi)


def spare_edit(sae, sel: SpareSelection, toward: str = "context"):
    """The edit function (x, ctx) → x' applying SpARE at the last position of each forward call."""
    if toward not in ("context", "memory"):
        raise SaeforgeError(f"unknown direction {toward!r}", "steer toward context or memory")
    add, add_v, remove, remove_v = ((sel.context, sel.v_context, sel.memory, sel.v_memory) if toward == "context"
                                    else (sel.memory, sel.v_memory, sel.context, sel.v_context))
    W = sae.W_dec.detach()

    def fn(x: torch.Tensor, ctx) -> torch.Tensor:
        out = x.clone()
        h = out[:, -1].float()
        z = sae.encode(h)
        delta = torch.zeros_like(h)
        if remove.numel():
            delta -= torch.minimum(remove_v.to(h), z[:, remove]) @ W[remove].to(h)
        if add.numel():
            delta += (add_v.to(h) - z[:, add]).clamp_min(0) @ W[add].to(h)
        out[:, -1] = (h + delta).to(x.dtype)
        return out

    return fn


@contextlib.contextmanager
def spare_steering(lm, sae, site: str, sel: SpareSelection, toward: str = "context") -> Iterator[None]:
    with lm.edit({site: spare_edit(sae, sel, toward)}):
        yield


@torch.inference_mode()
def last_latents(lm, sae, site: str, prompts: Sequence[str], policy=None, batch: int = 16) -> torch.Tensor:
    """SAE latents of the residual at each prompt's last position ([n, d_sae])."""
    from saeforge.data.prompts import PromptEncoder

    encoder = PromptEncoder(lm, policy)
    out = []
    for i in range(0, len(prompts), batch):
        b = encoder.batch(list(prompts[i:i + batch]), padding="left")
        x = lm.read(b.input_ids, [site], attention_mask=b.attention_mask)[site][:, -1].float()
        out.append(sae.encode(x).cpu())
    return torch.cat(out)


def _answers(steerer, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
    from saeforge.interventions.generate import Continuations

    gen = Continuations(steerer, prompts, max_new_tokens=max_new_tokens, temperature=0.0)
    return gen.decode(gen.sample())


def _rates(labels: Sequence[str]) -> dict[str, float]:
    return {k: sum(x == k for x in labels) / len(labels) for k in LABELS} if labels else {}


def run_spare(steerer, facts: Sequence[Fact] | None = None, *, proportion: float = 0.07, degree: float = 2.0,
              bins: int = 2, max_new_tokens: int = 6) -> dict:
    """Base rates (closed-book accuracy; context/memory/other under conflict, on the facts the model knows), then
    SpARE selected on half of the known facts and applied to the other half in both directions."""
    if len(steerer.bound) != 1:
        raise SaeforgeError(f"the run has {len(steerer.bound)} SAEs; SpARE uses one", "pass one SAE folder")
    bound = next(iter(steerer.bound.values()))
    sae, site, lm = bound.sae, bound.write_site.name, steerer.lm
    facts = list(facts or conflict_set())
    countries = list(dict.fromkeys(f.country for f in facts))
    first = {f.country: f for f in reversed(facts)}
    closed = {c: answer_of(g, first[c]) for c, g in
              zip(countries, _answers(steerer, [first[c].closed_book() for c in countries], max_new_tokens))}
    known_countries = [c for c in countries if closed[c] == "memory"]
    if len(known_countries) < 8:
        raise SaeforgeError(f"the model knows only {len(known_countries)} of the {len(countries)} facts",
                            "use facts the model answers correctly without context")
    known = [f for f in facts if closed[f.country] == "memory"]
    conflict = [answer_of(g, f) for g, f in zip(_answers(steerer, [f.conflict() for f in known], max_new_tokens),
                                                 known)]
    report = {"n_facts": len(countries), "closed_book_accuracy": len(known_countries) / len(countries),
              "n_known": len(known_countries), "n_conflicts": len(known), "conflict_rates": _rates(conflict)}
    held_out = set(known_countries[1::2])  # split by country: no fact is seen on both sides
    train = [i for i, f in enumerate(known) if f.country not in held_out]
    test = [i for i, f in enumerate(known) if f.country in held_out]
    labelled = [i for i in train if conflict[i] != "other"]
    z = last_latents(lm, sae, site, [known[i].conflict() for i in labelled], steerer.policy)
    sel = select(z, [int(conflict[i] == "context") for i in labelled], proportion=proportion, degree=degree,
                 bins=bins)
    report.update(n_train=len(labelled), n_test=len(test), context_latents=sel.context.tolist(),
                  memory_latents=sel.memory.tolist())
    test_prompts = [known[i].conflict() for i in test]
    rows = {"none": [conflict[i] for i in test]}
    for toward in ("context", "memory"):
        with spare_steering(lm, sae, site, sel, toward):
            gens = _answers(steerer, test_prompts, max_new_tokens)
        rows[f"to {toward}"] = [answer_of(g, known[i]) for g, i in zip(gens, test)]
    report["test_rates"] = {k: _rates(v) for k, v in rows.items()}
    report["examples"] = {k: v[:3] for k, v in rows.items()}
    return report


def format_spare(report: dict) -> str:
    pct = lambda v: f"{100 * v:.0f}%"  # noqa: E731
    r = report["conflict_rates"]
    lines = [f"closed-book accuracy {pct(report['closed_book_accuracy'])} ({report['n_known']} of "
             f"{report['n_facts']} capitals known); {report['n_conflicts']} conflicts on them: context "
             f"{pct(r['context'])}, memory {pct(r['memory'])}, other {pct(r['other'])}",
             f"selected on {report['n_train']} labelled prompts: {len(report['context_latents'])} context latents, "
             f"{len(report['memory_latents'])} memory latents; tested on {report['n_test']} held-out prompts",
             "| edit | context answer | memory answer | other |", "|---|---|---|---|"]
    for name, rates in report["test_rates"].items():
        lines.append(f"| {name} | {pct(rates['context'])} | {pct(rates['memory'])} | {pct(rates['other'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    from saeforge.interventions.steering import Steerer

    if len(sys.argv) != 2:
        sys.exit("usage: python -m saeforge.interventions.spare SAE_FOLDER")
    print(format_spare(run_spare(Steerer.from_run(sys.argv[1]))))
