"""reuse.optimize_for_inference: one folded conv per use, identical outputs, the input left untouched."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import pytest
import torch
from _helpers import Residual
from _zoo import Model, Net, randomize, select
from torch import nn
from torch.fx.experimental.optimization import fuse as fx_fuse

import reuse
from reuse.models import LruNet


def trained(make: Callable[[], nn.Module], x: torch.Tensor) -> nn.Module:
    """A model whose per-use running statistics differ from use to use (randomised, then two training-mode
    forwards on ``x``)."""
    model = randomize(make()).train()
    with torch.no_grad():
        for _ in range(2):
            model(x)
    return model.eval()


@pytest.mark.parametrize("case", select("optimize"))
def test_outputs_equal_the_eval_model_and_every_batchnorm_is_folded(case: Model) -> None:
    torch.manual_seed(0)
    x = torch.randn(case.shape)
    model = trained(case.build, x)
    fast = reuse.optimize_for_inference(model)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules()), "a BatchNorm was left"
    assert not fast.training and not any(p.requires_grad for p in fast.parameters())


def test_each_use_gets_its_own_folded_weights() -> None:
    torch.manual_seed(0)
    model = trained(lambda: LruNet(reuse=4), torch.randn(4, 3, 32, 32))
    fast = reuse.optimize_for_inference(model)
    weights = [use.dw.weight for use in fast.stage2.uses]
    assert len({id(w) for w in weights}) == 4, "the uses still share one folded conv"
    for use, folded in zip(model.stage2.uses, weights):  # use i's weight = shared weight * gamma_i / sigma_i
        scale = use.dw_bn.weight / torch.sqrt(use.dw_bn.running_var + use.dw_bn.eps)
        torch.testing.assert_close(folded, use.dw.weight * scale.view(-1, 1, 1, 1))


def test_torch_fx_fuser_is_wrong_for_a_reused_conv_and_ours_is_right() -> None:
    """fx's conv-BN fuser rewrites the one shared conv for each BatchNorm after it; every use then carries
    all the folded BatchNorms. Ours folds each use's BatchNorm into a conv of that use."""
    torch.manual_seed(0)
    model = trained(lambda: reuse.wrap(Residual(8, groups2=2), n=3), torch.randn(4, 8, 5, 5))
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        expected = model(x)
        naive = fx_fuse(copy.deepcopy(model))(x)
        ours = reuse.optimize_for_inference(model)(x)
    assert not torch.allclose(naive, expected, rtol=1e-3, atol=1e-3), "fx's fuser was expected to be wrong here"
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_a_conv_called_twice_outside_layer_reuse_is_left_unfolded_with_a_warning() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn1, self.bn2 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn2(self.conv(self.bn1(self.conv(x))))  # (B, 4, H, W)

    torch.manual_seed(0)
    model = trained(Twice, torch.randn(4, 4, 5, 5))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = reuse.optimize_for_inference(model)
    assert [str(w.message)[:53] for w in caught] == [
        "optimize_for_inference: left conv -> bn1 unfolded: th",
        "optimize_for_inference: left conv -> bn2 unfolded: th",
    ]
    assert "the conv is called 2 times" in str(caught[0].message)
    assert isinstance(fast.bn1, nn.BatchNorm2d) and isinstance(fast.bn2, nn.BatchNorm2d)
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x))


def test_the_input_model_is_untouched() -> None:
    torch.manual_seed(0)
    model = trained(Net, torch.randn(4, 3, 8, 8)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules(remove_duplicate=False))
    reuse.optimize_for_inference(model)
    assert model.training
    assert dict(model.named_modules(remove_duplicate=False)) == modules
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert model.body.uses[2].conv1 is model.body.uses[0].conv1


def test_subclasses_and_stat_free_norms_are_left_alone() -> None:
    class ScaledConv(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2  # (B, C, H, W)

    model = nn.Sequential(
        ScaledConv(4, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)
    ).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = reuse.optimize_for_inference(model)
    assert [type(m).__name__ for m in fast] == ["ScaledConv", "BatchNorm2d", "Conv2d", "BatchNorm2d"]
    assert [str(w.message).split(": ", 2)[-1] for w in caught] == [
        "the BatchNorm keeps no running statistics (track_running_stats=False)"
    ]  # ScaledConv is traced through (not a leaf): no pair to warn about
    x = torch.randn(2, 4, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x))


