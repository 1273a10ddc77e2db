"""Filter reuse (FRU) and kernel reuse (KRU): laws that hold for both grains, over conv shapes, groups, bank sizes
and modes; then the rules each grain adds (rolled channels, skipped 1x1 kernels) and the model-level transform."""

from __future__ import annotations

import copy
import io
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import reuse
from reuse import (
    FilterBank,
    FilterReuseConv2d,
    KernelBank,
    KernelReuseConv2d,
    ReuseError,
    filter_reuse,
    kernel_reuse,
)

MODES = ("index", "mix")
SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- the two grains, as a registry ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Grain:
    name: str
    bank: Callable[[int, nn.Conv2d], nn.Module]  # a bank of M entries that fits a conv
    layer: type  # the banked conv class
    convert: Callable[..., nn.Module]  # filter_reuse / kernel_reuse
    entries: Callable[[nn.Conv2d], int]  # filters or kernels a conv holds

    def params(self, conv: nn.Conv2d, bank_size: int, mode: str) -> int:
        """The closed form: parameters of one banked conv plus its bank."""
        o, c, k = conv.out_channels, conv.in_channels // conv.groups, math.prod(conv.kernel_size)
        bias = o if conv.bias is not None else 0
        if self.name == "filter":
            per_layer = o if mode == "index" else o * bank_size
            return bank_size * c * k + per_layer + bias
        per_layer = o * c if mode == "index" else o * c * bank_size
        return bank_size * k + per_layer + bias

    def build(self, bank: nn.Module, conv: nn.Conv2d, mode: str, **kwargs: object) -> nn.Module:
        """A banked conv with ``conv``'s arguments, drawing from ``bank``."""
        args = {
            "stride": conv.stride,
            "padding": conv.padding,
            "dilation": conv.dilation,
            "groups": conv.groups,
            "bias": conv.bias is not None,
            "padding_mode": conv.padding_mode,
        }
        return self.layer(bank, conv.in_channels, conv.out_channels, **args, mode=mode, **kwargs)


GRAINS = {
    "filter": Grain(
        "filter",
        lambda m, conv: FilterBank(m, conv.in_channels // conv.groups, conv.kernel_size),
        FilterReuseConv2d,
        filter_reuse,
        lambda conv: conv.out_channels,
    ),
    "kernel": Grain(
        "kernel",
        lambda m, conv: KernelBank(m, conv.kernel_size),
        KernelReuseConv2d,
        kernel_reuse,
        lambda conv: conv.out_channels * (conv.in_channels // conv.groups),
    ),
}
grains = pytest.mark.parametrize("grain", GRAINS.values(), ids=GRAINS.keys())


def min_bank(grain: Grain, conv: nn.Conv2d, mode: str) -> int:
    """The smallest bank the rules of index mode accept for ``conv`` (1 in mix mode)."""
    per_group, channels = conv.out_channels // conv.groups, conv.in_channels // conv.groups
    if mode == "mix":
        return 1
    if grain.name == "filter":
        return math.ceil(per_group / channels)
    return per_group if channels == 1 else 1


# --- strategies ---------------------------------------------------------------------------------------------------
@st.composite
def conv_cases(draw: st.DrawFn, max_channels: int = 4) -> tuple[nn.Conv2d, torch.Tensor]:
    """A random ``nn.Conv2d`` (groups, non-square kernels, stride, dilation, padding modes) and an input for it."""
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    channels = draw(st.integers(1, max_channels))  # per group
    outputs = draw(st.integers(1, max_channels))  # per group
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = draw(st.integers(1, 2))
    dilation = draw(st.integers(1, 2))
    padding = draw(st.sampled_from([0, 1, (1, 0), "valid"] + (["same"] if stride == 1 else [])))
    padding_mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "circular"]))
    bias = draw(st.booleans())
    torch.manual_seed(draw(st.integers(0, 2**16)))
    conv = nn.Conv2d(groups * channels, groups * outputs, kernel, stride, padding, dilation, groups, bias, padding_mode)
    size = max(dilation * (k - 1) + 1 for k in kernel) + draw(st.integers(1, 3))  # > padding, for reflect
    x = torch.randn(2, groups * channels, size, size + draw(st.integers(0, 2)))  # (B, C, H, W)
    return conv, x


