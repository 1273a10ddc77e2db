"""reuse.profile against counts made by hand from the architectures' tables."""

from __future__ import annotations

import functools

import pytest
import torch
import torchvision
from torch import nn

import reuse
from reuse.models import LruNet


def lrunet_hand_counts(n: int, classes: int = 10) -> dict[str, int]:
    """Table 1 of the paper at width 1x, 32x32 input, counted by hand.

    stem: conv 3x3 s2 3 -> 64 at 16x16, BN 64. LRU block of F channels at HxW: depthwise 3x3 F -> 2F
    (18F weights, 2F*9*HW multiply-adds), pointwise 2F -> F in 8 groups (F*2F/8 weights and F*2F/8*HW
    multiply-adds), BatchNorms over 2F and F per use. Stages (F, HxW): (64, 16x16), (128, 8x8), (256, 4x4),
    (512, 4x4). Head: conv 512 -> 256 in 8 groups at 2x2, BN 256, conv 256 -> classes (bias) at 2x2.
    """
    stages = [(64, 256), (128, 64), (256, 16), (512, 16)]
    block_weights = sum(18 * f + f * 2 * f // 8 for f, _ in stages)
    norms = sum(2 * (2 * f) + 2 * f for f, _ in stages)  # weight and bias of the two BatchNorms
    other = 3 * 64 * 9 + 2 * 64 + 512 * 256 // 8 + 2 * 256 + 256 * classes + classes
    block_macs = sum((2 * f * 9 + f * 2 * f // 8) * hw for f, hw in stages)
    other_macs = 64 * 3 * 9 * 256 + 256 * 512 // 8 * 4 + classes * 256 * 4
    return {
        "params": other + block_weights + n * norms,
        "params_unrolled": other + n * (block_weights + norms),
        "macs": other_macs + n * block_macs,
    }


@functools.cache
def lrunet_profile(n: int) -> reuse.Profile:
    return reuse.profile(LruNet(reuse=n), (1, 3, 32, 32))


@pytest.mark.parametrize("n", [1, 14])
def test_lrunet_matches_hand_counts(n: int) -> None:
    expected = lrunet_hand_counts(n)
    p = lrunet_profile(n)
    assert (p.params, p.params_unrolled, p.macs) == (expected["params"], expected["params_unrolled"], expected["macs"])
    assert p.flops == 2 * p.macs
    assert p.weight_bytes_cached == 4 * expected["params"]
    assert p.weight_bytes_uncached == 4 * expected["params_unrolled"]
    if n == 14:
        assert p.params == 206_282  # the paper's Table 2: 206k
        assert round(p.macs / 1e6, 1) == 35.5


def test_macs_scale_with_the_batch() -> None:
    one = reuse.profile(LruNet(reuse=2), (1, 3, 32, 32))
    assert reuse.profile(LruNet(reuse=2), (3, 3, 32, 32)).macs == 3 * one.macs


def resnet18_reused() -> nn.Module:
    """torchvision's ResNet-18 with its second block of layer1 used 3 times and of layer3 used 2 times."""
    model = torchvision.models.resnet18(num_classes=10)
    model.layer1[1] = reuse.wrap(model.layer1[1], n=3, shuffle=False)
    model.layer3[1] = reuse.wrap(model.layer3[1], n=2, shuffle=True)
    return model


def test_reused_resnet18_matches_hand_counts() -> None:
    """ResNet-18 on 64x64 inputs, conv by conv: (in, out, kernel, output size, calls)."""
    convs = [
        (3, 64, 7, 32, 1),  # conv1, stride 2
        (64, 64, 3, 16, 2),  # layer1[0]
        (64, 64, 3, 16, 2 * 3),  # layer1[1], 3 uses
        (64, 128, 3, 8, 1),
        (128, 128, 3, 8, 1),
        (64, 128, 1, 8, 1),  # layer2[0] and its downsample
        (128, 128, 3, 8, 2),  # layer2[1]
        (128, 256, 3, 4, 1),
        (256, 256, 3, 4, 1),
        (128, 256, 1, 4, 1),  # layer3[0]
        (256, 256, 3, 4, 2 * 2),  # layer3[1], 2 uses
        (256, 512, 3, 2, 1),
        (512, 512, 3, 2, 1),
        (256, 512, 1, 2, 1),  # layer4[0]
        (512, 512, 3, 2, 2),  # layer4[1]
    ]
    macs = sum(cin * cout * k * k * size * size * calls for cin, cout, k, size, calls in convs) + 512 * 10
    conv_weights = 3 * 64 * 49 + 4 * 64 * 64 * 9 + (64 * 128 * 9 + 3 * 128 * 128 * 9 + 64 * 128)
    conv_weights += 256 * 128 * 9 + 3 * 256 * 256 * 9 + 128 * 256 + 512 * 256 * 9 + 3 * 512 * 512 * 9 + 256 * 512
    bn_channels = 64 + 4 * 64 + (4 * 128 + 128) + (4 * 256 + 256) + (4 * 512 + 512)  # one BN per conv
    extra_bn_uses = 2 * 2 * 64 + 1 * 2 * 256  # layer1[1]: 2 more uses of 2 BNs; layer3[1]: 1 more use
    fc = 512 * 10 + 10
    params = conv_weights + 2 * bn_channels + 2 * extra_bn_uses + fc
    unrolled = params + 2 * 64 * 64 * 9 * 2 + 1 * 256 * 256 * 9 * 2  # the reused conv pairs, once per extra use

    p = reuse.profile(resnet18_reused(), (1, 3, 64, 64))
    assert p.macs == macs
    assert p.params == params
    assert p.params_unrolled == unrolled
    assert p.weight_bytes_uncached == 4 * unrolled and p.weight_bytes_cached == 4 * params


def test_calls_are_counted_per_call() -> None:
    """FlopCounterMode counts every call: a block used N times costs N times, a module called twice twice."""
    block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
    single = reuse.profile(block, (2, 8, 6, 6))
    assert single.macs == 2 * 8 * 8 * 9 * 36
    assert reuse.profile(reuse.wrap(block, n=5), (2, 8, 6, 6)).macs == 5 * single.macs

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.fc(x)))  # (B, 16)

    p = reuse.profile(Twice(), (4, 16))
    assert p.macs == 2 * 4 * 16 * 16
    assert (p.params, p.params_unrolled) == (272, 544)
    assert (p.weight_bytes_cached, p.weight_bytes_uncached) == (4 * 272, 8 * 272)


def test_profiling_leaves_the_model_as_it_was() -> None:
    model = LruNet(reuse=2).train()
    model.head_bn.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reuse.profile(model, (2, 3, 32, 32))
    assert model.training and model.stage1.uses[1].dw_bn.training and not model.head_bn.training
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_printed_table() -> None:
    text = str(lrunet_profile(14))
    lines = text.splitlines()
    assert lines[0] == "Profile of one forward, input (1, 3, 32, 32)"
    assert lines[1].split() == ["reused", "unrolled"]
    assert lines[2].split() == ["parameters", "206.28", "k", "1.56", "M"]
    assert lines[3].split() == ["multiply-adds", "(MACs)", "35.50", "M", "35.50", "M"]
    assert any(line.split()[:1] == ["stage4"] for line in lines)
    assert not any(line.split()[:1] == ["pool1"] for line in lines), "rows that cost nothing are left out"


@pytest.mark.parametrize("shape", [(), (1, 0, 4), (1.5, 3)])
def test_bad_input_size(shape: tuple) -> None:
    with pytest.raises(reuse.ReuseError, match="input_size must be a shape of positive ints"):
        reuse.profile(nn.Identity(), shape)


@pytest.mark.parametrize(
    ("model", "size", "match"),
    [
        (nn.Identity(), 32, "a shape of positive ints"),
        (nn.Identity(), "1x3x32x32", "a shape of positive ints"),
        (
            LruNet(reuse=1, width_mult=0.25),
            (3, 32, 32),
            r"fails on an input of shape \(3, 32, 32\).*try \(1, 3, 32, 32\)",
        ),
        (nn.Conv2d(3, 8, 3), (1, 4, 8, 8), r"Conv2d fails on an input of shape \(1, 4, 8, 8\)"),
    ],
)
def test_inputs_the_model_cannot_take_are_reuse_errors(model: nn.Module, size: object, match: str) -> None:
    model.train()
    with pytest.raises(reuse.ReuseError, match=match):
        reuse.profile(model, size)
    assert model.training  # the mode is restored after the failing forward


def test_the_function_does_not_hide_its_module() -> None:
    """``reuse.profile`` is the function; its module is ``reuse.profiling`` (and ``reuse.calibrate`` the function of
    ``reuse.calibration``), so ``import reuse.profiling`` and the attribute never fight."""
    import importlib

    import reuse

    assert callable(reuse.profile) and reuse.profile.__module__ == "reuse.profiling"
    assert importlib.import_module("reuse.profiling").profile is reuse.profile
    assert reuse.calibrate.__module__ == "reuse.calibration"
