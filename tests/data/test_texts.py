import json
import os

import pytest

from saeforge.data.texts import read_texts
from saeforge.errors import SaeforgeError


def test_txt_one_text_per_line(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("  first text \n\n second\n\t\nthird — with ünïcode\n", encoding="utf-8")
    assert read_texts(p) == ["first text", "second", "third — with ünïcode"]
    assert read_texts(str(p), min_count=3) == read_texts(p)
    with pytest.raises(SaeforgeError, match="holds 3 text\\(s\\); at least 4 are needed"):
        read_texts(p, min_count=4)


def test_jsonl_field(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text("\n".join(json.dumps({"body": t, "n": i}) for i, t in enumerate(["x y", "z"])) + "\n")
    assert read_texts(p, "body") == ["x y", "z"]
    with pytest.raises(SaeforgeError, match="has no field 'text'"):
        read_texts(p)


def test_binary_and_foreign_encodings_are_refused(tmp_path):
    rnd = tmp_path / "random.txt"
    rnd.write_bytes(os.urandom(4096))
    with pytest.raises(SaeforgeError, match=r"is not UTF-8 text: byte 0x[0-9a-f]{2} at offset \d+"):
        read_texts(rnd)
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("café\nnaïve\n".encode("latin-1"))
    with pytest.raises(SaeforgeError, match="is not UTF-8 text"):
        read_texts(latin)
    nul = tmp_path / "zeros.txt"
    nul.write_bytes(b"\x00" * 500 + b"text\n" + b"\x01\x02" * 100)
    with pytest.raises(SaeforgeError, match="looks binary"):
        read_texts(nul)
    with pytest.raises(SaeforgeError, match="does not exist"):
        read_texts(tmp_path / "missing.txt")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(SaeforgeError, match="holds 0 text"):
        read_texts(empty)
