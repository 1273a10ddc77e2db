"""Convert the stacked blocks of any CNN into reused blocks: a ``torch.fx`` pass.

A network built from stages of identical blocks (ResNet's ``layerN``, the stages of EfficientNet,
ConvNeXt, RegNet, ...) spends most of its parameters on blocks that all have the same shape.
:func:`convert` finds each *run* of such blocks and replaces it by one :class:`~reuse.LayerReuse`:
the first block's weights (or the run's mean) applied ``k`` times, each use with its own BatchNorm,
copied from the block it replaces, and the paper's channel shuffle between uses.

How a run is found:

1. Modules that have a sibling of the same *structure* are candidate blocks: same classes module by
   module, same hyperparameters (the non-tensor settings in each module's ``__dict__`` and its
   ``extra_repr``), same parameter and buffer shapes. Submodules without weights may differ in their
   settings (drop-path rates), and ``nn.Identity`` counts as a drop-path of rate 0: such modules are
   kept one per use, like BatchNorm.
2. The model is traced with ``torch.fx``, candidate blocks kept as leaves, so a run shows as a chain
   of calls ``blocks.1 -> blocks.2 -> ...`` whatever the container (``nn.Sequential``, a
   ``ModuleList`` looped over in ``forward``, timm stages).
3. A run is two or more blocks called in a row, each one's only input the previous one's output (which
   nothing else reads), whose output shape equals their input shape on an example input. A block is
   one module, or a few consecutive sibling modules whose structures repeat (VGG's conv, BN, ReLU;
   Swin's alternating blocks). Shapes come from one forward pass on the ``meta`` device: no arithmetic.

Where the blocks sit in an ``nn.Sequential``, the run is swapped in place and the model keeps its
class; elsewhere (a ``ModuleList`` looped over in a custom ``forward``) the module whose ``forward``
calls the blocks is replaced by a ``torch.fx.GraphModule`` of its traced ``forward``.
"""

from __future__ import annotations

import contextlib
import copy
import enum
import functools
import inspect
import os
import re
import sys
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx, nn

from reuse._checks import check_bool, check_bools
from reuse._errors import ReuseError
from reuse.filter import FilterReuseConv2d, filter_reuse
from reuse.kernel import KernelReuseConv2d, kernel_reuse
from reuse.layer import LayerReuse, PerUse, _per_use_predicate, is_norm
from reuse.shuffle import check_shuffle

__all__ = ["ConversionReport", "Run", "convert", "find_runs"]

_LEVELS = ("layer", "filter", "kernel")
_INITS = ("first", "mean")
_BANK_DEFAULT = 0.5  # convert(level="filter"|"kernel"): banks of half the entries they replace


class _Default(enum.Enum):
    """The type of :data:`_DEFAULT`: ``bank_size`` left out (0.5 at the filter and kernel levels)."""

    BANK_SIZE = "0.5"

    def __repr__(self) -> str:
        return self.value


_DEFAULT = _Default.BANK_SIZE


# --------------------------------------------------------------------------------------------------
# What the pass reports
# --------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """A chain of same-structure blocks, each fed by the previous one's output.

    A block is one module (``period == 1``: a ResNet bottleneck) or ``period`` consecutive modules whose
    structures repeat (VGG's conv and ReLU, Swin's alternating blocks); ``blocks`` names every module.
    ``skipped`` is empty for a run that is (or, from :func:`find_runs`, would be) converted, and says
    why otherwise.
    """

    blocks: tuple[str, ...]  # qualified names of the modules, in call order: n blocks of ``period`` modules
    block_type: str  # class name(s) of a block, "Conv2d+ReLU" for a block of several modules
    input_shape: tuple[int, ...] | None = None  # shape the first block sees on the example input
    skipped: str = ""  # why the run is not converted; "" when it is
    shuffle: bool = False  # channel shuffle between uses
    note: str = ""  # remarks: no shuffle and why, blocks left out of the chain
    per_use: tuple[str, ...] = ()  # classes kept one per use besides the ``per_use`` option (drop-path, ...)
    params_before: int = 0  # parameters of the k blocks
    params_after: int = 0  # parameters of the LayerReuse: shared ones once, per-use ones k times
    via: str = ""  # "sequential" (swapped in its nn.Sequential) or "graph" (owner traced into a GraphModule)
    owner: str = ""  # the module whose forward calls the blocks ("" is the model itself)
    period: int = 1  # modules per block; a block of several is reused as an nn.Sequential of them

    @property
    def path(self) -> str:
        """Where the :class:`~reuse.LayerReuse` sits after conversion: the first module's name."""
        return self.blocks[0]

    @property
    def n(self) -> int:
        """Number of blocks, the uses of the reused block."""
        return len(self.blocks) // self.period

    @property
    def units(self) -> list[tuple[str, ...]]:
        """The blocks, each as the names of its ``period`` modules."""
        p = self.period
        return [self.blocks[i : i + p] for i in range(0, len(self.blocks), p)]

    def __len__(self) -> int:
        return self.n


@dataclass
class ConversionReport:
    """What :func:`convert` did: the runs it found, converted or skipped, and the parameter counts.

    Parameters are counted once each, shared ones included (``sum(p.numel() for p in m.parameters())``).
    ``str(report)`` is a table.
    """

    model: str  # class name of the model handed in
    runs: list[Run] = field(default_factory=list)  # every run found, converted or skipped
    params_before: int = 0  # parameters of the model handed in
    params_after: int = 0  # parameters of the converted model
    notes: list[str] = field(default_factory=list)  # model-level remarks (no run found, GraphModules made)
    graph_modules: list[str] = field(default_factory=list)  # modules replaced by a GraphModule ("" = model)
    options: dict[str, Any] = field(default_factory=dict)  # the options of the call

    @property
    def converted(self) -> list[Run]:
        """The runs replaced by a :class:`~reuse.LayerReuse`."""
        return [r for r in self.runs if not r.skipped]

    @property
    def skipped(self) -> list[Run]:
        """The runs left as they were, each with its reason."""
        return [r for r in self.runs if r.skipped]

    def __str__(self) -> str:
        saved = self.params_before - self.params_after
        pct = 100.0 * saved / self.params_before if self.params_before else 0.0
        lines = [
            f"{self.model}: {len(self.converted)} run(s) converted, {len(self.skipped)} skipped; "
            f"parameters {self.params_before:,} -> {self.params_after:,} (-{pct:.1f}%)"
        ]
        if self.runs:
            rows = [("run", "k", "block", "input", "shuffle", "params", "status")]
            for r in self.runs:
                span = _span(list(r.blocks))
                shape = "x".join(map(str, r.input_shape)) if r.input_shape else "-"
                params = f"{r.params_before:,} -> {r.params_after:,}" if not r.skipped else f"{r.params_before:,}"
                status = f"skipped: {r.skipped}" if r.skipped else "converted" + (f" ({r.via})" if r.via else "")
                rows.append((span, str(r.n), r.block_type, shape, "yes" if r.shuffle else "no", params, status))
            widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
            for row in rows:
                lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
        notes = [f"{r.blocks[0]}: {r.note}" for r in self.runs if r.note] + self.notes
        lines += [f"  note: {n}" for n in notes]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Structure of a module
