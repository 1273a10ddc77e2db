#!/usr/bin/env python
"""Convert a trained CNN into reused blocks and keep its accuracy without retraining; compared with pruning.

One file, read top to bottom. On a trained teacher (``examples/convert_finetune.py``'s ResNet-32 on Fashion-MNIST,
or a MobileNetV2-style network on the CIFAR-10 copy), with 2,000 unlabeled training images and no gradient step:

1. What each step buys, at delta rank 0 (plain reuse) and 4: ``convert(init="mean")`` as before; then
   ``reuse.calibrate`` (each use's BatchNorm re-estimated); then weight-matched channels; then shared weights and
   deltas fitted in closed form on the data, after activation-matched channels, and after weight-matched ones (the
   default of ``convert(data=...)``), statistics re-estimated.
2. Budgets: ``convert(data=..., budget=b)`` for b in ``--budgets`` (which runs to tie, at which rank, measured),
   and Torch-Pruning (``pip install torch-pruning``; L2 magnitude of coupled channel groups, a uniform ratio found
   by bisection to the same parameter count or fewer) on the same teacher; both re-estimate their BatchNorms on
   the same images, then both are distilled from the teacher for ``--epochs`` epoch(s) with the same recipe.

    python examples/convert_trained.py --arch resnet --out runs/convert-trained             # ~15 min, 2 CPU cores
    python examples/convert_trained.py --arch mobilenet --out runs/convert-trained-mbv2     # CIFAR-10 copy
    python examples/convert_trained.py --train-images 2000 --teacher-epochs 1 --budgets 0.5 --no-pruning  # smoke

It writes ``results.json``, ``results.md`` and ``accuracy_vs_params.png`` to ``--out``; ``main(argv)`` returns
the rows.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the teacher and its training: convert_finetune.py
import convert_finetune as cf  # noqa: E402

import reuse  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DATASETS = {"fashion-mnist": SHARED / "fashion_mnist", "cifar10": SHARED / "cifar10_jpeg_q75_lossy"}

# ------------------------------------------------------------------------------------------------ a second teacher


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expansion, 3x3 depthwise, 1x1 projection, each with BatchNorm; a shortcut where
    the shape stays."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = c_in * expand
        self.expand = nn.Conv2d(c_in, hidden, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.dw = nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.project = nn.Conv2d(hidden, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu6(self.bn1(self.expand(x)))  # (B, hidden, H, W)
        y = F.relu6(self.bn2(self.dw(y)))  # (B, hidden, H/s, W/s)
        y = self.bn3(self.project(y))  # (B, C_out, H/s, W/s)
        return x + y if self.residual else y


def mobilenet(width: int = 16, blocks: int = 4, expand: int = 4, classes: int = 10, in_chans: int = 3) -> nn.Sequential:
    """A MobileNetV2-style network for small images: stem, 3 stages of ``blocks`` inverted residuals (widths w, 2w,
    4w; each stage's first block changes the shape, the others are runs for convert), pool, linear."""
    layers: list[nn.Module] = [nn.Conv2d(in_chans, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU6()]
    c = width
    for stage in range(3):
        out = width * 2**stage
        stage_blocks = [InvertedResidual(c, out, 1 if stage == 0 else 2, expand)]
        stage_blocks += [InvertedResidual(out, out, 1, expand) for _ in range(blocks - 1)]
        layers.append(nn.Sequential(*stage_blocks))
        c = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes)]
    return nn.Sequential(*layers)


# ------------------------------------------------------------------------------------------------ the peer


def prune_to(teacher: nn.Module, target: int, example: Tensor) -> nn.Module:
    """Torch-Pruning's magnitude pruner (L2 norm of each group of coupled channels, one ratio for every layer),
    the ratio bisected so that the pruned network has at most ``target`` parameters, as close as it gets."""
    import torch_pruning as tp

    best, lo, hi = None, 0.0, 0.99
    for _ in range(14):
        ratio = (lo + hi) / 2
        model = copy.deepcopy(teacher).eval()
        head = [m for m in model.modules() if isinstance(m, nn.Linear)]
        pruner = tp.pruner.MagnitudePruner(
            model, example, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=ratio, ignored_layers=head
        )
        pruner.step()
        if cf.count(model) <= target:
            best, hi = model, ratio
        else:
            lo = ratio
    if best is None:
        raise SystemExit(f"convert_trained.py: error: pruning cannot reach {target:,} parameters")
    return best


# ------------------------------------------------------------------------------------------------ the story


