"""LruBlock's pointwise step in training on CPU (reuse/models/_pointwise.py): the grouped 1x1 conv with its weight
gradient as one einsum, and the depthwise BatchNorm and that conv keeping the norm's input only. The truths:
``nn.Conv2d`` and ``nn.BatchNorm2d`` themselves, and numerical derivatives (gradcheck)."""

from __future__ import annotations

import copy

import pytest
import torch
from _zoo import randomize
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import prune

import reuse.models.lrunet as lrunet
from reuse.models import LruBlock, LruNet
from reuse.models._pointwise import grouped_pointwise, norm_pointwise, takes_fast_weight_grad, takes_norm_pointwise


@st.composite
def pointwise_cases(draw: st.DrawFn) -> tuple[int, int, int, int, int, int]:
    groups = draw(st.sampled_from([1, 2, 4, 8]))
    c_in = groups * draw(st.integers(1, 4))
    c_out = groups * draw(st.integers(1, 4))
    return groups, c_in, c_out, draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(1, 5))


@settings(max_examples=25, deadline=None)
@given(pointwise_cases(), st.booleans())
def test_output_and_gradients_equal_the_conv(case: tuple[int, int, int, int, int, int], channels_last: bool) -> None:
    groups, c_in, c_out, b, h, w = case
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, 1, groups=groups, bias=False).double()
    twin = copy.deepcopy(conv)
    x = torch.randn(b, c_in, h, w, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    before = x.clone()
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    assert takes_fast_weight_grad(x1, conv)
    out, expected = grouped_pointwise(x1, conv), twin(x2)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)  # the forward is the conv's own
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(conv.weight.grad, twin.weight.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x, before, rtol=0, atol=0)  # the input is never modified


def test_gradcheck() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 4, 1, groups=2, bias=False).double()
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda x, weight: grouped_pointwise(x, conv), (x, conv.weight))


def test_weight_gradient_alone_when_the_input_takes_none() -> None:
    conv = nn.Conv2d(8, 8, 1, groups=4, bias=False)
    twin = copy.deepcopy(conv)
    x = torch.randn(2, 8, 4, 4)
    grouped_pointwise(x, conv).sum().backward()
    twin(x).sum().backward()
    torch.testing.assert_close(conv.weight.grad, twin.weight.grad)


def _plain() -> nn.Conv2d:
    return nn.Conv2d(8, 8, 1, groups=4, bias=False)


def _hooked() -> nn.Conv2d:
    conv = _plain()
    conv.register_forward_hook(lambda module, args, out: None)
    return conv


def _pruned() -> nn.Module:
    conv = _plain()
    prune.l1_unstructured(conv, "weight", amount=0.5)
    return conv


def _frozen() -> nn.Conv2d:
    conv = _plain()
    conv.weight.requires_grad_(False)
    return conv


class _Subclass(nn.Conv2d):
    pass


DECLINED = {
    "bias": lambda: nn.Conv2d(8, 8, 1, groups=4),
    "3x3": lambda: nn.Conv2d(8, 8, 3, groups=4, bias=False),
    "stride": lambda: nn.Conv2d(8, 8, 1, stride=2, groups=4, bias=False),
    "subclass": lambda: _Subclass(8, 8, 1, groups=4, bias=False),
    "forward hook": _hooked,
    "pruned (a pre-hook)": _pruned,
    "frozen weight": _frozen,
    "float64 conv, float32 input": lambda: _plain().double(),
}


@pytest.mark.parametrize("name", list(DECLINED))
def test_declines_what_it_does_not_compute(name: str) -> None:
    assert takes_fast_weight_grad(torch.randn(2, 8, 4, 4), _plain())  # the control: a plain conv is taken
    assert not takes_fast_weight_grad(torch.randn(2, 8, 4, 4), DECLINED[name]())


def test_declines_without_grad_and_under_autocast() -> None:
    x = torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        assert not takes_fast_weight_grad(x, _plain())
    with torch.autocast("cpu", torch.bfloat16):
        assert not takes_fast_weight_grad(x, _plain())
    with torch.inference_mode():
        assert not takes_fast_weight_grad(x, _plain())


