"""``saeforge hierarchy ACTION``: build feature trees after training, measure them, judge them, and measure
absorption. One config dataclass per action (its field docstrings are the ``--help``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from simple_parsing.helpers import field

from saeforge.errors import SaeforgeError
from saeforge.utils.atomic import atomic_write_json

__all__ = ["HIERARCHY_ACTIONS", "AbsorptionConfig", "JudgeConfig", "LinkConfig", "MetricsConfig",
           "StoreLinksConfig", "measure_trees", "open_tree", "run_absorption", "run_judge", "run_link", "run_metrics",
           "run_store_links"]


# ---------------------------------------------------------------------------------------------------- link
@dataclass(frozen=True)
class LinkConfig:
    """Build a feature tree after training: independently trained SAEs of growing widths (the post-hoc baseline), or
    a Matryoshka SAE's groups read as levels, each latent linked to the most similar latent one level up."""

    saes: tuple[str, ...] = field(default=(), positional=True, nargs="*")
    """SAE folders, narrowest first (one level each), e.g. run/saes/w1152 run/saes/w4608."""
    matryoshka: str = ""
    """Instead: a Matryoshka SAE folder whose latent groups become the levels."""
    boundaries: tuple[int, ...] = ()
    """With --matryoshka: the prefix sizes that end each level (default: the SAE's groups)."""
    similarity: str = "encoder"
    """What a latent's parent is chosen by: encoder (cosine of encoder vectors, HSAE's default), decoder, or
    coactivation (P(parent fires | child fires), counted on --cache)."""
    cache: str = ""
    """With --similarity coactivation: an activation cache of the SAEs' site to count co-firing on (their
    training cache, as an HSAE counts it while training)."""
    tokens: int = 262_144
    """With --similarity coactivation: token positions of --cache to count on."""
    unassigned_fraction: float = 0.2
    """Fraction of each level's latents, the least similar to any parent, left without a parent."""
    out: str = "tree.json"
    """The tree file to write (SAE paths in it are relative to its folder)."""


