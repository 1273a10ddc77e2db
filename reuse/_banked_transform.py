"""The model-level transform behind :func:`reuse.filter_reuse` and :func:`reuse.kernel_reuse` (private): swap every
compatible ``nn.Conv2d`` of a model for a banked conv (:mod:`reuse._banked`), one bank per group of convs whose
entries have the same shape."""

from __future__ import annotations

import copy
import logging
import math
import warnings
from collections.abc import Callable, Hashable
from typing import TypeAlias

from torch import nn

from reuse._banked import BankedConv2d, Mode, check_mode, convert_group, unsupported
from reuse._checks import check_bool, check_int
from reuse._errors import ReuseError

__all__ = ["BankSize", "Include", "check_bank_size", "reuse_convs"]

BankSize: TypeAlias = "int | float | None"
"""Entries per bank: an ``int`` (that many), a ``float`` (that fraction of the entries the bank replaces,
rounded, at least 1) or ``None`` (as many as it replaces: no compression, the model computes what it did)."""

Include: TypeAlias = "Callable[[str, nn.Conv2d], bool]"
"""Predicate on ``(qualified name, conv)``: which convs of a model to convert."""

_log = logging.getLogger("reuse")


def check_bank_size(bank_size: object, who: str) -> None:
    """Raise unless ``bank_size`` is a :data:`BankSize`: a positive int, a float in (0, 1] or None."""
    if bank_size is None:
        return
    rule = (
        "bank_size must be a positive int (entries), a float in (0, 1] (a fraction of the entries replaced) "
        "or None (as many entries as replaced: no compression)"
    )
    if isinstance(bank_size, bool) or not isinstance(bank_size, int | float):
        raise ReuseError(f"{who}: {rule}, got {bank_size!r} ({type(bank_size).__name__})")
    if isinstance(bank_size, int) and bank_size < 1:
        raise ReuseError(f"{who}: {rule}, got {bank_size!r}")
    if isinstance(bank_size, float) and not (math.isfinite(bank_size) and 0.0 < bank_size <= 1.0):
        grows = " (a fraction above 1 would grow the model)" if math.isfinite(bank_size) and bank_size > 1 else ""
        raise ReuseError(f"{who}: {rule}, got {bank_size!r}{grows}; pass an int for a bank of that many entries")


def _bank_entries(bank_size: BankSize, total: int, minimum: int) -> int:
    """Entries of a bank that replaces ``total`` filters or kernels (see :data:`BankSize`, checked); a fraction
    is raised to ``minimum``, the smallest bank its users accept (an int below it is left to raise)."""
    if bank_size is None:
        return total
    if isinstance(bank_size, float):
        return max(1, minimum, round(bank_size * total))
    return bank_size


def reuse_convs(
    module: nn.Module,
    layer: type[BankedConv2d],
    *,
    who: str,
    bank_size: BankSize,
    mode: Mode,
    seed: int = 0,
    include: Include | None = None,
    inplace: bool = False,
    **unknown: object,
) -> nn.Module:
    """Swap one conv, or every compatible conv of a model, for ``layer`` convs; one bank per ``layer.grain.key``.

    ``layer.grain.skip`` gives a reason to leave a conv of a model alone (it never stops a single conv handed in);
    ``layer.grain.count`` is the number of entries (filters or kernels) a conv holds; ``layer.grain.minimum`` the
    smallest bank that convs accept in a mode (a fractional ``bank_size`` is raised to it).
    """
    if unknown:
        raise TypeError(f"{who}() got unexpected keyword arguments {sorted(unknown)}; it takes seed, include, inplace")
    check_mode(mode, who)
    check_int(seed, "seed", who, at_least=None)
    check_bool(inplace, "inplace", who)
    check_bank_size(bank_size, who)
    if include is not None and not callable(include):
        raise ReuseError(
            f"{who}: include must be a predicate on (qualified name, conv) or None, got {include!r}; "
            "e.g. include=lambda name, conv: name.startswith('layer3')"
        )
    grain = layer.grain
    options = f"{who}(bank_size={bank_size!r}, mode={mode!r})"
    if isinstance(module, nn.Conv2d):
        reason = unsupported(module)
        if reason is not None:
            raise ReuseError(f"{options}: cannot convert {type(module).__name__}: {reason}; convert a plain nn.Conv2d")
        size = _bank_entries(bank_size, grain.count(module), grain.minimum([module], mode))
        try:
            return convert_group(layer, [module], size, mode, seed)[0]
        except ReuseError as err:
            raise ReuseError(f"{options} on {module}: {err}") from None
    if not isinstance(module, nn.Module):
        raise ReuseError(f"{who}: expects an nn.Conv2d or a model (nn.Module), got {type(module).__name__}")

    model = module if inplace else copy.deepcopy(module)
    groups: dict[Hashable, list[tuple[str, nn.Conv2d]]] = {}
    for name, conv in model.named_modules():  # a conv reached by several paths comes once, under its first name
        if not isinstance(conv, nn.Conv2d):
            continue
        reason = unsupported(conv) or (grain.skip(conv) if grain.skip is not None else None)
        if reason is None and include is not None and not include(name, conv):
            reason = "left out by include"
        if reason is not None:
            _log.info("%s: skipped %s: %s", who, name, reason)
            continue
        groups.setdefault(grain.key(conv), []).append((name, conv))
    if not groups:
        warnings.warn(
            f"{who}: found no convertible nn.Conv2d in {type(model).__name__}; returned it unchanged", stacklevel=3
        )
        return model

    swap: dict[int, nn.Module] = {}
    for members in groups.values():
        convs = [conv for _, conv in members]
        size = _bank_entries(bank_size, sum(grain.count(c) for c in convs), grain.minimum(convs, mode))
        try:
            new = convert_group(layer, convs, size, mode, seed)
        except ReuseError as err:
            names = ", ".join(name for name, _ in members)
            raise ReuseError(f"{options} on {type(model).__name__} (convs {names}): {err}") from None
        swap.update({id(conv): n for conv, n in zip(convs, new)})
    # Replace every reference: a conv held by several parents (LayerReuse's uses) becomes one shared banked conv.
    for parent in list(model.modules()):
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in swap:
                setattr(parent, child_name, swap[id(child)])
    return model
