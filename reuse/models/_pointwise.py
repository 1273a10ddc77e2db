"""The pointwise step of :class:`reuse.models.LruBlock` in training on CPU: its BatchNorm'd depthwise output into
the grouped 1x1 conv, with a faster weight gradient and one activation tensor less kept for backward.

Private: ``LruBlock`` is the public face. Two things, both exact in arithmetic (the weight gradients differ from
oneDNN's by rounding only; outputs and running statistics are bitwise the modules'):

- oneDNN's backward of a grouped 1x1 conv spends most of its time on the weight gradient (2-4x its forward on the
  2-core AVX2 VM). In ``channels_last`` storage that gradient is one batched matrix product over the pixels,
  group by group, with no copy: ``dW[g] = dY[:, g]^T X[:, g]``. The forward and the input gradient stay
  oneDNN's. On 14-LruNet-1x at batch 256 it cuts the pointwise weight gradients from 52 to 21 ms per set of four
  uses (2 threads; 82 to 41 ms on 1 thread).
- The conv's input is the depthwise norm's output ``y = z * scale + shift`` (per channel, batch statistics). The
  weight gradient can be had from ``z``, which the norm keeps for its own backward anyway, so the norm and the
  conv run as one autograd node that frees ``y`` after the forward: 2F channels less per use, the same kernels
  in the forward.

Measured in benchmarks/results/train-pointwise-grad/.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["grouped_pointwise", "norm_pointwise", "takes_fast_weight_grad", "takes_norm_pointwise"]


class _GroupedPointwise(torch.autograd.Function):
    """``conv2d(x, weight, groups=groups)`` for a 1x1 ``weight`` without bias; backward: the input gradient from
    oneDNN, the weight gradient as one ``einsum`` over the pixels."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, groups: int) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.groups = groups
        return F.conv2d(x, weight, groups=groups)  # (B, C_out, H, W)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, weight = ctx.saved_tensors
        groups = ctx.groups
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad, x, weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], groups, [True, False, False]
            )[0]  # (B, C_in, H, W)
        if ctx.needs_input_grad[1]:
            grad_w = _weight_grad(grad, x, groups).view_as(weight)  # (C_out, C_in / groups, 1, 1)
        return grad_x, grad_w, None


