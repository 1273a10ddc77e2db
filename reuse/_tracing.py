"""One ``torch.fx`` tracer for the whole library (private): chosen modules kept whole, and a ``forward``'s
extra arguments fixed at their defaults. Used by :func:`reuse.fx.convert`, :mod:`reuse.align` and
:func:`reuse.optimize_for_inference`."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import fx, nn

from reuse._per_use import is_batchnorm

__all__ = ["LeafTracer", "forward_defaults", "layer_graph", "trace"]

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class LeafTracer(fx.Tracer):
    """torch.fx's tracer that also keeps whole every module ``is_leaf`` selects.

    Example:
        >>> block = nn.Sequential(nn.Sequential(nn.Conv2d(2, 2, 1), nn.ReLU()), nn.ReLU())
        >>> graph = trace(block, LeafTracer(lambda m: isinstance(m, nn.Sequential) and len(m) == 2))
        >>> [n.target for n in graph.nodes if n.op == "call_module"]
        ['0', '1']
    """

    def __init__(self, is_leaf: Callable[[nn.Module], bool], autowrap_functions: tuple[Callable, ...] = ()) -> None:
        super().__init__(autowrap_functions=autowrap_functions)
        self.is_leaf = is_leaf

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return self.is_leaf(m) or super().is_leaf_module(m, module_qualified_name)


def forward_defaults(module: nn.Module, given: int = 1) -> dict[str, Any]:
    """The ``forward`` arguments after the ``given`` first ones that have defaults, at their defaults.

    Traced as constants: otherwise FX makes ``attn_mask=None`` a proxy and ``if attn_mask is not None``
    takes the wrong branch (timm's ViT calls its blocks one by one with keywords there; LruBlock takes
    ``shuffle=None``).
    """
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return {
        p.name: p.default
        for p in params[given:]
        if p.kind in (*positional, inspect.Parameter.KEYWORD_ONLY) and p.default is not inspect.Parameter.empty
    }


def trace(module: nn.Module, tracer: fx.Tracer, given: int = 1) -> fx.Graph:
    """``module``'s graph, called with ``given`` positional tensors, its other arguments at their defaults."""
    return tracer.trace(module, concrete_args=forward_defaults(module, given) or None)


def _is_layer(module: nn.Module) -> bool:
    return is_batchnorm(module) or isinstance(module, _LAYERS)


def layer_graph(block: nn.Module) -> fx.Graph:
    """``block``'s graph with every norm, conv and linear kept whole (timm's ``BatchNormAct2d`` included): the
    graph in which hidden channels are followed (:mod:`reuse.align`). Raises what FX raises."""
    return trace(block, LeafTracer(_is_layer))
