"""ExecuTorch programs that keep shared weights shared: :func:`export_pte`, lowered to XNNPACK and checked in
ExecuTorch's runtime against the model."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from reuse._errors import ReuseError
from reuse.deploy._common import atomic_write, compare, param_bytes, references, rewrite_for_export
from reuse.deploy._report import DeployReport


def export_pte(
    model: nn.Module, path: str | os.PathLike, example_inputs: Tensor | tuple[Tensor, ...], *, tolerance: float = 1e-4
) -> DeployReport:
    """Write ``model`` as an ExecuTorch program (``.pte``) delegated to XNNPACK, shared weights kept shared.

    The model is rewritten as for :func:`export_onnx` (``share_weights=True``), captured with
    ``torch.export`` at the example's shapes (ExecuTorch programs have static shapes), lowered with the XNNPACK
    partitioner, and run in ExecuTorch's runtime before the file is written: its outputs must match both those
    of the rewrite it was exported from and those of the model handed in (a copy, in eval mode); an error says
    which differs.

    ExecuTorch is not in the ``deploy`` extra: each of its releases is built for one torch release
    (executorch 1.5.1 for torch 2.14), so install the one that matches yours.

    Args:
        model: a module; it is not modified.
        path: the ``.pte`` file to write (replaced whole, never half-written).
        example_inputs: a tensor or a tuple of tensors; their shapes are the program's.
        tolerance: largest accepted output difference, relative to the outputs' magnitude (at least 1).

    Returns:
        A :class:`DeployReport` (file bytes against the model's parameter bytes, the check).

    Example:
        >>> from reuse.models import LruNet
        >>> reuse.deploy.export_pte(LruNet(reuse=2), "m.pte", torch.randn(1, 3, 32, 32))  # doctest: +SKIP
    """
    try:
        exir = importlib.import_module("executorch.exir")
        xnnpack = importlib.import_module("executorch.backends.xnnpack.partition.xnnpack_partitioner")
    except ImportError:
        raise ReuseError(
            "reuse.deploy.export_pte needs ExecuTorch, which is not installed; install the release built for "
            f"your torch {torch.__version__.split('+')[0]} (pip install executorch; 1.5.1 goes with torch 2.14)"
        ) from None
    rewrite, inputs = rewrite_for_export(model, example_inputs, "export_pte")
    path = Path(path)
    try:
        program = torch.export.export(rewrite, inputs)
        lowered = exir.to_edge_transform_and_lower(program, partitioner=[xnnpack.XnnpackPartitioner()])
        data = bytes(lowered.to_executorch().buffer)
    except Exception as err:  # noqa: BLE001 - re-raised with the context
        raise ReuseError(
            f"export_pte: torch.export / ExecuTorch lowering failed on {type(model).__name__} with inputs "
            f"{[tuple(t.shape) for t in inputs]}: {type(err).__name__}: {err}"
        ) from err
    diff, check = _check_pte(data, model, rewrite, inputs, tolerance)
    atomic_write(path, data)
    stored = (*program.state_dict.values(), *program.constants.values())
    return DeployReport(
        path=str(path),
        kind="ExecuTorch .pte (XNNPACK)",
        file_bytes=path.stat().st_size,
        param_bytes=param_bytes(model),
        tensors=len(stored),
        tensor_bytes=sum(t.numel() * t.element_size() for t in stored),
        max_abs_diff=diff,
        check=check,
    )


def _check_pte(
    data: bytes, model: nn.Module, rewrite: nn.Module, inputs: tuple[Tensor, ...], tolerance: float
) -> tuple[float, str]:
    """Run the program in ExecuTorch's runtime on the example and compare with ``rewrite``, the module it was
    exported from, and with ``model``, the one handed in."""
    runtime = importlib.import_module("executorch.runtime")
    method = runtime.Runtime.get().load_program(data).load_method("forward")
    got = [t.float() for t in method.execute(list(inputs))]
    against = references(model, rewrite, "An op that XNNPACK lowers differently? Report the model")
    worst = compare("export_pte", "ExecuTorch", got, inputs, against, tolerance)
    return worst, f"ExecuTorch runtime, batch {inputs[0].shape[0]}, against the model and its rewrite"