def run_link(cfg: LinkConfig):
    from saeforge.hierarchy.posthoc import link_saes, matryoshka_tree

    out = Path(cfg.out)
    if bool(cfg.saes) == bool(cfg.matryoshka):
        raise SaeforgeError("give either SAE folders or --matryoshka, not both or neither",
                            "saeforge hierarchy link RUN/saes/A RUN/saes/B --out tree.json (or --matryoshka RUN/saes/M)")
    if out.is_dir():
        raise SaeforgeError(f"--out {out} is a folder", "pass a file name, e.g. --out tree.json")
    activations = _coactivation_batches(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    if cfg.matryoshka:
        tree = matryoshka_tree(cfg.matryoshka, boundaries=cfg.boundaries, similarity=cfg.similarity,
                               unassigned_fraction=cfg.unassigned_fraction, tree_folder=out.parent,
                               activations=activations)
    else:
        tree = link_saes(cfg.saes, similarity=cfg.similarity, unassigned_fraction=cfg.unassigned_fraction,
                         tree_folder=out.parent, activations=activations)
    tree.save(out)
    s = tree.summary()
    print(f"{tree.kind} tree, levels {s['widths']} → {out}")
    for row in s["levels"]:
        print(f"  level {row['parent_level']} → {row['parent_level'] + 1}: {row['pairs']} pairs, "
              f"{row['parents_with_children']} parents with children (at most {row['max_children']}), "
              f"{row['unassigned']} unassigned")
    return tree


def _coactivation_batches(cfg: LinkConfig):
    """The cache batches that --similarity coactivation counts on (None for the cosine rules), checked first."""
    from saeforge.hierarchy.data import cache_batches, folder_metadata

    if cfg.similarity != "coactivation":
        return None
    if not cfg.cache:
        raise SaeforgeError("--similarity coactivation counts co-firing on activations, and no --cache was given",
                            "saeforge hierarchy link A/ B/ --similarity coactivation --cache TRAIN_CACHE --out tree.json")
    if cfg.tokens <= 0:
        raise SaeforgeError(f"--tokens must be positive, got {cfg.tokens}", "pass e.g. --tokens 262144")
    folder = cfg.matryoshka or cfg.saes[0]
    if not (Path(folder) / "cfg.json").is_file():
        raise SaeforgeError(f"{folder} is not an SAE folder (no cfg.json)", "pass SAE folders such as RUN/saes/NAME")
    meta = folder_metadata(folder)
    _check_cache_model(cfg.cache, meta)
    return cache_batches(cfg.cache, str(meta.get("hook_name")), cfg.tokens)  # read once, batch by batch


# ---------------------------------------------------------------------------------------------------- metrics
@dataclass(frozen=True)
class MetricsConfig:
    """Measure feature trees on held-out activations: P(parent | child), P(child | parent), Hamming distance between
    a parent and the OR of its children, and each level's L0 and explained variance. Several trees are measured on
    the same tokens and shown side by side."""

    trees: tuple[str, ...] = field(default=(), positional=True, nargs="*")
    """tree.json files, or folders holding one (an HSAE's SAE folder)."""
    names: tuple[str, ...] = ()
    """A label per tree for the table (default: the file's folder name)."""
    corpus: str = "embedded:validation"
    """Held-out text run through the model (ignored with --cache)."""
    cache: str = ""
    """Measure on this activation cache instead (saeforge cache, the site the SAEs read)."""
    tokens: int = 32_768
    """Token positions to measure on."""
    model: str = ""
    """Model; empty: the one the SAEs were trained on (their metadata)."""
    context_length: int = 0
    """Tokens per context; 0: the SAEs' training context length."""
    batch_size: int = 8
    """Contexts per forward pass."""
    device: str = "auto"
    """auto, cpu or cuda."""
    out: str = ""
    """JSON file for all results (each tree's full figures also go beside it, as <tree>.metrics.json)."""
    progress: bool = True
    """Show a progress bar."""


def open_tree(path: str | Path):
    from saeforge.hierarchy.tree import TREE_FILE, FeatureTree

    p = Path(path)
    return FeatureTree.load(p / TREE_FILE if p.is_dir() else p), (p / TREE_FILE if p.is_dir() else p)


def _check_cache_model(cache: str, sae_meta: dict) -> None:
    """Refuse a cache of another model than the SAEs' (the same site name and width would measure garbage)."""
    from saeforge.data.activation_cache import ActivationCache

    info = ActivationCache(cache).data_info()
    for key in ("model_fingerprint", "model_name"):  # the fingerprint where both have one, else the name
        ours, theirs = sae_meta.get(key), info.get(key)
        if ours and theirs:
            if ours != theirs:
                raise SaeforgeError(
                    f"the cache {cache} holds activations of model {info.get('model_name')!r} ({key} {theirs}), "
                    f"the SAEs read model {sae_meta.get('model_name')!r} ({key} {ours})",
                    f"cache held-out text of the SAEs' model: saeforge cache --model {sae_meta.get('model_name')} "
                    f"--sites {sae_meta.get('hook_name')} --corpus embedded:validation --out VAL_CACHE, then pass "
                    f"--cache VAL_CACHE")
            return


def measure_trees(trees: list, cfg: MetricsConfig) -> list:
    """Every tree's :class:`TreeMetrics` on the same activations (all trees must read one site of one model)."""
    from saeforge.hierarchy.data import cache_batches, folder_metadata, text_batches
    from saeforge.hierarchy.metrics import tree_metrics
    from saeforge.models.loading import resolve_device

    device = resolve_device(cfg.device)
    metas = [folder_metadata(t.sae_folder(0)) for t in trees]
    sites = {m.get("hook_name") for m in metas}
    models = {m.get("model_fingerprint") or m.get("model_name") for m in metas}
    if None in sites or len(sites) != 1:
        raise SaeforgeError(f"the trees' SAEs read different or unknown sites: {sorted(map(str, sites))}",
                            "measure trees of SAEs trained on one site together")
    if len(models) > 1:
        raise SaeforgeError(f"the trees' SAEs come from different models: {sorted(map(str, models))}",
                            "measure trees of one model's SAEs together")
    site = sites.pop()
    levels = [t.load_levels(device=device) for t in trees]  # checks every tree against its SAEs before any work
    if cfg.cache:
        _check_cache_model(cfg.cache, metas[0])

        def batches():
            return cache_batches(cfg.cache, site, cfg.tokens)
    else:
        from saeforge.models.language_model import LanguageModel

        meta = metas[0]
        model = cfg.model or meta.get("model_name")
        if not model:
            raise SaeforgeError("the SAEs' metadata does not name their model", "pass --model (or --cache)")
        lm = LanguageModel.load(model, device=cfg.device)
        ctx = cfg.context_length or int(meta.get("context_size") or 128)
        if meta.get("dataset_path") == cfg.corpus:
            raise SaeforgeError(f"the SAEs were trained on {cfg.corpus}; measuring on it overstates them",
                                "pass held-out text: --corpus embedded:validation (or another file)")
        acts = list(text_batches(lm, site, cfg.corpus, cfg.tokens, context_length=ctx,
                                 prepend_bos=bool(meta.get("prepend_bos", True)),
                                 exclude_special_tokens=bool(meta.get("exclude_special_tokens", True)),
                                 batch_contexts=cfg.batch_size))

        def batches():
            return iter(acts)
    return [tree_metrics(t, batches(), levels=lv, device=device, progress=cfg.progress) for t, lv in zip(trees, levels)]


def format_table(rows: list[tuple[str, dict]]) -> str:
    head = "| tree | levels | L0 per level | explained variance per level | P(parent|child) | P(child|parent) | " \
           "Hamming / 1k tokens |\n|---|---|---|---|---:|---:|---:|"

    def f(v, d=3):
        return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{d}f}"

    lines = [head]
    for name, s in rows:
        lv = s["levels"]
        lines.append(f"| {name} | {' / '.join(str(x['width']) for x in lv)} | "
                     f"{' / '.join(f(x['l0'], 1) for x in lv)} | {' / '.join(f(x['explained_variance']) for x in lv)} | "
                     f"{f(s['p_parent_given_child'])} | {f(s['p_child_given_parent'])} | {f(s['hamming_per_1k'], 1)} |")
    return "\n".join(lines)


