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
from typing import Any

import torch
from torch import Tensor, nn

from reuse._banked import Bank, BankedConv2d, Grain, Mode, check_entries, filled, generator, kernel_size_pair, order
from reuse._banked_transform import BankSize, reuse_convs
from reuse._checks import check_int
from reuse._errors import ReuseError

__all__ = ["KernelBank", "KernelReuseConv2d", "kernel_reuse"]

_MAX_MIX_COEFFICIENTS = 1 << 28
"""Refuse a mix-mode layer with more coefficients than this (1 GiB in float32): a sign of a bank far too large."""


class KernelBank(Bank):
    """A bank of ``num_kernels`` kernels of shape ``(kh, kw)``, shared by :class:`KernelReuseConv2d` layers.

    Initialised uniform in ``±1/sqrt(kh * kw)``, as ``nn.Conv2d`` initialises a weight with one channel per
    filter; a layer with ``C/g`` channels per filter starts its scales at ``1/sqrt(C/g)`` to match a conv.

    Args:
        num_kernels: M, the number of kernels in the bank.
        kernel_size: ``kh`` (square) or ``(kh, kw)``.
        **factory: ``device`` and ``dtype`` of the kernels.

    Example:
        >>> bank = KernelBank(32, 3)
        >>> bank, tuple(bank.weight.shape)
        (KernelBank(32, kernel_size=(3, 3)), (32, 3, 3))
    """

    def __init__(
        self,
        num_kernels: int,
        kernel_size: int | tuple[int, int],
        **factory: Any,
    ) -> None:
        self.num_kernels = check_int(num_kernels, "num_kernels", "KernelBank")
        self.kernel_size = kernel_size_pair(kernel_size, "KernelBank")
        super().__init__(self.num_kernels, self.kernel_size, **factory)

    entry = "kernel"

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
        kernels = check_entries(kernels, 3, "(M, kh, kw)", "KernelBank.from_kernels")
        bank = cls(kernels.shape[0], tuple(kernels.shape[1:]), device=kernels.device)
        return filled(bank, kernels)  # (M, kh, kw)

    from_entries = from_kernels

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
    entry = order(bank_size, seed)[position % bank_size]  # (O, C/g)
    per_group = out_channels // groups
    if channels == 1 and per_group > bank_size:
        raise ReuseError(
            f"index mode: a group of {per_group} outputs reads one input channel, so with bank_size={bank_size} "
            f"some outputs would take the same bank kernel and be scaled copies of others; use bank_size >= "
            f"{per_group} or mode='mix'"
        )
    return entry


# The kernel grain (KernelReuseConv2d.grain): convs with kernels of one size share a bank.


def _key(conv: nn.Conv2d) -> tuple:
    return (*conv.kernel_size, conv.weight.dtype, conv.weight.device)


