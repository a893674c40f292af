"""Flow graphs: where a residual feature comes from and where it goes, layer by layer (arXiv 2502.03032, §4).

Short-range top-1 matches are composed across layers. From the target feature r_L of R_L:

- backward: its best match in R_{L-1} continues the graph while s^(R) ≥ ``residual_threshold`` (the paper's 0.5);
- forward: the features of R_{L+1} whose best match in R_L is r_L with s^(R) ≥ ``residual_threshold`` continue it
  (several may; at most ``max_branch`` per node, the most similar first);
- at every residual node r_l, its best matches in M_l and A_l join as module nodes when their similarity is
  ≥ ``module_threshold`` (the paper's 0.15).

Nodes carry the store's explanation and top tokens when the suite has been harvested (``saeforge harvest SUITE``).
"""

from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from simple_parsing.helpers import field as cli_field

from saeforge.errors import SaeforgeError
from saeforge.flow.matching import check_threshold, unit_rows
from saeforge.flow.suite import KIND_LETTER, Suite, parse_site, site_name

RESIDUAL_THRESHOLD = 0.5
MODULE_THRESHOLD = 0.15


@dataclass
class FlowNode:
    id: str  # "layers.12.resid_post:123"
    site: str
    layer: int
    kind: str
    idx: int
    role: str  # target, backward, forward, module
    explanation: str | None = None
    top_tokens: list[str] = field(default_factory=list)
    density: float | None = None


@dataclass
class FlowEdge:
    src: str
    dst: str
    weight: float
    kind: str  # R, M or A: the site of src


