"""Per-use low-rank deltas: relaxed layer reuse.

Plain layer reuse applies one weight ``W`` at every use. Relaxed reuse (after "Relaxed Recursive Transformers",
Bae et al., ICLR 2025) gives use ``i`` a low-rank correction of its own: it computes with ``W + B_i A_i``. For a
convolution the weight ``(O, C/g, kh, kw)`` is read per group ``j`` as a matrix ``W_j`` of shape
``(O/g, C/g * kh * kw)``, and each group has its own factors::

    weight_i[group j] = W_j + B_ij @ A_ij        B_ij: (O/g, r),  A_ij: (r, C/g * kh * kw)

plus a per-use bias offset when the layer has a bias. At rank 0 this is plain reuse; at full rank (``min(O/g,
C/g * kh * kw)``) any weights can be reached, so a stack of different trained blocks converts exactly
(:func:`init_from_blocks`: truncated SVD of each block's difference to the shared weight).

:class:`LowRankConv` and :class:`LowRankLinear` wrap a shared ``nn.Conv1d/2d/3d`` or ``nn.Linear`` (the same
module object in every use) and hold one use's factors. ``LayerReuse(..., delta_rank=r)`` puts them in.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reuse._checks import check_int
from reuse._errors import ReuseError

__all__ = [
    "DeltaRank",
    "LowRank",
    "LowRankConv",
    "LowRankLinear",
    "delta_params",
    "full_rank",
    "init_from_blocks",
    "resolve_rank",
]

DeltaRank = int | float
"""The rank of the per-use deltas: an int (the rank of each group's delta, capped at the layer's full rank), a
float in (0, 1] (that fraction of each layer's full rank, rounded up) or 0 (no deltas: plain reuse)."""

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def full_rank(module: nn.Module) -> int:
    """The rank at which a delta can be any change of the layer's weight: ``min(O/g, C/g * kh * kw)`` for a
    conv, ``min(out, in)`` for a linear.

    Example:
        >>> full_rank(nn.Conv2d(64, 128, 3)), full_rank(nn.Conv2d(32, 32, 3, groups=32)), full_rank(nn.Linear(8, 5))
        (128, 1, 5)
    """
    rows, cols = _matrix_shape(module)
    return min(rows, cols)


def _matrix_shape(module: nn.Module) -> tuple[int, int]:
    """``(rows, cols)`` of one group's weight matrix."""
    if isinstance(module, _CONVS):
        return module.out_channels // module.groups, module.weight[0].numel()
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    raise ReuseError(f"per-use deltas: {type(module).__name__} is not an nn.Conv1d/2d/3d or nn.Linear")


def _groups(module: nn.Module) -> int:
    return module.groups if isinstance(module, _CONVS) else 1


def check_rank(rank: object, who: str) -> DeltaRank:
    """``rank`` if it is a :data:`DeltaRank`, else a ReuseError naming ``who``."""
    ok_int = isinstance(rank, int) and not isinstance(rank, bool) and rank >= 0
    ok_float = isinstance(rank, float) and math.isfinite(rank) and 0.0 < rank <= 1.0
    if not (ok_int or ok_float):
        raise ReuseError(
            f"{who}: delta_rank must be an int >= 0 (the rank of each use's delta; 0: none) or a float in (0, 1] "
            f"(a fraction of each layer's full rank), got {rank!r}"
        )
    return rank  # type: ignore[return-value]


def resolve_rank(rank: DeltaRank, module: nn.Module) -> int:
    """The rank of ``module``'s deltas: an int capped at its full rank, or a fraction of it rounded up.

    Example:
        >>> conv = nn.Conv2d(16, 16, 3)  # full rank min(16, 144) = 16
        >>> resolve_rank(4, conv), resolve_rank(100, conv), resolve_rank(0.25, conv), resolve_rank(1.0, conv)
        (4, 16, 4, 16)
    """
    full = full_rank(module)
    if isinstance(rank, float):
        return max(1, math.ceil(rank * full - 1e-9))
    return min(rank, full)


def delta_params(module: nn.Module, rank: int) -> int:
    """Parameters of one use's delta of rank ``rank`` on ``module``: ``g * r * (O/g + C/g * k)``, plus ``O`` for
    the bias offset of a layer with a bias.

    Example:
        >>> delta_params(nn.Conv2d(8, 8, 3, bias=False), 2)  # 2 * (8 + 72)
        160
    """
    rows, cols = _matrix_shape(module)
    bias = module.bias.numel() if module.bias is not None else 0
    return _groups(module) * rank * (rows + cols) + bias


class LowRank(nn.Module):
    """One use's delta on a shared layer: factors ``B`` ``(g, rows, r)`` and ``A`` ``(g, r, cols)``, and a bias
    offset; the shared layer is held as ``base`` (the same object in every use)."""

    def __init__(self, base: nn.Module, rank: int) -> None:
        super().__init__()
        rows, cols = _matrix_shape(base)
        check_int(rank, "rank", type(self).__name__, at_most=min(rows, cols), about=f"the full rank of {base}")
        like = base.weight
        factory = dict(device=like.device, dtype=like.dtype)
        g = _groups(base)
        self.base = base
        self.rank = rank
        # LoRA's start: A random, B zero, so a new delta changes nothing until it is trained.
        self.A = nn.Parameter(torch.empty(g, rank, cols, **factory))  # (g, r, C/g * k)
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.B = nn.Parameter(torch.zeros(g, rows, rank, **factory))  # (g, O/g, r)
        self.bias_delta = nn.Parameter(torch.zeros_like(base.bias)) if base.bias is not None else None  # (O,)

    @property
    def delta(self) -> Tensor:
        """``B @ A`` in the shape of the shared weight."""
        return torch.bmm(self.B, self.A).reshape(self.base.weight.shape)  # (g, O/g, C/g*k) -> weight shape

    @property
    def weight(self) -> Tensor:
        """This use's weight: the shared one plus the delta."""
        return self.base.weight + self.delta

    @property
    def bias(self) -> Tensor | None:
        """This use's bias: the shared one plus the offset (None without a bias)."""
        shared, offset = self.base.bias, self.bias_delta
        if shared is None or offset is None:
            return shared
        return shared + offset

    @torch.no_grad()
    def set_delta(self, delta: Tensor, bias_delta: Tensor | None = None) -> None:
        """Set the factors to the best rank-``r`` approximation of ``delta`` (weight shaped), per group, by a
        truncated SVD in float64 (exact when ``r`` is the full rank), and the bias offset to ``bias_delta``."""
        g, rows, r = self.B.shape
        mats = delta.detach().to(torch.float64).reshape(g, rows, -1)  # (g, O/g, C/g*k)
        u, s, vh = torch.linalg.svd(mats, full_matrices=False)  # (g, O/g, q), (g, q), (g, q, C/g*k)
        root = s[:, :r].sqrt()  # (g, r)
        self.B.copy_(u[:, :, :r] * root[:, None, :])  # (g, O/g, r)
        self.A.copy_(root[:, :, None] * vh[:, :r])  # (g, r, C/g*k)
        if self.bias_delta is not None:
            self.bias_delta.copy_(bias_delta if bias_delta is not None else torch.zeros_like(self.bias_delta))

    def merged(self) -> nn.Module:
        """A plain layer computing this use: a copy of ``base`` with the delta added to its weight and bias."""
        import copy

        layer = copy.deepcopy(self.base)
        with torch.no_grad():
            layer.weight = nn.Parameter(self.weight.detach().clone(), requires_grad=self.base.weight.requires_grad)
            if self.bias_delta is not None:
                layer.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=self.base.bias.requires_grad)
        return layer

    def extra_repr(self) -> str:
        return f"rank={self.rank}"


