"""benchmarks/lrunet_speed.py's allocator setting: with ``keep_freed_memory()`` glibc serves a large buffer from
its heap instead of mapping it afresh (the page faults that made LruNet's 32 MiB activations slow to train)."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Bytes in freshly mapped chunks (mallinfo2's hblkhd) grown by one 48 MiB tensor, before and after the setting.
# In a child process: the setting is process-wide and must not reach the test session.
PROBE = f"""
import ctypes, sys, torch
sys.path.insert(0, {str(ROOT / "benchmarks")!r})
import lrunet_speed

class MallInfo2(ctypes.Structure):
    names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
    _fields_ = [(name, ctypes.c_size_t) for name in names.split()]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2

def mapped_growth():
    before = libc.mallinfo2().hblkhd
    x = torch.empty(12 * 2**20)  # 48 MiB
    grown = libc.mallinfo2().hblkhd - before
    del x
    return grown

first = mapped_growth()
took = lrunet_speed.keep_freed_memory()
print(first, took, mapped_growth())
"""


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt and mallinfo2 only"
)
def test_keep_freed_memory_serves_large_buffers_from_the_heap() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=True)
    first, took, after = out.stdout.split()
    assert int(first) >= 48 * 2**20  # glibc's default: a buffer this large is a fresh mapping
    assert took == "True"
    assert int(after) == 0  # now from the heap
