"""dictionary_learning (saprmarks/dictionary_learning) ``ae.pt`` state dicts (read only), with the ``config.json``
its trainer writes beside them (``{"trainer": {"dict_class", "activation_dim", "dict_size", "k", ...}, "buffer":
{...}}``; checkpoints ``checkpoints/ae_{step}.pt`` find it one folder up). The pickle is loaded with
``torch.load(weights_only=True)``: tensors only, no code.

=========================  ===========================================================  =============================
dict_class                 keys                                                         saeforge SAE
=========================  ===========================================================  =============================
AutoEncoder                bias, encoder.weight [F,d], encoder.bias, decoder.weight      relu "classic" (subtracts
                           [d,F]                                                        ``bias`` = b_dec first)
AutoEncoderNew             encoder.weight, encoder.bias, decoder.weight, decoder.bias   relu "april2024" (no b_dec
                                                                                        subtraction)
AutoEncoderTopK            encoder.weight, encoder.bias, decoder.weight, b_dec, k,      topk (per-token; the
                           threshold                                                    ``threshold`` buffer unused)
BatchTopKSAE               same keys as AutoEncoderTopK                                 batchtopk (threshold)
MatryoshkaBatchTopKSAE     W_enc [d,F], b_enc, W_dec [F,d], b_dec, k, threshold,        matryoshka
                           group_sizes
JumpReluAutoEncoder        W_enc [d,F], b_enc, W_dec [F,d], b_dec, threshold [F]        jumprelu (no b_dec
                                                                                        subtraction)
GatedAutoEncoder           decoder_bias, encoder.weight, r_mag, gate_bias, mag_bias,    gated
                           decoder.weight
=========================  ===========================================================  =============================

``AutoEncoderTopK`` and ``BatchTopKSAE`` have the same keys: without config.json an ``architecture`` hint ("topk" or
"batchtopk") must say which. ``JumpReluAutoEncoder`` and ``GatedAutoEncoder`` return ``f * ||decoder row||`` from
``encode`` and divide it back out in ``decode``; that scaling is folded into the weights (encoder columns and
per-latent biases/thresholds times the norms, decoder rows unit norm), so saeforge's encodings equal theirs.
dictionary_learning's JumpReLU applies ReLU after the jump, so a negative threshold acts exactly like 0.
Input normalisation is already folded into a saved ``ae.pt`` by dictionary_learning (``scale_biases``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saeforge.errors import SaeforgeError
from saeforge.formats.common import (
    ImportedSAE,
    assemble,
    check_keys,
    check_vector,
    dtype_name,
    fold_decoder_norms_into_tensors,
    orient,
    read_json,
    read_torch_state_dict,
)
from saeforge.saes import (
    BatchTopKConfig,
    GatedConfig,
    JumpReLUConfig,
    MatryoshkaConfig,
    ReLUConfig,
    TopKConfig,
)

__all__ = ["DL_CLASSES", "DL_FILENAME", "read_dictionary_learning"]

DL_FILENAME = "ae.pt"
DL_CONFIG = "config.json"

_LINEAR_TOPK = {"encoder.weight", "encoder.bias", "decoder.weight", "b_dec", "k", "threshold"}
# dict_class -> (required keys, optional keys, saeforge architecture)
DL_CLASSES: dict[str, tuple[set[str], set[str], str]] = {
    "AutoEncoder": ({"bias", "encoder.weight", "encoder.bias", "decoder.weight"}, set(), "relu"),
    "AutoEncoderNew": ({"encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"}, set(), "relu"),
    "AutoEncoderTopK": (_LINEAR_TOPK, set(), "topk"),
    "BatchTopKSAE": (_LINEAR_TOPK, set(), "batchtopk"),
    "MatryoshkaBatchTopKSAE": ({"W_enc", "b_enc", "W_dec", "b_dec", "k", "threshold", "group_sizes"}, set(),
                               "matryoshka"),
    "JumpReluAutoEncoder": ({"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}, set(), "jumprelu"),
    "GatedAutoEncoder": ({"decoder_bias", "encoder.weight", "r_mag", "gate_bias", "mag_bias", "decoder.weight"},
                         set(), "gated"),
}
_HINTS = {"topk": "AutoEncoderTopK", "batchtopk": "BatchTopKSAE", "matryoshka": "MatryoshkaBatchTopKSAE",
          "jumprelu": "JumpReluAutoEncoder", "gated": "GatedAutoEncoder", "relu": "AutoEncoder",
          "relu_classic": "AutoEncoder", "relu_april": "AutoEncoderNew", "standard": "AutoEncoder"}
# Non-tensor entries some versions leave in the state dict (PyTorchModelHubMixin's constructor arguments).
_IGNORED_ENTRIES = ("_hub_mixin_config",)


def _find_files(path: Path) -> tuple[Path, Path | None]:
    if path.is_dir():
        file = path / DL_FILENAME
        if not file.exists():
            raise SaeforgeError(f"{path} has no {DL_FILENAME}", "pass the ae.pt file (or a checkpoints/ae_N.pt)")
    else:
        file = path
    for folder in (file.parent, file.parent.parent):
        if (folder / DL_CONFIG).is_file():
            return file, folder / DL_CONFIG
    return file, None


def _classify(keys: set[str], cfg_class: str | None, hint: str | None, where: str) -> str:
    if hint:
        hinted = _HINTS.get(hint, hint)
        if hinted not in DL_CLASSES:
            raise SaeforgeError(f"unknown architecture hint {hint!r} for a dictionary_learning file",
                                f"use one of {', '.join(sorted(_HINTS))} (or a dict_class name)")
        if cfg_class and cfg_class != hinted:
            raise SaeforgeError(f"{where}: config.json says dict_class={cfg_class!r}, but the hint says {hint!r}",
                                "drop the hint (config.json is authoritative) or pass the right file")
        return hinted
    if cfg_class:
        if cfg_class not in DL_CLASSES:
            raise SaeforgeError(f"{where}: dictionary_learning dict_class {cfg_class!r} is not supported",
                                f"saeforge reads {', '.join(DL_CLASSES)}")
        return cfg_class
    matches = [name for name, (req, opt, _) in DL_CLASSES.items() if req <= keys <= req | opt]
    if len(matches) == 1:
        return matches[0]
    if set(matches) == {"AutoEncoderTopK", "BatchTopKSAE"}:
        raise SaeforgeError(f"{where}: AutoEncoderTopK and BatchTopKSAE save the same keys, and there is no "
                            "config.json (with trainer.dict_class) beside the file to tell them apart",
                            "pass architecture='topk' or architecture='batchtopk' (`saeforge convert --architecture`)")
    # the closest class by key overlap, to name the differences
    best = max(DL_CLASSES, key=lambda n: len(DL_CLASSES[n][0] & keys) - len(DL_CLASSES[n][0] ^ keys))
    req = DL_CLASSES[best][0]
    unknown, missing = sorted(keys - req), sorted(req - keys)
    raise SaeforgeError(f"{where}: the keys fit no dictionary_learning class; closest is {best} "
                        f"(unknown keys: {', '.join(unknown) or 'none'}; missing: {', '.join(missing) or 'none'})",
                        f"saeforge reads {', '.join(DL_CLASSES)}; pass architecture=... if the file is one of them")


def _int_scalar(t: Tensor, name: str, where: str) -> int:
    if t.numel() != 1:
        raise SaeforgeError(f"{where}: {name} must be a scalar, got shape {tuple(t.shape)}", "the file is damaged")
    return int(t.reshape(()).item())


def read_dictionary_learning(path: str | Path, *, d_in: int | None = None, architecture: str | None = None,
                             orientation: str | None = None, **_: Any) -> ImportedSAE:
    path = Path(path)
    if not path.exists():
        raise SaeforgeError(f"{path} does not exist", "pass the ae.pt file or its folder")
    file, cfg_path = _find_files(path)
    where = str(file)
    state = read_torch_state_dict(file, ignore=_IGNORED_ENTRIES)
    trainer: dict[str, Any] = {}
    buffer: dict[str, Any] = {}
    if cfg_path is not None:
        run_cfg = read_json(cfg_path, "dictionary_learning config")
        trainer = run_cfg.get("trainer") if isinstance(run_cfg.get("trainer"), dict) else {}
        buffer = run_cfg.get("buffer") if isinstance(run_cfg.get("buffer"), dict) else {}
    notes: list[str] = []
    cls = _classify(set(state), trainer.get("dict_class"), architecture, where)
    required, optional, arch = DL_CLASSES[cls]
    check_keys(state, required, optional, where=where, layout=f"dictionary_learning {cls}")

    cfg_d_in, cfg_f = trainer.get("activation_dim"), trainer.get("dict_size")
    if d_in is not None and isinstance(cfg_d_in, int) and d_in != cfg_d_in:
        raise SaeforgeError(f"{cfg_path} says activation_dim={cfg_d_in}, but d_in={d_in} was given",
                            "drop the d_in hint or pass the right file")
    d_in = cfg_d_in if isinstance(cfg_d_in, int) else d_in
    layout_known = cfg_path is not None

    # d_sae from a per-latent vector, d_in from a bias in the input space
    if "encoder.bias" in state:
        d_sae = check_vector("encoder.bias", state["encoder.bias"], None, where)
    elif "b_enc" in state:
        d_sae = check_vector("b_enc", state["b_enc"], None, where)
    else:
        d_sae = check_vector("gate_bias", state["gate_bias"], None, where)
    if isinstance(cfg_f, int) and cfg_f != d_sae:
        raise SaeforgeError(f"{where}: {d_sae} latents, but config.json says dict_size={cfg_f}",
                            "the weights and the config do not belong together")
    bias = next(b for b in ("bias", "decoder.bias", "b_dec", "decoder_bias") if b in state)  # every class has one
    d_in = check_vector(bias, state[bias], d_in, where)

    def enc(name: str, native: str) -> Tensor:
        return orient(name, state[name], rows=d_in, cols=d_sae, native=native, layout_known=layout_known or
                      native == "linear", hint=orientation, where=where, notes=notes)

    def dec(name: str, native: str) -> Tensor:
        return orient(name, state[name], rows=d_sae, cols=d_in, native=native, layout_known=layout_known or
                      native == "linear", hint=orientation, where=where, notes=notes, role="decoder")

    t: dict[str, Tensor] = {}
    if cls in ("AutoEncoder", "AutoEncoderNew", "AutoEncoderTopK", "BatchTopKSAE", "GatedAutoEncoder"):
        t["W_enc"] = enc("encoder.weight", "linear")
        t["W_dec"] = dec("decoder.weight", "linear")
    else:
        t["W_enc"] = enc("W_enc", "x_at_W")
        t["W_dec"] = dec("W_dec", "x_at_W")
    d_in = int(t["W_enc"].shape[0])
    dtype = dtype_name(t["W_enc"])
    t = {k: v.to(torch.float64) for k, v in t.items()}

    def vec(name: str, length: int) -> Tensor:
        check_vector(name, state[name], length, where)
        return state[name].to(torch.float64)

    if cls == "AutoEncoder":
        t.update(b_enc=vec("encoder.bias", d_sae), b_dec=vec("bias", d_in))
        cfg = ReLUConfig(d_in=d_in, d_sae=d_sae, dtype=dtype, variant="classic", apply_b_dec_to_input=True)
    elif cls == "AutoEncoderNew":
        t.update(b_enc=vec("encoder.bias", d_sae), b_dec=vec("decoder.bias", d_in))
        cfg = ReLUConfig(d_in=d_in, d_sae=d_sae, dtype=dtype, variant="april2024", apply_b_dec_to_input=False)
    elif cls in ("AutoEncoderTopK", "BatchTopKSAE", "MatryoshkaBatchTopKSAE"):
        b_enc_key = "b_enc" if "b_enc" in state else "encoder.bias"
        t.update(b_enc=vec(b_enc_key, d_sae), b_dec=vec("b_dec", d_in))
        k = _int_scalar(state["k"], "k", where)
        theta = state["threshold"]
        if theta.numel() != 1:
            raise SaeforgeError(f"{where}: threshold must be a scalar for {cls}, got {tuple(theta.shape)}",
                                "the file is damaged")
        if cls == "AutoEncoderTopK":
            cfg = TopKConfig(d_in=d_in, d_sae=d_sae, dtype=dtype, k=k, apply_b_dec_to_input=True)
        else:
            t["threshold"] = theta.reshape(()).to(torch.float32)
            if float(t["threshold"]) < 0:
                notes.append("the inference threshold was never learned (-1): saeforge encodes by batch selection "
                             "(dictionary_learning's encode would then return plain ReLU activations)")
            if cls == "BatchTopKSAE":
                cfg = BatchTopKConfig(d_in=d_in, d_sae=d_sae, dtype=dtype, k=k, apply_b_dec_to_input=True)
            else:
                groups = state["group_sizes"].reshape(-1).tolist()
                cfg = MatryoshkaConfig(d_in=d_in, d_sae=d_sae, dtype=dtype, k=k, apply_b_dec_to_input=True,
                                       group_sizes=tuple(int(g) for g in groups))
    elif cls == "JumpReluAutoEncoder":
        t.update(b_enc=vec("b_enc", d_sae), b_dec=vec("b_dec", d_in), threshold=vec("threshold", d_sae))
        neg = int((t["threshold"] < 0).sum())
        if neg:  # ReLU(pre * (pre > θ)) with θ < 0 equals ReLU(pre): exactly θ = 0
            t["threshold"] = t["threshold"].clamp_min(0)
            notes.append(f"{neg} negative threshold(s) set to 0 (identical under dictionary_learning's ReLU)")
        fold_decoder_norms_into_tensors(t, ("b_enc", "threshold"), where)
        notes.append("decoder norms folded into the encoder (dictionary_learning scales latents by them)")
        cfg = JumpReLUConfig(d_in=d_in, d_sae=d_sae, dtype=dtype, apply_b_dec_to_input=False)
    else:  # GatedAutoEncoder
        t.update(b_gate=vec("gate_bias", d_sae), b_mag=vec("mag_bias", d_sae), r_mag=vec("r_mag", d_sae),
                 b_dec=vec("decoder_bias", d_in))
        fold_decoder_norms_into_tensors(t, ("b_gate", "b_mag"), where)
        notes.append("decoder norms folded into the encoder (dictionary_learning scales latents by them)")
        cfg = GatedConfig(d_in=d_in, d_sae=d_sae, dtype=dtype, apply_b_dec_to_input=True)
    sae = assemble(cfg, t, where=where)

    meta: dict[str, Any] = {}
    if isinstance(trainer.get("lm_name"), str):
        meta["model_name"] = trainer["lm_name"]
    if isinstance(trainer.get("submodule_name"), str):
        meta["hook_name"] = trainer["submodule_name"]
    if isinstance(trainer.get("layer"), int):
        meta["layer"] = trainer["layer"]
    if isinstance(buffer.get("ctx_len"), int):
        meta["context_size"] = buffer["ctx_len"]
    meta["dictionary_learning_class"] = cls
    return ImportedSAE(sae=sae, fmt="dictionary_learning", path=file, metadata=meta, notes=notes)
