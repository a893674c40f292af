"""EleutherAI sparsify: one folder per hookpoint with ``cfg.json`` + ``sae.safetensors``.

Tensors (``safetensors.torch.save_model`` of a ``SparseCoder``): ``encoder.weight [num_latents, d_in]`` (nn.Linear),
``encoder.bias [num_latents]``, ``W_dec [num_latents, d_in]``, ``b_dec [d_in]`` (+ ``W_skip [d_in, d_in]`` with a skip
connection). cfg.json: the ``SparseCoderConfig`` fields (``activation``, ``expansion_factor``, ``normalize_decoder``,
``num_latents`` (0: d_in * expansion_factor), ``k``, ``multi_topk``, ``skip_connection``, ``transcode``) + ``d_in``.

sparsify encodes ``TopK_k(ReLU(encoder(x - b_dec)))`` (no ``- b_dec`` for transcoders), i.e. saeforge's TopK SAE.
A coder with ``transcode: true`` is a transcoder (sparsify trains it from its hookpoint's input to its output):
saeforge ``topk_transcoder``, or ``topk_skip_transcoder`` with ``skip_connection: true`` (``W_skip`` [d_in, d_in],
used as ``x @ W_skip.mT``, saeforge's orientation too). Its binding comes from the hookpoint folder's name: ``layers.N``
reads ``layers.N.resid_pre`` and writes ``layers.N.resid_post``, ``layers.N.mlp`` reads ``layers.N.mlp_in`` and writes
``layers.N.mlp_out``. "groupmax" activations and skip connections on plain SAEs are refused.

Writing: a saeforge ``topk`` SAE, ``topk_transcoder`` or ``topk_skip_transcoder`` with ``d_out == d_in`` (sparsify's
coders write their input's width). A plain TopK SAE with ``apply_b_dec_to_input=False`` is written with
``transcode: true`` (sparsify's only switch for "do not subtract b_dec"), so it reads back as a transcoder.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from torch import Tensor

from saeforge.errors import SaeforgeError
from saeforge.formats.common import (
    ImportedSAE,
    assemble,
    check_keys,
    check_vector,
    dtype_name,
    read_json,
    read_safetensors,
)
from saeforge.saes import SAE, TopKConfig, TopKSkipTranscoderConfig, TopKTranscoderConfig
from saeforge.utils.atomic import atomic_save_safetensors, atomic_write_json

__all__ = ["SPARSIFY_CFG", "SPARSIFY_WEIGHTS", "read_sparsify", "write_sparsify"]

SPARSIFY_CFG = "cfg.json"
SPARSIFY_WEIGHTS = "sae.safetensors"
_CFG_FIELDS = {"activation", "expansion_factor", "normalize_decoder", "num_latents", "k", "multi_topk",
               "skip_connection", "transcode", "d_in"}


def _int_field(cfg: dict, key: str, where: Path, *, minimum: int = 1) -> int:
    v = cfg.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise SaeforgeError(f"{where}: '{key}' must be an integer >= {minimum}, got {v!r}",
                            "the config is damaged; save the SAE again with sparsify")
    return v


def read_sparsify(folder: str | Path, *, d_in: int | None = None, **_: Any) -> ImportedSAE:
    folder = Path(folder)
    if not folder.is_dir():
        raise SaeforgeError(f"{folder} is not a folder", "pass the sparsify hookpoint folder (cfg.json + sae.safetensors)")
    cfg_path = folder / SPARSIFY_CFG
    cfg = read_json(cfg_path, "sparsify config")
    notes: list[str] = []
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise SaeforgeError(f"{cfg_path}: activation {activation!r} is not supported (saeforge reads sparsify's "
                            "'topk' sparse coders)", "only TopK sparse coders can be imported")
    transcode = bool(cfg.get("transcode", False))
    skip = bool(cfg.get("skip_connection", False))
    if skip and not transcode:
        raise SaeforgeError(f"{cfg_path}: this sparse coder is an SAE with a skip connection (W_skip), which saeforge "
                            "SAEs do not have (its skip transcoders do)",
                            "only skip connections on transcoders (transcode: true) can be imported")
    if cfg.get("signed", False):
        raise SaeforgeError(f"{cfg_path}: signed sparse coders are not supported", "use an unsigned sparse coder")
    unknown = sorted(set(cfg) - _CFG_FIELDS - {"signed"})
    if unknown:
        notes.append(f"cfg.json fields ignored (training-only or unknown): {', '.join(unknown)}")
    k = _int_field(cfg, "k", cfg_path)

    where = folder / SPARSIFY_WEIGHTS
    raw = read_safetensors(where, "sparsify weights")
    check_keys(raw, {"encoder.weight", "encoder.bias", "W_dec", "b_dec"} | ({"W_skip"} if skip else set()),
               where=str(where), layout="sparsify TopK " + ("skip transcoder" if skip else "sparse coder"))
    enc = raw["encoder.weight"]
    if enc.dim() != 2:
        raise SaeforgeError(f"{where}: encoder.weight must be a matrix, got {tuple(enc.shape)}", "the file is damaged")
    n_lat, width = int(enc.shape[0]), int(enc.shape[1])  # nn.Linear: [out_features, in_features], never ambiguous
    cfg_d_in = cfg.get("d_in", width)
    if cfg_d_in != width:
        raise SaeforgeError(f"{where}: encoder.weight is {tuple(enc.shape)} but cfg.json says d_in={cfg_d_in}",
                            "the weights and the config do not belong together")
    if d_in is not None and d_in != width:
        raise SaeforgeError(f"{folder} holds a sparse coder with d_in={width}, but d_in={d_in} was given",
                            "drop the d_in hint or pass the right folder")
    num_latents = cfg.get("num_latents", 0) or width * _int_field(cfg, "expansion_factor", cfg_path)
    if num_latents != n_lat:
        raise SaeforgeError(f"{where}: encoder.weight has {n_lat} latents but cfg.json implies {num_latents}",
                            "the weights and the config do not belong together")
    check_vector("encoder.bias", raw["encoder.bias"], n_lat, str(where))
    check_vector("b_dec", raw["b_dec"], width, str(where))
    w_dec = raw["W_dec"]
    if tuple(w_dec.shape) != (n_lat, width):
        raise SaeforgeError(f"{where}: W_dec has shape {tuple(w_dec.shape)}, expected [{n_lat}, {width}] "
                            "(sparsify stores the decoder as [num_latents, d_in])", "the file is damaged")
    if k > n_lat:
        raise SaeforgeError(f"{cfg_path}: k={k} exceeds num_latents={n_lat}", "the config is damaged")
    tensors = {"W_enc": enc.T, "b_enc": raw["encoder.bias"], "W_dec": w_dec, "b_dec": raw["b_dec"]}
    if skip:
        if tuple(raw["W_skip"].shape) != (width, width):
            raise SaeforgeError(f"{where}: W_skip has shape {tuple(raw['W_skip'].shape)}, expected [{width}, {width}]",
                                "the file is damaged")
        tensors["W_skip"] = raw["W_skip"]
    if transcode:
        config_class = TopKSkipTranscoderConfig if skip else TopKTranscoderConfig
        sae_cfg = config_class(d_in=width, d_sae=n_lat, k=k, dtype=dtype_name(enc))
    else:
        sae_cfg = TopKConfig(d_in=width, d_sae=n_lat, k=k, dtype=dtype_name(enc))
    sae = assemble(sae_cfg, tensors, where=str(where))

    metadata: dict[str, Any] = {"hook_name": folder.name}
    if transcode:
        reads, writes = _transcoder_sites(folder.name)
        metadata.update(hook_name=reads, reads=[reads], writes=[writes])
        if writes != reads:
            metadata["hook_name_out"] = writes
        else:
            notes.append(f"hookpoint {folder.name!r} is no saeforge site: bound to it as both read and written "
                         "(give the sites with --hook-name / metadata)")
    run_cfg_path = folder.parent / "config.json"
    if run_cfg_path.is_file():
        try:
            run_cfg = json.loads(run_cfg_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            run_cfg = None
            notes.append(f"{run_cfg_path} is not readable JSON; model metadata left out")
        if isinstance(run_cfg, dict):
            if isinstance(run_cfg.get("model"), str):
                metadata["model_name"] = run_cfg["model"]
            if isinstance(run_cfg.get("dataset"), str):
                metadata["dataset_path"] = run_cfg["dataset"]
            if isinstance(run_cfg.get("ctx_len"), int):
                metadata["context_size"] = run_cfg["ctx_len"]
    return ImportedSAE(sae=sae, fmt="sparsify", path=folder, metadata=metadata, notes=notes)


def _transcoder_sites(hookpoint: str) -> tuple[str, str]:
    """(read, written) sites of a sparsify transcoder trained at ``hookpoint`` (its input and its output)."""
    m = re.fullmatch(r"(?:model\.|transformer\.|gpt_neox\.)?(?:layers|h)\.(\d+)(\.mlp)?", hookpoint)
    if not m:
        return hookpoint, hookpoint
    layer = m.group(1)
    return (f"layers.{layer}.mlp_in", f"layers.{layer}.mlp_out") if m.group(2) else \
        (f"layers.{layer}.resid_pre", f"layers.{layer}.resid_post")


def write_sparsify(sae: SAE, folder: str | Path, **_: Any) -> Path:
    """Write a saeforge TopK SAE or (skip) transcoder as a sparsify hookpoint folder (``SparseCoder.load_from_disk``
    loads it)."""
    cfg = sae.cfg
    if sae.architecture not in ("topk", "topk_transcoder", "topk_skip_transcoder"):
        raise SaeforgeError(f"sparsify has no {sae.architecture} sparse coder (it has per-token TopK coders and "
                            "transcoders only)", "write it with --to saelens or --to saeforge")
    if cfg.d_output != cfg.d_in:
        raise SaeforgeError(f"a sparsify sparse coder decodes into d_in={cfg.d_in}, but this SAE has "
                            f"d_out={cfg.d_out}", "write it with --to saeforge")
    skip = bool(getattr(cfg, "skip_connection", False))
    folder = Path(folder)
    tensors: dict[str, Tensor] = {
        "encoder.weight": sae.W_enc.detach().T.contiguous(),
        "encoder.bias": sae.b_enc.detach(),
        "W_dec": sae.W_dec.detach(),
        "b_dec": sae.b_dec.detach(),
    }
    if skip:
        tensors["W_skip"] = sae.W_skip.detach()
    expansion = cfg.d_sae // cfg.d_in if cfg.d_sae % cfg.d_in == 0 and cfg.d_sae >= cfg.d_in else 1
    cfg_json = {
        "activation": "topk",
        "expansion_factor": max(1, expansion),
        "normalize_decoder": True,
        "num_latents": cfg.d_sae,
        "k": cfg.k,
        "multi_topk": False,
        "skip_connection": skip,
        "transcode": not cfg.apply_b_dec_to_input,
        "d_in": cfg.d_in,
    }
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(folder / SPARSIFY_WEIGHTS, tensors)
    atomic_write_json(folder / SPARSIFY_CFG, cfg_json)
    return folder