@st.composite
def bank_sizes(draw: st.DrawFn, conv: nn.Conv2d, grain: Grain, mode: str) -> int:
    """A bank size the rules accept, from 1 up to somewhat more than what the conv holds."""
    low = min_bank(grain, conv, mode)
    return draw(st.integers(low, max(low, grain.entries(conv) + 2)))


# --- laws for both grains -----------------------------------------------------------------------------------------
@grains
@pytest.mark.parametrize("mode", MODES)
@SETTINGS
@given(case=conv_cases())
def test_exact_at_full_size(grain: Grain, mode: str, case: tuple[nn.Conv2d, torch.Tensor]) -> None:
    """A bank filled with the conv's own entries, identity assignment, unit scales: the conv's output exactly."""
    conv, x = case
    before = copy.deepcopy(conv.state_dict())
    for new in (grain.convert(conv, mode=mode), grain.layer.from_conv(conv, mode=mode)):
        assert isinstance(new, grain.layer)
        assert torch.equal(new.weight, conv.weight)
        torch.testing.assert_close(new(x), conv(x))  # same weight values
        if mode == "index":
            assert torch.equal(new.scale, torch.ones_like(new.scale))
    after = conv.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the conv handed in is untouched


@grains
@pytest.mark.parametrize("mode", MODES)
@SETTINGS
@given(data=st.data())
def test_shape_and_parameter_count(grain: Grain, mode: str, data: st.DataObject) -> None:
    """Output shape of the conv it replaces; parameters equal the closed form; a too small bank is refused."""
    conv, x = data.draw(conv_cases())
    size = data.draw(st.integers(1, grain.entries(conv) + 2))
    bank = grain.bank(size, conv)
    if size < min_bank(grain, conv, mode):
        with pytest.raises(ReuseError, match="scaled copies"):
            grain.build(bank, conv, mode)
        return
    layer = grain.build(bank, conv, mode, seed=data.draw(st.integers(0, 99)), start=data.draw(st.integers(0, 50)))
    assert layer(x).shape == conv(x).shape
    assert layer.weight.shape == conv.weight.shape
    assert sum(p.numel() for p in layer.parameters()) == grain.params(conv, size, mode)


@grains
@pytest.mark.parametrize("mode", MODES)
def test_parameter_count_of_a_shared_bank(grain: Grain, mode: str) -> None:
    """Three convs of one entry shape, one bank of 6: the bank counted once, plus each layer's closed form."""
    convs = [nn.Conv2d(8, 16, 3), nn.Conv2d(16, 8, 3, groups=2, bias=False), nn.Conv2d(8, 24, 3, stride=2)]
    if grain.name == "filter":
        convs[1] = nn.Conv2d(8, 8, 3, bias=False)  # filters of 8 channels, as the others
    model = grain.convert(nn.Sequential(*convs), bank_size=6, mode=mode)
    bank = sum(p.numel() for p in model[0].bank.parameters())
    assert sum(p.numel() for p in model.parameters()) == sum(grain.params(c, 6, mode) - bank for c in convs) + bank


@grains
def test_assignment_is_deterministic_from_the_seed(grain: Grain) -> None:
    conv = nn.Conv2d(8, 32, 3)
    a, b, c = (grain.build(grain.bank(10, conv), conv, "index", seed=s) for s in (3, 3, 4))
    assert torch.equal(a.entry, b.entry) and not torch.equal(a.entry, c.entry)


@grains
@pytest.mark.parametrize("mode", MODES)
@SETTINGS
@given(data=st.data())
def test_gradient_reaches_the_bank_from_every_user(grain: Grain, mode: str, data: st.DataObject) -> None:
    """Convs of one entry shape (other widths, groups, strides) share one bank; each of them alone sends it
    gradient, in index mode on exactly the entries it draws."""
    conv, _ = data.draw(conv_cases())
    assume(grain.name == "filter" or math.prod(conv.kernel_size) > 1)  # a model's 1x1 convs keep their kernels
    channels, kernel = conv.in_channels // conv.groups, conv.kernel_size
    users = []
    for _ in range(data.draw(st.integers(2, 3))):
        groups = data.draw(st.sampled_from([1, 2]))
        if grain.name == "kernel":
            channels = data.draw(st.integers(1, 3))  # a kernel bank serves any channel count
        users.append(nn.Conv2d(groups * channels, data.draw(st.integers(1, 4)) * groups, kernel, groups=groups))
    bank_size = data.draw(st.one_of(st.none(), st.floats(0.2, 1.0), st.integers(4, 12)))
    model = grain.convert(nn.ModuleList(users), bank_size=bank_size, mode=mode)
    banks = {id(layer.bank) for layer in model}
    assert len(banks) == 1
    bank = model[0].bank.weight
    for layer, user in zip(model, users):
        bank.grad = None
        x = torch.randn(2, user.in_channels, kernel[0] + 1, kernel[1] + 1)  # (B, C, H, W)
        layer(x).square().sum().backward()
        touched = bank.grad.flatten(1).abs().sum(1) > 0  # (M,), entries that received gradient
        assert touched.any()
        if mode == "index":
            used = torch.zeros_like(touched)
            used[layer.entry.flatten()] = True
            assert torch.equal(touched, used)


