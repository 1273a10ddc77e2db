"""Inference-time optimisation of reused networks: fold each use's BatchNorm into that use's convolution.

A reused conv is one module called N times, each call followed by a different BatchNorm. Folding a
BatchNorm into a conv rewrites the conv's weights, so the N uses need N folded convs: one per use, each
with ``w * gamma_i / sqrt(var_i + eps)`` and its own bias. Generic conv-BN fusers rewrite the one shared
conv in place for every BatchNorm that follows it, so every use ends up with all N BatchNorms folded in.
:func:`optimize_for_inference` does it per use, and leaves a conv that is called more than once outside a
:class:`~reuse.LayerReuse` unfolded rather than folding it wrongly.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from collections import Counter

import torch
from torch import nn

from reuse._checks import check_bool
from reuse._errors import ReuseError
from reuse.layer import LayerReuse, _shallow_copy

__all__ = ["optimize_for_inference"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def optimize_for_inference(model: nn.Module, *, channels_last: bool = True) -> nn.Module:
    """A copy of ``model`` for inference, with every BatchNorm that follows a convolution folded into it.

    Inside each :class:`~reuse.LayerReuse`, use ``i``'s BatchNorm is folded into a conv of its own (one folded
    weight per use); outside, conv-BN pairs are folded as usual. Pairs are found by tracing with ``torch.fx``
    (a reused block is traced once, with ``LayerReuse`` kept as a leaf elsewhere). A pair is folded only when
    the conv is a plain ``nn.Conv1d/2d/3d`` called once, its output feeds only a plain BatchNorm called once;
    anything else is left as it is (a warning names a conv followed by a BatchNorm that was not folded).

    Args:
        model: any module; it is not modified.
        channels_last: store 4-d weights in ``channels_last`` memory format (faster convolutions on CPU).

    Returns:
        A new module in eval mode, parameters frozen (``requires_grad=False``); in eval mode it computes what
        ``model`` computes, up to float rounding.

    Example:
        >>> import reuse
        >>> block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        >>> fast = reuse.optimize_for_inference(reuse.wrap(block, n=3))
        >>> [type(m).__name__ for m in fast.uses[2]], fast.uses[2][0] is fast.uses[0][0]
        (['Conv2d', 'Identity', 'ReLU'], False)
    """
    if not isinstance(model, nn.Module):
        raise ReuseError(f"optimize_for_inference: needs an nn.Module, got {type(model).__name__}")
    check_bool(channels_last, "channels_last", "optimize_for_inference")
    model = copy.deepcopy(model).eval()
    for layer in [m for m in model.modules() if isinstance(m, LayerReuse)]:
        _fold_reused(model, layer)
    _fold_scope(model, model, "")
    for p in model.parameters():
        p.requires_grad_(False)
        if channels_last and p.dim() == 4:
            p.data = p.data.contiguous(memory_format=torch.channels_last)
    return model


class _ReuseLeafTracer(torch.fx.Tracer):
    """Trace a scope without entering any LayerReuse: those are folded use by use."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, LayerReuse) or super().is_leaf_module(m, qualname)


def _trace(module: nn.Module) -> torch.fx.Graph:
    """``module``'s graph, extra forward arguments fixed at their defaults (``LruBlock``'s ``shuffle=None``)."""
    params = list(inspect.signature(module.forward).parameters.values())[1:]
    concrete = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    return _ReuseLeafTracer().trace(module, concrete_args=concrete or None)


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


@torch.no_grad()
def _folded(conv: nn.Module, bn: nn.Module) -> nn.Module:
    """A new conv computing ``bn(conv(x))`` in eval mode (the arithmetic in float64, stored in conv's dtype)."""
    w = conv.weight.double()
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)  # (C,)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    bias = -bn.running_mean.double() * scale  # (C,)
    if conv.bias is not None:
        bias = bias + conv.bias.double() * scale
    if bn.bias is not None:
        bias = bias + bn.bias.double()
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
    *ancestors, leaf = path.split(".")
    parent = root
    for name in ancestors:
        child = parent._modules[name]
        if counts[id(child)] > 1:
            child = _shallow_copy(child)
            parent._modules[name] = child
        parent = child
    parent._modules[leaf] = new


def _fold_reused(root: nn.Module, layer: LayerReuse) -> None:
    """Fold use i's BatchNorms into convs of use i's own, for every use of ``layer``."""
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
    for i in range(layer.n):
        for conv_path, bn_path in pairs:
            use = root.get_submodule(f"{prefix}uses.{i}")  # by path: a copy on write may have replaced it
            fused = _folded(use.get_submodule(conv_path), use.get_submodule(bn_path))
            _replace(root, f"{prefix}uses.{i}.{conv_path}", fused)
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