def _backward_names(out: torch.Tensor) -> set[str]:
    names, todo, seen = set(), [out.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo.extend(next_fn for next_fn, _ in node.next_functions)
    return names


def test_lrublock_trains_through_it_and_hooks_still_fire() -> None:
    block = LruBlock(16).train()
    x = torch.randn(2, 16, 4, 4, requires_grad=True)
    assert "_NormPointwiseBackward" in _backward_names(block(x))
    seen = []
    block.dw_bn.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    out = block(x)
    assert seen == [torch.Size([2, 32, 4, 4])]  # a hooked norm runs as a module: its hooks see every call
    assert "_GroupedPointwiseBackward" in _backward_names(out)  # and the conv still takes the einsum
    block.pw.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    out = block(x)
    assert seen[1:] == [torch.Size([2, 32, 4, 4]), torch.Size([2, 16, 4, 4])]
    assert not {"_GroupedPointwiseBackward", "_NormPointwiseBackward"} & _backward_names(out)


def test_pruned_pointwise_conv_trains_with_its_mask() -> None:
    torch.manual_seed(0)
    block = randomize(LruBlock(16)).train()
    twin = copy.deepcopy(block)
    prune.l1_unstructured(block.pw, "weight", amount=0.5)
    with torch.no_grad():
        twin.pw.weight.copy_(block.pw.weight)  # the masked weight as a plain parameter
    x = torch.randn(2, 16, 4, 4)
    out, expected = block(x), twin(x)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(block.pw.weight_orig.grad, twin.pw.weight.grad * block.pw.weight_mask)


def test_lrunet_gradients_equal_those_of_the_plain_conv(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = randomize(LruNet(num_classes=10, reuse=3, drop_rate=0.0)).double().train()
    twin = copy.deepcopy(model)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    out = model(x)
    assert "_NormPointwiseBackward" in _backward_names(out)
    out.square().sum().backward()
    monkeypatch.setattr(lrunet, "takes_fast_weight_grad", lambda x, conv: False)
    monkeypatch.setattr(lrunet, "takes_norm_pointwise", lambda z, norm, conv: False)
    expected = twin(x)
    assert not {"_GroupedPointwiseBackward", "_NormPointwiseBackward"} & _backward_names(expected)
    expected.square().sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=name)
    for (name, b), c in zip(model.named_buffers(), twin.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-10, atol=1e-12, msg=name)


# ------------------------------------------------------------- the norm and the conv keeping the norm's input only


def _norm_and_conv(c_in: int, c_out: int, groups: int, dtype: torch.dtype) -> tuple[nn.BatchNorm2d, nn.Conv2d]:
    norm, conv = nn.BatchNorm2d(c_in).to(dtype), nn.Conv2d(c_in, c_out, 1, groups=groups, bias=False).to(dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1.0, 1.0)
        norm.running_mean.uniform_(-1.0, 1.0)
        norm.running_var.uniform_(0.5, 2.0)
    return norm, conv


@settings(max_examples=25, deadline=None)
@given(pointwise_cases(), st.booleans(), st.floats(-5.0, 5.0))
def test_norm_then_pointwise_equals_the_modules(
    case: tuple[int, int, int, int, int, int], channels_last: bool, offset: float
) -> None:
    groups, c_in, c_out, b, h, w = case
    if b * h * w < 2:
        return  # BatchNorm needs two values per channel in training
    torch.manual_seed(0)
    norm, conv = _norm_and_conv(c_in, c_out, groups, torch.float64)
    twin_norm, twin_conv = copy.deepcopy(norm), copy.deepcopy(conv)
    z = torch.randn(b, c_in, h, w, dtype=torch.float64) * 2 + offset
    if channels_last:
        z = z.contiguous(memory_format=torch.channels_last)
    before = z.clone()
    z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    assert takes_norm_pointwise(z1, norm, conv)
    out, expected = norm_pointwise(z1, norm, conv), twin_conv(twin_norm(z2))
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(z1.grad, z2.grad, rtol=1e-9, atol=1e-10)
    for mine, theirs in [(norm.weight, twin_norm.weight), (norm.bias, twin_norm.bias), (conv.weight, twin_conv.weight)]:
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-9, atol=1e-10)
    for mine, theirs in zip(norm.buffers(), twin_norm.buffers()):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12)  # running statistics, batches tracked
    torch.testing.assert_close(z, before, rtol=0, atol=0)  # the input is never modified


