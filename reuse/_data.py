"""Calibration data as the data-aware transforms take it (private): a tensor of inputs, or an iterable of
batches (tensors, or ``(inputs, labels, ...)`` tuples and lists as a ``DataLoader`` yields them), read once
into a list of float batches so that a transform can pass over them several times."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from reuse._checks import check_int
from reuse._errors import ReuseError

__all__ = ["CalibrationData", "model_device", "take_batches"]

CalibrationData = Tensor | Iterable[Tensor] | Iterable[tuple | list]
"""Unlabeled inputs: a tensor ``(N, C, H, W)`` (cut into batches of 256) or an iterable of batches, each a tensor
or a tuple/list whose first item is the input (labels are ignored)."""

_BATCH = 256  # batch size when a whole tensor is handed in


def take_batches(data: object, images: int, who: str) -> list[Tensor]:
    """The first ``images`` inputs of ``data`` as float batches (the last one cut to size).

    Raises ReuseError for an empty source, a batch that is not a float tensor with a batch dimension, and batches
    whose shapes (but for the batch size) differ.

    Example:
        >>> [b.shape[0] for b in take_batches(torch.rand(600, 3, 8, 8), 520, "calibrate")]
        [256, 256, 8]
        >>> loader = [(torch.rand(4, 3, 8, 8), torch.zeros(4)) for _ in range(3)]
        >>> [tuple(b.shape) for b in take_batches(loader, 10, "calibrate")]
        [(4, 3, 8, 8), (4, 3, 8, 8), (2, 3, 8, 8)]
    """
    check_int(images, "images", who, about="how many calibration inputs to read")
    if isinstance(data, Tensor):
        data = data.split(_BATCH)
    elif not isinstance(data, Iterable) or isinstance(data, (str, bytes, dict)):
        raise ReuseError(
            f"{who}: data must be a tensor of inputs or an iterable of batches (a DataLoader), "
            f"got {type(data).__name__}"
        )
    out: list[Tensor] = []
    seen = 0
    for i, item in enumerate(data):
        x = item[0] if isinstance(item, (tuple, list)) and item else item
        _check_batch(x, i, out[0] if out else None, who)
        x = x[: images - seen]  # (b, ...) the last batch cut to what is still wanted
        out.append(x)
        seen += x.shape[0]
        if seen >= images:
            break
    if not out:
        raise ReuseError(f"{who}: data yielded no batch; give at least one batch of inputs (a tensor (N, C, H, W))")
    return out


def _check_batch(x: object, i: int, first: Tensor | None, who: str) -> None:
    if not isinstance(x, Tensor):
        raise ReuseError(
            f"{who}: batch {i} of data is a {type(x).__name__}; each batch must be a tensor of inputs, or a "
            "tuple/list whose first item is one"
        )
    if x.dim() < 2 or x.shape[0] == 0:
        raise ReuseError(f"{who}: batch {i} of data has shape {tuple(x.shape)}; it needs a non-empty batch dimension")
    if not x.is_floating_point():
        raise ReuseError(
            f"{who}: batch {i} of data is {x.dtype}; give the inputs as the model takes them (float, scaled and "
            "normalised as in training), e.g. images.float() / 255"
        )
    if first is not None and x.shape[1:] != first.shape[1:]:
        raise ReuseError(
            f"{who}: batch {i} of data has shape {tuple(x.shape)} but batch 0 had {tuple(first.shape)}; "
            "every batch must have the same shape but for the batch size"
        )


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (the CPU for a model without either)."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")