def _weight_grad(grad: Tensor, x: Tensor, groups: int) -> Tensor:
    """``dW[g, o, i] = sum over pixels p of grad[p, g, o] * x[p, g, i]``: a view of each tensor's rows when it is
    ``channels_last``, a batched matrix product over the groups."""
    b, c_out, h, w = grad.shape
    pixels = b * h * w
    rows_grad = grad.permute(0, 2, 3, 1).reshape(pixels, groups, c_out // groups)  # (P, G, C_out/G)
    rows_x = x.permute(0, 2, 3, 1).reshape(pixels, groups, x.shape[1] // groups)  # (P, G, C_in/G)
    return torch.einsum("pgo,pgi->goi", rows_grad, rows_x)  # (G, C_out/G, C_in/G)


def takes_fast_weight_grad(x: Tensor, conv: nn.Module) -> bool:
    """Whether :func:`grouped_pointwise` may stand in for ``conv(x)``: eager training on CPU in float32/64 without
    autocast, a plain ``nn.Conv2d`` 1x1 without bias, stride, padding or dilation, whose weight takes a gradient.
    Anything else (graph capture, ``torch.fx`` tracing, GPUs, autocast, reuse-level or parametrized convs, a conv
    with hooks, such as ``torch.nn.utils.prune``'s) runs ``conv(x)`` itself."""
    if _has_hooks(conv) or isinstance(x, torch.fx.Proxy) or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if type(conv) is not nn.Conv2d or not torch.is_grad_enabled() or not conv.weight.requires_grad:
        return False
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or x.dtype != conv.weight.dtype:
        return False
    if torch.is_autocast_enabled("cpu") or x.dim() != 4:
        return False
    return (
        conv.bias is None
        and conv.kernel_size == (1, 1)
        and conv.stride == (1, 1)
        and conv.padding == (0, 0)
        and conv.dilation == (1, 1)
        and conv.padding_mode == "zeros"
    )


def _has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` would run hooks (its own or the global ones) that a direct call skips."""
    own = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks)
    hooks = nn.modules.module
    every = (hooks._global_forward_hooks, hooks._global_forward_pre_hooks, hooks._global_backward_hooks)
    return any(own) or any(every) or bool(hooks._global_backward_pre_hooks)


def grouped_pointwise(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """``conv(x)`` for a conv that :func:`takes_fast_weight_grad`, with the faster weight gradient.

    Example:
        >>> conv = nn.Conv2d(16, 8, 1, groups=4, bias=False)
        >>> x = torch.randn(2, 16, 3, 3).to(memory_format=torch.channels_last)
        >>> torch.allclose(grouped_pointwise(x, conv), conv(x))
        True
    """
    return _GroupedPointwise.apply(x, conv.weight, conv.groups)  # (B, C_out, H, W)


class _NormPointwise(torch.autograd.Function):
    """``conv2d(batch_norm(z), weight, groups=groups)`` in training (batch statistics, running statistics updated
    in place by BatchNorm's own kernel), keeping for backward the norm's input ``z`` and statistics but not its
    output ``y``: the conv's weight gradient comes from ``z`` (``y = z * scale + shift`` per channel), its input
    gradient needs the weight only. One 2F-channel tensor less per use of an LRU block, at the same speed."""

    @staticmethod
    def forward(
        ctx: Any,
        z: Tensor,
        gamma: Tensor,
        beta: Tensor,
        weight: Tensor,
        running: tuple[Tensor, Tensor],
        groups: int,
        momentum: float,
        eps: float,
    ) -> Tensor:
        y, mean, invstd = torch.ops.aten.native_batch_norm(z, gamma, beta, *running, True, momentum, eps)
        ctx.save_for_backward(z, gamma, beta, weight, mean, invstd)
        ctx.groups, ctx.eps = groups, eps
        return F.conv2d(y, weight, groups=groups)  # (B, C_out, H, W); y is freed here

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        z, gamma, beta, weight, mean, invstd = ctx.saved_tensors
        groups = ctx.groups
        grad_w = None
        if ctx.needs_input_grad[3]:
            scale = gamma * invstd  # (C,): y = z * scale + shift
            shift = beta - mean * scale  # (C,)
            rows = grad.permute(0, 2, 3, 1).reshape(-1, groups, grad.shape[1] // groups)  # (P, G, C_out/G)
            from_z = _weight_grad(grad, z, groups) * scale.view(groups, 1, -1)  # (G, C_out/G, C/G)
            grad_w = (from_z + rows.sum(0).unsqueeze(2) * shift.view(groups, 1, -1)).view_as(weight)
        if not any(ctx.needs_input_grad[:3]):
            return None, None, None, grad_w, None, None, None, None
        grad_y = torch.ops.aten.convolution_backward(
            grad, z, weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], groups, [True, False, False]
        )[0]  # (B, C, H, W): the gradient of the norm's output
        grad_z, grad_gamma, grad_beta = torch.ops.aten.native_batch_norm_backward(
            grad_y, z, gamma, None, None, mean, invstd, True, ctx.eps, list(ctx.needs_input_grad[:3])
        )
        return grad_z, grad_gamma, grad_beta, grad_w, None, None, None, None


def takes_norm_pointwise(z: Tensor, norm: nn.Module, conv: nn.Module) -> bool:
    """Whether :func:`norm_pointwise` may stand in for ``conv(norm(z))``: :func:`takes_fast_weight_grad` holds
    for the conv, and the norm is a plain ``nn.BatchNorm2d`` in training mode, affine, tracking running
    statistics with a momentum, without hooks, in the conv's dtype, over more than one value per channel."""
    if not takes_fast_weight_grad(z, conv) or type(norm) is not nn.BatchNorm2d or _has_hooks(norm):
        return False
    if not (norm.training and norm.affine and norm.track_running_stats and norm.momentum is not None):
        return False
    return norm.weight.dtype == z.dtype and z.numel() > z.shape[1]


def norm_pointwise(z: Tensor, norm: nn.BatchNorm2d, conv: nn.Conv2d) -> Tensor:
    """``conv(norm(z))`` for a pair that :func:`takes_norm_pointwise`: the same numbers, the same update of ``norm``'s
    running statistics, and one activation tensor (the norm's output) less kept for backward.

    Example:
        >>> import copy
        >>> norm, conv = nn.BatchNorm2d(16), nn.Conv2d(16, 8, 1, groups=4, bias=False)
        >>> z = torch.randn(2, 16, 3, 3) + 2
        >>> twin = copy.deepcopy(norm)
        >>> torch.equal(norm_pointwise(z, norm, conv), conv(twin(z)))
        True
        >>> torch.equal(norm.running_var, twin.running_var)
        True
    """
    norm.num_batches_tracked.add_(1)  # as nn.BatchNorm2d does in training, before its kernel
    running = (norm.running_mean, norm.running_var)
    return _NormPointwise.apply(z, norm.weight, norm.bias, conv.weight, running, conv.groups, norm.momentum, norm.eps)
