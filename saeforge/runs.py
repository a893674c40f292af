"""Opening what ``saeforge train`` wrote (a run directory) or a single SAE folder, with its model and sites.

Every step after training (eval, harvest, inspect, contrast, steer, the dashboard, and the analyses across
dictionaries) starts here, so the rules live in one place: which dictionaries a path holds, which model they belong
to, which sites each one **reads** and which it **writes** (its :class:`SiteBinding`), and that the widths match.

Site bindings, by kind of dictionary:

=============  ======================  ======================================================================
kind           reads → writes          example
=============  ======================  ======================================================================
``sae``        one site → the same     ``layers.5.resid_post`` → ``layers.5.resid_post``
``transcoder`` one site → another      ``layers.5.mlp_in`` → ``layers.5.mlp_out`` (a residual → residual
                                       transcoder is one too: the sites differ, whatever the widths)
``clt``        sites → other sites     a cross-layer transcoder: ``layers.{0..5}.mlp_in`` →
                                       ``layers.{0..5}.mlp_out`` (``reads[i]`` and ``writes[i]`` are layer i;
                                       the features read at layer i write ``writes[i:]``); one read → several
                                       writes is a CLT too
``crosscoder`` several sites → the     one dictionary over several layers (acausal: every feature reads and
               same sites              writes all of them), or over two models (site names prefixed with the
                                       model's key, ``a--layers.12.resid_post``, :func:`split_model_site`)
=============  ======================  ======================================================================

A dictionary that reads several sites takes their activations concatenated in ``reads`` order as its input
(``d_in`` is the sum of their widths); one that writes several sites returns their concatenation in ``writes``
order (``d_out`` is the sum). :func:`check_site_order` refuses bindings that would need the future: a transcoder
or CLT that writes a site before the one it reads, and layer lists out of order.

The binding is saved in the SAE's ``metadata`` as ``reads``/``writes`` lists, beside the SAELens fields
``hook_name`` (the first site read) and ``hook_name_out`` (the first site written, when it differs), so SAELens
still reads the folder and old saeforge folders (``hook_name`` only, or ``hook_name_out`` for a transcoder) still
load.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from saeforge.errors import SaeforgeError


def find_saes(path: str | Path) -> dict[str, Path]:
    """``{name: folder}`` of the SAEs under ``path`` (a run directory or an SAE folder)."""
    path = Path(path)
    if not path.exists():
        raise SaeforgeError(f"{path} does not exist", "pass a run directory from `saeforge train` or an SAE folder")
    if (path / "cfg.json").is_file():
        return {path.name: path}
    saes = path / "saes"
    found = {p.name: p for p in sorted(saes.iterdir()) if (p / "cfg.json").is_file()} if saes.is_dir() else {}
    if not found:
        raise SaeforgeError(f"{path} holds no SAE (no cfg.json, and no saes/<name>/cfg.json)",
                            "pass a run directory from `saeforge train` or an SAE folder")
    return found


# ---------------------------------------------------------------------------------------------------- bindings
@dataclass(frozen=True)
class SiteBinding:
    """Which sites a dictionary reads and which it writes, by name (no model needed)."""

    reads: tuple[str, ...]
    writes: tuple[str, ...]

    def __post_init__(self) -> None:
        for what, sites in (("reads", self.reads), ("writes", self.writes)):
            if not sites or not all(isinstance(s, str) and s for s in sites):
                raise SaeforgeError(f"a site binding needs at least one site it {what[:-1]}s, got {list(sites)!r}",
                                    "give site names such as layers.5.resid_post")
            if len(set(sites)) != len(sites):
                raise SaeforgeError(f"a site binding {what} a site twice: {list(sites)}", "list each site once")

    @classmethod
    def single(cls, reads: str, writes: str | None = None) -> "SiteBinding":
        """An SAE (``writes`` None or equal to ``reads``) or a transcoder (``writes`` another site)."""
        return cls((reads,), (writes or reads,))

    @property
    def kind(self) -> str:
        if self.reads == self.writes:
            return "sae" if len(self.reads) == 1 else "crosscoder"
        if len(self.writes) > 1:
            return "clt"
        return "transcoder" if len(self.reads) == 1 else "crosscoder"

    @property
    def is_transcoder(self) -> bool:
        """Reads somewhere other than it writes (a transcoder, skip transcoder or cross-layer transcoder)."""
        return self.kind in ("transcoder", "clt")

    @property
    def sites(self) -> tuple[str, ...]:
        """Every site involved, reads first, each once."""
        return tuple(dict.fromkeys(self.reads + self.writes))

    @property
    def models(self) -> tuple[str, ...]:
        """The model keys of a binding over several models (``a--`` / ``b--`` prefixes), in order; () for one
        model."""
        keys = [split_model_site(s)[0] for s in self.sites]
        return tuple(dict.fromkeys(k for k in keys if k)) if any(keys) else ()

    def to_metadata(self) -> dict[str, Any]:
        """The ``metadata`` fields that record this binding (SAELens' ``hook_name``/``hook_name_out`` included)."""
        out: dict[str, Any] = {"hook_name": self.reads[0], "reads": list(self.reads), "writes": list(self.writes)}
        if self.writes[0] != self.reads[0]:
            out["hook_name_out"] = self.writes[0]
        return out

    @classmethod
    def from_metadata(cls, meta: dict[str, Any], *, where: str = "the SAE") -> "SiteBinding | None":
        """The binding a folder's ``metadata`` records (``reads``/``writes``, else ``hook_name`` and
        ``hook_name_out`` as older saeforge and SAELens write them), or None when it names no site."""
        reads, writes = meta.get("reads"), meta.get("writes")
        if reads is not None or writes is not None:
            if not isinstance(reads, list) or not isinstance(writes, list):
                raise SaeforgeError(f"{where}: metadata.reads and metadata.writes must both be lists of site names",
                                    "re-save the SAE, or fix its cfg.json")
            return cls(tuple(reads), tuple(writes))
        hook = meta.get("hook_name")
        if not hook:
            return None
        return cls.single(str(hook), str(meta.get("hook_name_out") or hook))


# "--" appears in no module path and no canonical site, and (unlike ":") is allowed in file names everywhere: caches
# name their files by site.
MODEL_SITE_SEPARATOR = "--"


def split_model_site(name: str) -> tuple[str | None, str]:
    """``"a--layers.12.resid_post"`` -> ``("a", "layers.12.resid_post")``; a plain site name -> ``(None, name)``."""
    key, sep, site = name.partition(MODEL_SITE_SEPARATOR)
    return (key, site) if sep and key and site else (None, name)


# Where a raw module inside a block sits among the canonical sites of its layer (for the order checks only).
_RAW_KIND_ORDER = (("input_layernorm", "resid_pre"), ("ln_1", "resid_pre"), ("self_attn", "attn_out"),
                   ("attention", "attn_out"), ("attn", "attn_out"), ("post_attention_layernorm", "mlp_in"),
                   ("pre_feedforward_layernorm", "mlp_in"), ("ln_2", "mlp_in"),
                   ("post_feedforward_layernorm", "mlp_out"), ("mlp", "mlp_out"))


def site_position(name: str) -> tuple[int, int | None] | None:
    """Where a site sits in the forward pass, from its name alone: ``(layer, rank within the layer)`` for a
    canonical site (rank by :data:`~saeforge.models.sites.SITE_KINDS`), ``(layer, rank or None)`` for a raw module
    path inside a block, None when the name does not say. A model key prefix is ignored."""
    import re

    from saeforge.models.sites import CANONICAL_RE, SITE_KINDS

    site = split_model_site(name)[1]
    m = CANONICAL_RE.match(site)
    if m:
        return int(m.group(1)), SITE_KINDS.index(m.group(2))
    m = re.search(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)(\.|$)", site)
    if not m:
        return None
    parts = site[m.end():].split(".")
    for module, kind in _RAW_KIND_ORDER:
        if module in parts:
            return int(m.group(1)), SITE_KINDS.index(kind)
    return int(m.group(1)), None


def _before(a: tuple[int, int | None], b: tuple[int, int | None]) -> bool:
    """Whether position ``a`` certainly comes before ``b`` in the forward pass."""
    if a[0] != b[0]:
        return a[0] < b[0]
    return a[1] is not None and b[1] is not None and a[1] < b[1]


def compact_sites(sites: Sequence[str]) -> str:
    """Sites as one string: a layer list where they are one site kind over increasing layers (``layers.0-5.mlp_in``,
    ``layers.2,4,6.resid_post``, which ``saeforge train --sites`` reads back), else joined by commas."""
    import re

    if len(sites) == 1:
        return sites[0]
    parsed = [re.fullmatch(r"(.*?\blayers\.)(\d+)(\..+)", s) for s in sites]
    if not all(parsed) or len({(m[1], m[3]) for m in parsed}) != 1:
        return ",".join(sites)
    layers = [int(m[2]) for m in parsed]
    if layers != sorted(set(layers)):
        return ",".join(sites)
    runs: list[list[int]] = []
    for layer in layers:
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    text = ",".join(f"{r[0]}-{r[-1]}" if len(r) > 2 else ",".join(map(str, r)) for r in runs)
    return f"{parsed[0][1]}{text}{parsed[0][3]}"


def check_site_order(binding: SiteBinding, *, where: str = "the dictionary") -> None:
    """Refuse a binding whose sites are out of forward order, naming them (checks what the names tell; a site
    whose place the name does not tell is not checked):

    - a transcoder or CLT must not write a site before the one it reads (it would predict the past);
    - the reads (and the writes) of a CLT or crosscoder must go strictly forward, layer by layer, each layer once;
    - a CLT reads and writes the same number of sites, ``writes[i]`` at or after ``reads[i]``.
    """
    kind = binding.kind
    pos = {s: site_position(s) for s in binding.sites}

    def order_of(sites: tuple[str, ...], what: str) -> None:
        by_model: dict[str | None, list[str]] = {}
        for s in sites:
            by_model.setdefault(split_model_site(s)[0], []).append(s)
        for group in by_model.values():
            known = [s for s in group if pos[s] is not None]
            for a, b in zip(known, known[1:]):
                if not _before(pos[a], pos[b]):
                    layers = [pos[s][0] for s in known]
                    fixed = sorted(known, key=lambda s: (pos[s][0], pos[s][1] or 0))
                    raise SaeforgeError(
                        f"{where}: its {what} are out of order or repeat a layer ({', '.join(known)}; layers "
                        f"{layers}): a multi-layer dictionary takes its layers in forward order, each once",
                        f"list them in increasing layer order, e.g. {', '.join(fixed)}")

    if kind in ("transcoder", "clt"):
        if kind == "clt" and len(binding.reads) > 1 and len(binding.reads) != len(binding.writes):
            raise SaeforgeError(f"{where}: a cross-layer transcoder reads one site per layer and writes one per "
                                f"layer, but this one reads {len(binding.reads)} and writes {len(binding.writes)}",
                                "give as many target sites as sites, e.g. --sites layers.0-3.mlp_in "
                                "--target-sites layers.0-3.mlp_out")
        order_of(binding.reads, "sites read")
        order_of(binding.writes, "sites written")
        pairs = list(zip(binding.reads, binding.writes)) if len(binding.reads) > 1 else \
            [(binding.reads[0], w) for w in binding.writes]
        for r, w in pairs:
            if pos[r] is not None and pos[w] is not None and _before(pos[w], pos[r]):
                raise SaeforgeError(
                    f"{where} would read {r} and write {w}, which the model computes before {r}: a transcoder "
                    "predicts a later site from an earlier one",
                    f"swap them (--sites {w} --target-sites {r}), or give a target site that the model computes "
                    f"after {r}")
    elif kind == "crosscoder":
        order_of(binding.reads, "sites")


@dataclass
class BoundSAE:
    """A dictionary with its sites on a loaded model: the one "SAE with its sites" type of saeforge.

    ``reads``/``writes`` are resolved :class:`~saeforge.models.sites.Site` objects (widths known); an SAE reads and
    writes one site, a transcoder reads one and writes another. Analyses encode activations of :attr:`read_site`
    and put decoder directions (steering, splicing) at :attr:`write_site`.
    """

    name: str
    sae: Any  # saeforge.saes.SAE
    reads: tuple[Any, ...]  # Site
    writes: tuple[Any, ...]  # Site
    folder: Path | None = None
    meta: dict | None = None

    @property
    def binding(self) -> SiteBinding:
        return SiteBinding(tuple(s.name for s in self.reads), tuple(s.name for s in self.writes))

    @property
    def kind(self) -> str:
        return self.binding.kind

    @property
    def is_transcoder(self) -> bool:
        return self.binding.is_transcoder

    @property
    def read_site(self):
        """The one site this dictionary reads (an error for a crosscoder, which reads several)."""
        if len(self.reads) != 1:
            raise SaeforgeError(f"{self.name} reads {len(self.reads)} sites ({', '.join(s.name for s in self.reads)})",
                                "this step handles dictionaries that read one site")
        return self.reads[0]

    @property
    def write_site(self):
        """The one site this dictionary writes (an error for a cross-layer transcoder, which writes several)."""
        if len(self.writes) != 1:
            raise SaeforgeError(f"{self.name} writes {len(self.writes)} sites "
                                f"({', '.join(s.name for s in self.writes)})",
                                "this step handles dictionaries that write one site")
        return self.writes[0]

    @property
    def site(self):
        """The site read (the SAE's own site for an ordinary SAE)."""
        return self.read_site

    @property
    def d_sae(self) -> int:
        return int(self.sae.cfg.d_sae)

    def input(self, acts: Any, index: Any = None):
        """The dictionary's input from ``{site name: activation}``: its one read site's activation, or its read
        sites' concatenated in binding order (a CLT, a crosscoder); ``index`` selects rows (e.g. a keep mask) of each
        first."""
        parts = [acts[s.name] if index is None else acts[s.name][index] for s in self.reads]
        if len(parts) == 1:
            return parts[0]
        import torch

        return torch.cat(parts, dim=-1)

    def written_rows(self, feature: int) -> dict[str, Any]:
        """``{site name: decoder row}``: what latent ``feature`` writes at each site it writes, in forward order.
        One row at the one site of an SAE or transcoder; a crosscoder's row split by its sites' widths; a CLT latent
        of layer l (l = feature // F) writes ``writes[l:]``, into site ``writes[j]`` its row of ``W_dec[l][:, j - l]``
        (docs/coders.md)."""
        from saeforge.saes.clt import CrossLayerTranscoder

        sae = self.sae
        if isinstance(sae, CrossLayerTranscoder):
            layer, row = divmod(feature, sae.features_per_layer)
            return {self.writes[layer + o].name: sae.W_dec[layer][row, o] for o in range(sae.n_layers - layer)}
        out, start = {}, 0
        for site in self.writes:
            out[site.name] = sae.W_dec[feature, start:start + site.d]
            start += site.d
        return out

    def describe(self) -> str:
        """``SAE at layers.5.resid_post`` or ``transcoder: reads A, writes B`` (for tables and headers)."""
        reads = compact_sites([s.name for s in self.reads])
        if self.kind == "sae":
            return f"SAE at {reads}"
        return f"{self.kind}: reads {reads}, writes {compact_sites([s.name for s in self.writes])}"

    # Compatibility with code written for the ``(sae, site)`` tuples that ``Inspector.saes`` held before: unpacks
    # and indexes as ``(sae, read_site)``. For a transcoder that is the site it reads, not the one it writes, so new
    # code uses ``.sae``, ``.read_site`` and ``.write_site``; this goes once its last callers have moved.
    def __iter__(self):
        return iter((self.sae, self.read_site))

    def __getitem__(self, index: int):
        return (self.sae, self.read_site)[index]


def bind(name: str, sae, binding: SiteBinding, lm, *, folder: Path | None = None, meta: dict | None = None
         ) -> BoundSAE:
    """Resolve ``binding`` on ``lm`` and check the dictionary's widths against the sites (clear errors naming
    the SAE and the site)."""
    where = f"SAE {name}" + (f" ({folder})" if folder else "")

    def resolve(site_name: str):
        try:
            return lm.site(site_name)
        except SaeforgeError as err:
            raise SaeforgeError(f"{where} is bound to site {site_name!r}, which this {lm.model_type} model cannot "
                                f"resolve: {err.problem}",
                                "load it with the model it was trained on (--model), or give the saeforge site name "
                                "with --site") from err

    reads = tuple(resolve(s) for s in binding.reads)
    writes = tuple(resolve(s) for s in binding.writes)
    d_in = int(sae.cfg.d_in)
    d_out = int(getattr(sae.cfg, "d_output", d_in))
    read_width = sum(s.d for s in reads)
    if d_in != read_width:
        sites = f"site {binding.reads[0]}" if len(reads) == 1 else f"sites {', '.join(binding.reads)} together"
        raise SaeforgeError(f"{where} has d_in {d_in} but {sites} of {lm.name} has width {read_width}",
                            "use the model and site the SAE was trained on")
    write_width = sum(s.d for s in writes)
    if d_out != write_width:
        sites = f"site {writes[0].name}" if len(writes) == 1 else f"sites {', '.join(binding.writes)} together"
        raise SaeforgeError(f"{where} writes width {d_out} but {sites} has width {write_width}",
                            "use the model and sites the dictionary was trained on")
    return BoundSAE(name, sae, reads, writes, folder, dict(meta or {}))


# ---------------------------------------------------------------------------------------------------- runs
@dataclass
class LoadedRun:
    path: Path
    lm: Any  # LanguageModel
    saes: dict[str, BoundSAE]
    meta: dict  # the first SAE's metadata (model, context, token policy)

    def context_length(self, override: int = 0) -> int:
        return override or int(self.meta.get("context_size") or 128)

    def token_policy(self, context_length: int = 0):
        from saeforge.data.token_stream import TokenPolicy

        return TokenPolicy(self.context_length(context_length), bool(self.meta.get("prepend_bos", True)),
                           bool(self.meta.get("exclude_special_tokens", True)))

    @property
    def sites(self) -> list[str]:
        """Every site read or written by the run's dictionaries."""
        return sorted({s.name for r in self.saes.values() for s in r.reads + r.writes})

    @property
    def read_sites(self) -> list[str]:
        return sorted({s.name for r in self.saes.values() for s in r.reads})


def _read_folder(folder: Path):
    """(SAE, metadata) of a saeforge folder, or of any format ``saeforge.formats`` reads (SAELens, sparsify...)."""
    from saeforge.saes import load_sae, read_sae_config

    cfg = read_sae_config(folder)
    if isinstance(cfg.get("saeforge"), dict):
        meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
        return load_sae(folder), dict(meta)
    from saeforge.formats import read_any

    imported = read_any(folder)
    return imported.sae, dict(imported.metadata or {})


def load_run(path: str | Path, *, model: str = "", device: str = "auto", dtype: str = "float32", lm=None,
             site: str = "", names: Sequence[str] = ()) -> LoadedRun:
    """The model (``model`` or the SAEs' ``metadata.model_name``) and every dictionary under ``path`` with its
    sites. ``site`` overrides the site an SAE reads and writes (for an SAE from elsewhere whose hook name is not a
    saeforge site); ``names`` keeps only those dictionaries."""
    from saeforge.models.language_model import LanguageModel

    found = find_saes(path)
    if names:
        missing = [n for n in names if n not in found]
        if missing:
            raise SaeforgeError(f"no SAE named {', '.join(missing)} under {path}", f"it holds: {', '.join(found)}")
        found = {n: found[n] for n in names}
    loaded = {n: _read_folder(f) for n, f in found.items()}
    bindings = {}
    for n, (sae, meta) in loaded.items():
        binding = SiteBinding.single(site) if site else SiteBinding.from_metadata(meta, where=f"SAE {found[n]}")
        if binding is None:
            raise SaeforgeError(f"SAE {found[n]} does not say which site it reads (no metadata.hook_name)",
                                "pass --site with the saeforge site name, e.g. layers.5.resid_post")
        bindings[n] = binding
    first = next(iter(loaded.values()))[1]
    if lm is None:
        model_name = model or first.get("model_name")
        if not model_name:
            raise SaeforgeError("the SAE's metadata does not name its model", "pass --model")
        from saeforge.models.sites import check_sites_before_loading

        check_sites_before_loading(model_name, {s for b in bindings.values() for s in b.reads + b.writes})
        lm = LanguageModel.load(model_name, dtype=dtype, device=device)
    saes = {}
    for n, (sae, meta) in loaded.items():
        saes[n] = bind(n, sae.to(lm.device).eval(), bindings[n], lm, folder=found[n], meta=meta)
    return LoadedRun(Path(path), lm, saes, first)
