"""Prompts for automatic interpretation: example formatting with the activating tokens marked, the explainer prompt,
the detection and fuzzing scorer prompts, and parsing of the answers.

A prompt is a list of chat messages (``{"role": ..., "content": ...}``); back ends render it with the model's chat
template, or as plain text when there is none.

The wording is saeforge's own; the setup follows delphi (Paulo et al., arXiv 2410.13928) and OpenAI's explainer
(Bills et al. 2023), see ``docs/autointerp.md``:

- activating tokens are marked ``<<like this>>``, a run of consecutive activating tokens as one span (the delphi
  highlighting; OpenAI's explainer instead lists ``token<TAB>activation`` for every token, which costs many more
  prompt tokens and small models handle it poorly);
- activations shown to the explainer are normalised to integers 0-10 as ceil(10 * a / max_a), clamped to [0, 10]
  (delphi's reading). OpenAI's floor(10 * relu(a) / max_a) would print 0 for a token that is marked as active, which
  contradicts the marks, so the ceiling is used;
- "active" means an activation above ``threshold`` (default 0: every nonzero SAE activation, as in delphi; SAEBench
  uses 1% of the maximum, which ``--mark-threshold 0.01`` reproduces).
"""

from __future__ import annotations

import math
import re
from typing import Sequence

OPEN, CLOSE = "<<", ">>"

Message = dict[str, str]
Prompt = list[Message]


def _show(token: str) -> str:
    """Token text as shown in a one-line excerpt: newlines and tabs become visible escapes."""
    return token.replace("\r", "\\r").replace("\n", "\\n").replace("\t", "\\t")


# Control tokens of the subject model (BOS etc.; harvest leaves them out of the SAE's data, so they never activate).
# They are dropped from excerpts: they mean nothing to the explainer, and a chat template would read a literal
# "<|im_start|>" in an excerpt as its own control token. The store keeps token texts, not which ids are special, so
# they are recognised by their usual spellings.
SPECIAL_TOKEN = re.compile(
    r"^(<\|[^<>|\s]{1,40}\|>|</?s>|<(bos|eos|pad|unk|mask|sep|cls)>|\[(BOS|EOS|PAD|UNK|CLS|SEP|MASK)\])$", re.I)


def drop_special_tokens(example: dict) -> dict:
    """A copy of a store example without its inactive control tokens."""
    keep = [i for i, (t, a) in enumerate(zip(example["tokens"], example["acts"]))
            if not (a == 0 and SPECIAL_TOKEN.match(t))]
    if len(keep) == len(example["tokens"]):
        return example
    out = dict(example)
    out["tokens"] = [example["tokens"][i] for i in keep]
    out["acts"] = [example["acts"][i] for i in keep]
    return out


def active_positions(acts: Sequence[float], threshold: float = 0.0) -> list[int]:
    """Positions whose activation is above ``threshold``."""
    return [i for i, a in enumerate(acts) if a > threshold]


def mark_tokens(tokens: Sequence[str], marked: Sequence[int] | set[int]) -> str:
    """The excerpt as one line with the tokens at ``marked`` wrapped in ``<<`` ``>>``; consecutive marked tokens
    share one span."""
    marked = set(marked)
    out: list[str] = []
    inside = False
    for i, tok in enumerate(tokens):
        if i in marked and not inside:
            out.append(OPEN)
            inside = True
        elif i not in marked and inside:
            out.append(CLOSE)
            inside = False
        out.append(_show(tok))
    if inside:
        out.append(CLOSE)
    return "".join(out)


def plain_text(tokens: Sequence[str]) -> str:
    """The excerpt as one line with nothing marked."""
    return "".join(_show(t) for t in tokens)


def marked_spans(text: str) -> list[str]:
    """The texts inside the ``<<...>>`` marks of a formatted excerpt (inverse of :func:`mark_tokens`)."""
    return re.findall(re.escape(OPEN) + "(.*?)" + re.escape(CLOSE), text)


def format_example(tokens: Sequence[str], acts: Sequence[float], max_act: float, *, threshold: float = 0.0,
                   show_activations: bool = True) -> str:
    """One explainer excerpt: the text with its activating tokens marked, and optionally a line listing each
    activating token with its activation on a 0-10 scale (relative to the feature's maximum ``max_act``)."""
    pos = active_positions(acts, threshold)
    line = mark_tokens(tokens, pos)
    if show_activations and pos:
        scale = max(float(max_act), 1e-12)
        levels = [min(10, max(0, math.ceil(10 * float(acts[i]) / scale))) for i in pos]
        line += "\n   activations: " + ", ".join(f"{_show(tokens[i]).strip() or _show(tokens[i])!r} {lv}"
                                                  for i, lv in zip(pos, levels))
    return line


