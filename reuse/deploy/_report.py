"""What a deployment call returns: :class:`DeployReport`, and how one is made for an ONNX file."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reuse.deploy._calibration import CalibrationCoverage
from reuse.deploy._graph import stored_tensors


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
    kind: str  # "fp32 ONNX", "int8 ONNX (QDQ)", "ExecuTorch .pte (XNNPACK)"
    file_bytes: int  # size of the file
    param_bytes: int  # float32 bytes of the model's parameters, every shared tensor counted once
    tensors: int  # tensors stored in the file (initializers and constants)
    tensor_bytes: int  # their bytes
    max_abs_diff: float | None  # largest |output difference| against the references (see check); None: not checked
    check: str  # how and against what the file was checked (the model and its rewrite; int8: the fp32 file)
    agreement: float | None = None  # fraction of inputs whose top-1 class equals the reference's (int8)
    notes: list[str] = field(default_factory=list)  # choices made on the way (excluded nodes, ...)
    coverage: list[CalibrationCoverage] = field(default_factory=list)  # int8: what calibration showed, per group
    warnings: list[str] = field(default_factory=list)  # int8: what was warned about (poor coverage, skew)

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
        rows += [("coverage", str(c), "") for c in self.coverage]
        rows += [("warning", w, "") for w in self.warnings]
        width = max(len(r[1]) for r in rows[:2])
        lines = [f"{self.kind}: {self.path}"]
        for name, value, extra in rows:
            lines.append(f"  {name:<16} {value:<{width}}   {extra}".rstrip() if extra else f"  {name:<16} {value}")
        return "\n".join(lines)


def onnx_report(path: Path, proto: Any, kind: str, param_bytes: int, **checked: Any) -> DeployReport:
    """The report on the ONNX file just written at ``path`` from ``proto``: its size, its stored tensors, and
    ``checked`` (``max_abs_diff``, ``check`` and the other fields of :class:`DeployReport`)."""
    tensors = stored_tensors(proto)
    return DeployReport(
        path=str(path),
        kind=kind,
        file_bytes=path.stat().st_size,
        param_bytes=param_bytes,
        tensors=len(tensors),
        tensor_bytes=sum(int(a.nbytes) for _, a in tensors),
        **checked,
    )
