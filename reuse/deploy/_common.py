"""What the deployment paths share: optional imports, whole-file writes, the example inputs, and the check of a
written program's outputs against the model handed in and against the rewrite it was exported from."""

from __future__ import annotations

import contextlib
import copy
import importlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from reuse._errors import ReuseError
from reuse.optimize import optimize_for_inference

EXTRA = 'pip install "torch-reuse[deploy]"'
REWRITE = "optimize_for_inference(model, share_weights=True)"  # what export_onnx and export_pte export
FORM_KEY = "reuse.export_form"  # metadata of an fp32 ONNX file whose blocks are in their fp32 export form


def require(module: str, caller: str) -> Any:
    """Import an optional package, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ReuseError(
            f"reuse.deploy.{caller} needs the package {module!r}, which is not installed; install the "
            f"deployment extra: {EXTRA}"
        ) from None


def atomic_write(path: Path, data: bytes) -> None:
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


def rewrite_for_export(
    model: nn.Module, example_inputs: Tensor | tuple | list, caller: str
) -> tuple[nn.Module, tuple[Tensor, ...]]:
    """What :func:`~reuse.deploy.export_onnx` and :func:`~reuse.deploy.export_pte` export: ``model`` rewritten
    with ``optimize_for_inference(model, share_weights=True, channels_last=False)`` (a copy, in eval mode), and
    the example inputs as a tuple of contiguous tensors. Errors name ``caller``."""
    if not isinstance(model, nn.Module):
        raise ReuseError(f"{caller}: needs an nn.Module, got {type(model).__name__}")
    inputs = _example_tuple(example_inputs, caller)
    return optimize_for_inference(model, share_weights=True, channels_last=False), inputs


def _example_tuple(example_inputs: Tensor | tuple | list, caller: str) -> tuple[Tensor, ...]:
    """``example_inputs`` as a tuple of contiguous tensors, or an error that names ``caller``."""
    inputs = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
    if not inputs or not all(isinstance(t, Tensor) for t in inputs):
        kinds = [type(t).__name__ for t in inputs]
        raise ReuseError(
            f"{caller}: example_inputs must be a tensor or a tuple of tensors, got {kinds or 'nothing'}; "
            "pass e.g. torch.randn(1, 3, 32, 32)"
        )
    return tuple(t.contiguous() for t in inputs)


def param_bytes(model: nn.Module) -> int:
    """float32 bytes of the parameters, each shared tensor once (``parameters()`` deduplicates)."""
    return sum(p.numel() * 4 for p in model.parameters())


def outputs(model: nn.Module, inputs: tuple[Tensor, ...]) -> list[Tensor]:
    """``model``'s outputs on ``inputs`` as a list of contiguous float tensors, without autograd."""
    with torch.no_grad():
        out = model(*inputs)
    out = [out] if isinstance(out, Tensor) else list(out)
    return [t.detach().float().contiguous() for t in out]


def ort_session(model: bytes | str, caller: str) -> Any:
    """An onnxruntime CPU session with every graph optimisation."""
    ort = require("onnxruntime", caller)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: no notices about initializers it drops
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def references(model: nn.Module, rewrite: nn.Module, fix: str) -> list[tuple[str, nn.Module, str]]:
    """What a written program is checked against, in this order, with what to do when it differs: the rewrite it
    was exported from (a difference there is the exporter's: ``fix``), then the model handed in (a difference
    there is the rewrite's). The model itself is not touched: a copy of it runs, in eval mode like the rewrite."""
    return [
        (f"{REWRITE}, the rewrite it was exported from", rewrite, fix),
        (
            "the model handed in",
            copy.deepcopy(model).eval(),
            f"The file matches {REWRITE}, and that rewrite differs from the model in eval mode: report the model",
        ),
    ]


def compare(
    caller: str,
    runtime: str,
    got: list[Tensor],
    inputs: tuple[Tensor, ...],
    against: list[tuple[str, nn.Module, str]],
    tolerance: float,
) -> float:
    """Compare the outputs ``runtime`` gave on ``inputs`` with those of each reference in ``against`` (from
    :func:`references`); the first difference above ``tolerance`` (relative to the outputs' magnitude, at least
    1) is an error that names the reference. Returns the largest difference."""
    batch = inputs[0].shape[0]
    worst = 0.0
    for which, reference, fix in against:
        expected = outputs(reference, inputs)
        if len(got) != len(expected):
            raise ReuseError(
                f"{caller}: the file has {len(got)} outputs, {which} {len(expected)}; nothing was written. {fix}"
            )
        for e, g in zip(expected, got):
            if g.shape != e.shape:
                raise ReuseError(
                    f"{caller}: {runtime} gives an output of shape {tuple(g.shape)} for an input batch of {batch}, "
                    f"{which} {tuple(e.shape)}; nothing was written. {fix}"
                )
            diff = (g - e).abs().max().item() if e.numel() else 0.0
            scale = max(1.0, e.abs().max().item() if e.numel() else 1.0)
            if not diff <= tolerance * scale:
                raise ReuseError(
                    f"{caller}: {runtime}'s output differs from the model's by {diff:.3g} (tolerance "
                    f"{tolerance * scale:.3g}) at batch {batch}, against {which}; nothing was written. {fix}"
                )
            worst = max(worst, diff)
    return worst
