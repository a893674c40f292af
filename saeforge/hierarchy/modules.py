"""Co-activation modules (Deng et al., "Sparse Feature Coactivation Reveals Causal Semantic Modules in Large Language
Models", arXiv 2506.18141): groups of SAE features across adjacent layers that fire together on a task's prompts,
and what ablating or amplifying a whole group does, against its best single feature.

**Graph** (one per prompt set, e.g. "the capital of France"): SAEs at consecutive layers encode every prompt token.
Nodes are, for each layer and token, the ``top_k`` (5) most active features, without dense ones (density above
``max_density`` = 0.01, from the SAE's saved feature statistics). Two nodes of **adjacent** layers are linked when the
Pearson correlation of their activations over the prompt tokens exceeds ``min_correlation`` (0.9). Isolated nodes
are dropped; the weakly connected components are the candidate modules. (Defaults as the paper is summarised; its
code was not available, so each is a parameter; ``adjacent_only=False`` links every pair of layers.)

**Concept and relation modules**: a concept's module holds the nodes that occur in the graphs of *every* relation
asked about it (France: capital, language); a relation's, the nodes in the graphs of every concept asked about it.
Nodes that also occur for more than ``max_sharing`` (half) of the *other* concepts (relations) are dropped: the
paper's intersection alone would keep features of the template shared by everything (saeforge's addition).

**Interventions** (through ``LanguageModel.edit``; the SAE error term is kept, so only the chosen latents move):

- *ablation*: the module's latents are set to 0 at every prompt token, x ← x − Σ f_i d_i, layer by layer; success =
  a prompt the model answered correctly no longer gets its answer as the top next token;
- *amplification* (a counterfactual): on a prompt about concept A, A's module is ablated and B's module is set to
  ``amplification`` × the largest activation each of its latents reached on B's own prompts, at the tokens where
  A's module fired; success = the top next token becomes B's answer (e.g. "The capital of France is" → " Berlin"
  with Germany's module). Relations swap the same way.

The best single feature of a module is the one whose ablation (amplification) does most on the *discovery* prompts;
success rates are measured on the *evaluation* templates, which differ from the discovery ones.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from saeforge.errors import SaeforgeError

__all__ = ["COUNTRIES", "Feature", "ModuleFinder", "ModuleSettings", "Task", "ablation_success", "answer_token",
           "best_single_feature", "evaluate_modules", "pearson_edges", "swap_success", "task_accuracy"]

Feature = tuple[int, int]  # (layer, latent)

# The built-in task: country facts (the paper's first task), with templates for discovering modules and different
# ones for measuring interventions. Answers are matched by their first token (with a leading space).
COUNTRIES: dict[str, Any] = {
    "name": "countries",
    "relations": {
        "capital": {"discovery": ["The capital of {concept} is", "{concept}'s capital city is"],
                    "evaluation": ["The capital city of {concept} is", "Q: What is the capital of {concept}?\nA:"]},
        "language": {"discovery": ["The official language of {concept} is", "People in {concept} speak"],
                     "evaluation": ["In {concept}, most people speak", "Q: What language is spoken in {concept}?\nA:"]},
        "currency": {"discovery": ["The currency of {concept} is the", "In {concept} you pay with the"],
                     "evaluation": ["The official currency of {concept} is the",
                                    "Q: What is the currency of {concept}?\nA: The"]},
    },
    "concepts": {
        "France": {"capital": "Paris", "language": "French", "currency": "euro"},
        "Germany": {"capital": "Berlin", "language": "German", "currency": "euro"},
        "Italy": {"capital": "Rome", "language": "Italian", "currency": "euro"},
        "Spain": {"capital": "Madrid", "language": "Spanish", "currency": "euro"},
        "Japan": {"capital": "Tokyo", "language": "Japanese", "currency": "yen"},
        "China": {"capital": "Beijing", "language": "Chinese", "currency": "yuan"},
        "Russia": {"capital": "Moscow", "language": "Russian", "currency": "ruble"},
        "England": {"capital": "London", "language": "English", "currency": "pound"},
        "Egypt": {"capital": "Cairo", "language": "Arabic", "currency": "pound"},
        "Greece": {"capital": "Athens", "language": "Greek", "currency": "euro"},
        "Portugal": {"capital": "Lisbon", "language": "Portuguese", "currency": "euro"},
        "India": {"capital": "Delhi", "language": "Hindi", "currency": "rupee"},
        "Mexico": {"capital": "Mexico", "language": "Spanish", "currency": "peso"},
        "Brazil": {"capital": "Brasilia", "language": "Portuguese", "currency": "real"},
        "Poland": {"capital": "Warsaw", "language": "Polish", "currency": "zloty"},
        "Turkey": {"capital": "Ankara", "language": "Turkish", "currency": "lira"},
        "Sweden": {"capital": "Stockholm", "language": "Swedish", "currency": "krona"},
        "Austria": {"capital": "Vienna", "language": "German", "currency": "euro"},
        "Korea": {"capital": "Seoul", "language": "Korean", "currency": "won"},
        "Norway": {"capital": "Oslo", "language": "Norwegian", "currency": "krone"},
    },
}


@dataclass(frozen=True)
class Task:
    """Concepts × relations with an answer each, and prompt templates (``{concept}`` is replaced)."""

    name: str
    relations: dict[str, dict[str, list[str]]]
    concepts: dict[str, dict[str, str]]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Task":
        fix = ("give a JSON task file like saeforge.hierarchy.modules.COUNTRIES: {\"name\", \"relations\": {R: "
               "{\"discovery\": [...], \"evaluation\": [...]}}, \"concepts\": {C: {R: answer}}}")
        try:
            relations = {str(r): {"discovery": [str(t) for t in v["discovery"]],
                                  "evaluation": [str(t) for t in v["evaluation"]]}
                         for r, v in data["relations"].items()}
            concepts = {str(c): {str(r): str(a) for r, a in v.items()} for c, v in data["concepts"].items()}
        except (KeyError, TypeError, AttributeError) as err:
            raise SaeforgeError(f"the task is malformed ({err!r})", fix) from err
        for r, v in relations.items():
            if not v["discovery"] or not v["evaluation"]:
                raise SaeforgeError(f"relation {r!r} needs discovery and evaluation templates", fix)
            if not all("{concept}" in t for t in v["discovery"] + v["evaluation"]):
                raise SaeforgeError(f"every template of relation {r!r} must contain {{concept}}", fix)
        if len(concepts) < 2 or len(relations) < 1:
            raise SaeforgeError("a task needs at least two concepts and one relation", fix)
        return cls(str(data.get("name", "task")), relations, concepts)

    def prompts(self, concept: str, relation: str, kind: str) -> list[str]:
        return [t.replace("{concept}", concept) for t in self.relations[relation][kind]]

    def answer(self, concept: str, relation: str) -> str | None:
        return self.concepts[concept].get(relation)


# --------------------------------------------------------------------------------------------------------------
# Running prompts
# --------------------------------------------------------------------------------------------------------------


def _layer_of(site: str) -> int:
    m = re.match(r"layers\.(\d+)\.", site)
    if not m:
        raise SaeforgeError(f"cannot tell the layer of site {site!r}",
                            "modules need SAEs at canonical sites (layers.L.resid_post, ...)")
    return int(m.group(1))


def answer_token(tokenizer, answer: str) -> int:
    """The first token of the answer as it follows a prompt (with a leading space)."""
    ids = tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"]
    if not ids:
        raise SaeforgeError(f"the answer {answer!r} has no tokens", "give non-empty answers")
    return int(ids[0])


class _Runner:
    """The model and its per-layer SAEs; runs prompt batches with latent edits."""

    def __init__(self, lm, saes: dict[int, Any], sites: dict[int, str], policy=None):
        from saeforge.data.prompts import PromptEncoder

        self.lm, self.saes, self.sites = lm, saes, sites
        self.encoder = PromptEncoder(lm, policy)
        self.layers = sorted(saes)

    def batch(self, prompts: Sequence[str]):
        return self.encoder.batch(list(prompts), padding="right")

    @torch.no_grad()
    def latents(self, prompts: Sequence[str]) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """Per layer, the latents ``[T, d_sae]`` of every kept token of the prompts (concatenated), and the prompt
        index of each token."""
        b = self.batch(prompts)
        with self.lm.record([self.sites[layer] for layer in self.layers]) as rec:
            self.lm.logits(b.input_ids, b.attention_mask)
        keep = b.keep.to(self.lm.device)
        out = {layer: self.saes[layer].encode(rec[self.sites[layer]][keep].float()) for layer in self.layers}
        which = torch.arange(len(b), device=keep.device)[:, None].expand_as(keep)[keep]
        return out, which

    @torch.no_grad()
    def last_logits(self, prompts: Sequence[str], edits: dict[int, "_LatentEdit"] | None = None) -> torch.Tensor:
        b = self.batch(prompts)
        fns = {self.sites[layer]: e.edit_fn(self.saes[layer], b.keep) for layer, e in (edits or {}).items()}
        with self.lm.edit(fns) if fns else contextlib.nullcontext():
            logits = self.lm.logits(b.input_ids, b.attention_mask)
        last = b.attention_mask.sum(1) - 1
        return logits[torch.arange(len(b)), last.to(logits.device)].float()


@dataclass
class _LatentEdit:
    """At one layer: latents to zero, and latents to set (value each), at the kept tokens (or those of ``where``)."""

    zero: list[int] = field(default_factory=list)
    set_to: dict[int, float] = field(default_factory=dict)
    where: torch.Tensor | None = None  # [batch, seq] bool: the tokens the amplification applies to

    def edit_fn(self, sae, keep: torch.Tensor):
        zero = torch.tensor(self.zero, dtype=torch.long)
        set_idx = torch.tensor(list(self.set_to), dtype=torch.long)
        set_val = torch.tensor(list(self.set_to.values()), dtype=torch.float32)

        def fn(x: torch.Tensor) -> torch.Tensor:
            mask = keep.to(x.device)
            flat = x[mask].float()
            f = sae.encode(flat)
            delta = torch.zeros_like(flat)
            if zero.numel():
                delta -= f[:, zero.to(f.device)] @ sae.W_dec[zero.to(f.device)].float()
            if set_idx.numel():
                rows = self.where.to(x.device)[mask] if self.where is not None else torch.ones(
                    flat.shape[0], dtype=torch.bool, device=x.device)
                target = set_val.to(f.device)[None, :] - f[:, set_idx.to(f.device)]
                delta[rows] += target[rows] @ sae.W_dec[set_idx.to(f.device)].float()
            out = x.clone()
            out[mask] = (flat + delta).to(x.dtype)
            return out

        return fn


def _edits(zero: Sequence[Feature] = (), set_to: dict[Feature, float] | None = None,
           where: torch.Tensor | None = None) -> dict[int, _LatentEdit]:
    out: dict[int, _LatentEdit] = {}
    for layer, idx in zero:
        out.setdefault(layer, _LatentEdit(where=where)).zero.append(int(idx))
    for (layer, idx), v in (set_to or {}).items():
        out.setdefault(layer, _LatentEdit(where=where)).set_to[int(idx)] = float(v)
    return out


# --------------------------------------------------------------------------------------------------------------
# Graphs and modules
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModuleSettings:
    min_correlation: float = 0.9
    max_density: float = 0.01
    top_k: int = 5
    adjacent_only: bool = True
    max_sharing: float = 0.5

    def check(self) -> None:
        if not -1 <= self.min_correlation < 1:
            raise SaeforgeError(f"the correlation threshold must be in [-1, 1), got {self.min_correlation}",
                                "pass --min-correlation 0.9 (the paper's)")
        if not 0 < self.max_density <= 1:
            raise SaeforgeError(f"the density limit must be in (0, 1], got {self.max_density}",
                                "pass --max-density 0.01 (the paper's)")
        if self.top_k < 1:
            raise SaeforgeError(f"--top-k must be at least 1, got {self.top_k}", "pass --top-k 5 (the paper's)")
        if not 0 <= self.max_sharing <= 1:
            raise SaeforgeError(f"--max-sharing must be in [0, 1], got {self.max_sharing}", "pass --max-sharing 0.5")


def pearson_edges(a: torch.Tensor, b: torch.Tensor, threshold: float) -> list[tuple[int, int, float]]:
    """(column of ``a``, column of ``b``, r) for every pair of columns whose Pearson correlation over the rows exceeds
    ``threshold``; a constant column correlates with nothing."""
    a, b = a.double(), b.double()
    a = a - a.mean(0)
    b = b - b.mean(0)
    na, nb = a.norm(dim=0), b.norm(dim=0)
    r = (a.T @ b) / (na[:, None] * nb[None, :]).clamp_min(1e-12)
    r[(na == 0)[:, None].expand_as(r) | (nb == 0)[None, :].expand_as(r)] = 0
    i, j = torch.nonzero(r > threshold, as_tuple=True)
    return [(int(x), int(y), float(r[x, y])) for x, y in zip(i, j)]


class ModuleFinder:
    """Co-activation graphs and modules of one model's SAEs at consecutive layers (see the module docstring)."""

    def __init__(self, lm, saes: dict[int, Any], sites: dict[int, str], densities: dict[int, torch.Tensor],
                 settings: ModuleSettings = ModuleSettings(), policy=None, *, names: dict[int, str] | None = None):
        settings.check()
        self.names = names or dict(sites)  # layer → the SAE's name in its run
        self.settings = settings
        self.runner = _Runner(lm, saes, sites, policy)
        self.densities = densities
        self.layers = sorted(saes)

    @classmethod
    def from_run(cls, path, *, settings: ModuleSettings = ModuleSettings(), model: str = "", device: str = "auto",
                 lm=None, sites: Sequence[str] = (), names: Sequence[str] = ()) -> "ModuleFinder":
        """The SAEs of a run (those named, or at the ``sites`` named) at one layer each; all of one model."""
        from saeforge.runs import load_run
        from saeforge.saes import load_feature_stats

        run = load_run(path, model=model, device=device, lm=lm, names=names)
        chosen = {name: b for name, b in run.saes.items() if not sites or b.read_site.name in sites}
        if sites and len(chosen) != len(set(sites)):
            raise SaeforgeError(f"the run has no SAE at some of {', '.join(sites)}",
                                f"it has: {', '.join(b.read_site.name for b in run.saes.values())}")
        fingerprints = {(b.meta or {}).get("model_fingerprint") for b in chosen.values()} - {None}
        names = {(b.meta or {}).get("model_name") for b in chosen.values()} - {None}
        if len(fingerprints) > 1 or (not fingerprints and len(names) > 1):
            raise SaeforgeError(f"modules asked over SAEs of different models ({sorted(fingerprints or names)})",
                                "build modules from SAEs of one model: one run, or --sites of one model's SAEs")
        by_layer: dict[int, Any] = {}
        site_of: dict[int, str] = {}
        name_of: dict[int, str] = {}
        dens: dict[int, torch.Tensor] = {}
        for b in chosen.values():
            if b.kind != "sae":
                raise SaeforgeError(f"{b.name} is a {b.kind}, not an SAE", "modules use SAEs (one site each)")
            layer = _layer_of(b.read_site.name)
            if layer in by_layer:
                raise SaeforgeError(f"two SAEs at layer {layer} ({site_of[layer]}, {b.read_site.name})",
                                    "pass --saes with one SAE per layer")
            by_layer[layer], site_of[layer], name_of[layer] = b.sae, b.read_site.name, b.name
            stats = load_feature_stats(b.folder) if b.folder else None
            if not stats or "sparsity" not in stats:
                raise SaeforgeError(f"{b.folder} has no feature densities (sparsity.safetensors)",
                                    "use SAEs saved by `saeforge train` (it writes them), or --max-density 1")
            dens[layer] = torch.pow(10.0, stats["sparsity"].double()).float()
        if len(by_layer) < 2:
            raise SaeforgeError("modules need SAEs at two or more layers", "train SAEs at consecutive layers")
        return cls(run.lm, by_layer, site_of, dens, settings, run.token_policy(), names=name_of)

    # ---- graphs ----
    def graph(self, prompts: Sequence[str]):
        """The co-activation graph (networkx) of a prompt set; nodes are (layer, latent)."""
        import networkx as nx

        s = self.settings
        acts, _ = self.runner.latents(prompts)
        nodes: dict[int, list[int]] = {}
        for layer in self.layers:
            a = acts[layer].clone()
            a[:, self.densities[layer].to(a.device) > s.max_density] = 0
            top = a.topk(min(s.top_k, a.shape[1]), dim=1)
            chosen = torch.unique(top.indices[top.values > 0])
            nodes[layer] = chosen.tolist()
        g = nx.Graph()
        pairs = [(la, lb) for i, la in enumerate(self.layers) for lb in self.layers[i + 1:]
                 if not s.adjacent_only or lb == la + 1]
        for la, lb in pairs:
            if not nodes[la] or not nodes[lb]:
                continue
            ia, ib = torch.tensor(nodes[la]), torch.tensor(nodes[lb])
            for x, y, r in pearson_edges(acts[la][:, ia.to(acts[la].device)], acts[lb][:, ib.to(acts[lb].device)],
                                         s.min_correlation):
                g.add_edge((la, nodes[la][x]), (lb, nodes[lb][y]), r=r)
        return g

    def components(self, prompts: Sequence[str]) -> list[set[Feature]]:
        import networkx as nx

        return sorted((set(c) for c in nx.connected_components(self.graph(prompts))), key=len, reverse=True)

    def task_modules(self, task: Task, concepts: Sequence[str], relations: Sequence[str]) -> dict[str, Any]:
        """Graph nodes per (concept, relation) discovery set, and the concept and relation modules."""
        seen: dict[tuple[str, str], set[Feature]] = {}
        stats: dict[str, Any] = {}
        for c in concepts:
            for r in relations:
                comps = self.components(task.prompts(c, r, "discovery"))
                seen[(c, r)] = set().union(*comps) if comps else set()
                stats[f"{c}|{r}"] = {"components": len(comps), "nodes": len(seen[(c, r)]),
                                     "largest": len(comps[0]) if comps else 0}
        share = self.settings.max_sharing

        def specific(nodes: set[Feature], others: list[set[Feature]]) -> set[Feature]:
            if not others:
                return nodes
            return {n for n in nodes if sum(n in o for o in others) <= share * len(others)}

        concept_core = {c: set.intersection(*(seen[(c, r)] for r in relations)) for c in concepts}
        relation_core = {r: set.intersection(*(seen[(c, r)] for c in concepts)) for r in relations}
        concept_mod = {c: specific(concept_core[c], [concept_core[o] for o in concepts if o != c]) for c in concepts}
        relation_mod = {r: specific(relation_core[r], [relation_core[o] for o in relations if o != r])
                        for r in relations}
        return {"graphs": stats, "concepts": {c: sorted(v) for c, v in concept_mod.items()},
                "relations": {r: sorted(v) for r, v in relation_mod.items()}}

    # ---- interventions ----
    def max_activations(self, prompts: Sequence[str], module: Sequence[Feature]) -> dict[Feature, float]:
        acts, _ = self.runner.latents(prompts)
        return {(layer, i): float(acts[layer][:, i].max()) for layer, i in module}

    def fired(self, prompts: Sequence[str], module: Sequence[Feature]) -> torch.Tensor:
        """[batch, seq] bool: tokens where any latent of ``module`` fires (kept tokens only)."""
        b = self.runner.batch(prompts)
        acts, which = self.runner.latents(prompts)
        any_fire = torch.zeros(acts[self.layers[0]].shape[0], dtype=torch.bool, device=which.device)
        for layer, i in module:
            any_fire |= acts[layer][:, i] > 0
        out = torch.zeros_like(b.keep)
        out[b.keep] = any_fire.cpu()
        return out


