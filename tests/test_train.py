"""Tests of the training script ``examples/lrunet_cifar.py`` on the CPU.

End to end on tiny real data (the Fashion-MNIST subset shipped in ``examples/data``), the CIFAR-100 defaults on
generated data, exact resume (and resume with more epochs), atomic checkpoints (a failing save, a full disk and a
real SIGKILL), stale temporaries, DDP on gloo with two processes against one process, the on-device augmentation,
the ablation flags ``--no-share`` and ``--no-shuffle``, and the one-line messages for bad options, missing,
malformed or corrupt data, unwritable run directories, bad checkpoints and diverged runs; the functions that
benchmarks/reproduce.py uses (pick_device, time_training, run_cli) and the script's docstring examples.
"""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import load_script
from hypothesis import given, settings
from hypothesis import strategies as st

import reuse
from reuse.models import LruNet

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "lrunet_cifar.py"
SUBSET = ROOT / "examples" / "data" / "fashion_mnist_subset"


lc = load_script(SCRIPT, "lrunet_cifar")

# A few seconds per run: 64 real images, a quarter-width 2-LruNet, batches of 16.
TINY = [
    "--dataset", "fashion-mnist", "--data-dir", str(SUBSET), "--subset", "64", "--test-subset", "64",
    "--batch-size", "16", "--width", "0.25", "--reuse", "2", "--schedule", "onecycle", "--no-progress",
]  # fmt: skip


def _env() -> dict[str, str]:
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: one thread is as fast, and on a busy 2-core machine much faster than two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _weights(run: Path, name: str = "last.pt") -> dict[str, torch.Tensor]:
    return torch.load(run / name, map_location="cpu")["model"]


