"""Aligning the hidden channels of same-structure blocks before they are tied.

Two trained blocks of the same structure compute alike functions with their hidden channels in an arbitrary
order: channel 3 of one block's first conv may do the work of channel 11 of the next one's. Averaging them
channel by channel (or sharing one block's weights) mixes unrelated features. Permuting each block's hidden
channels never changes what the block computes, so they can first be put in the order of a reference block
(Ainsworth et al., "Git Re-Basin", ICLR 2023: weight matching and activation matching).

Hidden channels are found from the block's graph, not per block type: a :class:`ChannelGroup` is the output
channels of a conv (or linear) that flow, through channel-wise modules only (norms, activations, dropout, pooling,
depthwise convs), into the input channels of other convs (or linears) of the block, and nowhere else: not into an
addition, a concatenation, the block's output or a multiplication. ResNet's basic block has one group (conv1 to
conv2), its bottleneck two, MobileNetV2's inverted residual one (through the depthwise conv). Channels tied to the
residual stream are never in a group, so they are never permuted.

Example:
    >>> import torch
    >>> from torch import nn
    >>> block = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    >>> groups = hidden_groups(block)
    >>> groups
    [ChannelGroup(producer='0', followers=('1',), consumers=('3',), channels=8, layout='conv')]
    >>> x = torch.randn(2, 4, 5, 5)
    >>> before = block.eval()(x)
    >>> permute_group(block, groups[0], torch.randperm(8))
    >>> torch.allclose(block(x), before, atol=1e-6)  # the same function, channels in another order
    True
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from reuse._errors import ReuseError
from reuse._tracing import layer_graph
from reuse.layer import is_batchnorm

__all__ = [
    "ChannelGroup",
    "activation_similarity",
    "assignment",
    "hidden_groups",
    "match_weights",
    "permute_group",
    "weight_features",
]


@dataclass(frozen=True)
class ChannelGroup:
    """Hidden channels of a block that can be permuted without changing its function."""

    producer: str  # path of the conv or linear whose output channels these are
    followers: tuple[str, ...]  # channel-wise modules on the way, in graph order (norms, activations, depthwise)
    consumers: tuple[str, ...]  # convs or linears that read the channels as their input channels
    channels: int  # how many
    layout: str  # "conv" (channels at dim 1) or "linear" (channels last)


_ACTIVATIONS = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Sigmoid,
    nn.Tanh,
    nn.Identity,
    nn.modules.dropout._DropoutNd,
)
_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_FUNCTIONS = {
    F.relu,
    F.relu6,
    F.leaky_relu,
    F.elu,
    F.gelu,
    F.silu,
    F.mish,
    F.hardswish,
    F.hardsigmoid,
    F.dropout,
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    F.sigmoid,
    F.tanh,
    operator.pos,
}
_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "contiguous", "clone"}
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def hidden_groups(block: nn.Module) -> list[ChannelGroup]:
    """The groups of hidden channels of ``block`` (see the module docstring); ``[]`` for a block FX cannot trace.

    Example:
        >>> import torchvision
        >>> [(g.producer, g.consumers) for g in hidden_groups(torchvision.models.resnet50().layer1[1])]
        [('conv1', ('conv2',)), ('conv2', ('conv3',))]
    """
    try:
        graph = layer_graph(block)
    except Exception:  # a block FX cannot trace is tied as it is, unaligned
        return []
    modules = dict(block.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    groups = []
    for node in graph.nodes:
        if node.op != "call_module" or calls[node.target] != 1:
            continue
        m = modules[node.target]
        if isinstance(m, _CONVS) and m.groups == 1:
            group = _follow(node, modules, calls, "conv", m.out_channels)
        elif isinstance(m, nn.Linear):
            group = _follow(node, modules, calls, "linear", m.out_features)
        else:
            continue
        if group is not None:
            groups.append(group)
    used: dict[str, int] = {}  # a module in two groups (as follower) would be permuted twice: drop both
    for g in groups:
        for f in g.followers:
            used[f] = used.get(f, 0) + 1
    return [g for g in groups if all(used[f] == 1 for f in g.followers)]


def _follow(start: fx.Node, modules: dict[str, nn.Module], calls: dict[str, int], layout: str, channels: int):
    """The group whose producer is ``start``, or None if its channels reach anything but channel-wise modules and
    consumers."""
    followers: list[str] = []
    consumers: list[str] = []
    frontier = [start]
    while frontier:
        node = frontier.pop(0)
        for user in node.users:
            role = _role(user, node, modules, calls, layout, channels)
            if role is None:
                return None
            if role == "consumer":
                consumers.append(user.target)
                continue
            if user.op == "call_module" and user.target not in followers and not _weightless(modules[user.target]):
                followers.append(user.target)
            frontier.append(user)
    if not consumers:
        return None
    return ChannelGroup(start.target, tuple(followers), tuple(consumers), channels, layout)


def _role(user: fx.Node, node: fx.Node, modules: dict[str, nn.Module], calls: dict[str, int], layout: str, c: int):
    """What ``user`` does with the channels of ``node``: "consumer", "follow" (channel-wise), or None (ties them)."""
    if user.op == "call_module":
        m = modules[user.target]
        if user.args != (node,) or user.kwargs:
            return None
        if _weightless(m) and isinstance(m, (*_ACTIVATIONS, *_POOLS)):
            return "follow"  # may be called at several places (ResNet's one self.relu): nothing to permute
        if calls[user.target] != 1:
            return None
        if layout == "conv":
            if isinstance(m, _CONVS) and m.groups == 1 and m.in_channels == c:
                return "consumer"
            if isinstance(m, _CONVS) and m.groups == m.in_channels == m.out_channels == c:
                return "follow"  # depthwise: channel by channel
            if (is_batchnorm(m) and getattr(m, "num_features", c) == c) or isinstance(m, _POOLS):
                return "follow"
        elif isinstance(m, nn.Linear) and m.in_features == c:
            return "consumer"
        return "follow" if isinstance(m, _ACTIVATIONS) else None
    tensors = [a for a in (*user.args, *user.kwargs.values()) if isinstance(a, fx.Node)]
    if tensors != [node]:
        return None
    if user.op == "call_function" and user.target in _FUNCTIONS:
        return "follow"
    if user.op == "call_method" and user.target in _METHODS:
        return "follow"
    return None


def _weightless(m: nn.Module) -> bool:
    return next(iter([*m.parameters(), *m.buffers()]), None) is None


@torch.no_grad()
def permute_group(block: nn.Module, group: ChannelGroup, perm: Tensor) -> None:
    """Put the group's channels of ``block`` in the order ``perm`` (new channel ``k`` is old channel ``perm[k]``),
    in place: the producer's output rows, every per-channel tensor of the followers and the consumers' input
    columns. The block computes what it did.

    Raises:
        ReuseError: ``perm`` is not a permutation of the group's channels.
    """
    perm = torch.as_tensor(perm, device="cpu")  # indices live on the CPU; each tensor takes them to its device
    if perm.shape != (group.channels,) or not torch.equal(
        perm.sort().values, torch.arange(group.channels, device="cpu")
    ):
        raise ReuseError(
            f"permute_group: perm must be a permutation of range({group.channels}) (the channels of "
            f"{group.producer}), got shape {tuple(perm.shape)}"
        )
    for path in (group.producer, *group.followers):
        m = block.get_submodule(path)
        for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]:
            if t is not None and t.dim() >= 1 and t.shape[0] == group.channels:
                t.copy_(t[perm.to(t.device)])
    for path in group.consumers:
        w = block.get_submodule(path).weight
        w.copy_(w[:, perm.to(w.device)])


def weight_features(block: nn.Module, group: ChannelGroup) -> Tensor:
    """One row per channel of the group, ``(C, D)``: the producer's output row, each depthwise follower's kernel
    and each consumer's input column, each part scaled to unit length, side by side. The dot product of two rows
    is a sum of cosine similarities (BatchNorm makes the scale of a conv's row arbitrary)."""
    parts = [block.get_submodule(group.producer).weight.reshape(group.channels, -1)]  # (C, C_in * k)
    for path in group.followers:
        m = block.get_submodule(path)
        if isinstance(m, _CONVS):
            parts.append(m.weight.reshape(group.channels, -1))  # (C, k), depthwise
    for path in group.consumers:
        w = block.get_submodule(path).weight  # (O, C, *k)
        parts.append(w.transpose(0, 1).reshape(group.channels, -1))  # (C, O * k)
    return torch.cat([F.normalize(p.detach().double(), dim=1) for p in parts], dim=1)  # (C, D)


def assignment(similarity: Tensor) -> Tensor:
    """The permutation ``perm`` maximising ``sum_k similarity[perm[k], k]``: row ``perm[k]`` of the block to align
    goes where column ``k`` of the reference is (``scipy.optimize.linear_sum_assignment``).

    Example:
        >>> assignment(torch.tensor([[0.0, 1.0], [1.0, 0.0]])).tolist()
        [1, 0]
    """
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(similarity.detach().cpu().double().numpy(), maximize=True)
    perm = torch.empty(len(cols), dtype=torch.long, device="cpu")
    perm[torch.as_tensor(cols, device="cpu")] = torch.as_tensor(rows, device="cpu")
    return perm


def match_weights(blocks: Sequence[nn.Module], groups: Sequence[ChannelGroup], rounds: int = 3) -> None:
    """Weight matching, in place: permute the hidden channels of every block to match the others, with no data.

    Each block is first aligned to block 0, then ``rounds`` times to the mean of the other (aligned) blocks;
    within a block, groups that touch one another (a bottleneck's conv2 reads one group and writes the next) are
    solved in turn until none changes.
    """
    if len(blocks) < 2 or not groups:
        return
    for i in range(1, len(blocks)):
        _align_to(blocks[i], groups, lambda g: weight_features(blocks[0], g))
    for _ in range(rounds):
        changed = False
        for i, block in enumerate(blocks):
            others = [b for j, b in enumerate(blocks) if j != i]
            changed |= _align_to(block, groups, lambda g, others=others: _mean_features(others, g))
        if not changed:
            break


def _mean_features(blocks: Sequence[nn.Module], group: ChannelGroup) -> Tensor:
    return torch.stack([weight_features(b, group) for b in blocks]).mean(0)  # (C, D)


def _align_to(block: nn.Module, groups: Sequence[ChannelGroup], target, sweeps: int = 10) -> bool:
    """Permute ``block`` so that each group's weight features match ``target(group)``; True if anything moved."""
    moved = False
    for _ in range(sweeps):
        changed = False
        for g in groups:
            perm = assignment(weight_features(block, g) @ target(g).T)  # (C, C) similarities
            if not torch.equal(perm, torch.arange(g.channels, device="cpu")):
                permute_group(block, g, perm)
                changed = moved = True
        if not changed:
            break
    return moved


def activation_similarity(cross: Tensor, mean_a: Tensor, mean_r: Tensor, var_a: Tensor, var_r: Tensor) -> Tensor:
    """The correlation ``(C, C)`` of one block's hidden channels (rows) with the reference's (columns), from the
    moments over the same samples: ``cross = E[a r^T]``, the means and the variances.

    Example:
        >>> a = torch.randn(1000, 3, dtype=torch.float64)
        >>> r = a[:, [2, 0, 1]]  # the same features, in another order
        >>> va, vr = a.var(0, correction=0), r.var(0, correction=0)
        >>> c = activation_similarity(a.T @ r / 1000, a.mean(0), r.mean(0), va, vr)
        >>> assignment(c).tolist()
        [2, 0, 1]
    """
    cov = cross - mean_a[:, None] * mean_r[None, :]  # (C, C)
    scale = (var_a.clamp_min(0).sqrt()[:, None] * var_r.clamp_min(0).sqrt()[None, :]).clamp_min(1e-12)
    return cov / scale
