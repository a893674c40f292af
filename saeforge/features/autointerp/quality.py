"""Is an explanation usable? A test of degeneracy, the retry prompt, and the fallback label.

A small explainer (the embedded SmolLM2-135M) often answers with text that says nothing: "The feature responds to the
feature by responding to the feature's own feature.", a copy of the instructions, a copy of an excerpt, or nothing.
Scored, such text sits at chance and reads like a finding. :func:`degeneracy` names the first of these problems it
finds, or returns None:

- **empty**: no letter or digit;
- **copied excerpt**: the ``<<`` ``>>`` marks or an excerpt's numbering;
- **repetition**: a word other than a function word three times or more, or a run of three words twice;
- **self-reference**: "itself", or the feature (feature, neuron, latent) named twice: "The feature responds to the
  question of when the feature fires.";
- **no content**: no word that could say what the feature is about. A word counts as content when it is not a
  function word ("the", "to"), not a word about the task itself ("feature", "responds", "token", "marked"...), and
  not a word of the prompt's instructions that the excerpts do not contain (a parroted instruction); and in any case
  when it names a string that occurs in the excerpts shown: quoted, or after "word", "token" or "like" as the last
  word or not a function word ("the word the", "tokens like commas"; not "tokens in the text"), or when it is the
  text of a token
  the feature fires on in the excerpts shown (a short explanation may be just that token).

The explain loop retries a degenerate explanation once with :func:`retry_prompt` (the same conversation, the reply,
and a request naming the problem), then falls back to :func:`top_token_label`, a plain list of the tokens the feature
fires on most, stored with ``explanation_source = 'top-tokens'`` so that it is never mistaken for an explanation.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Sequence

from saeforge.features.autointerp import prompts as P

FUNCTION_WORDS = frozenset("""
a an the this that these those it its it's they them their there here is are was were be been being am do does did
has have had of to in on at by for with from into onto upon over under about as than then so such and or but nor not
no yes if when where which who whom whose what while after before during between among within without through
across against up down out off again further once all any both each every few more most other some same only own
very can could will would shall should may might must just also too one ones s t i you he she we me my your his her
our us him itself themselves
""".split())
TASK_WORDS = frozenset("""
feature features featured neuron neurons latent latents unit units fire fires firing fired activate activates activated
activating activation activations active respond responds responding responded response responses detect detects
detecting detected detection token tokens text texts excerpt excerpts marked mark marks marking highlighted word words
phrase phrases context contexts example examples describe describes described description explanation explains
explain network model input inputs output pattern patterns common commonly various different specific certain
related relating relates thing things something anything everything kind kinds type types appear appears appearing
occur occurs occurrence present presence contain contains containing given use used using shown show shows
""".split())
NAMING_WORDS = frozenset({"word", "words", "token", "tokens", "like", "string", "strings", "character", "characters"})
SELF_WORDS = frozenset({"feature", "features", "neuron", "neurons", "latent", "latents"})
REFLEXIVE = frozenset({"itself", "themselves", "itselves"})
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?", re.UNICODE)
_QUOTED = re.compile(r"""'([^']+)'|"([^"]+)"|“([^”]+)”|‘([^’]+)’|`([^`]+)`""")
_NUMBERED = re.compile(r"(^|\s)\d+\.\s")

RETRY_REQUEST = (
    "That answer cannot be used: {reason}. Look at the marked tokens again and reply with one short phrase that "
    "names what they have in common, in plain words and without repeating yourself."
)


def words(text: str) -> list[str]:
    """Lower-case words, possessives folded ("feature's" is "feature")."""
    return [re.sub(r"'s$", "", w.lower()) for w in _WORD.findall(text)]


def instruction_words() -> frozenset[str]:
    """Words of the explainer's instructions and of the retry request (not of any excerpt)."""
    fixed = P.explainer_prompt([], 1.0)
    text = " ".join(m["content"] for m in fixed) + " " + RETRY_REQUEST
    return frozenset(words(text))


