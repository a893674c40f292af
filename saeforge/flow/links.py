"""Where match results live: a small interface the flow steps, the CLI and the dashboard share.

Each :class:`~saeforge.flow.matching.Matches` table is one safetensors file under ``SUITE/flow/matches/``, written
atomically (a killed ``flow match`` leaves either the old file or the new one, never half of one), named by the two
SAEs and the method. ``links.json`` beside them lists the tables and is rewritten atomically after each one, so a
table is only ever listed once it is complete.

A match of feature i of SAE ``a`` to feature j of SAE ``b`` with similarity s is the link
``(kind="flow:<method>", src=(b, j), dst=(a, i), weight=s)``: ``b`` is the earlier site, so ``src`` is the
predecessor. When the suite has a feature store (``saeforge harvest SUITE``), :func:`write_store_links` copies the
tables into its links table (:meth:`~saeforge.features.store.FeatureStore.add_links`), one transaction per table, so
``FeatureStore.predecessors``/``successors`` and the dashboard's feature pages see them; :func:`predecessors` and
:func:`successors` here answer from the tables alone (no store needed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Iterator

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


def link_kind(method: str) -> str:
    """The feature store's link kind of a matching method: ``flow:top1``, ``flow:topk``..."""
    return f"flow:{method}"


def link_rows(matches: Matches) -> Iterator[tuple[int, int, float, dict | None]]:
    """Rows ``(src_idx, dst_idx, weight, data)`` of :meth:`FeatureStore.add_links` for the links of kind
    ``link_kind(matches.method)`` from ``matches.b`` (the predecessor) to ``matches.a``; ``data`` holds the rank of a
    match when the table keeps several per feature (None for one)."""
    idx, scores = matches.indices.tolist(), matches.scores.tolist()
    for i, (row, weights) in enumerate(zip(idx, scores)):
        for rank, (j, w) in enumerate(zip(row, weights)):
            if j >= 0:
                yield j, i, w, ({"rank": rank} if matches.k > 1 else None)


def _store_names(store) -> dict[str, str]:
    """Site → the store's SAE name for it (a suite names its SAEs after their sites; else the one reading it)."""
    rows = store.saes()
    names = {r["name"]: r["name"] for r in rows}
    by_site: dict[str, list[str]] = {}
    for r in rows:
        by_site.setdefault(r["site"], []).append(r["name"])
    return {**{site: ns[0] for site, ns in by_site.items() if len(ns) == 1}, **names}


def write_store_links(store_path: str | Path, tables: Iterable[Matches]) -> dict[str, Any]:
    """Copy match tables into the feature store's links table, replacing earlier links of the same kind between the
    same two SAEs (a re-run replaces its results). Each table is written in one transaction: a killed run leaves every
    table either wholly old or wholly new. Tables whose SAEs the store does not hold are skipped and listed.
    Returns ``{"links": n written, "tables": n tables, "skipped": [(a, b), ...]}``."""
    from saeforge.features.store import FeatureStore

    out: dict[str, Any] = {"links": 0, "tables": 0, "skipped": []}
    with FeatureStore(store_path) as store:  # writable: an older store is migrated to the schema with links
        names = _store_names(store)
        for m in tables:
            if m.a not in names or m.b not in names:
                out["skipped"].append((m.a, m.b))
                continue
            out["links"] += store.replace_links(link_kind(m.method), names[m.b], names[m.a], link_rows(m))
            out["tables"] += 1
    return out


def predecessors(suite_path: str | Path, sae: str, idx: int, method: str = "top1") -> list[dict]:
    """Stored matches of feature ``idx`` of ``sae`` into earlier sites: ``[{sae, idx, weight, rank}]``, the most
    similar first."""
    out = []
    for t in stored_tables(suite_path):
        if t["a"] == sae and t["method"] == method:
            m = load_matches(suite_path, t["a"], t["b"], method)
            for rank in range(m.k):
                j = int(m.indices[idx, rank])
                if j >= 0:
                    out.append({"sae": m.b, "idx": j, "weight": float(m.scores[idx, rank]), "rank": rank})
    return sorted(out, key=lambda d: -d["weight"])


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
