"""Calibration for int8: the batches checked against the model's input, and what they cover of each group of
tensors (:class:`CalibrationCoverage`), with warnings for poor coverage and class-skewed samples."""

from __future__ import annotations

import copy
import importlib
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from reuse._errors import ReuseError
from reuse.deploy._common import ort_session


def calibration_batches(
    calibration: Iterable[Any], model_proto: Any, input_range: tuple[float, float] | None
) -> list[Any]:
    """The calibration batches as float32 arrays, checked against the graph's first input (rank, fixed sizes)
    and against ``input_range`` (see :func:`_check_scale`)."""
    batches = _float_batches(calibration)
    _check_shapes(batches, _input_dims(model_proto))
    _check_scale(batches, input_range)
    return batches


def _input_dims(model_proto: Any) -> list[int | None]:
    """The sizes of the graph's first input: an int where fixed, ``None`` where symbolic (the batch)."""
    dims = model_proto.graph.input[0].type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims]


def _float_batches(calibration: Iterable[Any]) -> list[Any]:
    """The calibration batches as float32 arrays; integer, boolean or non-numeric batches are refused (the model
    takes its inputs preprocessed as in training, and a cast would hide a missing ``/ 255``)."""
    np = importlib.import_module("numpy")
    batches = []
    for index, batch in enumerate(calibration):
        if isinstance(batch, (tuple, list)) and batch:
            batch = batch[0]  # (images, labels) pairs from a DataLoader: the images
        array = batch.detach().cpu().numpy() if isinstance(batch, Tensor) else np.asarray(batch)
        if array.dtype.kind != "f":
            raise ReuseError(
                f"calibration batch {index} has dtype {array.dtype} and shape {tuple(array.shape)}; calibration "
                "must be float inputs preprocessed exactly as for the model, e.g. images.float() / 255 for "
                "pixels in [0, 1]"
            )
        batches.append(np.ascontiguousarray(array, dtype="float32"))
    if not batches:
        raise ReuseError(
            "calibration holds no batch; pass an iterable of input batches (tensors or arrays), "
            "a few hundred representative images in all"
        )
    return batches


def _check_shapes(batches: list[Any], dims: list[int | None]) -> None:
    """Every batch has the model input's rank and its fixed sizes (``None``: a free axis such as the batch)."""
    want = "(" + ", ".join("n" if d is None else str(d) for d in dims) + ")"
    for index, batch in enumerate(batches):
        fits = batch.ndim == len(dims) and all(d is None or d == n for d, n in zip(dims, batch.shape))
        if not fits:
            raise ReuseError(
                f"calibration batch {index} has shape {tuple(batch.shape)}, the model's input is {want}; "
                f"pass batches of shape {want}"
                + (" (add the channel axis: images[:, None])" if batch.ndim + 1 == len(dims) else "")
            )


def _check_scale(batches: list[Any], input_range: tuple[float, float] | None) -> None:
    """Calibration values must be finite and, with ``input_range``, inside it (1% of its span of slack);
    without it, whole numbers above 1 everywhere (raw 0-255 pixels fed to a model trained on [0, 1]) are refused.

    Example:
        >>> import numpy as np
        >>> _check_scale([np.full((2, 3), 200.0)], None)
        Traceback (most recent call last):
        ...
        reuse._errors.ReuseError: calibration values are whole numbers from 200 to 200: raw 0-255 pixels? ...
    """
    np = importlib.import_module("numpy")
    low = min(float(b.min()) for b in batches if b.size)
    high = max(float(b.max()) for b in batches if b.size)
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ReuseError("calibration holds NaN or infinite values; pass the inputs the model sees in use")
    if input_range is not None:
        lo, hi = (float(v) for v in input_range)
        slack = 0.01 * (hi - lo)
        if low < lo - slack or high > hi + slack:
            raise ReuseError(
                f"calibration values span [{low:.4g}, {high:.4g}], outside input_range=({lo:g}, {hi:g}); "
                "preprocess the calibration inputs as for the model (e.g. images / 255 for [0, 1])"
            )
        return
    if high > 1.5 and all(np.array_equal(b, np.round(b)) for b in batches):
        raise ReuseError(
            f"calibration values are whole numbers from {low:.4g} to {high:.4g}: raw 0-255 pixels? ... scale them "
            "as the model was trained (images / 255 for [0, 1]), or pass input_range=(0, 255) if the model "
            "takes such inputs"
        )


@dataclass
class CalibrationCoverage:
    """What the calibration data showed of one group of quantized tensors: a run of reused blocks (all uses'
    tensors of ``stage1/uses.*``) or a module outside runs (``stem``).

    ``stable`` is the width of each tensor's range seen on every other calibration batch over its width on all
    batches, at worst over the group: near 1, more images of the same kind would not widen the ranges; well
    below 1, the ranges still grow and rarer inputs will be clipped (more, or more varied, images help).
    ``constant`` is the fraction of channels that held one value over all calibration inputs (dead for this
    data; a sample of one class leaves more of them).

    Example:
        >>> print(CalibrationCoverage("stage1/uses.*", 40, -3.2, 6.3, 0.93, 0.05))
        stage1/uses.*: 40 tensors, range [-3.2, 6.3], stable 0.93, constant channels 5.0%
    """

    group: str  # module path; ``uses.*`` stands for every use of a run of reused blocks
    tensors: int  # quantized tensors in the group
    low: float  # smallest value seen in any of them
    high: float  # largest
    stable: float | None  # worst range width on half the batches over that on all; None with one batch
    constant: float  # fraction of the group's channels constant over the calibration inputs

    def __str__(self) -> str:
        stable = "n/a (one batch)" if self.stable is None else f"{self.stable:.2f}"
        return (
            f"{self.group}: {self.tensors} tensors, range [{self.low:.3g}, {self.high:.3g}], stable {stable}, "
            f"constant channels {100 * self.constant:.1f}%"
        )


