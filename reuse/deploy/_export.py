"""fp32 ONNX that keeps shared weights shared: :func:`export_onnx`, checked in onnxruntime against the model."""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from reuse._checks import check_bool
from reuse._errors import ReuseError
from reuse.deploy._common import (
    FORM_KEY,
    atomic_write,
    compare,
    ort_session,
    param_bytes,
    references,
    require,
    rewrite_for_export,
)
from reuse.deploy._graph import store_once
from reuse.deploy._report import DeployReport, onnx_report


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


def export_forms(model: nn.Module) -> int:
    """Put ``m.export_form()`` in the place of every module ``m`` of ``model`` that has one (a deploy hook, e.g.
    :meth:`reuse.models.LruBlock.export_form`) and gives one; ``model`` must be a copy of the caller's own.
    Returns how many modules were replaced.

    Example:
        >>> from reuse.models import LruBlock
        >>> model = nn.Sequential(LruBlock(16), nn.ReLU()).eval()
        >>> export_forms(model), type(model[0]).__name__
        (1, 'SplitLruUse')
    """
    forms: dict[int, nn.Module | None] = {}
    for module in model.modules():
        hook = getattr(module, "export_form", None)
        if callable(hook) and id(module) not in forms:
            forms[id(module)] = hook()
    replaced = set()
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            new = forms.get(id(child)) if child is not None else None
            if new is not None:
                parent._modules[name] = new
                replaced.add(id(child))
    return len(replaced)


def _run(runtime: Any, inputs: Iterable[Tensor]) -> list[Any]:
    """The outputs of an onnxruntime session on ``inputs``, as numpy arrays."""
    feed = {i.name: t.detach().cpu().contiguous().numpy() for i, t in zip(runtime.get_inputs(), inputs)}
    return runtime.run(None, feed)


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
    data: bytes,
    model: nn.Module,
    rewrite: nn.Module,
    inputs: tuple[Tensor, ...],
    dynamic_batch: bool,
    tolerance: float,
) -> tuple[float | None, str]:
    """Run the file in onnxruntime on the example (and another batch size) and compare with ``rewrite``, the
    module it was exported from, and with ``model``, the one handed in."""
    try:
        importlib.import_module("onnxruntime")
    except ImportError:
        return None, "not checked: onnxruntime is not installed"
    runtime = ort_session(data, "export_onnx")
    fix = "An op the exporter translates differently, or a shape it fixed? Export with dynamo=True, or report the model"
    against = references(model, rewrite, fix)
    worst = 0.0
    batches = _check_batches(inputs, dynamic_batch)
    for batch in batches:
        got = [torch.from_numpy(g).float() for g in _run(runtime, batch)]
        worst = max(worst, compare("export_onnx", "onnxruntime", got, batch, against, tolerance))
    sizes = " and ".join(str(b[0].shape[0]) for b in batches)
    return worst, f"onnxruntime, batch {sizes}, against the model and its rewrite"


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_inputs: Tensor | tuple[Tensor, ...],
    *,
    dynamic_batch: bool = True,
    opset: int | None = None,
    dynamo: bool = False,
    tolerance: float = 1e-4,
    for_quantization: bool = False,
) -> DeployReport:
    """Write ``model`` as an ONNX file in which every shared tensor is stored once, and check it.

    The model is rewritten with ``optimize_for_inference(model, share_weights=True, channels_last=False)`` (one conv
    per shared weight, each use's BatchNorm a per-use ``Mul`` and ``Add``; conv-BN pairs outside reuse folded),
    exported, and compacted: constants become initializers, identical tensors are merged by content, unused ones
    dropped. Blocks that have an fp32 form of their own (``export_form()``, a deploy hook:
    :class:`~reuse.models.LruBlock`'s splits each use by the parity of its depthwise channels: 1.27x / 2.06x the
    batch-256 throughput of 14-LruNet in onnxruntime on 1 / 2 threads) are written in that form, unless
    ``for_quantization``: the file is then meant for :func:`quantize_onnx`, whose per-use steps (each use's
    BatchNorm in its int8 scales, range centring) read the blocks as they are. With ``dynamic_batch`` the batch axis
    of every input and output is symbolic and the file holds nothing whose size depends on the batch. When
    onnxruntime is installed, the file runs on ``example_inputs`` (and on a batch of another size) before it is
    written, and its outputs must match, to ``tolerance`` (relative to the outputs' magnitude, at least 1), both
    those of the rewrite it was exported from and those of the model handed in (a copy, in eval mode); an error says
    which differs.

    Args:
        model: a module in eval or train mode (exported as in eval mode); it is not modified.
        path: the ``.onnx`` file to write (replaced whole, never half-written).
        example_inputs: a tensor or a tuple of tensors, the model's positional inputs.
        dynamic_batch: make dim 0 of the inputs and outputs symbolic.
        opset: ONNX opset (default 17 for the TorchScript exporter, the exporter's own for ``dynamo``).
        dynamo: use the ``torch.export``-based exporter instead of the TorchScript-based one (deprecated by
            torch, and the faster of the two to export: 4 s against 15 s for 14-LruNet-1x).
        tolerance: largest accepted output difference in onnxruntime, relative.
        for_quantization: write the blocks as they are, for :func:`quantize_onnx` (see above).

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
    onnx = require("onnx", "export_onnx")
    check_bool(for_quantization, "for_quantization", "export_onnx")
    rewrite, inputs = rewrite_for_export(model, example_inputs, "export_onnx")
    split = 0 if for_quantization else export_forms(rewrite)
    path = Path(path)
    try:
        data = _export_bytes(rewrite, inputs, dynamic_batch, opset, dynamo)
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
    store_once(proto)
    if split:
        entry = proto.metadata_props.add()
        entry.key, entry.value = FORM_KEY, "fp32"
    data = proto.SerializeToString()
    diff, check = _check_onnx(data, model, rewrite, inputs, dynamic_batch, tolerance)
    atomic_write(path, data)
    notes = [f"{split} blocks in their fp32 export form (for quantize_onnx: for_quantization=True)"] if split else []
    return onnx_report(path, proto, "fp32 ONNX", param_bytes(model), max_abs_diff=diff, check=check, notes=notes)