def _count(conv: nn.Conv2d) -> int:
    return conv.out_channels * (conv.in_channels // conv.groups)


def _skip(conv: nn.Conv2d) -> str | None:
    if conv.kernel_size[0] * conv.kernel_size[1] == 1:
        return "its kernels are 1x1 (single numbers): drawing them from a bank would save nothing"
    return None


def _minimum(convs: Sequence[nn.Conv2d], mode: Mode) -> int:
    """The smallest bank that index mode accepts: one kernel per output of a group reading a single channel."""
    if mode == "mix":
        return 1
    return max([c.out_channels // c.groups for c in convs if c.in_channels == c.groups], default=1)


def _pool(convs: Sequence[nn.Conv2d]) -> Tensor:
    """The convs' kernels, conv by conv and channel-major within a conv (the cycle's order, see
    :func:`_kernel_assignment`): ``(T, kh, kw)``."""
    return torch.cat([conv.weight.detach().transpose(0, 1).flatten(0, 1) for conv in convs])


def _start_like(layer: KernelReuseConv2d, conv: nn.Conv2d, places: Tensor, exact: bool) -> None:
    if layer.mode == "index":
        layer.scale.fill_(1.0)  # the bank holds conv kernels, no 1/sqrt(C/g) needed
    elif exact:  # one-hot on the layer's own kernels: the conv's weight exactly
        places = places.view(-1, conv.out_channels).t()  # (O, C/g), channel-major
        layer.coef.zero_()
        layer.coef.scatter_(2, places[:, :, None], 1.0)


class KernelReuseConv2d(BankedConv2d):
    """A 2-D convolution whose kernels are drawn from a shared :class:`KernelBank`: the kernel-level twin of
    :class:`~reuse.FilterReuseConv2d`, which it behaves like (``weight`` is built at each call, the bank counts
    once in a model's ``parameters()``).

    Its costs, for ``O`` outputs of ``C/g`` input channels each, kernels of ``k = kh * kw`` numbers, ``M``
    kernels in the bank and ``P`` output positions per image:

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

    It takes :class:`~reuse.FilterReuseConv2d`'s arguments, with a :class:`KernelBank` as ``bank`` (its
    ``kernel_size`` is the layer's); ``start`` counts kernels: give the layers of one bank starts that follow
    each other (``0, O1 * C1/g1, ...``) so that they use the bank evenly.

    Example:
        >>> bank = KernelBank(64, 3)
        >>> a = KernelReuseConv2d(bank, 16, 32, padding=1, bias=False)
        >>> b = KernelReuseConv2d(bank, 32, 32, padding=1, bias=False, start=512)
        >>> b(a(torch.randn(2, 16, 8, 8))).shape
        torch.Size([2, 32, 8, 8])
        >>> sum(p.numel() for p in nn.ModuleList([a, b]).parameters())  # bank 64*9, then 16*32 + 32*32 scales
        2112
        >>> conv = nn.Conv2d(4, 4, 5, padding=2)
        >>> same = KernelReuseConv2d.from_conv(conv)  # the conv's 16 kernels in a bank of its own: exact
        >>> torch.equal(same(torch.ones(1, 4, 6, 6)), conv(torch.ones(1, 4, 6, 6))), same.bank.num_kernels
        (True, 16)
    """

    bank: KernelBank
    grain = Grain(KernelBank, key=_key, count=_count, minimum=_minimum, pool=_pool, start_like=_start_like, skip=_skip)

    def _init_index(self, channels: int, seed: int, start: int, factory: dict) -> None:
        entry = _kernel_assignment(self.out_channels, self.groups, channels, self.bank.num_kernels, seed, start)
        self.register_buffer("entry", entry.to(factory["device"]))  # (O, C/g), bank kernel of each kernel
        self.scale = nn.Parameter(torch.full((self.out_channels, channels), channels**-0.5, **factory))  # (O, C/g)

    def _init_mix(self, channels: int, seed: int, start: int, factory: dict) -> None:
        size = self.out_channels * channels * self.bank.num_kernels
        if size > _MAX_MIX_COEFFICIENTS:
            kh, kw = self.kernel_size
            raise ReuseError(
                f"KernelReuseConv2d: mode='mix' with a bank of {self.bank.num_kernels} kernels needs O x C/g x M = "
                f"{self.out_channels} x {channels} x {self.bank.num_kernels} = {size} coefficients; a mix of more "
                f"than kh x kw = {kh * kw} kernels adds coefficients but nothing a kernel could not already be, so "
                "use a small bank (bank_size < kh * kw) or mode='index'"
            )
        coef = torch.randn(self.out_channels, channels, self.bank.num_kernels, generator=generator(seed, start))
        self.coef = nn.Parameter(coef.div_(math.sqrt(self.bank.num_kernels * channels)).to(**factory))  # (O, C/g, M)

    @property
    def weight(self) -> Tensor:
        """The layer's kernels, drawn from the bank: ``(O, C/g, kh, kw)``."""
        bank = self.bank.weight  # (M, kh, kw)
        shape = (self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        if self.mode == "mix":
            return (self.coef.flatten(0, 1) @ bank.flatten(1)).view(shape)  # (O*C/g, M) @ (M, kh*kw)
        weight = bank.index_select(0, self.entry.flatten()).view(shape)  # (O, C/g, kh, kw)
        return weight * self.scale[:, :, None, None]  # (O, C/g, kh, kw)


def kernel_reuse(module: nn.Module, bank_size: BankSize = None, mode: Mode = "index", **options: Any) -> nn.Module:
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
        **options: ``seed``, ``include`` and ``inplace``, as for :func:`reuse.filter_reuse`: the seed of the
            assignment or of the initial coefficients, which convs to convert (a predicate on ``(qualified name,
            conv)``), and whether to swap the convs of the model handed in (otherwise a copy is converted).

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
        >>> torch.allclose(reuse.kernel_reuse(net)(x), net(x))  # bank_size=None: no compression, same weights
        True
    """
    return reuse_convs(module, KernelReuseConv2d, who="kernel_reuse", bank_size=bank_size, mode=mode, **options)