class LowRankConv(LowRank):
    """A shared ``nn.Conv1d/2d/3d`` seen by one use, with that use's low-rank delta.

    Example:
        >>> shared = nn.Conv2d(8, 8, 3, padding=1)
        >>> a, b = LowRankConv(shared, rank=2), LowRankConv(shared, rank=2)  # two uses of one conv
        >>> x = torch.randn(1, 8, 5, 5)
        >>> torch.allclose(a(x), shared(x))  # B starts at zero: no change until trained
        True
        >>> sum(p.numel() for p in nn.ModuleList([a, b]).parameters())  # conv once (576 + 8), 2 x (2*(8+72) + 8)
        920
    """

    def __init__(self, base: nn.Module, rank: int) -> None:
        if not isinstance(base, _CONVS):
            raise ReuseError(f"LowRankConv: needs an nn.Conv1d/2d/3d, got {type(base).__name__}")
        super().__init__(base, rank)

    def forward(self, x: Tensor) -> Tensor:
        return self.base._conv_forward(x, self.weight, self.bias)  # (B, O, ...), the conv's own padding rules


class LowRankLinear(LowRank):
    """A shared ``nn.Linear`` seen by one use, with that use's low-rank delta (one group).

    Example:
        >>> layer = LowRankLinear(nn.Linear(6, 4), rank=1)
        >>> layer(torch.randn(3, 6)).shape, tuple(layer.A.shape), tuple(layer.B.shape)
        (torch.Size([3, 4]), (1, 1, 6), (1, 4, 1))
    """

    def __init__(self, base: nn.Module, rank: int) -> None:
        if not isinstance(base, nn.Linear):
            raise ReuseError(f"LowRankLinear: needs an nn.Linear, got {type(base).__name__}")
        super().__init__(base, rank)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)  # (..., out)


def low_rank(base: nn.Module, rank: int) -> LowRank:
    """The delta wrapper for ``base``: :class:`LowRankConv` or :class:`LowRankLinear`."""
    return LowRankLinear(base, rank) if isinstance(base, nn.Linear) else LowRankConv(base, rank)


def takes_delta(module: nn.Module) -> bool:
    """A plain conv or linear (subclasses may compute otherwise with their weight, so they are left shared)."""
    return type(module) in (*_CONVS, nn.Linear)


@torch.no_grad()
def init_from_blocks(deltas: dict[str, LowRank], block: nn.Module) -> None:
    """Set each delta (by its path relative to a use) to the truncated SVD of ``block``'s layer at that path
    minus the shared layer: the use then computes ``block``'s weights as closely as its rank allows."""
    for path, delta in deltas.items():
        target = block.get_submodule(path)
        bias = None
        if delta.bias_delta is not None and target.bias is not None:
            bias = target.bias - delta.base.bias
        delta.set_delta(target.weight - delta.base.weight, bias)
