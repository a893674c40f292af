"""Short texts given by the user (prompts, contrast sets): a ``.txt`` file with one text per line, or ``.jsonl`` with
one JSON object per line holding the text in ``text_field``.

The file must be UTF-8 text: a binary file or another encoding is refused by name instead of being read as
replacement characters.
"""

from __future__ import annotations

import codecs
from pathlib import Path

from saeforge.errors import SaeforgeError

FORMATS_FIX = "pass a .txt file (one text per line) or a .jsonl file (one JSON object per line)"
_CONTROL = set(range(0, 32)) - {9, 10, 11, 12, 13}  # C0 control characters that text does not hold
MAX_CONTROL_FRACTION = 0.01


def decode_text(raw: bytes, path: str | Path, *, complete: bool = True, fix: str = FORMATS_FIX) -> str:
    """``raw`` decoded as UTF-8 text; a binary file or another encoding is refused naming ``path``. ``complete``
    False: ``raw`` is the start of a longer file (a character cut at its end is not an error)."""
    try:
        content = codecs.getincrementaldecoder("utf-8-sig")().decode(raw, final=complete)
    except UnicodeDecodeError as err:
        raise SaeforgeError(f"{path} is not UTF-8 text: byte 0x{raw[err.start]:02x} at offset {err.start} is not "
                            "valid UTF-8 (a binary file, or text in another encoding)",
                            f"save it as UTF-8 text; {fix}") from err
    n_control = sum(content.count(chr(c)) for c in _CONTROL)
    if n_control > MAX_CONTROL_FRACTION * max(len(content), 1):
        raise SaeforgeError(f"{path} looks binary: {n_control} of its {len(content)} characters are control "
                            "characters (such as NUL)", fix)
    return content


def read_texts(path: str | Path, text_field: str = "text", *, min_count: int = 1) -> list[str]:
    """The non-empty texts of ``path``; fewer than ``min_count`` is an error."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise SaeforgeError(f"text file {str(path)!r} does not exist", FORMATS_FIX)
    content = decode_text(p.read_bytes(), path)
    if p.suffix == ".jsonl" and content.strip():
        from saeforge.data.text_source import TextSource

        texts = list(TextSource(str(p), text_field).documents())
    else:
        texts = [line.strip() for line in content.splitlines()]
        texts = [t for t in texts if t]
    if len(texts) < min_count:
        raise SaeforgeError(f"{path} holds {len(texts)} text(s); at least {min_count} are needed",
                            "add more texts (one per line in a .txt file, one JSON object per line in .jsonl)")
    return texts
