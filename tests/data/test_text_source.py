import json

import pytest

from saeforge.data.text_source import TextSource
from saeforge.errors import SaeforgeError


def test_txt_file_folder_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("alpha text")
    (tmp_path / "b.txt").write_text("beta text")
    assert list(TextSource(str(tmp_path / "a.txt")).documents()) == ["alpha text"]
    assert list(TextSource(str(tmp_path)).documents()) == ["alpha text", "beta text"]
    jl = tmp_path / "docs.jsonl"
    jl.write_text("\n".join(json.dumps({"body": t, "id": i}) for i, t in enumerate(["one", "two"])) + "\n")
    assert list(TextSource(str(jl), text_field="body").documents()) == ["one", "two"]


def test_jsonl_without_the_field_names_it_and_the_fix(tmp_path):
    jl = tmp_path / "docs.jsonl"
    jl.write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(SaeforgeError) as err:
        list(TextSource(str(jl)).documents())
    assert "docs.jsonl:1 has no field 'text'" in str(err.value) and "['content']" in str(err.value)
    assert "--text-field" in str(err.value)


def test_empty_corpus_and_missing_path(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(SaeforgeError, match="is empty"):
        list(TextSource(str(tmp_path / "empty.txt")).documents())
    with pytest.raises(SaeforgeError, match="does not exist"):
        list(TextSource(str(tmp_path / "nope.txt")).documents())
    (tmp_path / "sub").mkdir()
    with pytest.raises(SaeforgeError, match="holds no .txt files"):
        list(TextSource(str(tmp_path / "sub")).documents())


def test_hf_source_without_datasets_or_data_is_a_clear_error():
    with pytest.raises(SaeforgeError) as err:
        list(TextSource("hf:saeforge-test/no-such-dataset").documents())
    assert "datasets" in str(err.value)


def test_hf_dataset_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"body": ["first doc", "second doc"]}).save_to_disk(str(tmp_path / "ds"))
    assert list(TextSource(f"hf:{tmp_path / 'ds'}", text_field="body").documents()) == ["first doc", "second doc"]
    with pytest.raises(SaeforgeError, match="has no column 'text'"):
        list(TextSource(f"hf:{tmp_path / 'ds'}").documents())


@pytest.mark.embedded
def test_embedded_split_is_by_work_and_disjoint(embedded_lm):
    from saeforge.data.corpus import VALIDATION_WORKS, corpus_files, work_name

    train = {work_name(p) for p in corpus_files("train")}
    val = {work_name(p) for p in corpus_files("validation")}
    assert val == set(VALIDATION_WORKS)
    assert not train & val and len(train) + len(val) == 42
    assert next(TextSource("embedded:validation").documents()).startswith("HAMLET")


def test_check_refuses_random_bytes_and_accepts_text_cut_mid_character(tmp_path):
    import random

    from saeforge.data.text_source import SNIFF_BYTES

    junk = tmp_path / "junk.txt"
    junk.write_bytes(random.Random(0).randbytes(4096))
    with pytest.raises(SaeforgeError, match=r"junk.txt is not UTF-8 text") as err:
        TextSource(str(junk)).check()
    assert "--corpus" in err.value.fix
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.txt").write_text("plain text\n")
    (folder / "b.txt").write_bytes(b"text\x00\x00\x00\x00\x00 with NULs" * 10)
    with pytest.raises(SaeforgeError, match=r"b.txt looks binary"):
        TextSource(str(folder)).check()
    long = tmp_path / "long.txt"
    long.write_text("a" * (SNIFF_BYTES - 1) + "é" * 100)  # the sniffed start ends inside a two-byte character
    TextSource(str(long)).check()
    with pytest.raises(SaeforgeError, match="does not exist"):
        TextSource(str(tmp_path / "missing.txt")).check()
    TextSource("embedded:validation").check()
