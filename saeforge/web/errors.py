"""The dashboard's one error type, and the checks every piece of user text goes through."""

from __future__ import annotations


class WebError(Exception):
    """A request the dashboard cannot answer: an HTTP status, the problem, what to do about it (optional) and extra
    response headers (e.g. ``Retry-After`` on a 503)."""

    def __init__(self, status: int, problem: str, fix: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(problem)
        self.status, self.problem, self.fix, self.headers = status, problem, fix, headers or {}

    def payload(self) -> dict:
        return {"error": self.problem, "fix": self.fix, "status": self.status}


def check_text(label: str, text: str, max_chars: int, *, status: int = 413) -> str:
    """``text`` if it is real text of at most ``max_chars`` characters; else a 4xx :class:`WebError` (``status`` for
    too long). A lone surrogate (``"\\ud800"`` in JSON) is not text: every tokenizer and encoder fails on it."""
    if len(text) > max_chars:
        raise WebError(status, f"{label} has {len(text):,} characters; the limit is {max_chars:,}", "shorten it")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = text[err.start]
        raise WebError(400, f"{label} holds U+{ord(bad):04X} at character {err.start}, half of a UTF-16 surrogate "
                            f"pair, which is not text", "remove it, or send the whole character") from None
    return text
