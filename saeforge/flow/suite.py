"""SAE suites: one SAE on each of ``resid_post``, ``mlp_out`` and ``attn_out`` of every layer in a range.

Feature flow (Laptev et al., arXiv 2502.03032) compares, at every layer L, four points of the residual stream:
the layer's output R_L (``resid_post``), what its MLP and attention add (M_L = ``mlp_out``, A_L = ``attn_out``) and
its input R_{L-1} (``resid_post`` of the layer before). A suite holds the SAEs of those sites so the later steps
(``saeforge flow match/graph/groups/deactivate/steer``) open it whole.

A suite is either

- a run directory of ``saeforge train`` (``saeforge flow suite`` writes one: every SAE trained from one pass over the
  data, the model's forward stopped after the last layer needed), or
- a folder with ``suite.json`` that names SAE folders or files trained elsewhere (Gemma Scope ``params.npz``,
  SAELens or sparsify folders...) by the site each one reads (``saeforge flow assemble``).

Opening a suite needs no model: data-free matching uses the decoders alone. Steps that run the model bind the suite
to it (:meth:`Suite.bind`), which checks every width against the model's sites.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from simple_parsing.helpers import field

from saeforge.errors import SaeforgeError
from saeforge.options import ModelOptions, RuntimeOptions, TextOptions, flat_options

KINDS = ("resid_post", "mlp_out", "attn_out")
"""The three sites of a layer that flow compares (R, M, A)."""
KIND_LETTER = {"resid_post": "R", "mlp_out": "M", "attn_out": "A"}
SUITE_FILE = "suite.json"
SUITE_SCHEMA = "saeforge-flow-suite"
_SITE = re.compile(r"^layers\.(\d+)\.(resid_post|mlp_out|attn_out)$")


def parse_site(name: str) -> tuple[int, str] | None:
    """``layers.12.mlp_out`` → (12, "mlp_out"); None for any other site."""
    m = _SITE.match(name)
    return (int(m.group(1)), m.group(2)) if m else None


def site_name(layer: int, kind: str) -> str:
    return f"layers.{layer}.{kind}"


def parse_layers(spec: str, n_layers: int | None = None) -> list[int]:
    """``"8-16"`` (inclusive), ``"3,5,7"``, ``"8-10,14"`` or ``"all"`` (needs ``n_layers``) → sorted layers."""
    spec = spec.strip()
    fix = "pass e.g. --layers 8-16, --layers 3,5,7 or --layers all"
    if spec == "all":
        if n_layers is None:
            raise SaeforgeError("--layers all needs the model's layer count", fix)
        return list(range(n_layers))
    layers: set[int] = set()
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise SaeforgeError(f"cannot read the layer range {spec!r}", fix)
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise SaeforgeError(f"the layer range {part.strip()!r} runs backwards", fix)
        layers.update(range(lo, hi + 1))
    if n_layers is not None and max(layers) >= n_layers:
        raise SaeforgeError(f"layer {max(layers)} does not exist: the model has {n_layers} layers (0..{n_layers - 1})",
                            f"pass --layers within 0-{n_layers - 1}, or --layers all")
    return sorted(layers)


# ---------------------------------------------------------------------------------------------------- training
@flat_options
@dataclass(frozen=True)
class SuiteConfig:
    """Train a suite: SAEs (TopK by default) on resid_post, mlp_out and attn_out of every layer in a range, all from
    one pass over the data (one model forward, stopped after the last layer, feeds every SAE). The result is a run
    directory that `saeforge flow match/graph/groups/deactivate/steer` open whole; `saeforge train --resume OUT`
    resumes it."""

    out: str = ""
    """Run directory to create (saes/layers.L.SITE/ for every SAE)."""
    layers: str = "all"
    """Layers: a range such as 8-16 (inclusive), a list such as 3,5,7, or all."""
    kinds: tuple[str, ...] = KINDS
    """Sites of each layer: resid_post, mlp_out, attn_out (the flow analyses need all three)."""
    input_residual: bool = True
    """Also train resid_post of the layer before the range, so the first layer of the range has its input (R_{L-1})."""
    model_options: ModelOptions = field(default_factory=ModelOptions)
    """The model."""
    text_options: TextOptions = field(default_factory=TextOptions)
    """The training text."""
    tokens: int = 1_048_576
    """Training tokens (activation vectors) per SAE; every SAE sees the same ones."""
    batch_size: int = 4096
    """Activation vectors per step."""
    architecture: str = "topk"
    """SAE architecture of every SAE in the suite (see `saeforge train --help`)."""
    d_sae: int = 0
    """Latents per SAE; 0: expansion_factor × d_model."""
    expansion_factor: int = 8
    """Latents per input dimension when --d-sae is 0."""
    k: int = 32
    """Active latents per token (TopK family)."""
    seed: int = 0
    """Seed for initialisation and shuffling."""
    checkpoint_every: int = 50
    """Write a checkpoint every this many steps."""
    runtime_options: RuntimeOptions = field(default_factory=RuntimeOptions)
    """Where and how the run computes."""


def suite_sites(layers: Sequence[int], kinds: Sequence[str] = KINDS, input_residual: bool = True) -> list[str]:
    """Site names of a suite, in layer order (the input residual first when asked and the range does not start
    at layer 0, whose input is the embedding)."""
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise SaeforgeError(f"unknown site kind(s) {', '.join(bad)}", f"use {', '.join(KINDS)}")
    sites = []
    if input_residual and layers and layers[0] > 0 and "resid_post" in kinds:
        sites.append(site_name(layers[0] - 1, "resid_post"))
    for layer in layers:
        sites.extend(site_name(layer, k) for k in kinds)
    return list(dict.fromkeys(sites))


def suite_train_config(cfg: SuiteConfig, n_layers: int):
    """The :class:`~saeforge.training.TrainConfig` that trains the suite (one SAE per site, named after it)."""
    from saeforge.training import TrainConfig

    if not cfg.out:
        raise SaeforgeError("no output folder for the suite", "pass --out SUITE_DIR")
    sites = suite_sites(parse_layers(cfg.layers, n_layers), cfg.kinds, cfg.input_residual)
    return TrainConfig(out=cfg.out, model_options=cfg.model_options, text_options=cfg.text_options,
                       tokens=cfg.tokens, batch_size=cfg.batch_size, architecture=cfg.architecture,
                       d_sae=cfg.d_sae, expansion_factor=cfg.expansion_factor, k=cfg.k, seed=cfg.seed,
                       checkpoint_every=cfg.checkpoint_every, runtime_options=cfg.runtime_options,
                       saes=tuple({"site": s, "name": s} for s in sites))


def train_suite(cfg: SuiteConfig) -> dict[str, Any]:
    """Train the suite (or resume it: the same command continues a killed run); returns the final metrics."""
    from saeforge.models.language_model import LanguageModel
    from saeforge.training import train

    # the layer count checks the range before the slow work starts (the trainer loads the model again)
    n_layers = LanguageModel.load(cfg.model, device="cpu").n_layers
    return train(suite_train_config(cfg, n_layers))


# ---------------------------------------------------------------------------------------------------- opening
@dataclass
class SuiteSAE:
    """One SAE of a suite: its site, weights and metadata (no model needed)."""

    site: str
    layer: int
    kind: str
    sae: Any  # saeforge.saes.SAE
    path: Path
    meta: dict

    @property
    def name(self) -> str:
        return self.site

    @property
    def d_sae(self) -> int:
        return int(self.sae.cfg.d_sae)

    @property
    def d_out(self) -> int:
        return int(self.sae.W_dec.shape[1])

    def unit_decoder(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Decoder rows scaled to unit norm ``[d_sae, d]`` (cosine matching)."""
        w = self.sae.W_dec.detach().to(dtype)
        return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def check_feature(self, idx: int) -> int:
        if not 0 <= idx < self.d_sae:
            raise SaeforgeError(f"feature {idx} is out of range for {self.site} ({self.d_sae} features: "
                                f"0..{self.d_sae - 1})", f"pick a feature index below {self.d_sae}")
        return idx