def run_metrics(cfg: MetricsConfig) -> dict[str, Any]:
    if not cfg.trees:
        raise SaeforgeError("no tree given", "saeforge hierarchy metrics RUN/saes/hsae posthoc_tree.json")
    if cfg.names and len(cfg.names) != len(cfg.trees):
        raise SaeforgeError(f"{len(cfg.names)} names for {len(cfg.trees)} trees", "give one --names entry per tree")
    if cfg.tokens <= 0:
        raise SaeforgeError(f"--tokens must be positive, got {cfg.tokens}", "pass e.g. --tokens 32768")
    opened = [open_tree(t) for t in cfg.trees]
    names = list(cfg.names) or [p.parent.name if p.name == "tree.json" else p.stem for _, p in opened]
    results = measure_trees([t for t, _ in opened], cfg)
    out: dict[str, Any] = {"corpus": None if cfg.cache else cfg.corpus, "cache": cfg.cache or None, "trees": {}}
    for name, (tree, path), m in zip(names, opened, results):
        full = m.to_dict()
        atomic_write_json(path.with_name(path.stem + ".metrics.json"), full)
        out["trees"][name] = {"path": str(path), **m.summary()}
    if cfg.out:
        atomic_write_json(cfg.out, out)
    print(format_table([(n, out["trees"][n]) for n in names]))
    return out


