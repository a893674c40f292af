import torch

from saeforge.editing.weights import commit, down_projection, neuron_axis, with_delta
from saeforge.errors import SaeforgeError


def test_commit_changes_exactly_the_masked_neurons_and_matches_the_hook(tiny_model_dirs):
    from saeforge.models.language_model import LanguageModel

    for family, axis in (("llama", 1), ("gpt2", 0)):  # nn.Linear columns, Conv1D rows
        lm = LanguageModel.load(str(tiny_model_dirs[family]), device="cpu")
        module = down_projection(lm, 1)
        assert neuron_axis(module) == axis
        before = module.weight.detach().clone()
        neurons = torch.tensor([3, 10, 11, 40])
        torch.manual_seed(1)
        delta = torch.randn(4, lm.d_model)
        ids = torch.tensor([[0, 5, 9, 30, 44, 17]])
        with torch.no_grad(), with_delta(module, neurons, delta):
            hooked = lm.logits(ids)
        commit(module, neurons, delta)
        after = module.weight.detach()
        changed = (after != before).any(dim=1 - axis).nonzero().flatten().tolist()
        assert changed == [3, 10, 11, 40]
        moved = after.index_select(axis, neurons) - before.index_select(axis, neurons)
        torch.testing.assert_close(moved if axis == 0 else moved.T, delta, rtol=0, atol=1e-6)
        committed = lm.logits(ids)
        torch.testing.assert_close(committed, hooked, rtol=1e-5, atol=1e-5)


def test_down_projection_refuses_a_layer_out_of_range(tiny_llama):
    import pytest

    with pytest.raises(SaeforgeError, match="out of range"):
        down_projection(tiny_llama, 3)
