"""Activations the user already has, read lazily so that an input larger than RAM can be copied into a cache.

Inputs (:data:`ArrayInput`): a numpy array (a ``np.memmap`` / ``np.load(..., mmap_mode="r")`` too), a torch tensor,
or the path of a file:

- ``.npy``: memory-mapped;
- ``.safetensors``: read one slice at a time;
- ``.pt`` / ``.pth`` (``torch.save`` of a tensor or a dict of tensors): memory-mapped (``torch.load(mmap=True)``;
  files in the legacy pre-1.6 format are read whole).

Every check runs before any row is copied: 2-D, floating point, at least one row, the same number of rows at every
site, a usable site name. ``saeforge import-activations`` is the command-line face (:class:`ImportConfig`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Union

import numpy as np
import torch

from saeforge.errors import SaeforgeError

__all__ = ["ArrayInput", "ImportConfig", "SourceArray", "import_activations", "open_arrays", "open_files"]

ArrayInput = Union[np.ndarray, torch.Tensor, str, Path, "SourceArray"]
FILE_SUFFIXES = (".npy", ".safetensors", ".pt", ".pth")
SITE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
_FLOAT_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
                 torch.float64: "float64"}


@dataclass
class SourceArray:
    """One ``[N, d]`` input: its shape, dtype name, where it comes from, and a reader of a block of rows."""

    shape: tuple[int, int]
    dtype: str
    origin: str  # "acts.npy", "acts.safetensors:layer5", "array"
    read: Callable[[int, int], torch.Tensor]

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self.read(start, stop)


def _dtype_name(dtype: Any) -> str | None:
    if isinstance(dtype, torch.dtype):
        return _FLOAT_DTYPES.get(dtype)
    if dtype in _FLOAT_DTYPES.values():
        return dtype
    try:
        dt = np.dtype(dtype)
    except TypeError:
        return None
    return str(dt) if dt.kind == "f" and dt.itemsize in (2, 4, 8) else None


def _check(name: str, origin: str, shape: tuple[int, ...], dtype: Any) -> tuple[int, int]:
    if not isinstance(name, str) or not SITE_NAME.match(name) or name == "tokens":
        raise SaeforgeError(f"{name!r} cannot name a site (from {origin})",
                            "use letters, digits, '_', '.' and '-', e.g. --sites layers.5.resid_post")
    if len(shape) != 2:
        fix = ("pass one vector per row: a [N, d] array (numpy: a.reshape(-1, a.shape[-1]))" if len(shape) > 2
               else "pass a [N, d] array (numpy: a.reshape(-1, 1) if each row is a single number)")
        raise SaeforgeError(f"site {name!r} ({origin}): activations must be 2-D [N, d], got shape {tuple(shape)}",
                            fix)
    if shape[0] == 0 or shape[1] == 0:
        raise SaeforgeError(f"site {name!r} ({origin}): the array is empty (shape {tuple(shape)})",
                            "pass at least one row of at least one value")
    if _dtype_name(dtype) is None:
        raise SaeforgeError(f"site {name!r} ({origin}): activations must be floating point, got {dtype}",
                            "convert them first (numpy: a.astype(np.float32); torch: t.float())")
    return int(shape[0]), int(shape[1])


def _from_numpy(name: str, arr: np.ndarray, origin: str) -> SourceArray:
    shape = _check(name, origin, arr.shape, arr.dtype)
    return SourceArray(shape, _dtype_name(arr.dtype), origin,
                       lambda a, b: torch.from_numpy(np.array(arr[a:b])))  # a copy: memmaps are read-only


def _from_tensor(name: str, t: torch.Tensor, origin: str) -> SourceArray:
    shape = _check(name, origin, tuple(t.shape), t.dtype)
    return SourceArray(shape, _dtype_name(t.dtype), origin, lambda a, b: t[a:b].detach().cpu().contiguous())


def _missing(path: Path) -> SaeforgeError:
    return SaeforgeError(f"{path} does not exist", "check the path (--files takes .npy, .safetensors or .pt files)")


def _read_file(path: Path) -> dict[str, SourceArray]:
    """``{tensor name: array}`` of a file; a single unnamed array is under the file's stem."""
    if not path.is_file():
        raise _missing(path)
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise SaeforgeError(f"{path}: unknown file type {suffix or '(none)'}",
                            f"save the activations as one of {', '.join(FILE_SUFFIXES)}")
    try:
        if suffix == ".npy":
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
            return {path.stem: _from_numpy(path.stem, arr, path.name)}
        if suffix == ".safetensors":
            return _read_safetensors(path)
        return _read_torch(path)
    except SaeforgeError:
        raise
    except Exception as err:  # a damaged or foreign file: say which, whatever the reader raised
        raise SaeforgeError(f"could not read {path}: {err}",
                            f"check that it is a valid {suffix} file of [N, d] activations") from err


def _read_safetensors(path: Path) -> dict[str, SourceArray]:
    from safetensors import safe_open

    handle = safe_open(str(path), framework="pt")
    out = {}
    for key in handle.keys():
        sl = handle.get_slice(key)
        dtype = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}.get(
            sl.get_dtype(), sl.get_dtype())
        origin = f"{path.name}:{key}"
        shape = _check(key, origin, tuple(sl.get_shape()), dtype)
        out[key] = SourceArray(shape, _dtype_name(dtype), origin, lambda a, b, sl=sl: sl[a:b].contiguous())
    return out


