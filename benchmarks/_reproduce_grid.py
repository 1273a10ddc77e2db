"""The grid of ``benchmarks/reproduce.py``: its points (the settings of one run of ``examples/lrunet_cifar.py``),
the order they run in, and the JSONL that holds one line per finished run (read, and appended to under a lock).

The training script is imported as a module, ``TRAINER``; everything of it used here is its public API.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TRAINER_PATH = ROOT / "examples" / "lrunet_cifar.py"
sys.path.insert(0, str(TRAINER_PATH.parent))

import lrunet_cifar as TRAINER  # noqa: E402  (a script, not part of the package: imported from examples/)

ReuseError = TRAINER.ReuseError
GROUPS = ("1x", "reuse", "no-shuffle", "no-share")  # the order of the table and of the runs within a seed


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