# --------------------------------------------------------------------------------------------------- explainer
EXPLAINER_SYSTEM = (
    "You are helping to interpret one feature of a neural network that reads text. You get short text excerpts in "
    f"which the feature is active; the tokens where it fires are marked {OPEN}like this{CLOSE}, and each excerpt "
    "is followed by how strongly it fires on each marked token (0 to 10). Work out what the marked tokens and their "
    "context have in common. Reply with one short phrase (at most 15 words) that describes when the feature fires, "
    "and nothing else."
)


def explainer_prompt(examples: Sequence[dict], max_act: float, *, threshold: float = 0.0,
                     show_activations: bool = True) -> Prompt:
    """The explainer prompt for one feature; ``examples`` are store examples (``tokens``, ``acts``)."""
    system = EXPLAINER_SYSTEM if show_activations else EXPLAINER_SYSTEM.replace(
        ", and each excerpt is followed by how strongly it fires on each marked token (0 to 10)", "")
    body = "\n".join(f"{n}. " + format_example(e["tokens"], e["acts"], max_act, threshold=threshold,
                                                show_activations=show_activations)
                     for n, e in enumerate(examples, 1))
    user = f"Excerpts:\n{body}\n\nWhat does the feature respond to? Answer with one short phrase."
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


_PREFIX = re.compile(r"^\s*(?:\[?explanation\]?|the feature|answer|description)\s*[:\-]\s*", re.I)


def parse_explanation(reply: str, max_chars: int = 200) -> str:
    """The explanation in a reply: its first non-empty line, without a leading "Explanation:" and quotes. Empty when
    the reply holds nothing usable."""
    # delphi asks for a final "[EXPLANATION]: ..." line; models that produce one anyway get it honoured.
    tagged = re.findall(r"\[EXPLANATION\]\s*:\s*(.+)", reply, flags=re.I)
    text = tagged[-1] if tagged else next((ln for ln in reply.splitlines() if ln.strip()), "")
    text = _PREFIX.sub("", text.strip()).strip().strip("\"'`*").strip()
    if len(text) > max_chars:
        text = text[:max_chars].rsplit(" ", 1)[0] + "…"
    return text


# --------------------------------------------------------------------------------------------------- scorers
DETECTION_SYSTEM = (
    "You check explanations of a neural network feature. Given the explanation of a feature and a short text, "
    "decide whether the feature fires anywhere in the text, judging only by the explanation. Answer with one word: "
    "yes or no."
)

FUZZING_SYSTEM = (
    "You check explanations of a neural network feature. Given the explanation of a feature and a short text in "
    f"which some tokens are marked {OPEN}like this{CLOSE}, decide whether the marked tokens are ones the "
    "explanation describes, i.e. whether the marks are correct. Answer with one word: yes or no."
)


def detection_prompt(explanation: str, text: str) -> Prompt:
    user = (f"Explanation: {explanation}\n\nText: {text}\n\n"
            "Does the feature fire anywhere in this text? Answer yes or no.")
    return [{"role": "system", "content": DETECTION_SYSTEM}, {"role": "user", "content": user}]


def fuzzing_prompt(explanation: str, marked_text: str) -> Prompt:
    user = (f"Explanation: {explanation}\n\nText: {marked_text}\n\n"
            "Are the marked tokens what the explanation describes? Answer yes or no.")
    return [{"role": "system", "content": FUZZING_SYSTEM}, {"role": "user", "content": user}]


_ANSWER = re.compile(r"\b(yes|no|true|false)\b", re.I)


def parse_yes_no(reply: str) -> bool | None:
    """True for yes, False for no, None when the reply says neither (scored as a wrong answer)."""
    m = _ANSWER.search(reply)
    if m is None:
        return None
    return m.group(1).lower() in ("yes", "true")


def render_plain(messages: Prompt) -> str:
    """A prompt as plain text, for models without a chat template."""
    return "\n\n".join(m["content"] for m in messages) + "\n\nAnswer:"
