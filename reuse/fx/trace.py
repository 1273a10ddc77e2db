"""Tracing a model with ``torch.fx``, candidate blocks kept whole, and turning what FX cannot trace into a
:class:`~reuse.ReuseError` that names the module, the failing line and the fix."""

from __future__ import annotations

import inspect
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

from reuse._errors import ReuseError
from reuse.layer import LayerReuse


class _Tracer(fx.Tracer):
    """Keeps the candidate blocks (and ``leaf_modules``, timm's no-trace modules, LayerReuse) as leaves and
    records, for each leaf call, which module's ``forward`` made it."""

    def __init__(self, leaves: set[int], leaf_types: tuple[type, ...]) -> None:
        super().__init__(autowrap_functions=_timm_notrace_functions())
        self.leaves = leaves
        self.leaf_types = leaf_types + _timm_notrace_modules() + (LayerReuse,)
        self.callers: dict[str, list[str]] = {}
        self.failed_at: tuple[str, str] | None = None  # (path, class) of the innermost module that failed
        self._stack: list[str] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (
            id(m) in self.leaves or isinstance(m, self.leaf_types) or super().is_leaf_module(m, module_qualified_name)
        )

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        path = self.path_of_module(m)
        if self.is_leaf_module(m, path):
            self.callers.setdefault(path, []).append(self._stack[-1] if self._stack else "")
        self._stack.append(path)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_at is None:
                self.failed_at = (path, type(m).__name__)
            raise
        finally:
            self._stack.pop()


def _timm_notrace_modules() -> tuple[type, ...]:
    fx_registry = sys.modules.get("timm.layers._fx")  # only if the user's code imported timm
    return tuple(fx_registry.get_notrace_modules()) if fx_registry is not None else ()


def _timm_notrace_functions() -> tuple[Callable, ...]:
    fx_registry = sys.modules.get("timm.layers._fx")
    if fx_registry is None:
        return ()
    return tuple(f for f in fx_registry.get_notrace_functions() if callable(f))


_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep  # with the separator: torchvision is model code
_THIS_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep  # reuse/fx/: the pass itself


def _failing_line(err: BaseException) -> str:
    """The innermost line of model code (not torch, not this package) in the traceback."""
    for frame in reversed(traceback.extract_tb(err.__traceback__)):
        name = os.path.abspath(frame.filename)
        if not name.startswith((_TORCH_DIR, _THIS_PACKAGE)):
            code = f" `{frame.line.strip()}`" if frame.line else ""
            return f"{os.path.basename(frame.filename)}:{frame.lineno}{code}"
    return "inside torch"


def _defaults(module: nn.Module, given: int) -> dict[str, Any]:
    """The ``forward`` arguments after the ``given`` first ones that have defaults, at their defaults.

    Traced as constants: otherwise FX makes ``attn_mask=None`` a proxy and ``if attn_mask is not None``
    takes the wrong branch (timm's ViT calls its blocks one by one with keywords there).
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


def _trace(root: nn.Module, tracer: _Tracer, what: str, given: int = 1) -> fx.Graph:
    """Trace ``root`` called with ``given`` positional tensors, its other arguments left at their defaults;
    any failure becomes a ReuseError naming the module path and the operation."""
    try:
        return tracer.trace(root, concrete_args=_defaults(root, given) or None)
    except Exception as err:  # FX raises TraceError, TypeError, RuntimeError, NameError, ...
        path, cls = tracer.failed_at or ("", type(root).__name__)
        where = f"in module '{path}' ({cls})" if path else f"in the forward of {cls} itself"
        msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
        if path:
            fix = (
                f"pass leaf_modules=[{cls}] (or leaf_modules=['{path}']) so that tracing keeps that module whole "
                "(blocks inside it are then left as they are), or convert the submodules that hold your blocks "
                f"one by one (convert({what}.<submodule>))"
            )
        else:
            fix = f"convert the submodules that hold your blocks one by one instead (convert({what}.<submodule>))"
        raise ReuseError(
            f"convert: torch.fx cannot trace {type(root).__name__} {where}: "
            f"{type(err).__name__}: {msg} at {_failing_line(err)}; {fix}"
        ) from None
