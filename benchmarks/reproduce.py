#!/usr/bin/env python
"""The evidence for layer reuse: a grid of ``examples/lrunet_cifar.py`` runs, then a table and two plots.

    nice -n 10 python benchmarks/reproduce.py --preset cpu --threads 2          # Fashion-MNIST on a CPU
    python benchmarks/reproduce.py --preset cpu --dry-run                        # the grid and its estimated time
    python benchmarks/reproduce.py --preset cpu --report-only                    # table and plots from the JSONL
    python benchmarks/reproduce.py --preset paper --device cuda --compile        # CIFAR-10, the paper's recipe
    python benchmarks/reproduce.py --preset fashion-gpu --device cuda --jobs 6   # 6 runs at once on one GPU
    python benchmarks/reproduce.py --preset fashion-gpu --status                 # where each run stands

The runs go one at a time, in this process, through the training script's ``main()``. As each finishes, its
result (what ``main()`` returns) and the grid's settings (seed, shuffle, share, N, width, dataset, schedule,
epochs, batch, torch threads, machine) are appended as one JSON line to ``<results-dir>/<grid>.jsonl``, and the
table (``<grid>.md``) and plots (``<grid>_acc_vs_n.png``, ``<grid>_acc_vs_params.png``) are drawn again.

With ``--jobs K`` the runs go K at a time, each in its own process of the training script (its log in
``<runs-dir>/<run>.log``); this process alone appends to the JSONL, under a lock, as each run ends.

A stopped grid resumes where it stopped: run the same command again. Points already in the JSONL (keyed by
their settings) are skipped; a point whose run directory holds a ``last.pt`` (the run was stopped midway)
continues from it with ``--resume``. A run whose loss turns NaN is recorded as diverged and the grid goes on.

Presets (the numbers are overridable, see ``--help``):

- ``cpu``: Fashion-MNIST (``../shared/data/fashion_mnist`` beside the repository), one-cycle schedule:
  (a) ``1x``: 1-LruNet-1x, one run of ``--epochs-1x`` epochs; (b) ``reuse``: N-LruNet-0.5x for N in
  ``--reuse-values`` (1, 4, 8), ``--seeds`` (0, 1), ``--epochs`` epochs each; (c) ``no-shuffle``: N = 4 without
  the channel shuffle; (d) ``no-share``: N = 4 with new layers for every use (``--ablation-seeds``, default
  ``--seeds``).
- ``fashion-gpu``: all of Fashion-MNIST, N-LruNet-1x for N = 1, 4, 10, seeds 0 and 1, ``--recipe fast`` (30
  epochs, cosine with warm-up, lr 0.2, batch 256, label smoothing, weight EMA), for one GPU with ``--jobs 6``.
- ``paper``: CIFAR-10 with the paper's recipe (300 epochs, the paper's schedule, batch 256), 5 seeds, for a GPU:
  ``reuse``: N-LruNet-1x for N = 1, 2, 4, ..., 16 (the paper's Table 2); ``no-shuffle`` and ``no-share`` at N = 8
  (``no-share`` at N = 8 is the paper's 902k network of Table 4).

``--dry-run`` prints the grid, one line per run, and its estimated time: it times a few training steps of each
distinct model at the grid's batch size on random images (and an evaluation batch), and multiplies by steps per
epoch and epochs. It writes nothing.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.util
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
TRAINER_PATH = ROOT / "examples" / "lrunet_cifar.py"
FASHION_MNIST = ROOT.parent / "shared" / "data" / "fashion_mnist"
# Train and test images of the full datasets, for the dry run's estimate when the data are not at hand.
DATASET_SIZES = {"cifar10": (50_000, 10_000), "cifar100": (50_000, 10_000), "fashion-mnist": (60_000, 10_000)}
GROUPS = ("1x", "reuse", "no-shuffle", "no-share")  # the order of the table and of the runs within a seed
EVAL_BATCH = 512  # the training script's evaluation batch


def _load_trainer() -> ModuleType:
    """``examples/lrunet_cifar.py`` as a module (it is a script, not part of the package)."""
    name = "reproduce_lrunet_cifar"
    spec = importlib.util.spec_from_file_location(name, TRAINER_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


TRAINER = _load_trainer()
ReuseError = TRAINER.ReuseError
FAST = TRAINER.RECIPES["fast"]


# ----------------------------------------------------------------------------------------------------- the grid


@dataclass(frozen=True)
class Point:
    """One run of the grid: the settings that make it (its key), and the group of the table it belongs to."""

    group: str  # 1x | reuse | no-shuffle | no-share
    dataset: str
    reuse: int  # N
    width: float
    share: bool
    shuffle: bool
    seed: int
    schedule: str
    epochs: int
    batch_size: int
    lr: float
    subset: int | None = None  # train on the first K images of the script's fixed shuffle
    test_subset: int | None = None
    recipe: str = "paper"  # the script's --recipe (fast: label smoothing, warm-up, EMA, ...; see the script)

    def settings(self) -> dict[str, Any]:
        """Everything but the group: what makes two runs the same run."""
        return {k: v for k, v in asdict(self).items() if k != "group"}

    def key(self) -> str:
        return json.dumps(self.settings(), sort_keys=True)

    def model(self) -> str:
        """The training script's name of the model, e.g. ``4-LruNet-0.5x-noshare``."""
        cfg = TRAINER.Config(reuse=self.reuse, width=self.width, share=self.share, shuffle=self.shuffle)
        return TRAINER.model_name(cfg)

    def run_name(self) -> str:
        """The run directory's name: readable, and a hash of every setting so that no two points share one."""
        digest = hashlib.sha1(self.key().encode()).hexdigest()[:8]
        return f"{self.dataset}-{self.model()}-s{self.seed}-e{self.epochs}-{digest}"

    def argv(self) -> list[str]:
        """The training script's command line for this point (without --out and the runtime options)."""
        args = [
            "--dataset", self.dataset, "--reuse", str(self.reuse), "--width", f"{self.width:g}",
            "--seed", str(self.seed), "--schedule", self.schedule, "--epochs", str(self.epochs),
            "--batch-size", str(self.batch_size), "--lr", f"{self.lr:g}",
        ]  # fmt: skip
        args += [] if self.share else ["--no-share"]
        args += [] if self.shuffle else ["--no-shuffle"]
        args += [] if self.subset is None else ["--subset", str(self.subset)]
        args += [] if self.test_subset is None else ["--test-subset", str(self.test_subset)]
        args += ["--recipe", self.recipe]
        return args