@dataclass
class Suite:
    """SAEs indexed by site; the flow steps ask it for ``sae(layer, kind)``."""

    path: Path
    saes: dict[str, SuiteSAE]
    model_name: str
    fingerprint: str | None

    @property
    def layers(self) -> list[int]:
        return sorted({s.layer for s in self.saes.values()})

    def has(self, layer: int, kind: str) -> bool:
        return site_name(layer, kind) in self.saes

    def sae(self, layer: int, kind: str) -> SuiteSAE:
        name = site_name(layer, kind)
        if name not in self.saes:
            raise SaeforgeError(f"the suite {self.path} has no SAE for {name}",
                                f"it holds: {', '.join(self.saes)}; train it (saeforge flow suite) or add it "
                                f"(saeforge flow assemble)")
        return self.saes[name]

    def get(self, site: str) -> SuiteSAE:
        if site not in self.saes:
            raise SaeforgeError(f"the suite {self.path} has no SAE for {site}", f"it holds: {', '.join(self.saes)}")
        return self.saes[site]

    def analysable_layers(self) -> list[int]:
        """Layers L with R_L, M_L and A_L, and R_{L-1}: where all three predecessors can be matched."""
        return [L for L in self.layers if all(self.has(L, k) for k in KINDS) and self.has(L - 1, "resid_post")]

    def require(self, layers: Iterable[int], *, input_residual: bool = True) -> None:
        """Refuse (naming every missing site) unless each layer has its three sites and its input residual."""
        missing = []
        for L in layers:
            need = [site_name(L, k) for k in KINDS]
            if input_residual:
                need.insert(0, site_name(L - 1, "resid_post"))
            missing += [s for s in need if s not in self.saes and s not in missing]
        if missing:
            raise SaeforgeError(f"the suite {self.path} lacks {len(missing)} site(s) the layer range needs: "
                                f"{', '.join(missing)}",
                                "pass a --layers range the suite covers, or add them: saeforge flow assemble "
                                f"{self.path} --sae SITE=PATH ...")

    def bind(self, lm) -> dict[str, Any]:
        """``{site: BoundSAE}`` on ``lm``: widths checked against the model's sites, the model fingerprint against
        the one the SAEs were trained on (when they record it)."""
        from saeforge.runs import SiteBinding, bind

        if self.fingerprint and self.fingerprint not in self._fingerprints(lm):
            raise SaeforgeError(f"the suite {self.path} was trained on another model (fingerprint "
                                f"{self.fingerprint[:12]}, {lm.name} is {lm.fingerprint()[:12]})",
                                f"load the suite's model: --model {self.model_name or 'NAME'}")
        return {s: bind(s, e.sae.to(lm.device).eval(), SiteBinding.single(s), lm, folder=e.path, meta=e.meta)
                for s, e in self.saes.items()}

    def _fingerprints(self, lm) -> set[str]:
        """The fingerprints ``lm`` may have been recorded under: its own and, for a suite trained with the model in
        another dtype (the fingerprint hashes the weights as loaded), the one of the model loaded in that dtype."""
        prints = {lm.fingerprint()}
        trained = self.model_dtype()
        if self.fingerprint not in prints and trained and trained != str(lm.dtype).removeprefix("torch."):
            from saeforge.models.language_model import LanguageModel

            prints.add(LanguageModel.load(lm.name, dtype=trained, device="cpu").fingerprint())
        return prints

    def model_dtype(self) -> str | None:
        """The dtype the model ran in while the suite trained (run.json), if it says."""
        import json

        run = self.path / "run.json"
        try:
            return json.loads(run.read_text())["config"].get("model_dtype") if run.is_file() else None
        except (OSError, ValueError, KeyError, AttributeError):
            return None

    def load_model(self, model: str = "", device: str = "auto", dtype: str = "float32"):
        from saeforge.models.language_model import LanguageModel

        name = model or self.model_name
        if not name:
            raise SaeforgeError(f"the SAEs of {self.path} do not name their model", "pass --model")
        return LanguageModel.load(name, device=device, dtype=dtype)


