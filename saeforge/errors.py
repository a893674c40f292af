"""One exception type for every user-facing failure, so the CLI can print it without a traceback."""

from __future__ import annotations


class SaeforgeError(Exception):
    """A problem the user can fix. The message names the problem; ``fix`` says what to do about it."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if fix is None else f"{problem}\n  fix: {fix}")