@dataclass
class Row:
    table: str  # "steps" or "budget"
    method: str
    rank: str
    budget: str
    params: int
    acc_converted: float  # right after conversion (or pruning), no data used for statistics
    acc_calibrated: float | None  # after re-estimating the running statistics on the calibration images
    acc_distilled: float | None  # after --epochs of distillation
    convert_s: float  # time of the conversion (or pruning) and calibration
    distill_s: float | None
    choices: str = ""  # the budget's choices, per run


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="convert_trained.py", description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=("resnet", "mobilenet"), default="resnet")
    p.add_argument("--dataset", choices=sorted(DATASETS), help="default: fashion-mnist (resnet), cifar10 (mobilenet)")
    p.add_argument("--data-dir", type=Path, help="folder with train.npz and test.npz (default: ../shared/data/...)")
    p.add_argument("--out", type=Path, default=Path("runs/convert-trained"), help="run directory (teacher cached)")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--blocks", type=int, default=5, help="blocks per stage (resnet: 5 is ResNet-32)")
    p.add_argument("--train-images", type=int, default=20000)
    p.add_argument("--teacher-epochs", type=int, default=10)
    p.add_argument("--calibration-images", type=int, default=2000, help="unlabeled training images (default: 2000)")
    p.add_argument("--ranks", default="0,4", help="delta ranks of the steps table, or 'none' (default: %(default)s)")
    p.add_argument(
        "--steps",
        choices=("all", "short"),
        default="all",
        help="short: only the mean as before, with calibration, and the default with data",
    )
    p.add_argument("--budgets", default="0.5,0.35,0.25", help="fractions of the teacher's parameters, or 'none'")
    p.add_argument(
        "--budget-init",
        choices=("fit", "refit", "auto"),
        default="fit",
        help="convert's init for the budgets' conversions (default: %(default)s, convert's default with data)",
    )
    p.add_argument(
        "--refit",
        action="store_true",
        help="after calibration, both budgets' students go through reuse.refit (their layers that kept their "
        "size, the head among them, fitted to the teacher's outputs on the calibration images)",
    )
    p.add_argument("--epochs", type=int, default=1, help="distillation epochs after conversion (default: 1)")
    p.add_argument("--no-pruning", dest="pruning", action="store_false", help="leave Torch-Pruning out")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument(
        "--distil-batch-size",
        type=int,
        help="the distillation's batch size (default: --batch-size); smaller: more steps in the epoch",
    )
    p.add_argument("--lr", type=float, default=0.1, help="teacher's peak lr (distillation: a tenth)")
    p.add_argument(
        "--device",
        default="cpu",
        help="where everything runs: training, conversion, calibration, distillation, evaluation, e.g. cuda "
        "(default: %(default)s)",
    )
    p.add_argument("--teacher", type=Path, help="a teacher file to load instead of the run directory's cache")
    p.add_argument("--teacher-only", action="store_true", help="stop once the teacher is trained and cached")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.distil_batch_size is not None and args.distil_batch_size < 1:
        parser.error(f"argument --distil-batch-size: must be 1 or more, got {args.distil_batch_size}")
    args.dataset = args.dataset or ("fashion-mnist" if args.arch == "resnet" else "cifar10")
    folder = args.data_dir or DATASETS[args.dataset]
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    data = cf.load_data(folder, args.train_images, args.seed)
    chans, size = data.train_x.shape[1], data.train_x.shape[-1]
    example = torch.zeros(1, chans, size, size, device=args.device)
    print(f"data: {len(data.train_y)} train, {len(data.test_y)} test images from {folder}", flush=True)

    teacher, teacher_acc = _teacher(args, data, chans)
    teacher.to(args.device)
    if args.teacher_only:
        return []
    total = cf.count(teacher)
    g = torch.Generator().manual_seed(args.seed + 7)
    calib = cf.to_float(data.train_x[torch.randperm(len(data.train_y), generator=g)[: args.calibration_images]])
    rows: list[Row] = []

    def acc(model: nn.Module) -> float:
        return cf.evaluate(model, data.test_x, data.test_y)

    # 1. What each step buys.
    ranks = [] if args.ranks == "none" else [float(r) if "." in r else int(r) for r in args.ranks.split(",")]
    short = ("mean (as before)", "mean + calibrate", "weight-aligned fit + calibrate (the default with data)")
    for rank in ranks:
        steps = [
            ("mean (as before)", dict(init="mean", shuffle=False), False),
            ("mean + calibrate", dict(init="mean", shuffle=False), True),
            ("weight-aligned mean + calibrate", dict(init="mean", shuffle=False, align="weights"), True),
            ("activation-aligned fit + calibrate", dict(data=calib, align="activations"), True),
            ("weight-aligned fit + calibrate (the default with data)", dict(data=calib), True),
            (
                "weight-aligned fit, refitted on the converted inputs, then the layers outside the runs "
                "(init='refit') + calibrate",
                dict(data=calib, init="refit"),
                True,
            ),
            ("weight-aligned mean or fit per run (init='auto') + calibrate", dict(data=calib, init="auto"), True),
        ]
        for name, options, calibrated in [s for s in steps if args.steps == "all" or s[0] in short]:
            t0 = time.perf_counter()
            student = reuse.fx.convert(
                teacher, delta_rank=rank, example_inputs=example, **{**options, "calibrate": False}
            )
            converted = acc(student)
            if calibrated:
                student = reuse.calibrate(student, calib)
            seconds = time.perf_counter() - t0
            row = Row("steps", name, str(rank), "-", cf.count(student), converted, acc(student) if calibrated else None,
                      None, seconds, None)  # fmt: skip
            rows.append(row)
            _say(row)

    # 2. Budgets: reuse and pruning at the same parameters, then distilled alike.
    for budget in [] if args.budgets == "none" else [float(b) for b in args.budgets.split(",")]:
        t0 = time.perf_counter()
        student, rep = reuse.fx.convert(
            teacher,
            data=calib,
            budget=budget,
            init=args.budget_init,
            example_inputs=example,
            calibrate=False,
            report=True,
        )  # the blocks' own statistics: "converted"; calibrated next (what calibrate=True does)
        converted = acc(student)
        student = reuse.calibrate(student, calib)
        method = "reuse" if args.budget_init == "fit" else f"reuse (init={args.budget_init!r})"
        if args.refit:  # every layer outside the tied runs, fitted to the teacher's outputs
            student, method = reuse.refit(student, teacher, calib), method + " + reuse.refit"
        seconds = time.perf_counter() - t0
        choices = "; ".join(_choice(r) for r in rep.runs)
        row = Row("budget", method, "-", str(budget), cf.count(student), converted, acc(student), None, seconds,
                  None, choices)  # fmt: skip
        row.acc_distilled, row.distill_s = _distil(student, teacher, data, args)
        rows.append(row)
        _say(row)
        if args.pruning:
            t0 = time.perf_counter()
            pruned = prune_to(teacher, cf.count(student), example)
            converted = acc(pruned)
            pruned = reuse.calibrate(pruned, calib)
            method = "torch-pruning"
            if args.refit:  # the layers that kept their size (the head), fitted to the teacher's outputs
                pruned, method = reuse.refit(pruned, teacher, calib), "torch-pruning + reuse.refit"
            seconds = time.perf_counter() - t0
            row = Row("budget", method, "-", str(budget), cf.count(pruned), converted, acc(pruned), None,
                      seconds, None)  # fmt: skip
            row.acc_distilled, row.distill_s = _distil(pruned, teacher, data, args)
            rows.append(row)
            _say(row)

    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    if torch.device(args.device).type == "cuda":
        machine += f", {torch.cuda.get_device_name(args.device)}, torch {torch.__version__}"
    head = dict(args={k: str(v) for k, v in vars(args).items()}, machine=machine, teacher_params=total,
                teacher_acc=teacher_acc)  # fmt: skip
    table = [asdict(r) for r in rows]
    (args.out / "results.json").write_text(json.dumps({**head, "rows": table}, indent=2) + "\n")
    text = markdown(rows, total, teacher_acc, machine, args, len(data.test_y))
    (args.out / "results.md").write_text(text)
    plot(rows, total, teacher_acc, args.out / "accuracy_vs_params.png", args)
    print(text)
    return table


