"""Filter and kernel reuse on whole networks: torchvision's ResNet-18 and LruNet's ``level`` variants."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from reuse import FilterReuseConv2d, KernelReuseConv2d, ReuseError, filter_reuse, kernel_reuse
from reuse.models import LruNet

CASES = {
    "filter-index": (filter_reuse, FilterReuseConv2d, 0.25, "index"),
    "filter-mix": (filter_reuse, FilterReuseConv2d, 0.05, "mix"),
    "kernel-index": (kernel_reuse, KernelReuseConv2d, 0.1, "index"),
    "kernel-mix": (kernel_reuse, KernelReuseConv2d, 4, "mix"),
}


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_resnet18_forward_backward(resnet: nn.Module, case: tuple) -> None:
    convert, layer, bank_size, mode = case
    before = {k: v.clone() for k, v in resnet.state_dict().items()}
    model = convert(resnet, bank_size=bank_size, mode=mode)
    convs = [m for m in resnet.modules() if isinstance(m, nn.Conv2d)]
    converted = [m for m in model.modules() if isinstance(m, layer)]
    wanted = [c for c in convs if convert is filter_reuse or c.kernel_size != (1, 1)]
    assert len(converted) == len(wanted)  # every conv (every conv with kernels larger than 1x1)
    assert count(model) < count(resnet)
    model(torch.randn(2, 3, 32, 32)).logsumexp(1).sum().backward()
    banks = {id(m.bank): m.bank.weight for m in converted}
    assert all(b.grad is not None and b.grad.abs().sum() > 0 for b in banks.values())
    assert all(isinstance(m, nn.Conv2d) for m in resnet.modules() if "conv" in type(m).__name__.lower())
    assert all(torch.equal(before[k], v) for k, v in resnet.state_dict().items())  # the model handed in: untouched


def test_resnet18_exact_at_full_size(resnet: nn.Module) -> None:
    """No compression: the converted network computes what it did (per conv, both grains: see test_levels.py)."""
    model = filter_reuse(resnet).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), resnet.eval()(x))


def _block_conv_params(net: LruNet) -> int:
    return sum(count(stage.block.dw) + count(stage.block.pw) for stage in net.stages)


@pytest.mark.parametrize("level", ["filter", "kernel"])
def test_lrunet_level_parameter_count(level: str) -> None:
    """8-LruNet-1x at a finer grain: the LRU blocks' conv weights replaced by index-mode banks of a quarter of the
    entries, one bank per shape shared across the four stages, as the closed form counts them."""
    layer, net = LruNet(reuse=8), LruNet(reuse=8, level=level)
    widths = [stage.block.channels for stage in layer.stages]  # F of each stage
    dw_filters = sum(2 * f for f in widths)  # depthwise 3x3, multiplier 2: one 1x3x3 filter (= kernel) per output
    dw = round(dw_filters / 4) * 9 + dw_filters  # bank + one scale per filter
    if level == "filter":  # pointwise 2F -> F in 8 groups: F filters of 2F/8 channels each, one bank per stage
        pw = sum(round(f / 4) * (2 * f // 8) + f for f in widths)
    else:  # 1x1 kernels are left as they are
        pw = sum(count(stage.block.pw) for stage in layer.stages)
    assert count(net) == count(layer) - _block_conv_params(layer) + dw + pw
    assert net.stage1.block.dw.bank is net.stage4.block.dw.bank  # one bank of 3x3 depthwise filters for all stages


@pytest.mark.parametrize("level", ["filter", "kernel"])
def test_lrunet_level_trains_and_round_trips(level: str) -> None:
    torch.manual_seed(0)
    net = LruNet(reuse=2, level=level)
    layer = FilterReuseConv2d if level == "filter" else KernelReuseConv2d
    for stage in net.stages:
        assert isinstance(stage.block.dw, layer)
        assert all(use.dw is stage.block.dw and use.pw is stage.block.pw for use in stage.uses)  # still layer reuse
    assert isinstance(net.stem[0], nn.Conv2d) and isinstance(net.head_conv, nn.Conv2d)  # only the LRU blocks
    x = torch.randn(2, 3, 32, 32)
    net(x).logsumexp(1).sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    twin = LruNet(reuse=2, level=level)
    twin.load_state_dict(net.state_dict())
    net.eval(), twin.eval()
    torch.testing.assert_close(net(x), twin(x))


def test_lrunet_level_bad_value() -> None:
    assert LruNet(reuse=1).level == "layer"
    with pytest.raises(ReuseError, match="level must be"):
        LruNet(reuse=1, level="channel")
