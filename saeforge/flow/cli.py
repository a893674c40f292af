"""``saeforge flow ...``: the subcommands and ``flow match``."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from simple_parsing.helpers import field

from saeforge.errors import SaeforgeError
from saeforge.options import DeviceOptions, RunModelOptions, flat_options
from saeforge.flow.data import with_threads
from saeforge.flow.matching import METHODS, check_threshold, compare_saes, pearson_match
from saeforge.flow.suite import KINDS, open_suite, parse_layers, site_name


@flat_options
@dataclass(frozen=True)
class MatchConfig:
    """Match features across the suite's layers: each residual feature of layer L against the residual SAE of L-1
    and the MLP and attention SAEs of L (s^(R), s^(M), s^(A)), by decoder cosine (top1, topk, permutation) or by
    the Pearson correlation of activations. The tables go to SUITE/flow/matches/. With --a and --b: compare two
    SAEs of one site (another seed or width): the share of features with a match above each threshold."""

    suite: str = field(default="", positional=True)
    """The suite (run directory or assembled suite folder)."""
    layers: str = ""
    """Layers whose residual features to match (e.g. 10-13); empty: every layer with all its predecessors."""
    methods: tuple[str, ...] = ("top1", "topk")
    """Matching methods: top1, topk, permutation (one-to-one, Hungarian), pearson (needs the model and text)."""
    k: int = 5
    """Matches kept per feature by topk (and pearson)."""
    residual_threshold: float = 0.5
    """A residual feature counts as translated from the layer before when s^(R) ≥ this (the summary's groups)."""
    module_threshold: float = 0.15
    """...and as processed by the MLP/attention when s^(M) or s^(A) ≥ this."""
    a: str = ""
    """Compare mode: an SAE folder or file (or a site of the suite)."""
    b: str = ""
    """Compare mode: the SAE to compare --a with."""
    thresholds: tuple[float, ...] = (0.5, 0.7, 0.9)
    """Compare mode: cosine thresholds for the share of matched features."""
    corpus: str = "embedded:validation"
    """pearson: the text whose activations are correlated."""
    pearson_contexts: int = 64
    """pearson: contexts read (every SAE-data token of each is used)."""
    context_length: int = 128
    """pearson: tokens per context."""
    model_options: RunModelOptions = field(default_factory=RunModelOptions)
    """The model the SAEs read."""
    device_options: DeviceOptions = field(default_factory=DeviceOptions)
    """Where the model runs."""
    threads: int = 0
    """CPU threads for PyTorch; 0: automatic (fewer when other work keeps the CPUs busy)."""
    store_links: bool = True
    """Also write the matches into the suite's feature store (SUITE/features.sqlite, made by saeforge harvest SUITE)
    when it has one, as links of kind flow:METHOD, so the store's predecessors/successors and the dashboard's feature
    pages show them; --nostore-links writes only the tables."""


def _compare(cfg: MatchConfig) -> dict[str, Any]:
    from saeforge.flow.suite import SuiteSAE, check_same_space, parse_site, read_sae
    from saeforge.utils.atomic import atomic_write_json

    def one(spec: str) -> SuiteSAE:
        if cfg.suite and parse_site(spec):
            return open_suite(cfg.suite).get(spec)
        sae, meta = read_sae(Path(spec))
        return SuiteSAE(spec, -1, "", sae, Path(spec), meta)

    for t in cfg.thresholds:
        check_threshold(t, "thresholds")
    a, b = one(cfg.a), one(cfg.b)
    check_same_space(a, b)
    report = compare_saes(a.sae.W_dec, b.sae.W_dec, cfg.thresholds, a=str(a.path), b=str(b.path))
    print(f"{a.path} ({report['d_a']} features) vs {b.path} ({report['d_b']} features)")
    print(f"  mean best cosine: a in b {report['mean_best_cosine_a_in_b']:.3f}, b in a "
          f"{report['mean_best_cosine_b_in_a']:.3f}; mutual top-1 {report['mutual_top1']:.1%}")
    for t in cfg.thresholds:
        print(f"  share with a match ≥ {t}: a {report['share_a_matched'][str(t)]:.1%}, "
              f"b {report['share_b_matched'][str(t)]:.1%}")
    if cfg.suite:
        atomic_write_json(Path(cfg.suite) / "flow" / "compare.json", report)
    return report


@with_threads
def run_match(cfg: MatchConfig) -> dict[str, Any]:
    from saeforge.features.store import STORE_FILE, WRITER_LOCK, FeatureStore
    from saeforge.flow.links import save_matches, write_store_links
    from saeforge.flow.matching import predecessor_matches
    from saeforge.utils.atomic import atomic_write_json
    from saeforge.utils.locking import exclusive_lock

    if cfg.a or cfg.b:
        if not (cfg.a and cfg.b):
            raise SaeforgeError("compare mode needs both --a and --b", "saeforge flow match --a SAE_A --b SAE_B")
        return _compare(cfg)
    if not cfg.suite:
        raise SaeforgeError("no suite given", "saeforge flow match SUITE_DIR (or --a SAE --b SAE to compare two)")
    bad = [m for m in cfg.methods if m not in METHODS]
    if bad:
        raise SaeforgeError(f"unknown matching method(s) {', '.join(bad)}", f"use {', '.join(METHODS)}")
    check_threshold(cfg.residual_threshold, "residual_threshold")
    check_threshold(cfg.module_threshold, "module_threshold")
    suite = open_suite(cfg.suite)
    layers = parse_layers(cfg.layers) if cfg.layers else suite.analysable_layers()
    if not layers:
        raise SaeforgeError(f"the suite {cfg.suite} has no layer with R_L, M_L, A_L and R_(L-1)",
                            "train a suite over at least one layer plus its input: saeforge flow suite --layers 8-9")
    suite.require(layers)
    summary: dict[str, Any] = {"layers": {}, "methods": list(cfg.methods), "k": cfg.k,
                               "residual_threshold": cfg.residual_threshold, "module_threshold": cfg.module_threshold}
    store_path = Path(cfg.suite) / STORE_FILE
    with contextlib.ExitStack() as held:
        held.enter_context(exclusive_lock(Path(cfg.suite) / "flow", "saeforge flow match"))
        if cfg.store_links and store_path.is_file():
            # the store's writers (harvest, explain) are refused for the run, and refuse it, before the slow work
            held.enter_context(exclusive_lock(Path(cfg.suite), WRITER_LOCK))
            FeatureStore.ensure_current(store_path)  # a damaged store fails here; an older one is migrated
            summary["store_links"] = {"links": 0, "tables": 0, "skipped": []}
        pearson_acts = _pearson_activations(cfg, suite, layers) if "pearson" in cfg.methods else None
        t0 = time.time()
        for L in layers:
            row: dict[str, Any] = {}
            written = []
            for method in cfg.methods:
                if method == "pearson":
                    target = site_name(L, "resid_post")
                    tables = {}
                    for letter, kind, off in (("R", "resid_post", -1), ("M", "mlp_out", 0), ("A", "attn_out", 0)):
                        pred = site_name(L + off, kind)
                        tables[letter] = pearson_match(pearson_acts[target], pearson_acts[pred], k=cfg.k, a=target,
                                                       b=pred)
                else:
                    tables = predecessor_matches(suite, L, method, k=cfg.k)
                for m in tables.values():
                    save_matches(cfg.suite, m)
                written += tables.values()
                row[method] = _layer_summary(tables, cfg.residual_threshold, cfg.module_threshold)
            if "store_links" in summary:
                done = write_store_links(store_path, written)
                summary["store_links"]["links"] += done["links"]
                summary["store_links"]["tables"] += done["tables"]
                summary["store_links"]["skipped"] += done["skipped"]
            row["random_baseline_s"] = _random_baseline(suite, L)
            summary["layers"][str(L)] = row
            s = row[cfg.methods[0]]
            print(f"layer {L:>3} ({cfg.methods[0]}): mean s^(R) {s['mean_s']['R']:.3f}, s^(M) {s['mean_s']['M']:.3f}, "
                  f"s^(A) {s['mean_s']['A']:.3f} | translated {s['groups']['translated']:.1%}, processed "
                  f"{s['groups']['processed']:.1%}, newborn {s['groups']['newborn']:.1%}, unexplained "
                  f"{s['groups']['unexplained']:.1%} (random directions: s {row['random_baseline_s']:.3f})", flush=True)
        summary["seconds"] = time.time() - t0
        atomic_write_json(Path(cfg.suite) / "flow" / "match_summary.json", summary)
    print(f"matched {len(layers)} layer(s) in {summary['seconds']:.1f} s; tables in {Path(cfg.suite) / 'flow/matches'}")
    if "store_links" in summary:
        _print_store_links(summary["store_links"], store_path)
    elif cfg.store_links:
        print(f"no feature store at {store_path}: the links go into it once it exists (saeforge harvest "
              f"{cfg.suite}, then saeforge flow match {cfg.suite} again)")
    return summary


def _print_store_links(done: dict[str, Any], store_path: Path) -> None:
    print(f"feature store: {done['links']:,} links of {done['tables']} tables written into {store_path}"
          + (f"; skipped {len(done['skipped'])} table(s) whose SAEs it does not hold" if done["skipped"] else ""))


def _random_baseline(suite, layer: int) -> float:
    """Mean top-1 cosine of R_L's features against random directions as many as M_L has: what s scores reach by
    chance (about sqrt(2 ln n / d); 0.16 for 2,304 features in 576 dimensions), so thresholds can be set above it."""
    import torch

    from saeforge.flow.matching import match_decoders

    target, other = suite.sae(layer, "resid_post"), suite.sae(layer, "mlp_out")
    noise = torch.randn(other.d_sae, other.d_out, generator=torch.Generator().manual_seed(layer))
    return float(match_decoders(target.sae.W_dec, noise).s.mean())


def _layer_summary(tables: dict, t_res: float, t_mod: float) -> dict[str, Any]:
    """Mean s scores and the paper's four readings of (s^(R), s^(M), s^(A)): (A) translated: high s^(R), low
    modules; (B) processed: high s^(R) and a high module; (C) newborn: low s^(R), a high module; (D) unexplained."""
    s = {k: m.s for k, m in tables.items()}
    hi_r = s["R"] >= t_res
    hi_m = (s["M"] >= t_mod) | (s["A"] >= t_mod)
    n = float(len(hi_r))
    return {"mean_s": {k: float(v.mean()) for k, v in s.items()},
            "groups": {"translated": float((hi_r & ~hi_m).sum()) / n, "processed": float((hi_r & hi_m).sum()) / n,
                       "newborn": float((~hi_r & hi_m).sum()) / n, "unexplained": float((~hi_r & ~hi_m).sum()) / n}}


def _pearson_activations(cfg: MatchConfig, suite, layers: list[int]) -> dict:
    from saeforge.flow.data import encode_sites, sample_tokens

    lm = suite.load_model(cfg.model, cfg.device)
    bound = suite.bind(lm)
    sites = sorted({site_name(L, k) for L in layers for k in KINDS} | {site_name(L - 1, "resid_post") for L in layers})
    sample = sample_tokens(lm, cfg.corpus, contexts=cfg.pearson_contexts, context_length=cfg.context_length,
                           per_context=1)
    acts = encode_sites(lm, bound, sample.ids, sites)
    keep = sample.keep
    return {s: a[keep] for s, a in acts.items()}


@dataclass(frozen=True)
class LinksConfig:
    """A feature's predecessors (the features of R_(L-1), M_L and A_L it was matched to) and successors (the features
    of later sites matched to it), from the tables of saeforge flow match, with the explanations or top tokens of the
    suite's feature store when there is one. With --sync: copy every stored table into the feature store (after
    saeforge harvest made a new one, which starts without links)."""

    suite: str = field(default="", positional=True)
    """The suite."""
    feature: str = ""
    """The feature: layers.L.SITE:INDEX (e.g. layers.12.resid_post:2085)."""
    method: str = "top1"
    """Matching method whose tables to read: top1, topk, permutation or pearson."""
    limit: int = 10
    """Successors listed at most (the most similar first)."""
    sync: bool = False
    """Copy every stored match table into SUITE/features.sqlite instead."""


def run_links(cfg: LinksConfig) -> dict[str, Any]:
    from saeforge.features.store import STORE_FILE, WRITER_LOCK, FeatureStore
    from saeforge.flow.graph import parse_feature
    from saeforge.flow.links import load_matches, predecessors, stored_tables, successors, write_store_links
    from saeforge.utils.locking import exclusive_lock

    if not cfg.suite:
        raise SaeforgeError("no suite given", "saeforge flow links SUITE_DIR --feature layers.L.resid_post:INDEX")
    suite = open_suite(cfg.suite)
    store_path = Path(cfg.suite) / STORE_FILE
    tables = stored_tables(cfg.suite)
    if cfg.sync:
        if not store_path.is_file():
            raise SaeforgeError(f"no feature store at {store_path}", f"saeforge harvest {cfg.suite}")
        if not tables:
            raise SaeforgeError(f"no match tables in {cfg.suite}", f"saeforge flow match {cfg.suite}")
        with exclusive_lock(Path(cfg.suite), WRITER_LOCK):
            done = write_store_links(store_path, (load_matches(cfg.suite, t["a"], t["b"], t["method"]) for t in tables))
        _print_store_links(done, store_path)
        return done
    if not cfg.feature:
        raise SaeforgeError("no feature given", f"saeforge flow links {cfg.suite} --feature layers.L.resid_post:INDEX "
                            "(or --sync)")
    if cfg.method not in METHODS:
        raise SaeforgeError(f"unknown matching method {cfg.method!r}", f"use {', '.join(METHODS)}")
    if cfg.limit < 1:
        raise SaeforgeError(f"--limit must be at least 1, got {cfg.limit}", "pass e.g. --limit 10")
    site, idx = parse_feature(cfg.feature)
    suite.get(site).check_feature(idx)
    if not any(t["method"] == cfg.method for t in tables):
        raise SaeforgeError(f"no {cfg.method} match tables in {cfg.suite}",
                            f"saeforge flow match {cfg.suite} --methods {cfg.method}")
    result = {"feature": cfg.feature, "method": cfg.method,
              "predecessors": predecessors(cfg.suite, site, idx, cfg.method),
              "successors": successors(cfg.suite, site, idx, cfg.method)[:cfg.limit]}
    notes: dict[tuple[str, int], str] = {}
    if store_path.is_file():
        with FeatureStore(store_path, readonly=True) as store:
            held = {s["name"] for s in store.saes()}
            wanted: dict[str, set[int]] = {}
            for row in [{"sae": site, "idx": idx}, *result["predecessors"], *result["successors"]]:
                if row["sae"] in held:
                    wanted.setdefault(row["sae"], set()).add(row["idx"])
            for name, idxs in wanted.items():
                for i, info in store.brief_features(name, idxs).items():
                    notes[(name, i)] = info.get("explanation") or ", ".join(
                        repr(t[0] if isinstance(t, (list, tuple)) else t) for t in (info.get("top_tokens") or [])[:3])
    print(f"{cfg.feature}  {notes.get((site, idx), '')}".rstrip())
    for key in ("predecessors", "successors"):
        print(f"  {key} ({cfg.method}):" + ("" if result[key] else " none stored"))
        for row in result[key]:
            name = f"{row['sae']}:{row['idx']}"
            print(f"    {name:<28} {row['weight']:.3f}  {notes.get((row['sae'], row['idx']), '')}".rstrip())
    return result


def flow_commands() -> dict[str, tuple[type, Callable, str]]:
    from saeforge.flow.deactivate import DeactivateConfig, run_deactivate
    from saeforge.flow.graph import GraphConfig, run_graph
    from saeforge.flow.groups import GroupsConfig, run_groups
    from saeforge.flow.steering import FlowSteerConfig, run_flow_steer
    from saeforge.flow.suite import AssembleConfig, SuiteConfig, assemble_suite, train_suite

    return {
        "suite": (SuiteConfig, train_suite, "train SAEs on resid_post, mlp_out and attn_out of a layer range in one "
                  "pass"),
        "assemble": (AssembleConfig, assemble_suite, "assemble a suite from SAEs trained elsewhere (Gemma Scope, "
                     "SAELens, sparsify...)"),
        "match": (MatchConfig, run_match, "match features across layers (s^(R), s^(M), s^(A)) or compare two SAEs"),
        "links": (LinksConfig, run_links, "a feature's predecessors and successors across layers (or --sync them "
                  "into the feature store)"),
        "graph": (GraphConfig, run_graph, "flow graph of a residual feature: JSON, DOT, SVG, PNG"),
        "groups": (GroupsConfig, run_groups, "origin groups on data: which matched predecessors are active"),
        "deactivate": (DeactivateConfig, run_deactivate, "deactivate features through their matched predecessors"),
        "steer": (FlowSteerConfig, run_flow_steer, "steer a theme along a flow graph: single-layer vs cumulative"),
    }
