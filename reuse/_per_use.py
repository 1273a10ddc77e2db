"""Which submodules of a reused block get one copy per use (private; users import from ``reuse``): the
:data:`PerUse` rules and the normalisation layers they name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from torch import Tensor, nn

from reuse._errors import ReuseError

__all__ = ["PerUse", "is_any_module", "is_batchnorm", "is_norm", "per_use_predicate"]

PerUse = Literal["batchnorm", "norms", "all"] | Callable[[nn.Module], bool]
"""Which submodules get one copy per use: ``"batchnorm"`` (anything with running statistics),
``"norms"`` (BatchNorm plus GroupNorm, LayerNorm, InstanceNorm, RMSNorm), ``"all"`` (every module: nothing
is shared, the same depth built from new layers, the paper's Table 4 baseline), or a predicate."""

_OTHER_NORMS: tuple[type[nn.Module], ...] = (
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    nn.modules.instancenorm._InstanceNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def is_batchnorm(module: nn.Module) -> bool:
    """True for a module with running statistics: ``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, their subclasses
    (timm's ``BatchNormAct2d``) and look-alikes holding a ``running_mean`` buffer (``FrozenBatchNorm2d``).

    Example:
        >>> is_batchnorm(nn.BatchNorm2d(8)), is_batchnorm(nn.GroupNorm(2, 8))
        (True, False)
    """
    return isinstance(module, nn.modules.batchnorm._BatchNorm) or isinstance(
        getattr(module, "running_mean", None), Tensor
    )


def is_norm(module: nn.Module) -> bool:
    """True for any normalisation layer: :func:`is_batchnorm` or GroupNorm, LayerNorm, InstanceNorm, RMSNorm.

    Example:
        >>> is_norm(nn.GroupNorm(2, 8)), is_norm(nn.Conv2d(8, 8, 1))
        (True, False)
    """
    return is_batchnorm(module) or isinstance(module, _OTHER_NORMS)


def is_any_module(module: nn.Module) -> bool:
    """True for every module: the rule of ``per_use="all"``, under which no use shares anything.

    Example:
        >>> is_any_module(nn.Conv2d(8, 8, 1))
        True
    """
    return True


_PER_USE_RULES: dict[str, Callable[[nn.Module], bool]] = {
    "batchnorm": is_batchnorm,
    "norms": is_norm,
    "all": is_any_module,
}


def per_use_predicate(per_use: PerUse) -> Callable[[nn.Module], bool]:
    """The predicate a :data:`PerUse` stands for; a ReuseError for anything else."""
    if isinstance(per_use, str) and per_use in _PER_USE_RULES:
        return _PER_USE_RULES[per_use]
    if callable(per_use) and not isinstance(per_use, str):
        return per_use
    raise ReuseError(f"per_use must be 'batchnorm', 'norms', 'all' or a predicate on modules, got {per_use!r}")
