"""Filter reuse (FRU): whole filters (in_channels x kh x kw) drawn from a bank that many layers share.

Köpüklü et al. (ICIP 2019) reuse whole layers and name filter reuse as a finer grain. Here a
:class:`FilterBank` holds ``M`` filters and every :class:`FilterReuseConv2d` that holds it builds its
weight from them at each call, so one bank serves many layers and each of them sends it gradient.
Two ways to draw a layer's ``O`` filters from the bank (``C/g`` channels per filter)::

    index: weight[o] = scale[o] * bank[entry[o]].roll(shift[o], dims=0)   # one entry, a learned scale
    mix:   weight[o] = sum_m coef[o, m] * bank[m]                           # a learned combination

In index mode a bank filter used twice in one group of a layer would give the same feature map up
to scale, which is wasted work. So each repeated use is rolled along the input channels by another
shift (a channel permutation, as the shuffle of layer reuse is): every use of a filter sees its
group's channels in another rotation. ``roll(shift)`` on the filter equals applying the bank filter
to the group's input channels rolled by ``-shift``, and costs nothing at run time.

:func:`filter_reuse` converts one ``nn.Conv2d`` or every compatible conv of a model, with one bank
per filter shape. A bank as large as what it replaces, filled with the convs' own filters (the
default, ``bank_size=None``), computes exactly what the convs computed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from reuse._banked import Bank, BankedConv2d, Grain, Mode, check_entries, filled, generator, kernel_size_pair, order
from reuse._banked_transform import BankSize, Include, reuse_convs
from reuse._checks import check_int
from reuse._errors import ReuseError

__all__ = ["FilterBank", "FilterReuseConv2d", "filter_reuse"]


class FilterBank(Bank):
    """A bank of ``num_filters`` filters of shape ``(in_channels, kh, kw)``, shared by :class:`FilterReuseConv2d`.

    Initialised as ``nn.Conv2d`` initialises its weight (fan-in ``in_channels * kh * kw``).

    Args:
        num_filters: M, the number of filters in the bank.
        in_channels: channels of one filter: ``in_channels // groups`` of the convs that use the bank.
        kernel_size: ``kh`` (square) or ``(kh, kw)``.
        **factory: ``device`` and ``dtype`` of the filters.

    Example:
        >>> bank = FilterBank(16, 8, 3)
        >>> bank, tuple(bank.weight.shape)
        (FilterBank(16, 8, kernel_size=(3, 3)), (16, 8, 3, 3))
    """

    def __init__(
        self,
        num_filters: int,
        in_channels: int,
        kernel_size: int | tuple[int, int],
        **factory: Any,
    ) -> None:
        self.num_filters = check_int(num_filters, "num_filters", "FilterBank")
        self.in_channels = check_int(in_channels, "in_channels", "FilterBank")
        self.kernel_size = kernel_size_pair(kernel_size, "FilterBank")
        super().__init__(self.num_filters, (self.in_channels, *self.kernel_size), **factory)

    entry = "filter"

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # as nn.Conv2d

    @classmethod
    def from_filters(cls, filters: Tensor) -> FilterBank:
        """A bank holding a copy of ``filters``, a tensor of shape ``(M, in_channels, kh, kw)``.

        Example:
            >>> conv = nn.Conv2d(4, 6, 3)
            >>> torch.equal(FilterBank.from_filters(conv.weight).weight, conv.weight)
            True
        """
        filters = check_entries(filters, 4, "(M, C, kh, kw)", "FilterBank.from_filters")
        bank = cls(filters.shape[0], filters.shape[1], tuple(filters.shape[2:]), device=filters.device)
        return filled(bank, filters)  # (M, C/g, kh, kw)

    from_entries = from_filters

    def extra_repr(self) -> str:
        return f"{self.num_filters}, {self.in_channels}, kernel_size={self.kernel_size}"


def _filter_assignment(
    out_channels: int, groups: int, channels: int, bank_size: int, seed: int, start: int
) -> tuple[Tensor, Tensor]:
    """Index-mode assignment: output ``o`` takes bank filter ``entry[o]`` rolled by ``shift[o]`` channels.

    The layer's outputs take positions ``start, start + 1, ...`` of a cycle through the bank in a seeded
    order; each lap of the cycle rolls the filters by one more channel. Within one group every
    ``(entry, shift)`` pair is then distinct as long as a group has at most ``bank_size * channels``
    outputs; beyond that two outputs would be scaled copies, which is refused.
    """
    per_group = out_channels // groups
    if per_group > bank_size * channels:
        need = math.ceil(per_group / channels)
        raise ReuseError(
            f"index mode: a group of {per_group} outputs can draw at most bank_size x channels = "
            f"{bank_size} x {channels} = {bank_size * channels} distinct (filter, channel roll) pairs, so some "
            f"outputs would be scaled copies of others; use bank_size >= {need} or mode='mix'"
        )
    position = start % bank_size + torch.arange(out_channels)  # (O,), place in the cycle through the bank
    entry = order(bank_size, seed)[position % bank_size]  # (O,), which bank filter
    shift = (position // bank_size) % channels  # (O,), the lap of the cycle: one more channel roll per lap
    return entry, shift


# The filter grain (FilterReuseConv2d.grain): convs with filters of one shape share a bank.


def _key(conv: nn.Conv2d) -> tuple:
    return (conv.in_channels // conv.groups, *conv.kernel_size, conv.weight.dtype, conv.weight.device)


def _count(conv: nn.Conv2d) -> int:
    return conv.out_channels


def _pool(convs: Sequence[nn.Conv2d]) -> Tensor:
    return torch.cat([conv.weight.detach() for conv in convs])  # (T, C/g, kh, kw), the layers' filters in order


def _minimum(convs: Sequence[nn.Conv2d], mode: Mode) -> int:
    """The smallest bank that gives every output of a group its own (filter, roll) pair in index mode."""
    if mode == "mix":
        return 1
    return max(math.ceil(c.out_channels // c.groups / (c.in_channels // c.groups)) for c in convs)


def _start_like(layer: FilterReuseConv2d, conv: nn.Conv2d, places: Tensor, exact: bool) -> None:
    if exact and layer.mode == "mix":  # one-hot on the layer's own filters: the conv's weight exactly
        layer.coef.zero_()
        layer.coef[torch.arange(conv.out_channels), places] = 1.0


class FilterReuseConv2d(BankedConv2d):
    """A 2-D convolution whose filters are drawn from a shared :class:`FilterBank`.

    It takes ``nn.Conv2d``'s arguments except ``kernel_size`` (the bank's) and behaves like one
    (``weight`` is the ``(O, C/g, kh, kw)`` tensor drawn at each call). The bank is a submodule of every
    layer that uses it, so ``parameters()`` of a model counts it once.

    What it costs, with ``O`` outputs, ``C/g`` channels per filter, ``k = kh * kw``, a bank of ``M``
    filters, and ``P`` output positions per image:

    ========  ==================================  ======================================================
    mode      parameters of the layer             multiply-adds
    ========  ==================================  ======================================================
    (conv)    ``O * C/g * k``                     ``P * O * C/g * k`` per image
    index     ``O`` scales, plus the bank         the conv's, plus ``O * C/g * k`` multiplies per call to
                                                  build the weight (a gather and a scaling), whatever the
                                                  batch size
    mix       ``O * M`` coefficients, plus bank   the conv's, plus ``O * M * C/g * k`` per call to build
                                                  the weight (one matmul), whatever the batch size
    ========  ==================================  ======================================================

    The bank (``M * C/g * k`` parameters) is paid once for all its users; a bias adds ``O`` as in a conv.
    So index mode replaces a layer's ``O * C/g * k`` weights by ``O`` and mix mode by ``O * M``.

    Args:
        bank: the filters to draw from; ``bank.in_channels`` must equal ``in_channels // groups``.
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
        start: index mode: the place in that cycle of this layer's first filter; give the layers of one bank
            starts that follow each other (``0, O1, O1 + O2, ...``) so that they use the bank evenly.

    Example:
        >>> bank = FilterBank(8, 16, 3)  # 8 filters of 16 x 3 x 3, for two convs
        >>> a = FilterReuseConv2d(bank, 16, 32, padding=1)
        >>> b = FilterReuseConv2d(bank, 16, 32, padding=1, start=32)
        >>> a(torch.randn(2, 16, 8, 8)).shape
        torch.Size([2, 32, 8, 8])
        >>> sum(p.numel() for p in nn.ModuleList([a, b]).parameters())  # bank once, 32 scales + 32 biases each
        1280
        >>> a.shift[:10].tolist()  # each use of a bank filter takes its channels rolled by another shift
        [0, 0, 0, 0, 0, 0, 0, 0, 1, 1]
        >>> conv = nn.Conv2d(8, 16, 3, padding=1)  # from_conv: the conv's own filters in a bank, exactly
        >>> x = torch.randn(1, 8, 5, 5)
        >>> torch.allclose(FilterReuseConv2d.from_conv(conv)(x), conv(x))
        True
    """

    bank: FilterBank
    grain = Grain(FilterBank, key=_key, count=_count, minimum=_minimum, pool=_pool, start_like=_start_like)

    def _check_bank(self, bank: Bank, channels: int) -> None:
        if bank.in_channels != channels:
            raise ReuseError(
                f"FilterReuseConv2d: {bank} holds filters of {bank.in_channels} channels, but a conv with "
                f"in_channels={self.in_channels}, groups={self.groups} needs filters of {channels} channels; "
                f"draw from a FilterBank(n, {channels}, {bank.kernel_size}) or give the conv in_channels="
                f"{bank.in_channels * self.groups}"
            )

    def _init_index(self, channels: int, seed: int, start: int, factory: dict) -> None:
        entry, shift = _filter_assignment(self.out_channels, self.groups, channels, self.bank.num_filters, seed, start)
        self.register_buffer("entry", entry.to(factory["device"]))  # (O,), bank filter of each output
        self.register_buffer("shift", shift.to(factory["device"]))  # (O,), its roll along the channels
        self.register_buffer("_channels", torch.arange(channels, device=factory["device"]), persistent=False)
        self.scale = nn.Parameter(torch.ones(self.out_channels, **factory))  # (O,)

    def _init_mix(self, channels: int, seed: int, start: int, factory: dict) -> None:
        coef = torch.randn(self.out_channels, self.bank.num_filters, generator=generator(seed, start))  # (O, M)
        self.coef = nn.Parameter(coef.div_(math.sqrt(self.bank.num_filters)).to(**factory))  # rows of unit norm

    @property
    def weight(self) -> Tensor:
        """The layer's filters, drawn from the bank: ``(O, C/g, kh, kw)``."""
        bank = self.bank.weight  # (M, C/g, kh, kw)
        channels = self.in_channels // self.groups
        shape = (self.out_channels, channels, *self.kernel_size)
        if self.mode == "mix":
            return (self.coef @ bank.flatten(1)).view(shape)  # (O, M) @ (M, C/g*kh*kw) -> (O, C/g, kh, kw)
        rolled = (self._channels - self.shift[:, None]) % channels  # (O, C/g), source channel of each channel
        index = self.entry[:, None] * channels + rolled  # (O, C/g), rows of the flattened bank
        weight = bank.flatten(0, 1).index_select(0, index.flatten()).view(shape)  # (O, C/g, kh, kw)
        return weight * self.scale.view(-1, 1, 1, 1)  # (O, C/g, kh, kw)


