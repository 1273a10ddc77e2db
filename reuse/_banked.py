"""Machinery shared by filter-level and kernel-level reuse (private; users import from ``reuse``).

:class:`_BankedConv2d` is a 2-D convolution whose weight is drawn from a bank of shared entries at
every call; :func:`_reuse_convs` is the model-level transform behind :func:`reuse.filter_reuse` and
:func:`reuse.kernel_reuse`: it swaps every compatible ``nn.Conv2d`` of a model for a banked conv,
with one bank per group of convs whose entries have the same shape.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from collections.abc import Callable, Hashable, Sequence
from typing import ClassVar, Literal, TypeAlias

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from reuse._checks import check_bool
from reuse._errors import ReuseError

Mode = Literal["index", "mix"]
"""How a layer draws its weight from a bank: ``"index"`` (each filter/kernel is one bank entry times a learned
scale; the assignment is fixed at construction) or ``"mix"`` (each is a learned linear combination of all entries)."""

BankSize: TypeAlias = "int | float | None"
"""Entries per bank: an ``int`` (that many), a ``float`` (that fraction of the entries the bank replaces,
rounded, at least 1) or ``None`` (as many as it replaces: no compression, the model computes what it did)."""

Include: TypeAlias = "Callable[[str, nn.Conv2d], bool]"
"""Predicate on ``(qualified name, conv)``: which convs of a model to convert."""

_MODES = ("index", "mix")
_log = logging.getLogger("reuse")


def _check_mode(mode: object, who: str) -> None:
    if mode not in _MODES:
        raise ReuseError(f"{who}: mode must be 'index' or 'mix', got {mode!r}")


def _pair(value: object, name: str, who: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)  # type: ignore[arg-type]
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in pair):
        raise ReuseError(f"{who}: {name} must be an int or a pair of ints, got {value!r}")
    return pair  # type: ignore[return-value]


def _kernel_size(value: object, who: str) -> tuple[int, int]:
    size = _pair(value, "kernel_size", who)
    if min(size) < 1:
        raise ReuseError(f"{who}: kernel_size must be positive, got {value!r}")
    return size


def _positive_int(value: object, name: str, who: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ReuseError(f"{who}: {name} must be a positive int, got {value!r}")
    return value


def _generator(seed: int, salt: int = 0) -> torch.Generator:
    """A CPU generator seeded from ``(seed, salt)``: the same pair always draws the same numbers."""
    return torch.Generator().manual_seed((seed * 0x9E3779B1 + salt) % (1 << 63))


def _order(size: int, seed: int) -> Tensor:
    """The seeded order in which the users of a bank of ``size`` entries cycle through it: ``(size,)``."""
    return torch.randperm(size, generator=_generator(seed))


def _check_bank_size(bank_size: object, who: str) -> None:
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


def _resolve_bank_size(bank_size: object, total: int, minimum: int, who: str) -> int:
    """Entries of a bank that replaces ``total`` filters or kernels (see :data:`BankSize`); a fraction is
    raised to ``minimum``, the smallest bank its users accept (an int below it is left to raise)."""
    _check_bank_size(bank_size, who)
    if bank_size is None:
        return total
    if isinstance(bank_size, float):
        return max(1, minimum, round(bank_size * total))
    return bank_size  # type: ignore[return-value]


def _spread(pool: Tensor, size: int) -> Tensor:
    """``size`` rows of ``pool``: all of them in order, then fresh ones; or, when fewer, evenly spaced ones."""
    total = pool.shape[0]
    if size <= total:
        return pool[torch.arange(size) * total // size]  # (size, ...), evenly spaced rows
    extra = torch.empty(size - total, *pool.shape[1:], dtype=pool.dtype, device=pool.device)
    extra.uniform_(-1.0, 1.0).mul_(pool.std() * math.sqrt(3.0) if total > 1 else 1.0)  # same spread as the pool
    return torch.cat([pool, extra])  # (size, ...)


class _Bank(nn.Module):
    """``num_entries`` shared entries (filters or kernels) of one shape, as one ``weight`` parameter.

    Subclasses name their entries (``entry_name``), give the shape of one entry and initialise the weight.
    """

    entry_name: ClassVar[str]  # "filter" or "kernel"

    def __init__(
        self,
        num_entries: int,
        entry_shape: tuple[int, ...],
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty((num_entries, *entry_shape), device=device, dtype=dtype))  # (M, ...)
        self.reset_parameters()

    def reset_parameters(self) -> None:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    @classmethod
    def _from_entries(cls, entries: Tensor) -> _Bank:  # pragma: no cover - every subclass defines it
        raise NotImplementedError


def _bank_copy(bank: _Bank, entries: Tensor) -> _Bank:
    """``bank`` with its weight replaced by a copy of ``entries`` (own storage)."""
    bank.weight = nn.Parameter(entries.detach().clone())
    return bank


def _check_bank_entries(entries: object, dims: int, shape: str, who: str) -> Tensor:
    if not isinstance(entries, Tensor) or entries.dim() != dims:
        got = tuple(entries.shape) if isinstance(entries, Tensor) else type(entries).__name__
        raise ReuseError(f"{who}: needs a tensor of shape {shape}, got {got}")
    return entries


class _BankedConv2d(nn.Module):
    """A 2-D convolution (the ``nn.Conv2d`` arguments and attributes) whose ``weight`` is drawn from a bank.

    What is common to filter and kernel reuse lives here: the conv's arguments and their checks, the forward,
    :meth:`from_conv`, and turning a group of convs into layers of one bank (:meth:`_convert_group`). A
    subclass says what a bank entry is and how a weight is built from the bank:

    - ``bank_type``, the bank class, and ``_check_bank`` (does the bank fit the conv's channels);
    - ``_init_index`` / ``_init_mix``, the layer's own parameters and buffers in each mode;
    - ``weight``, the ``(O, C/g, kh, kw)`` tensor built from the bank at each call;
    - for conversion: ``_key`` (convs of one key share a bank), ``_skip`` (convs left alone), ``_count``
      (entries a conv holds), ``_minimum`` (smallest bank a mode accepts), ``_pool`` (the convs' entries, in
      the order of the bank's cycle) and ``_start_like`` (a layer that starts as the conv it replaces).
    """

    bank_type: ClassVar[type[_Bank]]
    bank: _Bank

    def __init__(
        self,
        bank: _Bank,
        in_channels: int,
        out_channels: int,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        mode: Mode = "index",
        seed: int = 0,
        start: int = 0,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        if not isinstance(bank, self.bank_type):
            raise ReuseError(f"{who}: bank must be a {self.bank_type.__name__}, got {type(bank).__name__}")
        factory = {"device": bank.weight.device, "dtype": bank.weight.dtype}
        _check_mode(mode, who)
        in_channels = _positive_int(in_channels, "in_channels", who)
        out_channels = _positive_int(out_channels, "out_channels", who)
        groups = _positive_int(groups, "groups", who)
        if in_channels % groups or out_channels % groups:
            raise ReuseError(
                f"{who}: groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}"
            )
        if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ReuseError(f"{who}: padding_mode must be 'zeros', 'reflect', 'replicate' or 'circular'")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = bank.kernel_size
        self.stride = _pair(stride, "stride", who)
        self.dilation = _pair(dilation, "dilation", who)
        self.groups = groups
        self.padding_mode = padding_mode
        self.mode = mode
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ReuseError(f"{who}: padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
            if padding == "same" and self.stride != (1, 1):
                raise ReuseError(f"{who}: padding='same' needs stride 1, got stride={self.stride}")
            self.padding: tuple[int, int] | str = padding
        else:
            self.padding = _pair(padding, "padding", who)
        self._reversed_padding_repeated_twice = _reversed_padding(self.padding, self.kernel_size, self.dilation)
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        if self.bias is not None:
            bound = 1.0 / math.sqrt(in_channels // groups * self.kernel_size[0] * self.kernel_size[1])
            nn.init.uniform_(self.bias, -bound, bound)  # as nn.Conv2d
        channels = in_channels // groups
        self._check_bank(bank, channels)
        self.bank = bank
        if mode == "index":
            self._init_index(channels, seed, start, factory)
        else:
            self._init_mix(channels, seed, start, factory)

    # ------------------------------------------------------------------ what a subclass says

    def _check_bank(self, bank: _Bank, channels: int) -> None:
        """Raise unless ``bank`` fits a conv with ``channels`` input channels per group."""

    def _init_index(self, channels: int, seed: int, start: int, factory: dict) -> None:  # pragma: no cover
        raise NotImplementedError

    def _init_mix(self, channels: int, seed: int, start: int, factory: dict) -> None:  # pragma: no cover
        raise NotImplementedError

    @property
    def weight(self) -> Tensor:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    @staticmethod
    def _key(conv: nn.Conv2d) -> Hashable:  # pragma: no cover
        raise NotImplementedError

    @staticmethod
    def _skip(conv: nn.Conv2d) -> str | None:
        """Why a conv of a model is left alone (None: it is converted)."""
        return None

    @staticmethod
    def _count(conv: nn.Conv2d) -> int:  # pragma: no cover
        raise NotImplementedError

    @staticmethod
    def _minimum(convs: Sequence[nn.Conv2d], mode: Mode) -> int:  # pragma: no cover
        raise NotImplementedError

    @staticmethod
    def _pool(convs: Sequence[nn.Conv2d]) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def _start_like(self, conv: nn.Conv2d, places: Tensor, exact: bool) -> None:
        """Set the layer's scales or coefficients so that it starts as ``conv`` (``places``: the bank entries
        its entries were copied to; ``exact``: the bank holds every entry of the group)."""

    # ------------------------------------------------------------------ common

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight  # (O, C/g, kh, kw), drawn from the bank
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)  # (B, C, H', W')
            return F.conv2d(x, weight, self.bias, self.stride, 0, self.dilation, self.groups)  # (B, O, Ho, Wo)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)  # (B, O, Ho, Wo)

    @classmethod
    def from_conv(
        cls, conv: nn.Conv2d, bank: _Bank | None = None, *, mode: Mode = "index", seed: int = 0, start: int = 0
    ) -> _BankedConv2d:
        """A banked conv that computes like ``conv``; ``conv`` is not modified.

        Without ``bank``, the bank is a copy of the conv's own entries with an identity assignment and unit
        scales (one-hot coefficients in mix mode), so the output equals the conv's exactly. With ``bank``, the
        layer draws from it (fresh scales or coefficients) and only the bias is copied from ``conv``.
        """
        who = f"{cls.__name__}.from_conv"
        reason = _unsupported(conv)
        if reason is not None:
            raise ReuseError(f"{who}: cannot convert {type(conv).__name__}: {reason}")
        if bank is None:
            return cls._convert_group([conv], cls._count(conv), mode, seed)[0]
        if isinstance(bank, cls.bank_type) and bank.kernel_size != tuple(conv.kernel_size):
            raise ReuseError(
                f"{who}: {bank} holds {bank.kernel_size} {bank.entry_name}s but {conv} has kernel_size="
                f"{tuple(conv.kernel_size)}; draw from a bank of {tuple(conv.kernel_size)} {bank.entry_name}s"
            )
        new = cls(bank, conv.in_channels, conv.out_channels, **_conv_kwargs(conv), mode=mode, seed=seed, start=start)
        _copy_bias(new, conv)
        return new

    @classmethod
    def _convert_group(cls, convs: Sequence[nn.Conv2d], size: int, mode: Mode, seed: int) -> list[_BankedConv2d]:
        """Banked convs for convs of one key, sharing one bank of ``size`` entries.

        The convs' entries, in the order of the bank's cycle (:meth:`_pool`), form a pool; bank place ``j``
        starts as pool entry ``j`` when the bank is as large as the pool (then every layer draws its own
        entries: exact), or as evenly spaced pool entries, each layer's scales or coefficients then set so
        that its weight has the spread of the conv's (the bank mixes entries of convs of other fan-ins).
        """
        pool = cls._pool(convs)  # (T, ...), every entry of the group
        order = _order(size, seed).to(pool.device)  # (M,)
        filled = torch.empty((size, *pool.shape[1:]), dtype=pool.dtype, device=pool.device)  # (M, ...)
        filled[order] = _spread(pool, size)  # bank place j (entry order[j]) holds pool entry j
        bank = cls.bank_type._from_entries(filled)
        exact = size >= pool.shape[0]
        new, start = [], 0
        for conv in convs:
            layer = cls(bank, conv.in_channels, conv.out_channels, **_conv_kwargs(conv), mode=mode, seed=seed,
                        start=start)  # fmt: skip
            _copy_bias(layer, conv)
            count = cls._count(conv)
            with torch.no_grad():
                layer._start_like(conv, order[start : start + count], exact)
            if not exact:
                _match_spread(layer, conv)
            new.append(layer)
            start += count
        return new

    def _conv_repr(self) -> str:
        parts = [f"{self.in_channels}, {self.out_channels}"]
        if self.stride != (1, 1):
            parts.append(f"stride={self.stride}")
        if self.padding != (0, 0):
            parts.append(f"padding={self.padding!r}")
        if self.dilation != (1, 1):
            parts.append(f"dilation={self.dilation}")
        if self.groups != 1:
            parts.append(f"groups={self.groups}")
        if self.bias is None:
            parts.append("bias=False")
        if self.padding_mode != "zeros":
            parts.append(f"padding_mode={self.padding_mode!r}")
        parts.append(f"mode={self.mode!r}")
        return ", ".join(parts)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.bank!r}, {self._conv_repr()})"


def _reversed_padding(
    padding: tuple[int, int] | str, kernel_size: tuple[int, int], dilation: tuple[int, int]
) -> tuple[int, int, int, int]:
    """``F.pad`` amounts (left, right, top, bottom) equal to the conv's own padding, as ``nn.Conv2d`` keeps them."""
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        total = [d * (k - 1) for d, k in zip(dilation, kernel_size)]  # (h, w)
        return (total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2)
    return (padding[1], padding[1], padding[0], padding[0])  # type: ignore[index]


def _conv_kwargs(conv: nn.Conv2d) -> dict:
    """The arguments of a banked conv that computes like ``conv``."""
    return {
        "stride": conv.stride,
        "padding": conv.padding,
        "dilation": conv.dilation,
        "groups": conv.groups,
        "bias": conv.bias is not None,
        "padding_mode": conv.padding_mode,
    }


def _copy_bias(new: _BankedConv2d, conv: nn.Conv2d) -> None:
    if conv.bias is not None and new.bias is not None:
        with torch.no_grad():
            new.bias.copy_(conv.bias)


def _match_spread(layer: _BankedConv2d, conv: nn.Conv2d) -> None:
    """Rescale a banked layer's scales (index) or coefficients (mix) so that its weight starts with the
    standard deviation of ``conv``'s: a bank drawn from convs of other fan-ins holds kernels of other sizes."""
    if conv.weight.numel() < 2:
        return
    with torch.no_grad():
        want, have = conv.weight.std(), layer.weight.std()
        if have > 0 and torch.isfinite(want / have):
            (layer.scale if layer.mode == "index" else layer.coef).mul_(want / have)


def _unsupported(conv: nn.Module) -> str | None:
    """Why a module cannot be swapped for a banked conv, or None when it can."""
    if not isinstance(conv, nn.Conv2d):
        return f"it is a {type(conv).__name__}, not an nn.Conv2d"
    forward = type(conv).forward is nn.Conv2d.forward and type(conv)._conv_forward is nn.Conv2d._conv_forward
    if not forward:
        return f"{type(conv).__name__} overrides nn.Conv2d's forward, which a banked conv would not reproduce"
    if parametrize.is_parametrized(conv):
        return "its weight is parametrized (torch.nn.utils.parametrize), which a banked conv would drop"
    if conv.weight.is_meta:
        return "its weight is on the meta device (no values to fill a bank with)"
    return None


def _reuse_convs(
    module: nn.Module,
    layer: type[_BankedConv2d],
    *,
    who: str,
    bank_size: BankSize,
    mode: Mode,
    seed: int = 0,
    include: Include | None = None,
    inplace: bool = False,
    **unknown: object,
) -> nn.Module:
    """Swap one conv, or every compatible conv of a model, for ``layer`` convs; one bank per ``layer._key``.

    ``layer._skip`` gives a reason to leave a conv of a model alone (it never stops a single conv handed in);
    ``layer._count`` is the number of entries (filters or kernels) a conv holds; ``layer._minimum`` the smallest
    bank that convs accept in a mode (a fractional ``bank_size`` is raised to it).
    """
    if unknown:
        raise TypeError(f"{who}() got unexpected keyword arguments {sorted(unknown)}; it takes seed, include, inplace")
    _check_mode(mode, who)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ReuseError(f"{who}: seed must be an int, got {seed!r}")
    check_bool(inplace, "inplace", who)
    _check_bank_size(bank_size, who)
    if include is not None and not callable(include):
        raise ReuseError(
            f"{who}: include must be a predicate on (qualified name, conv) or None, got {include!r}; "
            "e.g. include=lambda name, conv: name.startswith('layer3')"
        )
    options = f"{who}(bank_size={bank_size!r}, mode={mode!r})"
    if isinstance(module, nn.Conv2d):
        reason = _unsupported(module)
        if reason is not None:
            raise ReuseError(f"{options}: cannot convert {type(module).__name__}: {reason}; convert a plain nn.Conv2d")
        size = _resolve_bank_size(bank_size, layer._count(module), layer._minimum([module], mode), who)
        try:
            return layer._convert_group([module], size, mode, seed)[0]
        except ReuseError as err:
            raise ReuseError(f"{options} on {module}: {err}") from None
    if not isinstance(module, nn.Module):
        raise ReuseError(f"{who}: expects an nn.Conv2d or a model (nn.Module), got {type(module).__name__}")

    model = module if inplace else copy.deepcopy(module)
    groups: dict[Hashable, list[tuple[str, nn.Conv2d]]] = {}
    for name, conv in model.named_modules():  # a conv reached by several paths comes once, under its first name
        if not isinstance(conv, nn.Conv2d):
            continue
        reason = _unsupported(conv) or layer._skip(conv)
        if reason is None and include is not None and not include(name, conv):
            reason = "left out by include"
        if reason is not None:
            _log.info("%s: skipped %s: %s", who, name, reason)
            continue
        groups.setdefault(layer._key(conv), []).append((name, conv))
    if not groups:
        warnings.warn(
            f"{who}: found no convertible nn.Conv2d in {type(model).__name__}; returned it unchanged", stacklevel=3
        )
        return model

    swap: dict[int, nn.Module] = {}
    for members in groups.values():
        convs = [conv for _, conv in members]
        size = _resolve_bank_size(bank_size, sum(layer._count(c) for c in convs), layer._minimum(convs, mode), who)
        try:
            new = layer._convert_group(convs, size, mode, seed)
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
