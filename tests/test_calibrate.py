"""reuse.calibrate: running statistics re-estimated from unlabeled data, nothing else changed."""

from __future__ import annotations

import warnings

import pytest
import torch
from _helpers import Residual, Snapshot
from _zoo import randomize
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import reuse
from reuse import ReuseError


def test_statistics_are_those_of_the_data_by_hand() -> None:
    """A BatchNorm on the input: its running mean is the data's channel mean, its running variance the mean over
    batches of each batch's unbiased variance (momentum=None: the plain average)."""
    bn = nn.BatchNorm2d(3).eval()
    x = (
        torch.randn(40, 3, 4, 4) * torch.tensor([1.0, 2.0, 3.0])[:, None, None]
        + torch.tensor([5.0, -1.0, 0.5])[:, None, None]
    )
    batches = [x[:16], x[16:32], x[32:]]
    out = reuse.calibrate(bn, batches)
    torch.testing.assert_close(out.running_mean, torch.stack([b.mean((0, 2, 3)) for b in batches]).mean(0))
    torch.testing.assert_close(out.running_var, torch.stack([b.var((0, 2, 3)) for b in batches]).mean(0))
    assert int(out.num_batches_tracked) == 3
    assert out.momentum == bn.momentum and not out.training


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), train=st.booleans(), images=st.integers(1, 50))
def test_the_input_is_never_modified_and_only_statistics_change(seed: int, train: bool, images: int) -> None:
    torch.manual_seed(seed)
    model = reuse.wrap(randomize(Residual(4), seed), n=3, shuffle=False).train(train)
    snap = Snapshot.of(model)
    x = torch.randn(30, 4, 5, 5)
    out = reuse.calibrate(model, [x[:20], x[20:]], images=images)
    assert not snap.differences(model)  # the model handed in: untouched
    assert out is not model and out.training == train
    assert [m.training for m in out.modules()] == [m.training for m in model.modules()]
    for (name, a), b in zip(model.named_parameters(), out.parameters()):
        assert torch.equal(a, b), name
    seen = sum(int(m.num_batches_tracked) for m in out.modules() if isinstance(m, nn.BatchNorm2d))
    batches = 1 if images <= 20 else 2
    assert seen == batches * 6  # 3 uses x 2 BatchNorms, each of its own
    assert out.uses[2].conv1 is out.uses[0].conv1  # the sharing survives the copy


def test_each_use_gets_the_statistics_of_what_it_sees() -> None:
    torch.manual_seed(0)
    model = reuse.wrap(randomize(Residual(4)), n=3, shuffle=False).eval()
    out = reuse.calibrate(model, torch.randn(64, 4, 5, 5) + 3)
    means = [out.uses[i].bn1.running_mean for i in range(3)]
    assert not torch.allclose(means[0], means[1]) and not torch.allclose(means[1], means[2])


def test_inplace_calibrates_the_model_itself() -> None:
    model = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2))
    assert reuse.calibrate(model, torch.randn(8, 2, 3, 3) + 4, inplace=True) is model
    assert model[1].running_mean.abs().sum() > 0


def test_a_norm_no_batch_reaches_keeps_its_statistics_with_a_warning() -> None:
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.spare = nn.BatchNorm2d(2), nn.BatchNorm2d(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    model = Unused()
    with torch.no_grad():
        model.spare.running_mean.fill_(7.0)
    with pytest.warns(UserWarning, match=r"1 norm\(s\) saw no batch.*spare"):
        out = reuse.calibrate(model, torch.randn(4, 2, 3, 3))
    assert torch.all(out.spare.running_mean == 7.0)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ([], "data yielded no batch"),
        (torch.zeros(0, 3, 4, 4), "data yielded no batch|needs a non-empty batch"),
        (torch.zeros(4, 3, 4, 4, dtype=torch.uint8), r"torch.uint8.*images.float\(\) / 255"),
        ([torch.zeros(4, 3, 4, 4), torch.zeros(4, 3, 5, 5)], r"batch 1 of data has shape \(4, 3, 5, 5\)"),
        ([torch.zeros(4, 2, 4, 4)], r"failed on batch 0 of shape \(4, 2, 4, 4\)"),
        (["a"], "batch 0 of data is a str"),
        (3, "must be a tensor of inputs or an iterable"),
    ],
)
def test_bad_data_is_refused_with_the_reason(data: object, match: str) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(ReuseError, match=match):
        reuse.calibrate(model, data)


def test_a_failed_pass_leaves_the_model_as_it_was() -> None:
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3))
    with torch.no_grad():
        model[0].running_mean.fill_(1.5)
    with pytest.raises(ReuseError):
        reuse.calibrate(model, [torch.randn(4, 3, 5, 5), torch.randn(4, 3, 2, 2)], inplace=True)  # batch 1: too small
    assert torch.all(model[0].running_mean == 1.5) and model[0].momentum == 0.1 and model.training


def test_a_model_without_running_statistics_is_refused() -> None:
    with pytest.raises(ReuseError, match="no running statistics"):
        reuse.calibrate(nn.Sequential(nn.Conv2d(3, 3, 1), nn.GroupNorm(1, 3)), torch.randn(2, 3, 4, 4))


@pytest.mark.parametrize(("option", "value"), [("images", 0), ("images", 2.5), ("inplace", "yes")])
def test_bad_options(option: str, value: object) -> None:
    with pytest.raises(ReuseError, match=option):
        reuse.calibrate(nn.BatchNorm2d(3), torch.randn(2, 3, 4, 4), **{option: value})


def test_training_after_calibration_and_inference_mode() -> None:
    torch.manual_seed(0)
    model = reuse.wrap(Residual(4), n=2, shuffle=False)
    with torch.inference_mode():
        model.eval()(torch.randn(2, 4, 5, 5))
    out = reuse.calibrate(model, torch.randn(16, 4, 5, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out.train()(torch.randn(2, 4, 5, 5)).sum().backward()
    assert out.uses[0].conv1.weight.grad is not None
