"""``saeforge circuit ...``: ``tasks`` (the built-in tasks and the model's accuracy on them) and ``find`` (node
attribution, edges, extraction, faithfulness; JSON, Graphviz DOT and a plot)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from simple_parsing.helpers import field

from saeforge.errors import SaeforgeError
from saeforge.flow.data import with_threads


@dataclass(frozen=True)
class TasksConfig:
    """List the built-in contrastive tasks (or check task files) and measure the model's accuracy on each: the share
    of pairs where it prefers the right answer on both prompts. A task it fails is not used for circuits."""

    tasks: tuple[str, ...] = ()
    """Built-in task names or task JSON files; empty: every built-in task."""
    model: str = "embedded"
    """The model whose accuracy to measure."""
    pairs: int = 32
    """Pairs per task (0: all of a file's pairs; built-in tasks make this many)."""
    out: str = ""
    """Write the accuracies to this JSON file as well."""
    device: str = "auto"
    """auto, cpu or cuda."""
    threads: int = 0
    """CPU threads for PyTorch; 0: automatic (fewer when other work keeps the CPUs busy)."""


def _task(name: str, pairs: int):
    from saeforge.circuits.tasks import BUILTIN_TASKS, load_task

    if name in BUILTIN_TASKS:
        return BUILTIN_TASKS[name](pairs or 32)
    return load_task(name).head(pairs)


@with_threads
def run_tasks(cfg: TasksConfig) -> list[dict[str, Any]]:
    from saeforge.circuits.tasks import BUILTIN_TASKS, encode_task, measure_task_accuracy
    from saeforge.models.language_model import LanguageModel
    from saeforge.utils.atomic import atomic_write_json

    tasks = [_task(t, cfg.pairs) for t in (cfg.tasks or tuple(BUILTIN_TASKS))]
    lm = LanguageModel.load(cfg.model, device=cfg.device)
    encoded = [encode_task(t, lm) for t in tasks]  # every file problem before any forward
    rows = []
    print(f"{'task':<18} {'pairs':>5} {'accuracy':>9} {'top-1':>6} {'clean LD':>9} {'corrupt LD':>10}  used")
    for task, enc in zip(tasks, encoded):
        acc = measure_task_accuracy(lm, enc)
        rows.append(acc.to_json() | {"description": task.description})
        print(f"{task.name:<18} {acc.pairs:>5} {acc.accuracy:>9.1%} {acc.top1:>6.1%} {acc.clean_logit_diff:>9.2f} "
              f"{acc.corrupt_logit_diff:>10.2f}  {'yes' if acc.solved else 'no (the model fails it)'}")
    if cfg.out:
        atomic_write_json(Path(cfg.out), {"model": cfg.model, "tasks": rows})
    return rows


@dataclass(frozen=True)
class FindConfig:
    """Find the sparse feature circuit of a task over a run's SAEs: node effects of every SAE latent and of one error
    node per site (attribution patching or integrated gradients), the nodes above a threshold, the edges between
    them, and their faithfulness and completeness under mean ablation beside random circuits of equal size. Writes
    circuit.json, circuit.dot (Graphviz), effects.json and faithfulness.png to OUT (default RUN/circuits/TASK)."""

    run: str = field(default="", positional=True)
    """The run directory (or folder of SAEs) whose SAEs are the nodes: SAEs on one site each."""
    task: str = "country-capital"
    """A built-in task (saeforge circuit tasks lists them) or a task JSON file (see docs/circuits.md)."""
    pairs: int = 32
    """Prompt pairs used (0: every pair of a task file)."""
    layers: str = ""
    """Keep the SAEs of these layers only, e.g. 11-13; empty: every SAE of the run."""
    min_accuracy: float = 0.8
    """Refuse a task the model gets less than this share of pairs right (it has no behaviour to explain)."""
    method: str = "ig"
    """Node attribution: atp (attribution patching, one backward) or ig (integrated gradients)."""
    steps: int = 10
    """Integrated-gradient steps per site."""
    node_threshold: float = 0.1
    """Keep nodes with |effect| ≥ this (in units of the logit difference, summed over positions)."""
    top: int = 0
    """Keep the TOP largest nodes instead of a threshold (0: use --node-threshold)."""
    errors: bool = True
    """Error nodes may enter the circuit (false: features only; error nodes are then mean-ablated too)."""
    edge_threshold: float = 0.01
    """Keep edges with |effect| ≥ this."""
    edges: bool = True
    """Compute edges between the circuit's nodes (one backward per node after the first site)."""
    per_position_edges: bool = False
    """Also keep the edges between nodes at each pair of token positions (position_edges in circuit.json; one
    backward per node and position; every prompt of the task must have the same number of tokens)."""
    evaluate: bool = True
    """Measure faithfulness, completeness and the random control."""
    random_draws: int = 5
    """Random circuits per size for the control."""
    curve: tuple[int, ...] = (5, 10, 20, 50, 100, 200, 500)
    """Circuit sizes (top nodes) of the faithfulness-against-size plot; empty: no plot."""
    out: str = ""
    """Output folder; empty: RUN/circuits/TASK."""
    model: str = ""
    """The model; empty: the one the SAEs name."""
    batch_size: int = 16
    """Prompt pairs per forward."""
    device: str = "auto"
    """auto, cpu or cuda."""
    threads: int = 0
    """CPU threads for PyTorch; 0: automatic (fewer when other work keeps the CPUs busy)."""
    progress: bool = True
    """Show progress bars."""


def _check(cfg: FindConfig) -> None:
    from saeforge.circuits.attribution import METHODS

    _check_run_and_layers(cfg, "find")
    if cfg.method not in METHODS:
        raise SaeforgeError(f"unknown method {cfg.method!r}", f"pass --method with one of {', '.join(METHODS)}")
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.pairs < 0 or cfg.top < 0 or cfg.random_draws < 0:
        raise SaeforgeError("--steps and --batch-size must be ≥ 1, --pairs, --top and --random-draws ≥ 0",
                            "saeforge circuit find RUN --steps 10 --batch-size 16")
    if cfg.node_threshold < 0 or cfg.edge_threshold < 0:
        raise SaeforgeError("thresholds must be ≥ 0", "pass --node-threshold 0.1 --edge-threshold 0.01")


def _check_run_and_layers(cfg, command: str) -> None:
    if not cfg.run:
        raise SaeforgeError("no run given", f"saeforge circuit {command} RUN_DIR --task country-capital")
    if cfg.layers:
        parse_layers(cfg.layers)


def parse_layers(text: str) -> tuple[int, int]:
    try:
        lo, _, hi = text.partition("-")
        lo, hi = int(lo), int(hi or lo)
    except ValueError:
        raise SaeforgeError(f"--layers {text!r} is not a layer range", "pass --layers 11-13 (or one layer: 12)")
    if lo > hi:
        raise SaeforgeError(f"--layers {text!r} runs backwards", f"pass --layers {hi}-{lo}")
    return lo, hi


def explanations(run_dir: Path, circuit) -> dict[tuple[str, int], str]:
    """Labels of the circuit's features from the run's feature store: the explanation, else the tokens the feature
    fires on most (none when the run has no store)."""
    from saeforge.features.store import FeatureStore

    path = run_dir / "features.sqlite"
    if not path.is_file():
        return {}
    out = {}
    try:
        with FeatureStore(path, readonly=True) as store:
            names = {s["site"]: s["name"] for s in store.saes()}
            for site, idxs in circuit.nodes.items():
                for i in idxs:
                    if i == circuit.d_sae[site] or site not in names:
                        continue
                    row = store.feature(names[site], i, with_examples=False)
                    top = ", ".join(str(t).strip() for t, _ in (row.get("top_tokens") or [])[:3])
                    text = row.get("explanation") or (f"top: {top}" if top else "")
                    if text:
                        out[(site, i)] = text
    except SaeforgeError:
        return {}
    return out


@with_threads
def run_find(cfg: FindConfig) -> dict[str, Any]:
    from saeforge.circuits.attribution import attribute_nodes
    from saeforge.circuits.circuit import (Evaluator, build_circuit, faithfulness_curve, plot_curve, select_nodes,
                                           write_circuit)
    from saeforge.circuits.edges import attribute_edges
    from saeforge.utils.atomic import atomic_write_text
    from saeforge.utils.locking import exclusive_lock

    _check(cfg)
    task, run, saes, enc, out = _setup(cfg)
    lm = run.lm
    if cfg.per_position_edges and cfg.edges:
        from saeforge.circuits.attribution import check_per_position

        check_per_position(enc, True)
    with exclusive_lock(out, "saeforge circuit find"):
        accuracy = _solved(lm, enc, cfg)
        times: dict[str, float] = {}
        t0 = time.perf_counter()
        effects = attribute_nodes(lm, enc, saes, method=cfg.method, steps=cfg.steps, batch_size=cfg.batch_size,
                                  progress=cfg.progress)
        times["nodes"] = time.perf_counter() - t0
        nodes = select_nodes(effects, threshold=None if cfg.top else cfg.node_threshold, top=cfg.top,
                             errors=cfg.errors)
        edges = None
        if cfg.edges:
            t0 = time.perf_counter()
            edges = attribute_edges(lm, enc, saes, nodes, per_position=cfg.per_position_edges,
                                    batch_size=cfg.batch_size, progress=cfg.progress)
            times["edges"] = time.perf_counter() - t0
        settings = {k: v for k, v in asdict(cfg).items() if k not in ("progress", "threads", "device")}
        circuit = build_circuit(effects, nodes, edges, edge_threshold=cfg.edge_threshold,
                                settings=settings | {"accuracy": accuracy.to_json()})
        print(f"circuit: {circuit.size} nodes ({circuit.n_features} features, "
              f"{circuit.size - circuit.n_features} error nodes), {len(circuit.edges)} edges"
              + (f" ({len(circuit.position_edges)} between positions)" if cfg.per_position_edges else ""))
        if cfg.evaluate:
            t0 = time.perf_counter()
            evaluator = Evaluator(lm, enc, saes, batch_size=cfg.batch_size)
            circuit.evaluation = evaluator.evaluate(nodes, random_draws=cfg.random_draws)
            ev = circuit.evaluation
            control = (f", random circuits {ev['random_faithfulness_mean']:.3f} ± "
                       f"{ev['random_faithfulness_std'] or 0:.3f}") if cfg.random_draws else ""
            print(f"faithfulness {ev['faithfulness']:.3f}, completeness {ev['completeness']:.3f}{control} "
                  f"(m(model) {ev['m_model']:.3f}, m(all ablated) {ev['m_empty']:.3f})")
            if cfg.curve:
                rows = faithfulness_curve(evaluator, effects, cfg.curve, errors=cfg.errors,
                                          random_draws=cfg.random_draws, progress=cfg.progress)
                circuit.evaluation["curve"] = rows
                plot_curve(rows, out / "faithfulness.png", title=f"{task.name}: {cfg.method}, "
                           f"{'with' if cfg.errors else 'without'} error nodes")
            times["evaluation"] = time.perf_counter() - t0
        circuit.settings["seconds"] = times
        paths = write_circuit(circuit, out, explanations=explanations(Path(cfg.run), circuit))
        atomic_write_text(out / "effects.json", json.dumps(effects.to_json(), indent=1) + "\n")
    print(f"wrote {paths['json']}, {paths['dot']}" + (f", {out / 'faithfulness.png'}" if cfg.evaluate and cfg.curve
                                                     else ""))
    return circuit.to_json()


@dataclass(frozen=True)
class LassoConfig:
    """CircuitLasso (arXiv 2606.16939): a circuit from L1-penalised regressions between the SAE codes of successive
    sites and from the last site to the metric, without interventions; its faithfulness under mean ablation beside
    the attribution-patching circuit with as many features and random circuits (every error node kept in all). The
    regressions between sites are fitted on the task's prompts, or with --cache on the tokens of an activation
    cache of the same sites (saeforge cache). Writes lasso.json and lasso/circuit.{json,dot} to OUT (default
    RUN/circuits/TASK)."""

    run: str = field(default="", positional=True)
    """The run directory (or folder of SAEs) whose SAEs are the nodes."""
    task: str = "country-capital"
    """A built-in task or a task JSON file."""
    pairs: int = 32
    """Prompt pairs used (0: every pair of a task file)."""
    layers: str = ""
    """Keep the SAEs of these layers only, e.g. 12-13; empty: every SAE of the run."""
    lam: float = 0.15
    """L1 penalty between sites (columns are standardised, so it means the same at every site)."""
    lam_metric: float = -1.0
    """L1 penalty of the regression on the metric; negative: --lam."""
    iters: int = 1000
    """FISTA iterations at most per regression."""
    cache: str = ""
    """Fit the regressions between sites on this activation cache (saeforge cache --sites with every SAE's site,
    same model) instead of the task's prompts; the regression on the metric stays on the task's prompts."""
    cache_tokens: int = 65_536
    """Tokens of the cache used (its first ones)."""
    compare: bool = True
    """Also measure faithfulness (and of attribution's circuit of the same size, and random circuits)."""
    random_draws: int = 3
    """Random circuits for the control."""
    min_accuracy: float = 0.8
    """Refuse a task the model gets less than this share of pairs right."""
    out: str = ""
    """Output folder; empty: RUN/circuits/TASK."""
    model: str = ""
    """The model; empty: the one the SAEs name."""
    batch_size: int = 16
    """Prompt pairs per forward."""
    device: str = "auto"
    """auto, cpu or cuda."""
    threads: int = 0
    """CPU threads for PyTorch; 0: automatic (fewer when other work keeps the CPUs busy)."""


def _setup(cfg):
    """(task, loaded run, SAEs, encoded task, output folder) of a find or lasso config, every check first."""
    from saeforge.circuits.attribution import circuit_saes
    from saeforge.circuits.tasks import encode_task
    from saeforge.data.prompts import PromptEncoder
    from saeforge.runs import load_run, site_position

    task = _task(cfg.task, cfg.pairs)
    run = load_run(cfg.run, model=cfg.model, device=cfg.device)
    saes = circuit_saes(run.lm, run.saes)
    if cfg.layers:
        lo, hi = parse_layers(cfg.layers)
        saes = [c for c in saes if lo <= site_position(c.site)[0] <= hi]
        if not saes:
            raise SaeforgeError(f"no SAE of the run is in layers {cfg.layers}", "pick --layers among the run's sites")
    enc = encode_task(task, run.lm, PromptEncoder(run.lm, run.token_policy()))
    out = Path(cfg.out) if cfg.out else Path(cfg.run) / "circuits" / task.name
    out.mkdir(parents=True, exist_ok=True)
    return task, run, saes, enc, out


def _solved(lm, enc, cfg):
    from saeforge.circuits.tasks import measure_task_accuracy

    accuracy = measure_task_accuracy(lm, enc, batch_size=cfg.batch_size)
    print(f"task {enc.task.name}: {len(enc)} pairs, accuracy {accuracy.accuracy:.1%}, clean logit difference "
          f"{accuracy.clean_logit_diff:.2f}, corrupt {accuracy.corrupt_logit_diff:.2f}")
    if accuracy.accuracy < cfg.min_accuracy:
        raise SaeforgeError(f"the model gets only {accuracy.accuracy:.0%} of task {enc.task.name!r} right: a circuit "
                            "of a behaviour the model does not have explains nothing",
                            "pick a task it solves (saeforge circuit tasks)")
    return accuracy


@with_threads
def run_lasso(cfg: LassoConfig) -> dict[str, Any]:
    from saeforge.circuits.attribution import attribute_nodes
    from saeforge.circuits.circuit import Evaluator, select_nodes, write_circuit
    from saeforge.circuits.lasso import lasso_circuit, overlap
    from saeforge.utils.atomic import atomic_write_json
    from saeforge.utils.locking import exclusive_lock

    _check_run_and_layers(cfg, "lasso")
    if cfg.lam < 0 or cfg.iters < 1 or cfg.batch_size < 1 or cfg.random_draws < 0 or cfg.cache_tokens < 2:
        raise SaeforgeError("--lam must be ≥ 0, --iters and --batch-size ≥ 1, --random-draws ≥ 0, --cache-tokens "
                            "≥ 2", "saeforge circuit lasso RUN --lam 0.15")
    cache = None
    if cfg.cache:
        from saeforge.data.activation_cache import ActivationCache

        cache = ActivationCache(cfg.cache)
    task, run, saes, enc, out = _setup(cfg)
    lm = run.lm
    if cache is not None:
        from saeforge.circuits.lasso import check_cache

        check_cache(cache, lm, saes)
    with exclusive_lock(out, "saeforge circuit lasso"):
        accuracy = _solved(lm, enc, cfg)
        lasso = lasso_circuit(lm, enc, saes, lam=cfg.lam, lam_metric=None if cfg.lam_metric < 0 else cfg.lam_metric,
                              iters=cfg.iters, batch_size=cfg.batch_size, cache=cache, cache_tokens=cfg.cache_tokens,
                              progress=True)
        n = sum(len(v) for v in lasso.nodes.values())
        print(f"CircuitLasso ({'the task' if cache is None else 'the cache'}, {lasso.tokens} tokens): {n} features "
              f"({', '.join(f'{s} {len(v)}' for s, v in lasso.nodes.items())}), {len(lasso.edges)} edges, "
              f"{lasso.seconds:.1f} s")
        result: dict[str, Any] = {"task": enc.task.name, "sites": [c.site for c in saes], "accuracy":
                                  accuracy.to_json(), "settings": {k: v for k, v in asdict(cfg).items()
                                                                   if k not in ("threads", "device")},
                                  "nodes": lasso.nodes, "to_metric": lasso.to_metric, "edges": lasso.edges,
                                  "seconds": lasso.seconds, "source": lasso.source, "tokens": lasso.tokens}
        if cfg.compare:
            t0 = time.perf_counter()
            effects = attribute_nodes(lm, enc, saes, method="atp", batch_size=cfg.batch_size)
            atp_seconds = time.perf_counter() - t0
            attribution = select_nodes(effects, top=n, errors=False) if n else {c.site: [] for c in saes}
            evaluator = Evaluator(lm, enc, saes, batch_size=cfg.batch_size)
            mine = evaluator.evaluate(lasso.with_error_nodes(saes), random_draws=cfg.random_draws)
            theirs = evaluator.evaluate({c.site: attribution[c.site] + [c.d_sae] for c in saes}, random_draws=0)
            result["comparison"] = {"lasso": mine, "attribution": theirs, "attribution_seconds": atp_seconds,
                                    "overlap": overlap(lasso.nodes, attribution)}
            print(f"faithfulness: CircuitLasso {mine['faithfulness']:.3f}, attribution (same size) "
                  f"{theirs['faithfulness']:.3f}, random {mine['random_faithfulness_mean'] or 0:.3f}; overlap "
                  f"(Jaccard) {result['comparison']['overlap']['jaccard']:.3f}")
        atomic_write_json(out / "lasso.json", result)
        circuit = lasso.to_circuit(saes, task.name, settings={"accuracy": accuracy.to_json(), "lam": cfg.lam})
        circuit.evaluation = result.get("comparison", {}).get("lasso", {})
        paths = write_circuit(circuit, out / "lasso", explanations=explanations(Path(cfg.run), circuit))
    print(f"wrote {out / 'lasso.json'}, {paths['json']}, {paths['dot']}")
    return result


@dataclass(frozen=True)
class HagdConfig:
    """Hierarchical decomposition of an attribution graph (HAGD, arXiv 2601.12879), an option reported beside its
    controls: the graph of the features with the largest attribution and the edges among them is coarsened
    spectrally into a tree of supernodes and searched coarse to fine for a circuit of each size; each is evaluated
    beside the greedy circuit (top features by |attribution|), random circuits and the empty circuit of equal size,
    every error node kept in all (docs/circuits.md). Writes hagd.json, hagd.png and hagd/circuit.{json,dot} (the
    largest HAGD circuit) to OUT (default RUN/circuits/TASK)."""

    run: str = field(default="", positional=True)
    """The run directory (or folder of SAEs) whose SAEs are the nodes."""
    task: str = "country-capital"
    """A built-in task or a task JSON file."""
    pairs: int = 16
    """Prompt pairs used (0: every pair of a task file)."""
    layers: str = ""
    """Keep the SAEs of these layers only, e.g. 12-13; empty: every SAE of the run."""
    graph_nodes: int = 300
    """Features in the attribution graph (the largest by |attribution-patching effect|)."""
    sizes: tuple[int, ...] = (5, 10, 20, 50, 100)
    """Circuit sizes (features) to search for and compare."""
    branching: int = 4
    """Parts each supernode is split into (the paper's branching factor)."""
    beam: int = 2
    """Supernodes kept at least at each level of the coarse-to-fine search (the paper keeps 2)."""
    random_draws: int = 5
    """Random circuits per size for the control."""
    min_accuracy: float = 0.8
    """Refuse a task the model gets less than this share of pairs right."""
    seed: int = 0
    """Seed of the k-means starts and of the random circuits."""
    out: str = ""
    """Output folder; empty: RUN/circuits/TASK."""
    model: str = ""
    """The model; empty: the one the SAEs name."""
    batch_size: int = 16
    """Prompt pairs per forward."""
    device: str = "auto"
    """auto, cpu or cuda."""
    threads: int = 0
    """CPU threads for PyTorch; 0: automatic (fewer when other work keeps the CPUs busy)."""
    progress: bool = True
    """Show progress bars."""


@with_threads
def run_hagd(cfg: HagdConfig) -> dict[str, Any]:
    import torch

    from saeforge.circuits.attribution import attribute_nodes
    from saeforge.circuits.circuit import Evaluator, build_circuit, write_circuit
    from saeforge.circuits.hierarchical import attribution_graph, coarsen, compare_with_controls, plot_comparison
    from saeforge.utils.atomic import atomic_write_json
    from saeforge.utils.locking import exclusive_lock

    _check_run_and_layers(cfg, "hagd")
    if cfg.graph_nodes < 2 or cfg.branching < 2 or cfg.beam < 1 or cfg.batch_size < 1 or cfg.random_draws < 0:
        raise SaeforgeError("--graph-nodes and --branching must be ≥ 2, --beam and --batch-size ≥ 1, "
                            "--random-draws ≥ 0", "saeforge circuit hagd RUN --graph-nodes 300 --branching 4")
    if not cfg.sizes or min(cfg.sizes) < 1 or max(cfg.sizes) > cfg.graph_nodes:
        raise SaeforgeError(f"--sizes {' '.join(map(str, cfg.sizes))} must lie between 1 and --graph-nodes "
                            f"({cfg.graph_nodes})", "saeforge circuit hagd RUN --sizes 5 10 20 50")
    task, run, saes, enc, out = _setup(cfg)
    lm = run.lm
    with exclusive_lock(out, "saeforge circuit hagd"):
        accuracy = _solved(lm, enc, cfg)
        times: dict[str, float] = {}
        t0 = time.perf_counter()
        effects = attribute_nodes(lm, enc, saes, method="atp", batch_size=cfg.batch_size, progress=cfg.progress)
        times["nodes"] = time.perf_counter() - t0
        graph = attribution_graph(lm, enc, saes, effects, graph_nodes=cfg.graph_nodes, batch_size=cfg.batch_size,
                                  progress=cfg.progress)
        times["edges"] = graph.seconds["edges"]
        t0 = time.perf_counter()
        hierarchy = coarsen(graph.weights, branching=cfg.branching, seed=cfg.seed)
        times["coarsening"] = time.perf_counter() - t0
        per_level = ", ".join(str(len(hierarchy.level(d))) for d in range(1, hierarchy.levels))
        print(f"attribution graph: {len(graph.nodes)} features, {int((graph.weights != 0).sum())} edges; "
              f"{hierarchy.levels} levels ({per_level} supernodes)")
        t0 = time.perf_counter()
        evaluator = Evaluator(lm, enc, saes, batch_size=cfg.batch_size)
        rows = compare_with_controls(evaluator, graph, hierarchy, cfg.sizes, beam=cfg.beam,
                                     random_draws=cfg.random_draws, seed=cfg.seed)
        times["search_and_evaluation"] = time.perf_counter() - t0
        print(f"{'features':>8} {'HAGD':>7} {'greedy':>7} {'random':>15} {'empty':>7} {'overlap':>8}")
        for r in rows:
            rand = f"{r['random_mean']:.3f} ± {r['random_std'] or 0:.3f}" if r["random_mean"] is not None else "-"
            print(f"{r['size']:>8} {r['hagd']:>7.3f} {r['greedy']:>7.3f} {rand:>15} {r['empty']:>7.3f} "
                  f"{r['overlap_with_greedy']['jaccard']:>8.2f}")
        largest = rows[-1]["nodes"]
        chosen = {c.site: largest.get(c.site, []) + [c.d_sae] for c in saes}
        index = {node: k for k, node in enumerate(graph.nodes)}
        inside = [index[(s, i)] for s, v in largest.items() for i in v]
        within = graph.weights[inside][:, inside].abs()
        within = within[within > 0]
        # the paper keeps 15 % of the circuit's edges
        threshold = float(torch.quantile(within.float(), 0.85)) if len(within) else 0.0
        edges = {}
        for (up, down) in {(u, d) for u in chosen for d in chosen}:
            ups = [index[(up, i)] for i in largest.get(up, [])]
            downs = [index[(down, j)] for j in largest.get(down, [])]
            if ups and downs:
                block = graph.weights[ups][:, downs].T.float()
                if block.abs().sum() > 0:
                    edges[(up, down)] = torch.nn.functional.pad(block, (0, 1, 0, 1))  # error nodes: no edges here
        circuit = build_circuit(effects, chosen, edges, edge_threshold=max(threshold, 1e-30),
                                settings={k: v for k, v in asdict(cfg).items() if k not in ("progress", "threads",
                                                                                             "device")}
                                | {"method": "hagd", "accuracy": accuracy.to_json()})
        circuit.evaluation = {k: v for k, v in rows[-1].items() if k != "nodes"}
        write_circuit(circuit, out / "hagd", explanations=explanations(Path(cfg.run), circuit))
        result = {"task": task.name, "sites": [c.site for c in saes], "accuracy": accuracy.to_json(),
                  "settings": circuit.settings, "graph": {"nodes": len(graph.nodes),
                                                          "edges": int((graph.weights != 0).sum())},
                  "levels": [len(hierarchy.level(d)) for d in range(hierarchy.levels)], "rows": rows,
                  "m_model": evaluator.m_model, "m_empty": evaluator.m_empty, "seconds": times}
        atomic_write_json(out / "hagd.json", result)
        plot_comparison(rows, out / "hagd.png", title=f"{task.name}: HAGD and its controls")
    print(f"wrote {out / 'hagd.json'}, {out / 'hagd.png'}, {out / 'hagd' / 'circuit.json'}")
    return result


def circuit_commands() -> dict[str, tuple[type, Callable, str]]:
    return {
        "tasks": (TasksConfig, run_tasks, "the built-in contrastive tasks and the model's accuracy on each"),
        "find": (FindConfig, run_find, "the sparse feature circuit of a task: node and edge attribution, "
                 "faithfulness; JSON, DOT, plot"),
        "lasso": (LassoConfig, run_lasso, "CircuitLasso: a circuit from sparse regressions between sites' codes, "
                  "compared with attribution"),
        "hagd": (HagdConfig, run_hagd, "hierarchical decomposition of the attribution graph (arXiv 2601.12879), "
                 "beside greedy, random and empty circuits"),
    }