def _teacher(args: argparse.Namespace, data: cf.Data, chans: int) -> tuple[nn.Module, float]:
    torch.manual_seed(args.seed)
    if args.arch == "resnet":
        teacher = cf.resnet(args.width, args.blocks, in_chans=chans)
    else:
        teacher = mobilenet(args.width, args.blocks, in_chans=chans)
    cache = args.out / (
        f"teacher-{args.arch}-w{args.width}-b{args.blocks}-{args.dataset}-n{len(data.train_y)}-e{args.teacher_epochs}.pt"
    )
    if args.arch == "resnet" and args.dataset == "fashion-mnist":  # convert_finetune.py's cache, if it ran
        legacy = args.out / f"teacher-w{args.width}-b{args.blocks}-n{len(data.train_y)}-e{args.teacher_epochs}.pt"
        cache = legacy if legacy.is_file() and not cache.is_file() else cache
    cache = args.teacher or cache
    if args.teacher is not None and not cache.is_file():
        raise SystemExit(f"convert_trained.py: error: --teacher {cache}: no such file")
    if cache.is_file():
        teacher.load_state_dict(torch.load(cache, map_location="cpu", weights_only=True)["model"])
        print(f"teacher: loaded {cache}", flush=True)
    else:
        seconds = cf.train(teacher.to(args.device), data, args.teacher_epochs, args.lr, args.batch_size, args.seed)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        torch.save({"model": {k: v.cpu() for k, v in teacher.state_dict().items()}, "time_s": seconds}, tmp)
        os.replace(tmp, cache)
    teacher.eval()
    acc = cf.evaluate(teacher, data.test_x, data.test_y)
    print(f"teacher: {cf.count(teacher):,} params, {100 * acc:.2f}%", flush=True)
    return teacher, acc


