"""The training config: one dataclass for the API, the CLI (field docstrings are the --help) and run.json."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from simple_parsing.helpers import field

from saeforge.errors import SaeforgeError
from saeforge.options import ModelOptions, RuntimeOptions, TextOptions, flat_dict, flat_options, from_flat_dict
from saeforge.saes import SAEConfig
from saeforge.saes.registry import DEFAULT_ARCHITECTURE, get_config_class, known_architectures


def _configs() -> dict[str, type[SAEConfig]]:
    return {a: get_config_class(a) for a in known_architectures()}


def _architectures(rule: Callable[[type[SAEConfig]], bool] = lambda c: True) -> str:
    """The architectures whose config class satisfies ``rule`` (for --help texts built from the declared rules)."""
    return ", ".join(a for a, c in _configs().items() if rule(c))


# Fields that may be overridden per SAE in the `saes:` list of a config file.
PER_SAE_FIELDS = ("architecture", "expansion_factor", "d_sae", "k", "sparsity_coefficient", "sae_options", "lr",
                  "dead_after_tokens")
# Fields that do not change what is computed, so a resumed run may differ in them.
RESUME_FREE_FIELDS = ("out", "resume", "config", "parallel", *(f.name for f in dataclasses.fields(RuntimeOptions)))
PARALLEL_MODES = ("data", "module", "latent")


@flat_options
@dataclass(frozen=True)
class TrainConfig:
    """Train one or more SAEs from the live model or from an activation cache."""

    out: str = ""
    """Run directory to create: run.json, checkpoints/, saes/<name>/, metrics.jsonl."""
    resume: str = ""
    """Resume the run in this directory. Other options may be left out; any given must match the saved run."""
    config: str = ""
    """YAML or JSON file with any of these options, plus `saes:` (a list of per-SAE settings, see the docs)."""

    # ---- data
    sites: tuple[str, ...] = ("layers.5.resid_post",)
    """Sites to train on: one SAE per site (unless a config file lists `saes`). A layer list stands for one site per
    layer (layers.0-5.mlp_in, layers.2,4,6.resid_post): one SAE each, or one cross-layer transcoder / crosscoder
    over all of them."""
    target_sites: tuple[str, ...] = ()
    """Sites the SAEs write, one per --sites entry: a transcoder reads its site and predicts this one (layers.5.mlp_in
    -> layers.5.mlp_out); a cross-layer transcoder gives a layer list (layers.0-5.mlp_out). Empty: SAEs."""
    cache: str = ""
    """Train from this activation cache folder (saeforge cache or import-activations) instead of running the model."""
    model_options: ModelOptions = field(default_factory=ModelOptions)
    """Live training only (a cache names its own model): the model."""
    text_options: TextOptions = field(default_factory=TextOptions)
    """Live training only (a cache holds its own activations): the text and its contexts."""
    tokens: int = 2_000_000
    """Training tokens (activation vectors); steps = tokens // batch_size."""
    batch_size: int = 4096
    """Activation vectors per step."""
    buffer_tokens: int = 65_536
    """Mixing-buffer size for live training: batches are drawn from this many shuffled vectors."""
    shards_per_fill: int = 2
    """Cache shards mixed into each buffer fill when training from a cache."""
    seed: int = 0
    """Seed for initialisation and shuffling; the same seed gives bit-identical results."""

    # ---- SAE
    architecture: str = field(default=DEFAULT_ARCHITECTURE, help=f"SAE architecture: {_architectures()}.")
    expansion_factor: int = 8
    """Latents per input dimension (d_sae = expansion_factor × d_in) unless --d-sae is given."""
    d_sae: int = 0
    """Number of latents; 0: expansion_factor × d_in."""
    k: int = field(default=32, help=f"Active latents per token ({_architectures(lambda c: c.uses_k)}).")
    sparsity_coefficient: float = field(default=-1.0, help=(
        "Sparsity coefficient (" + ", ".join(f"{a}: {c.sparsity_coefficient_field}" for a, c in _configs().items()
                                             if c.sparsity_coefficient_field)
        + "); negative: the architecture's default."))
    sae_options: str = ""
    """Other options of the architecture's config class as JSON, e.g. '{"b_dec_init": "mean"}'."""
    normalize_activations: str = "expected_norm"
    """Input scaling estimated from data and folded into the saved SAE: expected_norm (E‖x‖=√d), unit_mean_squared, none."""
    dead_after_tokens: int = 0
    """A latent is dead after this many tokens without firing (dead-latent handling, stats); 0: the
    default (10M tokens, at most a fifth of the run)."""

    # ---- optimisation
    optimizer: str = "adam"
    """adam or adamw."""
    lr: float = 0.0
    """Learning rate; 0: the architecture's default, which may scale with d_sae and rise for short runs
    (docs/architecture.md, "Learning rate")."""
    adam_beta1: float = 0.9
    """Adam β1."""
    adam_beta2: float = 0.999
    """Adam β2."""
    adam_eps: float = 1e-8
    """Adam ε."""
    weight_decay: float = 0.0
    """Weight decay (adamw)."""
    lr_warmup_steps: int = 50
    """Linear learning-rate warm-up steps (capped at a twentieth of the run)."""
    lr_decay: str = "linear"
    """Learning-rate decay at the end of the run: linear, cosine or none."""
    lr_decay_fraction: float = 0.2
    """Fraction of the run, at its end, over which the learning rate decays to 0."""
    sparsity_warmup_fraction: float = 0.05
    """Fraction of the run over which the sparsity coefficient warms up linearly from 0."""
    grad_clip_norm: float = 1.0
    """Clip the gradient norm of each SAE to this; 0 turns clipping off."""

    # ---- bookkeeping
    checkpoint_every: int = 200
    """Write a checkpoint (atomically) every this many steps."""
    log_every: int = 20
    """Record metrics to metrics.jsonl every this many steps."""
    runtime_options: RuntimeOptions = field(default_factory=RuntimeOptions)
    """Where and how the run computes; a resumed run may change these."""
    parallel: str = "data"
    """Under torchrun (docs/distributed.md): data (every rank trains every SAE on its slice of each batch), module
    (each rank trains its share of the SAEs on whole batches) or latent (each SAE split over the ranks by its latents,
    with a distributed top-k: for SAEs too wide for one GPU; docs/distributed.md says which SAEs can be). Ignored in one process; a resumed run may change it."""

    saes: tuple[dict, ...] = field(default=(), cmd=False)
    """(config files only) per-SAE settings: each needs `site` (a site, a layer list or a list of sites), may set
    `name`, `target_site` (what it writes: a transcoder, or a CLT's list) and any of: architecture,
    expansion_factor, d_sae, k, sparsity_coefficient, sae_options, lr, dead_after_tokens."""

    # ------------------------------------------------------------------------------------------------------
    def validate(self) -> None:
        def need(ok: bool, problem: str, fix: str) -> None:
            if not ok:
                raise SaeforgeError(problem, fix)

        need(self.tokens > 0, f"--tokens must be positive, got {self.tokens}", "pass e.g. --tokens 2000000")
        need(self.batch_size > 0, f"--batch-size must be positive, got {self.batch_size}",
             "pass e.g. --batch-size 4096")
        need(self.tokens >= self.batch_size, f"--tokens {self.tokens} is less than one batch of {self.batch_size}",
             f"pass --tokens {self.batch_size} or more, or a smaller --batch-size")
        need(math.isfinite(self.lr) and self.lr >= 0, f"the learning rate must be positive, got {self.lr}",
             "pass --lr with a positive value such as 3e-4 (or 0 for the architecture default)")
        need(self.optimizer in ("adam", "adamw"), f"unknown optimizer {self.optimizer!r}",
             "pass --optimizer adam or --optimizer adamw")
        need(self.checkpoint_every > 0 and self.log_every > 0, "checkpoint_every and log_every must be positive",
             "pass e.g. --checkpoint-every 200 --log-every 20")
        need(0 <= self.lr_decay_fraction <= 1 and 0 <= self.sparsity_warmup_fraction <= 1,
             "lr_decay_fraction and sparsity_warmup_fraction must lie in [0, 1]",
             "pass e.g. --lr-decay-fraction 0.2 --sparsity-warmup-fraction 0.05")
        need(self.threads >= 0, f"--threads must be 0 (automatic) or positive, got {self.threads}",
             "pass --threads 0")
        need(bool(self.sites) or bool(self.saes), "no sites to train on", "pass --sites layers.5.resid_post")
        need(self.parallel in PARALLEL_MODES, f"unknown --parallel {self.parallel!r}",
             "pass --parallel data, --parallel module or --parallel latent")
        need(not self.target_sites or len(self.target_sites) == len(self.sites),
             f"--target-sites gives {len(self.target_sites)} site(s) for {len(self.sites)} --sites",
             "give one target site per site, e.g. --sites layers.5.mlp_in --target-sites layers.5.mlp_out")
        self.sae_option_dict()
        from saeforge.runs import SiteBinding, check_site_order

        for spec in self.sae_specs():
            binding = SiteBinding(spec["reads"], spec["writes"])
            check_site_order(binding, where=f"SAE {spec['name']!r}")
            get_config_class(spec["architecture"]).for_binding(binding.kind)
            v = spec.get("lr", 0.0)
            need(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0,
                 f"SAE {spec['name']!r}: learning rate must be positive, got {v!r}",
                 "give its `saes:` entry in the config file a positive `lr:` (or 0 for the architecture default)")
        labelled = [spec["name"] for spec in self.sae_specs() if label_site(spec)]
        need(not labelled or bool(self.cache),
             f"SAE(s) {', '.join(labelled)} train on per-token labels, which only an activation cache holds",
             "write the activations and labels as a cache (ActivationCache.from_arrays(out, {site: acts, "
             "'concepts': labels})) and pass --cache DIR")
        if labelled and self.cache:
            from saeforge.data.activation_cache import ActivationCache

            held = ActivationCache(self.cache).sites
            for spec in self.sae_specs():
                need(label_site(spec) is None or label_site(spec) in held,
                     f"SAE {spec['name']!r} trains on the labels at the cache site {label_site(spec)!r}, which the "
                     f"cache {self.cache} does not hold (it holds {', '.join(held)})",
                     "write the labels into the cache beside the activations (ActivationCache.from_arrays(out, "
                     "{site: acts, 'concepts': labels})), or name the site holding them: --sae-options "
                     "'{\"label_site\": \"SITE\"}'")
        if not self.cache:  # the live model: what can be checked before it loads
            from saeforge.data.text_source import TextSource
            from saeforge.models.sites import check_sites_before_loading

            TextSource(self.corpus, self.text_field).check()
            check_sites_before_loading(self.model, self.needed_sites())

    def sae_option_dict(self) -> dict[str, Any]:
        return parse_sae_options(self.sae_options)

    def sae_specs(self) -> list[dict[str, Any]]:
        """One dict per dictionary to train: name, ``reads`` and ``writes`` (tuples of sites), ``site``/``target_site``
        (the first of each; ``target_site`` None for an SAE) and the per-SAE fields, defaults filled from this config.

        A site entry may be a layer list (:func:`expand_sites`): an architecture that trains one dictionary per site
        gets one per layer (paired with the target sites, if any), one over several sites (a cross-layer transcoder,
        a crosscoder: its config class says so) gets them all."""
        base = {f: getattr(self, f) for f in PER_SAE_FIELDS}
        if self.saes:
            entries = list(self.saes)
        else:
            targets = list(self.target_sites) or [None] * len(self.sites)
            entries = [{"site": s, "target_site": t} if t else {"site": s} for s, t in zip(self.sites, targets)]
        specs: list[dict[str, Any]] = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or "site" not in entry:
                raise SaeforgeError(f"entry {i} of `saes` has no `site`", "give every SAE a `site:` in the config file")
            unknown = set(entry) - set(PER_SAE_FIELDS) - {"site", "name", "target_site"}
            if unknown:
                raise SaeforgeError(f"entry {i} of `saes` has unknown keys: {', '.join(sorted(unknown))}",
                                    f"use site, name, target_site, {', '.join(PER_SAE_FIELDS)}")
            spec = {**base, **entry}
            reads = expand_sites(entry["site"])
            writes = expand_sites(entry["target_site"]) if entry.get("target_site") else reads
            if get_config_class(spec["architecture"]).trains_several_sites():
                groups = [(tuple(reads), tuple(writes))]
            elif len(reads) != len(writes):
                raise SaeforgeError(f"entry {i} reads {len(reads)} site(s) ({', '.join(reads)}) but writes "
                                    f"{len(writes)} ({', '.join(writes)}), and {spec['architecture']!r} trains one "
                                    "dictionary per site", "give as many target sites as sites, or pass a cross-layer "
                                    "transcoder's --architecture (`saeforge train --help` lists them)")
            else:
                groups = [((r,), (w,)) for r, w in zip(reads, writes)]
            for r, w in groups:
                one = {**spec, "reads": r, "writes": w, "site": r[0], "target_site": None if w == r else w[0],
                       "_entry": i, "_explicit_name": entry.get("name")}
                one["name"] = entry.get("name") if len(groups) == 1 and entry.get("name") else (
                    entry["site"] if isinstance(entry["site"], str) and len(r) > 1 else r[0])
                specs.append(one)
        names: set[str] = set()
        for spec in specs:
            if not spec.pop("_explicit_name") and sum(s["name"] == spec["name"] for s in specs) > 1:
                spec["name"] = f"{spec['name']}-{spec['_entry']}"
            spec.pop("_entry")
            if spec["name"] in names:
                raise SaeforgeError(f"two SAEs are named {spec['name']!r}",
                                    "give them distinct `name:`s in the config file")
            names.add(spec["name"])
        return specs

    def needed_sites(self) -> list[str]:
        out: list[str] = []
        for spec in self.sae_specs():
            for s in spec["reads"] + spec["writes"] + tuple(filter(None, [label_site(spec)])):
                if s not in out:
                    out.append(s)
        return out

    def to_dict(self) -> dict[str, Any]:
        """The flat mapping config files and run.json hold (option groups flattened)."""
        return flat_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; also reads run.json files of older versions (options they lack take their
        defaults) and option groups written as nested mappings."""
        return from_flat_dict(cls, d, tuple_fields=("sites", "target_sites", "saes"), what="training option")

    def differences(self, other: TrainConfig, fields: list[str] | None = None) -> list[str]:
        """Human-readable differences in the fields that determine the result."""
        mine, theirs = self.to_dict(), other.to_dict()
        keys = fields if fields is not None else list(mine)
        return [f"{k}: saved {theirs[k]!r}, given {mine[k]!r}" for k in keys
                if k in mine and k not in RESUME_FREE_FIELDS and mine[k] != theirs[k]]


_LAYER_LIST = re.compile(r"^(?P<head>(?:\w+--)?(?:.*\.)?(?:layers|h|blocks)\.)(?P<layers>[0-9][0-9,\-]*)(?P<tail>(?:\..*)?)$")


def expand_sites(spec: str | list | tuple) -> list[str]:
    """A site, a list of sites, or a layer list as one string: ``layers.0-3.mlp_in`` -> layers 0, 1, 2, 3;
    ``layers.2,4,6.resid_post`` -> layers 2, 4, 6 (ranges and commas mix: ``layers.0-2,5.x``). Layers must go up,
    each once; the model or the cache says whether they exist."""
    if isinstance(spec, (list, tuple)):
        out = [s for item in spec for s in expand_sites(item)]
        if not out:
            raise SaeforgeError("an empty list of sites", "give at least one site, e.g. layers.5.resid_post")
        return out
    if not isinstance(spec, str) or not spec:
        raise SaeforgeError(f"a site must be a non-empty string, got {spec!r}", "e.g. layers.5.resid_post")
    m = _LAYER_LIST.match(spec)
    if not m or ("," not in m["layers"] and "-" not in m["layers"]):
        return [spec]
    layers: list[int] = []
    for part in m["layers"].split(","):
        bounds = part.split("-")
        if len(bounds) > 2 or not all(b.isdigit() for b in bounds):
            raise SaeforgeError(f"cannot read the layer list {m['layers']!r} in {spec!r}",
                                "write layers as ranges and commas, e.g. layers.0-5.mlp_in or layers.2,4,6.resid_post")
        lo, hi = int(bounds[0]), int(bounds[-1])
        if hi < lo:
            raise SaeforgeError(f"the layer range {part} in {spec!r} goes down",
                                f"write it upwards: {m['head']}{hi}-{lo}{m['tail']}")
        layers.extend(range(lo, hi + 1))
    if layers != sorted(set(layers)):
        raise SaeforgeError(f"the layers of {spec!r} ({', '.join(map(str, layers))}) are out of order or repeat one",
                            f"list each layer once, in increasing order: "
                            f"{m['head']}{','.join(map(str, sorted(set(layers))))}{m['tail']}")
    return [f"{m['head']}{layer}{m['tail']}" for layer in layers]


def label_site(spec: dict[str, Any]) -> str | None:
    """The cache site holding the per-token labels one SAE of ``sae_specs()`` trains on, if its architecture needs
    labels (:meth:`~saeforge.saes.SAEConfig.label_site_for`)."""
    return get_config_class(spec["architecture"]).label_site_for(parse_sae_options(spec["sae_options"]))


def parse_sae_options(options: str | dict | None) -> dict[str, Any]:
    """``--sae-options`` (a JSON object, or already a dict in a config file) as a dict."""
    if not options:
        return {}
    if isinstance(options, dict):
        return dict(options)
    try:
        opts = json.loads(options)
    except json.JSONDecodeError as err:
        raise SaeforgeError(f"--sae-options is not valid JSON: {err}",
                            """pass a JSON object, e.g. --sae-options '{"b_dec_init": "mean"}'""") from err
    if not isinstance(opts, dict):
        raise SaeforgeError("--sae-options must be a JSON object",
                            """pass e.g. --sae-options '{"b_dec_init": "mean"}'""")
    return opts


def non_default_fields(cfg: TrainConfig) -> list[str]:
    """The options of ``cfg`` that differ from the defaults (what an API caller "gave")."""
    mine, default = cfg.to_dict(), TrainConfig().to_dict()
    return [k for k in mine if mine[k] != default[k]]


def resolve_config(cfg: TrainConfig, given: list[str]) -> TrainConfig:
    """Lay the explicitly given options over the config file's (``--config``), if there is one."""
    if not cfg.config:
        return cfg
    data = load_config_file(cfg.config)
    base = TrainConfig.from_dict({**data, "config": cfg.config})
    return dataclasses.replace(base, **{f: getattr(cfg, f) for f in given if f != "config"})


def load_config_file(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise SaeforgeError(f"config file {path} does not exist", "check the path given to --config")
    text = p.read_text()
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as err:
        raise SaeforgeError(f"could not parse config file {path}: {err}", "fix the YAML/JSON syntax") from err
    if not isinstance(data, dict):
        raise SaeforgeError(f"config file {path} must hold a mapping of options", "see `saeforge train --help`")
    return data
