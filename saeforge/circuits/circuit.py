"""Circuits: the nodes and edges above thresholds, and how much of the model's behaviour they carry.

**Extraction** (Marks et al., arXiv 2403.19647): the nodes whose |effect| (summed over positions, averaged over
pairs) is at least the node threshold T_N (or the ``top`` largest), and among them the edges whose |effect| is at
least the edge threshold T_E; the nodes of the last site are joined to the metric (``logits``) by their own effect.

**Evaluation under mean ablation**: every node outside the circuit takes its mean over the corrupt prompts (per
position), while the nodes inside are computed live from the ablated forward, site after site:

    faithfulness(C) = (m(C) − m(∅)) / (m(M) − m(∅))

with m(M) the model (nothing ablated; the splice is exact) and m(∅) every node ablated. Completeness is the
faithfulness of the complement M∖C (near 0 when the circuit holds everything that matters). The control is random
circuits with as many features at each site, drawn among the features active on the task, and the same error nodes.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from saeforge.circuits.attribution import CircuitSAE, NodeEffects, _encode, read_nodes
from saeforge.circuits.tasks import EncodedTask
from saeforge.errors import SaeforgeError

LOGITS = "logits"


@dataclass
class Circuit:
    """Nodes ``{site: [index]}`` (index ``d_sae`` is the site's error node) with their effects, and edges."""

    task: str
    sites: list[str]
    d_sae: dict[str, int]
    nodes: dict[str, list[int]]
    node_effects: dict[str, list[float]]
    edges: list[dict[str, Any]] = field(default_factory=list)
    """``{"from": [site, node], "to": [site, node] or ["logits", 0], "effect": float}`` (summed over positions)."""
    position_edges: list[dict[str, Any]] = field(default_factory=list)
    """Per-position edges, when computed: ``{"from": [site, node, position], "to": [site, node, position],
    "effect": float}``; they sum over positions to ``edges``."""
    settings: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return sum(len(v) for v in self.nodes.values())

    @property
    def n_features(self) -> int:
        return sum(sum(1 for i in v if i != self.d_sae[s]) for s, v in self.nodes.items())

    def node_name(self, site: str, index: int) -> str:
        return f"{site}/{'error' if index == self.d_sae[site] else index}"

    def mask(self, site: str) -> torch.Tensor:
        """``[d_sae + 1]`` bool: the site's nodes in the circuit."""
        m = torch.zeros(self.d_sae[site] + 1, dtype=torch.bool)
        m[self.nodes.get(site, [])] = True
        return m

    def to_json(self) -> dict[str, Any]:
        return {"format": "saeforge-circuit", "version": 1, "task": self.task, "sites": self.sites,
                "d_sae": self.d_sae, "settings": self.settings, "evaluation": self.evaluation,
                "nodes": [{"site": s, "node": "error" if i == self.d_sae[s] else i, "effect": e}
                          for s in self.sites for i, e in zip(self.nodes.get(s, []), self.node_effects.get(s, []))],
                "edges": self.edges} | ({"position_edges": self.position_edges} if self.position_edges else {})

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, where: str = "the circuit") -> "Circuit":
        if data.get("format") != "saeforge-circuit":
            raise SaeforgeError(f"{where} is not a saeforge circuit file", "give a circuit.json written by "
                                "saeforge circuit find")
        d_sae = {s: int(v) for s, v in data["d_sae"].items()}
        nodes: dict[str, list[int]] = {s: [] for s in data["sites"]}
        effects: dict[str, list[float]] = {s: [] for s in data["sites"]}
        for n in data["nodes"]:
            nodes[n["site"]].append(d_sae[n["site"]] if n["node"] == "error" else int(n["node"]))
            effects[n["site"]].append(float(n["effect"]))
        return cls(data["task"], list(data["sites"]), d_sae, nodes, effects, list(data["edges"]),
                   list(data.get("position_edges", [])), dict(data.get("settings", {})),
                   dict(data.get("evaluation", {})))

    def to_dot(self, *, max_label: int = 40, explanations: Mapping[tuple[str, int], str] | None = None) -> str:
        """Graphviz DOT: one rank per site, node colour by the sign of the effect, edge width by |effect|."""
        explanations = explanations or {}
        lines = ["digraph circuit {", "  rankdir=BT;", '  node [shape=box, style="rounded,filled", fontsize=10];',
                 f'  label="{_dot(self.task)}"; labelloc=t;']
        scale = max([abs(e) for v in self.node_effects.values() for e in v] or [1.0]) or 1.0
        for s in self.sites:
            if not self.nodes.get(s):
                continue
            lines.append(f'  subgraph "cluster_{s}" {{ label="{s}"; rank=same;')
            for i, e in zip(self.nodes[s], self.node_effects[s]):
                text = explanations.get((s, i), "")
                label = ("error" if i == self.d_sae[s] else f"#{i}") + (f"\\n{_dot(text[:max_label])}" if text else "")
                label += f"\\n{e:+.3g}"
                color = _colour(e / scale)
                shape = ', shape=ellipse' if i == self.d_sae[s] else ""
                lines.append(f'    "{self.node_name(s, i)}" [label="{label}", fillcolor="{color}"{shape}];')
            lines.append("  }")
        lines.append(f'  "{LOGITS}" [label="logit difference", shape=plaintext];')
        edge_scale = max([abs(e["effect"]) for e in self.edges] or [1.0]) or 1.0
        for e in self.edges:
            src = self.node_name(*e["from"])
            dst = LOGITS if e["to"][0] == LOGITS else self.node_name(*e["to"])
            width = 0.5 + 3.5 * abs(e["effect"]) / edge_scale
            color = "#1f77b4" if e["effect"] > 0 else "#d62728"
            lines.append(f'  "{src}" -> "{dst}" [penwidth={width:.2f}, color="{color}", '
                         f'tooltip="{e["effect"]:+.4g}"];')
        lines.append("}")
        return "\n".join(lines) + "\n"


