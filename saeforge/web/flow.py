"""The flow-graph page of the dashboard: ``/flow?feature=layers.L.resid_post:IDX`` draws the feature's flow graph
(arXiv 2502.03032; docs/flow.md) as an SVG whose nodes link to their feature pages; ``/api/flow?feature=...`` gives
the graph as JSON. The served run directory must be a suite (one SAE per flow site).

Registered by :func:`register_flow_routes` (``create_app`` calls it; any FastAPI app of a run can).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.templating import Jinja2Templates

from saeforge.errors import SaeforgeError

HERE = Path(__file__).parent
COL_W, ROW_H, BOX_W, BOX_H = 210, 78, 180, 56
ROWS = {"mlp_out": 0, "resid_post": 1, "attn_out": 2}


def layout(graph) -> dict[str, Any]:
    """Node boxes and edge lines for the SVG: a column per layer, a band per site kind (MLP, residual, attention);
    several nodes of one layer and kind stack inside their band."""
    lo, hi = graph.span
    cells: dict[tuple[int, str], list] = {}
    for n in graph.nodes:
        cells.setdefault((n.layer, n.kind), []).append(n)
    band = {k: max([len(v) for (_, kk), v in cells.items() if kk == k] or [1]) for k in ROWS}
    top = {"mlp_out": 40}
    top["resid_post"] = top["mlp_out"] + band["mlp_out"] * ROW_H + 20
    top["attn_out"] = top["resid_post"] + band["resid_post"] * ROW_H + 20
    boxes = []
    pos = {}
    for (layer, kind), ns in cells.items():
        for i, n in enumerate(ns):
            x = 20 + (layer - lo) * COL_W
            y = top[kind] + i * ROW_H
            pos[n.id] = (x, y)
            boxes.append({"node": n, "x": x, "y": y, "w": BOX_W, "h": BOX_H,
                          "href": f"/saes/{n.site}/features/{n.idx}",
                          "title": f"{n.layer}/{n.kind}/{n.idx}",
                          "text": (n.explanation or ", ".join(repr(t) for t in n.top_tokens[:3]) or "")[:34]})
    lines = []
    for e in graph.edges:
        (x0, y0), (x1, y1) = pos[e.src], pos[e.dst]
        same_col = x0 == x1
        lines.append({"edge": e, "x0": x0 + (BOX_W / 2 if same_col else BOX_W), "y0": y0 + (BOX_H if y0 < y1 else 0)
                      if same_col else y0 + BOX_H / 2, "x1": x1 + (BOX_W / 2 if same_col else 0),
                      "y1": (y1 if y0 < y1 else y1 + BOX_H) if same_col else y1 + BOX_H / 2,
                      "width": 1 + 4 * max(e.weight, 0)})
    for ln in lines:
        ln["mx"], ln["my"] = (ln["x0"] + ln["x1"]) / 2, (ln["y0"] + ln["y1"]) / 2
    return {"boxes": boxes, "lines": lines, "width": 40 + (hi - lo) * COL_W + BOX_W,
            "height": top["attn_out"] + band["attn_out"] * ROW_H + 20,
            "layers": [{"layer": L, "x": 20 + (L - lo) * COL_W + BOX_W / 2} for L in range(lo, hi + 1)]}


def register_flow_routes(app: FastAPI) -> None:
    """Add ``/flow`` and ``/api/flow`` to a dashboard app made by ``create_app`` (it reads ``app.state.data``)."""
    from saeforge import __version__
    from saeforge.web.data import WebError

    data = app.state.data
    templates = Jinja2Templates(directory=HERE / "templates")
    templates.env.globals.update(run_name=data.path.name, version=__version__, default_sae=data.default_sae)
    cache: dict[str, Any] = {}

    def suite():
        if "suite" not in cache:
            from saeforge.flow.suite import open_suite

            try:
                cache["suite"] = open_suite(data.path)
            except SaeforgeError as err:
                raise WebError(400, f"this run is not a flow suite: {err.problem}", err.fix) from err
        return cache["suite"]

    def graph_for(feature: str, residual_threshold: float, module_threshold: float):
        from saeforge.flow.graph import build_flow_graph

        try:
            return build_flow_graph(suite(), feature, residual_threshold=residual_threshold,
                                    module_threshold=module_threshold)
        except SaeforgeError as err:
            raise WebError(400, err.problem, err.fix) from err

    def default_feature() -> str:
        s = suite()
        layers = s.analysable_layers() or s.layers
        mid = layers[len(layers) // 2]
        return f"layers.{mid}.resid_post:0" if s.has(mid, "resid_post") else ""

    @app.get("/api/flow")
    def api_flow(feature: str, residual_threshold: float = 0.5, module_threshold: float = 0.15) -> JSONResponse:
        return JSONResponse(graph_for(feature, residual_threshold, module_threshold).to_dict())

    @app.get("/flow", response_class=HTMLResponse)
    def flow_page(request: Request, feature: str = "", residual_threshold: float = 0.5,
                  module_threshold: float = 0.15):
        from saeforge.flow.graph import empty_graph_message

        feature = feature or default_feature()
        graph = graph_for(feature, residual_threshold, module_threshold) if feature else None
        ctx = {"feature": feature, "residual_threshold": residual_threshold, "module_threshold": module_threshold,
               "graph": graph, "empty": empty_graph_message(graph) if graph is not None and graph.is_empty else "",
               "svg": layout(graph) if graph is not None else None, "layers": suite().layers}
        return templates.TemplateResponse(request, "flow.html", ctx)
