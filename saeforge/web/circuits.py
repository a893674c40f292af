"""Dashboard pages of the circuits a run holds (``saeforge circuit find`` writes ``RUN/circuits/TASK/circuit.json``).

``/circuits``               the run's circuits with their size and faithfulness   ``GET /api/circuits``
``/circuits/{name}``        one circuit drawn as a graph                          ``GET /api/circuits/{name}``

The graph has one row per site, earliest at the bottom and the metric (the logit difference) on top; a row shows the
site's nodes with the largest |effect| (the error node always), boxes coloured by the sign of the effect, edges as
lines whose width is |effect| and colour its sign. A feature node links to its feature page when the run holds an
SAE of that site's name, and carries its explanation or top tokens from the feature store on hover and in the box.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse

from saeforge.errors import SaeforgeError
from saeforge.web.data import RunData, WebError
from saeforge.web.render import finite_json

__all__ = ["CircuitPages", "register_circuit_routes"]

MAX_NODES_PER_SITE = 10
BOX_W, BOX_H, GAP, ROW_H, LEFT, TOP = 150, 48, 14, 96, 190, 30
POSITIVE, NEGATIVE = "#dbeafe", "#fee2e2"  # an effect that helps the metric, one that hurts it


class CircuitPages:
    """The circuits of one run directory, as plain dicts for the routes."""

    def __init__(self, data: RunData):
        self.data = data

    def files(self) -> dict[str, Path]:
        folder = self.data.path / "circuits"
        if not folder.is_dir():
            return {}
        return {p.parent.name: p for p in sorted(folder.glob("*/circuit.json"))}

    def _load(self, name: str):
        import json

        from saeforge.circuits.circuit import Circuit

        path = self.files().get(name)
        if path is None:  # only names the folder lists: no path from the request ever reaches the disk
            raise WebError(404, f"no circuit named {name!r} in this run",
                           "the run's circuits are listed at /circuits; make one with saeforge circuit find RUN "
                           "--task TASK")
        try:
            return Circuit.from_json(json.loads(path.read_text()), where=str(path))
        except (ValueError, KeyError, TypeError) as err:
            raise WebError(500, f"{path} cannot be read as a circuit: {err}", "write it again with saeforge "
                           "circuit find") from err
        except SaeforgeError as err:
            raise WebError(500, err.problem, err.fix) from err

    def index(self) -> list[dict[str, Any]]:
        out = []
        for name in self.files():
            try:
                c = self._load(name)
            except WebError as err:  # one damaged file does not hide the others
                out.append({"name": name, "error": err.problem})
                continue
            out.append({"name": name, "task": c.task, "nodes": c.size, "features": c.n_features, "edges": len(c.edges),
                        "sites": c.sites, **{k: c.evaluation.get(k) for k in
                                             ("faithfulness", "completeness", "random_faithfulness_mean")}})
        return out

    def circuit(self, name: str) -> dict[str, Any]:
        return self._load(name).to_json()

    def _labels(self, circuit) -> dict[tuple[str, int], str]:
        if not self.data.has_store:
            return {}
        store = self.data.store()
        names = {s["name"] for s in store.saes()}
        labels = {}
        for site in circuit.sites:
            if site not in names:
                continue
            idxs = [i for i in circuit.nodes.get(site, []) if i != circuit.d_sae[site]]
            for i, f in store.brief_features(site, idxs).items():
                tokens = " ".join(repr(t[0] if isinstance(t, (list, tuple)) else t) for t in f["top_tokens"][:3])
                labels[(site, i)] = f["explanation"] or (f"top tokens {tokens}" if tokens else "")
        return labels

    def layout(self, name: str) -> dict[str, Any]:
        """Boxes, lines and row labels of the circuit's graph (SVG coordinates)."""
        c = self._load(name)
        labels = self._labels(c)
        saes = set(self.data.sae_folders)
        shown: dict[str, list[tuple[int, float]]] = {}
        hidden: dict[str, int] = {}
        for s in c.sites:
            pairs = sorted(zip(c.nodes.get(s, []), c.node_effects.get(s, [])), key=lambda p: -abs(p[1]))
            keep = pairs[:MAX_NODES_PER_SITE]
            err = [p for p in pairs[MAX_NODES_PER_SITE:] if p[0] == c.d_sae[s]]
            shown[s] = keep + err
            hidden[s] = len(pairs) - len(shown[s])
        sites = [s for s in c.sites if shown[s]]
        widest = max([len(v) for v in shown.values()] + [1])
        scale = max([abs(e) for v in shown.values() for _, e in v] + [1e-12])
        boxes, where = [], {}
        rows = []
        for r, s in enumerate(reversed(sites)):  # the latest site just under the metric
            y = TOP + (r + 1) * ROW_H
            rows.append({"site": s, "y": y + BOX_H / 2 + 4, "hidden": hidden[s]})
            for j, (i, e) in enumerate(shown[s]):
                x = LEFT + j * (BOX_W + GAP)
                error = i == c.d_sae[s]
                label = labels.get((s, i), "")
                boxes.append({"x": x, "y": y, "w": BOX_W, "h": BOX_H, "site": s, "node": "error" if error else i,
                              "title": "error" if error else f"#{i}", "effect": e, "label": label,
                              "text": (label[:24] + "…") if len(label) > 25 else label,
                              "fill": POSITIVE if e >= 0 else NEGATIVE, "opacity": 0.35 + 0.65 * abs(e) / scale,
                              "href": None if error or s not in saes else f"/saes/{s}/features/{i}"})
                where[(s, i)] = (x + BOX_W / 2, y)
        metric = (LEFT + (widest * (BOX_W + GAP) - GAP) / 2, TOP + 18)
        lines = []
        edge_scale = max([abs(e["effect"]) for e in c.edges] + [1e-12])
        for e in c.edges:
            src = (e["from"][0], c.d_sae[e["from"][0]] if e["from"][1] == "error" else int(e["from"][1]))
            if src not in where:
                continue
            if e["to"][0] == "logits":
                end = metric
            else:
                dst = (e["to"][0], c.d_sae[e["to"][0]] if e["to"][1] == "error" else int(e["to"][1]))
                if dst not in where:
                    continue
                end = (where[dst][0], where[dst][1] + BOX_H)
            lines.append({"x0": where[src][0], "y0": where[src][1], "x1": end[0], "y1": end[1],
                          "effect": e["effect"], "width": 0.5 + 3.5 * abs(e["effect"]) / edge_scale,
                          "colour": "#1f77b4" if e["effect"] > 0 else "#d62728"})
        return {"circuit": c, "boxes": boxes, "lines": lines, "rows": rows, "metric": metric,
                "width": LEFT + widest * (BOX_W + GAP) + 20, "height": TOP + (len(sites) + 1) * ROW_H + 20}


def register_circuit_routes(app: FastAPI, data: RunData, templates) -> CircuitPages:
    """Add the circuit pages and their JSON endpoints to the dashboard's FastAPI ``app``."""
    pages = CircuitPages(data)

    @app.get("/api/circuits")
    def api_circuits() -> JSONResponse:
        return JSONResponse(finite_json(pages.index()))

    @app.get("/api/circuits/{name}")
    def api_circuit(name: str) -> JSONResponse:
        return JSONResponse(finite_json(pages.circuit(name)))

    @app.get("/circuits", response_class=HTMLResponse)
    def circuits_page(request: Request):
        return templates.TemplateResponse(request, "circuits.html", {"circuits": pages.index(), "graph": None})

    @app.get("/circuits/{name}", response_class=HTMLResponse)
    def circuit_page(request: Request, name: str):
        return templates.TemplateResponse(request, "circuits.html", {"circuits": None, "graph": pages.layout(name),
                                                                     "name": name})

    return pages
