"""The model's outputs left in float in an int8 QDQ file: :func:`float_outputs` (``quantize_onnx``'s step 7).

Why: a static quantizer gives the output tensor (the logits) the range it saw on the calibration data. On a
sample of one class, the other classes' logits are never large, so their range is cut short: on the test set
those logits are clipped to the calibrated maximum and ties appear among them. Measured on the converted ResNet
of ``benchmarks/int8_calibration.py`` calibrated on 512 images of class 0: 79.09% with the logits quantized,
80.15% with them in float (fp32 80.43%); 14-LruNet's logits are an average pool of a ReLU, likewise. Keeping
the last ops in float costs little: they are the smallest of the network (a 1x1 conv or a linear layer to the
classes, a pooling, a flatten); their inputs and weights stay int8.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["float_outputs"]

# Ops that move or pool values without weights: the QDQ pairs behind them are walked through too.
_PASS_THROUGH = {"Flatten", "Reshape", "Squeeze", "Unsqueeze", "GlobalAveragePool", "AveragePool", "Relu", "Identity"}


def _rename(graph: Any, old: str, new: str) -> None:
    """Every node input and output named ``old`` becomes ``new``."""
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = new


def helper() -> Any:
    """onnx's graph builders (onnx is imported only where the deploy functions need it)."""
    return importlib.import_module("onnx.helper")


def _clamps_at_zero(graph: Any, q: Any) -> bool:
    """Whether ``q`` quantizes to uint8 with zero point 0: its range starts at 0, so it clamps negative values.
    onnxruntime's quantizer drops a ReLU whose output range is that one; removing ``q`` must keep the clamp."""
    numpy_helper = importlib.import_module("onnx.numpy_helper")
    zero = next((t for t in graph.initializer if len(q.input) > 2 and t.name == q.input[2]), None)
    if zero is None:
        return False
    value = numpy_helper.to_array(zero)
    return value.dtype.name == "uint8" and bool((value == 0).all())


def _is_graph_value(graph: Any, name: str) -> bool:
    """Whether ``name`` is a graph input or a stored tensor (not renamed: only node outputs are)."""
    return any(v.name == name for v in graph.input) or any(t.name == name for t in graph.initializer)


def _quantized_pair(graph: Any, name: str) -> tuple[Any, Any] | None:
    """``(q, dq)`` when ``name`` is ``DequantizeLinear(QuantizeLinear(t))`` and ``q``'s output is read by ``dq``
    alone; else ``None``."""
    producers = {out: node for node in graph.node for out in node.output}
    dq = producers.get(name)
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    q = producers.get(dq.input[0])
    if q is None or q.op_type != "QuantizeLinear":
        return None
    readers = [node for node in graph.node if q.output[0] in node.input]
    return (q, dq) if readers == [dq] else None


def float_outputs(model_proto: Any) -> int:
    """Remove the QuantizeLinear/DequantizeLinear pairs between each graph output and the last op with weights
    before it (through the ops in ``_PASS_THROUGH``), so that those ops compute in float; a pair after that op
    whose range starts at 0 becomes a ``Relu`` (the quantizer drops a ReLU into such a range; the clamp at 0
    stays, the clip at the calibrated maximum goes). Returns the number of pairs removed.

    Example:
        >>> from onnx import TensorProto, helper
        >>> stored = [helper.make_tensor("s", TensorProto.FLOAT, [], [0.1]),
        ...           helper.make_tensor("z", TensorProto.UINT8, [], [128])]
        >>> nodes = [helper.make_node("Relu", ["x"], ["r"]),
        ...          helper.make_node("QuantizeLinear", ["r", "s", "z"], ["q"]),
        ...          helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
        >>> io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in ("x", "y")]
        >>> model = helper.make_model(helper.make_graph(nodes, "g", io[:1], io[1:], stored))
        >>> float_outputs(model), [(n.op_type, list(n.input), list(n.output)) for n in model.graph.node]
        (1, [('Relu', ['x'], ['y'])])
    """
    graph = model_proto.graph
    removed = 0
    frontier = [out.name for out in graph.output]
    seen: set[str] = set()
    while frontier:
        name = frontier.pop()
        if name in seen:
            continue
        seen.add(name)
        pair = _quantized_pair(graph, name)
        if pair is not None and not _is_graph_value(graph, pair[0].input[0]):
            q, dq = pair
            source = q.input[0]
            at = list(graph.node).index(q)
            graph.node.remove(q)
            graph.node.remove(dq)
            made_by = next((node.op_type for node in graph.node if source in node.output), None)
            if made_by not in _PASS_THROUGH and _clamps_at_zero(graph, q):  # a ReLU dropped into this range
                graph.node.insert(at, helper().make_node("Relu", [source], [name], name=f"{q.name}/relu"))
            else:
                _rename(graph, source, name)  # the float tensor takes the name its dequantized copy had
            removed += 1
            seen.discard(name)
            frontier.append(name)
            continue
        producer = next((node for node in graph.node if name in node.output), None)
        if producer is not None and producer.op_type in _PASS_THROUGH and producer.input:
            frontier.append(producer.input[0])
    return removed
