"""int8 ONNX that keeps shared weights shared: :func:`quantize_onnx`, onnxruntime's static quantization of a file
from :func:`~reuse.deploy.export_onnx`, with one int8 tensor per shared weight and per-use activation scales."""

from __future__ import annotations

import contextlib
import copy
import importlib
import io
import os
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from reuse._checks import check_bool
from reuse._errors import ReuseError
from reuse.deploy._bias_correction import correct_bias
from reuse.deploy._calibration import calibration_batches, coverage
from reuse.deploy._common import FORM_KEY, atomic_write, ort_session, require
from reuse.deploy._cpu import saturating_int8
from reuse.deploy._float_output import float_outputs
from reuse.deploy._graph import short_constant_names, store_once, stored_tensors
from reuse.deploy._int8_graph import center_ranges, fold_uses, share_int8
from reuse.deploy._report import DeployReport, onnx_report

_METHODS = ("minmax", "percentile")


def quantize_onnx(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    calibration: Iterable[Any],
    *,
    per_channel: bool = True,
    method: str = "percentile",
    percentile: float = 99.999,
    center: bool | str = "auto",
    bias_correction: bool = True,
    compact: bool = True,
    exclude: Iterable[str] = (),
    input_range: tuple[float, float] | None = None,
    reduce_range: bool | str = "auto",
) -> DeployReport:
    """Post-training static int8 quantization of a file from :func:`export_onnx`, every shared weight stored once.

    onnxruntime's static quantizer (QDQ format, uint8 activations, symmetric per-channel int8 weights)
    calibrates every activation tensor on ``calibration``. Each use of a reused block computes tensors of its
    own, so each use gets its own activation scales. Steps:

    0. The calibration batches are checked against the file's input (rank, fixed sizes, float dtype, finite,
       scale: see ``input_range``) and run through the fp32 file: ``report.coverage`` says, per run of reused
       blocks, the ranges they gave and how settled those are; poor coverage and a class-skewed sample warn.
    1. Each use's ``Conv -> Mul -> Add`` (its BatchNorm) is folded into a conv of the use's own, so that each
       use's int8 conv produces the normalised output directly.
    2. ``center``: the per-channel output ranges of a conv that feeds a 1x1 conv are centred, the midpoints
       moved into the 1x1 conv's bias (exact; see ``center_ranges`` in ``reuse/deploy/_int8_graph.py``). With
       ``"auto"`` the file is quantized with and without, and the one whose outputs are closer to the fp32 file's
       on the calibration batches is kept (centring gains 5 points on the authors' 10-LruNet and loses 0.3 on
       their 14-LruNet).
    3. ``bias_correction``: the mean output shift that rounding each conv's weight to int8 causes on the
       calibration data (``conv(E[x], W_q - W)``, per channel) is taken out of the conv's float bias (Nagel et
       al. 2019; see ``reuse/deploy/_bias_correction.py``). Measured on the authors' 14-LruNet: int8 83.66%
       without, 83.99% with (fp32 84.35%).
    4. onnxruntime quantizes and calibrates each activation's range: by default the central ``percentile`` of its
       values (99.999: the 0.0005% at each end clipped). A min-max range is set by a handful of extreme values
       and spends 20-50% of the 256 levels on them (median 1.29x the percentile range over 14-LruNet's 285
       activations, up to 2x): 14-LruNet lost up to 0.53 points with ``"minmax"``, at most 0.30 with this.
    5. Every use is pointed at ONE int8 copy of the shared weight, with the use's own signed per-channel
       scales: symmetric per-channel int8 of ``w * s_i`` is that of ``w``, up to the signs of ``s_i``.
    6. The outputs stay float: the quantize/dequantize pairs between each output and the last layer with weights
       are removed (see ``reuse/deploy/_float_output.py``). Quantized logits get the range the calibration data
       gave; on a sample of one class the others' logits were clipped (the converted ResNet of
       ``benchmarks/int8_calibration.py``: 79.09% with, 80.15% without, fp32 80.43%).
    7. ``compact``: each use's scales and bias are stored as float16 and turned into the QDQ constants by a
       few ``Cast``/``Mul``/``Div``/``Round`` nodes that onnxruntime folds when it loads the file.

    ``reduce_range``: weights of 7 bits (``[-64, 64]``) instead of 8 (``[-127, 127]``). onnxruntime's
    uint8 x int8 kernels on x86 CPUs without VNNI (AVX2 only: AMD Zen 1-3, Intel before Cascade Lake) add pairs
    of products in int16 and saturate with 8-bit weights: measured on an AMD EPYC (Zen 3) VM, onnxruntime 1.32,
    a synthetic 4-LruNet classifier's int8 file agreed with fp32 on 15.5% of inputs with 8-bit weights and on
    99% with 7-bit ones (docs/deployment.md). ``"auto"`` (the default) takes 7 bits where THIS machine is
    such a CPU (:func:`reuse.deploy._cpu.saturating_int8`); a file quantized on a VNNI or ARM machine for an
    AVX2-only target wants ``reduce_range=True``. The report's notes say which.

    With ``per_channel=False`` the uses cannot share int8 values (a per-tensor scale cannot absorb a
    per-channel BatchNorm); each keeps its own, and the report says so.

    Args:
        src: the fp32 ``.onnx`` file.
        dst: the int8 ``.onnx`` file to write (replaced whole, never half-written).
        calibration: input batches (tensors, arrays, or ``(inputs, labels)`` pairs), float, preprocessed as for
            the model; a few hundred training images drawn at random (not the first of a class-sorted set).
        per_channel: per-output-channel weight scales (needed for the uses to share int8 weights).
        method: activation calibration, ``"percentile"`` or ``"minmax"`` (the whole range seen).
        percentile: the percentile of ``method="percentile"``, in (0, 100]: the share of each activation's
            calibration values its range covers (onnxruntime's histogram, the rest cut equally at both ends).
        center: ``True``, ``False``, or ``"auto"``: both, the one closer to fp32 on the calibration data kept.
        bias_correction: take the mean shift of each conv's weight rounding out of its bias (step 3).
        compact: per-use scales and biases in float16, computed at load (0.49x instead of 0.84x the fp32
            parameter bytes on 10-LruNet); ``False`` keeps plain float32 scales and int32 biases, for runtimes
            that want the QDQ constants stored.
        exclude: node names (as in ``src``) to leave in float.
        reduce_range: ``True`` (7-bit weights), ``False`` (8-bit), or ``"auto"``: 7 bits on an x86 CPU
            without VNNI, where onnxruntime's int8 kernels would saturate.
        input_range: the inputs' range in training (``(0, 1)`` for ``ToTensor()`` images): calibration values
            outside it (by more than 1% of its span) are an error. Without it, calibration made only of whole
            numbers above 1 (raw 0-255 pixels) is an error; pass ``input_range=(0, 255)`` for a model trained so.

    Returns:
        A :class:`DeployReport`; its check compares the int8 file with ``src`` in onnxruntime on the first
        calibration batches (max |difference| and top-1 agreement); ``coverage`` holds a
        :class:`CalibrationCoverage` per group of tensors and ``warnings`` what was warned about.

    Raises:
        ReuseError: no file, an unknown method, calibration of the wrong shape, dtype or scale, or a bias that
            does not fit int32 at its scale.

    Example:
        >>> import torch, reuse
        >>> batches = [torch.rand(32, 3, 32, 32)]
        >>> report = reuse.deploy.quantize_onnx("lrunet.onnx", "lrunet.int8.onnx", batches)  # doctest: +SKIP
        >>> print(report.coverage[1])  # doctest: +SKIP
        stage1/uses.*: 50 tensors, range [-6.73, 6.33], stable 0.93, constant channels 4.1%
    """
    onnx = require("onnx", "quantize_onnx")
    ort = require("onnxruntime", "quantize_onnx")
    require("onnxruntime.quantization", "quantize_onnx")
    ort.set_default_logger_severity(3)
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise ReuseError(f"quantize_onnx: no file {src}; write one with reuse.deploy.export_onnx first")
    if method not in _METHODS:
        raise ReuseError(f"quantize_onnx: method must be one of {_METHODS}, got {method!r}")
    if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not 0 < percentile <= 100:
        raise ReuseError(
            f"quantize_onnx: percentile must be a number in (0, 100], got {percentile!r}; e.g. 99.999 (the default)"
        )
    if center not in (True, False, "auto"):
        raise ReuseError(f"quantize_onnx: center must be True, False or 'auto', got {center!r}")
    check_bool(bias_correction, "bias_correction", "quantize_onnx")
    if not (isinstance(reduce_range, bool) or reduce_range == "auto"):
        raise ReuseError(
            f"quantize_onnx: reduce_range must be True, False or 'auto', got {reduce_range!r}; True gives 7-bit "
            "weights, for x86 CPUs without VNNI"
        )
    seven = saturating_int8() if reduce_range == "auto" else bool(reduce_range)
    proto = onnx.load(str(src))
    if any(entry.key == FORM_KEY for entry in proto.metadata_props):
        warnings.warn(
            f"quantize_onnx({src.name}): the file holds blocks in their fp32 export form (faster in fp32), which "
            "the per-use steps do not recognise (no BatchNorm folded into per-use int8 scales, no range centring); "
            "for the int8 file, export with reuse.deploy.export_onnx(..., for_quantization=True)",
            UserWarning,
            stacklevel=2,
        )
    try:
        batches = calibration_batches(calibration, proto, input_range)
    except ReuseError as err:
        raise ReuseError(f"quantize_onnx({src.name}): {err}") from None
    groups, warns = coverage(proto, batches)
    for message in warns:
        warnings.warn(f"quantize_onnx({src.name}): {message}", UserWarning, stacklevel=2)
    float_bytes = sum(int(a.nbytes) for _, a in stored_tensors(proto) if a.dtype.kind == "f")
    options = dict(
        per_channel=per_channel,
        method=method,
        percentile=percentile,
        bias_correction=bias_correction,
        compact=compact,
        exclude=exclude,
        levels=64 if seven else 127,
    )
    tried = []
    for centre in (True, False) if center == "auto" else (bool(center),):
        try:
            data, qproto, notes = _quantize_once(proto, batches, dst, centre=centre, **options)
        except ReuseError as err:
            raise ReuseError(f"quantize_onnx({src.name}): {err}") from None
        tried.append((_output_error(str(src), data, batches), centre, data, qproto, notes))
    error, centre, data, qproto, notes = min(tried, key=lambda t: t[0])
    if center == "auto":
        errors = ", ".join(f"{'centred' if c else 'not centred'} {e:.3g}" for e, c, *_ in tried)
        notes.append(
            f"center='auto': kept {'centred' if centre else 'not centred'} (mean squared output error {errors})"
        )
    checked = _check_int8(str(src), data, batches)
    atomic_write(dst, data)
    return onnx_report(
        dst, qproto, "int8 ONNX (QDQ)", float_bytes, notes=notes, coverage=groups, warnings=warns, **checked
    )


