"""Tests of ``benchmarks/gpu_check.sh``, the one-shot GPU check, in its CPU mode (``GPU_CHECK_CPU=1``: the same
parts with tiny settings): what comes back in ``$OUT`` (at most 8 files, none deeper than ``$OUT/a/b/file``), the
grid's JSONL, the DDP and CIFAR parts' exit codes in summary.txt, and the time cap, which stops the grid and
hands back the unfinished runs' checkpoints. Each run takes about a minute on the 2-core machine: ``heavy``."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
SUBSET = ROOT / "examples" / "data" / "fashion_mnist_subset"


def test_the_script_parses() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def _gpudata(folder: Path) -> Path:
    """A small .gpudata: the shipped Fashion-MNIST subset, generated CIFAR-like images."""
    (folder / "fashion_mnist").mkdir(parents=True)
    for split in ("train", "test"):
        (folder / "fashion_mnist" / f"{split}.npz").write_bytes((SUBSET / f"{split}.npz").read_bytes())
    (folder / "cifar10_subset").mkdir()
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        images = rng.integers(0, 256, (300, 32, 32, 3), dtype=np.uint8)
        labels = np.tile(np.arange(10), 30).astype(np.int64)
        np.savez_compressed(folder / "cifar10_subset" / f"{split}.npz", images=images, labels=labels)
    return folder


def _run(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, Path, Path]:
    out, work = tmp_path / "out", tmp_path / "work"
    environ = {
        **os.environ, "OUT": str(out), "GPU_CHECK_CPU": "1", "GPUDATA": str(_gpudata(tmp_path / "gpudata")),
        "GPU_CHECK_WORK": str(work), "PYTHONPATH": str(ROOT), "PYTHON": "python", **env,
    }  # fmt: skip
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=environ, capture_output=True, text=True, timeout=400)
    return proc, out, work


def _returned(out: Path) -> list[Path]:
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(len(p.relative_to(out).parts) <= 3 for p in files)
    assert all(p.stat().st_size < 16 * 2**20 for p in files)
    return files


@pytest.mark.heavy
def test_cpu_mode_runs_every_part(tmp_path: Path) -> None:
    proc, out, _ = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    names = {p.relative_to(out).as_posix() for p in _returned(out)}
    assert {"summary.txt", "logs.tar.gz", "results/fashion-gpu.jsonl", "results/fashion-gpu.md"} <= names
    summary = (out / "summary.txt").read_text()
    assert "(c) DDP exit 0" in summary and "(a) grid exit 0" in summary and "(b) CIFAR exit 0" in summary
    assert "ALL PARTS FINISHED" in summary
    assert '"ddp": true' in summary and summary.count("done: 1/1 epochs") == 2
    lines = [json.loads(t) for t in (out / "results" / "fashion-gpu.jsonl").read_text().splitlines()]
    assert sorted(line["settings"]["reuse"] for line in lines) == [1, 2]
    with tarfile.open(out / "logs.tar.gz") as tar:
        members = tar.getnames()
    assert any(m.endswith("metrics.jsonl") for m in members) and "./logs/cifar14.log" in members
    assert not any(m.endswith(".pt") for m in members)


@pytest.mark.heavy
def test_the_cap_stops_the_grid_and_returns_what_it_reached(tmp_path: Path) -> None:
    """A grid cap of 70 s against 300-epoch runs (no machine finishes them in 70 s): the grid is stopped (exit
    124), whatever its runs reached comes back (their checkpoints in unfinished_runs.tar), and the script ends."""
    proc, out, _ = _run(tmp_path, GPU_CHECK_GRID_CAP="70", GPU_CHECK_GRID_EXTRA="--epochs 300")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _returned(out)
    summary = (out / "summary.txt").read_text()
    assert "(a) grid exit 124" in summary and "NOT ALL PARTS FINISHED: grid exit 124" in summary
    # How far the runs got in 70 s depends on the machine's load: an epoch may or may not have ended. Whatever
    # they reached must come back: a run with an epoch behind it is "partial" and its checkpoint is in the tar.
    partial = summary.count("partial: ")
    if partial:
        with tarfile.open(out / "unfinished_runs.tar") as tar:
            names = tar.getnames()
        assert sum(n.endswith("/last.pt") for n in names) >= 1