def _dot(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")


def _colour(x: float) -> str:
    """White to blue (helps the clean answer) or red (hurts it) by the relative effect."""
    x = max(-1.0, min(1.0, x))
    t = int(255 - 155 * abs(x))
    return f"#{t:02x}{t:02x}ff" if x >= 0 else f"#ff{t:02x}{t:02x}"


# ------------------------------------------------------------------------------------------------- extraction
def select_nodes(effects: NodeEffects, *, threshold: float | None = None, top: int = 0,
                 errors: bool = True) -> dict[str, list[int]]:
    """The nodes with |effect| ≥ ``threshold``, or the ``top`` largest (error nodes left out with
    ``errors=False``)."""
    if (threshold is None) == (not top):
        raise SaeforgeError("give either a node threshold or a number of nodes", "pass --node-threshold 0.1 or "
                            "--top 50")
    chosen: dict[str, list[int]] = {s: [] for s in effects.sites}
    ranked = [r for r in effects.ranked() if errors or r[1] != effects.d_sae(r[0])]
    for site, i, e in ranked[:top] if top else ranked:
        if top or abs(e) >= threshold:
            chosen[site].append(i)
    return {s: sorted(v) for s, v in chosen.items()}


def build_circuit(effects: NodeEffects, nodes: dict[str, list[int]], edges: Mapping[tuple[str, str], torch.Tensor]
                  | None = None, *, edge_threshold: float = 0.0, settings: Mapping[str, Any] | None = None
                  ) -> Circuit:
    """A :class:`Circuit` of ``nodes`` with the edges (from :func:`~saeforge.circuits.edges.attribute_edges` over
    the same nodes) whose |effect| ≥ ``edge_threshold``; per-position edges (4-d weights) are kept in
    ``position_edges`` by the same threshold, and their sums over positions in ``edges``."""
    summed = {s: (v.sum(0) if v.dim() == 2 else v) for s, v in effects.effects.items()}
    circuit = Circuit(effects.task, list(effects.sites), {s: effects.d_sae(s) for s in effects.sites},
                      {s: list(v) for s, v in nodes.items()},
                      {s: [float(summed[s][i]) for i in v] for s, v in nodes.items()}, [], [], dict(settings or {}))
    for (up, down), weights in (edges or {}).items():
        if weights.dim() == 4:  # [down node, its position, up node, its position]
            for r, q, c, p in (weights.abs() >= max(edge_threshold, 1e-30)).nonzero().tolist():
                circuit.position_edges.append({"from": [up, nodes[up][c], p], "to": [down, nodes[down][r], q],
                                               "effect": float(weights[r, q, c, p])})
            weights = weights.double().sum((1, 3))
        for r, j in enumerate(nodes[down]):
            for c, i in enumerate(nodes[up]):
                w = float(weights[r, c])
                if abs(w) >= edge_threshold and w != 0.0:
                    circuit.edges.append({"from": [up, i], "to": [down, j], "effect": w})
    last = effects.sites[-1]
    for i, e in zip(circuit.nodes[last], circuit.node_effects[last]):
        circuit.edges.append({"from": [last, i], "to": [LOGITS, 0], "effect": e})
    return circuit


# ------------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def node_means(lm, enc: EncodedTask, saes: Sequence[CircuitSAE], *, batch_size: int = 32
               ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per position, the mean of every site's latents ``[T, d_sae]`` and error ``[T, d]`` over the corrupt
    prompts (over the prompts that reach that position)."""
    sums: dict[str, list[torch.Tensor]] = {}
    width = enc.clean_ids.shape[1]
    count = enc.attention_mask.sum(0).clamp(min=1).to(torch.float64)[:, None]
    for start in range(0, len(enc), batch_size):
        part = enc.rows(slice(start, start + batch_size))
        values = read_nodes(lm, part.corrupt_ids, part.attention_mask, saes).values
        m = part.attention_mask.to(lm.device)[..., None].double()
        for site, (f, e) in values.items():
            add = [(f.double() * m).sum(0), (e.double() * m).sum(0)]
            add = [torch.nn.functional.pad(a, (0, 0, 0, width - a.shape[0])) for a in add]
            sums[site] = add if site not in sums else [a + b for a, b in zip(sums[site], add)]
    return {s: ((f / count.to(f.device)).float(), (e / count.to(e.device)).float()) for s, (f, e) in sums.items()}


@torch.no_grad()
def ablated_metric(lm, enc: EncodedTask, saes: Sequence[CircuitSAE], keep_nodes: Mapping[str, torch.Tensor],
                   means: Mapping[str, tuple[torch.Tensor, torch.Tensor]], *, batch_size: int = 32,
                   blocks: Mapping[int, Any] | None = None) -> float:
    """Mean metric on the clean prompts with every node outside ``keep_nodes`` (``{site: [d_sae + 1] bool}``)
    mean-ablated and the nodes inside computed live. ``blocks`` (``{first row: BlockInput}`` of each batch, from
    :func:`clean_block_inputs`) skips the blocks before the first site."""
    from saeforge.models.suffix import skipping_blocks

    total = 0.0
    for start in range(0, len(enc), batch_size):
        part = enc.rows(slice(start, start + batch_size))
        keep = part.keep.to(lm.device)[..., None]
        width = part.clean_ids.shape[1]

        def edit_for(c: CircuitSAE):
            mask = keep_nodes[c.site].to(lm.device)
            mean_f, mean_e = (t[:width].to(lm.device) for t in means[c.site])

            def edit(x):
                f, e = _encode(c.sae, x)
                f = torch.where(mask[:-1], f, mean_f.to(f.dtype))
                e = e if bool(mask[-1]) else mean_e.to(e.dtype).expand_as(e)
                return torch.where(keep, c.sae.decode(f).to(x.dtype) + e, x)

            return edit

        skip = skipping_blocks(lm, blocks[start]) if blocks else contextlib.nullcontext()
        with skip, lm.edit({c.site: edit_for(c) for c in saes}):
            logits = lm.logits(part.clean_ids.to(lm.device), part.attention_mask.to(lm.device))
        total += float(part.metric(logits).double().sum())
    return total / len(enc)


@torch.no_grad()
def clean_block_inputs(lm, enc: EncodedTask, saes: Sequence[CircuitSAE], *, batch_size: int = 32) -> dict[int, Any]:
    """``{first row: BlockInput}``: the hidden states entering the first block any site needs, per batch of clean
    prompts, so that repeated ablation forwards run only the blocks from there on (saeforge.models.suffix)."""
    from saeforge.models.suffix import first_block, read_block_inputs

    start = first_block(lm, [c.site for c in saes])
    out = {}
    for row in range(0, len(enc), batch_size):
        part = enc.rows(slice(row, row + batch_size))
        inputs, _ = read_block_inputs(lm, part.clean_ids.to(lm.device), [start],
                                      attention_mask=part.attention_mask.to(lm.device))
        out[row] = inputs[start]
    return out


@dataclass
class Evaluator:
    """Faithfulness and completeness of node sets on one task, the means and the two ends computed once."""

    lm: Any
    enc: EncodedTask
    saes: Sequence[CircuitSAE]
    batch_size: int = 32

    def __post_init__(self) -> None:
        self.means = node_means(self.lm, self.enc, self.saes, batch_size=self.batch_size)
        self.blocks = clean_block_inputs(self.lm, self.enc, self.saes, batch_size=self.batch_size)
        every = {c.site: torch.ones(c.d_sae + 1, dtype=torch.bool) for c in self.saes}
        none = {c.site: torch.zeros(c.d_sae + 1, dtype=torch.bool) for c in self.saes}
        self.m_model = self.metric(every)
        self.m_empty = self.metric(none)
        if abs(self.m_model - self.m_empty) < 1e-6:
            raise SaeforgeError(f"ablating every node leaves the metric unchanged ({self.m_model:.4g}): faithfulness "
                                "is undefined", "check that the task's clean and corrupt prompts differ at the SAEs' "
                                "sites")
        self.active = self._active()

    def metric(self, keep_nodes: Mapping[str, torch.Tensor]) -> float:
        return ablated_metric(self.lm, self.enc, self.saes, keep_nodes, self.means, batch_size=self.batch_size,
                              blocks=self.blocks)

    def faithfulness(self, nodes: Mapping[str, Sequence[int]], *, complement: bool = False) -> float:
        masks = {}
        for c in self.saes:
            m = torch.zeros(c.d_sae + 1, dtype=torch.bool)
            m[list(nodes.get(c.site, []))] = True
            masks[c.site] = ~m if complement else m
        return (self.metric(masks) - self.m_empty) / (self.m_model - self.m_empty)

    @torch.no_grad()
    def _active(self) -> dict[str, torch.Tensor]:
        """Per site, the features that fire somewhere on the task's clean prompts (SAE-data positions)."""
        active: dict[str, torch.Tensor] = {}
        for start in range(0, len(self.enc), self.batch_size):
            part = self.enc.rows(slice(start, start + self.batch_size))
            values = read_nodes(self.lm, part.clean_ids, part.attention_mask, self.saes).values
            keep = part.keep.to(self.lm.device)[..., None]
            for site, (f, _) in values.items():
                fired = ((f != 0) & keep).any(1).any(0).cpu()
                active[site] = fired if site not in active else active[site] | fired
        return {s: v.nonzero().flatten() for s, v in active.items()}

    def random_like(self, nodes: Mapping[str, Sequence[int]], generator: torch.Generator) -> dict[str, list[int]]:
        """As many features per site as ``nodes``, drawn among the active ones, and the same error nodes."""
        out = {}
        for c in self.saes:
            chosen = list(nodes.get(c.site, []))
            n_features = sum(1 for i in chosen if i != c.d_sae)
            pool = self.active[c.site]
            pick = pool[torch.randperm(len(pool), generator=generator)[:n_features]].tolist()
            out[c.site] = sorted(pick + ([c.d_sae] if c.d_sae in chosen else []))
        return out

    def evaluate(self, nodes: Mapping[str, Sequence[int]], *, random_draws: int = 5, seed: int = 0
                 ) -> dict[str, Any]:
        """Faithfulness, completeness and the random control (mean and standard deviation over draws)."""
        g = torch.Generator().manual_seed(seed)
        randoms = [self.faithfulness(self.random_like(nodes, g)) for _ in range(random_draws)]
        r = torch.tensor(randoms, dtype=torch.float64) if randoms else torch.zeros(0)
        return {"nodes": sum(len(v) for v in nodes.values()),
                "features": sum(sum(1 for i in v if i != self.d_sae(s)) for s, v in nodes.items()),
                "faithfulness": self.faithfulness(nodes), "completeness": self.faithfulness(nodes, complement=True),
                "random_faithfulness_mean": float(r.mean()) if randoms else None,
                "random_faithfulness_std": float(r.std()) if len(randoms) > 1 else None,
                "m_model": self.m_model, "m_empty": self.m_empty}

    def d_sae(self, site: str) -> int:
        return next(c.d_sae for c in self.saes if c.site == site)


def faithfulness_curve(evaluator: Evaluator, effects: NodeEffects, sizes: Sequence[int], *, errors: bool = True,
                       random_draws: int = 3, seed: int = 0, progress: bool = False) -> list[dict[str, Any]]:
    """Faithfulness of the top-N nodes by |effect| for each N of ``sizes``, beside random circuits of equal size."""
    from saeforge.circuits.attribution import _bar

    rows = []
    bar = _bar(progress, len(sizes), "faithfulness curve")
    for n in sizes:
        nodes = select_nodes(effects, top=n, errors=errors)
        rows.append(evaluator.evaluate(nodes, random_draws=random_draws, seed=seed) | {"top": n})
        bar.update(1)
    bar.close()
    return rows


def plot_curve(rows: Sequence[Mapping[str, Any]], path: Path, *, title: str = "") -> Path:
    """Faithfulness against circuit size (features), with the random control and completeness."""
    return plot_faithfulness(path, [max(r["features"], 1) for r in rows],
                             [([r["faithfulness"] for r in rows], "o-", "circuit (top nodes by |effect|)"),
                              ([r["completeness"] for r in rows], "s--", "complement (completeness)")],
                             random=_random_band(rows, "random_faithfulness_mean", "random_faithfulness_std"),
                             lines_at=[(1.0, "", None), (0.0, "", None)], xlabel="features in the circuit",
                             title=title)


def _random_band(rows: Sequence[Mapping[str, Any]], mean: str, std: str):
    if not rows or rows[0].get(mean) is None:
        return None
    return [r[mean] for r in rows], [r[std] or 0.0 for r in rows]


def plot_faithfulness(path: Path, x: Sequence[float], curves: Sequence[tuple[Sequence[float], str, str]], *,
                      random: tuple[Sequence[float], Sequence[float]] | None = None,
                      lines_at: Sequence[tuple[float, str, str | None]] = (), xlabel: str, title: str = "") -> Path:
    """A PNG of faithfulness against circuit size (log x): ``curves`` (values, matplotlib style, label), the random
    control as mean ± standard deviation, horizontal ``lines_at`` (value, style, label), written atomically."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from saeforge.utils.atomic import atomic_write_bytes

    fig, ax = plt.subplots(figsize=(6, 4))
    for values, style, label in curves:
        ax.plot(x, values, style, label=label)
    if random is not None:
        mean, std = torch.tensor(random[0]), torch.tensor(random[1])
        ax.plot(x, mean, "^:", label="random features, same size")
        ax.fill_between(x, mean - std, mean + std, alpha=0.2)
    for value, style, label in lines_at:
        ax.axhline(value, color="grey", ls=style or "-", lw=1 if label else 0.5, label=label)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("faithfulness (mean ablation)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def write_circuit(circuit: Circuit, folder: Path, *,
                  explanations: Mapping[tuple[str, int], str] | None = None) -> dict[str, Path]:
    """``circuit.json`` and ``circuit.dot`` (features labelled with their ``explanations``) in ``folder``, written
    atomically."""
    from saeforge.utils.atomic import atomic_write_text

    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / "circuit.json", "dot": folder / "circuit.dot"}
    atomic_write_text(paths["json"], json.dumps(circuit.to_json(), indent=1) + "\n")
    atomic_write_text(paths["dot"], circuit.to_dot(explanations=explanations))
    return paths