def _read_torch(path: Path) -> dict[str, SourceArray]:
    try:
        obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError as err:
        if "mmap" not in str(err).lower() and "zip" not in str(err).lower():
            raise
        obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy format: cannot be memory-mapped
    if isinstance(obj, torch.Tensor):
        return {path.stem: _from_tensor(path.stem, obj, path.name)}
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {str(k): _from_tensor(str(k), v, f"{path.name}:{k}") for k, v in obj.items()}
    raise SaeforgeError(f"{path} holds a {type(obj).__name__}, not a tensor or a dict of tensors",
                        "save it with torch.save(tensor, path) or torch.save({'site': tensor, ...}, path)")


def open_arrays(arrays: Mapping[str, ArrayInput]) -> dict[str, SourceArray]:
    """Check every input (see the module docstring) and return lazy readers; nothing is copied yet."""
    if not isinstance(arrays, Mapping) or not arrays:
        raise SaeforgeError("no activations given", "pass {site name: [N, d] array}, e.g. {'layers.5.resid_post': a}")
    out: dict[str, SourceArray] = {}
    for name, value in arrays.items():
        if isinstance(value, (str, Path)):
            found = _read_file(Path(value))
            if len(found) != 1:
                raise SaeforgeError(f"{value} holds {len(found)} tensors ({', '.join(found)}); site {name!r} needs one",
                                    "name the sites after the tensors: pass the file alone, without --sites")
            src = next(iter(found.values()))
            _check(name, src.origin, src.shape, src.dtype)
            out[name] = src
        elif isinstance(value, SourceArray):  # already opened and checked (open_files)
            _check(name, value.origin, value.shape, value.dtype)
            out[name] = value
        elif isinstance(value, torch.Tensor):
            out[name] = _from_tensor(name, value, "tensor")
        elif isinstance(value, np.ndarray):
            out[name] = _from_numpy(name, value, "array")
        else:
            raise SaeforgeError(f"site {name!r}: a {type(value).__name__} is not an array",
                                "pass a numpy array, a torch tensor or the path of a .npy/.safetensors/.pt file")
    lengths = {name: a.shape[0] for name, a in out.items()}
    if len(set(lengths.values())) > 1:
        raise SaeforgeError("the sites have different numbers of rows: "
                            + ", ".join(f"{n} {k}" for n, k in lengths.items()),
                            "give every site the activations of the same token positions, in the same order")
    return out


def open_files(files: list[str], sites: list[str]) -> dict[str, SourceArray]:
    """The inputs of ``saeforge import-activations``: every tensor of every file, a site each. ``sites`` names them
    in order (one per tensor); empty: a file's tensor names, or its stem for a single unnamed array."""
    if not files:
        raise SaeforgeError("no input files", "pass --files acts.npy (or .safetensors / .pt files)")
    for f in files:  # every missing file at once, before reading any
        if not Path(f).is_file():
            raise _missing(Path(f))
    found: list[tuple[str, SourceArray]] = []
    for f in files:
        found.extend(_read_file(Path(f)).items())
    if sites:
        if len(sites) != len(found):
            raise SaeforgeError(f"{len(sites)} site name(s) for {len(found)} array(s) "
                                f"({', '.join(a.origin for _, a in found)})",
                                "pass one --sites name per array, in order, or leave --sites out to use the "
                                "file and tensor names")
        found = [(s, a) for s, (_, a) in zip(sites, found)]
    names = [n for n, _ in found]
    if len(set(names)) != len(names):
        raise SaeforgeError(f"two arrays would be the same site: {', '.join(names)}",
                            "name them with --sites, one distinct name per array")
    return open_arrays({n: a for n, a in found})


# ----------------------------------------------------------------------------------------------------------------
# The command


@dataclass(frozen=True)
class ImportConfig:
    """Write activations you already have (.npy, .safetensors or torch .pt files) as an activation cache, to train
    on with `saeforge train --cache DIR --sites SITE`."""

    files: tuple[str, ...] = ()
    """Input files of [N, d] arrays, the same N (the same token positions) in each: .npy (memory-mapped), .safetensors
    (every tensor is a site), .pt (torch.save of a tensor or of a dict of tensors)."""
    sites: tuple[str, ...] = ()
    """Site name of each array, in order; empty: the tensor names, or the file stem of a single array."""
    out: str = ""
    """Cache folder to write (created; re-running the same import after a kill resumes it)."""
    dtype: str = ""
    """Storage dtype: float32, bfloat16 or float16; empty: bfloat16/float16 inputs keep theirs, others float32."""
    shard_tokens: int = 65_536
    """Rows per shard file (memory use is about one shard)."""
    threads: int = 0
    """CPU threads for PyTorch; 0: automatic (see `saeforge train --help`)."""
    progress: bool = True
    """Show a progress bar."""


def import_activations(cfg: ImportConfig):
    """``saeforge import-activations``: check every input, then copy it into the cache at ``cfg.out``."""
    from saeforge.data.activation_cache import write_array_cache

    if not cfg.out:
        raise SaeforgeError("no output folder given", "pass --out DIR")
    sources = open_files(list(cfg.files), list(cfg.sites))
    return write_array_cache(cfg.out, sources, dtype=cfg.dtype, shard_tokens=cfg.shard_tokens,
                             progress=cfg.progress, threads=cfg.threads)
