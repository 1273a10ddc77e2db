"""Bias correction of weight rounding for int8 (Nagel et al., "Data-Free Quantization Through Weight
Equalization and Bias Correction", ICCV 2019, with the input means measured on the calibration data).

Rounding a conv's weight ``W`` to int8 adds ``(W_q - W) * x`` to its output: an error whose mean over the data,
``conv(E[x], W_q - W)``, is a per-channel shift that every later layer inherits. :func:`correct_bias` takes that
mean out of each conv's float bias before quantization, so that on the calibration data the int8 conv's output
has the float conv's mean. Measured on the authors' 14-LruNet (CIFAR-10 copy, 512 random calibration images):
int8 83.66% without, 83.99% with (fp32 84.35%; weights in 16 bits instead: 83.97%), see
``benchmarks/results/int8-lru14-diagnosis``.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Collection
from typing import Any

import torch
import torch.nn.functional as F

from reuse.deploy._common import ort_session


def rounded_weight(weight: Any, per_channel: bool, levels: int = 127) -> Any:
    """``weight`` after symmetric int8 rounding as onnxruntime's quantizer does it (scale ``max|w| / levels``, per
    output channel or for the whole tensor; ``levels`` 127, or 64 for 7-bit weights), back in float64.

    Example:
        >>> import numpy as np
        >>> (rounded_weight(np.array([[1.0, 0.5049], [0.1, -0.03]]), per_channel=True) * 127).round(4)
        array([[127. ,  64. ],
               [ 12.7,  -3.8]])
    """
    np = importlib.import_module("numpy")
    w = weight.astype("float64")  # (C_out, C_in/g, *kernel)
    if per_channel:
        peak = np.abs(w).reshape(len(w), -1).max(1).reshape(-1, *[1] * (w.ndim - 1))  # (C_out, 1, ...)
    else:
        peak = np.abs(w).max()
    scale = np.where(peak > 0, peak / levels, 1.0)
    return np.clip(np.round(w / scale), -levels, levels) * scale


def correct_bias(
    model_proto: Any,
    batches: list[Any],
    *,
    per_channel: bool,
    exclude: Collection[str] = (),
    uses: list[Any] = (),
    levels: int = 127,
) -> int:
    """In place: every 2-D Conv with a stored weight (and its own bias, or none) has the mean output shift of
    its weight's int8 rounding on ``batches`` taken out of its bias; ``uses`` (from ``fold_uses``) keep their
    ``bias`` in step; ``levels``: the weights' int8 range, ``[-levels, levels]``. Left alone: nodes named in
    ``exclude`` (they stay in float), convs whose bias other nodes read too (no one correction fits both), and
    ``auto_pad="SAME_*"`` convs. Returns the convs corrected."""
    numpy_helper = importlib.import_module("onnx.numpy_helper")
    graph = model_proto.graph
    init = {t.name: t for t in graph.initializer}
    bias_reads: dict[str, int] = {}
    for node in graph.node:
        for name in node.input[2:3]:
            bias_reads[name] = bias_reads.get(name, 0) + 1
    convs = [
        n
        for n in graph.node
        if n.op_type == "Conv"
        and n.name not in exclude
        and n.input[1] in init
        and len(init[n.input[1]].dims) == 4
        and _explicit_padding(n)
        and (len(n.input) < 3 or not n.input[2] or (n.input[2] in init and bias_reads[n.input[2]] == 1))
    ]
    if not convs:
        return 0
    means = _input_means(model_proto, [n.input[0] for n in convs], batches)
    by_conv = {u.conv: u for u in uses}
    for index, node in enumerate(convs):
        weight = numpy_helper.to_array(init[node.input[1]])  # (C_out, C_in/g, kh, kw)
        error = torch.from_numpy(rounded_weight(weight, per_channel, levels) - weight.astype("float64"))
        shift = _mean_output(means[node.input[0]], error, node).numpy()  # (C_out,)
        if len(node.input) < 3 or not node.input[2]:
            name = f"{node.name or f'conv{index}'}.bias_corrected"
            graph.initializer.append(numpy_helper.from_array((-shift).astype("float32"), name))
            init[name] = graph.initializer[-1]
            del node.input[2:]
            node.input.append(name)
            continue
        bias = numpy_helper.to_array(init[node.input[2]]).astype("float64") - shift  # (C_out,)
        init[node.input[2]].CopyFrom(numpy_helper.from_array(bias.astype("float32"), node.input[2]))
        if node.name in by_conv:
            by_conv[node.name].bias = bias
    return len(convs)


def _explicit_padding(node: Any) -> bool:
    """No ``auto_pad`` other than ``NOTSET``/``VALID`` (torch's exporter writes explicit pads)."""
    auto = next((a.s for a in node.attribute if a.name == "auto_pad"), b"NOTSET")
    return auto in (b"NOTSET", b"VALID")


def _input_means(model_proto: Any, names: list[str], batches: list[Any]) -> dict[str, torch.Tensor]:
    """The mean over the batches' images of each named tensor, per channel and position: (C, H, W) each."""
    onnx = importlib.import_module("onnx")
    probe = copy.deepcopy(model_proto)
    outputs = {o.name for o in probe.graph.output}
    wanted = sorted(set(names))
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in wanted if n not in outputs)
    session = ort_session(probe.SerializeToString(), "quantize_onnx")
    feed = session.get_inputs()[0].name
    fetch = [n for n in wanted if n != feed]
    sums: dict[str, torch.Tensor] = {}
    count = 0
    for batch in batches:
        values = dict(zip(fetch, session.run(fetch, {feed: batch})))
        values[feed] = batch
        for name in wanted:
            total = torch.from_numpy(values[name]).double().sum(0)  # (C, H, W)
            sums[name] = sums[name] + total if name in sums else total
        count += len(batch)
    return {name: total / count for name, total in sums.items()}


def _mean_output(mean: torch.Tensor, error: torch.Tensor, node: Any) -> torch.Tensor:
    """``conv(mean, error)`` with the node's strides, padding, dilations and groups, averaged over positions:
    the mean shift per output channel, exact at the borders (zero padding sees no input)."""
    onnx = importlib.import_module("onnx")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    pads = list(attrs.get("pads", [0, 0, 0, 0]))  # (top, left, bottom, right)
    x = F.pad(mean[None], (pads[1], pads[3], pads[0], pads[2]))  # (1, C_in, H', W')
    out = F.conv2d(
        x,
        error,
        stride=tuple(attrs.get("strides", [1, 1])),
        dilation=tuple(attrs.get("dilations", [1, 1])),
        groups=int(attrs.get("group", 1)),
    )  # (1, C_out, Ho, Wo)
    return out[0].mean((1, 2))  # (C_out,)
