"""The MLP hidden site of each family: refusals before loading, output directions through the down projection."""

from __future__ import annotations

import pytest
import torch

from saeforge.errors import SaeforgeError
from saeforge.neurons.mlp import check_mlp_model, mlp_layer, mlp_site, output_directions, vocabulary_projection


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2", "gpt_neox"])
def test_output_directions_are_the_down_projection_of_the_neuron_pattern(tiny_model_dirs, family):
    from saeforge.models.language_model import LanguageModel

    lm = LanguageModel.load(str(tiny_model_dirs[family]), device="cpu")
    site = mlp_site(lm, "layers.1.mlp_hidden")
    z = torch.randn(3, site.d)
    out = output_directions(lm, "layers.1.mlp_hidden", z)
    assert out.shape == (3, lm.d_model)
    # the same direction seen by the model: adding z at mlp_hidden moves mlp_out by W_out z (times Gemma's norm
    # scale, which is exact here only to first order, so that family is checked through the linear map alone)
    ids = torch.tensor([[0, 5, 9, 12]])
    if family != "gemma2":
        clean = lm.read(ids, ["layers.1.mlp_out"])["layers.1.mlp_out"]
        with lm.edit({"layers.1.mlp_hidden": lambda x: x + z[0]}):
            moved = lm.read(ids, ["layers.1.mlp_out"])["layers.1.mlp_out"]
        assert torch.allclose(moved - clean, out[0].expand_as(clean), atol=1e-5)
    proj = vocabulary_projection(lm, "layers.1.mlp_hidden", z, n=4)
    assert len(proj) == 3 and len(proj[0][0]) == 4
    logits = lm.direction_logits(out)
    assert [v for _, v in proj[1][0]] == pytest.approx(logits[1].topk(4).values.tolist(), rel=1e-5)


def test_a_site_that_is_not_an_mlp_hidden_site_is_refused_with_the_one_to_use():
    with pytest.raises(SaeforgeError, match="not an MLP hidden site") as err:
        mlp_layer("layers.3.resid_post")
    assert "--site layers.3.mlp_hidden" in err.value.fix
    with pytest.raises(SaeforgeError, match="not an MLP hidden site"):
        mlp_layer("model.layers.3.mlp.act_fn")
    assert mlp_layer("layers.12.mlp_hidden") == 12


@pytest.mark.parametrize("family", ["opt", "mixtral"])
def test_a_family_without_a_dense_mlp_is_refused_before_and_after_loading(no_mlp_model_dirs, family):
    from saeforge.models.language_model import LanguageModel

    with pytest.raises(SaeforgeError, match="has no MLP hidden site") as err:
        check_mlp_model(str(no_mlp_model_dirs[family]), "layers.0.mlp_hidden")
    assert ("mixture of experts" in err.value.problem) == (family == "mixtral")
    assert "llama" in err.value.fix
    lm = LanguageModel.load(str(no_mlp_model_dirs[family]), device="cpu")
    with pytest.raises(SaeforgeError, match="no MLP hidden site"):
        mlp_site(lm, "layers.0.mlp_hidden")


def test_a_rank_above_the_neurons_and_a_missing_layer_are_refused_from_the_config(tiny_llama_dir):
    with pytest.raises(SaeforgeError, match=r"rank 65 is above the number of neurons \(64\)"):
        check_mlp_model(str(tiny_llama_dir), "layers.1.mlp_hidden", rank=65)
    with pytest.raises(SaeforgeError, match="3 layers"):
        check_mlp_model(str(tiny_llama_dir), "layers.7.mlp_hidden", rank=8)
    check_mlp_model(str(tiny_llama_dir), "layers.2.mlp_hidden", rank=64)