@pytest.mark.parametrize("offset", [0.0, 100.0])
def test_norm_then_pointwise_forward_is_bitwise_the_modules(offset: float) -> None:
    """The forward runs BatchNorm's and the conv's own kernels: the output and the running statistics are equal
    to the last bit in float32, even with a mean far from zero; the gradients to rounding."""
    torch.manual_seed(0)
    norm, conv = _norm_and_conv(64, 32, 8, torch.float32)
    twin_norm, twin_conv = copy.deepcopy(norm), copy.deepcopy(conv)
    z = (torch.randn(8, 64, 8, 8) + offset).contiguous(memory_format=torch.channels_last)
    z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    out, expected = norm_pointwise(z1, norm, conv), twin_conv(twin_norm(z2))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for mine, theirs in zip(norm.buffers(), twin_norm.buffers()):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(z1.grad, z2.grad)
    scale = conv.weight.grad.abs().max()
    torch.testing.assert_close(
        conv.weight.grad / scale, twin_conv.weight.grad / scale, rtol=0, atol=1e-5 * (1 + offset)
    )


def test_norm_then_pointwise_gradcheck() -> None:
    torch.manual_seed(0)
    norm, conv = _norm_and_conv(8, 4, 2, torch.float64)
    z = torch.randn(2, 8, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda z, gamma, beta, weight: norm_pointwise(z, norm, conv), (z, norm.weight, norm.bias, conv.weight)
    )


def _momentum_none() -> nn.BatchNorm2d:
    return nn.BatchNorm2d(8, momentum=None)


NORMS_DECLINED = {
    "eval mode": lambda: nn.BatchNorm2d(8).eval(),
    "cumulative average (momentum None)": _momentum_none,
    "not affine": lambda: nn.BatchNorm2d(8, affine=False),
    "no running statistics": lambda: nn.BatchNorm2d(8, track_running_stats=False),
    "SyncBatchNorm": lambda: nn.SyncBatchNorm(8),
    "identity": nn.Identity,
}


@pytest.mark.parametrize("name", list(NORMS_DECLINED))
def test_norm_then_pointwise_declines_other_norms(name: str) -> None:
    z = torch.randn(2, 8, 4, 4)
    assert takes_norm_pointwise(z, nn.BatchNorm2d(8), _plain())  # the control
    assert not takes_norm_pointwise(z, NORMS_DECLINED[name](), _plain())
    assert not takes_norm_pointwise(z, nn.BatchNorm2d(8), _hooked())
    assert not takes_norm_pointwise(torch.randn(1, 8, 1, 1), nn.BatchNorm2d(8), _plain())  # one value per channel


def _saved_bytes(fn) -> int:  # noqa: ANN001 - a callable returning the output
    """Bytes of the distinct storages autograd keeps for backward while ``fn`` runs."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_norm_then_pointwise_keeps_one_tensor_less_for_backward(monkeypatch: pytest.MonkeyPatch) -> None:
    block = LruBlock(16).train()
    x = torch.randn(4, 16, 8, 8, requires_grad=True)
    kept = _saved_bytes(lambda: block(x))
    monkeypatch.setattr(lrunet, "takes_norm_pointwise", lambda z, norm, conv: False)
    plain = _saved_bytes(lambda: block(x))
    normalised = 4 * 32 * 8 * 8 * 4  # the norm's output, 2F channels in float32
    assert normalised <= plain - kept < normalised + 1024  # (and a few per-channel vectors)
