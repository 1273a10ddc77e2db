"""Deployment that keeps the reuse: ONNX and int8 files in which every shared weight is stored once.

Layer reuse makes a network small because a reused block's weights exist once. The usual export paths lose
that: folding each use's BatchNorm into the conv before it gives every use a copy of the conv (14-LruNet-1x:
206,282 parameters become 1,521,802). Here the model is first rewritten with
``reuse.optimize_for_inference(model, share_weights=True)``: ONE conv per shared weight, each use's BatchNorm
a per-use channel scale and shift after it (a ``Mul`` and an ``Add`` in ONNX). The exported graph then has N
``Conv`` nodes reading ONE weight initializer. A pass over the file stores every tensor once (identical
initializers and constants merged by content), and the file is checked in onnxruntime against the model.

onnxruntime folds the per-use ``Mul``/``Add`` into per-use conv copies when it loads the file, in memory:
the file stays small and runs as fast as a folded one.

:func:`quantize_onnx` makes an int8 QDQ file from such a file with onnxruntime's static quantization. Each use's
activations are tensors of their own, so each use gets its own activation scales (the problem of one observer
shared by all uses, pytorch#29657, does not arise). Each shared weight is quantized once: per output channel
and symmetric, use ``i``'s folded weight ``w * s_i`` has the int8 values of ``w`` itself (up to the sign of
``s_i``), with the scales multiplied by ``|s_i|``; so one int8 tensor serves every use, and each use keeps only
its per-channel scales and int32 bias. See docs/deployment.md for the measurements behind these choices.

onnx, onnxruntime and onnxscript are optional: ``pip install "torch-reuse[deploy]"``. They are imported only
inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import io
import math
import os
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from reuse._errors import ReuseError
from reuse.optimize import optimize_for_inference

__all__ = ["DeployReport", "export_onnx", "quantize_onnx", "stored_tensors"]

_EXTRA = 'pip install "torch-reuse[deploy]"'


def _require(module: str, caller: str) -> Any:
    """Import an optional package, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ReuseError(
            f"reuse.deploy.{caller} needs the package {module!r}, which is not installed; install the "
            f"deployment extra: {_EXTRA}"
        ) from None