@dataclass(frozen=True)
class Preset:
    """The defaults of a preset; every one can be overridden on the command line."""

    dataset: str
    data_dir: Path | None  # None: torchvision's copy in ./data, downloaded when missing
    epochs: int  # of every group but 1x
    epochs_1x: int | None  # of the 1x group; None: no such group
    seeds: tuple[int, ...]
    batch_size: int
    schedule: str
    lr: float
    width: float  # of the reuse and ablation groups
    reuse_values: tuple[int, ...]  # N of the reuse group
    ablation_reuse: int  # N of the no-shuffle and no-share groups
    eval_every: int
    recipe: str = "paper"  # the script's --recipe
    only: tuple[str, ...] | None = None  # the groups it runs; None: all


PRESETS = {
    # E2 = 15 is the grid's floor; on all 60,000 images the grid then takes about 5.5 h on one thread of the
    # development machine (its --dry-run); --subset 20000 --epochs-1x 20 brings it to about 2 h (docs/training.md).
    "cpu": Preset(
        dataset="fashion-mnist", data_dir=FASHION_MNIST, epochs=15, epochs_1x=10, seeds=(0, 1), batch_size=128,
        schedule="onecycle", lr=0.1, width=0.5, reuse_values=(1, 4, 8), ablation_reuse=4, eval_every=5,
    ),
    "paper": Preset(
        dataset="cifar10", data_dir=None, epochs=300, epochs_1x=None, seeds=(0, 1, 2, 3, 4), batch_size=256,
        schedule="paper", lr=0.1, width=1.0, reuse_values=(1, 2, 4, 6, 8, 10, 12, 14, 16), ablation_reuse=8,
        eval_every=1,
    ),
    # Issue #19: the fast recipe on all of Fashion-MNIST (60,000 / 10,000), 1x, N = 1, 4, 10 (Table 6's), two
    # seeds, for one GPU with several runs in parallel (--jobs). Schedule and lr are the recipe's.
    "fashion-gpu": Preset(
        dataset="fashion-mnist", data_dir=FASHION_MNIST, epochs=30, epochs_1x=None, seeds=(0, 1), batch_size=256,
        schedule=FAST["schedule"], lr=FAST["lr"], width=1.0, reuse_values=(1, 4, 10), ablation_reuse=4,
        eval_every=1, recipe="fast", only=("reuse",),
    ),
}  # fmt: skip


def build_grid(args: argparse.Namespace) -> list[Point]:
    """The grid's points in the order they run: every group for the first seed, then for the next, so that a
    stopped grid already holds one whole picture."""
    common = dict(dataset=args.dataset, schedule=args.schedule, batch_size=args.batch_size, lr=args.lr)
    common |= dict(subset=args.subset, test_subset=args.test_subset, recipe=args.recipe)
    points = []
    for i, seed in enumerate(args.seeds):
        if args.epochs_1x is not None and i == 0:
            one = dict(reuse=1, width=1.0, share=True, shuffle=True, seed=seed, epochs=args.epochs_1x)
            points.append(Point("1x", **one, **common))
        points += [
            Point("reuse", reuse=n, width=args.width, share=True, shuffle=True, seed=seed, epochs=args.epochs, **common)
            for n in args.reuse_values
        ]
        if seed in args.ablation_seeds:
            n, w, e = args.ablation_reuse, args.width, args.epochs
            points.append(
                Point("no-shuffle", reuse=n, width=w, share=True, shuffle=False, seed=seed, epochs=e, **common)
            )
            points.append(Point("no-share", reuse=n, width=w, share=False, shuffle=True, seed=seed, epochs=e, **common))
    points = [p for p in points if args.only is None or p.group in args.only]
    unique = {p.key(): p for p in reversed(points)}  # a point in two groups runs once, in its first place
    return [p for p in points if unique[p.key()] is p]


# ------------------------------------------------------------------------------------------------------ results


