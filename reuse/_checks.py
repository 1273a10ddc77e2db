"""Checks of option values shared by the public entry points (private).

Each raises :class:`~reuse.ReuseError` with the rule, naming the option and the caller: a truthy string such
as ``inplace="no"`` must not pass for ``True``, nor ``True`` for the int ``1``.
"""

from __future__ import annotations

from torch import nn

from reuse._errors import ReuseError

__all__ = ["check_bool", "check_int", "check_module"]


def check_bool(value: object, name: str, who: str) -> bool:
    """``value`` itself if it is a ``bool``; otherwise a ReuseError.

    Example:
        >>> check_bool(True, "inplace", "convert")
        True
        >>> check_bool("no", "inplace", "convert")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        reuse._errors.ReuseError: convert: inplace must be True or False, got 'no' (str)
    """
    if not isinstance(value, bool):
        raise ReuseError(f"{who}: {name} must be True or False, got {value!r} ({type(value).__name__})")
    return value


def check_int(
    value: object, name: str, who: str, *, at_least: int | None = 1, at_most: int | None = None, about: str = ""
) -> int:
    """``value`` itself if it is an int (not a bool) in ``at_least..at_most`` (None: no bound); otherwise a
    ReuseError stating the rule, with ``about`` (what the number means) in parentheses.

    Example:
        >>> check_int(3, "groups", "convert")
        3
        >>> check_int(1, "min_run", "convert", at_least=2, about="blocks in a run")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        reuse._errors.ReuseError: convert: min_run must be an int >= 2 (blocks in a run), got 1
        >>> check_int(True, "groups", "convert")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        reuse._errors.ReuseError: convert: groups must be a positive int, got True
    """
    ok = (
        isinstance(value, int)
        and not isinstance(value, bool)
        and (at_least is None or value >= at_least)
        and (at_most is None or value <= at_most)
    )
    if not ok:
        if at_most is not None:
            rule = f"an int in {at_least}..{at_most}"
        elif at_least is None:
            rule = "an int"
        elif at_least == 1:
            rule = "a positive int"
        else:
            rule = f"an int >= {at_least}"
        raise ReuseError(f"{who}: {name} must be {rule}{f' ({about})' if about else ''}, got {value!r}")
    return value  # type: ignore[return-value]


def check_module(value: object, who: str) -> nn.Module:
    """``value`` itself if it is an ``nn.Module``; otherwise a ReuseError.

    Example:
        >>> check_module("resnet", "convert")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        reuse._errors.ReuseError: convert: needs an nn.Module, got str
    """
    if not isinstance(value, nn.Module):
        raise ReuseError(f"{who}: needs an nn.Module, got {type(value).__name__}")
    return value
