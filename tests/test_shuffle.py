"""The paper's channel shuffle: permutation laws, the channel mixing it exists for, and its errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from einops import rearrange
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import reuse
from reuse import ChannelShuffle, ReuseError, channel_shuffle, shuffle_permutation

SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def valid_shuffles(draw: st.DrawFn) -> tuple[int, int, bool]:
    """(channels, groups, swap_halves) that the shuffle accepts."""
    groups = draw(st.integers(1, 16))
    swap = draw(st.booleans())
    per_group = draw(st.integers(1, 24))
    channels = groups * per_group
    if swap and channels % 2:
        channels *= 2
    return channels, groups, swap


@st.composite
def invalid_shuffles(draw: st.DrawFn) -> tuple[int, int, bool]:
    """(channels, groups, swap_halves) that the shuffle must refuse: groups not dividing, or odd with the swap."""
    channels = draw(st.integers(1, 256))
    groups = draw(st.integers(1, 32))
    swap = draw(st.booleans())
    assume(channels % groups != 0 or (swap and channels % 2 == 1))
    return channels, groups, swap


def reference_shuffle(x: torch.Tensor, groups: int, swap_halves: bool) -> torch.Tensor:
    """The paper's description, written independently: swap the halves, then ShuffleNet's group shuffle."""
    if swap_halves:
        half = x.shape[1] // 2
        x = torch.cat([x[:, half:], x[:, :half]], dim=1)
    return rearrange(x, "b (g c) h w -> b (c g) h w", g=groups)


@SETTINGS
@given(valid_shuffles())
def test_permutation_is_a_bijection(args: tuple[int, int, bool]) -> None:
    channels, groups, swap = args
    perm = shuffle_permutation(channels, groups, swap)
    assert perm.dtype == torch.long and perm.shape == (channels,)
    assert sorted(perm.tolist()) == list(range(channels))


@SETTINGS
@given(valid_shuffles(), st.integers(1, 3))
def test_channel_shuffle_equals_indexing_and_the_reference(args: tuple[int, int, bool], batch: int) -> None:
    channels, groups, swap = args
    x = torch.randn(batch, channels, 3, 2)
    out = channel_shuffle(x, groups, swap)  # exact below: a shuffle only moves values, no arithmetic
    torch.testing.assert_close(out, x[:, shuffle_permutation(channels, groups, swap)], rtol=0, atol=0)
    torch.testing.assert_close(out, reference_shuffle(x, groups, swap), rtol=0, atol=0)
    torch.testing.assert_close(ChannelShuffle(groups, swap)(x), out, rtol=0, atol=0)


@SETTINGS
@given(valid_shuffles())
def test_inverse_permutation_restores_the_input(args: tuple[int, int, bool]) -> None:
    channels, groups, swap = args
    perm = shuffle_permutation(channels, groups, swap)
    x = torch.randn(2, channels, 2, 2)
    torch.testing.assert_close(channel_shuffle(x, groups, swap)[:, torch.argsort(perm)], x, rtol=0, atol=0)


@SETTINGS
@given(valid_shuffles())
def test_swap_halves_moves_the_first_and_last_channel(args: tuple[int, int, bool]) -> None:
    channels, groups, _ = args
    if channels % 2:
        channels *= 2
    perm = shuffle_permutation(channels, groups, swap_halves=True)
    assert perm[0] != 0 and perm[-1] != channels - 1


def test_plain_group_shuffle_keeps_first_and_last_channel() -> None:
    """The reason the paper adds the swap: without it the ends never move."""
    perm = shuffle_permutation(64, groups=2, swap_halves=False)
    assert perm[0] == 0 and perm[-1] == 63


@SETTINGS
@given(invalid_shuffles())
def test_invalid_sizes_raise_reuse_error(args: tuple[int, int, bool]) -> None:
    channels, groups, swap = args
    with pytest.raises(ReuseError, match=r"channel shuffle: .*"):
        shuffle_permutation(channels, groups, swap)
    with pytest.raises(ReuseError):
        channel_shuffle(torch.zeros(1, channels, 1, 1), groups, swap)


@pytest.mark.parametrize("groups", [0, -2, 1.5, True])
def test_bad_groups_argument(groups: object) -> None:
    with pytest.raises(ReuseError, match="groups"):
        ChannelShuffle(groups)  # type: ignore[arg-type]


def test_shuffle_error_names_the_rule() -> None:
    with pytest.raises(ReuseError, match=r"groups=3 does not divide 64 channels"):
        shuffle_permutation(64, groups=3)
    with pytest.raises(ReuseError, match=r"even number of channels, got 9"):
        shuffle_permutation(9, groups=1)


def test_reuse_error_is_a_value_error() -> None:
    assert issubclass(reuse.ReuseError, ValueError)


def test_channels_last_stays_channels_last() -> None:
    x = torch.randn(2, 16, 5, 5).to(memory_format=torch.channels_last)
    out = channel_shuffle(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, reference_shuffle(x.contiguous(), 2, True), rtol=0, atol=0)


def test_gradient_flows_through_the_shuffle() -> None:
    x = torch.randn(2, 8, 3, 3, requires_grad=True)
    weights = torch.arange(8.0).view(1, 8, 1, 1)
    (channel_shuffle(x) * weights).sum().backward()
    perm = shuffle_permutation(8)
    expected = torch.empty(8)
    expected[perm] = torch.arange(8.0)  # output channel j = input channel perm[j], scaled by j
    torch.testing.assert_close(x.grad[0, :, 0, 0], expected)


def test_fx_keeps_the_shuffle_as_one_node() -> None:
    gm = torch.fx.symbolic_trace(ChannelShuffle(groups=4))
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert [n.target.__name__ for n in calls] == ["channel_shuffle"]
    x = torch.randn(2, 16, 3, 3)
    torch.testing.assert_close(gm(x), channel_shuffle(x, 4), rtol=0, atol=0)


# --- channel mixing: why the shuffle exists -----------------------------------------------------------------


def _block_dependency(channels: int, groups: int) -> np.ndarray:
    """Which input channels each output channel of the LRU block reads: a pointwise conv in ``groups`` groups
    mixes channels within a group; the depthwise conv and the shortcut keep each channel in its group."""
    size = channels // groups
    group = np.arange(channels) // size
    return group[:, None] == group[None, :]  # (C_out, C_in) bool


def _uses_to_full_mixing(channels: int, block_groups: int, shuffle: np.ndarray | None, limit: int = 32) -> int:
    """Smallest k such that after k uses every output channel depends on every input channel."""
    block = _block_dependency(channels, block_groups).astype(np.int64)
    move = np.eye(channels, dtype=np.int64)
    if shuffle is not None:
        move = np.zeros((channels, channels), dtype=np.int64)
        move[np.arange(channels), shuffle] = 1  # out[j] reads in[shuffle[j]]
    dep = block.copy()
    for k in range(1, limit + 1):
        if dep.all():
            return k
        dep = ((block @ move @ dep) > 0).astype(np.int64)
    return limit + 1


@pytest.mark.parametrize("channels", [64, 128, 256, 512])
@pytest.mark.parametrize("swap_halves", [True, False])
def test_four_uses_mix_every_channel_with_eight_groups(channels: int, swap_halves: bool) -> None:
    perm = shuffle_permutation(channels, groups=2, swap_halves=swap_halves).numpy()
    assert _uses_to_full_mixing(channels, 8, perm) == 4


def test_without_shuffle_channels_never_mix_across_groups() -> None:
    assert _uses_to_full_mixing(64, 8, None) > 32


@pytest.mark.parametrize("value", ["no", 0, None])
def test_swap_halves_takes_only_bools(value: object) -> None:
    with pytest.raises(ReuseError, match="swap_halves must be True or False"):
        ChannelShuffle(swap_halves=value)  # type: ignore[arg-type]
    with pytest.raises(ReuseError, match="swap_halves must be True or False"):
        shuffle_permutation(8, 2, value)  # type: ignore[arg-type]