def test_state_dict_of_the_optimized_model_round_trips() -> None:
    torch.manual_seed(0)
    model = trained(lambda: LruNet(reuse=2), torch.randn(4, 3, 32, 32))
    fast = reuse.optimize_for_inference(model)
    twin = reuse.optimize_for_inference(LruNet(reuse=2))
    twin.load_state_dict(fast.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), fast(x))


def test_not_a_module() -> None:
    with pytest.raises(reuse.ReuseError, match="needs an nn.Module"):
        reuse.optimize_for_inference(lambda x: x)  # type: ignore[arg-type]


def test_channels_last_takes_only_bools() -> None:
    with pytest.raises(reuse.ReuseError, match="channels_last must be True or False"):
        reuse.optimize_for_inference(nn.Conv2d(3, 8, 3), channels_last="no")


# ---------------------------------------------------------------------------------------- share_weights=True


@pytest.mark.parametrize("case", select("share_weights"))  # LruNet at N > 1: the next test
def test_shared_weights_mode_equals_the_model_and_keeps_its_size(case: Model) -> None:
    torch.manual_seed(0)
    x = torch.randn(case.shape)
    model = trained(case.build, x)
    small = reuse.optimize_for_inference(model, share_weights=True)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-5)
    # Parameters: the model's, less the BatchNorms folded into an unshared conv (2 per channel become a conv's 1
    # bias per channel, or none where the conv had a bias already); each use's BatchNorm a scale and a shift.
    outside = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    reused = [layer for layer in model.modules() if isinstance(layer, reuse.LayerReuse) and layer.n > 1]
    inside = {id(m) for layer in reused for m in layer.modules()}
    folded = [m for m in outside if id(m) not in inside]  # outside reuse, or in a block used once
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params - 2 * sum(m.num_features for m in folded) <= sum(p.numel() for p in small.parameters())
    assert sum(p.numel() for p in small.parameters()) <= n_params - sum(m.num_features for m in folded)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in small.modules()), "a BatchNorm was left"


def test_shared_weights_mode_keeps_one_conv_and_a_scale_per_use() -> None:
    torch.manual_seed(0)
    model = trained(lambda: LruNet(width_mult=0.5, reuse=4), torch.randn(4, 3, 32, 32))
    small = reuse.optimize_for_inference(model, share_weights=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-5)
    # the stem's and the head's BatchNorms fold into their convs (32 and 128 channels at 0.5x: 2 parameters per
    # channel become 1 bias); every reused conv stays one conv, each use's BatchNorm one scale and one shift
    assert sum(p.numel() for p in small.parameters()) == sum(p.numel() for p in model.parameters()) - 32 - 128
    assert len({id(use.dw) for use in small.stage2.uses}) == 1, "the uses no longer share the depthwise conv"
    for use, mine in zip(model.stage2.uses, small.stage2.uses):  # use i: gamma_i / sigma_i and its shift
        bn = use.dw_bn
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        torch.testing.assert_close(mine.dw_bn.scale, scale)
        torch.testing.assert_close(mine.dw_bn.shift, bn.bias - bn.running_mean * scale)


def test_shared_weights_mode_folds_convs_no_two_uses_share() -> None:
    torch.manual_seed(0)
    model = trained(lambda: LruNet(width_mult=0.25, reuse=3, share=False), torch.randn(2, 3, 32, 32))
    small = reuse.optimize_for_inference(model, share_weights=True)
    assert not any(isinstance(m, reuse.optimize.ChannelAffine) for m in small.modules())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-5)


def test_shared_weights_mode_leaves_the_input_untouched() -> None:
    torch.manual_seed(0)
    model = trained(Net, torch.randn(4, 3, 8, 8)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reuse.optimize_for_inference(model, share_weights=True)
    assert model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert isinstance(model.body.uses[1].bn1, nn.BatchNorm2d)


def test_share_weights_must_be_a_bool() -> None:
    with pytest.raises(reuse.ReuseError, match="share_weights must be True or False"):
        reuse.optimize_for_inference(nn.Conv2d(1, 1, 1), share_weights="yes")  # type: ignore[arg-type]