SETTINGS = tuple(f for f in Point.__dataclass_fields__ if f != "group")  # the keys of a line's `settings`


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The result lines of ``path`` (none when it does not exist); a line that is not one of ours stops with its
    number."""
    if not path.exists():
        return []
    lines = []
    for i, text in enumerate(path.read_text().splitlines(), 1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
        except json.JSONDecodeError as err:
            raise ReuseError(f"{path}:{i}: not a JSON line ({err}); fix or delete that line") from None
        if isinstance(line, dict) and isinstance(line.get("settings"), dict):  # lines older than --recipe
            line["settings"] = {"recipe": "paper", **line["settings"]}
        if not isinstance(line, dict) or sorted(line.get("settings") or {}) != sorted(SETTINGS):
            raise ReuseError(
                f"{path}:{i}: not a result line of reproduce.py (its `settings` must have exactly "
                f"{', '.join(SETTINGS)}); fix or delete that line"
            )
        lines.append(line)
    return lines


def line_key(line: dict[str, Any]) -> str:
    return json.dumps(line["settings"], sort_keys=True)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<path>.lock`` (``fcntl.flock``; where there is no fcntl, no lock)."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def append_jsonl(path: Path, line: dict[str, Any]) -> None:
    """Add ``line`` to ``path``; the file is written whole to a temporary and renamed, so a kill at any moment
    leaves the old lines or the old lines and the new one, and under a lock, so that processes appending at once
    (two grids sharing a JSONL) lose no line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        old = path.read_text() if path.exists() else ""
        if old and not old.endswith("\n"):
            old += "\n"
        TRAINER.write_text(path, old + json.dumps(line) + "\n")


def machine_name(device: str) -> str:
    """The processor, its cores, the system and torch, and the GPU when the runs use one."""
    cpu = platform.processor() or platform.machine()
    try:
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith("model name"):
                cpu = text.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = ""
    if device != "cpu" and torch.cuda.is_available():
        gpu = f", {torch.cuda.get_device_name(0)}"
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}, torch {torch.__version__}{gpu}"


def _load_avg() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


# ----------------------------------------------------------------------------------------------------- the runs


def _runtime_argv(args: argparse.Namespace, out: Path) -> list[str]:
    """Options that do not change a run (its directory, data, device), passed to every run."""
    argv = ["--out", str(out), "--eval-every", str(args.eval_every), "--device", args.device]
    argv += [] if args.data_dir is None else ["--data-dir", str(args.data_dir)]
    argv += ["--compile"] if args.compile else []
    argv += [] if args.progress else ["--no-progress"]
    return argv


def _result_line(
    point: Point,
    args: argparse.Namespace,
    result: dict[str, Any] | None,
    error: str | None,
    resumed: bool,
    load: list[float | None],
    threads: int,
) -> dict[str, Any]:
    """The JSON line of a finished (or diverged) run; ``config`` is the run's config.json, every option it ran
    with, the recipe's included."""
    config_path = args.runs_dir / point.run_name() / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else None
    return {
        "grid": args.grid,
        "group": point.group,
        "settings": point.settings(),
        "threads": threads,
        "machine": machine_name(args.device),
        "device_option": args.device,
        "resumed": resumed,
        "load_avg": load,
        "finished": datetime.datetime.now().isoformat(timespec="seconds"),
        "result": result,
        "error": error,
        "config": config,
    }


def run_point(point: Point, args: argparse.Namespace) -> dict[str, Any]:
    """Train one point in this process (continuing its run directory when it holds a last.pt); return its JSON
    line."""
    out = args.runs_dir / point.run_name()
    argv = point.argv() + _runtime_argv(args, out)
    resumed = (out / "last.pt").is_file()
    if resumed:  # the same flags with --resume: the script refuses them if the run there is another one
        argv.append("--resume")
    load_start = _load_avg()
    result, error = None, None
    try:
        result = TRAINER.main(argv)
    except TRAINER.RunDiverged as err:
        error = str(err)
    return _result_line(point, args, result, error, resumed, [load_start, _load_avg()], torch.get_num_threads())


