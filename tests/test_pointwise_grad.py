"""LruBlock's grouped 1x1 conv in training on CPU: oneDNN's forward and input gradient, the weight gradient as one
einsum (reuse/models/_pointwise.py). The truths: ``nn.Conv2d`` itself, and numerical derivatives (gradcheck)."""

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
from reuse.models._pointwise import grouped_pointwise, takes_fast_weight_grad


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
    assert "_GroupedPointwiseBackward" in _backward_names(block(x))
    seen = []
    block.pw.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    out = block(x)
    assert seen == [torch.Size([2, 16, 4, 4])]  # a hooked conv runs as a module: its hooks see every call
    assert "_GroupedPointwiseBackward" not in _backward_names(out)


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
    assert "_GroupedPointwiseBackward" in _backward_names(out)
    out.square().sum().backward()
    monkeypatch.setattr(lrunet, "takes_fast_weight_grad", lambda x, conv: False)
    expected = twin(x)
    assert "_GroupedPointwiseBackward" not in _backward_names(expected)
    expected.square().sum().backward()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=name)