# --------------------------------------------------------------------------------------------------

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_SCALARS = (bool, int, float, complex, str, bytes, type(None))


def _canon(value: object, depth: int = 0) -> object:
    """A hashable stand-in for a module setting, equal for equal settings."""
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, (torch.dtype, torch.device, enum.Enum)):
        return str(value)
    if isinstance(value, Tensor):
        return ("tensor", tuple(value.shape), str(value.dtype))
    if depth > 4:
        return ("object", type(value).__qualname__)
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(_canon(v, depth + 1) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((repr(k), _canon(v, depth + 1)) for k, v in value.items())))
    if isinstance(value, (set, frozenset)):
        return ("set", tuple(sorted(repr(_canon(v, depth + 1)) for v in value)))
    if isinstance(value, type):
        return ("type", value.__module__, value.__qualname__)
    if isinstance(value, functools.partial):
        return ("partial", _canon(value.func, depth + 1), _canon(value.args, depth + 1), _canon(value.keywords))
    if callable(value):
        return ("callable", getattr(value, "__module__", None), getattr(value, "__qualname__", type(value).__name__))
    return ("object", type(value).__module__, type(value).__qualname__)


def _settings(module: nn.Module) -> tuple:
    """The module's own hyperparameters: public non-module attributes and ``extra_repr``."""
    items = tuple((k, _canon(v)) for k, v in sorted(vars(module).items()) if not k.startswith("_") and k != "training")
    try:
        extra = _ADDRESS.sub("", module.extra_repr())
    except Exception:  # a broken extra_repr must not stop the pass
        extra = ""
    return items, extra


# Weightless modules that are the identity in eval mode: a block with rate 0 often holds nn.Identity instead.
_DROP_NAMES = frozenset({"DropPath", "StochasticDepth", "DropBlock2d", "DropBlock"})


def _kind(module: nn.Module) -> object:
    """The class of a weightless module for comparing structures; dropout-like classes and Identity are one."""
    if isinstance(module, (nn.Identity, nn.modules.dropout._DropoutNd)) or any(
        c.__name__ in _DROP_NAMES for c in type(module).__mro__
    ):
        return "drop"
    return type(module)


class _Structure:
    """Structure keys of modules, interned to ints so that comparing two blocks is one int comparison.

    The key of a module covers its class, settings, parameter and buffer shapes and its children's keys.
    A subtree without parameters or buffers is *weightless*: its key keeps only its classes (dropout-like
    ones and ``nn.Identity`` counted as one), not its settings, so blocks that differ only in drop-path
    rates count as the same structure (those modules are then kept per use).
    """

    def __init__(self) -> None:
        self._ids: dict[tuple, int] = {}
        self._memo: dict[int, int] = {}
        self._full: dict[int, int] = {}
        self._light: dict[int, bool] = {}

    def key(self, module: nn.Module) -> int:
        kid = self._memo.get(id(module))
        if kid is None:
            children = tuple((n, self.key(c)) for n, c in module._modules.items() if c is not None)
            if self.weightless(module):
                kid = self._intern(("weightless", _kind(module), children))
            else:
                params = tuple(
                    (n, None if p is None else (tuple(p.shape), p.dtype, p.requires_grad))
                    for n, p in module._parameters.items()
                )
                buffers = tuple(
                    (n, None if b is None else (tuple(b.shape), b.dtype)) for n, b in module._buffers.items()
                )
                kid = self._intern((type(module), _settings(module), params, buffers, children))
            self._memo[id(module)] = kid
        return kid

    def full_key(self, module: nn.Module) -> int:
        """Like :meth:`key` but weightless subtrees are compared in full (classes and settings)."""
        kid = self._full.get(id(module))
        if kid is None:
            children = tuple((n, self.full_key(c)) for n, c in module._modules.items() if c is not None)
            kid = self._intern(("full", type(module), _settings(module), children))
            self._full[id(module)] = kid
        return kid

    def weightless(self, module: nn.Module) -> bool:
        """No parameter and no buffer in the whole subtree."""
        light = self._light.get(id(module))
        if light is None:
            own = any(t is not None for t in (*module._parameters.values(), *module._buffers.values()))
            light = not own and all(self.weightless(c) for c in module._modules.values() if c is not None)
            self._light[id(module)] = light
        return light

    def _intern(self, key: tuple) -> int:
        return self._ids.setdefault(key, len(self._ids))


def _weightless(module: nn.Module) -> bool:
    return next(module.parameters(), None) is None and next(module.buffers(), None) is None


class _KeepPerUse:
    """Per-use rule of a converted run: the ``per_use`` option, plus the weightless modules of the given
    classes (drop-path, stochastic depth: modules whose settings differ from block to block).

    A plain class rather than a lambda so that a converted model pickles.

    Example:
        >>> from torchvision.ops import StochasticDepth
        >>> rule = _KeepPerUse("batchnorm", (StochasticDepth,))
        >>> rule(StochasticDepth(0.1, "row")), rule(nn.BatchNorm2d(4)), rule(nn.Conv2d(4, 4, 1))
        (True, True, False)
    """

    def __init__(self, base: PerUse, classes: tuple[type[nn.Module], ...]) -> None:
        self.base = base
        self.classes = classes
        base_name = base if isinstance(base, str) else getattr(base, "__name__", "custom")
        self.__name__ = "+".join([base_name, *(c.__name__ for c in classes)])

    def __call__(self, module: nn.Module) -> bool:
        if isinstance(module, self.classes) and _weightless(module):
            return True
        return _per_use_predicate(self.base)(module)


