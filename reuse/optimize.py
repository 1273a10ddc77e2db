"""Inference-time optimisation of reused networks: fold each use's BatchNorm into that use's convolution,
or keep the shared convolution and turn each use's BatchNorm into a per-use channel scale and shift.

A reused conv is one module called N times, each call followed by a different BatchNorm. Folding a
BatchNorm into a conv rewrites the conv's weights, so the N uses need N folded convs: one per use, each
with ``w * gamma_i / sqrt(var_i + eps)`` and its own bias. Generic conv-BN fusers rewrite the one shared
conv in place for every BatchNorm that follows it, so every use ends up with all N BatchNorms folded in.
:func:`optimize_for_inference` does it per use, and leaves a conv that is called more than once outside a
:class:`~reuse.LayerReuse` unfolded rather than folding it wrongly.
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter

import torch
from torch import nn

from reuse._checks import check_bool, check_module
from reuse._errors import ReuseError
from reuse._tracing import LeafTracer, trace
from reuse._tree import replace_at
from reuse.delta import LowRank
from reuse.layer import LayerReuse

__all__ = ["ChannelAffine", "optimize_for_inference"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def optimize_for_inference(model: nn.Module, *, channels_last: bool = True, share_weights: bool = False) -> nn.Module:
    """A copy of ``model`` for inference, with every BatchNorm that follows a convolution folded into it.

    Inside each :class:`~reuse.LayerReuse`, use ``i``'s BatchNorm is folded into a conv of its own (one folded
    weight per use); outside, conv-BN pairs are folded as usual. A LayerReuse with per-use deltas
    (``delta_rank``) has its deltas merged first: each use's conv then holds its own weight. Pairs are found
    by tracing with ``torch.fx`` (a reused block is traced once, with ``LayerReuse`` kept as a leaf elsewhere).
    A pair is folded only when
    the conv is a plain ``nn.Conv1d/2d/3d`` called once, its output feeds only a plain BatchNorm called once;
    anything else is left as it is (a warning names a conv followed by a BatchNorm that was not folded).

    With ``share_weights=True``, a conv that several uses share is kept, ONE module for all of them, and use
    ``i``'s BatchNorm becomes a :class:`ChannelAffine` after it (``x * scale_i + shift_i``, the BatchNorm's
    eval-mode function): the model keeps its parameter count, less the parameters of the BatchNorms folded
    outside reuse. Convs that no two uses share (``n=1``, ``per_use="all"``) are folded either way.

    Args:
        model: any module; it is not modified.
        channels_last: store 4-d weights in ``channels_last`` memory format (faster convolutions on CPU).
        share_weights: keep shared convs shared, each use's BatchNorm as a per-use channel scale and shift,
            instead of one folded conv per use. Smaller, and in eager PyTorch slower: see docs/deployment.md.

    Returns:
        A new module in eval mode, parameters frozen (``requires_grad=False``); in eval mode it computes what
        ``model`` computes, up to float rounding.

    Example:
        >>> import reuse
        >>> block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        >>> fast = reuse.optimize_for_inference(reuse.wrap(block, n=3))
        >>> [type(m).__name__ for m in fast.uses[2]], fast.uses[2][0] is fast.uses[0][0]
        (['Conv2d', 'Identity', 'ReLU'], False)
        >>> small = reuse.optimize_for_inference(reuse.wrap(block, n=3), share_weights=True)
        >>> [type(m).__name__ for m in small.uses[2]], small.uses[2][0] is small.uses[0][0]
        (['Conv2d', 'ChannelAffine', 'ReLU'], True)
    """
    check_module(model, "optimize_for_inference")
    check_bool(channels_last, "channels_last", "optimize_for_inference")
    check_bool(share_weights, "share_weights", "optimize_for_inference")
    model = copy.deepcopy(model).eval()
    for layer in [m for m in model.modules() if isinstance(m, LayerReuse)]:
        _merge_deltas(model, layer)
        _fold_reused(model, layer, share_weights)
    _fold_scope(model, model, "")
    for p in model.parameters():
        p.requires_grad_(False)
        if channels_last and p.dim() == 4:
            p.data = p.data.contiguous(memory_format=torch.channels_last)
    return model


class ChannelAffine(nn.Module):
    """``x * scale + shift`` with one scale and one shift per channel (dim 1): a BatchNorm in eval mode, kept
    apart from the conv before it so that the conv's weight can stay shared by several uses.

    Example:
        >>> bn = nn.BatchNorm2d(4).eval()
        >>> affine = ChannelAffine.from_batchnorm(bn)
        >>> x = torch.randn(2, 4, 3, 3)
        >>> torch.allclose(affine(x), bn(x), atol=1e-6), affine
        (True, ChannelAffine(4))
    """

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        super().__init__()
        if scale.dim() != 1 or scale.shape != shift.shape:
            raise ReuseError(
                f"ChannelAffine: scale and shift must be two vectors of one length (one entry per channel), "
                f"got shapes {tuple(scale.shape)} and {tuple(shift.shape)}"
            )
        self.scale = nn.Parameter(scale)
        self.shift = nn.Parameter(shift)

    @classmethod
    @torch.no_grad()
    def from_batchnorm(cls, bn: nn.Module) -> ChannelAffine:
        """The eval-mode function of ``bn`` (the arithmetic in float64, stored in its dtype)."""
        scale, shift = _bn_scale_shift(bn)
        dtype = bn.running_mean.dtype
        return cls(scale.to(dtype), shift.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        scale, shift = self.scale.view(shape), self.shift.view(shape)  # (1, C, 1, ...)
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            # Mul then Add: what graph optimizers (onnxruntime's, inductor's) fold into the conv before it
            return x * scale + shift  # (B, C, ...)
        return torch.addcmul(shift, x, scale)  # (B, C, ...), one pass over x in eager

    def extra_repr(self) -> str:
        return str(self.scale.numel())


def _is_reused(module: nn.Module) -> bool:
    return isinstance(module, LayerReuse)


def _trace(module: nn.Module) -> torch.fx.Graph:
    """``module``'s graph without entering any LayerReuse (those are folded use by use), extra forward
    arguments fixed at their defaults (``LruBlock``'s ``shuffle=None``)."""
    return trace(module, LeafTracer(_is_reused))


def _conv_bn_pairs(module: nn.Module, graph: torch.fx.Graph, scope: str) -> list[tuple[str, str]]:
    """``(conv path, BatchNorm path)`` of every foldable pair in ``graph``; warns about the unfoldable ones."""
    modules = dict(module.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs = []
    for node in graph.nodes:
        prev = node.args[0] if node.op == "call_module" and node.args else None
        if not isinstance(prev, torch.fx.Node) or prev.op != "call_module":
            continue
        conv, bn = modules[prev.target], modules[node.target]
        if not isinstance(conv, _CONVS) or not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            continue
        why = _why_not_foldable(conv, bn, calls[prev.target], calls[node.target], len(prev.users))
        if why:
            warnings.warn(
                f"optimize_for_inference: left {scope}{prev.target} -> {scope}{node.target} unfolded: {why}",
                stacklevel=4,
            )
        else:
            pairs.append((str(prev.target), str(node.target)))
    return pairs


def _why_not_foldable(conv: nn.Module, bn: nn.Module, conv_calls: int, bn_calls: int, conv_users: int) -> str:
    if type(conv) not in _CONVS:
        return f"{type(conv).__name__} is a conv subclass, its forward may not be linear in its weight"
    if type(bn) not in _BATCHNORMS:
        return f"{type(bn).__name__} is a BatchNorm subclass, its forward may do more than normalise"
    if bn.running_mean is None or bn.running_var is None:
        return "the BatchNorm keeps no running statistics (track_running_stats=False)"
    if conv_calls > 1:
        return (
            f"the conv is called {conv_calls} times; folding one BatchNorm into it would change the other "
            "calls (wrap the repeated block with reuse.wrap to get one folded conv per use)"
        )
    if bn_calls > 1 or conv_users > 1:
        return "the conv's output or the BatchNorm is used elsewhere too"
    if bn.num_features != conv.out_channels:
        return f"the BatchNorm has {bn.num_features} channels, the conv {conv.out_channels}"
    return ""


def _bn_scale_shift(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``bn``'s eval-mode function as ``x * scale + shift``, in float64."""
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)  # (C,)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale  # (C,)
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    return scale, shift


@torch.no_grad()
def _folded(conv: nn.Module, bn: nn.Module) -> nn.Module:
    """A new conv computing ``bn(conv(x))`` in eval mode (the arithmetic in float64, stored in conv's dtype)."""
    w = conv.weight.double()
    scale, bias = _bn_scale_shift(bn)  # (C,), (C,)
    if conv.bias is not None:
        bias = bias + conv.bias.double() * scale
    fused = copy.deepcopy(conv)
    fused.weight = nn.Parameter((w * scale.view(-1, *[1] * (w.dim() - 1))).to(conv.weight.dtype))
    fused.bias = nn.Parameter(bias.to(conv.weight.dtype))
    return fused


def _path_counts(root: nn.Module) -> Counter[int]:
    """How many paths from ``root`` lead to each module (more than one: the module is shared)."""
    return Counter(id(m) for _, m in root.named_modules(remove_duplicate=False))


def _replace(root: nn.Module, path: str, new: nn.Module) -> None:
    """Set ``root.<path> = new`` without touching any other path: a shared ancestor on the way is
    replaced by a light copy of its own first (copy on write)."""
    counts = _path_counts(root)
    replace_at(root, path, new, owned=lambda m: counts[id(m)] == 1)


def _merge_deltas(root: nn.Module, layer: LayerReuse) -> None:
    """Replace each use's low-rank delta wrappers (``delta_rank``) by plain layers holding that use's weight
    (shared weight plus delta): the uses' weights differ, so each use gets its own conv to fold into."""
    if not layer.delta_rank:
        return
    prefix = next(name for name, m in root.named_modules() if m is layer)
    prefix = f"{prefix}." if prefix else ""
    for i in range(layer.n):
        merged: dict[int, nn.Module] = {}  # one plain layer per wrapper, under each of its names
        for path, module in list(layer.uses[i].named_modules(remove_duplicate=False)):
            if isinstance(module, LowRank):
                if id(module) not in merged:
                    merged[id(module)] = module.merged()
                _replace(root, f"{prefix}uses.{i}.{path}", merged[id(module)])


def _fold_reused(root: nn.Module, layer: LayerReuse, share_weights: bool) -> None:
    """Fold use i's BatchNorms into convs of use i's own, for every use of ``layer``; with ``share_weights``,
    a conv shared by several uses stays shared and each use's BatchNorm becomes a :class:`ChannelAffine`."""
    prefix = next(name for name, m in root.named_modules() if m is layer)
    prefix = f"{prefix}." if prefix else ""
    block = layer.uses[0]
    try:
        graph = _trace(block)
    except Exception as err:  # noqa: BLE001 - untraceable blocks are left as they are, and said so
        warnings.warn(
            f"optimize_for_inference: left {prefix}uses unfolded: tracing the block failed ({err})", stacklevel=3
        )
        return
    pairs = _conv_bn_pairs(block, graph, f"{prefix}uses.0.")
    # Decided before anything is replaced: whether the uses hold one conv object between them.
    shared = {conv: len({id(use.get_submodule(conv)) for use in layer.uses}) < layer.n for conv, _ in pairs}
    for i in range(layer.n):
        for conv_path, bn_path in pairs:
            use = root.get_submodule(f"{prefix}uses.{i}")  # by path: a copy on write may have replaced it
            conv, bn = use.get_submodule(conv_path), use.get_submodule(bn_path)
            if share_weights and shared[conv_path]:
                _replace(root, f"{prefix}uses.{i}.{bn_path}", ChannelAffine.from_batchnorm(bn))
                continue
            _replace(root, f"{prefix}uses.{i}.{conv_path}", _folded(conv, bn))
            _replace(root, f"{prefix}uses.{i}.{bn_path}", nn.Identity())


def _fold_scope(root: nn.Module, module: nn.Module, prefix: str) -> None:
    """Fold the plain conv-BN pairs of ``module`` (a LayerReuse is a leaf); if it cannot be traced, its children."""
    if isinstance(module, LayerReuse):
        return
    try:
        graph = _trace(module)
    except Exception:  # noqa: BLE001 - data-dependent forwards: try the children one by one
        for name, child in module.named_children():
            _fold_scope(root, child, f"{prefix}{name}.")
        return
    inside_reuse = {id(m) for layer in module.modules() if isinstance(layer, LayerReuse) for m in layer.modules()}
    for conv_path, bn_path in _conv_bn_pairs(module, graph, prefix):
        scope = root.get_submodule(prefix.rstrip("."))  # by path: a copy on write may have replaced it
        conv, bn = scope.get_submodule(conv_path), scope.get_submodule(bn_path)
        if id(conv) in inside_reuse or id(bn) in inside_reuse:
            continue
        _replace(root, f"{prefix}{conv_path}", _folded(conv, bn))
        _replace(root, f"{prefix}{bn_path}", nn.Identity())
