"""Deployment that keeps the reuse: ONNX and int8 files in which every shared weight is stored once.

Layer reuse makes a network small because a reused block's weights exist once. The usual export paths lose
that: folding each use's BatchNorm into the conv before it gives every use a copy of the conv (14-LruNet-1x:
206,282 parameters become 1,521,802). Here the model is first rewritten with
``reuse.optimize_for_inference(model, share_weights=True)``: ONE conv per shared weight, each use's BatchNorm
a per-use channel scale and shift after it (a ``Mul`` and an ``Add`` in ONNX). The exported graph then has N
``Conv`` nodes reading ONE weight initializer. A pass over the file stores every tensor once (identical
initializers and constants merged by content), and the file is checked in onnxruntime against the rewrite and
against the model handed in.

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

One file per concern, the names users need re-exported here:

- ``_export.py``: :func:`export_onnx` and its check in onnxruntime.
- ``_graph.py``: the file's tensors: :func:`stored_tensors`, stored once, short names.
- ``_int8.py``: :func:`quantize_onnx`; ``_int8_graph.py``: its graph rewrites (each use's BatchNorm folded, ranges
  centred, one int8 tensor per shared weight); ``_calibration.py``: the calibration batches' checks and
  :class:`CalibrationCoverage`.
- ``_pte.py``: :func:`export_pte` (ExecuTorch, XNNPACK).
- ``_report.py``: :class:`DeployReport`; ``_common.py``: what they share (optional imports, whole-file writes,
  the check of outputs against the model and its rewrite).
"""

__all__ = ["CalibrationCoverage", "DeployReport", "export_onnx", "export_pte", "quantize_onnx", "stored_tensors"]

from reuse.deploy._calibration import CalibrationCoverage
from reuse.deploy._export import export_onnx
from reuse.deploy._graph import stored_tensors
from reuse.deploy._int8 import quantize_onnx
from reuse.deploy._pte import export_pte
from reuse.deploy._report import DeployReport