# ---------------------------------------------------------------------------------------------------- judge
@dataclass(frozen=True)
class JudgeConfig:
    """Ask an LLM, for random parent/child pairs of a tree (and as many control pairs), whether the child is a
    sub-concept of the parent; examples come from the feature store of the harvested SAEs."""

    tree: str = field(default="", positional=True)
    """A tree.json (or a folder holding one)."""
    store: str = field(default="", positional=True)
    """The feature store (features.sqlite) of a harvest that covers the tree's SAEs."""
    pairs: int = 100
    """Random parent/child pairs to judge (each with one control pair)."""
    backend: str = "local"
    """local (a Hugging Face model, the embedded one by default) or openai (any OpenAI-compatible endpoint)."""
    model: str = ""
    """Judge model: for local, empty is the embedded SmolLM2; for openai, the served model's name."""
    seed: int = 0
    """Seed for choosing pairs and examples."""
    device: str = "auto"
    """Device of a local judge."""
    out: str = ""
    """JSON file for the verdicts (default: <tree>.judge.json beside the tree)."""
    progress: bool = True
    """Show a progress bar."""


def run_judge(cfg: JudgeConfig) -> dict[str, Any]:
    from saeforge.features.autointerp.backends import make_backend
    from saeforge.features.store import FeatureStore
    from saeforge.hierarchy.judge import judge_tree, store_names

    if not cfg.tree or not cfg.store:
        raise SaeforgeError("give a tree and a feature store",
                            "saeforge hierarchy judge RUN/saes/hsae RUN/features.sqlite")
    if cfg.pairs <= 0:
        raise SaeforgeError(f"--pairs must be positive, got {cfg.pairs}", "pass e.g. --pairs 100")
    tree, path = open_tree(cfg.tree)
    with FeatureStore(cfg.store, readonly=True) as store:
        names = store_names(tree, store)  # before loading a judge model
        backend = make_backend(cfg.backend, cfg.model, device=cfg.device)
        result = judge_tree(tree, store, backend, pairs=cfg.pairs, seed=cfg.seed, names=names,
                            progress=cfg.progress)
    atomic_write_json(cfg.out or path.with_name(path.stem + ".judge.json"), result)
    fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    print(f"judge {result['judge']}: {result['pairs']} pairs, yes rate {fmt(result['yes_rate'])} (control pairs "
          f"{fmt(result['control_yes_rate'])}, gap {fmt(result['gap'])})")
    return result


# ---------------------------------------------------------------------------------------------------- store links
@dataclass(frozen=True)
class StoreLinksConfig:
    """Write a tree's parent → child pairs into a feature store's links table (kind "parent"), so the store answers
    "what are this feature's parent and children" without the tree file; a rebuilt tree replaces the old links."""

    tree: str = field(default="", positional=True)
    """A tree.json (or a folder holding one, e.g. an HSAE's SAE folder)."""
    store: str = field(default="", positional=True)
    """The feature store (features.sqlite) of a harvest that covers every level's SAE."""


def run_store_links(cfg: StoreLinksConfig) -> int:
    from saeforge.features.store import FeatureStore
    from saeforge.hierarchy.links import write_tree_links

    if not cfg.tree or not cfg.store:
        raise SaeforgeError("give a tree and a feature store",
                            "saeforge hierarchy store-links RUN/saes/hsae RUN/features.sqlite")
    tree, path = open_tree(cfg.tree)
    tree.load_levels()  # the tree must match the SAEs' weights before it is written anywhere
    with FeatureStore(cfg.store) as store:
        n = write_tree_links(tree, store)
    print(f"{n} parent → child links of {path} → {cfg.store}")
    return n


