"""TrainConfig checks."""

import pytest


def test_live_training_checks_sites_and_text_before_the_model_loads(tiny_llama_dir, text_file, tmp_path,
                                                                     monkeypatch):
    import random

    from saeforge.errors import SaeforgeError
    from saeforge.models.language_model import LanguageModel
    from saeforge.training import TrainConfig, train

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(LanguageModel, "load", no_model)
    base = dict(model=str(tiny_llama_dir), tokens=1024, batch_size=256, d_sae=64, k=4, device="cpu", progress=False)
    with pytest.raises(SaeforgeError, match="layer 8 does not exist, the model has 3 layers"):
        train(TrainConfig(out=str(tmp_path / "a"), sites=("layers.8.resid_post",), corpus=str(text_file), **base))
    junk = tmp_path / "junk.txt"
    junk.write_bytes(random.Random(1).randbytes(2048))
    with pytest.raises(SaeforgeError, match="junk.txt is not UTF-8 text"):
        train(TrainConfig(out=str(tmp_path / "b"), sites=("layers.1.resid_post",), corpus=str(junk), **base))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