def _quantize_once(
    source: Any,
    batches: list[Any],
    dst: Path,
    *,
    centre: bool,
    per_channel: bool,
    method: str,
    percentile: float,
    bias_correction: bool,
    compact: bool,
    exclude: Iterable[str],
    levels: int,
) -> tuple[bytes, Any, list[str]]:
    """Steps 1 to 6 of :func:`quantize_onnx` on a copy of ``source``: the int8 bytes, their proto and notes."""
    onnx = importlib.import_module("onnx")
    numpy_helper = importlib.import_module("onnx.numpy_helper")
    quantization = importlib.import_module("onnxruntime.quantization")
    proto = copy.deepcopy(source)
    shared = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    uses = fold_uses(proto) if per_channel else []
    centred = center_ranges(proto, uses, batches) if centre else 0
    exclude = list(exclude)
    corrected = 0
    if bias_correction:
        corrected = correct_bias(proto, batches, per_channel=per_channel, exclude=exclude, uses=uses, levels=levels)
    input_name = proto.graph.input[0].name
    calibrate = {
        "minmax": quantization.CalibrationMethod.MinMax,
        "percentile": quantization.CalibrationMethod.Percentile,
    }[method]
    with tempfile.TemporaryDirectory(dir=dst.parent if dst.parent.exists() else None) as tmp:
        folded = Path(tmp) / "folded.onnx"
        onnx.save(proto, str(folded))
        out = Path(tmp) / "int8.onnx"
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _quiet_logging():
            warnings.simplefilter("ignore")
            quantization.quantize_static(
                str(folded),
                str(out),
                _Batches(input_name, batches),
                quant_format=quantization.QuantFormat.QDQ,
                activation_type=quantization.QuantType.QUInt8,
                weight_type=quantization.QuantType.QInt8,
                per_channel=per_channel,
                reduce_range=levels < 127,
                calibrate_method=calibrate,
                nodes_to_exclude=exclude,
                extra_options={"WeightSymmetric": True, "ActivationSymmetric": False, "CalibPercentile": percentile},
            )
        qproto = onnx.load(str(out))
    in_float = float_outputs(qproto)
    shared_uses, own = share_int8(qproto, uses, shared, compact, levels)
    store_once(qproto)
    short_constant_names(qproto.graph, keep=lambda name: name.endswith(".int8") or name in shared)
    notes = [f"{shared_uses} uses read a shared int8 weight" + (f", {own} keep their own" if own else "")]
    how = f"percentile {percentile}" if method == "percentile" else method
    notes.append(
        f"calibration: {how}, {sum(len(b) for b in batches)} inputs; {centred} conv pairs centred; "
        f"{corrected} conv biases corrected for weight rounding; outputs in float ({in_float} QDQ pairs removed)"
    )
    notes.append(
        "weights of 7 bits, in [-64, 64] (reduce_range: onnxruntime's int8 kernels on x86 without VNNI saturate with 8)"
        if levels < 127
        else "weights of 8 bits, in [-127, 127]"
    )
    if not per_channel:
        notes.append("per_channel=False: the uses of a shared weight cannot share int8 values, each has its own")
    return qproto.SerializeToString(), qproto, notes


