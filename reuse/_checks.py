"""Checks of option values shared by the public entry points (private).

Each raises :class:`~reuse.ReuseError` with the rule, naming the option and the caller: a truthy string such
as ``inplace="no"`` must not pass for ``True``.
"""

from __future__ import annotations

from reuse._errors import ReuseError

__all__ = ["check_bool", "check_bools"]


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


def check_bools(who: str, **options: object) -> None:
    """:func:`check_bool` for each keyword."""
    for name, value in options.items():
        check_bool(value, name, who)
