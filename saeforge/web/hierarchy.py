"""Dashboard pages for feature trees and co-activation modules (docs/hierarchy.md).

=========================================  ==========================================================================
page                                       JSON
=========================================  ==========================================================================
``/hierarchy``  trees and modules of a run ``GET /api/hierarchy``
``/hierarchy/{tree}``  a tree, by parent   ``GET /api/hierarchy/{tree}?level=&offset=&limit=&order=``
``/modules/{name}``  modules of a task     ``GET /api/modules/{name}``
=========================================  ==========================================================================

What a run holds: the tree of every HSAE (``saes/<name>/tree.json``), trees written into the run with
``saeforge hierarchy link ... --out RUN/trees/NAME.json``, and modules written with ``saeforge modules build RUN
--out RUN/modules/NAME.json`` (with ``NAME.eval.json`` beside, from ``saeforge modules evaluate``). Tree figures
(P(parent | child) per pair, Hamming per parent) come from ``<tree>.metrics.json`` (``saeforge hierarchy metrics``),
explanations and densities from the run's feature store, for the SAEs the store holds.

Register them on the dashboard's app with :func:`register_hierarchy_routes` (``saeforge.web.app.create_app``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse, JSONResponse

from saeforge.errors import SaeforgeError
from saeforge.web.data import RunData, WebError
from saeforge.web.render import finite_json

__all__ = ["HierarchyPages", "register_hierarchy_routes"]

MAX_PARENTS = 100
TREE_ORDERS = ("children", "index", "hamming")


class HierarchyPages:
    """The trees and modules of one run, as plain dicts."""

    def __init__(self, data: RunData):
        self.data = data

    # ---- discovery ----
    def _tree_files(self) -> dict[str, Path]:
        out = {}
        for name, folder in self.data.sae_folders.items():
            if (folder / "tree.json").is_file():
                out[name] = folder / "tree.json"
        trees = self.data.path / "trees"
        if trees.is_dir():
            for p in sorted(trees.glob("*.json")):
                if not p.name.endswith((".metrics.json", ".judge.json")):
                    out.setdefault(p.stem, p)
        return out

    def _module_files(self) -> dict[str, Path]:
        folder = self.data.path / "modules"
        if not folder.is_dir():
            return {}
        return {p.stem: p for p in sorted(folder.glob("*.json")) if not p.name.endswith(".eval.json")}

    def index(self) -> dict[str, Any]:
        from saeforge.hierarchy.tree import FeatureTree

        trees = []
        for name, path in self._tree_files().items():
            try:
                t = FeatureTree.load(path)
                trees.append({"name": name, "kind": t.kind, "widths": t.widths, "pairs": t.n_pairs(),
                              "measured": path.with_name(path.stem + ".metrics.json").is_file()})
            except SaeforgeError as err:
                trees.append({"name": name, "error": err.problem})
        modules = []
        for name, path in self._module_files().items():
            d = _read(path)
            modules.append({"name": name, "concepts": len(d.get("concepts", {})),
                            "relations": len(d.get("relations", {})),
                            "evaluated": path.with_name(path.stem + ".eval.json").is_file()})
        return {"trees": trees, "modules": modules}

    # ---- store lookups ----
    def _store_names(self, folders: list[Path]) -> list[str | None]:
        if not self.data.has_store:
            return [None] * len(folders)
        by_path = {str(Path(s["path"]).resolve()): s["name"] for s in self.data.store().saes() if s.get("path")}
        return [by_path.get(str(f.resolve())) for f in folders]

    def _features(self, sae: str | None, idxs: list[int]) -> dict[int, dict]:
        """Explanation and density of store features (empty when the SAE is not in the store)."""
        if sae is None or not idxs:
            return {}
        brief = self.data.store().brief_features(sae, idxs)  # all SQL lives in FeatureStore
        return {i: {k: f[k] for k in ("density", "explanation", "score")} for i, f in brief.items()}

    # ---- trees ----
    def tree(self, name: str, *, level: int = 0, offset: int = 0, limit: int = 20, order: str = "children"
             ) -> dict[str, Any]:
        from saeforge.hierarchy.metrics import TreeMetrics
        from saeforge.hierarchy.tree import FeatureTree

        files = self._tree_files()
        if name not in files:
            raise WebError(404, f"no tree named {name!r} in this run",
                           f"trees here: {', '.join(files) or 'none'} (saeforge hierarchy link ... --out "
                           f"{self.data.path}/trees/NAME.json)")
        if order not in TREE_ORDERS:
            raise WebError(400, f"unknown order {order!r}", f"use one of {', '.join(TREE_ORDERS)}")
        if not 1 <= limit <= MAX_PARENTS or offset < 0:
            raise WebError(400, f"limit must be 1..{MAX_PARENTS} and offset non-negative")
        path = files[name]
        try:
            tree = FeatureTree.load(path)
        except SaeforgeError as err:
            raise WebError(500, err.problem, err.fix) from err
        if not 0 <= level < tree.n_levels - 1:
            raise WebError(404, f"level {level} has no children: the tree has levels 0..{tree.n_levels - 1}",
                           f"pick a level below {tree.n_levels - 1}")
        metrics_path = path.with_name(path.stem + ".metrics.json")
        metrics = TreeMetrics.from_dict(_read(metrics_path)) if metrics_path.is_file() else None
        pair_stats = metrics.pairs[level] if metrics and level < len(metrics.pairs) else None
        folders = [tree.sae_folder(i) for i in range(tree.n_levels)]
        names = self._store_names(folders)
        parents, children = tree.pairs(level)
        groups: dict[int, list[int]] = {}
        for p, c in zip(parents.tolist(), children.tolist()):
            groups.setdefault(p, []).append(c)
        keys = list(groups)
        if order == "children":
            keys.sort(key=lambda p: (-len(groups[p]), p))
        elif order == "hamming" and pair_stats is not None:
            keys.sort(key=lambda p: (pair_stats.for_parent(p) if pair_stats.for_parent(p) is not None else 1e9, p))
        else:
            keys.sort()
        page = keys[offset:offset + limit]
        off = [lv.latents[0] for lv in tree.levels]
        info_p = self._features(names[level], [off[level] + p for p in page])
        kids = [c for p in page for c in groups[p]]
        info_c = self._features(names[level + 1], [off[level + 1] + c for c in kids])
        below = tree.parents[level + 1] if level + 1 < tree.n_levels - 1 else None

        def link(lv: int, idx: int) -> str | None:
            return f"/saes/{names[lv]}/features/{off[lv] + idx}" if names[lv] else None

        rows = []
        for p in page:
            child_rows = []
            for c in sorted(groups[p], key=lambda c: -float(tree.similarity[level][c])):
                stats = pair_stats.for_child(c) if pair_stats is not None else {}
                child_rows.append({"idx": c, "url": link(level + 1, c), "similarity": float(tree.similarity[level][c]),
                                   "grandchildren": int((below == c).sum()) if below is not None else 0,
                                   **stats, **info_c.get(off[level + 1] + c, {})})
            rows.append({"idx": p, "url": link(level, p), "children": child_rows,
                         "hamming_per_1k": pair_stats.for_parent(p) if pair_stats is not None else None,
                         **info_p.get(off[level] + p, {})})
        return {"name": name, "kind": tree.kind, "widths": tree.widths, "level": level, "n_levels": tree.n_levels,
                "order": order, "offset": offset, "limit": limit, "parents_with_children": len(keys),
                "has_more": offset + limit < len(keys), "summary": metrics.summary() if metrics else None,
                "in_store": [n is not None for n in names], "parents": rows, "info": tree.info}

    # ---- modules ----
    def modules(self, name: str) -> dict[str, Any]:
        files = self._module_files()
        if name not in files:
            raise WebError(404, f"no modules named {name!r} in this run",
                           f"modules here: {', '.join(files) or 'none'} (saeforge modules build RUN --out "
                           f"{self.data.path}/modules/NAME.json)")
        data = _read(files[name])
        evaluation = _read(files[name].with_name(files[name].stem + ".eval.json")) or None
        sites = {int(k): v for k, v in (data.get("sites") or {}).items()}
        store_by_site: dict[str, str] = {}
        if self.data.has_store:
            store_by_site = {s["site"]: s["name"] for s in self.data.store().saes()}

        def describe(features: list) -> list[dict]:
            by_layer: dict[int, list[int]] = {}
            for layer, idx in features:
                by_layer.setdefault(int(layer), []).append(int(idx))
            out = []
            for layer in sorted(by_layer):
                sae = store_by_site.get(sites.get(layer, ""))
                info = self._features(sae, by_layer[layer])
                out.append({"layer": layer, "site": sites.get(layer), "features": [
                    {"idx": i, "url": f"/saes/{sae}/features/{i}" if sae else None, **info.get(i, {})}
                    for i in sorted(by_layer[layer])]})
            return out

        return {"name": name, "task": data.get("task"), "settings": data.get("settings"),
                "concepts": {c: describe(v) for c, v in data.get("concepts", {}).items()},
                "relations": {r: describe(v) for r, v in data.get("relations", {}).items()},
                "graphs": data.get("graphs"), "evaluation": evaluation}


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise WebError(500, f"{path.name} could not be read: {err}", "rebuild it") from err


def _templates(data: RunData):
    """The dashboard's template environment (what ``create_app`` sets up), for apps that do not pass theirs."""
    from fastapi.templating import Jinja2Templates

    from saeforge import __version__
    from saeforge.web.app import HERE, example_html, fmt, show_token

    templates = Jinja2Templates(directory=HERE / "templates")
    templates.env.filters["fmt"] = fmt
    templates.env.filters["tok"] = show_token
    templates.env.globals.update(run_name=data.path.name, version=__version__, default_sae=data.default_sae,
                                 example_html=example_html)
    return templates


