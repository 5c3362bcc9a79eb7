"""The per-step gradient check (train.on_nonfinite): exact, without a temporary the size of the buffer."""

import pytest
import torch

from megatron_sft.train import model_setup
from megatron_sft.train.model_setup import all_finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_any_non_finite_element_is_found_in_any_slice(monkeypatch, dtype, bad):
    monkeypatch.setattr(model_setup, "EXACT_CHECK_ELEMENTS", 7)  # several slices, the bad one not the first
    values = torch.randn(100, dtype=dtype)
    assert all_finite(values)
    for index in (0, 13, 99):
        broken = values.clone()
        broken[index] = bad
        assert not all_finite(broken), index


def test_opposite_infinities_and_overflowing_finite_values():
    both = torch.zeros(10)
    both[2], both[5] = float("inf"), float("-inf")  # the sum is NaN: still non-finite
    assert not all_finite(both)
    huge = torch.full((8,), 3e38)  # finite, but their sum overflows: the exact check must say finite
    assert bool(torch.isinf(huge.sum()))
    assert all_finite(huge)
    assert all_finite(torch.tensor([3e38, -3e38, 3e38]))


def test_agrees_with_torch_isfinite_on_random_buffers():
    generator = torch.Generator().manual_seed(0)
    specials = torch.tensor([float("nan"), float("inf"), float("-inf"), 3e38, -3e38, 0.0])
    for _ in range(200):
        values = torch.randn(50, generator=generator)
        picks = torch.randint(0, 50, (3,), generator=generator)
        values[picks] = specials[torch.randint(0, len(specials), (3,), generator=generator)]
        assert all_finite(values) == bool(torch.isfinite(values).all())
