"""The tensors of an ONNX file: list them, store each once, and keep the names short.

A pass over an exported file: ``Constant`` nodes become initializers, identical tensors are merged by content,
unused ones dropped, int64 gather indices narrowed to int32, and intermediate value names shortened.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
from collections.abc import Callable, Iterator
from typing import Any

from reuse.deploy._common import require


def _subgraphs(graph: Any) -> Iterator[Any]:
    """``graph`` and every graph nested in its nodes' attributes (If, Loop, Scan bodies)."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == attr.GRAPH:
                yield from _subgraphs(attr.g)
            for g in attr.graphs:
                yield from _subgraphs(g)


def stored_tensors(model_proto: Any) -> list[tuple[str, Any]]:
    """Every tensor a loaded ONNX model stores: initializers and ``Constant`` node values, with their names.

    Args:
        model_proto: an ``onnx.ModelProto``.

    Returns:
        ``(name, numpy array)`` pairs, in file order.

    Example:
        >>> import onnx  # doctest: +SKIP
        >>> [name for name, _ in stored_tensors(onnx.load("model.onnx"))][:2]  # doctest: +SKIP
        ['stem.0.weight', 'stem.0.bias']
    """
    numpy_helper = require("onnx.numpy_helper", "stored_tensors")
    out = []
    for graph in _subgraphs(model_proto.graph):
        out += [(t.name, numpy_helper.to_array(t)) for t in graph.initializer]
        for node in graph.node:
            if node.op_type == "Constant":
                out += [(node.output[0], numpy_helper.to_array(a.t)) for a in node.attribute if a.name == "value"]
    return out


def _content_key(tensor: Any) -> tuple:
    """What makes two stored tensors the same: type, shape and bytes."""
    numpy_helper = importlib.import_module("onnx.numpy_helper")
    data = numpy_helper.to_array(tensor)
    return (tensor.data_type, tuple(tensor.dims), hashlib.sha256(data.tobytes()).hexdigest())


def _rename_inputs(graph: Any, renames: dict[str, str]) -> None:
    for g in _subgraphs(graph):
        for node in g.node:
            for i, name in enumerate(node.input):
                if name in renames:
                    node.input[i] = renames[name]


def store_once(model_proto: Any) -> None:
    """In place: ``Constant`` nodes of the main graph become initializers, identical initializers become one,
    unused ones go, and per-node metadata (stack traces, doc strings) is dropped."""
    graph = model_proto.graph
    kept = []
    for node in graph.node:
        values = [a for a in node.attribute if a.name == "value"]
        if node.op_type == "Constant" and len(node.attribute) == 1 and values:
            tensor = copy.deepcopy(values[0].t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
        else:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)

    outputs = {o.name for o in graph.output}
    first: dict[tuple, str] = {}
    renames: dict[str, str] = {}
    unique = []
    for tensor in graph.initializer:
        key = _content_key(tensor)
        if key in first and tensor.name not in outputs:
            renames[tensor.name] = first[key]
        else:
            first.setdefault(key, tensor.name)
            unique.append(tensor)
    _rename_inputs(graph, renames)
    used = {name for g in _subgraphs(graph) for node in g.node for name in node.input} | outputs
    del graph.initializer[:]
    graph.initializer.extend(t for t in unique if t.name in used)
    _narrow_gather_indices(graph)
    _short_value_names(graph)
    for g in _subgraphs(graph):
        del g.value_info[:]  # optional shape annotations; onnxruntime infers them
        for node in g.node:
            node.doc_string = ""
            del node.metadata_props[:]


def short_constant_names(graph: Any, keep: Callable[[str], bool]) -> None:
    """Give the initializers that ``keep`` does not name short names (``c12``), and the nodes none: in a QDQ
    file the quantizer's names (``/stage1/uses.3/dw/Conv_output_0_QuantizeLinear_Output_scale``) are a fifth
    of the bytes. The shared weights keep their names."""
    renames: dict[str, str] = {}
    for tensor in graph.initializer:
        if not keep(tensor.name):
            renames[tensor.name] = tensor.name = f"c{len(renames)}"
    _rename_inputs(graph, renames)
    for node in graph.node:
        node.name = ""


def _narrow_gather_indices(graph: Any) -> None:
    """int64 index initializers read only by ``Gather`` nodes become int32 (ONNX takes both): half the bytes."""
    onnx = importlib.import_module("onnx")
    numpy_helper = importlib.import_module("onnx.numpy_helper")
    readers: dict[str, set[str]] = {}
    for g in _subgraphs(graph):
        for node in g.node:
            for i, name in enumerate(node.input):
                readers.setdefault(name, set()).add(node.op_type if (node.op_type, i) == ("Gather", 1) else "other")
    for i, tensor in enumerate(graph.initializer):
        if tensor.data_type != onnx.TensorProto.INT64 or readers.get(tensor.name) != {"Gather"}:
            continue
        values = numpy_helper.to_array(tensor)
        if values.size and -(2**31) <= values.min() and values.max() < 2**31:
            graph.initializer[i].CopyFrom(numpy_helper.from_array(values.astype("int32"), tensor.name))


def _short_value_names(graph: Any) -> None:
    """Rename the main graph's intermediate values (``/stage1/uses.3/dw_bn/Mul_output_0``) to short ones
    (``v123``); node names, which carry the module path, and the graph's inputs, outputs and initializers
    keep theirs."""
    keep = {v.name for v in (*graph.input, *graph.output)} | {t.name for t in graph.initializer}
    renames: dict[str, str] = {}
    for node in graph.node:
        for i, name in enumerate(node.output):
            if name and name not in keep:
                renames.setdefault(name, f"v{len(renames)}")
                node.output[i] = renames[name]
    _rename_inputs(graph, renames)