@dataclass
class FlowGraph:
    target: str
    nodes: list[FlowNode]
    edges: list[FlowEdge]
    residual_threshold: float
    module_threshold: float
    best: dict[str, float]  # the target's best similarities (R_prev, R_next, M, A), for an empty graph's message

    @property
    def is_empty(self) -> bool:
        return not self.edges

    @property
    def span(self) -> tuple[int, int]:
        layers = [n.layer for n in self.nodes if n.kind == "resid_post"]
        return min(layers), max(layers)

    def residual_chain(self) -> dict[int, list[FlowNode]]:
        """Residual nodes by layer (the layers a multi-layer intervention acts on)."""
        out: dict[int, list[FlowNode]] = {}
        for n in self.nodes:
            if n.kind == "resid_post":
                out.setdefault(n.layer, []).append(n)
        return dict(sorted(out.items()))

    def to_dict(self) -> dict[str, Any]:
        return {"schema": "saeforge-flow-graph", "target": self.target, "span": list(self.span),
                "residual_threshold": self.residual_threshold, "module_threshold": self.module_threshold,
                "best": self.best, "nodes": [asdict(n) for n in self.nodes], "edges": [asdict(e) for e in self.edges]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def label(self, n: FlowNode) -> str:
        head = f"{n.layer}/{KIND_LETTER[n.kind]}/{n.idx}"
        text = n.explanation or (", ".join(repr(t) for t in n.top_tokens[:3]) if n.top_tokens else "")
        return f"{head}\n{text[:40]}" if text else head

    def to_dot(self) -> str:
        """Graphviz DOT: layers left to right, residual nodes as boxes, MLP ellipses, attention diamonds."""
        shape = {"resid_post": "box", "mlp_out": "ellipse", "attn_out": "diamond"}
        lines = ["digraph flow {", "  rankdir=LR;", '  node [fontname="Helvetica", fontsize=10];']
        for n in self.nodes:
            style = ', style="filled,bold", fillcolor="#ffe08a"' if n.role == "target" else ""
            label = self.label(n).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
            lines.append(f'  "{n.id}" [label="{label}", shape={shape[n.kind]}{style}];')
        for e in self.edges:
            lines.append(f'  "{e.src}" -> "{e.dst}" [label="{e.weight:.2f}", penwidth={1 + 3 * max(e.weight, 0):.2f}];')
        lines.append("}")
        return "\n".join(lines) + "\n"

    def render(self, path: str | Path) -> Path:
        """Draw the graph with matplotlib (SVG or PNG by the suffix): x = layer, rows = attention / residual / MLP."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path)
        pos: dict[str, tuple[float, float]] = {}
        row = {"mlp_out": 1.0, "resid_post": 0.0, "attn_out": -1.0}
        by_cell: dict[tuple[int, str], list[FlowNode]] = {}
        for n in self.nodes:
            by_cell.setdefault((n.layer, n.kind), []).append(n)
        for (layer, kind), ns in by_cell.items():
            for i, n in enumerate(ns):
                x = layer + (0.5 if kind != "resid_post" else 0.0) * (-1 if kind == "attn_out" else 1) * 0.3
                pos[n.id] = (x, row[kind] + (i - (len(ns) - 1) / 2) * 0.45)
        lo, hi = self.span
        fig, ax = plt.subplots(figsize=(max(6.0, 2.2 * (hi - lo + 1)), 5.0))
        colors = {"resid_post": "#cfe3ff", "mlp_out": "#d6f5d6", "attn_out": "#ffd9cc"}
        for e in self.edges:
            (x0, y0), (x1, y1) = pos[e.src], pos[e.dst]
            ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                        arrowprops=dict(arrowstyle="-|>", lw=0.8 + 3 * max(e.weight, 0), color="#555",
                                        shrinkA=28, shrinkB=28, alpha=0.8))
            ax.text((x0 + x1) / 2, (y0 + y1) / 2, f"{e.weight:.2f}", fontsize=7, ha="center", va="center",
                    color="#333", bbox=dict(boxstyle="round,pad=0.1", fc="white", ec="none", alpha=0.8))
        for n in self.nodes:
            x, y = pos[n.id]
            ax.text(x, y, self.label(n), ha="center", va="center", fontsize=7,
                    bbox=dict(boxstyle="round,pad=0.3", fc="#ffe08a" if n.role == "target" else colors[n.kind],
                              ec="#333", lw=1.5 if n.role == "target" else 0.6))
        ax.set_xlim(lo - 0.8, hi + 0.8)
        ax.set_ylim(-1.8, 1.8)
        ax.set_yticks([1, 0, -1], ["MLP", "residual", "attention"])
        ax.set_xticks(range(lo, hi + 1))
        ax.set_xlabel("layer")
        ax.set_title(f"flow graph of {self.target} (t_R {self.residual_threshold}, t_module {self.module_threshold})",
                     fontsize=10)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{path.name}")
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "svg", dpi=130)
        plt.close(fig)
        tmp.replace(path)
        return path


def parse_feature(spec: str) -> tuple[str, int]:
    """``layers.12.resid_post:123`` → (site, 123)."""
    site, sep, idx = spec.rpartition(":")
    if not sep or not idx.strip().isdigit() or parse_site(site) is None:
        raise SaeforgeError(f"cannot read the feature {spec!r}", "write it as layers.L.resid_post:INDEX, e.g. "
                            "--feature layers.12.resid_post:123")
    return site, int(idx)


class _Decoders:
    """Unit decoder rows per site, computed once per graph."""

    def __init__(self, suite: Suite):
        self.suite = suite
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, site: str) -> torch.Tensor:
        if site not in self.cache:
            self.cache[site] = unit_rows(self.suite.get(site).sae.W_dec)
        return self.cache[site]


def build_flow_graph(suite: Suite, feature: str, *, residual_threshold: float = RESIDUAL_THRESHOLD,
                     module_threshold: float = MODULE_THRESHOLD, max_branch: int = 3, backward: bool = True,
                     forward: bool = True, annotate: bool = True) -> FlowGraph:
    """The flow graph of ``feature`` (``layers.L.resid_post:IDX``) across the layers the suite holds."""
    check_threshold(residual_threshold, "residual_threshold")
    check_threshold(module_threshold, "module_threshold")
    site, idx = parse_feature(feature)
    layer, kind = parse_site(site)
    if kind != "resid_post":
        raise SaeforgeError(f"flow graphs start from a residual feature, not {site}",
                            f"pick a feature of layers.{layer}.resid_post")
    suite.get(site).check_feature(idx)
    dec = _Decoders(suite)
    nodes: dict[str, FlowNode] = {}
    edges: list[FlowEdge] = []
    best: dict[str, float] = {}

    def node(s: str, i: int, role: str) -> str:
        nid = f"{s}:{i}"
        if nid not in nodes:
            L, k = parse_site(s)
            nodes[nid] = FlowNode(nid, s, L, k, i, role)
        return nid

    def best_match(vec: torch.Tensor, s: str) -> tuple[int, float]:
        sims = dec(s) @ vec
        j = int(sims.argmax())
        return j, float(sims[j])

    def add_modules(L: int, i: int, nid: str) -> None:
        vec = dec(site_name(L, "resid_post"))[i]
        for k in ("mlp_out", "attn_out"):
            if suite.has(L, k):
                j, s = best_match(vec, site_name(L, k))
                if nid == target_id:
                    best[KIND_LETTER[k]] = s
                if s >= module_threshold:
                    edges.append(FlowEdge(node(site_name(L, k), j, "module"), nid, s, KIND_LETTER[k]))

    target_id = node(site, idx, "target")
    add_modules(layer, idx, target_id)
    if backward:
        L, i, nid = layer, idx, target_id
        while suite.has(L - 1, "resid_post"):
            j, s = best_match(dec(site_name(L, "resid_post"))[i], site_name(L - 1, "resid_post"))
            if nid == target_id:
                best["R_prev"] = s
            if s < residual_threshold:
                break
            prev = node(site_name(L - 1, "resid_post"), j, "backward")
            edges.append(FlowEdge(prev, nid, s, "R"))
            L, i, nid = L - 1, j, prev
            add_modules(L, i, nid)
    if forward:
        frontier = [(layer, idx, target_id)]
        while frontier:
            nxt = []
            for L, i, nid in frontier:
                if not suite.has(L + 1, "resid_post"):
                    continue
                here, later = site_name(L, "resid_post"), site_name(L + 1, "resid_post")
                sims = dec(later) @ dec(here)[i]
                if nid == target_id:
                    best["R_next"] = float(sims.max())
                cand = torch.nonzero(sims >= residual_threshold).flatten()
                cand = cand[sims[cand].argsort(descending=True)]
                taken = 0
                for j in cand.tolist():
                    back = dec(here) @ dec(later)[j]  # is r_L the best predecessor of this feature?
                    if int(back.argmax()) != i:
                        continue
                    succ = node(later, j, "forward")
                    edges.append(FlowEdge(nid, succ, float(sims[j]), "R"))
                    add_modules(L + 1, j, succ)
                    nxt.append((L + 1, j, succ))
                    taken += 1
                    if taken >= max_branch:
                        break
            frontier = nxt
    graph = FlowGraph(feature, list(nodes.values()), edges, residual_threshold, module_threshold, best)
    if annotate:
        annotate_from_store(graph, suite.path)
    return graph


def annotate_from_store(graph: FlowGraph, suite_path: Path) -> None:
    """Explanations, top tokens and densities from the suite's feature store, when there is one."""
    from saeforge.features.store import STORE_FILE, FeatureStore

    path = Path(suite_path) / STORE_FILE
    if not path.is_file():
        return
    with FeatureStore(path, readonly=True) as store:
        names = {s["name"] for s in store.saes()}
        for n in graph.nodes:
            if n.site not in names:
                continue
            try:
                row = store.feature(n.site, n.idx, with_examples=False)
            except SaeforgeError:
                continue
            n.explanation = row.get("explanation")
            n.top_tokens = [t["token"] if isinstance(t, dict) else str(t[0] if isinstance(t, list) else t)
                            for t in (row.get("top_tokens") or [])][:5]
            n.density = row.get("density")


def empty_graph_message(graph: FlowGraph) -> str:
    b = graph.best
    parts = [f"s^(R) to the layer before {b['R_prev']:.2f}" if "R_prev" in b else None,
             f"to the layer after {b['R_next']:.2f}" if "R_next" in b else None,
             f"s^(M) {b['M']:.2f}" if "M" in b else None, f"s^(A) {b['A']:.2f}" if "A" in b else None]
    return (f"the flow graph of {graph.target} is empty: no match reaches the thresholds (residual "
            f"{graph.residual_threshold}, module {graph.module_threshold}); best similarities: "
            + ", ".join(p for p in parts if p))


# ---------------------------------------------------------------------------------------------------- command
@dataclass(frozen=True)
class GraphConfig:
    """Draw the flow graph of a residual feature across the suite's layers: backward (where it comes from) and
    forward (where it goes), with MLP and attention features that feed each residual node. Writes JSON, Graphviz DOT,
    SVG and PNG."""

    suite: str = cli_field(default="", positional=True)
    """The suite (a run directory from saeforge flow suite, or an assembled suite folder)."""
    feature: str = ""
    """The target: layers.L.resid_post:INDEX."""
    residual_threshold: float = RESIDUAL_THRESHOLD
    """Cut the graph where the residual similarity s^(R) falls below this (the paper's 0.5)."""
    module_threshold: float = MODULE_THRESHOLD
    """Drop MLP/attention features whose similarity is below this (the paper's 0.15)."""
    max_branch: int = 3
    """Forward: follow at most this many successors of each residual node."""
    out: str = ""
    """Output folder; empty: SUITE/flow/graphs/. Files: <feature>.json, .dot, .svg, .png."""


def run_graph(cfg: GraphConfig) -> FlowGraph:
    from saeforge.flow.suite import open_suite
    from saeforge.utils.atomic import atomic_write_text

    if not cfg.feature:
        raise SaeforgeError("no feature given", "pass --feature layers.L.resid_post:INDEX")
    check_threshold(cfg.residual_threshold, "residual_threshold")
    check_threshold(cfg.module_threshold, "module_threshold")
    suite = open_suite(cfg.suite)
    graph = build_flow_graph(suite, cfg.feature, residual_threshold=cfg.residual_threshold,
                             module_threshold=cfg.module_threshold, max_branch=cfg.max_branch)
    if graph.is_empty:
        raise SaeforgeError(empty_graph_message(graph),
                            f"lower the thresholds, e.g. saeforge flow graph {cfg.suite} --feature {cfg.feature} "
                            "--residual-threshold 0.3 --module-threshold 0.1")
    out = Path(cfg.out) if cfg.out else Path(cfg.suite) / "flow" / "graphs"
    stem = cfg.feature.replace(":", "_")
    atomic_write_text(out / f"{stem}.json", graph.to_json())
    atomic_write_text(out / f"{stem}.dot", graph.to_dot())
    graph.render(out / f"{stem}.svg")
    graph.render(out / f"{stem}.png")
    lo, hi = graph.span
    print(f"flow graph of {cfg.feature}: layers {lo}..{hi}, {len(graph.nodes)} nodes, {len(graph.edges)} edges")
    for e in sorted(graph.edges, key=lambda e: (parse_site(e.dst.split(":")[0])[0], e.kind)):
        n = next(n for n in graph.nodes if n.id == e.src)
        note = f"  {html.unescape(n.explanation)}" if n.explanation else (
            f"  tokens {n.top_tokens[:3]}" if n.top_tokens else "")
        print(f"  {e.src:<28} → {e.dst:<28} {e.kind} {e.weight:.2f}{note}")
    print(f"written: {out / stem}.json, .dot, .svg, .png")
    return graph