def _choice(run: reuse.fx.Run) -> str:
    """``layer2.1: rank 4 (cost 0.012)``: what the budget chose for a run, and its measured cost."""
    cost = f" (cost {run.cost:.3f})" if run.cost is not None else ""
    return f"{run.path}: {'as is' if run.skipped else f'rank {run.rank}'}{cost}"


def _distil(student: nn.Module, teacher: nn.Module, data: cf.Data, args: argparse.Namespace):
    if args.epochs <= 0:
        return None, None
    torch.manual_seed(args.seed)
    batch = args.distil_batch_size or args.batch_size
    seconds = cf.train(student, data, args.epochs, args.lr / 10, batch, args.seed, teacher=teacher)
    return cf.evaluate(student, data.test_x, data.test_y), seconds


def _say(r: Row) -> None:
    cal = "-" if r.acc_calibrated is None else f"{100 * r.acc_calibrated:.2f}%"
    dis = "-" if r.acc_distilled is None else f"{100 * r.acc_distilled:.2f}%"
    print(f"{r.table} {r.method} rank={r.rank} budget={r.budget}: {r.params:,} params, converted "
          f"{100 * r.acc_converted:.2f}%, calibrated {cal}, distilled {dis} ({r.convert_s:.0f} s) {r.choices}",
          flush=True)  # fmt: skip


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}%"


def markdown(
    rows: list[Row], total: int, teacher_acc: float, machine: str, args: argparse.Namespace, tests: int
) -> str:
    name = f"ResNet-{6 * args.blocks + 2}" if args.arch == "resnet" else f"MobileNetV2-style ({args.blocks} per stage)"
    out = (
        f"{args.dataset}, teacher {name} of width {args.width}: {total:,} params, {100 * teacher_acc:.2f}% on "
        f"{tests:,} test images; {args.calibration_images} unlabeled calibration images; machine: {machine}\n\n"
        "No gradient step (each step adds to the one above):\n\n"
        "| rank | method | params | acc. converted | acc. calibrated | time |\n|---|---|---|---|---|---|\n"
    )
    for r in rows:
        if r.table == "steps":
            out += f"| {r.rank} | {r.method} | {r.params:,} | {_pct(r.acc_converted)} | {_pct(r.acc_calibrated)} | "
            out += f"{r.convert_s:.1f} s |\n"
    out += (
        f"\nBudgets, then {args.epochs} epoch(s) of distillation from the teacher (the same recipe for both: "
        f"batch {args.distil_batch_size or args.batch_size}, peak lr {args.lr / 10:g}):\n\n"
        "| budget | method | params | acc. converted | acc. calibrated | acc. distilled | convert time | "
        "distil time | choices |\n|---|---|---|---|---|---|---|---|---|\n"
    )
    for r in rows:
        if r.table == "budget":
            dist = "—" if r.distill_s is None else f"{r.distill_s:.0f} s"
            out += f"| {r.budget} | {r.method} | {r.params:,} ({r.params / total:.2f}) | {_pct(r.acc_converted)} | "
            out += (
                f"{_pct(r.acc_calibrated)} | {_pct(r.acc_distilled)} | {r.convert_s:.0f} s | {dist} | {r.choices} |\n"
            )
    return out


def plot(rows: list[Row], total: int, teacher_acc: float, path: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for method, style in (("reuse", "o-"), ("torch-pruning", "s--")):
        pts = sorted((r.params, r) for r in rows if r.table == "budget" and r.method == method)
        if not pts:
            continue
        xs = [p for p, _ in pts]
        ax.plot(xs, [100 * (r.acc_distilled or 0) for _, r in pts], style, label=f"{method}, distilled")
        ax.plot(xs, [100 * (r.acc_calibrated or 0) for _, r in pts], style, alpha=0.4, label=f"{method}, no training")
    ax.axhline(100 * teacher_acc, color="k", lw=0.8, ls=":", label=f"teacher ({total:,} params)")
    ax.set_xlabel("parameters")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Converted vs pruned at equal parameters ({args.arch}, {args.dataset})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