def read_sae(path: Path):
    """(SAE, metadata) of one SAE folder or file in any format saeforge reads."""
    from saeforge.runs import _read_folder

    if not path.exists():
        raise SaeforgeError(f"{path} does not exist", "give the folder or file of an SAE")
    if path.is_dir() and (path / "cfg.json").is_file():
        sae, meta = _read_folder(path)
    else:
        from saeforge.formats import read_any

        imported = read_any(path)
        sae, meta = imported.sae, dict(imported.metadata or {})
    return sae.eval(), meta


def _sae_from(path: Path, site_hint: str | None = None):
    """(SAE, metadata, site) of one SAE folder or file in any format saeforge reads."""
    from saeforge.runs import SiteBinding

    sae, meta = read_sae(path)
    binding = SiteBinding.from_metadata(meta, where=str(path))
    site = site_hint or (binding.reads[0] if binding else None)
    if site is None:
        raise SaeforgeError(f"{path} does not say which site it reads",
                            f"name it: saeforge flow assemble SUITE --sae layers.L.SITE={path}")
    if binding is not None and binding.is_transcoder:
        raise SaeforgeError(f"{path} is a transcoder ({binding.reads[0]} → {binding.writes[0]})",
                            "a suite holds SAEs that read and write one site")
    return sae, meta, site