def _cli_error(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], args: list[str]) -> str:
    """Run the command line in this process with ``args``; check that it exits non-zero with exactly one line on
    stderr, ``lrunet_cifar.py: error: ...``, and no traceback; return that line."""
    monkeypatch.setattr(sys, "argv", ["lrunet_cifar.py", *args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        lc.cli()
    err = capsys.readouterr().err
    assert stop.value.code not in (0, None), err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lrunet_cifar.py: error: "), err
    return lines[0]


def _no_data_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any data load fail the test: what must be checked before the work starts is checked before it."""

    def fail(cfg: object) -> None:
        raise AssertionError("the data were loaded before the bad option was found")

    monkeypatch.setattr(lc, "load_data", fail)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-epoch run; tests copy it rather than change it."""
    run = tmp_path_factory.mktemp("finished") / "run"
    torch.set_num_threads(1)
    lc.main([*TINY, "--epochs", "1", "--out", str(run)])
    return run


def _copy_run(run: Path, dest: Path) -> Path:
    dest.mkdir()
    for f in run.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    return dest


# --------------------------------------------------------------------------------------------------- end to end


def test_shipped_subset_is_real_fashion_mnist() -> None:
    for split, n in (("train", 3000), ("test", 1000)):
        with np.load(SUBSET / f"{split}.npz") as d:
            assert d["images"].shape == (n, 28, 28) and d["images"].dtype == np.uint8
            assert d["labels"].dtype == np.int64
            assert np.bincount(d["labels"]).tolist() == [n // 10] * 10
    assert sum(f.stat().st_size for f in SUBSET.iterdir()) < 2_000_000


def test_end_to_end_on_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two epochs of real data: the run directory holds every promised file, and the numbers agree."""
    run = tmp_path / "run"
    final = lc.main([*TINY, "--epochs", "2", "--out", str(run)])

    model = LruNet(num_classes=10, width_mult=0.25, reuse=2, in_chans=1)
    assert final["params"] == sum(p.numel() for p in model.parameters())
    assert final["model"] == "2-LruNet-0.25x" and final["epochs"] == 2 and final["train_images"] == 64
    assert final["mflops"] > 0 and final["wall_s"] > 0
    assert 0 <= final["last_acc"] <= final["best_acc"] <= 1

    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == final  # the last line is the JSON
    assert json.loads((run / "final.json").read_text()) == final
    config = json.loads((run / "config.json").read_text())
    assert config["dataset"] == "fashion-mnist" and config["drop_rate"] == 0.5 and config["out"] == str(run)
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[-1]["test_acc"] == final["last_acc"] and max(h["test_acc"] for h in history) == final["best_acc"]
    assert all(np.isfinite(h["train_loss"]) and h["img_per_s"] > 0 for h in history)
    model.load_state_dict(_weights(run))  # strict: the checkpoint is a plain LruNet state dict
    best = torch.load(run / "best.pt", map_location="cpu")
    assert best["test_acc"] == final["best_acc"]
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(run.glob(".*tmp"))


def test_cifar100_uses_the_papers_defaults(tmp_path: Path) -> None:
    """No CIFAR-100 copy offline: generated images in the npz layout; width 2x and dropout 0.7 by default."""
    data = tmp_path / "c100"
    data.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 32), ("test", 16)):
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        np.savez(data / f"{split}.npz", images=images, labels=rng.integers(0, 100, n).astype(np.int64))
    run = tmp_path / "run"
    final = lc.main(["--dataset", "cifar100", "--data-dir", str(data), "--reuse", "1", "--epochs", "1",
                     "--batch-size", "16", "--no-progress", "--out", str(run)])  # fmt: skip
    config = json.loads((run / "config.json").read_text())
    assert (config["width"], config["drop_rate"]) == (2.0, 0.7)
    assert final["model"] == "1-LruNet-2x"
    assert final["params"] == sum(p.numel() for p in LruNet(100, width_mult=2.0, reuse=1).parameters())
    assert _weights(run)["classifier.weight"].shape[0] == 100


def _write_idx(path: Path, array: np.ndarray) -> None:
    """An uncompressed idx file, the format torchvision's FashionMNIST reads from its raw/ folder."""
    code = 0x08  # unsigned byte
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_torchvision_layout(tmp_path: Path) -> None:
    """--data-dir may be a torchvision root: FashionMNIST/raw/*-ubyte, read by torchvision itself."""
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        with np.load(SUBSET / f"{split}.npz") as d:
            _write_idx(raw / f"{prefix}-images-idx3-ubyte", d["images"][:40])
            _write_idx(raw / f"{prefix}-labels-idx1-ubyte", d["labels"][:40])
    cfg, _ = lc.parse_config(["--dataset", "fashion-mnist", "--data-dir", str(tmp_path), "--no-download"])
    data = lc.load_data(cfg)
    with np.load(SUBSET / "train.npz") as d:
        assert torch.equal(data.train_x[..., 0], torch.from_numpy(d["images"][:40]))
        assert torch.equal(data.train_y, torch.from_numpy(d["labels"][:40]))
    assert data.source.startswith("torchvision.datasets.FashionMNIST")


# ------------------------------------------------------------------------------------------------------- resume


class _Killed(Exception):
    """Stands for a kill right after a checkpoint was written."""


def test_resume_gives_the_same_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run stopped after epoch 1 and resumed ends with exactly the weights, optimizer state and metrics of a
    run that never stopped (augmentation, dropout and the one-cycle schedule all on)."""
    args = [*TINY, "--epochs", "3"]
    lc.main([*args, "--out", str(tmp_path / "straight")])

    real_save = lc.save_checkpoint

    def save_then_die(obj: dict, path: Path) -> None:
        real_save(obj, path)
        if path.name == "last.pt" and obj["epoch"] == 1:
            raise _Killed

    monkeypatch.setattr(lc, "save_checkpoint", save_then_die)
    with pytest.raises(_Killed):
        lc.main([*args, "--out", str(tmp_path / "stopped")])
    monkeypatch.setattr(lc, "save_checkpoint", real_save)
    lc.main(["--out", str(tmp_path / "stopped"), "--resume", "--no-progress"])  # config comes from the run

    a = torch.load(tmp_path / "straight" / "last.pt")
    b = torch.load(tmp_path / "stopped" / "last.pt")
    assert a["epoch"] == b["epoch"] == 3
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    moms_a = [s["momentum_buffer"] for s in a["optimizer"]["state"].values()]
    moms_b = [s["momentum_buffer"] for s in b["optimizer"]["state"].values()]
    assert all(torch.equal(x, y) for x, y in zip(moms_a, moms_b, strict=True))
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"]
    keys = ("epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc")
    assert [{k: h[k] for k in keys} for h in a["history"]] == [{k: h[k] for k in keys} for h in b["history"]]
    lines = (tmp_path / "stopped" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


def test_resume_and_out_refuse_what_they_cannot_do(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(reuse.ReuseError, match="needs --out"):
        lc.main(["--resume"])
    with pytest.raises(reuse.ReuseError, match="last.pt does not exist"):
        lc.main(["--resume", "--out", str(run)])
    lc.main([*TINY, "--epochs", "1", "--out", str(run)])
    with pytest.raises(reuse.ReuseError, match="already holds a run"):
        lc.main([*TINY, "--epochs", "1", "--out", str(run)])
    with pytest.raises(reuse.ReuseError, match=r"--lr 0.5 \(the run has 0.1\)"):
        lc.main(["--resume", "--out", str(run), "--lr", "0.5"])
    with pytest.raises(reuse.ReuseError, match=r"--no-share \(the run was started without it\)"):
        lc.main(["--resume", "--out", str(run), "--no-share", "--epochs", "3"])


def test_resume_can_raise_epochs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A finished 2-epoch cosine run, resumed with --epochs 4: it trains epochs 3 and 4 on the cosine of the new
    length (placed at the step reached), says so, and records the change; lowering below the epochs done is
    refused."""
    run = tmp_path / "run"
    lc.main([*TINY, "--schedule", "cosine", "--epochs", "2", "--out", str(run)])
    before = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    capsys.readouterr()
    final = lc.main(["--out", str(run), "--resume", "--epochs", "4", "--no-progress"])
    log = capsys.readouterr().out
    assert "resuming after epoch 2, --epochs 2 -> 4" in log and "recomputed for 4 epochs" in log
    assert final["epochs"] == 4
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4] and history[:2] == before
    steps = 64 // 16  # per epoch
    cosine = [0.1 * 0.5 * (1 + math.cos(math.pi * (e * steps) / (4 * steps))) for e in (3, 4)]  # lr after epoch e
    assert [h["lr"] for h in history[2:]] == pytest.approx(cosine, abs=1e-12)
    config = json.loads((run / "config.json").read_text())
    assert config["epochs"] == 4 and config["epochs_changes"] == [{"after_epoch": 2, "from": 2, "to": 4}]
    assert torch.load(run / "last.pt")["config"]["epochs"] == 4
    with pytest.raises(reuse.ReuseError, match="--epochs 3 is fewer than the 4 epochs the run has done"):
        lc.main(["--out", str(run), "--resume", "--epochs", "3"])


@pytest.mark.parametrize("schedule", ["paper", "cosine", "onecycle"])
def test_a_placed_schedule_goes_on_as_one_of_the_new_length(schedule: str) -> None:
    """Six epochs of three steps done, the run extended to twelve: from step 18 on, the learning rate (and
    one-cycle's momentum) are those of a fresh twelve-epoch schedule at the same step."""
    steps, done, total = 3, 6 * 3, 12 * 3
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, momentum=0.9)
    old = lc.make_scheduler(opt, lc.parse_config(["--epochs", "6", "--schedule", schedule])[0], steps)
    for _ in range(done):
        opt.step()
        old.step()
    sched = lc.place_scheduler(opt, lc.parse_config(["--epochs", "12", "--schedule", schedule])[0], steps, done)
    if schedule == "onecycle":  # the reference: torch's OneCycleLR of the new length, stepped from the start
        ref_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, momentum=0.9)
        ref = torch.optim.lr_scheduler.OneCycleLR(ref_opt, max_lr=0.1, total_steps=total)
        expected, momenta = [], []
        for step in range(total + 1):
            if step >= done:
                expected.append(ref_opt.param_groups[0]["lr"])
                momenta.append(ref_opt.param_groups[0]["momentum"])
            if step < total:
                ref_opt.step()
                ref.step()
    elif schedule == "cosine":
        expected = [0.1 * 0.5 * (1 + math.cos(math.pi * s / total)) for s in range(done, total + 1)]
    else:  # milestones at round(2 * 12 / 3) = 8 and round(5 * 12 / 6) = 10 epochs: back to 0.1 at epoch 6
        expected = [0.1 * 0.1 ** ((s // steps >= 8) + (s // steps >= 10)) for s in range(done, total + 1)]
    seen, seen_momenta = [], []
    for step in range(done, total + 1):
        seen.append(opt.param_groups[0]["lr"])
        seen_momenta.append(opt.param_groups[0]["momentum"])
        if step < total:
            opt.step()
            sched.step()
    assert seen == pytest.approx(expected, abs=1e-12)
    if schedule == "onecycle":
        assert seen_momenta == pytest.approx(momenta, abs=1e-12)


@pytest.mark.parametrize("kind", ["truncated", "text", "state dict", "tensor"])
def test_resume_refuses_a_bad_last_pt(
    kind: str,
    finished_run: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = _copy_run(finished_run, tmp_path / "run")
    good = (run / "last.pt").read_bytes()
    if kind == "truncated":
        (run / "last.pt").write_bytes(good[: len(good) // 2])
    elif kind == "text":
        (run / "last.pt").write_text("not a checkpoint\n")
    elif kind == "state dict":  # a valid torch file, but not ours
        torch.save(LruNet(10, width_mult=0.25, reuse=2, in_chans=1).state_dict(), run / "last.pt")
    else:
        torch.save(torch.zeros(3), run / "last.pt")
    before = (run / "last.pt").read_bytes()
    _no_data_load(monkeypatch)
    line = _cli_error(monkeypatch, capsys, ["--out", str(run), "--resume", "--no-progress"])
    assert str(run / "last.pt") in line
    assert ("cannot be read" if kind in ("truncated", "text") else "not a checkpoint of lrunet_cifar.py") in line
    assert (run / "last.pt").read_bytes() == before  # left as it was


# ------------------------------------------------------------------------------------------ atomic checkpoints


def test_failed_save_leaves_the_old_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.pt"
    lc.save_checkpoint({"epoch": 1, "w": torch.arange(10)}, path)

    def half_write_then_fail(obj: object, f: Path) -> None:
        Path(f).write_bytes(b"PK\x03\x04 half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(lc.torch, "save", half_write_then_fail)
    with pytest.raises(OSError, match="No space"):
        lc.save_checkpoint({"epoch": 2, "w": torch.zeros(10)}, path)
    monkeypatch.undo()
    old = torch.load(path)
    assert old["epoch"] == 1 and torch.equal(old["w"], torch.arange(10))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


def test_full_disk_during_a_save_stops_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The disk fills up while epoch 2 is saved: one error line that says last.pt still holds epoch 1, a
    non-zero exit, last.pt whole, no temporary left; once there is room, --resume finishes the run."""
    run = tmp_path / "run"
    real_save = torch.save

    def full_disk(obj: object, f: Path) -> None:
        if Path(f).name.startswith(".last.pt.") and obj["epoch"] == 2:
            Path(f).write_bytes(b"PK\x03\x04 half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(obj, f)

    monkeypatch.setattr(lc.torch, "save", full_disk)
    line = _cli_error(monkeypatch, capsys, [*TINY, "--epochs", "2", "--out", str(run)])
    assert f"writing {run / 'last.pt'} failed (No space left on device)" in line
    assert f"{run / 'last.pt'} still holds epoch 1" in line and "--resume" in line
    monkeypatch.undo()
    assert torch.load(run / "last.pt")["epoch"] == 1
    assert not list(run.glob(".*tmp"))
    assert lc.main(["--out", str(run), "--resume", "--no-progress"])["epochs"] == 2


def test_stale_temporaries_are_removed_at_start_and_on_resume(tmp_path: Path) -> None:
    """A kill during a save leaves ``.NAME.PID.tmp`` behind. A run starting or resuming in the directory deletes
    those of dead processes, and nothing else: not other files, not another pattern, not a live process's."""
    run = tmp_path / "run"
    run.mkdir()
    dead = 2**31 - 1  # above any pid_max: no such process
    stale = [f".last.pt.{dead}.tmp", f".curves.png.{dead}.tmp", f".metrics.jsonl.{dead}.tmp"]
    kept = ["notes.txt", ".last.pt.tmp", f".other.{dead}.tmp", f".last.pt.{os.getppid()}.tmp", f"last.pt.{dead}.tmp"]
    for name in stale + kept:
        (run / name).write_text("x")
    lc.main([*TINY, "--epochs", "1", "--out", str(run)])
    assert not any((run / name).exists() for name in stale)
    assert all((run / name).read_text() == "x" for name in kept)
    (run / f".best.pt.{dead}.tmp").write_bytes(b"half")
    lc.main(["--out", str(run), "--resume", "--epochs", "2", "--no-progress"])
    assert not (run / f".best.pt.{dead}.tmp").exists()
    assert all((run / name).read_text() == "x" for name in kept)


def test_unwritable_out_is_found_before_the_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--out below a regular file cannot be created (whoever runs the test, root included)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    _no_data_load(monkeypatch)
    line = _cli_error(monkeypatch, capsys, [*TINY, "--epochs", "1", "--out", str(blocker / "run")])
    assert f"--out {blocker / 'run'}: cannot write there" in line
    assert blocker.read_text() == "keep me"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_is_found_before_the_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        _no_data_load(monkeypatch)
        line = _cli_error(monkeypatch, capsys, [*TINY, "--epochs", "1", "--out", str(locked / "run")])
        assert "cannot write there" in line and not (locked / "run").exists()
    finally:
        locked.chmod(0o700)


def test_a_run_that_stops_before_writing_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The write check creates --out and its parents, and removes them again when the run stops before its first
    write (here: no data)."""
    _no_data_load(monkeypatch)
    with pytest.raises(AssertionError, match="the data were loaded"):
        lc.main([*TINY, "--epochs", "1", "--out", str(tmp_path / "new" / "deeper" / "run")])
    assert list(tmp_path.iterdir()) == []


def test_sigkill_during_saves_never_corrupts(tmp_path: Path) -> None:
    """A process saving 16 MB checkpoints in a loop is killed at an arbitrary moment: last.pt still loads."""
    path = tmp_path / "last.pt"
    child = textwrap.dedent(f"""
        import importlib.util, sys, torch
        spec = importlib.util.spec_from_file_location("lc", {str(SCRIPT)!r})
        lc = importlib.util.module_from_spec(spec); sys.modules["lc"] = lc; spec.loader.exec_module(lc)
        for i in range(10**6):
            lc.save_checkpoint({{"i": i, "w": torch.full((4_000_000,), float(i))}}, lc.Path({str(path)!r}))
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], env=_env())
    try:
        deadline = time.monotonic() + 60
        while not path.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the child never wrote a checkpoint"
            time.sleep(0.05)
        time.sleep(0.7)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    ckpt = torch.load(path)
    assert torch.all(ckpt["w"] == float(ckpt["i"]))


# -------------------------------------------------------------------------------------------------------- DDP


def test_ddp_on_gloo_matches_one_process(tmp_path: Path) -> None:
    """``torchrun --nproc_per_node=2`` on gloo ends with the parameters of a single process with the same global
    batch, after 4 steps of SGD.

    Why these settings make equality hold:
    - Data order and augmentation come from a generator seeded with (seed, epoch) and drawn for the whole
      global batch, the same in every process; process r takes the images at positions r::2 of each batch.
    - BatchNorm normalises with the statistics of the images a process sees (SyncBatchNorm would need CUDA).
      So the single process runs with ``--grad-accum 2``: micro-batch a takes positions a::2, exactly the
      images of DDP process a, and its loss is divided by 2; DDP averages the two processes' gradients. Both
      give the gradient of the same loss, up to float rounding (hence allclose, not equal).
    - Running BatchNorm statistics differ (DDP broadcasts process 0's before each forward, the single process
      updates them twice per step), but in training mode they do not touch the forward pass, so only the
      parameters are compared.
    - Dropout off: each DDP process draws its own masks, one process draws them in sequence.
    The single process with the full batch in one piece (``--grad-accum 1``) differs: the check is sensitive to
    how the batch is split. A run that finishes at all shows DDP reduced the reused weights (used N times per
    forward) without the "marked ready twice" failure.
    """
    args = [*TINY, "--epochs", "1", "--drop-rate", "0", "--device", "cpu"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT)]
    proc = subprocess.run(
        [*cmd, *args, "--out", str(tmp_path / "ddp")], env=_env(),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "marked ready twice" not in proc.stderr + proc.stdout
    assert json.loads(proc.stdout.strip().splitlines()[-1])["device"] == "cpu x 2"

    lc.main([*args, "--grad-accum", "2", "--out", str(tmp_path / "one")])
    lc.main([*args, "--out", str(tmp_path / "whole")])
    ddp, one, whole = (_weights(tmp_path / n) for n in ("ddp", "one", "whole"))
    names = [n for n, _ in LruNet(10, width_mult=0.25, reuse=2, in_chans=1).named_parameters()]
    assert names and all(n in ddp for n in names)
    for n in names:
        torch.testing.assert_close(ddp[n], one[n], rtol=1e-4, atol=1e-5, msg=n)
    assert any(not torch.allclose(ddp[n], whole[n], rtol=1e-4, atol=1e-5) for n in names)
    torch.manual_seed(0)  # the script's initial weights (--seed 0)
    init = LruNet(10, width_mult=0.25, reuse=2, drop_rate=0.0, in_chans=1).state_dict()
    assert all(not torch.allclose(ddp[n], init[n]) for n in names if n.endswith("dw.weight"))  # it trained


# ------------------------------------------------------------------------------------------------ augmentation


@st.composite
def _batches(draw: st.DrawFn) -> tuple[torch.Tensor, object]:
    b, h, w, c = (
        draw(st.integers(1, 4)),
        draw(st.integers(1, 9)),
        draw(st.integers(1, 9)),
        draw(st.sampled_from([1, 3])),
    )
    x = torch.from_numpy(np.random.default_rng(draw(st.integers(0, 99))).integers(0, 256, (b, h, w, c), dtype=np.uint8))
    offsets = st.lists(st.integers(0, 8), min_size=b, max_size=b)
    flips = st.lists(st.booleans(), min_size=b, max_size=b)
    p = lc.AugParams(
        torch.tensor(draw(offsets)), torch.tensor(draw(offsets)), torch.zeros(b), torch.tensor(draw(flips))
    )
    return x, p


@settings(deadline=None, max_examples=25)
@given(_batches())
def test_crop_and_flip_are_exact(batch: tuple[torch.Tensor, object]) -> None:
    """Without rotation, each output image is a window of the zero-padded input, mirrored where asked."""
    x, p = batch
    y = lc.augment(x, p)  # (B, C, H, W)
    b, h, w, c = x.shape
    padded = torch.nn.functional.pad(x, (0, 0, 4, 4, 4, 4)).permute(0, 3, 1, 2).float() / 255  # (B, C, H+8, W+8)
    for i in range(b):
        ref = padded[i, :, p.dy[i] : p.dy[i] + h, p.dx[i] : p.dx[i] + w]  # (C, H, W)
        torch.testing.assert_close(y[i], ref.flip(-1) if p.flip[i] else ref, rtol=0, atol=0)


def test_rotation_turns_about_the_centre() -> None:
    x = torch.randint(0, 256, (1, 6, 6, 2), dtype=torch.uint8)
    ref = x[0].permute(2, 0, 1).float() / 255  # (C, H, W)
    centre = dict(dx=torch.tensor([4]), dy=torch.tensor([4]), flip=torch.tensor([False]))
    assert torch.equal(
        lc.augment(x, lc.AugParams(angle=torch.tensor([90.0]), **centre))[0], torch.rot90(ref, 1, (1, 2))
    )
    wide = torch.randint(0, 256, (1, 4, 8, 1), dtype=torch.uint8)
    turned = lc.augment(wide, lc.AugParams(angle=torch.tensor([180.0]), **centre))[0]
    assert torch.equal(turned, (wide[0].permute(2, 0, 1).float() / 255).flip(1, 2))


def test_augmentation_draws_stay_in_the_recipe() -> None:
    p = lc.draw_aug_params(4000, torch.Generator().manual_seed(0))
    assert p.dx.min() == 0 and p.dx.max() == 8 and p.dy.min() == 0 and p.dy.max() == 8
    assert -10 <= p.angle.min() < -9.9 and 9.9 < p.angle.max() <= 10
    assert 0.45 < p.flip.float().mean() < 0.55
    y = lc.augment(torch.randint(0, 256, (64, 28, 28, 1), dtype=torch.uint8), p[:64])
    assert y.shape == (64, 1, 28, 28) and y.dtype == torch.float32 and 0 <= y.min() and y.max() <= 1


# ---------------------------------------------------------------------------------------------- model, schedule


def test_level_goes_to_lrunet_only_when_it_takes_one(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = lc.resolve_defaults(lc.parse_config(["--level", "filter", "--width", "0.25"])[0])
    seen = {}

    class WithLevel(torch.nn.Module):
        def __init__(self, num_classes, width_mult, reuse, drop_rate, in_chans, level="layer"):
            super().__init__()
            seen["level"] = level

    class WithoutLevel(torch.nn.Module):
        def __init__(self, num_classes, width_mult, reuse, drop_rate, in_chans):
            super().__init__()

    monkeypatch.setattr(lc, "LruNet", WithLevel)
    lc.build_model(cfg, 3)
    assert seen == {"level": "filter"}
    monkeypatch.setattr(lc, "LruNet", WithoutLevel)
    with pytest.raises(reuse.ReuseError, match="no `level` argument"):
        lc.build_model(cfg, 3)
    lc.build_model(lc.resolve_defaults(lc.parse_config(["--level", "layer"])[0]), 3)  # what LruNet does anyway


def lrunet_params(n: int, width: float, classes: int, in_chans: int, share: bool) -> int:
    """LruNet's parameters by hand from the paper's Table 1: stem conv + BN; per LRU block of F channels a
    depthwise 3x3 F -> 2F (18F weights) and a pointwise 2F -> F in 8 groups (F^2 / 4), once when the N uses share
    them, N times when not, and per use their two BatchNorms (4F + 2F); the head's 1x1 conv in 8 groups, BN and
    the classifier with bias."""
    stages = [round(c * width) for c in (64, 128, 256, 512)]
    stem, head = (64 if width in (1.0, 2.0) else stages[0]), round(256 * width)
    convs = sum(18 * f + f * f // 4 for f in stages)
    norms = sum(6 * f for f in stages)
    return (
        9 * in_chans * stem + 2 * stem
        + (1 if share else n) * convs + n * norms
        + stages[3] * head // 8 + 2 * head + head * classes + classes
    )  # fmt: skip


def test_no_share_builds_new_layers_through_the_script(tmp_path: Path) -> None:
    assert lrunet_params(8, 1.0, 10, 3, share=False) == 901_962  # the paper's 902k (Table 4), as a check of the count
    assert lrunet_params(14, 1.0, 10, 3, share=True) == 206_282  # the paper's 206k (Table 2)
    final = lc.main([*TINY, "--epochs", "1", "--no-share", "--out", str(tmp_path / "run")])
    assert final["params"] == lrunet_params(2, 0.25, 10, 1, share=False) != lrunet_params(2, 0.25, 10, 1, share=True)
    assert final["model"] == "2-LruNet-0.25x-noshare" and final["share"] is False and final["shuffle"] is True
    weights = _weights(tmp_path / "run")
    assert not torch.equal(weights["stage2.uses.0.dw.weight"], weights["stage2.uses.1.dw.weight"])
    assert json.loads((tmp_path / "run" / "config.json").read_text())["share"] is False


def test_no_shuffle_reaches_the_model(tmp_path: Path) -> None:
    cfg = lc.resolve_defaults(lc.parse_config([*TINY, "--no-shuffle"])[0])
    assert all(stage.shuffle is None for stage in lc.build_model(cfg, 1).stages)
    plain = lc.resolve_defaults(lc.parse_config(TINY)[0])
    assert all(stage.shuffle is not None for stage in lc.build_model(plain, 1).stages)
    final = lc.main([*TINY, "--epochs", "1", "--no-shuffle", "--out", str(tmp_path / "run")])
    assert final["model"] == "2-LruNet-0.25x-noshuffle" and final["shuffle"] is False and final["share"] is True
    assert final["params"] == lrunet_params(2, 0.25, 10, 1, share=True)  # a shuffle has no parameters


def test_paper_schedule_is_200_50_50_scaled() -> None:
    cfg = lc.parse_config(["--epochs", "6"])[0]
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = lc.make_scheduler(opt, cfg, steps_per_epoch=2)
    lrs = []
    for _ in range(12):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.1] * 8 + [0.01] * 2 + [0.001] * 2)


# ------------------------------------------------------------------------------------------------ missing data


def test_no_data_and_no_download(tmp_path: Path) -> None:
    with pytest.raises(reuse.ReuseError) as err:
        lc.main(["--dataset", "cifar10", "--data-dir", str(tmp_path), "--no-download", "--out", str(tmp_path / "r")])
    msg = str(err.value)
    assert str(tmp_path) in msg and "train.npz" in msg and "--data-dir" in msg and "CIFAR10" in msg


def test_download_failure_says_where_to_put_the_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision

    class Offline:
        def __init__(self, root: str, train: bool, download: bool) -> None:
            if download:
                raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
            raise RuntimeError("Dataset not found or corrupted. You can use download=True to download it")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", Offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(reuse.ReuseError) as err:
        lc.main(["--dataset", "fashion-mnist", "--no-progress"])
    msg = str(err.value)
    assert "download failed (URLError" in msg and "--data-dir" in msg and "fashion_mnist_subset" in msg
    assert not (tmp_path / "runs").exists()  # nothing written for a run that never started


def test_cli_prints_a_message_not_a_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dataset", "cifar10", "--data-dir", str(tmp_path), "--no-download"],
        env=_env(), capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.startswith("lrunet_cifar.py: error: no cifar10 data") and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("files", "match"),
    [
        ({"train": dict(images=np.zeros((4, 28, 28), np.uint8), labels=np.zeros(4, np.int64))}, "holds no test.npz"),
        ({"train": dict(images=np.zeros((4, 28, 28), np.float32), labels=np.zeros(4, np.int64))}, "must be uint8"),
        ({"train": dict(images=np.zeros((4, 28, 28, 3), np.uint8), labels=np.zeros(4, np.int64))}, "3 channels"),
        ({"train": dict(images=np.zeros((4, 28, 28), np.uint8), labels=np.zeros(3, np.int64))}, "labels` must be"),
        ({"train": dict(images=np.zeros((4, 28, 28), np.uint8), labels=np.full(4, 10))}, "is --dataset right"),
        ({"train": dict(pixels=np.zeros((4, 28, 28), np.uint8))}, "lacks"),
    ],
)
def test_malformed_npz_is_named(tmp_path: Path, files: dict, match: str) -> None:
    good = dict(images=np.zeros((4, 28, 28), np.uint8), labels=np.zeros(4, np.int64))
    for split, arrays in {"test": good, **files}.items() if "holds no" not in match else files.items():
        np.savez(tmp_path / f"{split}.npz", **arrays)
    cfg, _ = lc.parse_config(["--dataset", "fashion-mnist", "--data-dir", str(tmp_path)])
    with pytest.raises(reuse.ReuseError, match=match) as err:
        lc.load_data(cfg)
    assert str(tmp_path) in str(err.value)


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


GOOD = dict(images=np.zeros((4, 28, 28), np.uint8), labels=np.zeros(4, np.int64))


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (_npz_bytes(**GOOD)[:300], "truncated or corrupt"),
        (_npz_bytes(**GOOD)[:-40], "truncated or corrupt"),
        (b"images,labels\n0,0\n", "not an .npz archive"),
        (b"", "not an .npz archive"),
        (b"\x93NUMPY" + b"\x00" * 100, "not an .npz archive"),  # an .npy file under the .npz name
        (_npz_bytes(images=np.array([np.zeros(3), "x"], dtype=object), labels=np.zeros(2, np.int64)), "Python objects"),
    ],
    ids=["truncated", "cut-short", "text", "empty", "npy", "object-array"],
)
def test_corrupt_npz_is_one_line_naming_the_file(
    tmp_path: Path, content: bytes, match: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    np.savez(tmp_path / "test.npz", **GOOD)
    (tmp_path / "train.npz").write_bytes(content)
    args = ["--dataset", "fashion-mnist", "--data-dir", str(tmp_path), "--no-progress", "--out", str(tmp_path / "r")]
    line = _cli_error(monkeypatch, capsys, args)
    assert f"{tmp_path / 'train.npz'}: " in line and match in line
    assert (tmp_path / "train.npz").read_bytes() == content and not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--lr", "-1"), ("--lr", "0"), ("--lr", "nan"), ("--lr", "inf"), ("--momentum", "-1"), ("--momentum", "1"),
        ("--weight-decay", "-1"), ("--weight-decay", "nan"), ("--drop-rate", "1.5"), ("--drop-rate", "-0.1"),
        ("--width", "nan"), ("--width", "-1"), ("--width", "0.3"), ("--epochs", "0"), ("--batch-size", "0"),
        ("--grad-accum", "0"), ("--eval-every", "0"), ("--subset", "0"), ("--test-subset", "-3"), ("--reuse", "0"),
    ],
)  # fmt: skip
def test_bad_numbers_are_refused_before_any_work(
    tmp_path: Path, option: str, value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _no_data_load(monkeypatch)
    line = _cli_error(monkeypatch, capsys, [*TINY, option, value, "--out", str(tmp_path / "r")])
    assert option in line and value in line
    assert not (tmp_path / "r").exists()


def test_a_diverged_run_stops_with_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A learning rate of 1e30 turns the loss into NaN in the first epoch: an error line, not a 'finished' run."""
    run = tmp_path / "run"
    line = _cli_error(monkeypatch, capsys, [*TINY, "--epochs", "2", "--lr", "1e30", "--out", str(run)])
    assert "epoch 1/2: the training loss is nan: the run diverged" in line and "lower --lr" in line
    assert not (run / "last.pt").exists() and not (run / "final.json").exists()
    with pytest.raises(lc.RunDiverged):  # what benchmarks/reproduce.py records as a diverged grid point
        lc.main([*TINY, "--epochs", "1", "--lr", "1e30", "--out", str(tmp_path / "again")])


def test_sync_bn_keeps_the_reuse_structure() -> None:
    """--sync-bn converts every BatchNorm, per-use copies included, and leaves the shared convolutions shared
    (checked in eval mode: SyncBatchNorm only synchronises in training, which needs CUDA)."""
    model = LruNet(10, width_mult=0.25, reuse=3).eval()
    x = torch.randn(2, 3, 32, 32)  # (B, C, H, W)
    expected, shared = model(x), model.stage2.shared_names()
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model).eval()
    torch.testing.assert_close(synced(x), expected)
    assert synced.stage2.shared_names() == shared and synced.stage2.uses[2].dw is synced.stage2.uses[0].dw
    assert isinstance(synced.stage2.uses[2].dw_bn, torch.nn.SyncBatchNorm)


def test_sync_bn_on_cpu_processes_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lc, "setup_distributed", lambda kind: lc.Dist(rank=0, world=2, local_rank=0))
    with pytest.raises(reuse.ReuseError, match="--sync-bn needs CUDA"):
        lc.main([*TINY, "--sync-bn", "--device", "cpu", "--out", str(tmp_path / "r")])


# ---------------------------------------------------------------------------------------------- --recipe fast

FAST = [*TINY, "--recipe", "fast"]  # TINY gives --schedule onecycle: the tests below pass --schedule cosine


def test_fast_recipe_fills_only_what_was_not_given() -> None:
    cfg, given = lc.parse_config(["--recipe", "fast"])
    assert (cfg.epochs, cfg.schedule, cfg.lr, cfg.batch_size) == (30, "cosine", 0.2, 256)
    assert (cfg.label_smoothing, cfg.warmup_epochs, cfg.ema, cfg.nesterov, cfg.decay_norm_bias) == (
        0.1, 2.0, 0.999, True, False,
    )  # fmt: skip
    assert given == {"recipe"}
    mine, given = lc.parse_config(["--recipe", "fast", "--lr", "0.05", "--no-nesterov", "--ema", "0", "--epochs", "5"])
    assert (mine.lr, mine.nesterov, mine.ema, mine.epochs) == (0.05, False, 0.0, 5)
    assert mine.warmup_epochs == 1.0  # the recipe's warm-up is at most a fifth of the run
    assert lc.parse_config(["--recipe", "fast", "--schedule", "onecycle"])[0].warmup_epochs == 0.0
    assert lc.parse_config([])[0] == lc.Config()  # the paper's recipe: the dataclass's defaults, unchanged


def test_fast_recipe_resumes_exactly_with_its_ema(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--recipe fast (cosine with warm-up, label smoothing, EMA, Nesterov, no decay on BN/bias) stopped after
    epoch 1 and resumed: the model, its EMA, the momentum and the metrics equal those of a run that never
    stopped. The EMA is what is evaluated; best.pt holds EMA weights; config.json records every ingredient."""
    args = [*FAST, "--schedule", "cosine", "--epochs", "3"]
    final = lc.main([*args, "--out", str(tmp_path / "straight")])
    real_save = lc.save_checkpoint

    def save_then_die(obj: dict, path: Path) -> None:
        real_save(obj, path)
        if path.name == "last.pt" and obj["epoch"] == 1:
            raise _Killed

    monkeypatch.setattr(lc, "save_checkpoint", save_then_die)
    with pytest.raises(_Killed):
        lc.main([*args, "--out", str(tmp_path / "stopped")])
    monkeypatch.setattr(lc, "save_checkpoint", real_save)
    assert lc.main(["--out", str(tmp_path / "stopped"), "--resume", "--no-progress"])["last_acc"] == final["last_acc"]

    a, b = (torch.load(tmp_path / n / "last.pt") for n in ("straight", "stopped"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["ema"]["updates"] == b["ema"]["updates"] == 3 * (64 // 16)
    assert all(torch.equal(a["ema"]["weights"][k], b["ema"]["weights"][k]) for k in a["ema"]["weights"])
    assert any(not torch.equal(a["ema"]["weights"][k], a["model"][k]) for k in a["model"])
    assert len(a["optimizer"]["state"]) == len(b["optimizer"]["state"]) > 0
    for x, y in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert torch.equal(x["momentum_buffer"], y["momentum_buffer"])
    assert a["optimizer"]["param_groups"][0]["nesterov"] is True
    assert [g["weight_decay"] for g in a["optimizer"]["param_groups"]] == [5e-4, 0.0]

    run = tmp_path / "straight"
    config = json.loads((run / "config.json").read_text())
    assert {k: config[k] for k in ("recipe", "label_smoothing", "warmup_epochs", "ema", "nesterov")} == {
        "recipe": "fast", "label_smoothing": 0.1, "warmup_epochs": 0.6, "ema": 0.999, "nesterov": True,
    }  # fmt: skip
    assert config["decay_norm_bias"] is False and config["channels_last"] is True and config["bf16"] is True
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [h["test_acc_raw"] is None for h in history] == [True, True, False]  # the raw model: after the last
    assert final["last_acc_raw"] == history[-1]["test_acc_raw"] and final["ema"] == 0.999
    best = torch.load(run / "best.pt")
    assert best["ema"] is True and best["test_acc"] == final["best_acc"]
    if final["best_acc"] == final["last_acc"] and history[-1]["test_acc"] > max(h["test_acc"] for h in history[:-1]):
        assert all(torch.equal(best["model"][k], a["ema"]["weights"][k]) for k in best["model"])


def test_resume_refuses_to_change_an_ingredient(tmp_path: Path) -> None:
    run = tmp_path / "run"
    lc.main([*FAST, "--schedule", "cosine", "--epochs", "1", "--out", str(run)])
    with pytest.raises(reuse.ReuseError, match=r"--no-nesterov \(the run has --nesterov\)"):
        lc.main(["--out", str(run), "--resume", "--no-nesterov"])
    with pytest.raises(reuse.ReuseError, match=r"--label-smoothing 0.2 \(the run has 0.1\)"):
        lc.main(["--out", str(run), "--resume", "--label-smoothing", "0.2"])
    # --no-channels-last and --no-bf16 are runtime options: a resumed run may change them
    final = lc.main(["--out", str(run), "--resume", "--epochs", "2", "--no-channels-last", "--no-progress"])
    assert final["epochs"] == 2 and json.loads((run / "config.json").read_text())["channels_last"] is False


def test_ema_moves_every_weight_once_shared_ones_included() -> None:
    """One update after every parameter and float buffer moved by +1: the average moves by exactly (1 - d),
    the shared convolutions of a reused block too (averaging them once per use would move them twice)."""
    model = LruNet(10, width_mult=0.25, reuse=3, in_chans=1)
    ema = lc.WeightEMA(model, decay=0.9)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for t in [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]:
            t.add_(1.0)
    ema.update()
    d = min(0.9, 2 / 11)
    after = ema.module.state_dict()
    assert model.stage2.uses[2].dw is model.stage2.uses[0].dw  # one convolution, used three times
    assert ema.module.stage2.uses[2].dw is ema.module.stage2.uses[0].dw  # and so in the average
    for k, v in after.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, before[k] + (1 - d), msg=k)
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_no_weight_decay_on_batchnorm_and_biases() -> None:
    model = LruNet(10, width_mult=0.25, reuse=2, in_chans=1)
    decay, rest = lc.param_groups(model, lc.parse_config(["--recipe", "fast"])[0])
    norms = {id(p) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()}
    assert not norms & {id(p) for p in decay["params"]} and norms <= {id(p) for p in rest["params"]}
    assert id(model.classifier.bias) in {id(p) for p in rest["params"]}
    assert len(decay["params"]) + len(rest["params"]) == len(list(model.parameters()))
    assert (decay["weight_decay"], rest["weight_decay"]) == (5e-4, 0.0)
    (whole,) = lc.param_groups(model, lc.parse_config([])[0])  # the paper: everything decays
    assert len(whole["params"]) == len(list(model.parameters())) and whole["weight_decay"] == 5e-4


def test_warmup_ramps_the_cosine() -> None:
    cfg = lc.parse_config(["--schedule", "cosine", "--epochs", "4", "--warmup-epochs", "1", "--lr", "0.1"])[0]
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = lc.make_scheduler(opt, cfg, steps_per_epoch=4)
    lrs = []
    for _ in range(16):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    cosine = [0.1 * 0.5 * (1 + math.cos(math.pi * s / 16)) for s in range(16)]
    ramp = [min(1.0, (s + 1) / 4) for s in range(16)]
    assert lrs == pytest.approx([c * r for c, r in zip(cosine, ramp, strict=True)])
    with pytest.raises(reuse.ReuseError, match="does not go with --schedule onecycle"):
        lc.parse_config(["--schedule", "onecycle", "--warmup-epochs", "1"])
    with pytest.raises(reuse.ReuseError, match="must be fewer than --epochs 2"):
        lc.parse_config(["--epochs", "2", "--warmup-epochs", "2"])


@pytest.mark.parametrize(
    ("option", "value"),
    [("--label-smoothing", "1"), ("--label-smoothing", "-0.1"), ("--ema", "1"), ("--ema", "nan"),
     ("--warmup-epochs", "-1")],
)  # fmt: skip
def test_bad_ingredients_are_refused(
    tmp_path: Path, option: str, value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _no_data_load(monkeypatch)
    line = _cli_error(monkeypatch, capsys, [*FAST, option, value, "--out", str(tmp_path / "r")])
    assert option in line and value in line


def test_torchrun_with_one_process_runs_ddp(tmp_path: Path) -> None:
    """``torchrun --nproc_per_node=1`` joins a process group and trains through DDP (gloo here): the check the
    GPU script makes of the DDP start-up on one GPU."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", str(SCRIPT)]
    args = [*FAST, "--schedule", "cosine", "--epochs", "1", "--device", "cpu", "--out", str(tmp_path / "ddp")]
    proc = subprocess.run([*cmd, *args], env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = json.loads(proc.stdout.strip().splitlines()[-1])
    assert final["ddp"] is True and final["device"] == "cpu x 1"
    assert "epoch 1/1" in proc.stdout and "elapsed" in proc.stdout and "test loss" in proc.stdout


# ------------------------------------------------------------------------- functions other scripts use (reproduce)


def test_the_scripts_examples_run() -> None:
    """The ``>>>`` examples of the script's docstrings (to_float, augment, param_groups, WeightEMA, pick_device,
    time_training, run_cli)."""
    import doctest

    result = doctest.testmod(lc, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 7 and result.failed == 0


def test_pick_device_maps_the_option() -> None:
    assert lc.pick_device("cpu") == torch.device("cpu")
    assert lc.pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        assert lc.pick_device("cuda", 0) == torch.device("cuda", 0)
    else:
        with pytest.raises(reuse.ReuseError, match="--device cuda: torch sees no CUDA device"):
            lc.pick_device("cuda")


@pytest.mark.parametrize("recipe", ["paper", "fast"])
def test_time_training_times_a_step_and_an_evaluation_batch(recipe: str) -> None:
    """Seconds per training step and per evaluation batch, both positive and finite, with the recipe's own step
    (the fast recipe's EMA and one-cycle's schedule included); nothing is written."""
    argv = ["--dataset", "fashion-mnist", "--reuse", "2", "--width", "0.25", "--batch-size", "8", "--epochs", "1"]
    cfg = lc.resolve_defaults(lc.parse_config([*argv, "--schedule", "onecycle", "--recipe", recipe])[0])
    step_s, eval_s = lc.time_training(cfg, torch.device("cpu"), steps=2)
    assert 0 < step_s < math.inf and 0 < eval_s < math.inf
    assert lc.EVAL_BATCH == 512


@pytest.mark.parametrize(
    ("error", "code", "line"),
    [
        (reuse.ReuseError("--epochs must be\nat least 1"), 2, "demo.py: error: --epochs must be at least 1"),
        (FileNotFoundError(2, "No such file or directory", "x"), 1, "demo.py: error: FileNotFoundError: [Errno 2]"),
        (KeyboardInterrupt(), 130, "demo.py: interrupted; run it again"),
    ],
)
def test_run_cli_turns_errors_into_one_line(
    error: BaseException, code: int, line: str, capsys: pytest.CaptureFixture[str]
) -> None:
    def fails() -> None:
        raise error

    assert lc.run_cli("demo.py", lambda: None, "run it again") is None  # no error: it returns
    with pytest.raises(SystemExit) as stop:
        lc.run_cli("demo.py", fails, "run it again")
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == code and len(err) == 1 and err[0].startswith(line)


def test_cpu_bf16_runs_the_training_steps_in_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--cpu-bf16``: the model's forward passes on a CPU run under bf16 autocast (off: float32)."""
    seen: list[torch.dtype] = []
    real = lc.build_model

    def spy(cfg: lc.Config, in_chans: int) -> torch.nn.Module:
        model = real(cfg, in_chans)
        model.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
        return model

    monkeypatch.setattr(lc, "build_model", spy)
    for bf16, expected in ((True, torch.bfloat16), (False, torch.float32)):
        seen.clear()
        cfg = lc.resolve_defaults(
            lc.Config(dataset="fashion-mnist", reuse=1, width=0.25, batch_size=4, epochs=1, cpu_bf16=bf16)
        )
        lc.time_training(cfg, torch.device("cpu"), steps=1)
        assert seen and set(seen) == {expected}
    assert "bf16 autocast" in lc.recipe_text(lc.Config(cpu_bf16=True), cuda=False)
    assert "bf16 autocast" not in lc.recipe_text(lc.Config(), cuda=False)