def task_accuracy(runner_or_finder, task: Task, concepts: Sequence[str], relations: Sequence[str],
                  kind: str = "evaluation") -> dict[tuple[str, str], list[bool]]:
    """Whether the model's top next token is the answer's first token, per (concept, relation), per template."""
    runner = getattr(runner_or_finder, "runner", runner_or_finder)
    out = {}
    for c in concepts:
        for r in relations:
            answer = task.answer(c, r)
            if answer is None:
                continue
            target = answer_token(runner.lm.tokenizer, answer)
            logits = runner.last_logits(task.prompts(c, r, kind))
            out[(c, r)] = (logits.argmax(-1) == target).tolist()
    return out



# --------------------------------------------------------------------------------------------------------------
# Success rates
# --------------------------------------------------------------------------------------------------------------


def _answer_logprob(finder: ModuleFinder, prompts: list[str], token: int, edits=None) -> float:
    logits = finder.runner.last_logits(prompts, edits)
    return float(torch.log_softmax(logits, -1)[:, token].mean())


def best_single_feature(finder: ModuleFinder, task: Task, module: Sequence[Feature],
                        pairs: Sequence[tuple[str, str]], candidates: int = 0) -> Feature | None:
    """The feature of ``module`` whose ablation lowers the answers' log-probability most on the discovery prompts
    of ``pairs`` (concept, relation). ``candidates`` > 0: only the module's features with the largest activation on
    those prompts are tried (a forward pass per feature and prompt set: a module of 100+ features is slow on a
    CPU)."""
    if not module:
        return None
    tok = finder.runner.lm.tokenizer
    sets = [(task.prompts(c, r, "discovery"), answer_token(tok, task.answer(c, r))) for c, r in pairs
            if task.answer(c, r)]
    if 0 < candidates < len(module):
        peak = finder.max_activations([p for prompts, _ in sets for p in prompts], module)
        module = sorted(module, key=lambda f: -peak[tuple(f)])[:candidates]
    base = [_answer_logprob(finder, p, t) for p, t in sets]
    best, best_drop = None, -np.inf
    for feat in module:
        drop = sum(b - _answer_logprob(finder, p, t, _edits(zero=[feat])) for (p, t), b in zip(sets, base))
        if drop > best_drop:
            best, best_drop = tuple(feat), drop
    return best


