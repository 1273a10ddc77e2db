"""The channel shuffle of the layer-reuse paper.

Köpüklü et al. (ICIP 2019) shuffle the channels between two uses of a reused block so that its
grouped filters see other channels at every use. Their shuffle first exchanges the two halves of
the channels, then applies ShuffleNet's group shuffle (``groups=2`` in LruNet). The exchange is
there because the plain group shuffle leaves the first and the last channel where they are.

As an index vector ``perm`` (``out[:, j] = x[:, perm[j]]``), with ``C`` channels and ``g`` groups::

    swapped[k] = x[(k + C/2) mod C]            # exchange the halves
    out[a * g + b] = swapped[b * (C/g) + a]    # group shuffle: (g, C/g) -> (C/g, g)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from reuse._checks import check_bool, check_int
from reuse._errors import ReuseError

__all__ = ["ChannelShuffle", "channel_shuffle", "check_shuffle", "shuffle_permutation"]


def check_shuffle(channels: int, groups: int = 2, swap_halves: bool = True) -> None:
    """Raise :class:`ReuseError` unless ``channels`` can be shuffled with these settings.

    Example:
        >>> check_shuffle(64, groups=8)
        >>> check_shuffle(6, groups=4)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        reuse._errors.ReuseError: channel shuffle: groups=4 does not divide 6 channels; ...
    """
    check_int(groups, "groups", "channel shuffle")
    check_bool(swap_halves, "swap_halves", "channel shuffle")
    if channels < 1:
        raise ReuseError(f"channel shuffle: needs at least one channel, got {channels}")
    if channels % groups:
        raise ReuseError(
            f"channel shuffle: groups={groups} does not divide {channels} channels; "
            "use a number of groups that divides the channels"
        )
    if swap_halves and channels % 2:
        raise ReuseError(
            f"channel shuffle: swap_halves=True needs an even number of channels, got {channels}; "
            "pass swap_halves=False or use an even width"
        )


def unchecked_permutation(channels: int, groups: int, swap_halves: bool, device: torch.device | None = None) -> Tensor:
    """The shuffle's index vector, unchecked; TorchScript compiles it, and it traces and exports to plain
    arithmetic (no ``roll``, which ONNX export of a traced graph does not take without ``dims``)."""
    perm = torch.arange(channels, device=device)  # (C,)
    if swap_halves:
        perm = torch.remainder(perm + channels // 2, channels)  # (C,), perm[k] = (k + C/2) mod C
    return perm.view(groups, channels // groups).t().reshape(channels)  # (C,), (g, C/g) -> (C/g, g)


def shuffle_permutation(
    channels: int, groups: int = 2, swap_halves: bool = True, device: torch.device | str | None = None
) -> Tensor:
    """The shuffle as an index vector: ``channel_shuffle(x) == x[:, perm]``.

    Args:
        channels: number of channels C.
        groups: ShuffleNet groups g; must divide C.
        swap_halves: exchange the two halves of the channels first (the paper's variant); needs even C.
        device: where to build the index.

    Returns:
        A ``LongTensor`` of shape ``(C,)`` holding a permutation of ``0..C-1``.

    Example:
        >>> shuffle_permutation(8).tolist()
        [4, 0, 5, 1, 6, 2, 7, 3]
        >>> shuffle_permutation(8, swap_halves=False).tolist()
        [0, 4, 1, 5, 2, 6, 3, 7]
    """
    check_shuffle(channels, groups, swap_halves)
    return unchecked_permutation(channels, groups, swap_halves, None if device is None else torch.device(device))


def channel_shuffle(x: Tensor, groups: int = 2, swap_halves: bool = True) -> Tensor:
    """Shuffle the channels (dim 1) of ``x`` with one gather.

    A ``channels_last`` input stays ``channels_last``. Scriptable: under ``torch.jit.script`` the checks are
    left out (the eager forward does them).

    Args:
        x: a tensor of shape ``(B, C, ...)``.
        groups: ShuffleNet groups; must divide C.
        swap_halves: exchange the two halves first (the paper's variant).

    Returns:
        ``x[:, shuffle_permutation(C, groups, swap_halves)]``.

    Example:
        >>> x = torch.arange(8.0).view(1, 8, 1, 1)
        >>> channel_shuffle(x).flatten().tolist()
        [4.0, 0.0, 5.0, 1.0, 6.0, 2.0, 7.0, 3.0]
    """
    if torch.jit.is_scripting():
        return x.index_select(1, unchecked_permutation(x.shape[1], groups, swap_halves, x.device))  # (B, C, ...)
    return _channel_shuffle_eager(x, groups, swap_halves)


@torch.jit.unused
def _channel_shuffle_eager(x: Tensor, groups: int, swap_halves: bool) -> Tensor:
    if x.dim() < 2:
        raise ReuseError(f"channel shuffle: needs a tensor of shape (B, C, ...), got shape {tuple(x.shape)}")
    perm = shuffle_permutation(x.shape[1], groups, swap_halves, device=x.device)  # (C,)
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        # Gather along the innermost (channel) axis of the NHWC storage: one copy, still channels_last.
        return x.permute(0, 2, 3, 1).index_select(3, perm).permute(0, 3, 1, 2)  # (B, C, H, W)
    return x.index_select(1, perm)  # (B, C, ...), channels permuted


# Keep the shuffle a single node in torch.fx graphs: its index is built from the channel count.
torch.fx.wrap("channel_shuffle")


class ChannelShuffle(nn.Module):
    """Module form of :func:`channel_shuffle`; it has no parameters.

    Example:
        >>> ChannelShuffle(groups=2)
        ChannelShuffle(groups=2, swap_halves=True)
        >>> ChannelShuffle()(torch.randn(2, 8, 4, 4)).shape
        torch.Size([2, 8, 4, 4])
    """

    def __init__(self, groups: int = 2, swap_halves: bool = True) -> None:
        super().__init__()
        check_int(groups, "groups", "ChannelShuffle")
        check_bool(swap_halves, "swap_halves", "ChannelShuffle")
        self.groups = groups
        self.swap_halves = swap_halves

    def forward(self, x: Tensor) -> Tensor:
        return channel_shuffle(x, self.groups, self.swap_halves)

    def __repr__(self) -> str:
        return f"ChannelShuffle(groups={self.groups}, swap_halves={self.swap_halves})"