# --------------------------------------------------------------------------------------------------
# Tracing
# --------------------------------------------------------------------------------------------------


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
_THIS_FILE = os.path.abspath(__file__)


def _failing_line(err: BaseException) -> str:
    """The innermost line of model code (not torch, not this file) in the traceback."""
    for frame in reversed(traceback.extract_tb(err.__traceback__)):
        name = os.path.abspath(frame.filename)
        if not name.startswith(_TORCH_DIR) and name != _THIS_FILE:
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


# --------------------------------------------------------------------------------------------------
# Shapes on an example input
# --------------------------------------------------------------------------------------------------

_Shape = tuple[int, ...] | None


def _default_inputs(model: nn.Module) -> tuple[Tensor, ...]:
    """An example input from timm's ``pretrained_cfg`` or the first convolution's ``in_channels``."""
    like = next(model.parameters(), None)
    dtype = like.dtype if like is not None and like.is_floating_point() else torch.float32
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and isinstance(cfg.get("input_size"), (tuple, list)):
        return (torch.zeros(1, *cfg["input_size"], dtype=dtype, device="meta"),)
    sizes = {nn.Conv1d: (224,), nn.Conv2d: (224, 224), nn.Conv3d: (16, 112, 112)}
    for m in model.modules():
        for conv, size in sizes.items():
            if isinstance(m, conv):
                return (torch.zeros(1, m.in_channels, *size, dtype=dtype, device="meta"),)
    raise ReuseError(
        f"convert: cannot guess an input for {type(model).__name__} (no convolution, no timm pretrained_cfg); "
        "pass example_inputs=torch.randn(1, C, H, W) (or a tuple of the forward's tensors)"
    )


def _shape(x: object) -> _Shape:
    return tuple(x.shape) if isinstance(x, Tensor) else None


