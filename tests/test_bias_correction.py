"""Bias correction of int8 weight rounding (reuse/deploy/_bias_correction.py, quantize_onnx's step 3).

The law, from its definition: after correction, a conv computing with its weight rounded to int8 and the
corrected bias has, on the calibration batches, the same mean output per channel as the float conv with its
own bias; checked with torch's conv2d on graphs built node by node, over strides, padding, dilation, groups.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

onnx = pytest.importorskip("onnx", reason="reuse.deploy needs onnx (pip install 'torch-reuse[deploy]')")
pytest.importorskip("onnxruntime", reason="the correction runs the graph in onnxruntime ('torch-reuse[deploy]')")

from onnx import helper, numpy_helper  # noqa: E402

from reuse.deploy._bias_correction import correct_bias, rounded_weight  # noqa: E402


def one_conv(weight: np.ndarray, bias: np.ndarray | None, x_shape: tuple, **attrs: object) -> onnx.ModelProto:
    """A graph of one Conv (named ``conv``) reading ``input``."""
    inits = [numpy_helper.from_array(weight, "w")] + ([numpy_helper.from_array(bias, "b")] if bias is not None else [])
    node = helper.make_node("Conv", ["input", "w", *(["b"] if bias is not None else [])], ["out"], name="conv", **attrs)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def conv_attrs(stride: int, pad: int, dilation: int, groups: int) -> dict:
    return {
        "strides": [stride, stride],
        "pads": [pad, pad, pad, pad],
        "dilations": [dilation, dilation],
        "group": groups,
    }


@settings(max_examples=25, deadline=None)
@given(
    groups=st.sampled_from([1, 2, 4]),
    per_group=st.integers(1, 3),
    kernel=st.sampled_from([1, 3]),
    stride=st.integers(1, 2),
    pad=st.integers(0, 1),
    dilation=st.integers(1, 2),
    with_bias=st.booleans(),
    per_channel=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_corrected_int8_conv_has_the_float_mean_output(
    groups: int,
    per_group: int,
    kernel: int,
    stride: int,
    pad: int,
    dilation: int,
    with_bias: bool,
    per_channel: bool,
    seed: int,
) -> None:
    rng = np.random.default_rng(seed)
    c_in, c_out = groups * per_group, groups * 2
    weight = rng.normal(size=(c_out, per_group, kernel, kernel)).astype(np.float32)  # (C_out, C_in/g, k, k)
    bias = rng.normal(size=c_out).astype(np.float32) if with_bias else None
    batches = [(rng.random((3, c_in, 7, 6)) * 2 + 0.5).astype(np.float32) for _ in range(2)]  # means far from 0
    attrs = conv_attrs(stride, pad, dilation, groups)
    model = one_conv(weight, bias, (3, c_in, 7, 6), **attrs)

    assert correct_bias(model, batches, per_channel=per_channel) == 1
    bias_name = model.graph.node[0].input[2]
    new_bias = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == bias_name))
    x = torch.from_numpy(np.concatenate(batches))  # (N, C_in, H, W)
    options = {"stride": stride, "padding": pad, "dilation": dilation, "groups": groups}
    float_out = F.conv2d(x, torch.from_numpy(weight), None if bias is None else torch.from_numpy(bias), **options)
    q_weight = torch.from_numpy(rounded_weight(weight, per_channel).astype(np.float32))
    int8_out = F.conv2d(x, q_weight, torch.from_numpy(new_bias.copy()), **options)
    torch.testing.assert_close(int8_out.mean((0, 2, 3)), float_out.mean((0, 2, 3)), rtol=0, atol=1e-4)


def test_rounded_weight_rounds_like_a_symmetric_int8_scale() -> None:
    w = np.array([[[[2.0]], [[-0.77]]], [[[0.0]], [[0.0]]]])  # (2, 2, 1, 1): channel 1 all zero
    per_channel = rounded_weight(w, per_channel=True)
    assert per_channel[0, 0, 0, 0] == 2.0 and per_channel[0, 1, 0, 0] == pytest.approx(-49 * 2 / 127)
    assert np.all(per_channel[1] == 0)  # a zero channel stays zero (no division by a zero scale)
    per_tensor = rounded_weight(np.array([[4.0, 1.0]]), per_channel=False)
    assert per_tensor[0, 1] == pytest.approx(32 * 4 / 127)


def test_a_bias_by_hand() -> None:
    """1x1 conv, weight (1.0, 0.5049), input constant (1, 2): int8 rounds 0.5049 to 64/127 of the channel's peak
    1.0, so the output falls by 2 * (0.5049 - 64/127), which the new bias must give back."""
    weight = np.array([[[[1.0]], [[0.5049]]]], np.float32)  # (1, 2, 1, 1)
    model = one_conv(weight, None, (1, 2, 2, 2))
    x = np.stack([np.ones((2, 2)), 2 * np.ones((2, 2))])[None].astype(np.float32)  # (1, 2, 2, 2)
    assert correct_bias(model, [x], per_channel=True) == 1
    added = numpy_helper.to_array(model.graph.initializer[-1])  # a conv without bias gets one
    assert model.graph.node[0].input[2] == model.graph.initializer[-1].name
    assert added[0] == pytest.approx(2 * (np.float32(0.5049) - 64 / 127), rel=1e-5)


def test_excluded_and_shared_bias_convs_are_left_alone() -> None:
    rng = np.random.default_rng(0)
    weight, bias = rng.normal(size=(2, 2, 1, 1)).astype(np.float32), np.ones(2, np.float32)
    model = one_conv(weight, bias, (1, 2, 3, 3))
    batches = [rng.random((2, 2, 3, 3)).astype(np.float32)]
    assert correct_bias(model, batches, per_channel=True, exclude={"conv"}) == 0
    assert np.array_equal(numpy_helper.to_array(model.graph.initializer[1]), bias)
    second = helper.make_node("Conv", ["out", "w", "b"], ["out2"], name="conv2")  # reads the same bias "b"
    model.graph.node.append(second)
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("out2", onnx.TensorProto.FLOAT, None))
    assert correct_bias(model, batches, per_channel=True) == 0  # one bias for two convs: no correction fits both
