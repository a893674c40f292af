"""``saeforge modules ACTION``: co-activation modules (:mod:`saeforge.hierarchy.modules`) from the command line."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from simple_parsing.helpers import field

from saeforge.errors import SaeforgeError
from saeforge.utils.atomic import atomic_write_json

__all__ = ["AccuracyConfig", "BuildModulesConfig", "EvaluateModulesConfig", "MODULES_ACTIONS", "load_task"]


def load_task(spec: str):
    """``countries`` (built in) or a JSON task file."""
    from saeforge.hierarchy.modules import COUNTRIES, Task

    if spec == "countries":
        return Task.from_dict(COUNTRIES)
    path = Path(spec)
    if not path.is_file():
        raise SaeforgeError(f"no task {spec!r}", "pass --task countries (built in) or a JSON task file")
    try:
        return Task.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except json.JSONDecodeError as err:
        raise SaeforgeError(f"{path} is not valid JSON: {err}", "fix the task file") from err


def _pick(names: tuple[str, ...], known: dict, what: str) -> list[str]:
    if not names:
        return list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SaeforgeError(f"unknown {what}: {', '.join(unknown)}", f"the task has: {', '.join(known)}")
    return list(names)


# ---------------------------------------------------------------------------------------------------- accuracy
@dataclass(frozen=True)
class AccuracyConfig:
    """How often the model's top next token is the answer, per relation and concept (measure this before looking
    for modules: modules are only meaningful for facts the model gets right)."""

    run: str = field(default="", positional=True)
    """A run directory (its model is used); or leave it out and pass --model."""
    model: str = ""
    """Model; empty: the run's."""
    task: str = "countries"
    """countries (built in: capital, language, currency of 20 countries) or a JSON task file."""
    relations: tuple[str, ...] = ()
    """Relations to test (default: all of the task's)."""
    device: str = "auto"
    """auto, cpu or cuda."""


def run_accuracy(cfg: AccuracyConfig) -> dict[str, Any]:
    from saeforge.hierarchy.modules import _Runner, task_accuracy
    from saeforge.models.language_model import LanguageModel

    task = load_task(cfg.task)
    relations = _pick(cfg.relations, task.relations, "relations")
    if cfg.run:
        from saeforge.runs import load_run

        run = load_run(cfg.run, model=cfg.model, device=cfg.device)
        lm, policy = run.lm, run.token_policy()
    else:
        lm, policy = LanguageModel.load(cfg.model or "embedded", device=cfg.device), None
    runner = _Runner(lm, {}, {}, policy)
    result: dict[str, Any] = {}
    for kind in ("discovery", "evaluation"):
        acc = task_accuracy(runner, task, list(task.concepts), relations, kind)
        result[kind] = {f"{c}|{r}": v for (c, r), v in acc.items()}
    for r in relations:
        cells = [(c, result["discovery"].get(f"{c}|{r}"), result["evaluation"].get(f"{c}|{r}")) for c in task.concepts]
        cells = [x for x in cells if x[1] is not None]
        disc = sum(sum(d) for _, d, _ in cells) / max(sum(len(d) for _, d, _ in cells), 1)
        ev = sum(sum(e) for _, _, e in cells) / max(sum(len(e) for _, _, e in cells), 1)
        solved = [c for c, d, e in cells if any(d) and any(e)]
        print(f"{r}: top-1 accuracy {disc:.0%} (discovery templates), {ev:.0%} (evaluation templates); "
              f"solved: {', '.join(solved) or 'none'}")
    return result


# ---------------------------------------------------------------------------------------------------- build
@dataclass(frozen=True)
class BuildModulesConfig:
    """Find co-activation modules: a graph of adjacent layers' SAE features per prompt set, its weakly connected
    components, and concept and relation modules from a task's prompts."""

    run: str = field(default="", positional=True)
    """A run with SAEs at consecutive layers of one model (e.g. layers.0..29.resid_post)."""
    task: str = "countries"
    """countries (built in) or a JSON task file."""
    concepts: tuple[str, ...] = ()
    """Concepts to use (default: those the model answers correctly for every relation, on at least one discovery
    and one evaluation template)."""
    relations: tuple[str, ...] = ("capital", "language")
    """Relations to use."""
    sites: tuple[str, ...] = ()
    """Only the SAEs at these sites (default: every SAE of the run)."""
    saes: tuple[str, ...] = ()
    """Only the SAEs of these names (one per layer)."""
    min_correlation: float = 0.9
    """Link two features when the Pearson correlation of their activations over the prompt tokens exceeds this."""
    max_density: float = 0.01
    """Leave out features that fire on more than this fraction of tokens."""
    top_k: int = 5
    """Features per layer and token that become graph nodes."""
    adjacent_only: bool = True
    """Link features of adjacent layers only."""
    max_sharing: float = 0.5
    """Drop a module's features that also occur for more than this fraction of the other concepts (relations)."""
    model: str = ""
    """Model; empty: the one the SAEs were trained on."""
    device: str = "auto"
    """auto, cpu or cuda."""
    out: str = "modules.json"
    """Where to write the modules."""


