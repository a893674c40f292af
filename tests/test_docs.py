"""The project is self-contained: code and docs cite papers and the project's own docs, never files outside the
repository; every module docs/methods.md names exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = re.compile(r"methods\.md §|methods\.md section|shared/docs|perf-notes|\.\./shared|formats\.md|peers\.md")


def _text_files():
    for folder in ("saeforge", "tests", "docs", "benchmarks", "scripts"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".md", ".html", ".js", ".css", ".txt", ".toml", ".yaml"):
                yield path
    yield ROOT / "README.md"


def test_no_reference_outside_the_repository():
    offenders = []
    for path in _text_files():
        if path == Path(__file__).resolve():
            continue
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def _exists(dotted: str) -> bool:
    """A module (file or package) of the repository, or a name defined at the top of one."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:cut])
        source = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
        if source.is_file():
            rest = parts[cut:]
            return not rest or (len(rest) == 1 and re.search(rf"^(class|def) {rest[0]}\b", source.read_text(), re.M)
                                is not None)
    return False


def test_methods_doc_names_existing_modules_and_arxiv_ids():
    text = (ROOT / "docs" / "methods.md").read_text()
    modules = set(re.findall(r"`(saeforge(?:\.\w+)+)`", text))
    assert len(modules) > 25
    missing = [m for m in sorted(modules) if not _exists(m)]
    assert not missing, missing
    assert len(set(re.findall(r"arXiv\s+(\d{4}\.\d{5})", text))) >= 20
    for link in re.findall(r"\]\(([\w./-]+\.md)\)", text):
        assert (ROOT / "docs" / link).is_file(), link