def open_suite(path: str | Path) -> Suite:
    """Open a suite folder (a run directory of SAEs, or a folder with suite.json) without loading a model.

    Refuses SAEs of different models (fingerprints, else model names), SAEs of different residual widths, and SAEs
    bound to sites that are not ``layers.L.{resid_post,mlp_out,attn_out}``."""
    import json

    from saeforge.runs import find_saes

    path = Path(path)
    manifest = path / SUITE_FILE
    if manifest.is_file():
        data = json.loads(manifest.read_text())
        if data.get("schema") != SUITE_SCHEMA:
            raise SaeforgeError(f"{manifest} is not a saeforge suite manifest", "write it with saeforge flow assemble")
        return open_suite_manifest(path, data)
    if not path.exists():
        raise SaeforgeError(f"{path} does not exist", "pass a suite: saeforge flow suite --out DIR, or flow assemble")
    entries = [(p, None) for p in find_saes(path).values()]
    saes: dict[str, SuiteSAE] = {}
    for p, hint in entries:
        sae, meta, site = _sae_from(p, hint)
        parsed = parse_site(site)
        if parsed is None:
            raise SaeforgeError(f"{p} reads {site!r}, not a flow site (layers.L.resid_post, mlp_out or attn_out)",
                                "assemble the suite with the saeforge site names: saeforge flow assemble SUITE "
                                f"--sae layers.L.resid_post={p}")
        if site in saes:
            raise SaeforgeError(f"two SAEs of {path} read {site} ({saes[site].path} and {p})",
                                "keep one SAE per site in a suite")
        saes[site] = SuiteSAE(site, parsed[0], parsed[1], sae, p, meta)
    if not saes:
        raise SaeforgeError(f"{path} holds no SAE", "train a suite (saeforge flow suite) or assemble one")
    return Suite(path, dict(sorted(saes.items(), key=lambda kv: (kv[1].layer, KINDS.index(kv[1].kind)))),
                 *_common_model(path, saes.values()))


def _common_model(path: Path, saes: Iterable[SuiteSAE]) -> tuple[str, str | None]:
    saes = list(saes)
    widths = {s.d_out for s in saes}
    if len(widths) > 1:
        by = ", ".join(f"{s.site}: {s.d_out}" for s in saes)
        raise SaeforgeError(f"the SAEs of {path} have different residual widths ({by})",
                            "a suite holds SAEs of one model; remove the SAEs of the other model")
    prints = {s.meta.get("model_fingerprint") for s in saes} - {None}
    if len(prints) > 1:
        groups = {fp: [s.site for s in saes if s.meta.get("model_fingerprint") == fp] for fp in prints}
        raise SaeforgeError("the SAEs of the suite come from different models (weight fingerprints "
                            + "; ".join(f"{fp[:12]}: {', '.join(v)}" for fp, v in groups.items()) + ")",
                            "keep the SAEs of one model in a suite")
    names = {s.meta.get("model_name") for s in saes} - {None, ""}
    if len(names) > 1 and not prints:
        raise SaeforgeError(f"the SAEs of the suite name different models ({', '.join(sorted(names))})",
                            "keep the SAEs of one model in a suite")
    return (sorted(names)[0] if names else ""), (prints.pop() if prints else None)


