"""The runs of a ``benchmarks/reproduce.py`` grid: one at a time in this process through the training script's
``main()``, or ``--jobs K`` at a time, each a process of the script with its own log; a JSON line appended (under
the JSONL's lock) and the report drawn again as each run ends; a stopped run continued with ``--resume``. Also
``--status`` (where each run stands) and ``--dry-run`` (the grid and its estimated time, from the script's
``time_training``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _reproduce_grid import (
    ROOT,
    TRAINER,
    TRAINER_PATH,
    Point,
    ReuseError,
    append_jsonl,
    describe,
    duration,
    line_key,
    read_jsonl,
)
from _reproduce_report import write_report

# Train and test images of the full datasets, for the dry run's estimate when the data are not at hand.
DATASET_SIZES = {"cifar10": (50_000, 10_000), "cifar100": (50_000, 10_000), "fashion-mnist": (60_000, 10_000)}


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


def _run_argv(point: Point, args: argparse.Namespace) -> tuple[list[str], bool]:
    """The training script's command line for ``point``: its settings, then the options that do not change a run
    (its directory, data, device), and ``--resume`` when its run directory holds a last.pt (the script refuses it
    if the run there is another one); and whether it resumes."""
    out = args.runs_dir / point.run_name()
    argv = [*point.argv(), "--out", str(out), "--eval-every", str(args.eval_every), "--device", args.device]
    argv += [] if args.data_dir is None else ["--data-dir", str(args.data_dir)]
    argv += ["--compile"] if args.compile else []
    argv += [] if args.progress else ["--no-progress"]
    resumed = (out / "last.pt").is_file()
    return argv + (["--resume"] if resumed else []), resumed


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
    argv, resumed = _run_argv(point, args)
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
    argv, resumed = _run_argv(point, args)
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


def dry_run(points: list[Point], args: argparse.Namespace) -> dict[str, Any]:
    """Print the grid, one line per run, with its estimated time; write nothing."""
    train_n, test_n = dataset_sizes(args)
    done = {line_key(line) for line in read_jsonl(args.jsonl)}
    device = TRAINER.pick_device(args.device)
    timings: dict[tuple, tuple[float, float]] = {}  # seconds per training step and per evaluation batch
    for p in points:
        cfg_key = (p.dataset, p.reuse, p.width, p.share, p.shuffle, p.batch_size)
        if cfg_key not in timings:
            cfg = TRAINER.resolve_defaults(TRAINER.parse_config(p.argv())[0])
            timings[cfg_key] = TRAINER.time_training(cfg, device, args.timing_steps)
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
        seconds = steps * p.epochs * step_s + evals * math.ceil(test_n / TRAINER.EVAL_BATCH) * eval_s
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
        eval_total = math.ceil(test_n / TRAINER.EVAL_BATCH) * eval_s
        print(f"  {name:<24} {step_s:7.3f} s/step  {duration(epoch_s):>9}/epoch  {duration(eval_total):>7}/evaluation")
    print(f"estimated total: {duration(total)} ({total / 60:.0f} min) for the runs not yet done")
    if args.jobs > 1:
        longest = max((e["seconds"] for e in estimates if not e["skipped"]), default=0.0)
        print(
            f"with --jobs {args.jobs}: between {duration(max(longest, total / args.jobs))} (the runs overlap "
            f"perfectly) and {duration(total)} (they share one busy device): the timing above ran one model alone"
        )
    return {"estimates": estimates, "total_s": total}