def ablation_success(finder: ModuleFinder, task: Task, module: Sequence[Feature],
                     pairs: Sequence[tuple[str, str]]) -> tuple[int, int]:
    """(successes, trials): evaluation prompts of ``pairs`` answered correctly before, and not after ablating."""
    tok = finder.runner.lm.tokenizer
    hits = trials = 0
    for c, r in pairs:
        if not task.answer(c, r):
            continue
        t = answer_token(tok, task.answer(c, r))
        prompts = task.prompts(c, r, "evaluation")
        clean = finder.runner.last_logits(prompts).argmax(-1) == t
        if not bool(clean.any()) or not module:
            trials += int(clean.sum())
            continue
        edited = finder.runner.last_logits(prompts, _edits(zero=module)).argmax(-1) != t
        hits += int((clean & edited).sum())
        trials += int(clean.sum())
    return hits, trials


def swap_success(finder: ModuleFinder, prompts: list[str], source: Sequence[Feature], target: Sequence[Feature],
                 target_max: dict[Feature, float], amplification: float, expected_token: int) -> list[bool]:
    """Ablate ``source`` and set ``target``'s latents to amplification × their maximum where ``source`` fired (every
    prompt token when it fired nowhere); whether the top next token becomes ``expected_token``, per prompt."""
    where = finder.fired(prompts, source) if source else None
    if where is not None and not bool(where.any()):
        where = None
    values = {f: amplification * target_max.get(tuple(f), 0.0) for f in target}
    logits = finder.runner.last_logits(prompts, _edits(zero=source, set_to=values, where=where))
    return (logits.argmax(-1) == expected_token).tolist()