def run_grid(points: list[Point], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run every point not yet in the JSONL, appending each line as it finishes and redrawing the report; with
    ``--jobs K`` in K processes at once."""
    done = {line_key(line) for line in read_jsonl(args.jsonl)}
    todo = [p for p in points if p.key() not in done]
    print(f"reproduce.py: grid {args.grid}: {len(points)} runs, {len(points) - len(todo)} already in {args.jsonl}")
    if args.jobs > 1:
        run_parallel(todo, args)
        return read_jsonl(args.jsonl)
    for i, point in enumerate(todo, 1):
        print(f"reproduce.py: run {i}/{len(todo)}: {describe(point)}", flush=True)
        line = run_point(point, args)
        append_jsonl(args.jsonl, line)
        write_report(read_jsonl(args.jsonl), args)
    return read_jsonl(args.jsonl)


@dataclass
class _Job:
    """A run in a child process."""

    point: Point
    proc: subprocess.Popen
    log: Path
    resumed: bool
    load_start: float | None
    t0: float


def _cost(point: Point) -> float:
    """A rough relative cost of a run, to start the longest first: epochs x images x uses x width^2."""
    return point.epochs * (point.subset or 1e9) * point.reuse * point.width**2 * (1 if point.share else 1.2)


def _child_env(args: argparse.Namespace) -> dict[str, str]:
    """The environment of a run's process: this checkout first on the path, unbuffered output, --threads."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}
    if args.threads is not None:
        env["OMP_NUM_THREADS"] = str(args.threads)
    env.pop("RANK", None)  # a grid started under torchrun: its runs are plain single-process runs
    return env


def _start(point: Point, args: argparse.Namespace) -> _Job:
    out = args.runs_dir / point.run_name()
    argv = point.argv() + _runtime_argv(args, out)
    resumed = (out / "last.pt").is_file()
    argv += ["--resume"] if resumed else []
    log = args.runs_dir / f"{point.run_name()}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:  # a resumed run appends; the child keeps its own copy of the descriptor
        f.write(f"# reproduce.py {datetime.datetime.now().isoformat(timespec='seconds')}: {' '.join(argv)}\n")
        f.flush()
        proc = subprocess.Popen(
            [sys.executable, str(TRAINER_PATH), *argv], stdout=f, stderr=subprocess.STDOUT, env=_child_env(args)
        )
    return _Job(point, proc, log, resumed, _load_avg(), time.perf_counter())


def _last_line(path: Path) -> str:
    lines = path.read_text(errors="replace").strip().splitlines() if path.is_file() else []
    return lines[-1] if lines else ""


def _finish(job: _Job, args: argparse.Namespace) -> str | None:
    """Record a finished child: its line in the JSONL (a diverged run too); return a failure message, or None."""
    rc, point = job.proc.returncode, job.point
    last = _last_line(job.log)
    result, error = None, None
    if rc == 0:
        result = json.loads((args.runs_dir / point.run_name() / "final.json").read_text())
    elif "the run diverged" in last:  # the script's one-line error for a NaN loss: recorded, as in-process
        error = last.removeprefix("lrunet_cifar.py: error: ")
    else:
        return f"{describe(point)}: exit status {rc}: {last[-300:]} (log: {job.log})"
    threads = args.threads if args.threads is not None else torch.get_num_threads()
    line = _result_line(point, args, result, error, job.resumed, [job.load_start, _load_avg()], threads)
    append_jsonl(args.jsonl, line)
    write_report(read_jsonl(args.jsonl), args)
    return None


def run_parallel(todo: list[Point], args: argparse.Namespace) -> None:
    """Run ``todo`` as ``--jobs`` child processes of the training script at once (the longest first), each
    writing its log to ``<runs-dir>/<run>.log``; this process alone writes the JSONL, a line as each run ends. A
    run that fails otherwise than by diverging is reported and left out of the JSONL (a rerun tries it again);
    the grid goes on and stops with the list of failures. SIGTERM or Ctrl-C stops the children too."""
    queue = sorted(todo, key=_cost, reverse=True)
    running: list[_Job] = []
    failures: list[str] = []

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    t0 = time.perf_counter()
    try:
        while queue or running:
            while queue and len(running) < args.jobs:
                job = _start(queue.pop(0), args)
                running.append(job)
                note = " (resuming its run directory)" if job.resumed else ""
                print(f"reproduce.py: started {describe(job.point)}{note}; log {job.log}", flush=True)
            time.sleep(args.poll)
            for job in [j for j in running if j.proc.poll() is not None]:
                running.remove(job)
                failure = _finish(job, args)
                took, into = duration(time.perf_counter() - job.t0), duration(time.perf_counter() - t0)
                print(
                    f"reproduce.py: {'FAILED' if failure else 'finished'} after {took} ({into} "
                    f"into the grid, {len(running)} running, {len(queue)} waiting): {failure or describe(job.point)}",
                    flush=True,
                )
                failures += [failure] if failure else []
    finally:
        signal.signal(signal.SIGTERM, previous)
        for job in running:  # stopped early: the children go too (their run directories keep the last epoch)
            job.proc.terminate()
        for job in running:
            try:
                job.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                job.proc.kill()
    if failures:
        raise ReuseError(f"{len(failures)} run(s) failed: " + "; ".join(failures))


def status(points: list[Point], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Print where each run of the grid stands: in the JSONL (its last accuracy), stopped or running (its last
    epoch, from its run directory's metrics.jsonl), or not started; return the same as dicts."""
    lines = {line_key(line): line for line in read_jsonl(args.jsonl)}
    print(f"grid {args.grid}: {len(points)} runs; results {args.jsonl}; run directories {args.runs_dir}")
    rows = []
    for p in points:
        row: dict[str, Any] = {"point": describe(p), "settings": p.settings()}
        metrics = args.runs_dir / p.run_name() / "metrics.jsonl"
        history = [json.loads(t) for t in metrics.read_text().splitlines() if t.strip()] if metrics.is_file() else []
        tested = [h for h in history if h.get("test_acc") is not None]
        if p.key() in lines:
            result = lines[p.key()]["result"]
            row["state"] = "done" if result else "diverged"
            row["last_acc"] = result["last_acc"] if result else None
            row["last_acc_raw"] = result.get("last_acc_raw") if result else None
            row["train_time_s"] = result["train_time_s"] if result else None
        else:
            row["state"] = "partial" if history else "not started"
        row["epochs_done"] = history[-1]["epoch"] if history else 0
        row["epoch_acc"] = tested[-1]["test_acc"] if tested else None
        row["time_s"] = history[-1]["time_s"] if history else None
        text = f"{row['state']}: {row['epochs_done']}/{p.epochs} epochs"
        if row["epoch_acc"] is not None:
            text += f", test acc {100 * row['epoch_acc']:.2f}% at epoch {tested[-1]['epoch']}"
        if row.get("last_acc_raw") is not None and row["last_acc_raw"] != row.get("last_acc"):
            text += f" (without EMA {100 * row['last_acc_raw']:.2f}%)"
        if row["time_s"] is not None:
            text += f", {duration(row['time_s'])} training ({row['time_s'] / max(row['epochs_done'], 1):.1f} s/epoch)"
        print(f"  {describe(p)}  {text}")
        rows.append(row)
    return rows


def duration(seconds: float) -> str:
    """``42 s``, ``12.5 min`` or ``3.2 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def describe(point: Point) -> str:
    subset = "" if point.subset is None else f"  subset {point.subset}"
    group = f"[{point.group}]"
    return (
        f"{group:<12} {point.model():<24} seed {point.seed}  {point.schedule}  {point.epochs} epochs  "
        f"batch {point.batch_size}  lr {point.lr:g}{subset}"
        + ("" if point.recipe == "paper" else f"  recipe {point.recipe}")
    )


# ------------------------------------------------------------------------------------------------------ dry run


def dataset_sizes(args: argparse.Namespace) -> tuple[int, int]:
    """Train and test images a run sees: the npz files' when ``--data-dir`` holds them, else the full dataset's;
    ``--subset`` / ``--test-subset`` cut them."""
    train, test = DATASET_SIZES[args.dataset]
    if args.data_dir is not None and (args.data_dir / "train.npz").is_file():
        sizes = []
        for split in ("train", "test"):
            with np.load(args.data_dir / f"{split}.npz", allow_pickle=False) as npz:
                sizes.append(len(npz["labels"]))
        train, test = sizes
    return min(train, args.subset or train), min(test, args.test_subset or test)


def time_model(point: Point, args: argparse.Namespace, steps: int) -> tuple[float, float]:
    """Seconds per training step (augmentation, forward, backward, SGD) at the point's batch size, and per
    evaluation batch of 512, on random images, after one warm-up step."""
    cfg = TRAINER.resolve_defaults(TRAINER.parse_config(point.argv())[0])
    info = TRAINER.DATASETS[cfg.dataset]
    device = TRAINER._pick_device(args.device, 0)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    torch.manual_seed(0)
    model = TRAINER.build_model(cfg, info.channels).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    shape = (max(cfg.batch_size, EVAL_BATCH), info.size, info.size, info.channels)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, device=device)  # (B, H, W, C)
    labels = torch.randint(0, info.num_classes, (cfg.batch_size,), device=device)  # (B,)
    gen = torch.Generator().manual_seed(0)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def train_step() -> None:
        aug = TRAINER.draw_aug_params(cfg.batch_size, gen).to(device)
        xb = TRAINER.augment(images[: cfg.batch_size], aug).contiguous(
            memory_format=torch.channels_last
        )  # (B, C, H, W)
        with ctx:
            loss = F.cross_entropy(model(xb).float(), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    train_step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step()
    sync()
    step_s = (time.perf_counter() - t0) / steps
    model.eval()
    with torch.no_grad(), ctx:
        model(TRAINER.to_float(images[:EVAL_BATCH]))  # warm-up
        sync()
        t0 = time.perf_counter()
        model(TRAINER.to_float(images[:EVAL_BATCH]))  # (512, classes)
        sync()
    return step_s, time.perf_counter() - t0


def dry_run(points: list[Point], args: argparse.Namespace) -> dict[str, Any]:
    """Print the grid, one line per run, with its estimated time; write nothing."""
    train_n, test_n = dataset_sizes(args)
    done = {line_key(line) for line in read_jsonl(args.jsonl)}
    timings: dict[tuple, tuple[float, float]] = {}
    for p in points:
        cfg_key = (p.dataset, p.reuse, p.width, p.share, p.shuffle, p.batch_size)
        if cfg_key not in timings:
            timings[cfg_key] = time_model(p, args, args.timing_steps)
    threads = torch.get_num_threads()
    print(
        f"grid {args.grid}: {len(points)} runs on {args.dataset} ({train_n} train, {test_n} test images), "
        f"device {args.device}, {threads} threads; results to {args.jsonl}"
    )
    total, estimates = 0.0, []
    for i, p in enumerate(points, 1):
        step_s, eval_s = timings[(p.dataset, p.reuse, p.width, p.share, p.shuffle, p.batch_size)]
        steps = math.ceil(train_n / p.batch_size)
        evals = p.epochs // args.eval_every + (p.epochs % args.eval_every > 0)
        seconds = steps * p.epochs * step_s + evals * math.ceil(test_n / EVAL_BATCH) * eval_s
        skipped = p.key() in done
        resumes = not skipped and (args.runs_dir / p.run_name() / "last.pt").is_file()
        note = " (in the JSONL: skipped)" if skipped else " (resumes its run directory)" if resumes else ""
        print(f"{i:3d}  {describe(p)}  est. {duration(seconds):>9}{note}")
        total += 0.0 if skipped else seconds
        estimates.append({"point": describe(p), "seconds": seconds, "skipped": skipped})
    print(f"timing: {args.timing_steps} training steps after a warm-up, per model, at batch {args.batch_size}:")
    for (dataset, n, w, share, shuffle, batch), (step_s, eval_s) in timings.items():
        name = Point("", dataset, n, w, share, shuffle, 0, args.schedule, 1, batch, args.lr).model()
        epoch_s = math.ceil(train_n / batch) * step_s
        eval_total = math.ceil(test_n / EVAL_BATCH) * eval_s
        print(f"  {name:<24} {step_s:7.3f} s/step  {duration(epoch_s):>9}/epoch  {duration(eval_total):>7}/evaluation")
    print(f"estimated total: {duration(total)} ({total / 60:.0f} min) for the runs not yet done")
    if args.jobs > 1:
        longest = max((e["seconds"] for e in estimates if not e["skipped"]), default=0.0)
        print(
            f"with --jobs {args.jobs}: between {duration(max(longest, total / args.jobs))} (the runs overlap "
            f"perfectly) and {duration(total)} (they share one busy device): the timing above ran one model alone"
        )
    return {"estimates": estimates, "total_s": total}


# ------------------------------------------------------------------------------------------------------- report


@dataclass
class Row:
    """The runs of one configuration over its seeds."""

    group: str
    model: str
    dataset: str
    reuse: int
    width: float
    share: bool
    shuffle: bool
    schedule: str
    epochs: int
    batch_size: int
    recipe: str = "paper"
    params: int | None = None
    mflops: float | None = None
    train_images: int | None = None  # images per epoch (all of the training set, or --subset of them)
    seeds: list[int] = field(default_factory=list)
    accs: list[float] = field(default_factory=list)  # last test accuracy of each finished run, in [0, 1]
    times: list[float] = field(default_factory=list)  # training seconds of each run
    diverged: list[int] = field(default_factory=list)  # seeds whose run diverged
    machines: list[str] = field(default_factory=list)

    @property
    def variant(self) -> str:
        return "no share" if not self.share else ("no shuffle" if not self.shuffle else "shared, shuffle")

    def stats(self) -> tuple[float, float | None, float, float] | None:
        """Mean, sample standard deviation (None for one run), min and max of the accuracies, in percent."""
        if not self.accs:
            return None
        pct = [100 * a for a in self.accs]
        return statistics.fmean(pct), statistics.stdev(pct) if len(pct) > 1 else None, min(pct), max(pct)


def summarize(lines: list[dict[str, Any]]) -> list[Row]:
    """One row per configuration (every setting but the seed), in the order of GROUPS, width and N."""
    rows: dict[str, Row] = {}
    for line in lines:
        s = line["settings"]
        key = json.dumps({k: v for k, v in s.items() if k != "seed"}, sort_keys=True)
        if key not in rows:
            point = Point(group=line.get("group", ""), **s)
            rows[key] = Row(
                group=point.group, model=point.model(), dataset=point.dataset, reuse=point.reuse,
                width=point.width, share=point.share, shuffle=point.shuffle, schedule=point.schedule,
                epochs=point.epochs, batch_size=point.batch_size, recipe=point.recipe,
            )  # fmt: skip
        row = rows[key]
        threads = line.get("threads", "?")
        row.machines.append(f"{line.get('machine', '?')} ({threads} thread{'' if threads == 1 else 's'})")
        result = line.get("result")
        if result is None:
            row.diverged.append(s["seed"])
            continue
        row.seeds.append(s["seed"])
        row.accs.append(result["last_acc"])
        row.times.append(result["train_time_s"])
        row.params, row.mflops = result["params"], result["mflops"]
        row.train_images = result.get("train_images")
    order = {g: i for i, g in enumerate(GROUPS)}
    return sorted(rows.values(), key=lambda r: (order.get(r.group, len(order)), r.width, r.reuse, r.epochs))


def table(rows: list[Row]) -> str:
    """The markdown table: mean ± sample std over seeds (min / max beside), params, MFLOPs, epochs, time."""
    machines = sorted({m for r in rows for m in r.machines})
    tag = {m: f"m{i}" for i, m in enumerate(machines, 1)}
    head = (
        "| model | variant | N | width | params | MFLOPs | epochs | train images | seeds | test acc. % (mean ± std) "
        "| min / max | train time per run | machine |"
    )
    out = [head, "|" + "---|" * 13]
    for r in rows:
        st = r.stats()
        acc = "—" if st is None else f"{st[0]:.2f} ± {'—' if st[1] is None else f'{st[1]:.2f}'}"
        spread = "—" if st is None else f"{st[2]:.2f} / {st[3]:.2f}"
        if r.diverged:
            acc += f" ({len(r.diverged)} diverged)"
        params = "—" if r.params is None else f"{r.params:,}"
        mflops = "—" if r.mflops is None else f"{r.mflops:.2f}"
        minutes = "—" if not r.times else duration(statistics.fmean(r.times))
        where = ", ".join(sorted({tag[m] for m in r.machines}))
        out.append(
            f"| {r.model} | {r.variant} | {r.reuse} | {r.width:g}x | {params} | {mflops} | {r.epochs} | "
            f"{'—' if r.train_images is None else f'{r.train_images:,}'} | "
            f"{len(r.seeds) + len(r.diverged)} | {acc} | {spread} | {minutes} | {where} |"
        )
    legend = [f"- {tag[m]}: {m}" for m in machines]
    return "\n".join(out) + "\n\nMachines:\n\n" + "\n".join(legend) + "\n"


def report_text(rows: list[Row], args: argparse.Namespace) -> str:
    datasets = ", ".join(sorted({r.dataset for r in rows}))
    schedules = ", ".join(sorted({f"recipe {r.recipe}, {r.schedule}, batch {r.batch_size}" for r in rows}))
    return (
        f"# Grid `{args.grid}`: {datasets}\n\n"
        f"Written by `benchmarks/reproduce.py` from `{args.jsonl.name}` ({schedules}). Test accuracy is the last "
        f"epoch's, in percent: mean ± sample standard deviation over the seeds, and the lowest / highest run. "
        f"Params count each shared weight once; MFLOPs are `torch.utils.flop_counter` on one image (2 per "
        f"multiply-add); train time excludes evaluation.\n\n" + table(rows)
    )


def plot(rows: list[Row], by: str, path: Path, title: str) -> None:
    """Accuracy (mean, min-max bars over seeds) against N (``by="n"``) or parameters (``by="params"``): shared,
    no-shuffle and no-share runs each with their own marker and colour (shared runs of another width in green);
    the ablations are nudged sideways so that their bars do not hide the shared run's at the same N. Without
    matplotlib (a bare GPU machine) there is no plot; the table is written all the same."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return

    style = {  # colour, marker, sideways nudge
        "shared, shuffle": ("tab:blue", "o", 0.0),
        "no shuffle": ("tab:orange", "s", -1.0),
        "no share": ("tab:red", "^", 1.0),
    }
    widths = [r.width for r in rows]
    main_width = max(set(widths), key=widths.count) if widths else 1.0
    series: dict[tuple, list[Row]] = {}
    for r in rows:
        if r.stats() is not None:
            series.setdefault((r.variant, r.width, r.epochs, r.dataset), []).append(r)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (variant, width, epochs, _), members in series.items():
        members.sort(key=lambda r: r.reuse if by == "n" else (r.params or 0))
        colour, marker, nudge = style[variant]
        colour = colour if width == main_width or variant != "shared, shuffle" else "tab:green"
        xs = [r.reuse + 0.12 * nudge if by == "n" else r.params * (1 + 0.02 * nudge) for r in members]
        st = [r.stats() for r in members]
        err = [[m - lo for m, _, lo, _ in st], [hi - m for m, _, _, hi in st]]
        line = "-" if len(xs) > 1 else "none"
        label = f"{variant}, {width:g}x, {epochs} epochs"
        ax.errorbar(xs, [m for m, *_ in st], yerr=err, color=colour, marker=marker, ls=line, capsize=3, label=label)
        if by == "params":  # which N each point is
            for x, r, (m, *_) in zip(xs, members, st, strict=True):
                ax.annotate(f"N={r.reuse}", (x, m), textcoords="offset points", xytext=(6, -10), fontsize=7)
    if by == "params":
        ax.set_xscale("log")
    ax.set(xlabel="N (uses of each LRU block)" if by == "n" else "parameters", ylabel="test accuracy (%)", title=title)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    fig.tight_layout()
    TRAINER.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def write_report(lines: list[dict[str, Any]], args: argparse.Namespace) -> list[Row]:
    """Table and plots of ``lines``, to ``<results-dir>/<grid>.md`` and ``<grid>_acc_vs_{n,params}.png``."""
    rows = summarize(lines)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    TRAINER.write_text(args.results_dir / f"{args.grid}.md", report_text(rows, args))
    title = f"{args.grid}: test accuracy, mean and min-max over seeds"
    plot(rows, "n", args.results_dir / f"{args.grid}_acc_vs_n.png", title)
    plot(rows, "params", args.results_dir / f"{args.grid}_acc_vs_params.png", title)
    if args.docs is not None:
        update_docs(args.docs, args.grid, table(rows))
    return rows


def update_docs(path: Path, grid: str, text: str) -> None:
    """Put ``text`` between the lines ``<!-- grid:NAME -->`` and ``<!-- /grid:NAME -->`` of a markdown page."""
    start, end = f"<!-- grid:{grid} -->", f"<!-- /grid:{grid} -->"
    page = path.read_text()
    if start not in page or end not in page:
        raise ReuseError(f"--docs {path}: it has no {start} ... {end} block to put the table in; add those two lines")
    before, rest = page.split(start, 1)
    _, after = rest.split(end, 1)
    TRAINER.write_text(path, f"{before}{start}\n{text.rstrip()}\n{end}{after}")


# ------------------------------------------------------------------------------------------------ command line


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None
    return values


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="reproduce.py", description="Run the layer-reuse grid, then write its table and plots."
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        required=True,
        help="cpu (Fashion-MNIST, 0.5x), paper (CIFAR-10) or fashion-gpu (Fashion-MNIST, 1x, --recipe fast)",
    )
    p.add_argument("--grid", help="name of the grid's files (default: the preset's name)")
    p.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks" / "results", help="JSONL, table, plots")
    p.add_argument("--runs-dir", type=Path, help="run directories (default: runs/reproduce/<grid>)")
    p.add_argument("--data-dir", type=Path, help="train.npz/test.npz folder (default: the preset's)")
    p.add_argument("--epochs", type=int, help="epochs of every group but 1x (cpu: E2, default 15; paper: 300)")
    p.add_argument("--epochs-1x", type=int, help="epochs of the 1-LruNet-1x run (cpu: E1, default 10)")
    p.add_argument("--seeds", type=_ints, help="seeds, e.g. 0,1 (cpu: 0,1; paper: 0,1,2,3,4)")
    p.add_argument("--ablation-seeds", type=_ints, help="seeds of no-shuffle and no-share (default: --seeds)")
    p.add_argument("--batch-size", type=int, help="cpu: 128; paper: 256")
    p.add_argument("--schedule", choices=("paper", "cosine", "onecycle"), help="cpu: onecycle; paper: paper")
    p.add_argument("--lr", type=float, help="initial or peak learning rate (cpu, paper: 0.1; fashion-gpu: 0.2)")
    p.add_argument(
        "--recipe", choices=sorted(TRAINER.RECIPES), help="the script's --recipe (cpu, paper: paper; fashion-gpu: fast)"
    )
    p.add_argument("--width", type=float, help="width of the reuse and ablation groups (cpu: 0.5; paper: 1)")
    p.add_argument("--reuse-values", type=_ints, help="N of the reuse group (cpu: 1,4,8; paper: 1,2,4,...,16)")
    p.add_argument("--ablation-reuse", type=int, help="N of no-shuffle and no-share (cpu: 4; paper: 8)")
    p.add_argument(
        "--only",
        type=lambda s: tuple(s.split(",")),
        help=f"run only these groups, of {', '.join(GROUPS)} (fashion-gpu: reuse)",
    )
    p.add_argument("--subset", type=int, help="train on K images (passed to the script)")
    p.add_argument("--test-subset", type=int, help="evaluate on K images (passed to the script)")
    p.add_argument("--eval-every", type=int, help="evaluate every K epochs and after the last (cpu: 5; paper: 1)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="passed to the script")
    p.add_argument("--compile", action="store_true", help="passed to the script (torch.compile)")
    p.add_argument("--progress", action="store_true", help="the script's progress bars (default: off)")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs at once, each in its own process (e.g. several on one GPU); default 1: one at a time, in this "
        "process",
    )
    p.add_argument("--poll", type=float, default=2.0, help=argparse.SUPPRESS)  # seconds between looks at --jobs runs
    p.add_argument("--dry-run", action="store_true", help="print the grid and its estimated time, then exit")
    p.add_argument(
        "--status", action="store_true", help="print where each run stands (done, epochs reached, accuracy), then exit"
    )
    p.add_argument("--report-only", action="store_true", help="table and plots from the JSONL; no training")
    p.add_argument(
        "--docs",
        type=Path,
        default=None,
        help="also put the table in this markdown page, between <!-- grid:NAME --> and <!-- /grid:NAME -->",
    )
    p.add_argument("--timing-steps", type=int, default=3, help="training steps timed per model in --dry-run")
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The options, the preset's defaults filled in, checked before any work."""
    args = _parser().parse_args(argv)
    preset = PRESETS[args.preset]
    for name in ("dataset", "data_dir", "epochs", "epochs_1x", "seeds", "batch_size", "schedule", "lr", "width"):
        if getattr(args, name, None) is None:
            setattr(args, name, getattr(preset, name))
    for name in ("recipe", "only"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(preset, name))
    for name in ("reuse_values", "ablation_reuse", "eval_every"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(preset, name))
    args.ablation_seeds = args.seeds if args.ablation_seeds is None else args.ablation_seeds
    args.grid = args.grid or args.preset
    args.runs_dir = args.runs_dir or ROOT / "runs" / "reproduce" / args.grid
    args.jsonl = args.results_dir / f"{args.grid}.jsonl"
    counts = ("epochs", "epochs_1x", "batch_size", "ablation_reuse", "eval_every", "subset", "test_subset", "threads")
    for name in (*counts, "timing_steps", "jobs"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ReuseError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if not args.seeds or not args.reuse_values or min(args.reuse_values) < 1:
        raise ReuseError("--seeds and --reuse-values need at least one value each, and every N must be at least 1")
    if not (math.isfinite(args.lr) and args.lr > 0) or not (math.isfinite(args.width) and args.width > 0):
        raise ReuseError(f"--lr and --width must be finite and > 0, got {args.lr} and {args.width}")
    if not set(args.ablation_seeds) <= set(args.seeds):
        raise ReuseError(f"--ablation-seeds {args.ablation_seeds} must be some of --seeds {args.seeds}")
    unknown = set(args.only or ()) - set(GROUPS)
    if unknown:
        raise ReuseError(f"--only: no group {', '.join(sorted(unknown))}; the groups are {', '.join(GROUPS)}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run (or with ``--dry-run`` estimate, or with ``--report-only`` report) the grid; return what it did."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.report_only:
        lines = read_jsonl(args.jsonl)
        if not lines:
            raise ReuseError(f"--report-only: {args.jsonl} holds no results yet; run the grid first")
        rows = write_report(lines, args)
        print(f"reproduce.py: {len(lines)} runs -> {args.results_dir / (args.grid + '.md')}")
        return {"lines": lines, "rows": rows}
    points = build_grid(args)
    if not points:
        raise ReuseError("the grid is empty: check --only and the seeds")
    if args.dry_run:
        return dry_run(points, args)
    if args.status:
        return {"status": status(points, args)}
    if args.data_dir is not None and not args.data_dir.is_dir():
        raise ReuseError(f"--data-dir {args.data_dir}: no such folder (it needs train.npz and test.npz)")
    TRAINER.check_writable(args.results_dir)
    lines = run_grid(points, args)
    rows = write_report(lines, args) if lines else []
    print(f"reproduce.py: done, {len(lines)} runs in {args.jsonl}; table {args.results_dir / (args.grid + '.md')}")
    return {"lines": lines, "rows": rows}


def cli() -> None:
    """One line on stderr and a non-zero exit for what the user can fix, never a traceback."""
    try:
        main()
    except ReuseError as err:
        print(f"reproduce.py: error: {' '.join(str(err).splitlines())}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("reproduce.py: interrupted; run the same command again to continue the grid", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    cli()