@grains
@pytest.mark.parametrize("mode", MODES)
@SETTINGS
@given(data=st.data())
def test_state_dict_round_trip(grain: Grain, mode: str, data: st.DataObject) -> None:
    """The assignment and the shared bank travel in the state_dict: a model built with another seed (another
    assignment) loads it, through torch.save, and computes the same."""
    conv, x = data.draw(conv_cases())
    assume(grain.name == "filter" or math.prod(conv.kernel_size) > 1)  # a model's 1x1 convs keep their kernels
    twin = copy.deepcopy(conv)
    bank_size = data.draw(st.integers(min_bank(grain, conv, mode), grain.entries(conv) + 3))
    a = grain.convert(nn.Sequential(conv, twin), bank_size=bank_size, mode=mode, seed=1)
    b = grain.convert(nn.Sequential(conv, twin), bank_size=bank_size, mode=mode, seed=2)
    if mode == "index":
        assert "0.entry" in a.state_dict()
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b.load_state_dict(torch.load(buffer))
    assert b[0].bank is b[1].bank
    for la, lb in zip(a, b):
        torch.testing.assert_close(la(x), lb(x))


@grains
@SETTINGS
@given(case=conv_cases(), other=st.integers(1, 3))
def test_incompatible_bank_raises(grain: Grain, case: tuple[nn.Conv2d, torch.Tensor], other: int) -> None:
    """A bank whose entries do not fit the conv (channels per filter, kernel size) is a ReuseError, never a
    silently different conv."""
    conv, _ = case
    kernel = (conv.kernel_size[0] + other, conv.kernel_size[1])
    with pytest.raises(ReuseError, match="kernel"):
        grain.layer.from_conv(conv, grain.bank(4, nn.Conv2d(conv.in_channels, conv.groups, kernel, groups=conv.groups)))
    if grain.name == "filter":
        channels = conv.in_channels // conv.groups + other
        with pytest.raises(ReuseError, match=f"needs filters of {conv.in_channels // conv.groups} channels"):
            grain.build(FilterBank(4, channels, conv.kernel_size), conv, "index")
    with pytest.raises(ReuseError, match="must be a"):
        grain.layer(GRAINS["kernel" if grain.name == "filter" else "filter"].bank(4, conv), 4, 4)


# --- filter level: rolled channels --------------------------------------------------------------------------------
def _max_abs_cosine(y: torch.Tensor) -> float:
    """Largest |cosine| between two different output channels of ``y`` (B, O, H, W): 1 for scaled copies."""
    maps = y.transpose(0, 1).flatten(1)  # (O, B*H*W)
    maps = maps / maps.norm(dim=1, keepdim=True)
    cos = (maps @ maps.t()).abs()  # (O, O)
    cos.fill_diagonal_(0)
    return cos.max().item()


@SETTINGS
@given(
    groups=st.integers(1, 3),
    channels=st.integers(2, 6),
    bank_size=st.integers(1, 3),
    kernel=st.integers(2, 3),
    seed=st.integers(0, 99),
)
def test_filter_index_mode_makes_no_scaled_copies(
    groups: int, channels: int, bank_size: int, kernel: int, seed: int
) -> None:
    """Each bank filter serves several outputs of a group, each use on its channels rolled by another shift: no two
    output channels are scaled copies. Without the rolls (all shifts 0) some are."""
    torch.manual_seed(seed)
    per_group = bank_size * channels  # as many outputs as (filter, roll) pairs: every filter used `channels` times
    layer = FilterReuseConv2d(
        FilterBank(bank_size, channels, kernel),
        groups * channels,
        groups * per_group,
        groups=groups,
        bias=False,
        seed=seed,
    )
    x = torch.randn(4, groups * channels, 6, 6)  # (B, C, H, W)
    with torch.no_grad():
        layer.scale.uniform_(0.5, 2.0)
        assert _max_abs_cosine(layer(x)) < 1 - 1e-3
        layer.shift.zero_()  # the degenerate layer the rolls avoid
        assert _max_abs_cosine(layer(x)) > 1 - 1e-5


