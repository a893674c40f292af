"""TextSource: where documents come from.

A source is named by one string, the same in the API, the CLI and saved configs:
- ``embedded`` / ``embedded:train`` / ``embedded:validation`` / ``embedded:all``: the Shakespeare corpus;
- a ``.txt`` file (one document) or a folder of ``.txt`` files (one document each, sorted by name);
- a ``.jsonl`` file, one document per line in the field named by ``text_field``;
- ``hf:NAME[:SPLIT]``: a Hugging Face dataset (the ``datasets`` extra): a hub name (local or cached data only when
  offline) or a folder written by ``Dataset.save_to_disk``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from saeforge.errors import SaeforgeError


SNIFF_BYTES = 1 << 16  # the start of each file that TextSource.check reads


@dataclass(frozen=True)
class TextSource:
    spec: str = "embedded:train"
    text_field: str = "text"

    def documents(self) -> Iterator[str]:
        """Yield documents in a fixed order. Raises if the source yields no text at all."""
        n_chars = 0
        for doc in self._raw_documents():
            if doc:
                n_chars += len(doc)
                yield doc
        if n_chars == 0:
            raise SaeforgeError(f"the text source {self.spec!r} is empty (no text in it)",
                                "point --corpus at files that contain text")

    def check(self) -> None:
        """Cheap checks before any slow work (a model load): a local source exists and its files start as UTF-8
        text, so random bytes are refused by name instead of being read as replacement characters."""
        from saeforge.data.texts import decode_text

        spec = self.spec
        if spec == "embedded" or spec.startswith(("embedded:", "hf:")):
            return
        path = Path(spec).expanduser()
        files = [path] if path.is_file() else sorted(path.rglob("*.txt")) if path.is_dir() else []
        if not files:
            next(iter(self._raw_documents()), None)  # raises the error that names what is missing
        for f in files:
            with open(f, "rb") as fh:
                head = fh.read(SNIFF_BYTES + 1)
            decode_text(head[:SNIFF_BYTES], f, complete=len(head) <= SNIFF_BYTES,
                        fix="point --corpus at UTF-8 text: a .txt file, a folder of .txt files or a .jsonl file")

    def _raw_documents(self) -> Iterator[str]:
        spec = self.spec
        if spec == "embedded" or spec.startswith("embedded:"):
            from saeforge.data.corpus import corpus_files

            split = spec.split(":", 1)[1] if ":" in spec else "train"
            for path in corpus_files(split):
                yield path.read_text(encoding="utf-8", errors="replace").strip()
            return
        if spec.startswith("hf:"):
            yield from self._hf_documents(spec[3:])
            return
        path = Path(spec).expanduser()
        if not path.exists():
            raise SaeforgeError(
                f"text source {spec!r} does not exist",
                "pass embedded[:train|validation|all], a .txt file, a folder of .txt files, a .jsonl file or hf:NAME",
            )
        if path.is_dir():
            files = sorted(path.rglob("*.txt"))
            if not files:
                raise SaeforgeError(f"folder {path} holds no .txt files", "put .txt files in it or pass another source")
            for f in files:
                yield f.read_text(encoding="utf-8", errors="replace")
        elif path.suffix == ".jsonl":
            yield from self._jsonl_documents(path)
        else:
            yield path.read_text(encoding="utf-8", errors="replace")

    def _jsonl_documents(self, path: Path) -> Iterator[str]:
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise SaeforgeError(f"{path}:{lineno} is not valid JSON: {err}", "fix or remove that line") from err
                if not isinstance(row, dict) or self.text_field not in row:
                    keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                    raise SaeforgeError(
                        f"{path}:{lineno} has no field {self.text_field!r} (it has: {keys})",
                        "pass --text-field with the name of the field that holds the text",
                    )
                yield str(row[self.text_field])

    def _hf_documents(self, name: str) -> Iterator[str]:
        try:
            import datasets
        except ImportError as err:
            raise SaeforgeError("hf: text sources need the `datasets` package",
                                "pip install 'saeforge[datasets]'") from err
        name, _, split = name.partition(":")
        try:
            local = Path(name).expanduser()
            if (local / "dataset_info.json").is_file() or (local / "dataset_dict.json").is_file():
                ds = datasets.load_from_disk(str(local))  # a folder written by Dataset.save_to_disk
                if isinstance(ds, datasets.DatasetDict):
                    ds = ds[split or "train"]
            else:
                ds = datasets.load_dataset(name, split=split or "train", streaming=False)
        except Exception as err:
            raise SaeforgeError(f"could not load dataset {name!r}: {type(err).__name__}: {err}",
                                "check the name; offline only local or cached datasets load") from err
        if self.text_field not in ds.column_names:
            raise SaeforgeError(f"dataset {name!r} has no column {self.text_field!r} (it has {ds.column_names})",
                                "pass --text-field with the column that holds the text")
        for row in ds:
            yield str(row[self.text_field])
