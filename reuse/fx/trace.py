"""Tracing a model with ``torch.fx``, candidate blocks kept whole, and turning what FX cannot trace into a
:class:`~reuse.ReuseError` that names the module, the failing line and the fix."""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

from reuse._errors import ReuseError
from reuse._tracing import LeafTracer, trace
from reuse.layer import LayerReuse

__all__ = ["BlockTracer", "trace_model"]


class BlockTracer(LeafTracer):
    """Keeps the candidate blocks (and ``leaf_modules``, timm's no-trace modules, LayerReuse) as leaves and
    records, for each leaf call, which module's ``forward`` made it."""

    def __init__(self, leaves: set[int], leaf_types: tuple[type, ...]) -> None:
        super().__init__(self._keeps, autowrap_functions=_timm_notrace_functions())
        self.leaves = leaves
        self.leaf_types = leaf_types + _timm_notrace_modules() + (LayerReuse,)
        self.callers: dict[str, list[str]] = {}
        self.failed_at: tuple[str, str] | None = None  # (path, class) of the innermost module that failed
        self._stack: list[str] = []

    def _keeps(self, m: nn.Module) -> bool:
        return id(m) in self.leaves or isinstance(m, self.leaf_types)

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
    # timm keeps its registry of modules FX must not enter in this private module; read only if the user's code
    # imported timm (reuse does not import it)
    fx_registry = sys.modules.get("timm.layers._fx")
    return tuple(fx_registry.get_notrace_modules()) if fx_registry is not None else ()


def _timm_notrace_functions() -> tuple[Callable, ...]:
    fx_registry = sys.modules.get("timm.layers._fx")
    if fx_registry is None:
        return ()
    return tuple(f for f in fx_registry.get_notrace_functions() if callable(f))


_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep  # with the separator: torchvision is model code
_THIS_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep  # reuse/fx/: the pass itself
_TRACING = os.path.abspath(trace.__code__.co_filename)  # reuse/_tracing.py: the library's tracer, which the pass calls


def _failing_line(err: BaseException) -> str:
    """The innermost line of model code (not torch, not this package) in the traceback."""
    for frame in reversed(traceback.extract_tb(err.__traceback__)):
        name = os.path.abspath(frame.filename)
        if not name.startswith((_TORCH_DIR, _THIS_PACKAGE, _TRACING)):
            code = f" `{frame.line.strip()}`" if frame.line else ""
            return f"{os.path.basename(frame.filename)}:{frame.lineno}{code}"
    return "inside torch"


def trace_model(root: nn.Module, tracer: BlockTracer, what: str, given: int = 1) -> fx.Graph:
    """Trace ``root`` called with ``given`` positional tensors, its other arguments left at their defaults;
    any failure becomes a ReuseError naming the module path and the operation."""
    try:
        return trace(root, tracer, given)
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
