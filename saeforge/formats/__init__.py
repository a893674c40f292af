"""Read and write other tools' SAE formats.

    from saeforge.formats import load_any, save_as
    sae = load_any("path/to/sae")       # saeforge, SAELens, sparsify, Gemma Scope 1/2, circuit-tracer, dictionary_learning
    save_as(sae, "out/dir", "saelens", metadata={"hook_name": "layers.5.resid_post"})

Every reader normalises to saeforge's conventions (``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_out]``, ``x @ W_enc``)
and reproduces the tool's own encodings; ``read_any`` also returns the metadata, feature statistics and notes on what
was converted. Writers: ``saeforge`` (native; also a SAELens v6 folder), ``saelens`` (plain SAELens v6 folder),
``sparsify`` (TopK SAEs and transcoders), ``gemmascope2`` and ``circuit_tracer`` (JumpReLU SAEs and transcoders),
``gemmascope2_clt`` and ``circuit_tracer_clt`` (JumpReLU cross-layer transcoders). Layouts: the docstring of each
module; ``docs/coders.md`` for transcoders and CLTs.

Hints (keyword arguments of ``read_any``/``load_any``) for files that do not say everything themselves:
``d_in`` (checked against the file), ``architecture`` (dictionary_learning ``ae.pt`` without config.json:
"topk" or "batchtopk"), ``orientation`` ("x_at_W" or "linear": a square ``W_enc`` in a file without metadata),
``scaling_factor`` (SAELens ``normalize_activations="expected_average_only_in"``), ``device``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from saeforge.errors import SaeforgeError
from saeforge.formats.common import FORMAT_NAMES, ORIENTATIONS, WRITABLE_FORMATS, ImportedSAE
from saeforge.formats.detect import detect_format
from saeforge.saes import SAE

__all__ = [
    "FORMAT_NAMES",
    "ORIENTATIONS",
    "WRITABLE_FORMATS",
    "ImportedSAE",
    "detect_format",
    "load_any",
    "read_any",
    "save_as",
]

_HINTS = ("d_in", "architecture", "orientation", "scaling_factor")


def _read_saeforge(path: Path, **_: Any) -> ImportedSAE:
    from saeforge.saes import load_feature_stats, load_sae, read_sae_config

    sae = load_sae(path)
    cfg = read_sae_config(path)
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    stats = load_feature_stats(path) or {}
    stats = {k: v for k, v in stats.items() if v.dim() == 1 and v.shape[0] == sae.cfg.d_sae}
    return ImportedSAE(sae=sae, fmt="saeforge", path=path, metadata=dict(meta), feature_stats=stats)


def _reader(fmt: str):
    if fmt == "saeforge":
        return _read_saeforge
    if fmt == "saelens":
        from saeforge.formats.saelens import read_saelens

        return read_saelens
    if fmt == "sparsify":
        from saeforge.formats.sparsify import read_sparsify

        return read_sparsify
    if fmt == "gemmascope":
        from saeforge.formats.gemmascope import read_gemmascope

        return read_gemmascope
    if fmt == "gemmascope2":
        from saeforge.formats.gemmascope import read_gemmascope2

        return read_gemmascope2
    if fmt == "gemmascope2_clt":
        from saeforge.formats.gemmascope import read_gemmascope2_clt

        return read_gemmascope2_clt
    if fmt == "circuit_tracer":
        from saeforge.formats.circuit_tracer import read_circuit_tracer

        return read_circuit_tracer
    if fmt == "circuit_tracer_clt":
        from saeforge.formats.circuit_tracer import read_circuit_tracer_clt

        return read_circuit_tracer_clt
    if fmt == "dictionary_learning":
        from saeforge.formats.dictionary_learning import read_dictionary_learning

        return read_dictionary_learning
    raise SaeforgeError(f"unknown SAE format {fmt!r}", f"use one of: auto, {', '.join(FORMAT_NAMES)}")


def read_any(path: str | Path, *, fmt: str = "auto", device: str | None = None, **hints: Any) -> ImportedSAE:
    """Read an SAE in any supported format (detected unless ``fmt`` names it), with its metadata and notes."""
    unknown = sorted(set(hints) - set(_HINTS))
    if unknown:
        raise SaeforgeError(f"unknown hint(s): {', '.join(unknown)}", f"known hints: {', '.join(_HINTS)}")
    hints = {k: v for k, v in hints.items() if v not in (None, "", 0)}
    if "orientation" in hints and hints["orientation"] not in ORIENTATIONS:
        raise SaeforgeError(f"unknown orientation {hints['orientation']!r}",
                            "use 'x_at_W' (W_enc stored [d_in, d_sae]) or 'linear' (stored [d_sae, d_in])")
    if "d_in" in hints and (not isinstance(hints["d_in"], int) or isinstance(hints["d_in"], bool)
                            or hints["d_in"] <= 0):
        raise SaeforgeError(f"d_in must be a positive integer, got {hints['d_in']!r}", "e.g. d_in=576")
    path = Path(path)
    if fmt in ("auto", "", None):
        fmt, where = detect_format(path)
    else:
        if not path.exists():
            raise SaeforgeError(f"{path} does not exist", "pass an SAE folder or file")
        _refuse_other_format(path, fmt)
        where = path
        if fmt in ("saeforge", "saelens", "sparsify") and path.is_file():
            where = path.parent
    out = _reader(fmt)(where, **hints)
    want = hints.get("architecture")
    if want and fmt != "dictionary_learning" and want != out.sae.architecture:
        raise SaeforgeError(f"{where} holds a {out.sae.architecture} SAE, but architecture={want!r} was given",
                            "drop the architecture hint (it only disambiguates files that need it)")
    if device is not None:
        out.sae.to(device)
    return out


# Formats whose files another format's reader also accepts (a saeforge folder is a SAELens folder).
_COMPATIBLE = {("saelens", "saeforge")}


def _refuse_other_format(path: Path, fmt: str) -> None:
    """A file of one format passed as another: say which it is before its reader fails on a missing file."""
    if fmt not in FORMAT_NAMES:
        raise SaeforgeError(f"unknown SAE format {fmt!r}", f"use one of: auto, {', '.join(FORMAT_NAMES)}")
    try:
        detected, _ = detect_format(path)
    except SaeforgeError:
        return  # nothing recognisable: the named reader reports what is missing
    if detected != fmt and (fmt, detected) not in _COMPATIBLE:
        raise SaeforgeError(f"{path} holds a {detected} SAE, not {fmt}",
                            f"read it as {detected} (from_format='{detected}', saeforge convert --from-format "
                            f"{detected}), or leave the format out to detect it")


def load_any(path: str | Path, **hints: Any) -> SAE:
    """The SAE in ``path``, whatever its format (see :func:`read_any` for the hints)."""
    return read_any(path, **hints).sae


def save_as(sae: SAE, folder: str | Path, fmt: str = "saeforge", *, metadata: dict[str, Any] | None = None,
            feature_stats: dict[str, Tensor] | None = None) -> Path:
    """Write ``sae`` to ``folder`` in ``fmt`` (one of ``WRITABLE_FORMATS``). Returns the folder.

    metadata: SAELens ``metadata{}`` fields (``hook_name``, ``model_name``, ...); sparsify keeps none of it.
    """
    if not isinstance(sae, SAE):
        raise SaeforgeError(f"save_as needs a saeforge SAE, got {type(sae).__name__}",
                            "load it first with saeforge.formats.load_any")
    meta = dict(metadata or {})
    if fmt == "saeforge":
        from saeforge.saes import save_sae

        return save_sae(sae, folder, metadata=meta, feature_stats=_stats_for(sae, feature_stats))
    if fmt == "saelens":
        from saeforge.formats.saelens import write_saelens

        return write_saelens(sae, folder, metadata=meta, feature_stats=_stats_for(sae, feature_stats))
    if fmt == "sparsify":
        from saeforge.formats.sparsify import write_sparsify

        return write_sparsify(sae, folder)
    if fmt in ("gemmascope2", "gemmascope2_clt"):
        from saeforge.formats import gemmascope

        writer = gemmascope.write_gemmascope2 if fmt == "gemmascope2" else gemmascope.write_gemmascope2_clt
        return writer(sae, folder, metadata=meta)
    if fmt in ("circuit_tracer", "circuit_tracer_clt"):
        from saeforge.formats import circuit_tracer

        writer = circuit_tracer.write_circuit_tracer if fmt == "circuit_tracer" else \
            circuit_tracer.write_circuit_tracer_clt
        return writer(sae, folder, metadata=meta)
    raise SaeforgeError(f"saeforge cannot write the format {fmt!r}", f"write one of: {', '.join(WRITABLE_FORMATS)}")


def _stats_for(sae: SAE, stats: dict[str, Tensor] | None) -> dict[str, Tensor] | None:
    if not stats:
        return None
    return {k: v for k, v in stats.items() if isinstance(v, Tensor) and tuple(v.shape) == (sae.cfg.d_sae,)}
