"""Activation checkpointing per use: same outputs, gradients and running statistics as without it."""

from __future__ import annotations

import copy

import pytest
import torch
from _zoo import DropoutResidual, Model, select
from torch import nn

import reuse
from reuse.models import LruBlock


def with_checkpoint(model: nn.Module) -> nn.Module:
    twin = copy.deepcopy(model)
    for m in twin.modules():
        if isinstance(m, reuse.LayerReuse):
            m.checkpoint = True
    return twin


@pytest.mark.parametrize("model", select("checkpoint"))
def test_checkpointed_training_steps_equal_plain_ones(model: Model) -> None:
    """Two training steps: outputs, every gradient, every buffer (running statistics, num_batches_tracked)."""
    torch.manual_seed(0)
    plain = model.build().train()
    ckpt = with_checkpoint(plain)
    assert any(isinstance(m, reuse.LayerReuse) and m.checkpoint for m in ckpt.modules())
    for step in range(2):
        x = torch.randn(model.shape)
        torch.manual_seed(step)  # the same dropout masks in both
        out_plain = plain(x)
        torch.manual_seed(step)
        out_ckpt = ckpt(x)
        torch.testing.assert_close(out_ckpt, out_plain)
        grad = torch.randn_like(out_plain)
        out_plain.backward(grad)
        out_ckpt.backward(grad)
        for (pname, p), q in zip(plain.named_parameters(), ckpt.parameters()):
            torch.testing.assert_close(q.grad, p.grad, msg=pname)
        for (bname, b), c in zip(plain.named_buffers(), ckpt.buffers()):
            torch.testing.assert_close(c, b, msg=bname)
    tracked = [b for n, b in ckpt.named_buffers() if n.endswith("num_batches_tracked")]
    assert tracked and all(int(t) == 2 for t in tracked), "running statistics advanced more than once a forward"


def test_non_reentrant_gradients_reach_the_weights_when_the_input_needs_none() -> None:
    """Reentrant checkpointing drops the weights' gradients when no input requires grad; ours does not."""
    torch.manual_seed(0)
    model = reuse.wrap(LruBlock(16), n=3, checkpoint=True).train()
    model(torch.randn(2, 16, 4, 4)).sum().backward()  # the input does not require grad
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_eval_mode_with_gradients_and_no_grad_inference() -> None:
    """Fine-tuning with frozen BatchNorms (eval mode, gradients on) and plain inference both still work."""
    torch.manual_seed(0)
    plain = reuse.wrap(DropoutResidual(8), n=3).eval()
    ckpt = with_checkpoint(plain)
    x = torch.randn(2, 8, 4, 4)
    plain(x).sum().backward()
    ckpt(x).sum().backward()
    for p, q in zip(plain.parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad)
    with torch.no_grad():
        torch.testing.assert_close(ckpt(x), plain(x))


def test_checkpointing_saves_fewer_tensors_for_backward() -> None:
    """What backward keeps alive: with checkpointing, about one tensor per use instead of all the block's."""
    torch.manual_seed(0)
    x = torch.randn(8, 64, 8, 8)

    def saved_bytes(model: nn.Module) -> int:
        sizes: list[int] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            sizes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x).sum()
        return sum(sizes)

    plain = reuse.wrap(LruBlock(64), n=8).train()
    assert saved_bytes(with_checkpoint(plain)) < 0.3 * saved_bytes(plain)


def test_repr_and_wrap_argument() -> None:
    assert "checkpoint=True" in repr(reuse.wrap(LruBlock(16), n=2, checkpoint=True))
    assert "checkpoint" not in repr(reuse.wrap(LruBlock(16), n=2))
    assert reuse.LayerReuse.from_blocks([LruBlock(16), LruBlock(16)], checkpoint=True).checkpoint