def _group(node_name: str) -> str:
    """The coverage group of a node: its module path up to a reused run's ``uses.<i>`` (as ``uses.*``), else the
    first module of its path.

    Example:
        >>> _group("/stage1/uses.3/dw/Conv"), _group("/stem/stem.0/Conv"), _group("/Relu")
        ('stage1/uses.*', 'stem', '(top level)')
    """
    parts = [p for p in node_name.split("/") if p][:-1]  # module path, the op's own name dropped
    for i, part in enumerate(parts):
        if part.startswith("uses.") and part[5:].isdigit():
            return "/".join([*parts[:i], "uses.*"])
    return parts[0] if parts else "(top level)"


_STABLE_WARN = 0.8  # a group whose ranges still grow by more than 1/0.8 - 1 = 25% from half the data to all
_CLASSES_WARN = 0.5  # calibration predicted as fewer than half of the output classes
_TOP_CLASS_WARN = 0.5  # or (4 classes or more) more than half of it as one class
_QUANTIZED_OPS = (  # the ops whose outputs are coverage groups' tensors
    "Conv",
    "Add",
    "Mul",
    "Relu",
    "Clip",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "Gemm",
    "MatMul",
    "Concat",
    "Gather",
    "Flatten",
    "Reshape",
    "Sigmoid",
    "HardSigmoid",
    "Resize",
)


def coverage(model_proto: Any, batches: list[Any]) -> tuple[list[CalibrationCoverage], list[str]]:
    """Run the fp32 graph on the calibration batches and say, per group, what ranges they gave and how settled
    those are; and which of the output's classes they are predicted as. Returns the groups and warnings."""
    np = importlib.import_module("numpy")
    onnx = importlib.import_module("onnx")
    graph = model_proto.graph
    outs = [(n.name, n.output[0]) for n in graph.node if n.op_type in _QUANTIZED_OPS and n.output]
    final = graph.output[0].name
    probe = copy.deepcopy(model_proto)
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(o) for _, o in outs if o != final)
    session = ort_session(probe.SerializeToString(), "quantize_onnx")
    names = [o.name for o in session.get_outputs()]
    feed = session.get_inputs()[0].name
    lows: dict[str, list[Any]] = {}  # per tensor, per batch: (C,) per-channel minima
    highs: dict[str, list[Any]] = {}
    classes: list[Any] = []
    for batch in batches:
        for name, value in zip(names, session.run(names, {feed: batch})):
            if value.dtype.kind != "f" or value.ndim < 2 or not value.size:
                continue
            axes = (0, *range(2, value.ndim))
            lows.setdefault(name, []).append(value.min(axis=axes))  # (C,)
            highs.setdefault(name, []).append(value.max(axis=axes))  # (C,)
            if name == final and value.ndim == 2 and value.shape[1] > 1:
                classes.append(value.argmax(1))  # (B,)
    groups: dict[str, list[str]] = {}
    for node, out in outs:
        if out in lows:
            groups.setdefault(_group(node), []).append(out)
    report, warns = [], []
    for group, tensors in groups.items():
        lo = [np.stack(lows[t]) for t in tensors]  # each (batches, C)
        hi = [np.stack(highs[t]) for t in tensors]
        stable = None
        if len(batches) > 1:
            ratios = []
            for a, b in zip(lo, hi):
                full = float(b.max() - a.min())
                ratios.append(float(b[::2].max() - a[::2].min()) / full if full > 0 else 1.0)
            stable = min(ratios)
        channels = sum(a.shape[1] for a in lo)
        constant = sum(int(np.sum(b.max(0) - a.min(0) == 0)) for a, b in zip(lo, hi)) / max(channels, 1)
        low = min(float(a.min()) for a in lo)
        high = max(float(b.max()) for b in hi)
        report.append(CalibrationCoverage(group, len(tensors), low, high, stable, constant))
        if stable is not None and stable < _STABLE_WARN:
            warns.append(
                f"calibration covers {group} poorly: its ranges on half the batches are {stable:.0%} of those on "
                "all, so they still grow with more data; calibrate on more, or more varied, inputs"
            )
    if classes:
        predicted = np.concatenate(classes)
        seen = len(np.unique(predicted))
        dim = session.get_outputs()[names.index(final)].shape[1]
        total = dim if isinstance(dim, int) and dim > 1 else int(predicted.max()) + 1
        counts = np.bincount(predicted, minlength=total)  # (K,)
        top = int(counts.argmax())
        share = float(counts[top]) / len(predicted)
        if seen < _CLASSES_WARN * total or (total >= 4 and share > _TOP_CLASS_WARN):
            warns.append(
                f"the calibration inputs are predicted as {seen} of the {total} classes, {share:.0%} as class {top}: "
                "a skewed sample (e.g. the first images of a class-sorted set); calibrate on a random sample of "
                "the training set"
            )
    return report, warns
