"""Atomic file writes: write to a temporary sibling, fsync, then rename over the target.

A reader therefore sees either the old file or the complete new one, never a half-written file, whatever
moment the process is killed at. Temporary names start with ``.tmp-`` so that cleanup code can find them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from saeforge.errors import SaeforgeError

TMP_PREFIX = ".tmp-"


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _disk_error(target: Path, err: OSError) -> SaeforgeError:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return SaeforgeError(
            f"disk full while writing {target}",
            "free some space or choose another output folder, then re-run the same command: it resumes",
        )
    return SaeforgeError(f"could not write {target}: {err}", "check the folder exists and is writable")


def atomic_write(target: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` to produce the file, then move it over ``target`` atomically."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=TMP_PREFIX + target.name + ".", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise _disk_error(target, err) from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)
    return target


def atomic_write_bytes(target: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(target, lambda p: p.write_bytes(data))


def atomic_write_text(target: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(target, text.encode("utf-8"))


def atomic_write_json(target: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(target, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_save_safetensors(target: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(target, lambda p: save_file(tensors, str(p), metadata=metadata))


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Build a directory under a temporary name and rename it to ``target`` only if the block succeeds.

    ``target`` must not exist yet (directories cannot be renamed over a non-empty one portably).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + target.name + ".", dir=target.parent))
    try:
        yield tmp
        for child in tmp.rglob("*"):
            if child.is_file():
                with open(child, "rb+") as fh:
                    os.fsync(fh.fileno())
        os.replace(tmp, target)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _disk_error(target, err) from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(target.parent)


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Delete leftovers of writes that were killed half-way. Returns how many were removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    n = 0
    for child in folder.iterdir():
        if child.name.startswith(TMP_PREFIX):
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
            n += 1
    return n
