"""Kernel reuse (KRU): single kh x kw kernels drawn from a bank that many layers share.

The finest grain named by Köpüklü et al. (ICIP 2019): a conv's weight ``(O, C/g, kh, kw)`` is
``O * C/g`` kernels, and each is drawn from a :class:`KernelBank` of ``M`` kernels that any number of
:class:`KernelReuseConv2d` layers share (each of them sends it gradient)::

    index: weight[o, c] = scale[o, c] * bank[entry[o, c]]   # one entry, a learned scale per kernel
    mix:   weight[o, c] = sum_m coef[o, c, m] * bank[m]     # a learned combination of all entries

Index mode places the layer's kernels channel-major on a cycle through the bank in a seeded order
(kernel ``(o, c)`` at place ``start + c * O + o``), so the outputs of one group next to each other take
different bank kernels on every input channel; at each further lap of the cycle, channel ``c`` moves
``c`` more places, so two outputs of a group repeat the whole sequence of bank kernels only when the
group has more than ``M**2`` outputs (``M`` with one channel per group, where that would make scaled
copies and is refused).

:func:`kernel_reuse` converts one ``nn.Conv2d`` or every compatible conv of a model, with one bank
per kernel size. A bank as large as what it replaces, filled with the convs' own kernels (the default,
``bank_size=None``), computes exactly what the convs computed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from reuse._banked import (
    BankSize,
    Include,
    Mode,
    _BankedConv2d,
    _conv_kwargs,
    _copy_bias,
    _generator,
    _match_spread,
    _order,
    _pair,
    _positive_int,
    _reuse_convs,
    _spread,
    _unsupported,
)
from reuse._errors import ReuseError

__all__ = ["KernelBank", "KernelReuseConv2d", "kernel_reuse"]

_MAX_MIX_COEFFICIENTS = 1 << 28
"""Refuse a mix-mode layer with more coefficients than this (1 GiB in float32): a sign of a bank far too large."""


class KernelBank(nn.Module):
    """A bank of ``num_kernels`` kernels of shape ``(kh, kw)``, shared by :class:`KernelReuseConv2d` layers.

    Initialised uniform in ``±1/sqrt(kh * kw)``, as ``nn.Conv2d`` initialises a weight with one channel per
    filter; a layer with ``C/g`` channels per filter starts its scales at ``1/sqrt(C/g)`` to match a conv.

    Args:
        num_kernels: M, the number of kernels in the bank.
        kernel_size: ``kh`` (square) or ``(kh, kw)``.
        device: where to put the kernels.
        dtype: their dtype.

    Example:
        >>> bank = KernelBank(32, 3)
        >>> bank, tuple(bank.weight.shape)
        (KernelBank(32, kernel_size=(3, 3)), (32, 3, 3))
    """

    def __init__(
        self,
        num_kernels: int,
        kernel_size: int | tuple[int, int],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_kernels = _positive_int(num_kernels, "num_kernels", "KernelBank")
        self.kernel_size = _pair(kernel_size, "kernel_size", "KernelBank")
        if min(self.kernel_size) < 1:
            raise ReuseError(f"KernelBank: kernel_size must be positive, got {kernel_size!r}")
        shape = (self.num_kernels, *self.kernel_size)
        self.weight = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))  # (M, kh, kw)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.kernel_size[0] * self.kernel_size[1])
        nn.init.uniform_(self.weight, -bound, bound)

    @classmethod
    def from_kernels(cls, kernels: Tensor) -> KernelBank:
        """A bank holding a copy of ``kernels``, a tensor of shape ``(M, kh, kw)``.

        Example:
            >>> conv = nn.Conv2d(2, 3, 3)
            >>> KernelBank.from_kernels(conv.weight.flatten(0, 1))
            KernelBank(6, kernel_size=(3, 3))
        """
        if not isinstance(kernels, Tensor) or kernels.dim() != 3:
            shape = tuple(kernels.shape) if isinstance(kernels, Tensor) else type(kernels).__name__
            raise ReuseError(f"KernelBank.from_kernels: needs a tensor of shape (M, kh, kw), got {shape}")
        bank = cls(kernels.shape[0], tuple(kernels.shape[1:]), device=kernels.device)
        bank.weight = nn.Parameter(kernels.detach().clone())  # (M, kh, kw), own storage
        return bank

    def extra_repr(self) -> str:
        return f"{self.num_kernels}, kernel_size={self.kernel_size}"


def _kernel_assignment(out_channels: int, groups: int, channels: int, bank_size: int, seed: int, start: int) -> Tensor:
    """Index-mode assignment: kernel ``(o, c)`` of the layer is bank kernel ``entry[o, c]``; ``(O, C/g)``.

    Kernel ``(o, c)`` takes place ``start + c * O + o`` of a cycle through the bank in a seeded order, moved
    ``c * lap`` places further, where ``lap`` counts the times output ``o``'s column wrapped around the bank.
    Refused when two outputs of one group would take the same bank kernel on every channel and have one
    channel each (scaled copies).
    """
    column = start % bank_size + torch.arange(out_channels)  # (O,), place of kernel (o, 0) in the cycle
    lap = column // bank_size  # (O,)
    channel = torch.arange(channels)  # (C/g,)
    position = column[:, None] + channel * out_channels + channel * lap[:, None]  # (O, C/g)
    entry = _order(bank_size, seed)[position % bank_size]  # (O, C/g)
    per_group = out_channels // groups
    if channels == 1 and per_group > bank_size:
        raise ReuseError(
            f"index mode: a group of {per_group} outputs reads one input channel, so with bank_size={bank_size} "
            f"some outputs would take the same bank kernel and be scaled copies of others; use bank_size >= "
            f"{per_group} or mode='mix'"
        )
    return entry


class KernelReuseConv2d(_BankedConv2d):
    """A 2-D convolution whose kernels are drawn from a shared :class:`KernelBank`.

    It takes ``nn.Conv2d``'s arguments except ``kernel_size`` (the bank's) and behaves like one
    (``weight`` is the ``(O, C/g, kh, kw)`` tensor drawn at each call). The bank is a submodule of every
    layer that uses it, so ``parameters()`` of a model counts it once.

    What it costs, with ``O`` outputs, ``C/g`` channels per filter, ``k = kh * kw``, a bank of ``M``
    kernels, and ``P`` output positions per image:

    ========  =======================================  ==================================================
    mode      parameters of the layer                  multiply-adds
    ========  =======================================  ==================================================
    (conv)    ``O * C/g * k``                          ``P * O * C/g * k`` per image
    index     ``O * C/g`` scales, plus the bank        the conv's, plus ``O * C/g * k`` multiplies per call
                                                       to build the weight, whatever the batch size
    mix       ``O * C/g * M`` coefficients, plus bank  the conv's, plus ``O * C/g * M * k`` per call to
                                                       build the weight (one matmul), whatever the batch
    ========  =======================================  ==================================================

    The bank (``M * k`` parameters) is paid once for all its users; a bias adds ``O`` as in a conv. Index
    mode divides a layer's weights by ``k`` (nothing saved for 1x1 kernels). Mix mode saves parameters only
    with ``M < k``: a combination of ``k`` or more kernels of ``k`` numbers can already be any kernel.

    Args:
        bank: the kernels to draw from; ``bank.kernel_size`` is the layer's.
        in_channels: C.
        out_channels: O.
        stride: as in ``nn.Conv2d``.
        padding: as in ``nn.Conv2d`` (an int, a pair, ``"same"`` or ``"valid"``).
        dilation: as in ``nn.Conv2d``.
        groups: as in ``nn.Conv2d``.
        bias: learn a bias of ``O`` values (never shared).
        padding_mode: as in ``nn.Conv2d``.
        mode: ``"index"`` or ``"mix"`` (see the module docstring).
        seed: index mode: the order in which the users of a bank cycle through it (give all users of a bank
            the same seed); mix mode: with ``start``, the draw of the initial coefficients.
        start: index mode: the place in that cycle of this layer's first kernel; give the layers of one bank
            starts that follow each other (``0, O1 * C1/g1, ...``) so that they use the bank evenly.

    Example:
        >>> bank = KernelBank(64, 3)
        >>> a = KernelReuseConv2d(bank, 16, 32, padding=1, bias=False)
        >>> b = KernelReuseConv2d(bank, 32, 32, padding=1, bias=False, start=512)
        >>> b(a(torch.randn(2, 16, 8, 8))).shape
        torch.Size([2, 32, 8, 8])
        >>> sum(p.numel() for p in nn.ModuleList([a, b]).parameters())  # bank 64*9, then 16*32 + 32*32 scales
        2112
    """

    bank: KernelBank

    def __init__(
        self,
        bank: KernelBank,
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
        if not isinstance(bank, KernelBank):
            raise ReuseError(f"KernelReuseConv2d: bank must be a KernelBank, got {type(bank).__name__}")
        factory = {"device": bank.weight.device, "dtype": bank.weight.dtype}
        who = "KernelReuseConv2d"
        super().__init__(
            who, in_channels, out_channels, bank.kernel_size, stride, padding, dilation, groups, bias, padding_mode,
            mode, factory,
        )  # fmt: skip
        channels = in_channels // groups
        self.bank = bank
        if mode == "index":
            entry = _kernel_assignment(out_channels, groups, channels, bank.num_kernels, seed, start)
            self.register_buffer("entry", entry.to(factory["device"]))  # (O, C/g), bank kernel of each kernel
            self.scale = nn.Parameter(torch.full((out_channels, channels), channels**-0.5, **factory))  # (O, C/g)
        else:
            size = out_channels * channels * bank.num_kernels
            if size > _MAX_MIX_COEFFICIENTS:
                raise ReuseError(
                    f"{who}: mode='mix' with a bank of {bank.num_kernels} kernels needs O x C/g x M = {out_channels} x "
                    f"{channels} x {bank.num_kernels} = {size} coefficients; a mix of more than kh x kw = "
                    f"{bank.kernel_size[0] * bank.kernel_size[1]} kernels adds coefficients but nothing a kernel "
                    "could not already be, so use a small bank (bank_size < kh * kw) or mode='index'"
                )
            coef = torch.randn(out_channels, channels, bank.num_kernels, generator=_generator(seed, start))
            self.coef = nn.Parameter(coef.div_(math.sqrt(bank.num_kernels * channels)).to(**factory))  # (O, C/g, M)

    @property
    def weight(self) -> Tensor:
        """The layer's kernels, drawn from the bank: ``(O, C/g, kh, kw)``."""
        bank = self.bank.weight  # (M, kh, kw)
        shape = (self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        if self.mode == "mix":
            return (self.coef.flatten(0, 1) @ bank.flatten(1)).view(shape)  # (O*C/g, M) @ (M, kh*kw)
        weight = bank.index_select(0, self.entry.flatten()).view(shape)  # (O, C/g, kh, kw)
        return weight * self.scale[:, :, None, None]  # (O, C/g, kh, kw)

    @classmethod
    def from_conv(
        cls, conv: nn.Conv2d, bank: KernelBank | None = None, *, mode: Mode = "index", seed: int = 0, start: int = 0
    ) -> KernelReuseConv2d:
        """A kernel-reuse conv that computes like ``conv``; ``conv`` is not modified.

        Without ``bank``, the bank is a copy of the conv's own kernels with an identity assignment and unit
        scales (one-hot coefficients in mix mode), so the output equals the conv's exactly. With ``bank``, the
        layer draws from it (fresh scales or coefficients) and only the bias is copied from ``conv``.

        Example:
            >>> conv = nn.Conv2d(8, 16, 3, padding=1)
            >>> x = torch.randn(1, 8, 5, 5)
            >>> torch.equal(KernelReuseConv2d.from_conv(conv)(x), conv(x))
            True
        """
        reason = _unsupported(conv)
        if reason is not None:
            raise ReuseError(f"KernelReuseConv2d.from_conv: cannot convert {type(conv).__name__}: {reason}")
        if bank is None:
            return _convert_kernel_group([conv], _kernel_count(conv), mode, seed)[0]
        if bank.kernel_size != tuple(conv.kernel_size):
            raise ReuseError(
                f"KernelReuseConv2d.from_conv: {bank} holds {bank.kernel_size} kernels but {conv} has "
                f"kernel_size={tuple(conv.kernel_size)}; draw from a KernelBank(n, {tuple(conv.kernel_size)})"
            )
        new = cls(bank, conv.in_channels, conv.out_channels, **_conv_kwargs(conv), mode=mode, seed=seed, start=start)
        _copy_bias(new, conv)
        return new


def _kernel_count(conv: nn.Conv2d) -> int:
    return conv.out_channels * (conv.in_channels // conv.groups)


def _kernel_key(conv: nn.Conv2d) -> tuple:
    return (*conv.kernel_size, conv.weight.dtype, conv.weight.device)


def _kernel_skip(conv: nn.Conv2d) -> str | None:
    if conv.kernel_size[0] * conv.kernel_size[1] == 1:
        return "its kernels are 1x1 (single numbers): drawing them from a bank would save nothing"
    return None


def _kernel_minimum(convs: Sequence[nn.Conv2d], mode: Mode) -> int:
    """The smallest bank that index mode accepts: one kernel per output of a group reading a single channel."""
    if mode == "mix":
        return 1
    return max([c.out_channels // c.groups for c in convs if c.in_channels == c.groups], default=1)


def _convert_kernel_group(convs: Sequence[nn.Conv2d], size: int, mode: Mode, seed: int) -> list[KernelReuseConv2d]:
    """Kernel-reuse convs for convs of one kernel size, sharing one bank of ``size`` kernels.

    The convs' kernels, conv by conv and channel-major within a conv (the order of the cycle, see
    :func:`_kernel_assignment`), form a pool; bank place ``j`` starts as pool kernel ``j`` when the bank is
    as large as the pool (then every layer draws its own kernels: exact), or as evenly spaced pool kernels,
    each layer's scales or coefficients then set so that its weight has the spread of the conv's (the bank
    mixes kernels of convs of other fan-ins).
    """
    pool = torch.cat([conv.weight.detach().transpose(0, 1).flatten(0, 1) for conv in convs])  # (T, kh, kw)
    order = _order(size, seed).to(pool.device)  # (M,)
    filled = torch.empty((size, *pool.shape[1:]), dtype=pool.dtype, device=pool.device)  # (M, kh, kw)
    filled[order] = _spread(pool, size)  # bank place j (entry order[j]) holds pool kernel j
    bank = KernelBank.from_kernels(filled)
    exact = size >= pool.shape[0]
    new, start = [], 0
    for conv in convs:
        layer = KernelReuseConv2d(bank, conv.in_channels, conv.out_channels, **_conv_kwargs(conv), mode=mode,
                                  seed=seed, start=start)  # fmt: skip
        _copy_bias(layer, conv)
        count = _kernel_count(conv)
        with torch.no_grad():
            if mode == "index":
                layer.scale.fill_(1.0)  # the bank holds conv kernels, no 1/sqrt(C/g) needed
            elif exact:  # one-hot on the layer's own kernels: the conv's weight exactly
                places = order[start : start + count].view(-1, conv.out_channels).t()  # (O, C/g), channel-major
                layer.coef.zero_()
                layer.coef.scatter_(2, places[:, :, None], 1.0)
        if not exact:
            _match_spread(layer, conv)
        new.append(layer)
        start += count
    return new


def kernel_reuse(
    module: nn.Module,
    bank_size: BankSize = None,
    mode: Mode = "index",
    *,
    seed: int = 0,
    include: Include | None = None,
    inplace: bool = False,
) -> nn.Module:
    """Kernel reuse on one conv, or on every compatible conv of a model, one bank per kernel size.

    Convs with the same kernel size (and dtype, device) share one :class:`KernelBank`. In a model, convs with
    1x1 kernels are left alone (a 1x1 kernel is one number; a single 1x1 conv handed in is converted), as are
    subclasses that override ``forward`` and parametrized weights; skipped convs are logged on the ``"reuse"``
    logger at INFO. A conv reached by several paths (the shared conv of a :class:`reuse.LayerReuse`) becomes
    one kernel-reuse conv at all of them.

    Args:
        module: an ``nn.Conv2d`` (returns a :class:`KernelReuseConv2d`) or any model.
        bank_size: kernels per bank: an int, a float (that fraction of the kernels the bank replaces, raised
            where needed to the smallest bank that index mode accepts) or None (as many as it replaces, filled
            with them: the model computes exactly what it did). Mix mode wants a small int (below kh * kw);
            see :class:`KernelReuseConv2d`.
        mode: ``"index"`` or ``"mix"`` (see :class:`KernelReuseConv2d` for what each costs).
        seed: the seed of the assignment (index) or of the initial coefficients (mix).
        include: which convs of a model to convert, a predicate on ``(qualified name, conv)``; all by default.
        inplace: swap the convs of the model handed in; otherwise a converted copy is returned and ``module`` is
            untouched. A single conv is never modified: the new layer is returned.

    Returns:
        The converted conv or model.

    Raises:
        ReuseError: for a bad option, a single conv that cannot be converted, a depthwise conv whose bank is
            too small in index mode, or a mix-mode bank far too large.

    Example:
        >>> import reuse
        >>> net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3), nn.Conv2d(16, 8, 1))
        >>> small = reuse.kernel_reuse(net, bank_size=32)  # one bank of 32 3x3 kernels; the 1x1 conv is left alone
        >>> small[0].bank is small[1].bank, type(small[2]).__name__
        (True, 'Conv2d')
        >>> small(torch.randn(1, 3, 10, 10)).shape
        torch.Size([1, 8, 6, 6])
        >>> x = torch.randn(1, 3, 10, 10)
        >>> torch.equal(reuse.kernel_reuse(net)(x), net(x))  # bank_size=None: no compression, exact
        True
    """
    return _reuse_convs(
        module,
        who="kernel_reuse",
        key=_kernel_key,
        skip=_kernel_skip,
        convert_group=_convert_kernel_group,
        count=_kernel_count,
        minimum=_kernel_minimum,
        bank_size=bank_size,
        mode=mode,
        seed=seed,
        include=include,
        inplace=inplace,
    )