def check_same_space(a: SuiteSAE, b: SuiteSAE) -> None:
    """Two SAEs can be matched by decoder cosine only when their outputs live in one space of one model."""
    if a.d_out != b.d_out:
        raise SaeforgeError(f"{a.site} ({a.path}) writes width {a.d_out} but {b.site} ({b.path}) writes {b.d_out}",
                            "match SAEs of one model (the residual width must agree)")
    fa, fb = a.meta.get("model_fingerprint"), b.meta.get("model_fingerprint")
    if fa and fb and fa != fb:
        raise SaeforgeError(f"{a.path} and {b.path} were trained on different models (fingerprints {fa[:12]} and "
                            f"{fb[:12]})", "match SAEs of one model")


# ---------------------------------------------------------------------------------------------------- assembling
@flat_options
@dataclass(frozen=True)
class AssembleConfig:
    """Assemble a suite from SAEs trained elsewhere (Gemma Scope params.npz, SAELens, sparsify, dictionary_learning
    or saeforge folders): writes OUT/suite.json naming each one by the site it reads."""

    out: str = field(default="", positional=True)
    """Suite folder to write (suite.json); an existing one gains the new SAEs."""
    sae: tuple[str, ...] = ()
    """SITE=PATH, repeatable: e.g. --sae layers.12.resid_post=gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82
    (the SITE= part may be left out when the SAE's metadata names a saeforge site)."""
    model: str = ""
    """Model the SAEs belong to (recorded for the steps that run it); empty: the SAEs' metadata."""


def assemble_suite(cfg: AssembleConfig) -> Suite:
    import json

    from saeforge.utils.atomic import atomic_write_json
    from saeforge.utils.locking import exclusive_lock

    if not cfg.out:
        raise SaeforgeError("no suite folder given", "saeforge flow assemble SUITE_DIR --sae SITE=PATH ...")
    if not cfg.sae:
        raise SaeforgeError("no SAE given", "saeforge flow assemble SUITE_DIR --sae layers.12.resid_post=PATH ...")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(out, "saeforge flow assemble"):
        manifest = out / SUITE_FILE
        data = json.loads(manifest.read_text()) if manifest.is_file() else {"schema": SUITE_SCHEMA, "saes": {}}
        for spec in cfg.sae:
            site, _, p = spec.rpartition("=") if "=" in spec else ("", "", spec)
            path = Path(p).resolve()
            if not path.exists():
                raise SaeforgeError(f"{p} does not exist", "give the folder or file of each SAE")
            if site and parse_site(site) is None:
                raise SaeforgeError(f"{site!r} is not a flow site", "use layers.L.resid_post, layers.L.mlp_out or "
                                    "layers.L.attn_out")
            _, meta, site = _sae_from(path, site or None)  # reads it: a damaged file fails here, not later
            if parse_site(site) is None:
                raise SaeforgeError(f"{path} reads {site!r}, not a flow site",
                                    f"name its site: --sae layers.L.resid_post={p}")
            data["saes"][site] = str(path)
        if cfg.model:
            data["model_name"] = cfg.model
        tmp_suite = open_suite_manifest(out, data)  # checks widths and models before anything is written
        atomic_write_json(manifest, data)
    return tmp_suite


def open_suite_manifest(folder: Path, data: dict) -> Suite:
    """Open the suite a manifest (not yet written) describes; the manifest's model name wins."""
    entries = {s: (Path(p) if Path(p).is_absolute() else folder / p) for s, p in data["saes"].items()}
    saes = {}
    for site, p in entries.items():
        sae, meta, _ = _sae_from(p, site)
        layer, kind = parse_site(site)
        saes[site] = SuiteSAE(site, layer, kind, sae, p, meta)
    name, fp = _common_model(folder, saes.values())
    return Suite(folder, dict(sorted(saes.items(), key=lambda kv: (kv[1].layer, KINDS.index(kv[1].kind)))),
                 data.get("model_name") or name, fp)

