"""The layers of LruNet's stem and head that are not reuse (private; users import from ``reuse.models``): the
self-concatenation that doubles the channels, timm's global pooling, and timm's feature indices."""

import torch
from torch import Tensor, nn

from reuse._errors import ReuseError

__all__ = ["GlobalPool", "SelfConcat", "take_indices"]


class SelfConcat(nn.Module):
    """Concatenate a tensor with itself along the channels, doubling them without parameters."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, x], dim=1)  # (B, 2C, H, W)


_POOLS = ("avg", "max", "avgmax", "")


class GlobalPool(nn.Module):
    """Global pooling of the head, timm's ``global_pool`` names: ``"avg"`` (the paper's), ``"max"``,
    ``"avgmax"`` (their mean) or ``""`` (none: the class maps or features stay ``(B, C, h, w)``).

    Example:
        >>> GlobalPool("max")(torch.arange(8.0).view(1, 2, 2, 2)).tolist()
        [[3.0, 7.0]]
    """

    def __init__(self, pool_type: str = "avg") -> None:
        super().__init__()
        if pool_type not in _POOLS:
            raise ReuseError(f"LruNet: global_pool must be one of {_POOLS}, got {pool_type!r}")
        self.pool_type = pool_type

    def forward(self, x: Tensor) -> Tensor:
        if self.pool_type == "":
            return x  # (B, C, h, w)
        if self.pool_type == "max":
            return x.amax((2, 3))  # (B, C)
        avg = nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)  # (B, C)
        if self.pool_type == "avgmax":
            return 0.5 * (avg + x.amax((2, 3)))  # (B, C)
        return avg

    def extra_repr(self) -> str:
        return f"pool_type={self.pool_type!r}"


def take_indices(levels: int, indices: int | list[int] | tuple[int, ...] | None) -> tuple[list[int], int]:
    """timm's feature indices: None (all levels), an int n (the last n) or a list (negative counts from the
    end). Returns the levels taken, ascending, and the largest."""
    if indices is None:
        take = list(range(levels))
    elif isinstance(indices, int) and not isinstance(indices, bool):
        if not 0 < indices <= levels:
            raise ReuseError(f"LruNet: indices={indices} asks for the last {indices} of {levels} feature levels")
        take = list(range(levels - indices, levels))
    else:
        take = sorted(i + levels if i < 0 else i for i in indices)
        if not take or not all(0 <= i < levels for i in take):
            raise ReuseError(
                f"LruNet: indices={list(indices)} must name feature levels in -{levels}..{levels - 1} (stem, stages)"
            )
    return take, max(take)