def test_filter_roll_is_a_channel_permutation_of_the_input() -> None:
    """Output o is the bank filter applied to the group's input channels rolled by -shift[o]."""
    torch.manual_seed(0)
    layer = FilterReuseConv2d(FilterBank(2, 4, 3), 4, 8, padding=1, bias=False)
    x = torch.randn(1, 4, 5, 5)  # (B, C, H, W)
    y = layer(x)  # (B, O, H, W)
    for o in range(8):
        filt = layer.bank.weight[layer.entry[o]] * layer.scale[o]  # (C, 3, 3)
        rolled = x.roll(-int(layer.shift[o]), dims=1)  # (B, C, H, W)
        torch.testing.assert_close(y[:, o], nn.functional.conv2d(rolled, filt[None], padding=1)[:, 0])
    assert sorted(layer.shift.tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]


def test_filter_bank_too_small_for_a_layer_is_refused_with_the_fix() -> None:
    conv = nn.Conv2d(2, 16, 3)  # 16 outputs, filters of 2 channels (2 rolls each): at least 8 bank filters
    with pytest.raises(ReuseError, match=r"bank_size >= 8"):
        filter_reuse(conv, bank_size=4)
    assert filter_reuse(conv, bank_size=0.25).bank.num_filters == 8  # a fraction is raised to the minimum


# --- kernel level -------------------------------------------------------------------------------------------------
@SETTINGS
@given(
    groups=st.integers(1, 3),
    channels=st.integers(1, 4),
    per_group=st.integers(1, 12),
    bank_size=st.integers(1, 6),
    start=st.integers(0, 30),
)
def test_kernel_index_mode_outputs_of_a_group_differ(
    groups: int, channels: int, per_group: int, bank_size: int, start: int
) -> None:
    """Two outputs of one group draw the same bank kernels on every channel only in a group larger than M**2
    (M with one channel per group, which is refused)."""
    bound = bank_size if channels == 1 else bank_size**2
    make = lambda: KernelReuseConv2d(  # noqa: E731
        KernelBank(bank_size, 3), groups * channels, groups * per_group, groups=groups, start=start
    )
    if channels == 1 and per_group > bank_size:
        with pytest.raises(ReuseError, match="scaled copies"):
            make()
        return
    rows = make().entry.view(groups, per_group, channels)  # (g, O/g, C/g)
    distinct = min(per_group, bound)
    for group in rows:
        assert torch.unique(group[:distinct], dim=0).shape[0] == distinct


def test_kernel_reuse_leaves_1x1_convs_of_a_model(caplog: pytest.LogCaptureFixture) -> None:
    net = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, groups=2))
    with caplog.at_level(logging.INFO, logger="reuse"):
        out = kernel_reuse(net, bank_size=16)
    assert type(out[1]) is nn.Conv2d and "1x1" in caplog.text
    assert out[0].bank is out[2].bank
    assert isinstance(kernel_reuse(nn.Conv2d(8, 8, 1)), KernelReuseConv2d)  # a single 1x1 conv handed in


def test_kernel_mix_refuses_a_huge_bank() -> None:
    with pytest.raises(ReuseError, match="kh x kw"):
        KernelReuseConv2d(KernelBank(1 << 16, 3), 128, 128, mode="mix")


# --- the model-level transform --------------------------------------------------------------------------------------
class Tiny(nn.Module):
    """Two convs of one filter shape, one of another, a conv used twice, and a conv subclass that pads itself."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 16, 3, padding=1, groups=1)
        self.shared = self.b  # the same conv under a second name
        self.same = PadSame(16, 16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.b(self.a(x))  # (B, 8, H, W)
        return self.same(self.c(self.shared(x)))  # (B, 16, H, W)


class PadSame(nn.Conv2d):
    """A conv that pads in forward, like timm's Conv2dSame: a banked conv would not reproduce it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(nn.functional.pad(x, (1, 1, 1, 1)))