def _paired_outputs(src: str, data: bytes, batches: list[Any]) -> Iterator[tuple[Any, Any]]:
    """The first output of the fp32 file ``src`` and of the int8 file ``data`` on each batch, in onnxruntime."""
    fp32, int8 = ort_session(src, "quantize_onnx"), ort_session(data, "quantize_onnx")
    name = fp32.get_inputs()[0].name
    for batch in batches:
        yield fp32.run(None, {name: batch})[0], int8.run(None, {name: batch})[0]


def _output_error(src: str, data: bytes, batches: list[Any]) -> float:
    """Mean squared difference between the int8 file's outputs and the fp32 file's over ``batches``."""
    np = importlib.import_module("numpy")
    total, count = 0.0, 0
    for a, b in _paired_outputs(src, data, batches):
        total += float(np.square(a.astype("float64") - b).sum())
        count += a.size
    return total / max(count, 1)


def _check_int8(src: str, data: bytes, batches: list[Any], limit: int = 4) -> dict[str, Any]:
    """The int8 file against the fp32 one in onnxruntime, on the first calibration batches: the report's
    ``max_abs_diff``, ``agreement`` (top-1, for (N, classes) outputs) and ``check``."""
    np = importlib.import_module("numpy")
    diff, same, count = 0.0, 0, 0
    for a, b in _paired_outputs(src, data, batches[:limit]):
        diff = max(diff, float(np.abs(a - b).max()))
        if a.ndim == 2:
            same += int((a.argmax(1) == b.argmax(1)).sum())
            count += len(a)
    check = f"onnxruntime against {Path(src).name}, {min(limit, len(batches))} calibration batches"
    return {"max_abs_diff": diff, "agreement": same / count if count else None, "check": check}


@contextlib.contextmanager
def _quiet_logging() -> Iterator[None]:
    """onnxruntime's quantizer logs advice on the root logger ("consider pre-processing"): silence it."""
    import logging

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


class _Batches:
    """onnxruntime's CalibrationDataReader over a list of input batches."""

    def __init__(self, name: str, batches: list[Any]) -> None:
        self.name, self.batches, self.index = name, batches, 0

    def get_next(self) -> dict[str, Any] | None:
        if self.index >= len(self.batches):
            return None
        self.index += 1
        return {self.name: self.batches[self.index - 1]}

    def rewind(self) -> None:
        self.index = 0
