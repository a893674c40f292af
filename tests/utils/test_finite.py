import pytest
import torch

from saeforge.utils.finite import all_finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_all_finite_finds_one_bad_value_anywhere(dtype, bad):
    # every position of a tensor large enough to be reduced in vector lanes, by several threads, with a tail
    x = torch.randn(257, 131, dtype=torch.float64).to(dtype)
    assert all_finite(x)
    flat = x.view(-1)
    for i in list(range(0, 40)) + list(range(flat.numel() - 40, flat.numel())) + list(range(40, flat.numel(), 997)):
        y = flat.clone()
        y[i] = bad
        assert not all_finite(y.view_as(x)), (dtype, bad, i)
        assert all_finite(y.view_as(x)) == bool(torch.isfinite(y).all())


def test_all_finite_on_views_empty_and_extreme_values():
    assert all_finite(torch.empty(0, 768))
    big = torch.full((64, 8), torch.finfo(torch.float32).max)
    big[3, 3] = -torch.finfo(torch.float32).max
    assert all_finite(big)  # the largest finite values are finite
    x = torch.randn(64, 96)
    x[5, 7] = float("nan")
    assert all_finite(x[:, :7]) and not all_finite(x[:, 7:]) and not all_finite(x.t())
    both = torch.randn(32, 32)
    both[0, 0], both[1, 1] = float("inf"), -float("inf")
    assert not all_finite(both)