@grains
@pytest.mark.parametrize("mode", MODES)
def test_model_transform(grain: Grain, mode: str) -> None:
    torch.manual_seed(0)
    model = Tiny()
    x = torch.randn(2, 3, 6, 6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    exact = grain.convert(model, mode=mode)
    torch.testing.assert_close(exact(x), model(x))  # bank_size=None: the model it was
    assert type(exact.same) is PadSame  # left alone: it overrides forward
    assert exact.shared is exact.b  # one banked conv at both names
    assert all(type(m) is nn.Conv2d or type(m) is PadSame for m in model.modules() if isinstance(m, nn.Conv2d))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # input untouched
    small = grain.convert(model, bank_size=0.5, mode=mode, include=lambda name, conv: name != "c")
    assert type(small.c) is nn.Conv2d
    if grain.name == "filter":
        assert small.a.bank is not small.b.bank  # 3-channel and 8-channel filters: two banks
    else:
        assert small.a.bank is small.b.bank  # every 3x3 kernel: one bank
    small(x).sum().backward()
    same = grain.convert(model, inplace=True)
    assert same is model and isinstance(model.b, grain.layer)


@grains
def test_model_transform_in_layer_reuse_and_fx(grain: Grain) -> None:
    """The conv a LayerReuse shares between uses becomes one banked conv shared by all uses; the result traces with
    torch.fx to a graph that computes the same."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False), nn.BatchNorm2d(8), nn.ReLU())
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), reuse.wrap(block, n=3))
    out = grain.convert(model, bank_size=0.5)
    uses = out[1].uses
    assert isinstance(uses[0][0], grain.layer) and all(use[0] is uses[0][0] for use in uses)
    assert "0.bank.weight" in out[1].shared_names()
    x = torch.randn(2, 3, 6, 6)
    out.eval()
    traced = torch.fx.symbolic_trace(out)
    torch.testing.assert_close(traced(x), out(x))


@grains
def test_model_transform_errors(grain: Grain) -> None:
    with pytest.raises(ReuseError, match="mode must be"):
        grain.convert(nn.Conv2d(2, 2, 3), mode="soft")
    with pytest.raises(ReuseError, match="bank_size must be"):
        grain.convert(nn.Conv2d(2, 2, 3), bank_size=0)
    with pytest.raises(ReuseError, match="overrides nn.Conv2d's forward"):
        grain.convert(PadSame(2, 2, 3))
    with pytest.raises(ReuseError, match="expects an nn.Conv2d or a model"):
        grain.convert("conv")
    with pytest.warns(UserWarning, match="no convertible"):
        grain.convert(nn.Sequential(nn.Linear(2, 2)))


def test_repr_reads_like_the_call() -> None:
    layer = FilterReuseConv2d(FilterBank(4, 8, 3), 8, 16, padding=1, bias=False, mode="mix")
    bank = "FilterBank(4, 8, kernel_size=(3, 3))"
    assert repr(layer) == f"FilterReuseConv2d({bank}, 8, 16, padding=(1, 1), bias=False, mode='mix')"
    layer = KernelReuseConv2d(KernelBank(9, 3), 8, 16, stride=2, groups=2)
    bank = "KernelBank(9, kernel_size=(3, 3))"
    assert repr(layer) == f"KernelReuseConv2d({bank}, 8, 16, stride=(2, 2), groups=2, mode='index')"


@grains
@pytest.mark.parametrize("bank_size", [float("nan"), float("inf"), 1.5, -0.5, 0.0, -1, "0.5", True])
def test_bank_sizes_that_are_not_a_count_or_a_fraction(grain: Grain, bank_size: object) -> None:
    """A float is a fraction in (0, 1]: nan, inf and 1.5 (which would grow the model) are refused up front."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3))
    with pytest.raises(ReuseError, match="bank_size must be"):
        grain.convert(net, bank_size=bank_size)
    with pytest.raises(ReuseError, match="bank_size must be"):
        grain.convert(nn.Conv2d(8, 8, 3), bank_size=bank_size)


@grains
def test_include_and_inplace_are_checked(grain: Grain) -> None:
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3))
    with pytest.raises(ReuseError, match="include must be a predicate"):
        grain.convert(net, bank_size=0.5, include=5)
    with pytest.raises(ReuseError, match="inplace must be True or False"):
        grain.convert(net, bank_size=0.5, inplace="no")
    assert type(net[0]) is nn.Conv2d  # nothing was converted in place
