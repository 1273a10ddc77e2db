"""The one channel gather of :class:`reuse.models.LruBlock`: the channel repeat that turns its multiplier-2
depthwise conv into a true depthwise conv, composed with the paper's shuffle between two uses.

Private: ``LruBlock`` is the public face. Everything is written for ``channels_last`` (NHWC) storage, where
a channel gather is a ``torch.gather`` over the rows of a ``(B*H*W, C)`` matrix.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor

from reuse._errors import ReuseError
from reuse.shuffle import unchecked_permutation

__all__ = ["gather_indices", "gather_nhwc", "repeat_gather", "saved_as_gather"]


_INDICES: dict[tuple[int, int, bool, torch.device], tuple[Tensor, Tensor, Tensor]] = {}


def _build_indices(channels: int, groups: int, swap: bool, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """The shuffle ``perm`` (identity when ``groups == 0``), the repeated shuffle ``perm[c // 2]`` over 2C
    channels, and ``perm``'s inverse. Scriptable, and traced as arithmetic on ``arange``."""
    if groups > 0:
        perm = unchecked_permutation(channels, groups, swap, device)  # (C,)
    else:
        perm = torch.arange(channels, device=device)  # (C,)
    rep = perm.unsqueeze(1).expand(channels, 2).reshape(2 * channels)  # (2C,), rep[j] = perm[j // 2]
    return perm, rep, torch.argsort(perm)  # (C,), (2C,), (C,)


def gather_indices(channels: int, groups: int, swap: bool, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_build_indices`, cached per process.

    What is cached must not depend on the caller's mode: the indices are always built as normal tensors
    (never inference tensors, never recorded by autograd), so a first call under ``torch.inference_mode()``
    does not break later training. While compiling, exporting or tracing, nothing is cached or read from the
    cache: the graph holds the index arithmetic itself, the same on the first call and on every later one.
    """
    if _in_graph_capture():
        return _build_indices(channels, groups, swap, device)
    key = (channels, groups, swap, device)
    cached = _INDICES.get(key)
    if cached is None:
        with torch.inference_mode(False), torch.no_grad():
            cached = _build_indices(channels, groups, swap, device)
        _INDICES[key] = cached
    return cached


def _in_graph_capture() -> bool:
    """Whether a graph is being captured (``torch.compile``, ``torch.export``, ``torch.jit.trace``)."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def _gather_rows(rows: Tensor, index: Tensor) -> Tensor:
    """``rows[:, index]`` for a (P, C) matrix: ``torch.gather`` with the index broadcast over the rows, which
    runs at about the speed of a copy on CPU, 1.5-2x faster than ``index_select`` along dim 1."""
    return torch.gather(rows, 1, index.expand(rows.shape[0], -1))  # (P, len(index))


def gather_nhwc(x: Tensor, index: Tensor) -> Tensor:
    """``x[:, index]`` written in channels_last layout: one gather over the rows of (B*H*W, C)."""
    b, c, h, w = x.shape
    rows = x.permute(0, 2, 3, 1).reshape(b * h * w, c)  # (BHW, C), a view when x is channels_last
    return _gather_rows(rows, index).view(b, h, w, -1).permute(0, 3, 1, 2)  # (B, len(index), H, W)


class _RepeatGather(torch.autograd.Function):
    """``(x[:, perm.repeat_interleave(2)], x[:, perm])``, with a backward that gathers instead of scattering:
    the gradient of input channel ``perm[c]`` is ``g_rep[2c] + g_rep[2c+1] + g_shuf[c]``. ``perm=None``
    means no shuffle: the second output is ``x`` itself."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, rep: Tensor, perm: Tensor | None, inverse: Tensor) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(None if perm is None else inverse)
        if perm is None:
            return gather_nhwc(x, rep), x
        xr = gather_nhwc(x, rep)
        return xr, xr[:, ::2]

    @staticmethod
    def backward(ctx: Any, g_rep: Tensor, g_shuf: Tensor | None) -> tuple[Tensor, None, None, None]:
        (inverse,) = ctx.saved_tensors
        b, c2, h, w = g_rep.shape
        g = g_rep.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).view(b * h * w, c2 // 2, 2)
        total = g[..., 0] + g[..., 1]  # (BHW, C): a strided add, much faster than sum(-1) over pairs
        if g_shuf is not None:
            total += g_shuf.permute(0, 2, 3, 1).reshape(b * h * w, c2 // 2)  # (BHW, C)
        if inverse is not None:
            total = _gather_rows(total, inverse)  # (BHW, C), back in the input's channel order
        return total.view(b, h, w, c2 // 2).permute(0, 3, 1, 2), None, None, None  # (B, C, H, W)


def repeat_gather(x: Tensor, channels: int, groups: int, swap: bool) -> tuple[Tensor, Tensor]:
    """``(x[:, perm.repeat_interleave(2)], x[:, perm])`` in channels_last layout, ``perm`` the channel shuffle
    of ``groups`` groups (the identity when ``groups == 0``)."""
    if torch.jit.is_scripting():
        return _repeat_gather_plain(x, channels, groups, swap)
    return _repeat_gather_eager(x, channels, groups, swap)


def _repeat_gather_plain(x: Tensor, channels: int, groups: int, swap: bool) -> tuple[Tensor, Tensor]:
    """The gather as one ``index_select`` on fresh indices and a strided slice: what TorchScript,
    ``torch.jit.trace`` and ``torch.export`` see. Its indices have C and 2C entries whatever the batch
    (``torch.gather`` would need an index as large as the input)."""
    perm, rep, _ = _build_indices(channels, groups, swap, x.device)  # (C,), (2C,)
    xr = x.index_select(1, rep)  # (B, 2C, H, W)
    return xr, (xr[:, ::2] if groups > 0 else x)  # (B, 2C, H, W), (B, C, H, W)


@torch.jit.unused
def _repeat_gather_eager(x: Tensor, channels: int, groups: int, swap: bool) -> tuple[Tensor, Tensor]:
    if torch.jit.is_tracing() or torch.compiler.is_exporting():
        return _repeat_gather_plain(x, channels, groups, swap)  # checked when the model ran eagerly
    if x.dim() != 4 or x.shape[1] != channels:
        raise ReuseError(
            f"LruBlock({channels}): needs an input of shape (B, {channels}, H, W), got {tuple(x.shape)}; "
            f"build the block with channels={x.shape[1] if x.dim() > 1 else '?'}"
        )
    perm, rep, inverse = gather_indices(channels, groups, swap, x.device)
    if torch.is_grad_enabled() and x.requires_grad:
        return _RepeatGather.apply(x, rep, perm if groups else None, inverse)
    xr = gather_nhwc(x, rep)
    return xr, (xr[:, ::2] if groups else x)  # (B, 2C, H, W), (B, C, H, W)


class _Regather:
    """What autograd keeps instead of the repeated tensor: its source and the source's version."""

    __slots__ = ("source", "version")

    def __init__(self, source: Tensor) -> None:
        self.source = source
        self.version = source._version


def saved_as_gather(
    repeated: Tensor, source: Tensor, channels: int, groups: int, swap: bool
) -> contextlib.AbstractContextManager:
    """Context for the op that reads ``repeated = repeat_gather(source, channels, groups, swap)[0]``: autograd
    saves ``source`` (C channels, which the block before keeps for its own backward anyway) instead of the 2C
    channels of ``repeated``, and gathers again in backward. Cuts a quarter of a block's saved activations."""
    if isinstance(repeated, torch.fx.Proxy) or _in_graph_capture() or not torch.is_grad_enabled():
        return contextlib.nullcontext()
    index = gather_indices(channels, groups, swap, source.device)[1]
    # The hooks live as long as the graph: they must not hold ``repeated`` itself, only how to recognise it.
    key = (repeated.data_ptr(), repeated.shape, repeated.stride())

    def pack(t: Tensor) -> Tensor | _Regather:
        return _Regather(source) if (t.data_ptr(), t.shape, t.stride()) == key else t

    def unpack(saved: Tensor | _Regather) -> Tensor:
        if not isinstance(saved, _Regather):
            return saved
        if saved.source._version != saved.version:
            raise RuntimeError(
                "LruBlock: the block's input was modified in place after the forward; its backward needs it as it "
                "was (clone it before modifying it)"
            )
        with torch.no_grad():
            return gather_nhwc(saved.source, index)  # (B, 2C, H, W), as in the forward

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)
