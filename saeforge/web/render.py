"""How the pages show numbers and tokens: formatting, token chips, and example windows as shaded token spans.

Tokens are shown as what they are: a leading or trailing space in a chip as a visible ``␣``, newlines and tabs as
``↵`` and ``⇥``, control tokens (``<|im_start|>``) as a dark chip with their name, and the replacement character that
decoding one byte of a multi-byte character gives as a marked ``�`` that says so.
"""

from __future__ import annotations

import math
import re

from markupsafe import Markup, escape

from saeforge.evals.plots import count_share as share  # noqa: F401  ("12 (0.29 %)", as the plots write it)
from saeforge.features.autointerp.prompts import SPECIAL_TOKEN

BAD_BYTES_TITLE = "part of a multi-byte character: this token alone is not valid UTF-8"
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# a window shows its own peak as well when it beats the sampled token by this factor
STRONGER_PEAK = 1.25


def fmt(value, digits: int = 4) -> str:
    """A number for people: integers with separators, floats to ``digits`` significant digits."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}g}"
    return str(value)


def show_token(text: str) -> str:
    """A token as plain text: newlines, tabs and other control characters made visible (spaces stay)."""
    if not text:
        return "∅"
    text = text.replace("\n", "↵").replace("\t", "⇥").replace("\r", "␍")
    return _CONTROL.sub(lambda m: chr(0x2400 + ord(m.group()) if ord(m.group()) < 32 else 0x2421), text)


def _inner(text: str) -> str:
    """Escaped token text with replacement characters marked."""
    shown = str(escape(show_token(text)))
    return shown.replace("\ufffd", f'<span class="bad" title="{BAD_BYTES_TITLE}">\ufffd</span>')


def control_name(text: str) -> str | None:
    """``im_start`` for ``<|im_start|>``, ``s`` for ``</s>``...: the name of a control token, or None."""
    if not SPECIAL_TOKEN.match(text or ""):
        return None
    return text.strip("<>|[]/") or text


def token_html(text: str) -> Markup:
    """A token inside running text (an example window, the inspector's prompt)."""
    name = control_name(text)
    if name is not None:
        return Markup(f'<span class="ctl" title="control token {escape(text)}">{escape(name)}</span>')
    return Markup(_inner(text))


def chip(text: str, cls: str = "") -> Markup:
    """A token on its own, as a chip: spaces at either end shown as ``␣``, control tokens by name."""
    classes = f"tok {cls}".strip()
    name = control_name(text)
    if name is not None:
        return Markup(f'<span class="{classes} ctl" title="control token {escape(text)}">{escape(name)}</span>')
    space = '<span class="ws" title="a space">␣</span>'
    core = text.strip(" ")
    if not text:
        body = "∅"
    elif not core:
        body = space * len(text)
    else:
        lead, trail = len(text) - len(text.lstrip(" ")), len(text) - len(text.rstrip(" "))
        body = space * lead + _inner(core) + space * trail
    return Markup(f'<span class="{classes}" title="{escape(repr(text))}">{body}</span>')


def example_html(e: dict, max_act: float) -> Markup:
    """One example window as token spans shaded by activation / the feature's max, the sampled token boxed; when the
    window holds a clearly stronger activation (a quantile sample sits among stronger ones), that token gets a dashed
    box too. Built here rather than in the template: a feature page has ~2,000 tokens, and this is several times
    faster."""
    acts = e["acts"]
    peak = e.get("peak_offset", -1)
    strongest = max(range(len(acts)), key=acts.__getitem__) if acts else -1
    if strongest >= 0 and not acts[strongest] > STRONGER_PEAK * max(e["max_act"], 0.0):
        strongest = -1
    parts = []
    for i, (t, a) in enumerate(zip(e["tokens"], acts)):
        cls, attrs = "t", ""
        if a > 0:
            alpha = min(a / max_act, 1.0) if max_act > 0 else 1.0
            cls = "t on"
            attrs = (f' style="background: rgba(238, 108, 0, {0.15 + 0.85 * alpha:.3f})"'
                     f' data-act="{a:.4g}" title="{a:.4g}"')
        if i == peak:
            cls += " peak"
        elif i == strongest:
            cls += " wpeak"
        parts.append(f'<span class="{cls}"{attrs}>{token_html(t)}</span>')
    return Markup("".join(parts))


def window_peak(e: dict) -> float | None:
    """The window's strongest activation when it clearly beats the sampled token's (else None)."""
    best = max(e["acts"], default=0.0)
    return best if best > STRONGER_PEAK * max(e["max_act"], 0.0) else None


def finite_json(obj):
    """``obj`` with NaN and ±Inf floats as None (JSON has neither; an overflowing perplexity or an undefined
    conditional probability must not be a 500)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj
