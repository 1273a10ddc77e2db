"""The structure of a module: when two blocks are the same block (:class:`Structure`), which of their
submodules are kept one per use (:class:`KeepPerUse`), and parameter counts that count a shared tensor once."""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from reuse._per_use import PerUse, per_use_predicate

__all__ = ["KeepPerUse", "Structure", "count_params", "shared_count"]

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


class Structure:
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


class KeepPerUse:
    """Per-use rule of a converted run: the ``per_use`` option, plus the weightless modules of the given
    classes (drop-path, stochastic depth: modules whose settings differ from block to block).

    A plain class rather than a lambda so that a converted model pickles.

    Example:
        >>> from torchvision.ops import StochasticDepth
        >>> rule = KeepPerUse("batchnorm", (StochasticDepth,))
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
        return per_use_predicate(self.base)(module)


def count_params(mods: Iterable[nn.Module], keep: Callable[[nn.Module], bool] | None = None) -> int:
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


def shared_count(block: nn.Module, rule: PerUse) -> int:
    """Parameters of ``block`` that the uses of a run share under ``rule``."""
    return count_params([block]) - count_params([block], per_use_predicate(rule))
