"""Per-step overhead fixes of the batch transforms: statistics cast once (not per batch), no host syncs in MixUp."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_techniques.normalization.minmax import MinMaxScale
from lightning_techniques.normalization.zscore import Standardize, _scale_and_shift, cached_cast, standardize


def test_statistics_are_cast_once_and_recast_when_they_change() -> None:
    torch.manual_seed(0)
    mean, std = torch.randn(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64) + 0.5
    module = Standardize(mean, std)
    x = torch.randn(4, 5)
    first = cached_cast(module, ("mean", "std"), torch.float32, x.device)
    assert cached_cast(module, ("mean", "std"), torch.float32, x.device)[0] is first[0]  # reused, not re-cast
    # the module derives (1 / std, -mean / std) from the same buffers: a different cache entry, not the raw cast
    torch.testing.assert_close(module(x), standardize(x, mean, std), rtol=1e-6, atol=1e-6)
    scale, shift = cached_cast(module, ("mean", "std"), torch.float32, x.device, _scale_and_shift)
    assert cached_cast(module, ("mean", "std"), torch.float32, x.device, _scale_and_shift)[0] is scale
    torch.testing.assert_close(scale, (1 / std).float(), rtol=0, atol=0)
    torch.testing.assert_close(shift, (-mean / std).float(), rtol=1e-7, atol=1e-7)
    assert torch.equal(module(x), torch.addcmul(shift, x, scale))
    assert module(x.double()).dtype == torch.float64  # a cast per dtype
    # in-place change of the statistics (what load_state_dict does) invalidates the cache
    new_mean = torch.randn(5, dtype=torch.float64)
    module.load_state_dict({"mean": new_mean, "std": std})
    torch.testing.assert_close(module(x), standardize(x, new_mean, std), rtol=1e-6, atol=1e-6)
    # replacing the buffers (module.to / assignment) invalidates it too
    module.mean = torch.zeros(5, dtype=torch.float64)
    torch.testing.assert_close(module(x), x / std.float(), rtol=1e-6, atol=1e-6)
    # the copy made by export / deepcopy computes the same
    torch.testing.assert_close(copy.deepcopy(module)(x), module(x), rtol=0, atol=0)


def test_minmax_scale_uses_the_cast_cache() -> None:
    module = MinMaxScale.from_bounds(torch.zeros(3), torch.tensor([1.0, 2.0, 4.0]))
    x = torch.tensor([[1.0, 1.0, 1.0]])
    assert torch.equal(module(x), torch.tensor([[1.0, 0.5, 0.25]]))
    module.load_state_dict({"scale": torch.ones(3, dtype=torch.float64), "offset": torch.zeros(3, dtype=torch.float64)})
    assert torch.equal(module(x), x)


def test_cast_under_inference_mode_is_not_reused_in_training() -> None:
    module = Standardize(torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64))
    with torch.inference_mode():
        module(torch.ones(1, 2))
    x = torch.ones(1, 2, requires_grad=True)
    module(x).sum().backward()  # an inference-mode cast reused here would fail in autograd
    assert torch.equal(x.grad, torch.ones(1, 2))


def test_mixing_rng_is_a_pure_function_of_the_seed() -> None:
    from lightning_techniques.augment.mixing import _ReseededRNG

    rng = _ReseededRNG()
    first = [rng(12345).random(), rng(12345).beta(0.2, 0.2)]
    again = _ReseededRNG()
    assert [again(12345).random(), again(12345).beta(0.2, 0.2)] == first
    assert rng(12346).random() != first[0]
    stream = rng(7)
    sequence = [stream.random() for _ in range(3)]
    assert len(set(sequence)) == 3  # a stream, not one value repeated
    other = _ReseededRNG()(7)
    assert [other.random() for _ in range(3)] == sequence


def test_soft_targets_checks_label_range_with_one_reduction() -> None:
    from lightning_techniques.augment.mixing import soft_targets

    assert torch.equal(soft_targets(torch.tensor([0, 2]), 3), torch.tensor([[1.0, 0, 0], [0, 0, 1.0]]))
    with pytest.raises(ValueError, match=r"\[0, 3\), got min -1, max 2"):
        soft_targets(torch.tensor([-1, 2]), 3)
    with pytest.raises(ValueError, match="got min 0, max 3"):
        soft_targets(torch.tensor([0, 3]), 3)


def test_shape_check_is_remembered_per_shape_pair_and_still_refuses_a_wrong_batch() -> None:
    from lightning_techniques.normalization.zscore import check_batch_shape

    module = Standardize(torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    module(torch.ones(2, 3))
    assert module.__dict__["_checked_shapes"] == (torch.Size([2, 3]), torch.Size([3]))
    with pytest.raises(ValueError, match="does not match the fitted statistics"):
        module(torch.ones(2, 4))  # a new shape is checked again
    module(torch.ones(5, 3))  # another batch size of the right shape
    # statistics of another shape (buffers replaced): the remembered pair no longer matches, the batch is refused
    module.mean, module.std = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="does not match the fitted statistics"):
        module(torch.ones(5, 3))
    scale = MinMaxScale.from_bounds(torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="MinMaxScale: input of shape"):
        scale(torch.ones(2, 2))
    with pytest.raises(ValueError, match="X: input of shape"):
        check_batch_shape(module, torch.ones(2), torch.zeros(3), "X")
