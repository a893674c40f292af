"""Where match results live: a small interface the flow steps, the CLI and the dashboard share.

Each :class:`~saeforge.flow.matching.Matches` table is one safetensors file under ``SUITE/flow/matches/``, written
atomically (a killed ``flow match`` leaves either the old file or the new one, never half of one), named by the two
SAEs and the method. ``links.json`` beside them lists the tables and is rewritten atomically after each one, so a
table is only ever listed once it is complete.

A match of feature i of SAE ``a`` to feature j of SAE ``b`` with similarity s is the link
``(kind="flow:<method>", src=(b, j), dst=(a, i), weight=s)``: ``b`` is the earlier site, so ``src`` is the
predecessor. :func:`link_rows` gives the rows in that form for the feature store's generic links table
(kind, src_sae, src_idx, dst_sae, dst_idx, weight, data); :func:`predecessors`/:func:`successors` answer "where does
feature i come from / go to".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch

from saeforge.errors import SaeforgeError
from saeforge.flow.matching import Matches
from saeforge.utils.atomic import atomic_save_safetensors, atomic_write_json

MATCHES_DIR = Path("flow") / "matches"
INDEX_FILE = "links.json"


def _table_name(a: str, b: str, method: str) -> str:
    return f"{a}__{b}__{method}.safetensors"


def matches_folder(suite_path: str | Path) -> Path:
    return Path(suite_path) / MATCHES_DIR


def save_matches(suite_path: str | Path, matches: Matches) -> Path:
    """Write one match table (atomically) and list it in the index."""
    folder = matches_folder(suite_path)
    folder.mkdir(parents=True, exist_ok=True)
    name = _table_name(matches.a, matches.b, matches.method)
    atomic_save_safetensors(folder / name, {"indices": matches.indices, "scores": matches.scores},
                            metadata={"a": matches.a, "b": matches.b, "method": matches.method,
                                      "info": json.dumps(matches.info)})
    index = _index(folder)
    index[name] = {"a": matches.a, "b": matches.b, "method": matches.method, "k": matches.k}
    atomic_write_json(folder / INDEX_FILE, index)
    return folder / name


def _index(folder: Path) -> dict:
    path = folder / INDEX_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SaeforgeError(f"{path} is damaged: {err}", f"delete {folder} and run saeforge flow match again") from err


def load_matches(suite_path: str | Path, a: str, b: str, method: str) -> Matches | None:
    """The stored table matching ``a``'s features into ``b`` by ``method``, or None."""
    from safetensors import safe_open

    folder = matches_folder(suite_path)
    name = _table_name(a, b, method)
    if name not in _index(folder):
        return None
    with safe_open(str(folder / name), "pt") as fh:
        meta = fh.metadata()
        return Matches(a, b, method, fh.get_tensor("indices"), fh.get_tensor("scores"), json.loads(meta["info"]))


def stored_tables(suite_path: str | Path) -> list[dict]:
    return list(_index(matches_folder(suite_path)).values())


def link_rows(matches: Matches) -> Iterator[tuple[str, str, int, str, int, float, str]]:
    """Rows ``(kind, src_sae, src_idx, dst_sae, dst_idx, weight, data)`` of the feature store's links table."""
    kind = f"flow:{matches.method}"
    for i in range(matches.indices.shape[0]):
        for rank in range(matches.k):
            j = int(matches.indices[i, rank])
            if j >= 0:
                yield (kind, matches.b, j, matches.a, i, float(matches.scores[i, rank]), json.dumps({"rank": rank}))


def predecessors(suite_path: str | Path, sae: str, idx: int, method: str = "top1") -> list[dict]:
    """Stored matches of feature ``idx`` of ``sae`` into earlier sites: ``[{sae, idx, weight, rank}]``."""
    out = []
    for t in stored_tables(suite_path):
        if t["a"] == sae and t["method"] == method:
            m = load_matches(suite_path, t["a"], t["b"], method)
            for rank in range(m.k):
                j = int(m.indices[idx, rank])
                if j >= 0:
                    out.append({"sae": m.b, "idx": j, "weight": float(m.scores[idx, rank]), "rank": rank})
    return out


def successors(suite_path: str | Path, sae: str, idx: int, method: str = "top1") -> list[dict]:
    """Features of later sites whose stored matches include feature ``idx`` of ``sae``."""
    out = []
    for t in stored_tables(suite_path):
        if t["b"] == sae and t["method"] == method:
            m = load_matches(suite_path, t["a"], t["b"], method)
            rows, ranks = torch.nonzero(m.indices == idx, as_tuple=True)
            out += [{"sae": m.a, "idx": int(i), "weight": float(m.scores[i, r]), "rank": int(r)}
                    for i, r in zip(rows.tolist(), ranks.tolist())]
    return sorted(out, key=lambda d: -d["weight"])
