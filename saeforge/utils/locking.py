"""One writer per output folder: an advisory lock file that a second process on the same folder cannot take.

The lock is ``fcntl.flock`` on ``<folder>/.saeforge.lock``: the kernel releases it when the holder exits, however it
exits (a ``kill -9`` included), so a stale lock never blocks a resume. The file records the holder's pid and command
so the error can say who holds it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Iterator

from saeforge.errors import SaeforgeError

LOCK_FILE = ".saeforge.lock"


def _holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        return "another process"
    return text or "another process"


@contextlib.contextmanager
def exclusive_lock(folder: str | os.PathLike, what: str) -> Iterator[Path]:
    """Hold the lock of ``folder`` (created if missing) for the block; refuse at once if another process holds it.

    ``what`` names the job in the error, e.g. ``"saeforge cache"``. Re-entrant within one process is not supported
    (a second ``exclusive_lock`` on the same folder in the same process also refuses), which keeps two jobs of one
    Python session from writing one folder at the same time too.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    if sys.platform == "win32":  # pragma: no cover - no flock; the atomic writes still keep files whole
        yield path
        return
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SaeforgeError(
                f"{folder} is in use by {_holder(path)}; two {what} processes must not write one folder",
                f"wait for it to finish (or stop it), or choose another output folder") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} ({' '.join(sys.argv[:3]) or what}, since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')})".encode())
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the lock