def run_build(cfg: BuildModulesConfig) -> dict[str, Any]:
    from saeforge.hierarchy.modules import ModuleFinder, ModuleSettings, task_accuracy

    task = load_task(cfg.task)
    relations = _pick(cfg.relations, task.relations, "relations")
    _pick(cfg.concepts, task.concepts, "concepts")
    settings = ModuleSettings(cfg.min_correlation, cfg.max_density, cfg.top_k, cfg.adjacent_only, cfg.max_sharing)
    settings.check()
    finder = ModuleFinder.from_run(cfg.run, settings=settings, model=cfg.model, device=cfg.device, sites=cfg.sites,
                                   names=cfg.saes)
    concepts = list(cfg.concepts)
    accuracy = {}
    for kind in ("discovery", "evaluation"):
        accuracy[kind] = task_accuracy(finder, task, list(task.concepts), relations, kind)
    if not concepts:
        concepts = [c for c in task.concepts
                    if all(any(accuracy[k].get((c, r), [False])) for r in relations for k in accuracy)]
    if len(concepts) < 2:
        raise SaeforgeError(f"the model answers fewer than two concepts of {', '.join(relations)} correctly",
                            "choose relations it knows (saeforge modules accuracy shows them), or pass --concepts")
    modules = finder.task_modules(task, concepts, relations)
    result = {"run": str(Path(cfg.run).resolve()), "task": cfg.task, "settings": settings.__dict__,
              "sites": {layer: finder.runner.sites[layer] for layer in finder.layers},
              "saes": list(finder.names.values()),
              "concepts_used": concepts, "relations_used": relations,
              "accuracy": {k: {f"{c}|{r}": v for (c, r), v in a.items()} for k, a in accuracy.items()},
              **modules}
    atomic_write_json(cfg.out, result)
    for c in concepts:
        layers = sorted({f[0] for f in modules["concepts"][c]})
        print(f"concept {c}: {len(modules['concepts'][c])} features, layers {layers}")
    for r in relations:
        layers = sorted({f[0] for f in modules["relations"][r]})
        print(f"relation {r}: {len(modules['relations'][r])} features, layers {layers}")
    print(f"→ {cfg.out}")
    return result


# ---------------------------------------------------------------------------------------------------- evaluate
@dataclass(frozen=True)
class EvaluateModulesConfig:
    """Ablate and swap whole modules against their best single features on the task's evaluation templates."""

    modules: str = field(default="modules.json", positional=True)
    """A modules.json from `saeforge modules build`."""
    amplification: float = 2.0
    """Swapped-in latents are set to this multiple of their largest activation on their own prompts."""
    single_candidates: int = 0
    """Look for a module's best single feature among only its this many most active features (0: all of them; a
    large module costs one forward pass per feature and prompt set)."""
    device: str = "auto"
    """auto, cpu or cuda."""
    out: str = ""
    """Where to write the success rates (default: <modules>.eval.json)."""
    progress: bool = True
    """Show progress bars."""


def run_evaluate(cfg: EvaluateModulesConfig) -> dict[str, Any]:
    from saeforge.hierarchy.modules import ModuleFinder, ModuleSettings, evaluate_modules

    path = Path(cfg.modules)
    if not path.is_file():
        raise SaeforgeError(f"no modules file {path}", "build one first: saeforge modules build RUN")
    data = json.loads(path.read_text())
    if not cfg.amplification > 0:
        raise SaeforgeError(f"--amplification must be positive, got {cfg.amplification}", "pass e.g. 2")
    if cfg.single_candidates < 0:
        raise SaeforgeError(f"--single-candidates must be 0 (all) or positive, got {cfg.single_candidates}",
                            "pass e.g. --single-candidates 16")
    finder = ModuleFinder.from_run(data["run"], settings=ModuleSettings(**data["settings"]), device=cfg.device,
                                   names=tuple(data.get("saes") or ()), sites=tuple(data["sites"].values()))
    task = load_task(data["task"])
    result = evaluate_modules(finder, task, data, data["concepts_used"], data["relations_used"],
                              amplification=cfg.amplification, single_candidates=cfg.single_candidates,
                              progress=cfg.progress)
    atomic_write_json(cfg.out or path.with_name(path.stem + ".eval.json"), result)
    print("| intervention | trials | whole module | best single feature |\n|---|---:|---:|---:|")
    for name, row in result["rows"].items():
        print(f"| {name} | {row['trials']} | {row['module_rate']:.0%} | {row['single_rate']:.0%} |")
    return result


MODULES_ACTIONS: dict[str, tuple[type, Callable, str]] = {
    "accuracy": (AccuracyConfig, run_accuracy, "the model's accuracy on a task's facts (check before building)"),
    "build": (BuildModulesConfig, run_build, "find concept and relation modules from a task's prompts"),
    "evaluate": (EvaluateModulesConfig, run_evaluate, "ablate and swap modules vs their best single features"),
}
