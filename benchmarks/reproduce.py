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
distinct model at the grid's batch size on random images (and an evaluation batch), through the training script's
``time_training``, and multiplies by steps per epoch and epochs. It writes nothing.

This file is the command line (presets, options, ``main()``); the rest is in three modules beside it:
``_reproduce_grid.py`` (the points of the grid and the JSONL), ``_reproduce_runs.py`` (running them, ``--jobs``,
``--status``, ``--dry-run``) and ``_reproduce_report.py`` (table, plots, ``--docs``). All of them use only the
training script's public functions.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its modules, also when loaded by path (the tests)

from _reproduce_grid import (  # noqa: E402
    GROUPS,
    ROOT,
    TRAINER,
    Point,
    ReuseError,
    append_jsonl,
    build_grid,
    read_jsonl,
)
from _reproduce_report import write_report  # noqa: E402
from _reproduce_runs import dry_run, run_grid, status  # noqa: E402

__all__ = [
    "PRESETS", "TRAINER", "Point", "Preset", "ReuseError", "append_jsonl", "build_grid", "cli", "main", "parse_args",
    "read_jsonl",
]  # fmt: skip

FASHION_MNIST = ROOT.parent / "shared" / "data" / "fashion_mnist"
FAST = TRAINER.RECIPES["fast"]


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
    for name in Preset.__dataclass_fields__:  # "dataset" is no option: always the preset's
        if getattr(args, name, None) is None:
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
    TRAINER.run_cli("reproduce.py", main, "run the same command again to continue the grid")


if __name__ == "__main__":
    cli()