@contextlib.contextmanager
def _swapped_tensors(model: nn.Module, make: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Within the context, every parameter and buffer of ``model`` is replaced by ``make(tensor)``; on exit the
    very same tensor objects are put back, whatever happened.

    Swapped in each module's own registries, once per module object: a module or tensor reachable by several
    paths (a :class:`~reuse.LayerReuse`'s shared conv, tied weights) gets one replacement, seen through every
    path, and is restored once. (``torch.func.functional_call`` keys tensors by name and did not restore a
    tensor reached by two names: it left meta tensors in the model.)
    """
    replacement: dict[int, Tensor] = {}
    saved: list[tuple[dict, str, Tensor]] = []
    try:
        for module in {id(m): m for m in model.modules()}.values():
            for registry in (module._parameters, module._buffers):
                for name, t in list(registry.items()):
                    if t is None:
                        continue
                    new = replacement.get(id(t))
                    if new is None:
                        new = make(t)
                        if new is not t and isinstance(t, nn.Parameter):
                            new = nn.Parameter(new, requires_grad=t.requires_grad)
                        replacement[id(t)] = new
                    saved.append((registry, name, t))
                    registry[name] = new
        yield
    finally:
        for registry, name, t in reversed(saved):
            registry[name] = t


def _record_shapes(
    model: nn.Module, inputs: tuple, modules: Iterable[nn.Module]
) -> dict[int, list[tuple[_Shape, _Shape]]]:
    """Input and output shape of each call of ``modules`` in one forward pass of ``model``.

    The pass runs in eval mode (any batch size goes) on the ``meta`` device: parameters and buffers are
    swapped for meta tensors (:func:`_swapped_tensors`), so no arithmetic is done. A model that cannot run
    on meta runs for real, under ``no_grad`` and on copies of the buffers. The tensors, hooks and modes are
    put back as they were: nothing of the model is changed.
    """
    records: dict[int, list[tuple[_Shape, _Shape]]] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict, out: object) -> None:
        x = args[0] if len(args) == 1 and not kwargs else None
        records.setdefault(id(module), []).append((_shape(x), _shape(out)))

    handles = []
    for m in modules:
        try:
            handles.append(m.register_forward_hook(hook, with_kwargs=True))
        except Exception:  # a module that takes no hooks (TorchScript) is simply not measured
            pass
    modes = [(m, m.training) for m in model.modules()]
    for m, _ in modes:  # eval mode, set directly: a custom train() may do more than set the flag
        m.training = False
    try:
        try:
            meta = tuple(torch.empty_like(x, device="meta") if isinstance(x, Tensor) else x for x in inputs)
            with torch.no_grad(), _swapped_tensors(model, lambda t: torch.empty_like(t, device="meta")):
                model(*meta)
        except Exception:
            records.clear()
            device = _device_of(model)
            real = tuple(
                torch.zeros_like(x, device=device) if isinstance(x, Tensor) and x.is_meta else x for x in inputs
            )
            try:
                with torch.no_grad(), _swapped_buffers(model):
                    model(*real)
            except Exception as err:
                shapes = [tuple(x.shape) for x in inputs if isinstance(x, Tensor)]
                raise ReuseError(
                    f"convert: {type(model).__name__} fails on the example input of shape(s) {shapes}: "
                    f"{type(err).__name__}: {str(err).strip()[:300]}; pass example_inputs= with an input it accepts"
                ) from None
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training
    return records


@contextlib.contextmanager
def _swapped_buffers(model: nn.Module) -> Iterator[None]:
    """Buffers replaced by clones (parameters left alone) within the context: a real forward changes nothing."""
    buffers = {id(b) for b in model.buffers()}
    with _swapped_tensors(model, lambda t: t.clone() if id(t) in buffers else t):
        yield


def _device_of(model: nn.Module) -> torch.device:
    t = next(model.parameters(), None)
    if t is None:
        t = next(model.buffers(), None)
    return t.device if t is not None and not t.is_meta else torch.device("cpu")


# --------------------------------------------------------------------------------------------------
# Finding the runs
# --------------------------------------------------------------------------------------------------


@dataclass
class _Options:
    min_run: int
    shuffle: bool
    groups: int
    init: str
    per_use: PerUse
    leaf_types: tuple[type, ...]
    leaf_paths: frozenset[str]
    example_inputs: tuple | None


@dataclass
class _Found:
    """A run plus what it takes to convert it."""

    run: Run
    modules: list[nn.Module]  # every module of the run, in call order
    units: list[nn.Module]  # its blocks: the modules themselves, or nn.Sequential wrappers of ``period`` modules
    rule: PerUse = "batchnorm"  # the per_use of its LayerReuse


MAX_PERIOD = 4  # most modules in one block made of consecutive modules (VGG: conv, BN, ReLU)


class _Planner:
    """Finds the runs of one model (without changing it)."""

    def __init__(self, model: nn.Module, opts: _Options) -> None:
        self.model = model
        self.opts = opts
        self.struct = _Structure()
        named = list(model.named_modules(remove_duplicate=False))
        seen = Counter(id(m) for _, m in named)
        self.path: dict[int, str] = {}
        self.by_path: dict[str, nn.Module] = {}
        self.parent: dict[int, tuple[nn.Module, str]] = {}
        for name, m in model.named_modules():
            self.path[id(m)] = name
            self.by_path[name] = m
            for child_name, child in m.named_children():
                self.parent.setdefault(id(child), (m, child_name))
        self.shared = {i for i, count in seen.items() if count > 1}  # reachable by several paths
        self.candidates = self._candidates()
        self.leaf_ids: set[int] = set()
        for leaf in opts.leaf_paths:
            if leaf not in self.by_path:
                raise ReuseError(
                    f"convert: leaf_modules names '{leaf}', which is not a submodule of {type(model).__name__}; "
                    "give qualified names as in model.named_modules(), or module classes"
                )
            self.leaf_ids.add(id(self.by_path[leaf]))
        self.leaves: set[int] = set()
        self.param_paths: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            self.param_paths.setdefault(id(p), []).append(name)

    def _candidates(self) -> dict[int, nn.Module]:
        """Modules with weights, reachable by one path, with a sibling of the same structure."""
        out: dict[int, nn.Module] = {}
        for m in self.by_path.values():
            groups: dict[int, list[nn.Module]] = {}
            for child in m.children():
                if id(child) in self.shared or isinstance(child, LayerReuse):
                    continue
                if not self.struct.weightless(child):
                    groups.setdefault(self.struct.key(child), []).append(child)
            for group in groups.values():
                if len(group) > 1:
                    out.update((id(c), c) for c in group)
        return out

    def plan(self) -> tuple[list[_Found], list[str]]:
        """The runs and model-level notes; ``self.leaves`` ends as the leaves of the final trace."""
        if not self.candidates:
            return [], ["no run: no module has a sibling of the same structure"]
        inputs = self.opts.example_inputs or _default_inputs(self.model)
        self.shapes = _record_shapes(self.model, inputs, [m for p, m in self.by_path.items() if p])
        active = set(self.candidates)
        opened: list[_Found] = []
        inside = {i: self._has_candidate_below(m) for i, m in self.candidates.items()}
        while True:
            tracer = self._tracer(active)
            graph = _trace(self.model, tracer, "model", len(inputs))
            found, notes = self._runs(graph, tracer)
            in_runs = {id(m) for f in found if not f.run.skipped for m in f.modules}
            called = {id(self.by_path[n.target]) for n in graph.nodes if n.op == "call_module"}
            to_open = {i for i in active & called if inside[i] and i not in in_runs}
            if not to_open:
                break
            for f in found:  # keep the explanation of a skipped outer run whose blocks we now look into
                if f.run.skipped and any(id(m) in to_open for m in f.modules):
                    f.run.skipped += " (looked for runs inside its blocks instead)"
                    opened.append(f)
            active -= to_open
        self.leaves = active | self.leaf_ids
        if not found:
            notes.insert(0, "no run: no two same-structure blocks are called one after the other")
        return opened + found, notes

    def leaf_paths(self) -> list[str]:
        """Qualified names of the modules kept whole in the final trace."""
        return [self.path[i] for i in self.leaves]

    def _has_candidate_below(self, module: nn.Module) -> bool:
        return any(id(m) in self.candidates for m in module.modules() if m is not module)

    def _tracer(self, active: set[int]) -> _Tracer:
        return _Tracer(active | self.leaf_ids, self.opts.leaf_types)

    def _runs(self, graph: fx.Graph, tracer: _Tracer) -> tuple[list[_Found], list[str]]:
        """Chains of sibling modules, each call fed only by the previous one, cut into runs."""
        calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
        attrs = [n.target for n in graph.nodes if n.op == "get_attr"]
        nxt: dict[fx.Node, fx.Node] = {}
        notes: list[str] = []
        for n in graph.nodes:
            m = self._called(n)
            if m is None or len(n.args) != 1 or n.kwargs or not isinstance(n.args[0], fx.Node):
                continue
            p = n.args[0]
            pm = self._called(p)
            if pm is None or self.parent[id(pm)][0] is not self.parent[id(m)][0]:
                continue
            if len(p.users) != 1:
                if id(pm) in self.candidates and self.struct.key(pm) == self.struct.key(m):
                    others = ", ".join(sorted(u.name for u in p.users if u is not n))
                    notes.append(
                        f"{p.target} -> {n.target}: same structure, but {p.target}'s output also feeds {others}, "
                        "so they cannot become one reused block"
                    )
                continue
            nxt[p] = n
        fed = set(nxt.values())
        found = []
        for start in [n for n in nxt if n not in fed]:
            chain = [start]
            while chain[-1] in nxt:
                chain.append(nxt[chain[-1]])
            for period, units in self._periodic(chain):
                found += self._segments(units, period, calls, attrs, tracer)
        return found, notes

    def _called(self, node: fx.Node) -> nn.Module | None:
        """The module a call_module node calls, if it may belong to a run (one path, not a LayerReuse)."""
        if node.op != "call_module":
            return None
        m = self.by_path.get(node.target)
        return None if m is None or id(m) in self.shared or isinstance(m, LayerReuse) else m

    def _periodic(self, chain: list[fx.Node]) -> list[tuple[int, list[list[fx.Node]]]]:
        """Cut a chain of sibling calls into repeats of one block: ``p`` consecutive modules (``p = 1``: a
        block module, such as a ResNet bottleneck; ``p > 1``: VGG's conv, ReLU or Swin's alternating
        blocks) whose structures repeat. From left to right, the period covering most modules wins, the
        smaller one on a tie; a block starts with a module that has weights and is not a norm (conv, BN, ReLU
        rather than BN, ReLU, conv)."""
        mods = [self.by_path[n.target] for n in chain]
        keys = [self.struct.key(m) for m in mods]
        starts = [not self.struct.weightless(m) and not is_norm(m) for m in mods]
        out = []
        i = 0
        while i < len(chain):
            best = (1, 0)  # (period, repeats)
            for p in range(1, MAX_PERIOD + 1):
                if not starts[i]:
                    break
                r = 1
                while i + (r + 1) * p <= len(chain) and keys[i + r * p : i + (r + 1) * p] == keys[i : i + p]:
                    r += 1
                if r >= 2 and r * p > best[0] * best[1]:
                    best = (p, r)
            p, r = best
            if r >= 2:
                out.append((p, [chain[i + u * p : i + (u + 1) * p] for u in range(r)]))
                i += p * r
            else:
                i += 1
        return out

    def _segments(
        self, units: list[list[fx.Node]], period: int, calls: Counter, attrs: list[str], tracer: _Tracer
    ) -> list[_Found]:
        """Split repeats at the blocks that cannot be reused (shape change, several calls) and check the rest."""
        segments: list[list[list[fx.Node]]] = [[]]
        left_out: list[str] = []
        for unit in units:
            why = self._unit_problem(unit, calls)
            if why:
                left_out.append(f"{_span([n.target for n in unit])} left out: {why}")
                segments.append([])
            else:
                segments[-1].append(unit)
        out = [self._found(seg, period, "; ".join(left_out), attrs, tracer) for seg in segments if seg]
        if not out:  # every block was left out: report the repeats themselves
            found = self._found(units, period, "", attrs, tracer, check=False)
            found.run.skipped = "; ".join(left_out)
            out.append(found)
        return out

    def _found(
        self,
        units: list[list[fx.Node]],
        period: int,
        note: str,
        attrs: list[str],
        tracer: _Tracer,
        check: bool = True,
    ) -> _Found:
        mods = [self.by_path[n.target] for unit in units for n in unit]
        if period == 1:
            blocks = mods
        else:  # a block of several modules becomes an nn.Sequential of them (the modules are not changed)
            blocks = [nn.Sequential(*mods[u * period : (u + 1) * period]) for u in range(len(units))]
        run = Run(
            blocks=tuple(n.target for unit in units for n in unit),
            block_type="+".join(type(m).__name__ for m in mods[:period]),
            input_shape=self.shapes[id(mods[0])][0][0] if self.shapes.get(id(mods[0])) else None,
            note=note,
            period=period,
            params_before=_count(mods),
        )
        found = _Found(run, mods, blocks, self._rule(blocks))
        if check:
            run.skipped = self._run_problem(found, attrs, tracer)
            if not run.skipped:
                self._settle(found)
        return found

    def _unit_problem(self, unit: list[fx.Node], calls: Counter) -> str:
        for n in unit:
            if calls[n.target] > 1:
                return f"{n.target} is called {calls[n.target]} times in the forward (already shared)"
            recs = self.shapes.get(id(self.by_path[n.target]), [])
            if len(recs) != 1:
                return f"called {len(recs)} times on the example input" if recs else "not called on the example input"
        x, y = self.shapes[id(self.by_path[unit[0].target])][0][0], self.shapes[id(self.by_path[unit[-1].target])][0][1]
        if x is None or y is None:
            return "does not map one tensor to one tensor"
        if x != y:
            return f"changes the shape {x} -> {y}"
        return ""

    def _run_problem(self, found: _Found, attrs: list[str], tracer: _Tracer) -> str:
        run, mods = found.run, found.modules
        if run.n < self.opts.min_run:
            return f"{run.n} block(s) in a row, fewer than min_run={self.opts.min_run}"
        prefixes = tuple(b + "." for b in run.blocks)
        read = [a for a in attrs if a.startswith(prefixes)]
        if read:
            return f"the forward reads {read[0]} directly, a tensor inside a block"
        inside = {id(p) for m in mods for p in m.parameters()}
        for pid in inside:
            outside = [q for q in self.param_paths[pid] if not q.startswith(prefixes)]
            if outside:
                return f"a block's parameter is tied to {outside[0]}, outside the run"
        for m in mods:
            for sub_name, sub in m.named_modules():
                if sub._forward_hooks or sub._forward_pre_hooks or sub._backward_hooks:
                    name = f"{self.path[id(m)]}.{sub_name}".rstrip(".")
                    return f"{name} has hooks; register them after converting"
        owners = {c for b in run.blocks for c in tracer.callers.get(b, [])}
        if len(owners) != 1:
            return f"its blocks are called from different modules ({', '.join(sorted(owners))})"
        run.owner = owners.pop()
        if _shared_count(found.units[0], found.rule) == 0:
            return "nothing to share: every parameter is per use"
        return ""

    def _rule(self, blocks: list[nn.Module]) -> PerUse:
        """The per-use rule of a run: the option, plus its weightless modules that differ between blocks."""
        classes = self._per_use_classes(blocks)
        return _KeepPerUse(self.opts.per_use, classes) if classes else self.opts.per_use

    def _per_use_classes(self, blocks: list[nn.Module]) -> tuple[type[nn.Module], ...]:
        """Classes of block 0's weightless submodules that differ (class or settings) in another block."""
        classes: list[type[nn.Module]] = []
        first = blocks[0]
        for name, sub in first.named_modules():
            if not name or not self.struct.weightless(sub):
                continue
            parent = first.get_submodule(name.rpartition(".")[0])
            if parent is not first and self.struct.weightless(parent):
                continue  # inside a larger weightless subtree
            if any(self.struct.full_key(o.get_submodule(name)) != self.struct.full_key(sub) for o in blocks[1:]):
                if type(sub) not in classes:
                    classes.append(type(sub))
        return tuple(classes)

    def _settle(self, found: _Found) -> None:
        """Decide shuffle, per-use classes, how the run is swapped in, and the parameter counts."""
        run, mods, block = found.run, found.modules, found.units[0]
        run.per_use = tuple(c.__name__ for c in getattr(found.rule, "classes", ()))
        run.shuffle, why = _shuffle_choice(self.opts.shuffle, self.opts.groups, run.input_shape, block)
        if why:
            run.note = "; ".join(filter(None, [why, run.note]))
        owner = self.by_path[run.owner]
        names = [self.parent[id(m)][1] for m in mods]
        keys = list(owner._modules)
        in_owner = all(self.parent[id(m)][0] is owner for m in mods)
        consecutive = in_owner and keys[keys.index(names[0]) : keys.index(names[0]) + len(names)] == names
        run.via = "sequential" if type(owner).forward is nn.Sequential.forward and consecutive else "graph"
        per_use = _count([block], _per_use_predicate(found.rule))
        run.params_after = _shared_count(block, found.rule) + run.n * per_use


def _span(names: list[str]) -> str:
    """``a.1 .. 3`` for a.1, a.2, a.3."""
    return names[0] if len(names) == 1 else f"{names[0]} .. {names[-1].rpartition('.')[2]}"


def _count(mods: Iterable[nn.Module], keep: Callable[[nn.Module], bool] | None = None) -> int:
    """Parameters of ``mods`` counted once; with ``keep``, only those inside modules it selects."""
    seen: set[int] = set()
    total = 0
    for mod in mods:
        for m in mod.modules() if keep is None else _selected(mod, keep):
            for p in m.parameters(recurse=keep is not None):
                if id(p) not in seen:
                    seen.add(id(p))
                    total += p.numel()
    return total


def _selected(module: nn.Module, keep: Callable[[nn.Module], bool]) -> list[nn.Module]:
    if keep(module):
        return [module]
    return [m for child in module.children() for m in _selected(child, keep)]


def _shared_count(block: nn.Module, rule: PerUse) -> int:
    return _count([block]) - _count([block], _per_use_predicate(rule))


def _shuffle_choice(requested: bool, groups: int, shape: _Shape, block: nn.Module) -> tuple[bool, str]:
    """Shuffle as the paper does, when dim 1 of a 4-D input is the channels a convolution reads."""
    if not requested:
        return False, ""
    if shape is None or len(shape) != 4:
        return False, f"no shuffle: input shape {shape} is not (B, C, H, W)"
    channels = shape[1]
    convs = [m for m in block.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    if not any(c.in_channels == channels for c in convs):
        return False, f"no shuffle: no convolution of the block reads dim 1 ({channels}) as its channels"
    try:
        check_shuffle(channels, groups, True)
    except ReuseError as err:
        return False, f"no shuffle: {err}"
    return True, ""


# --------------------------------------------------------------------------------------------------
# Converting
# --------------------------------------------------------------------------------------------------


def _build(found: _Found, opts: _Options) -> LayerReuse:
    run, blocks = found.run, found.units
    lr = LayerReuse.from_blocks(blocks, shuffle=run.shuffle, groups=opts.groups, per_use=found.rule)
    lr.training = found.modules[0].training
    if opts.init == "mean":
        sources = [dict(m.named_parameters(remove_duplicate=False)) for m in blocks]
        params = dict(lr.uses[0].named_parameters(remove_duplicate=False))
        with torch.no_grad():
            for name in lr.shared_names():
                if name in params and params[name].is_floating_point():
                    # in float64: the mean of k equal tensors is then exactly that tensor
                    params[name].copy_(torch.stack([s[name].double() for s in sources]).mean(0))
    return lr


def _swap_in_sequential(model: nn.Module, run: Run, lr: LayerReuse) -> None:
    """Put ``lr`` where the run's first block is in its nn.Sequential, and drop the other blocks."""
    owner = model.get_submodule(run.owner)
    names = [b.rpartition(".")[2] for b in run.blocks]
    rebuilt = [(k, lr if k == names[0] else v) for k, v in owner._modules.items() if k not in names[1:]]
    owner._modules.clear()
    owner._modules.update(rebuilt)


def _swap_in_graph(
    model: nn.Module, owner_path: str, founds: list[_Found], lrs: list[LayerReuse], planner: _Planner
) -> tuple[nn.Module, dict[int, str]]:
    """Trace the owner alone, replace each run's calls by one call of its LayerReuse, and put a GraphModule
    of the result where the owner was. Returns the (possibly new) model and why runs failed, by run id."""
    owner = model.get_submodule(owner_path)
    leaves = set()
    for path in planner.leaf_paths():  # the same leaves as when the runs were found, in ``model``
        try:
            leaves.add(id(model.get_submodule(path)))
        except AttributeError:  # swapped out of an nn.Sequential already
            pass
    tracer = _Tracer(leaves, planner.opts.leaf_types)
    try:
        graph = tracer.trace(owner)
    except Exception as err:
        why = f"{owner_path or 'the model'} cannot be traced alone ({type(err).__name__}: {err})"
        return model, {id(f): why for f in founds}
    nodes = {n.target: n for n in graph.nodes if n.op == "call_module"}
    prefix = owner_path + "." if owner_path else ""
    failed = {}
    for f, lr in zip(founds, lrs):
        rel = [b[len(prefix) :] for b in f.run.blocks]
        chain = [nodes.get(r) for r in rel]
        linked = all(n is not None for n in chain) and all(
            b.args == (a,) and not b.kwargs and len(a.users) == 1 for a, b in zip(chain, chain[1:])
        )
        if not linked:
            failed[id(f)] = f"traced alone, {owner_path or 'the model'} does not call the blocks as a chain"
            continue
        with graph.inserting_after(chain[-1]):
            new = graph.call_module(rel[0], args=chain[0].args)
        chain[-1].replace_all_uses_with(new)
        for n in reversed(chain):
            graph.erase_node(n)
        parent_path, _, name = rel[0].rpartition(".")
        setattr(owner.get_submodule(parent_path), name, lr)
    if len(failed) == len(founds):
        return model, failed
    gm = fx.GraphModule(owner, graph)
    gm.training = owner.training
    if not owner_path:
        return gm, failed
    parent_path, _, name = owner_path.rpartition(".")
    setattr(model.get_submodule(parent_path), name, gm)
    return model, failed


def _copy(model: nn.Module, dropped: list[nn.Module]) -> nn.Module:
    """A deep copy of ``model`` but for ``dropped`` (blocks about to be swapped out: copying them is wasted)."""
    try:
        return copy.deepcopy(model, {id(m): None for m in dropped})
    except Exception as err:
        raise ReuseError(
            f"convert: cannot deep-copy {type(model).__name__} ({type(err).__name__}: {err}); "
            "pass inplace=True to convert the model itself"
        ) from None


def _convert_banked(
    model: nn.Module, level: str, bank_size: int | float | None, mode: str, inplace: bool, before: int, report: bool
) -> nn.Module | tuple[nn.Module, ConversionReport]:
    """``convert(level="filter"|"kernel")``: every compatible conv draws its weight from a shared bank."""
    grain = {"filter": filter_reuse, "kernel": kernel_reuse}[level]
    work = grain(model, bank_size, mode, inplace=inplace)  # type: ignore[arg-type]
    banked = [m for m in work.modules() if isinstance(m, (FilterReuseConv2d, KernelReuseConv2d))]
    banks = {id(m.bank) for m in banked}
    rep = ConversionReport(
        model=type(model).__name__,
        params_before=before,
        params_after=_count([work]),
        notes=[f"level={level!r}: {len(banked)} conv(s) draw their weights from {len(banks)} shared bank(s)"],
        options=dict(level=level, bank_size=bank_size, mode=mode),
    )
    work.reuse_report = rep
    return (work, rep) if report else work


def _options(
    min_run: object,
    shuffle: object,
    groups: object,
    init: object,
    per_use: object,
    leaf_modules: object,
    example_inputs: object,
    level: object = "layer",
) -> _Options:
    if level not in _LEVELS:
        raise ReuseError(
            f"convert: level must be 'layer' (whole blocks), 'filter' or 'kernel' (shared banks), got {level!r}"
        )
    check_bool(shuffle, "shuffle", "convert")
    if isinstance(min_run, bool) or not isinstance(min_run, int) or min_run < 2:
        raise ReuseError(f"convert: min_run must be an int >= 2 (blocks in a run), got {min_run!r}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ReuseError(f"convert: groups must be a positive int (the channel shuffle's groups), got {groups!r}")
    if init not in _INITS:
        raise ReuseError(f"convert: init must be 'first' or 'mean', got {init!r}")
    try:
        _per_use_predicate(per_use)  # type: ignore[arg-type]
    except ReuseError as err:
        raise ReuseError(f"convert: {err}") from None
    leaf_types, leaf_paths = [], []
    for leaf in leaf_modules if isinstance(leaf_modules, (list, tuple, set, frozenset)) else [leaf_modules]:
        if isinstance(leaf, type) and issubclass(leaf, nn.Module):
            leaf_types.append(leaf)
        elif isinstance(leaf, str):
            leaf_paths.append(leaf)
        else:
            raise ReuseError(
                f"convert: leaf_modules holds {leaf!r}; give module classes (nn.Module subclasses) or qualified names"
            )
    if isinstance(example_inputs, Tensor):
        example_inputs = (example_inputs,)
    elif example_inputs is not None and not isinstance(example_inputs, tuple):
        raise ReuseError(
            "convert: example_inputs must be a tensor or a tuple of forward arguments, "
            f"got {type(example_inputs).__name__}"
        )
    return _Options(
        min_run,
        shuffle,  # type: ignore[arg-type]
        groups,
        init,
        per_use,
        tuple(leaf_types),
        frozenset(leaf_paths),
        example_inputs,  # type: ignore[arg-type]
    )


def _check_model(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise ReuseError(f"convert: needs an nn.Module, got {type(model).__name__}")
    lazy = [n for n, p in model.named_parameters() if isinstance(p, nn.parameter.UninitializedParameter)]
    if lazy:
        raise ReuseError(
            f"convert: {type(model).__name__} has uninitialized lazy parameters ({lazy[0]}, ...); "
            "run one forward pass first so that their shapes are known"
        )


def _plan(model: nn.Module, opts: _Options) -> tuple[_Planner, list[_Found], list[str]]:
    _check_model(model)
    planner = _Planner(model, opts)
    found, notes = planner.plan()
    reused = [p or "the model" for p, m in planner.by_path.items() if isinstance(m, LayerReuse)]
    if reused:  # outermost ones only: a LayerReuse is never entered
        outer = [p for p in reused if not any(p.startswith(q + ".") for q in reused if q != p)]
        notes.append(
            f"kept {len(outer)} LayerReuse module(s) as they are, already reused ({_span_list(outer)}): "
            "convert neither enters nor re-converts them"
        )
    return planner, found, notes


def _span_list(names: list[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def find_runs(
    model: nn.Module,
    *,
    min_run: int = 2,
    shuffle: bool = True,
    groups: int = 2,
    per_use: PerUse = "batchnorm",
    leaf_modules: Iterable[type[nn.Module] | str] = (),
    example_inputs: Tensor | tuple | None = None,
) -> list[Run]:
    """The runs :func:`convert` would convert or skip, with the same options; ``model`` is not changed.

    Example:
        >>> import torchvision
        >>> runs = find_runs(torchvision.models.resnet34())
        >>> [(r.blocks[0], r.n, r.skipped) for r in runs]
        [('layer1.0', 3, ''), ('layer2.1', 3, ''), ('layer3.1', 5, ''), ('layer4.1', 2, '')]
    """
    opts = _options(min_run, shuffle, groups, "first", per_use, leaf_modules, example_inputs)
    _, found, _ = _plan(model, opts)
    return [f.run for f in found]


def convert(
    model: nn.Module,
    *,
    min_run: int = 2,
    shuffle: bool = True,
    groups: int = 2,
    init: str = "first",
    leaf_modules: Iterable[type[nn.Module] | str] = (),
    inplace: bool = False,
    level: str = "layer",
    per_use: PerUse = "batchnorm",
    example_inputs: Tensor | tuple | None = None,
    report: bool = False,
    bank_size: int | float | None | _Default = _DEFAULT,
    mode: str = "index",
) -> nn.Module | tuple[nn.Module, ConversionReport]:
    """Replace each run of same-structure stacked blocks in ``model`` by one reused block.

    A run of ``k`` blocks becomes ``LayerReuse.from_blocks(blocks)``: one set of shared weights used
    ``k`` times, with use ``i``'s BatchNorm (weights and running statistics) and drop-path copied from
    block ``i``, so a pretrained network keeps its statistics. See the module docstring for how runs
    are found; :func:`find_runs` lists them without converting.

    Args:
        model: any network; not changed unless ``inplace=True``.
        min_run: fewest blocks in a run worth converting (at least 2).
        shuffle: the paper's channel shuffle between uses, where the channels allow it (a 4-D input whose
            dim 1 a convolution reads as channels, divisible by ``groups`` and even); other runs are
            converted without shuffle and the report says why.
        groups: groups of the shuffle.
        init: shared weights from the ``"first"`` block of each run or the ``"mean"`` of its blocks.
        leaf_modules: module classes or qualified names that tracing must not enter (for code FX cannot trace).
        inplace: convert ``model`` itself instead of a deep copy.
        level: grain of reuse: ``"layer"`` (runs of whole blocks, the default), ``"filter"`` or ``"kernel"``
            (every compatible conv draws its filters or kernels from a bank shared by all convs of its shape:
            :func:`reuse.filter_reuse`, :func:`reuse.kernel_reuse`; ``bank_size`` and ``mode`` go to them).
        per_use: which modules each use gets its own copy of (see :data:`reuse.layer.PerUse`); weightless
            modules whose settings differ between blocks (drop-path rates) are always kept per use.
        example_inputs: input(s) of ``forward`` used to read the shapes (on the meta device, no arithmetic);
            by default ``(1, C, 224, 224)`` from timm's ``pretrained_cfg`` or the first convolution.
        report: also return the :class:`ConversionReport`.
        bank_size: with ``level="filter"|"kernel"``: entries per bank (int), a fraction of what the bank
            replaces (float in (0, 1]; by default 0.5, which stores about half the weights), or None (as many
            entries as replaced: the model computes exactly what it did, but does not get smaller; kernel
            reuse at full size even grows it by one scale per kernel).
        mode: with ``level="filter"|"kernel"``: ``"index"`` or ``"mix"``.

    Returns:
        The converted model, with the report as its ``reuse_report`` attribute; ``(model, report)`` when
        ``report=True``. Runs in an ``nn.Sequential`` are swapped in place and the model keeps its class;
        a module whose own ``forward`` calls the blocks becomes a ``torch.fx.GraphModule``.

    Raises:
        ReuseError: bad options, a model FX cannot trace (with the module path, the failing line and the
            fix), or a model that fails on the example input.

    Example:
        >>> import torch, torchvision
        >>> net = torchvision.models.resnet34()
        >>> new, rep = convert(net, report=True)
        >>> [(r.path, r.n) for r in rep.converted]
        [('layer1.0', 3), ('layer2.1', 3), ('layer3.1', 5), ('layer4.1', 2)]
        >>> new.layer3[1]  # doctest: +ELLIPSIS
        LayerReuse(n=5, shuffle=ChannelShuffle(groups=2, swap_halves=True), per_use='batchnorm', block=BasicBlock(...
        >>> new(torch.randn(1, 3, 64, 64)).shape
        torch.Size([1, 1000])
        >>> # saved: k - 1 copies of two 3x3 convs (C x C) per run; BatchNorms stay one per use
        >>> rep.params_before - rep.params_after == 18 * (2 * 64**2 + 2 * 128**2 + 4 * 256**2 + 1 * 512**2)
        True
        >>> type(net.layer3[1]).__name__  # the model handed in is unchanged
        'BasicBlock'
    """
    opts = _options(min_run, shuffle, groups, init, per_use, leaf_modules, example_inputs, level)
    check_bools("convert", inplace=inplace, report=report)
    _check_model(model)
    params_before = _count([model])
    if level != "layer":
        size = _BANK_DEFAULT if isinstance(bank_size, _Default) else bank_size
        return _convert_banked(model, level, size, mode, inplace, params_before, report)
    if not isinstance(bank_size, _Default) or mode != "index":
        raise ReuseError(
            "convert: bank_size and mode choose the banks of level='filter' or 'kernel'; "
            f"level='layer' reuses whole blocks and takes neither (got bank_size={bank_size!r}, mode={mode!r})"
        )
    planner, found, notes = _plan(model, opts)  # reads the model, writes nothing
    todo = [f for f in found if not f.run.skipped]
    lrs = {}
    for f in todo:  # LayerReuse.from_blocks copies what it takes from the blocks
        try:
            lrs[id(f)] = _build(f, opts)
        except ReuseError as err:  # a run the planner accepted but LayerReuse refuses: skip it, say why
            f.run.skipped = f"LayerReuse refused the blocks: {err}"
    todo = [f for f in todo if id(f) in lrs]
    work = model if inplace else _copy(model, [m for f in todo if f.run.via == "sequential" for m in f.modules])
    for f in todo:
        if f.run.via == "sequential":
            _swap_in_sequential(work, f.run, lrs[id(f)])
    owners = sorted({f.run.owner for f in todo if f.run.via == "graph"}, key=lambda p: -p.count(".") - bool(p))
    graph_modules = []
    for owner in owners:
        fs = [f for f in todo if f.run.via == "graph" and f.run.owner == owner]
        work, failed = _swap_in_graph(work, owner, fs, [lrs[id(f)] for f in fs], planner)
        for f in fs:
            f.run.skipped = failed.get(id(f), "")
        if len(failed) < len(fs):
            graph_modules.append(owner)
            what = f"'{owner}'" if owner else f"the model ({type(model).__name__})"
            notes.append(
                f"{what} is now a torch.fx.GraphModule: its forward calls the blocks itself "
                "(not as an nn.Sequential), so its traced forward was rewritten"
            )
    rep = ConversionReport(
        model=type(model).__name__,
        runs=[f.run for f in found],
        params_before=params_before,
        params_after=_count([work]),
        notes=notes,
        graph_modules=graph_modules,
        options=dict(min_run=min_run, shuffle=shuffle, groups=groups, init=init, per_use=per_use, level=level),
    )
    work.reuse_report = rep
    return (work, rep) if report else work