def filter_reuse(
    module: nn.Module,
    bank_size: BankSize = None,
    mode: Mode = "index",
    *,
    seed: int = 0,
    include: Include | None = None,
    inplace: bool = False,
) -> nn.Module:
    """Filter reuse on one conv, or on every compatible conv of a model, one bank per filter shape.

    Convs whose filters have the same shape (``in_channels // groups``, kernel size; and dtype, device) share
    one :class:`FilterBank`. Convs that cannot be converted are left as they are (logged on the ``"reuse"``
    logger at INFO): subclasses that override ``forward`` (such as a "same"-padding conv) and parametrized
    weights. A conv reached by several paths (the shared conv of a :class:`reuse.LayerReuse`) becomes one
    filter-reuse conv at all of them.

    Args:
        module: an ``nn.Conv2d`` (returns a :class:`FilterReuseConv2d`) or any model.
        bank_size: filters per bank: an int, a float (that fraction of the filters the bank replaces, raised
            where needed to the smallest bank that index mode accepts) or None (as many as it replaces, filled
            with them: the model computes exactly what it did).
        mode: ``"index"`` or ``"mix"`` (see :class:`FilterReuseConv2d` for what each costs).
        seed: the seed of the assignment (index) or of the initial coefficients (mix).
        include: which convs of a model to convert, a predicate on ``(qualified name, conv)``; all by default.
        inplace: swap the convs of the model handed in; otherwise a converted copy is returned and ``module`` is
            untouched. A single conv is never modified: the new layer is returned.

    Returns:
        The converted conv or model.

    Raises:
        ReuseError: for a bad option, a single conv that cannot be converted, or an index-mode bank too small
            to give every output of a group its own (filter, roll) pair.

    Example:
        >>> import reuse
        >>> net = nn.Sequential(nn.Conv2d(3, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3), nn.Conv2d(32, 32, 3))
        >>> small = reuse.filter_reuse(net, bank_size=0.25)  # a quarter of the filters of each shape
        >>> small[2].bank is small[3].bank, small[2].bank.num_filters, small[0].bank.num_filters
        (True, 16, 11)
        >>> small(torch.randn(1, 3, 12, 12)).shape
        torch.Size([1, 32, 6, 6])
        >>> x = torch.randn(1, 3, 12, 12)
        >>> torch.allclose(reuse.filter_reuse(net)(x), net(x))  # bank_size=None: no compression, same weights
        True
    """
    return reuse_convs(
        module,
        FilterReuseConv2d,
        who="filter_reuse",
        bank_size=bank_size,
        mode=mode,
        seed=seed,
        include=include,
        inplace=inplace,
    )