@dataclass
class DeployReport:
    """What an export or a quantization wrote, and how it was checked. ``str(report)`` is a small table.

    Example:
        >>> print(DeployReport("m.onnx", "fp32 ONNX", 1100, 1000, 3, 1000, 2e-6, "onnxruntime, batch 2 and 3"))
        fp32 ONNX: m.onnx
          file bytes       1,100   1.10x the parameter bytes (1,000)
          stored tensors   3       1,000 bytes
          check            onnxruntime, batch 2 and 3: max |difference| 2.0e-06
    """

    path: str  # the file written
    kind: str  # "fp32 ONNX", "int8 ONNX (QDQ)"
    file_bytes: int  # size of the file
    param_bytes: int  # float32 bytes of the model's parameters, every shared tensor counted once
    tensors: int  # tensors stored in the file (initializers and constants)
    tensor_bytes: int  # their bytes
    max_abs_diff: float | None  # largest |output difference| against the reference; None: not checked
    check: str  # how the file was checked, or why it was not
    agreement: float | None = None  # fraction of inputs whose top-1 class equals the reference's (int8)
    notes: list[str] = field(default_factory=list)  # choices made on the way (excluded nodes, ...)

    @property
    def ratio(self) -> float:
        """File bytes over the model's float32 parameter bytes."""
        return self.file_bytes / self.param_bytes if self.param_bytes else math.nan

    def __str__(self) -> str:
        check = self.check
        if self.max_abs_diff is not None:
            check += f": max |difference| {self.max_abs_diff:.1e}"
        if self.agreement is not None:
            check += f", top-1 agreement {100 * self.agreement:.1f}%"
        rows = [
            ("file bytes", f"{self.file_bytes:,}", f"{self.ratio:.2f}x the parameter bytes ({self.param_bytes:,})"),
            ("stored tensors", f"{self.tensors:,}", f"{self.tensor_bytes:,} bytes"),
            ("check", check, ""),
        ]
        rows += [("note", note, "") for note in self.notes]
        width = max(len(r[1]) for r in rows[:2])
        lines = [f"{self.kind}: {self.path}"]
        for name, value, extra in rows:
            lines.append(f"  {name:<16} {value:<{width}}   {extra}".rstrip() if extra else f"  {name:<16} {value}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- inputs


def _as_tuple(example_inputs: Tensor | tuple | list) -> tuple[Tensor, ...]:
    inputs = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
    if not inputs or not all(isinstance(t, Tensor) for t in inputs):
        kinds = [type(t).__name__ for t in inputs]
        raise ReuseError(
            f"export_onnx: example_inputs must be a tensor or a tuple of tensors, got {kinds or 'nothing'}; "
            "pass e.g. torch.randn(1, 3, 32, 32)"
        )
    return inputs


def _param_bytes(model: nn.Module) -> int:
    """float32 bytes of the parameters, each shared tensor once (``parameters()`` deduplicates)."""
    return sum(p.numel() * 4 for p in model.parameters())


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder: never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# ------------------------------------------------------------------------------------- the file's tensors


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
    numpy_helper = _require("onnx.numpy_helper", "stored_tensors")
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


def _store_once(model_proto: Any) -> None:
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


# ----------------------------------------------------------------------------------------------- export


def _export_bytes(
    model: nn.Module, inputs: tuple[Tensor, ...], dynamic_batch: bool, opset: int | None, dynamo: bool
) -> bytes:
    """The ONNX bytes of ``model`` from torch's exporter (TorchScript-based, or torch.export-based)."""
    names = [f"input{i}" if len(inputs) > 1 else "input" for i in range(len(inputs))]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # the TorchScript exporter's notice
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        if dynamo:
            batch = torch.export.Dim("batch")
            shapes = tuple({0: batch} for _ in inputs) if dynamic_batch else None
            with contextlib.redirect_stdout(io.StringIO()):
                program = torch.onnx.export(
                    model, inputs, dynamo=True, input_names=names, dynamic_shapes=shapes, opset_version=opset
                )
            return program.model_proto.SerializeToString()
        buffer = io.BytesIO()
        axes = {name: {0: "batch"} for name in names} if dynamic_batch else None
        if axes is not None:
            axes["output"] = {0: "batch"}
        torch.onnx.export(
            model,
            inputs,
            buffer,
            dynamo=False,
            input_names=names,
            output_names=["output"],
            dynamic_axes=axes,
            opset_version=opset or 17,
        )
        return buffer.getvalue()


def _outputs(model: nn.Module, inputs: tuple[Tensor, ...]) -> list[Tensor]:
    with torch.no_grad():
        out = model(*inputs)
    out = [out] if isinstance(out, Tensor) else list(out)
    return [t.detach().float().contiguous() for t in out]


def _session(model: bytes | str, threads: int | None = None) -> Any:
    """An onnxruntime CPU session with every graph optimisation."""
    ort = _require("onnxruntime", "export_onnx")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _run(session: Any, inputs: Iterable[Tensor]) -> list[Any]:
    feed = {i.name: t.detach().cpu().contiguous().numpy() for i, t in zip(session.get_inputs(), inputs)}
    return session.run(None, feed)


def _check_batches(inputs: tuple[Tensor, ...], dynamic_batch: bool) -> list[tuple[Tensor, ...]]:
    """The inputs the file is checked on: the example, and with a dynamic batch also another batch size."""
    checks = [inputs]
    if dynamic_batch:
        generator = torch.Generator().manual_seed(0)
        other = tuple(
            torch.randn((t.shape[0] + 1, *t.shape[1:]), generator=generator).to(t.dtype)
            if t.is_floating_point()
            else torch.cat([t, t[:1]])
            for t in inputs
        )
        checks.append(other)
    return checks


def _check_onnx(
    data: bytes, model: nn.Module, inputs: tuple[Tensor, ...], dynamic_batch: bool, tolerance: float
) -> tuple[float | None, str]:
    """Run the file in onnxruntime on the example (and another batch size) and compare with ``model``."""
    try:
        importlib.import_module("onnxruntime")
    except ImportError:
        return None, "not checked: onnxruntime is not installed"
    session = _session(data)
    worst = 0.0
    batches = _check_batches(inputs, dynamic_batch)
    for batch in batches:
        expected = _outputs(model, batch)
        got = _run(session, batch)
        if len(got) != len(expected):
            raise ReuseError(f"export_onnx: the file has {len(got)} outputs, the model {len(expected)}")
        for e, g in zip(expected, got):
            g = torch.from_numpy(g).float()
            if g.shape != e.shape:
                raise ReuseError(
                    f"export_onnx: onnxruntime gives an output of shape {tuple(g.shape)} for an input batch of "
                    f"{batch[0].shape[0]}, the model {tuple(e.shape)}; the export fixed a shape it should not have"
                )
            diff = (g - e).abs().max().item() if e.numel() else 0.0
            scale = max(1.0, e.abs().max().item() if e.numel() else 1.0)
            if not diff <= tolerance * scale:
                raise ReuseError(
                    f"export_onnx: onnxruntime's output differs from the model's by {diff:.3g} "
                    f"(tolerance {tolerance * scale:.3g}) at batch {batch[0].shape[0]}; nothing was written. "
                    "An op the exporter translates differently? Export with dynamo=True, or report the model"
                )
            worst = max(worst, diff)
    sizes = " and ".join(str(b[0].shape[0]) for b in batches)
    return worst, f"onnxruntime, batch {sizes}"


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_inputs: Tensor | tuple[Tensor, ...],
    *,
    dynamic_batch: bool = True,
    opset: int | None = None,
    dynamo: bool = False,
    tolerance: float = 1e-4,
) -> DeployReport:
    """Write ``model`` as an ONNX file in which every shared tensor is stored once, and check it.

    The model is rewritten with ``optimize_for_inference(model, share_weights=True, channels_last=False)``
    (one conv per shared weight, each use's BatchNorm a per-use ``Mul`` and ``Add``; conv-BN pairs outside
    reuse folded), exported, and compacted: constants become initializers, identical tensors are merged by
    content, unused ones dropped. With ``dynamic_batch`` the batch axis of every input and output is
    symbolic and the file holds nothing whose size depends on the batch. When onnxruntime is installed, the
    file runs on ``example_inputs`` (and on a batch of another size) and must match the model's outputs to
    ``tolerance`` (relative to the outputs' magnitude, at least 1) before it is written.

    Args:
        model: a module in eval or train mode (exported as in eval mode); it is not modified.
        path: the ``.onnx`` file to write (replaced whole, never half-written).
        example_inputs: a tensor or a tuple of tensors, the model's positional inputs.
        dynamic_batch: make dim 0 of the inputs and outputs symbolic.
        opset: ONNX opset (default 17 for the TorchScript exporter, the exporter's own for ``dynamo``).
        dynamo: use the ``torch.export``-based exporter instead of the TorchScript-based one (deprecated by
            torch, and the faster of the two to export: 4 s against 15 s for 14-LruNet-1x).
        tolerance: largest accepted output difference in onnxruntime, relative.

    Returns:
        A :class:`DeployReport`: file bytes, the model's parameter bytes, stored tensors and the check.

    Example:
        >>> import reuse
        >>> from reuse.models import LruNet
        >>> report = reuse.deploy.export_onnx(
        ...     LruNet(width_mult=0.25, reuse=4), "lrunet.onnx", torch.randn(1, 3, 32, 32)
        ... )  # doctest: +SKIP
        >>> report.ratio < 1.1  # doctest: +SKIP
        True
    """
    onnx = _require("onnx", "export_onnx")
    if not isinstance(model, nn.Module):
        raise ReuseError(f"export_onnx: needs an nn.Module, got {type(model).__name__}")
    inputs = _as_tuple(example_inputs)
    path = Path(path)
    deployable = optimize_for_inference(model, share_weights=True, channels_last=False)
    inputs = tuple(t.contiguous() for t in inputs)
    try:
        data = _export_bytes(deployable, inputs, dynamic_batch, opset, dynamo)
    except ReuseError:
        raise
    except Exception as err:  # noqa: BLE001 - the exporters raise many types; re-raised with the context
        kind = "torch.export-based" if dynamo else "TorchScript-based"
        other = "dynamo=False" if dynamo else "dynamo=True"
        raise ReuseError(
            f"export_onnx: torch's {kind} ONNX exporter failed on {type(model).__name__} with inputs "
            f"{[tuple(t.shape) for t in inputs]}: {type(err).__name__}: {err}; try {other}"
        ) from err
    proto = onnx.load_from_string(data)
    _store_once(proto)
    data = proto.SerializeToString()
    diff, check = _check_onnx(data, deployable, inputs, dynamic_batch, tolerance)
    _atomic_write(path, data)
    tensors = stored_tensors(proto)
    return DeployReport(
        path=str(path),
        kind="fp32 ONNX",
        file_bytes=path.stat().st_size,
        param_bytes=_param_bytes(model),
        tensors=len(tensors),
        tensor_bytes=sum(int(a.nbytes) for _, a in tensors),
        max_abs_diff=diff,
        check=check,
    )


def quantize_onnx(*args: Any, **kwargs: Any) -> DeployReport:  # placeholder, replaced below
    raise NotImplementedError