def evaluate_modules(finder: ModuleFinder, task: Task, modules: dict[str, Any], concepts: Sequence[str],
                     relations: Sequence[str], *, amplification: float = 2.0, single_candidates: int = 0,
                     progress: bool = False) -> dict[str, Any]:
    """Success rates of ablating and of swapping whole modules against their best single features."""
    from tqdm.auto import tqdm

    tok = finder.runner.lm.tokenizer
    cmod = {c: [tuple(f) for f in v] for c, v in modules["concepts"].items()}
    rmod = {r: [tuple(f) for f in v] for r, v in modules["relations"].items()}
    bar = tqdm(total=len(concepts) + len(relations), desc="best single features", disable=not progress)
    single_c, single_r = {}, {}
    for c in concepts:
        single_c[c] = best_single_feature(finder, task, cmod[c], [(c, r) for r in relations], single_candidates)
        bar.update(1)
    for r in relations:
        single_r[r] = best_single_feature(finder, task, rmod[r], [(c, r) for c in concepts], single_candidates)
        bar.update(1)
    bar.close()
    out: dict[str, Any] = {"amplification": amplification, "single_candidates": single_candidates, "rows": {}}

    def add(name: str, module_hits: int, single_hits: int, trials: int) -> None:
        row = out["rows"].setdefault(name, {"module": 0, "single": 0, "trials": 0})
        row["module"] += module_hits
        row["single"] += single_hits
        row["trials"] += trials

    for c in concepts:
        pairs = [(c, r) for r in relations]
        h, n = ablation_success(finder, task, cmod[c], pairs)
        hs, _ = ablation_success(finder, task, [single_c[c]] if single_c[c] else [], pairs)
        add("concept ablation", h, hs, n)
    for r in relations:
        pairs = [(c, r) for c in concepts]
        h, n = ablation_success(finder, task, rmod[r], pairs)
        hs, _ = ablation_success(finder, task, [single_r[r]] if single_r[r] else [], pairs)
        add("relation ablation", h, hs, n)
    maxima_c = {c: finder.max_activations([p for r in relations for p in task.prompts(c, r, "discovery")], cmod[c])
                for c in concepts}
    maxima_r = {r: finder.max_activations([p for c in concepts for p in task.prompts(c, r, "discovery")], rmod[r])
                for r in relations}
    bar = tqdm(total=len(concepts) * len(relations), desc="swaps", disable=not progress)
    for a in concepts:
        for r in relations:
            bar.update(1)
            ans = task.answer(a, r)
            if not ans:
                continue
            prompts = task.prompts(a, r, "evaluation")
            clean = (finder.runner.last_logits(prompts).argmax(-1) == answer_token(tok, ans)).tolist()
            keep = [p for p, ok in zip(prompts, clean) if ok]
            if not keep:
                continue
            for b in concepts:  # concept swap: a's facts become b's
                if b == a or not task.answer(b, r) or answer_token(tok, task.answer(b, r)) == answer_token(tok, ans):
                    continue
                t = answer_token(tok, task.answer(b, r))
                m = swap_success(finder, keep, cmod[a], cmod[b], maxima_c[b], amplification, t)
                sa, sb = single_c[a], single_c[b]
                s = swap_success(finder, keep, [sa] if sa else [], [sb] if sb else [], maxima_c[b], amplification, t)
                add("concept swap", sum(m), sum(s), len(keep))
            for r2 in relations:  # relation swap: a's r becomes a's r2
                ans2 = task.answer(a, r2)
                if r2 == r or not ans2 or answer_token(tok, ans2) == answer_token(tok, ans):
                    continue
                t = answer_token(tok, ans2)
                m = swap_success(finder, keep, rmod[r], rmod[r2], maxima_r[r2], amplification, t)
                sa, sb = single_r[r], single_r[r2]
                s = swap_success(finder, keep, [sa] if sa else [], [sb] if sb else [], maxima_r[r2], amplification,
                                 t)
                add("relation swap", sum(m), sum(s), len(keep))
    bar.close()
    for row in out["rows"].values():
        n = max(row["trials"], 1)
        row["module_rate"], row["single_rate"] = row["module"] / n, row["single"] / n
    out["single_features"] = {"concepts": {c: list(v) if v else None for c, v in single_c.items()},
                              "relations": {r: list(v) if v else None for r, v in single_r.items()}}
    return out