# ---------------------------------------------------------------------------------------------------- absorption
@dataclass(frozen=True)
class AbsorptionConfig:
    """Feature absorption and splitting on the first-letter task (SAEBench's, adapted to the model's tokenizer) for
    several SAEs of one site, on the same words and residual probes."""

    saes: tuple[str, ...] = field(default=(), positional=True, nargs="*")
    """SAE folders (e.g. RUN/saes/topk RUN/saes/hsae/levels/level_1), all reading one site of one model."""
    names: tuple[str, ...] = ()
    """A label per SAE for the table (default: the folder names)."""
    words: int = 3000
    """Single-token words sampled from the vocabulary (four fifths train the probes, one fifth tests them)."""
    seed: int = 0
    """Seed for the word sample and the train/test split."""
    model: str = ""
    """Model; empty: the one the SAEs were trained on."""
    device: str = "auto"
    """auto, cpu or cuda."""
    out: str = "absorption.json"
    """Where to write the scores (per SAE and per letter)."""


def run_absorption(cfg: AbsorptionConfig) -> dict[str, Any]:
    from saeforge.hierarchy.absorption import absorption_table, first_letter_activations
    from saeforge.hierarchy.data import folder_metadata
    from saeforge.models.language_model import LanguageModel
    from saeforge.runs import _read_folder

    if not cfg.saes:
        raise SaeforgeError("no SAE given", "saeforge hierarchy absorption RUN/saes/topk RUN/saes/matryoshka")
    if cfg.names and len(cfg.names) != len(cfg.saes):
        raise SaeforgeError(f"{len(cfg.names)} names for {len(cfg.saes)} SAEs", "give one --names entry per SAE")
    if cfg.words < 200:
        raise SaeforgeError(f"--words {cfg.words} is too few to train 26 probes", "pass --words 3000")
    metas = [folder_metadata(f) for f in cfg.saes]
    sites = {m.get("hook_name") for m in metas}
    models = {m.get("model_fingerprint") or m.get("model_name") for m in metas}
    if None in sites or len(sites) != 1 or len(models) != 1:
        raise SaeforgeError(f"the SAEs read different sites or models ({sorted(map(str, sites | models))})",
                            "compare SAEs of one site of one model")
    saes = {name: _read_folder(Path(f))[0].eval()
            for name, f in zip(cfg.names or [Path(f).name for f in cfg.saes], cfg.saes)}
    model = cfg.model or metas[0].get("model_name")
    if not model:
        raise SaeforgeError("the SAEs' metadata does not name their model", "pass --model")
    lm = LanguageModel.load(model, device=cfg.device)
    site = sites.pop()
    data = first_letter_activations(lm, site, n_words=cfg.words, seed=cfg.seed)
    table = absorption_table(data, {k: v.to(lm.device) for k, v in saes.items()})
    out = {"site": site, "model": model, "words": len(data.words), "saes": table}
    atomic_write_json(cfg.out, out)
    print("| SAE | letters | mean absorption | full absorption | latents per letter (splitting) |\n|---|---:|---:|---:|---:|")
    for name, r in table.items():
        print(f"| {name} | {r['letters']} | {r['mean_absorption']:.3f} | {r['mean_full_absorption']:.3f} | "
              f"{r['mean_split']:.2f} |")
    return out


HIERARCHY_ACTIONS: dict[str, tuple[type, Callable, str]] = {
    "link": (LinkConfig, run_link, "build a tree from SAEs of growing widths (post-hoc) or a Matryoshka's groups"),
    "metrics": (MetricsConfig, run_metrics, "measure trees: P(parent|child), P(child|parent), Hamming, L0, FVE"),
    "judge": (JudgeConfig, run_judge, "LLM judge: is the child a sub-concept of the parent?"),
    "absorption": (AbsorptionConfig, run_absorption, "first-letter absorption and splitting (SAEBench) of SAEs"),
    "store-links": (StoreLinksConfig, run_store_links,
                    "write a tree's parent → child pairs into a feature store"),
}