def register_hierarchy_routes(app, data: RunData, templates=None) -> HierarchyPages:
    """Add the tree and module pages (and their JSON endpoints) to the dashboard's FastAPI ``app``; ``templates``:
    the app's Jinja2Templates (default: one set up as ``create_app`` does)."""
    pages = HierarchyPages(data)
    templates = templates or _templates(data)

    @app.get("/api/hierarchy")
    def api_hierarchy() -> JSONResponse:
        return JSONResponse(finite_json(pages.index()))

    @app.get("/api/hierarchy/{tree}")
    def api_tree(tree: str, level: int = 0, offset: int = 0, limit: int = 20, order: str = "children"
                 ) -> JSONResponse:
        return JSONResponse(finite_json(pages.tree(tree, level=level, offset=offset, limit=limit, order=order)))

    @app.get("/api/modules/{name}")
    def api_modules(name: str) -> JSONResponse:
        return JSONResponse(finite_json(pages.modules(name)))

    @app.get("/hierarchy", response_class=HTMLResponse)
    def hierarchy_index(request: Request):
        return templates.TemplateResponse(request, "hierarchy_index.html", {"index": pages.index()})

    @app.get("/hierarchy/{tree}", response_class=HTMLResponse)
    def hierarchy_tree(request: Request, tree: str, level: int = 0, offset: int = 0, limit: int = 20,
                       order: str = "children"):
        view = pages.tree(tree, level=level, offset=offset, limit=limit, order=order)
        return templates.TemplateResponse(request, "hierarchy_tree.html", {"t": view, "orders": TREE_ORDERS})

    @app.get("/modules/{name}", response_class=HTMLResponse)
    def modules_page(request: Request, name: str):
        return templates.TemplateResponse(request, "modules.html", {"m": pages.modules(name)})

    return pages