_INSTRUCTIONS = instruction_words()


def activating_words(examples: Sequence[dict], threshold: float = 0.0) -> set[str]:
    """The words of the tokens the feature fires on in ``examples`` (store examples: ``tokens``, ``acts``)."""
    out: set[str] = set()
    for e in examples:
        for t, a in zip(e["tokens"], e["acts"]):
            if a > threshold:
                out.update(words(t))
    return out


def example_words(examples: Sequence[dict]) -> set[str]:
    out: set[str] = set()
    for e in examples:
        out.update(words("".join(e["tokens"])))
    return out


def content_words(explanation: str, examples: Sequence[dict], threshold: float = 0.0) -> list[str]:
    """The words of ``explanation`` that could say what the feature is about (see the module docstring)."""
    ws = words(explanation)
    firing = activating_words(examples, threshold)
    in_examples = example_words(examples)
    named, quoted = set(), set()
    for m in _QUOTED.finditer(explanation):
        quoted.update(words(next(g for g in m.groups() if g is not None)))
    named |= quoted
    for n, (prev, w) in enumerate(zip(ws, ws[1:]), 1):
        # "the word the", "tokens like commas": a string named; not "tokens in the text"
        if prev in NAMING_WORDS and (w not in FUNCTION_WORDS or n == len(ws) - 1):
            named.add(w)
    held = in_examples | firing
    misquoted = quoted - held  # a quotation the excerpts do not hold says nothing about them
    named &= held
    out = []
    for w in ws:
        if w in named or w in firing:
            out.append(w)
        elif w in misquoted or w in FUNCTION_WORDS or w in TASK_WORDS:
            continue
        elif w in _INSTRUCTIONS and w not in in_examples:
            continue
        else:
            out.append(w)
    return out


def degeneracy(explanation: str, examples: Sequence[dict], threshold: float = 0.0) -> str | None:
    """Why ``explanation`` of a feature shown ``examples`` is unusable, or None when it is usable."""
    text = explanation.strip()
    if not re.search(r"[^\W_]", text):
        return "it is empty"
    if P.OPEN in text or P.CLOSE in text or _NUMBERED.search(text):
        return "it copies an excerpt instead of describing it"
    ws = words(text)
    counts = Counter(w for w in ws if w not in FUNCTION_WORDS)
    repeated = [w for w, c in counts.items() if c >= 3]
    if repeated:
        return f"it repeats {repeated[0]!r} {counts[repeated[0]]} times"
    trigrams = Counter(zip(ws, ws[1:], ws[2:]))
    again = [g for g, c in trigrams.items() if c >= 2]
    if again:
        return f"it repeats {' '.join(again[0])!r}"
    self_refs = [w for w in ws if w in SELF_WORDS]
    if any(w in REFLEXIVE for w in ws) or len(self_refs) >= 2:
        return "it talks about the feature itself, not about the text"
    if not content_words(text, examples, threshold):
        return "it says nothing about the text (only words about features, tokens or the task)"
    return None


def retry_prompt(prompt: P.Prompt, reply: str, reason: str) -> P.Prompt:
    """The explainer conversation again, with the unusable reply and a request that names its problem."""
    return [*prompt, {"role": "assistant", "content": reply.strip() or "(nothing)"},
            {"role": "user", "content": RETRY_REQUEST.format(reason=reason)}]


def top_token_label(top_tokens: Sequence[Sequence] | None, n: int = 5) -> str | None:
    """``tokens: " king", " queen", " crown"``: the feature's most frequent top-activating tokens (control tokens
    left out), quoted so their spaces show; None when there are none."""
    shown = [t for t, *_ in (top_tokens or []) if t and not P.SPECIAL_TOKEN.match(t)][:n]
    if not shown:
        return None
    return "tokens: " + ", ".join(json.dumps(t, ensure_ascii=False) for t in shown)
