"""The banked convolution shared by filter-level and kernel-level reuse (private; users import from ``reuse``).

:class:`BankedConv2d` is a 2-D convolution whose weight is drawn from a :class:`Bank` of shared entries at every
call. What differs between the two grains when convs are converted (what an entry is, which convs share a bank,
how a layer starts as the conv it replaces) is a :class:`Grain`, one small object per grain;
:func:`convert_group` turns a group of convs into layers of one bank with it. The model-level transform behind
:func:`reuse.filter_reuse` and :func:`reuse.kernel_reuse` is :mod:`reuse._banked_transform`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from reuse._checks import check_int
from reuse._errors import ReuseError

__all__ = [
    "Bank",
    "BankedConv2d",
    "Grain",
    "Mode",
    "check_entries",
    "check_mode",
    "convert_group",
    "filled",
    "generator",
    "kernel_size_pair",
    "order",
    "unsupported",
]

Mode = Literal["index", "mix"]
"""How a layer draws its weight from a bank: ``"index"`` (each filter/kernel is one bank entry times a learned
scale; the assignment is fixed at construction) or ``"mix"`` (each is a learned linear combination of all entries)."""

_MODES = ("index", "mix")


def check_mode(mode: object, who: str) -> None:
    if mode not in _MODES:
        raise ReuseError(f"{who}: mode must be 'index' or 'mix', got {mode!r}")


def _pair(value: object, name: str, who: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)  # type: ignore[arg-type]
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in pair):
        raise ReuseError(f"{who}: {name} must be an int or a pair of ints, got {value!r}")
    return pair  # type: ignore[return-value]


def kernel_size_pair(value: object, who: str) -> tuple[int, int]:
    """``(kh, kw)`` from an int or a pair of positive ints; otherwise a ReuseError."""
    size = _pair(value, "kernel_size", who)
    if min(size) < 1:
        raise ReuseError(f"{who}: kernel_size must be positive, got {value!r}")
    return size


def generator(seed: int, salt: int = 0) -> torch.Generator:
    """A CPU generator seeded from ``(seed, salt)``: the same pair always draws the same numbers."""
    return torch.Generator().manual_seed((seed * 0x9E3779B1 + salt) % (1 << 63))


def order(size: int, seed: int) -> Tensor:
    """The seeded order in which the users of a bank of ``size`` entries cycle through it: ``(size,)``."""
    return torch.randperm(size, generator=generator(seed))


class Bank(nn.Module):
    """``num_entries`` shared entries (filters or kernels) of one shape, as one ``weight`` parameter.

    Subclasses name their entries (``entry``), give the shape of one entry, initialise the weight
    (``reset_parameters``) and make a bank holding given entries (``from_entries``).
    """

    entry: ClassVar[str]  # "filter" or "kernel"

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
    def from_entries(cls, entries: Tensor) -> Bank:  # pragma: no cover - every subclass defines it
        raise NotImplementedError


def filled(bank: Bank, entries: Tensor) -> Bank:
    """``bank`` with its weight replaced by a copy of ``entries`` (own storage)."""
    bank.weight = nn.Parameter(entries.detach().clone())
    return bank


def check_entries(entries: object, dims: int, shape: str, who: str) -> Tensor:
    """``entries`` if it is a tensor of ``dims`` dimensions (``shape`` names them in the error)."""
    if not isinstance(entries, Tensor) or entries.dim() != dims:
        got = tuple(entries.shape) if isinstance(entries, Tensor) else type(entries).__name__
        raise ReuseError(f"{who}: needs a tensor of shape {shape}, got {got}")
    return entries


@dataclass(frozen=True)
class Grain:
    """What converting convs means at one grain of reuse (filters or kernels): the policy that
    :func:`convert_group` and :func:`reuse._banked_transform.reuse_convs` follow."""

    bank: type[Bank]  # the bank class: what an entry is
    key: Callable[[nn.Conv2d], Hashable]  # convs of one key share a bank
    count: Callable[[nn.Conv2d], int]  # entries a conv holds
    minimum: Callable[[Sequence[nn.Conv2d], Mode], int]  # the smallest bank the convs accept in a mode
    pool: Callable[[Sequence[nn.Conv2d]], Tensor]  # the convs' entries, in the order of the bank's cycle: (T, ...)
    start_like: Callable[[BankedConv2d, nn.Conv2d, Tensor, bool], None]  # set a layer to start as its conv
    skip: Callable[[nn.Conv2d], str | None] | None = None  # why a conv of a model is left alone (None: never)


class BankedConv2d(nn.Module):
    """A 2-D convolution (the ``nn.Conv2d`` arguments and attributes) whose ``weight`` is drawn from a bank.

    What is common to filter and kernel reuse lives here: the conv's arguments and their checks, the forward and
    :meth:`from_conv`. A subclass says what its bank is and how a weight is built from it:

    - ``grain``, the :class:`Grain`: its bank class, and how convs are converted to layers of this class;
    - ``_check_bank`` (does the bank fit the conv's channels);
    - ``_init_index`` / ``_init_mix``, the layer's own parameters and buffers in each mode;
    - ``weight``, the ``(O, C/g, kh, kw)`` tensor built from the bank at each call.
    """

    grain: ClassVar[Grain]
    bank: Bank

    def __init__(
        self,
        bank: Bank,
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
        if not isinstance(bank, self.grain.bank):
            raise ReuseError(f"{who}: bank must be a {self.grain.bank.__name__}, got {type(bank).__name__}")
        factory = {"device": bank.weight.device, "dtype": bank.weight.dtype}
        check_mode(mode, who)
        in_channels = check_int(in_channels, "in_channels", who)
        out_channels = check_int(out_channels, "out_channels", who)
        groups = check_int(groups, "groups", who)
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

    def _check_bank(self, bank: Bank, channels: int) -> None:
        """Raise unless ``bank`` fits a conv with ``channels`` input channels per group."""

    def _init_index(self, channels: int, seed: int, start: int, factory: dict) -> None:  # pragma: no cover
        raise NotImplementedError

    def _init_mix(self, channels: int, seed: int, start: int, factory: dict) -> None:  # pragma: no cover
        raise NotImplementedError

    @property
    def weight(self) -> Tensor:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    # ------------------------------------------------------------------ common

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight  # (O, C/g, kh, kw), drawn from the bank
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)  # (B, C, H', W')
            return F.conv2d(x, weight, self.bias, self.stride, 0, self.dilation, self.groups)  # (B, O, Ho, Wo)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)  # (B, O, Ho, Wo)

    @classmethod
    def from_conv(
        cls, conv: nn.Conv2d, bank: Bank | None = None, *, mode: Mode = "index", seed: int = 0, start: int = 0
    ) -> BankedConv2d:
        """A banked conv that computes like ``conv``; ``conv`` is not modified.

        Without ``bank``, the bank is a copy of the conv's own entries with an identity assignment and unit
        scales (one-hot coefficients in mix mode), so the output equals the conv's exactly. With ``bank``, the
        layer draws from it (fresh scales or coefficients) and only the bias is copied from ``conv``.
        """
        who = f"{cls.__name__}.from_conv"
        reason = unsupported(conv)
        if reason is not None:
            raise ReuseError(f"{who}: cannot convert {type(conv).__name__}: {reason}")
        if bank is None:
            return convert_group(cls, [conv], cls.grain.count(conv), mode, seed)[0]
        if isinstance(bank, cls.grain.bank) and bank.kernel_size != tuple(conv.kernel_size):
            entry = bank.entry
            raise ReuseError(
                f"{who}: {bank} holds {bank.kernel_size} {entry}s but {conv} has kernel_size="
                f"{tuple(conv.kernel_size)}; draw from a bank of {tuple(conv.kernel_size)} {entry}s"
            )
        new = cls(bank, conv.in_channels, conv.out_channels, **_conv_kwargs(conv), mode=mode, seed=seed, start=start)
        _copy_bias(new, conv)
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


def convert_group(
    layer: type[BankedConv2d], convs: Sequence[nn.Conv2d], size: int, mode: Mode, seed: int
) -> list[BankedConv2d]:
    """Layers of class ``layer`` for convs of one key, sharing one bank of ``size`` entries.

    The convs' entries, in the order of the bank's cycle (``layer.grain.pool``), form a pool; bank place ``j``
    starts as pool entry ``j`` when the bank is as large as the pool (then every layer draws its own entries:
    exact), or as evenly spaced pool entries, each layer's scales or coefficients then set so that its weight
    has the spread of the conv's (the bank mixes entries of convs of other fan-ins).
    """
    grain = layer.grain
    pool = grain.pool(convs)  # (T, ...), every entry of the group
    cycle = order(size, seed).to(pool.device)  # (M,)
    entries = torch.empty((size, *pool.shape[1:]), dtype=pool.dtype, device=pool.device)  # (M, ...)
    entries[cycle] = _spread(pool, size)  # bank place j (entry cycle[j]) holds pool entry j
    bank = grain.bank.from_entries(entries)
    exact = size >= pool.shape[0]
    new, start = [], 0
    for conv in convs:
        banked = layer(bank, conv.in_channels, conv.out_channels, **_conv_kwargs(conv), mode=mode, seed=seed,
                       start=start)  # fmt: skip
        _copy_bias(banked, conv)
        count = grain.count(conv)
        with torch.no_grad():
            grain.start_like(banked, conv, cycle[start : start + count], exact)
        if not exact:
            _match_spread(banked, conv)
        new.append(banked)
        start += count
    return new


def _spread(pool: Tensor, size: int) -> Tensor:
    """``size`` rows of ``pool``: all of them in order, then fresh ones; or, when fewer, evenly spaced ones."""
    total = pool.shape[0]
    if size <= total:
        return pool[torch.arange(size) * total // size]  # (size, ...), evenly spaced rows
    extra = torch.empty(size - total, *pool.shape[1:], dtype=pool.dtype, device=pool.device)
    extra.uniform_(-1.0, 1.0).mul_(pool.std() * math.sqrt(3.0) if total > 1 else 1.0)  # same spread as the pool
    return torch.cat([pool, extra])  # (size, ...)


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


def _copy_bias(new: BankedConv2d, conv: nn.Conv2d) -> None:
    if conv.bias is not None and new.bias is not None:
        with torch.no_grad():
            new.bias.copy_(conv.bias)


def _match_spread(layer: BankedConv2d, conv: nn.Conv2d) -> None:
    """Rescale a banked layer's scales (index) or coefficients (mix) so that its weight starts with the
    standard deviation of ``conv``'s: a bank drawn from convs of other fan-ins holds kernels of other sizes."""
    if conv.weight.numel() < 2:
        return
    with torch.no_grad():
        want, have = conv.weight.std(), layer.weight.std()
        if have > 0 and torch.isfinite(want / have):
            (layer.scale if layer.mode == "index" else layer.coef).mul_(want / have)


def unsupported(conv: nn.Module) -> str | None:
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
