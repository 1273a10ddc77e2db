"""Whether this CPU's int8 kernels in onnxruntime saturate with 8-bit weights: x86 without VNNI.

onnxruntime's uint8 x int8 (U8S8) matrix kernels on x86 CPUs without VNNI (AVX2 only: AMD Zen 1-3, Intel
before Cascade Lake / Alder Lake) multiply with ``vpmaddubsw``, which adds two ``uint8 * int8`` products in
int16 and saturates: ``255 * 127 * 2 = 64770`` does not fit in 32,767. With weights of 7 bits (``[-64, 64]``,
onnxruntime's ``reduce_range``) the pair sum is at most 32,640 and nothing saturates. Measured on an AMD EPYC
(Zen 3, AVX2) VM with onnxruntime 1.32: a lone 16-channel ``QLinearConv`` with 8-bit weights was off by 26-45%
of its output's range, with 7-bit weights exact to the reference arithmetic; depthwise convs (another kernel)
were exact either way. VNNI's ``vpdpbusd`` accumulates in int32 and ARM's kernels widen first: there 8-bit
weights are exact and keep one more bit of precision.
"""

from __future__ import annotations

import platform
from pathlib import Path

_X86 = ("x86_64", "amd64", "i386", "i686", "x86")
_VNNI = ("avx512_vnni", "avx_vnni", "amx_int8")  # Linux's /proc/cpuinfo names of int8 dot-product units


def saturating_int8(cpuinfo: str | None = None, machine: str | None = None) -> bool:
    """True where onnxruntime's U8S8 kernels saturate with 8-bit weights: an x86 CPU without VNNI.

    ``cpuinfo`` is the text of ``/proc/cpuinfo`` (read when not given); on an x86 machine where it cannot be read
    (not Linux) the answer is True: 7-bit weights are exact everywhere, 8-bit ones only where VNNI is known.

    Example:
        >>> saturating_int8("flags : fpu sse4_2 avx2 fma", machine="x86_64")
        True
        >>> saturating_int8("flags : fpu avx2 avx512f avx512_vnni", machine="x86_64")
        False
        >>> saturating_int8("Features : fp asimd asimddp", machine="aarch64")
        False
    """
    machine = (machine or platform.machine()).lower()
    if machine not in _X86:
        return False
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return True
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), None)
    if flags is None:
        return True
    return not any(name in flags for name in _VNNI)
