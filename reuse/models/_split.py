"""One use of an :class:`~reuse.models.LruBlock` in the form fp32 ONNX runs fastest: :class:`SplitLruUse`.

Private: ``LruBlock.export_form()`` makes it, and :func:`reuse.deploy.export_onnx` writes it in each use's place.

The block computes ``relu(pw(dw(x[:, rep])) + x[:, perm])``: the depthwise conv has channel multiplier 2, run as
a true depthwise conv on the input with every channel repeated (``rep``), and the shortcut is every other
channel of that repeated input. In onnxruntime that costs, per use and at batch 256, a gather of 2F channels, a
strided slice, and layout reorders around them (onnxruntime's convolutions run in a blocked layout, gathers and
slices do not): half of 14-LruNet's time. Split by the parity ``e`` of the depthwise output channel ``2c + e``,
the same use is::

    s   = x[:, perm]                                      # (B, F, H, W): the shuffle, the shortcut
    d_e = dw_e(s) * a_e                                   # dw_e: the filters 2c + e, a true depthwise conv of s
    y   = relu(pw_0(d_0) * b + pw_1(d_1) * b + shift + s) # pw_e: the pointwise columns of parity e, same groups

where ``a`` and ``b`` are the per-use BatchNorm scales and ``shift`` gathers every constant (the depthwise
BatchNorm's shift carried through the pointwise conv, the pointwise bias and shift). A pointwise group reads
the depthwise channels ``2c + e`` of its own ``c`` only, so each half is a grouped conv with the block's groups.
One gather of F channels, no slice, and the sum ``pw_0 + pw_1`` stays in the blocked layout. The four weights
are the block's own, rearranged: every use holds equal tensors, which the exporter stores once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reuse.models._gather import gather_indices
from reuse.optimize import ChannelAffine

__all__ = ["SplitLruUse", "channel_affine"]


def channel_affine(conv: nn.Conv2d, norm: nn.Module) -> tuple[Tensor, Tensor] | None:
    """``(scale, shift)`` with ``norm(conv(x)) == conv_nobias(x) * scale + shift`` per output channel, for a norm
    that is a per-channel affine map in eval mode (BatchNorm2d, ``reuse.optimize.ChannelAffine``, Identity);
    ``None`` for any other norm.

    Example:
        >>> conv, bn = nn.Conv2d(2, 4, 1), nn.BatchNorm2d(4).eval()
        >>> scale, shift = channel_affine(conv, bn)
        >>> x = torch.randn(1, 2, 3, 3)
        >>> want = bn(conv(x))
        >>> got = F.conv2d(x, conv.weight) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
        >>> torch.allclose(got, want, atol=1e-6)
        True
    """
    channels = conv.out_channels
    bias = conv.bias if conv.bias is not None else conv.weight.new_zeros(channels)  # (C,)
    if isinstance(norm, nn.Identity):
        return torch.ones_like(bias), bias
    if isinstance(norm, nn.BatchNorm2d) and not norm.training and norm.track_running_stats:
        norm = ChannelAffine.from_batchnorm(norm)  # the one eval-mode BatchNorm arithmetic (reuse.optimize)
    if isinstance(norm, ChannelAffine):
        return norm.scale, bias * norm.scale + norm.shift
    return None


class SplitLruUse(nn.Module):
    """One use of an LruBlock (eval mode) as even and odd halves: same function, for fp32 ONNX (see the module).

    Example:
        >>> from reuse.models import LruBlock
        >>> block = LruBlock(16).eval()
        >>> split = SplitLruUse(block)
        >>> x = torch.randn(2, 16, 5, 5)
        >>> torch.allclose(split(x, shuffle=(2, True)), block(x, shuffle=(2, True)), atol=1e-5)
        True
    """

    fuses_shuffle = True  # LayerReuse hook, as LruBlock's: forward(x, shuffle=(groups, swap))

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        dw_affine, pw_affine = channel_affine(block.dw, block.dw_bn), channel_affine(block.pw, block.pw_bn)
        if dw_affine is None or pw_affine is None:
            raise TypeError(f"SplitLruUse: the norms of {type(block).__name__} are not per-channel affine maps")
        c, groups = block.channels, block.pw.groups
        with torch.no_grad():
            dw = block.dw.weight.reshape(c, 2, 1, 3, 3)  # filter 2c + e at [c, e]
            pw = block.pw.weight.reshape(c, c // groups, 2, 1, 1)  # column 2k + e of a group at [:, k, e]
            a_scale, a_shift = (t.reshape(c, 2) for t in dw_affine)  # (F, 2), (F, 2)
            b_scale, shift = pw_affine  # (F,), (F,)
            for e in (0, 1):  # the depthwise shift through the pointwise conv: a constant per output channel
                through = F.conv2d(a_shift[:, e].reshape(1, c, 1, 1), pw[:, :, e], groups=groups).reshape(c)
                shift = shift + through * b_scale
            self.channels, self.groups = c, groups
            self.dw_w = nn.ParameterList([nn.Parameter(dw[:, e].contiguous(), requires_grad=False) for e in (0, 1)])
            self.pw_w = nn.ParameterList([nn.Parameter(pw[:, :, e].contiguous(), requires_grad=False) for e in (0, 1)])
            self.dw_scale = nn.ParameterList(
                [nn.Parameter(a_scale[:, e].reshape(1, c, 1, 1).contiguous(), requires_grad=False) for e in (0, 1)]
            )
            self.pw_scale = nn.Parameter(b_scale.reshape(1, c, 1, 1).clone(), requires_grad=False)
            self.shift = nn.Parameter(shift.reshape(1, c, 1, 1).clone(), requires_grad=False)

    def forward(self, x: Tensor, shuffle: tuple[int, bool] | None = None) -> Tensor:
        groups, swap = shuffle if shuffle is not None else (0, False)
        s = x
        if groups:
            perm, _, _ = gather_indices(self.channels, groups, swap, x.device)
            s = x.index_select(1, perm)  # (B, F, H, W): shuffled, and the shortcut
        halves = []
        for e in (0, 1):
            d = F.conv2d(s, self.dw_w[e], padding=1, groups=self.channels) * self.dw_scale[e]  # (B, F, H, W)
            halves.append(F.conv2d(d, self.pw_w[e], groups=self.groups) * self.pw_scale)  # (B, F, H, W)
        # Mul right after each conv (folded into it by onnxruntime); the two halves summed first: in blocked layout
        return ((halves[0] + (halves[1] + self.shift)) + s).relu()  # (B, F, H, W)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, groups={self.groups}"
