#!/usr/bin/env python
"""Relaxed reuse of a trained CNN: convert, then distil, and see what accuracy each size keeps.

One file, read top to bottom. The story, on the real Fashion-MNIST (lossless, ``../shared/data/fashion_mnist``):

1. A teacher: a CIFAR-style ResNet (3 stages of ``--blocks`` basic blocks, widths w, 2w, 4w), trained here once
   and cached in the run directory (``teacher.pt``).
2. ``reuse.fx.convert(teacher, shuffle=False, init="mean", delta_rank=r)`` at rank 0 (plain reuse: each stage's
   4 blocks after the downsampling one become one block used 4 times), at small ranks, and at full rank (which
   is the teacher exactly). Each is evaluated right after conversion, then after a short distillation from the
   teacher (KL divergence on the teacher's softened logits plus cross-entropy).
3. The same small architecture as rank 0, trained from scratch for as many epochs, for comparison.

    python examples/convert_finetune.py --out runs/convert-finetune            # ~20-40 min on a 2-core CPU
    python examples/convert_finetune.py --out runs/cf --train-images 2000 --teacher-epochs 1 --epochs 1  # smoke

It writes ``results.json``, ``results.md`` (the table) and ``accuracy_vs_params.png`` to the run directory;
``main(argv)`` returns the table's rows.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    import reuse
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import reuse

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion_mnist"

# ------------------------------------------------------------------------------------------------ the teacher


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 convs with BatchNorm, a shortcut (a 1x1 conv where the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))  # (B, C, H, W)
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))  # (B, C, H, W)


def resnet(width: int, blocks: int, classes: int = 10, in_chans: int = 1) -> nn.Sequential:
    """A CIFAR-style ResNet (6 * blocks + 2 layers): stem, 3 stages of ``blocks`` blocks, pool, linear. Each
    stage's first block downsamples (but the first stage's); the others keep the shape: runs for convert."""
    layers: list[nn.Module] = [nn.Conv2d(in_chans, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    c = width
    for stage in range(3):
        out = width * 2**stage
        stage_blocks = [BasicBlock(c, out, stride=1 if stage == 0 else 2)]
        stage_blocks += [BasicBlock(out, out) for _ in range(blocks - 1)]
        layers.append(nn.Sequential(*stage_blocks))
        c = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes)]
    return nn.Sequential(*layers)


# ------------------------------------------------------------------------------------------------ data


@dataclass
class Data:
    train_x: Tensor  # (N, C, H, W) uint8
    train_y: Tensor  # (N,)
    test_x: Tensor
    test_y: Tensor


def load_data(folder: Path, train_images: int | None, seed: int = 0) -> Data:
    """Images from ``train.npz``/``test.npz`` (Fashion-MNIST, or the CIFAR-10 copy); ``train_images``: a fixed,
    class-balanced subset."""
    arrays = {}
    for split in ("train", "test"):
        path = folder / f"{split}.npz"
        if not path.is_file():
            raise SystemExit(f"convert_finetune.py: error: no {path}; pass --data-dir with train.npz and test.npz")
        with np.load(path, allow_pickle=False) as f:
            images = torch.from_numpy(f["images"])  # (N, H, W) grey or (N, H, W, 3) colour, uint8
            images = images.unsqueeze(1) if images.dim() == 3 else images.permute(0, 3, 1, 2).contiguous()
            arrays[split] = (images, torch.from_numpy(f["labels"]))
    x, y = arrays["train"]
    if train_images is not None and train_images < len(y):
        g = torch.Generator().manual_seed(seed)
        per_class = train_images // 10
        picks = [
            torch.nonzero(y == c).flatten()[torch.randperm(int((y == c).sum()), generator=g)[:per_class]]
            for c in range(10)
        ]
        keep = torch.cat(picks)[torch.randperm(per_class * 10, generator=g)]
        x, y = x[keep], y[keep]
    return Data(x, y, *arrays["test"])


def to_float(x: Tensor) -> Tensor:
    return x.float().div_(255.0)  # (B, C, H, W) in [0, 1]


def augment(x: Tensor, g: torch.Generator) -> Tensor:
    """Random crop with 2 pixels of padding and a horizontal flip, on a uint8 batch."""
    b, _, h, w = x.shape
    padded = F.pad(x, (2, 2, 2, 2))  # (B, C, H + 4, W + 4)
    i, j = torch.randint(0, 5, (2,), generator=g).tolist()
    x = padded[:, :, i : i + h, j : j + w]
    flip = torch.rand(b, generator=g) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


# ------------------------------------------------------------------------------------------------ training


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch: int = 1000) -> float:
    model.eval()
    dev = next(model.parameters()).device  # the batches go where the model is
    correct = sum(
        int((model(to_float(x[i : i + batch].to(dev))).argmax(1).cpu() == y[i : i + batch]).sum())
        for i in range(0, len(y), batch)
    )
    return correct / len(y)


def train(
    model: nn.Module,
    data: Data,
    epochs: int,
    lr: float,
    batch: int,
    seed: int,
    teacher: nn.Module | None = None,
    temperature: float = 4.0,
    alpha: float = 0.9,
) -> float:
    """SGD with momentum, one-cycle schedule. With ``teacher``: distillation, ``alpha * T^2 * KL(teacher_T ||
    student_T) + (1 - alpha) * CE``. Returns the training time in seconds."""
    g = torch.Generator().manual_seed(seed)
    dev = next(model.parameters()).device
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = epochs * math.ceil(len(data.train_y) / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.25)
    if teacher is not None:
        teacher.eval()
    t0 = time.perf_counter()
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(data.train_y), generator=g)
        for i in range(0, len(order), batch):
            idx = order[i : i + batch]
            x, y = to_float(augment(data.train_x[idx], g)), data.train_y[idx]  # (B, 1, 28, 28), (B,)
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)  # where the model is
            logits = model(x)  # (B, 10)
            loss = F.cross_entropy(logits, y)
            if teacher is not None:
                with torch.no_grad():
                    soft = F.log_softmax(teacher(x) / temperature, 1)  # (B, 10)
                kl = F.kl_div(F.log_softmax(logits / temperature, 1), soft, log_target=True, reduction="batchmean")
                loss = alpha * temperature**2 * kl + (1 - alpha) * loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return time.perf_counter() - t0


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # shared weights once


# ------------------------------------------------------------------------------------------------ the story


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="convert_finetune.py", description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=DATA, help="folder with train.npz and test.npz")
    p.add_argument("--out", type=Path, default=Path("runs/convert-finetune"), help="run directory")
    p.add_argument("--width", type=int, default=16, help="teacher widths w, 2w, 4w (default: %(default)s)")
    p.add_argument("--blocks", type=int, default=5, help="blocks per stage (default: %(default)s, ResNet-32)")
    p.add_argument(
        "--train-images", type=int, default=20000, help="class-balanced training subset (default: %(default)s)"
    )
    p.add_argument("--teacher-epochs", type=int, default=10, help="default: %(default)s")
    p.add_argument("--epochs", type=int, default=3, help="distillation and from-scratch epochs (default: %(default)s)")
    p.add_argument(
        "--ranks", default="0,1,4,1.0", help="delta ranks; an int or a fraction of full rank (default: %(default)s)"
    )
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1, help="teacher and from-scratch peak lr (distillation: a tenth)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    return p


def _ranks(text: str) -> list[int | float]:
    out: list[int | float] = []
    for item in text.split(","):
        value = float(item) if "." in item else int(item)
        out.append(value)
    return out


@dataclass
class Row:
    model: str  # what was measured
    rank: str  # delta rank ("-" for the teacher and the from-scratch net)
    params: int
    params_deltas: int
    acc_converted: float | None  # test accuracy right after conversion, before any training
    acc: float  # test accuracy after distillation (or training)
    epochs: int
    time_s: float  # training time of this row (distillation, or the teacher's or from-scratch training)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = _parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    data = load_data(args.data_dir, args.train_images, args.seed)
    print(f"data: {len(data.train_y)} train, {len(data.test_y)} test images from {args.data_dir}", flush=True)
    rows: list[Row] = []

    # 1. The teacher, trained once and cached.
    torch.manual_seed(args.seed)
    teacher = resnet(args.width, args.blocks)
    cache = args.out / f"teacher-w{args.width}-b{args.blocks}-n{len(data.train_y)}-e{args.teacher_epochs}.pt"
    if cache.is_file():
        saved = torch.load(cache, map_location="cpu", weights_only=True)
        teacher.load_state_dict(saved["model"])
        teacher_time = saved["time_s"]
        print(f"teacher: loaded {cache}", flush=True)
    else:
        teacher_time = train(teacher, data, args.teacher_epochs, args.lr, args.batch_size, args.seed)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        torch.save({"model": teacher.state_dict(), "time_s": teacher_time}, tmp)
        os.replace(tmp, cache)
    teacher_acc = evaluate(teacher, data.test_x, data.test_y)
    rows.append(Row("teacher", "-", count(teacher), 0, None, teacher_acc, args.teacher_epochs, teacher_time))
    print(f"teacher: {count(teacher):,} params, {100 * teacher_acc:.2f}% ({teacher_time:.0f} s)", flush=True)

    # 2. Convert at each rank, evaluate, distil, evaluate.
    for rank in _ranks(args.ranks):
        student, rep = reuse.fx.convert(
            teacher, shuffle=False, init="mean", delta_rank=rank, example_inputs=torch.zeros(1, 1, 28, 28), report=True
        )
        deltas = sum(r.params_deltas for r in rep.converted)
        converted_acc = evaluate(student, data.test_x, data.test_y)
        torch.manual_seed(args.seed)
        seconds = train(student, data, args.epochs, args.lr / 10, args.batch_size, args.seed, teacher=teacher)
        acc = evaluate(student, data.test_x, data.test_y)
        full = isinstance(rank, float) and rank == 1.0
        name = "rank 0 (plain reuse)" if rank == 0 else ("full rank" if full else f"rank {rank}")
        rows.append(
            Row(f"converted, {name}", str(rank), count(student), deltas, converted_acc, acc, args.epochs, seconds)
        )
        print(f"{name}: {count(student):,} params ({deltas:,} in deltas), {100 * converted_acc:.2f}% converted, "
              f"{100 * acc:.2f}% distilled ({seconds:.0f} s)", flush=True)  # fmt: skip

    # 3. The rank-0 architecture from scratch, as many epochs.
    torch.manual_seed(args.seed + 1)
    scratch = reuse.fx.convert(resnet(args.width, args.blocks), shuffle=False, example_inputs=torch.zeros(1, 1, 28, 28))
    seconds = train(scratch, data, args.epochs, args.lr, args.batch_size, args.seed)
    acc = evaluate(scratch, data.test_x, data.test_y)
    rows.append(Row("rank-0 architecture from scratch", "-", count(scratch), 0, None, acc, args.epochs, seconds))
    print(f"from scratch: {count(scratch):,} params, {100 * acc:.2f}% ({seconds:.0f} s)", flush=True)

    table = [asdict(r) for r in rows]
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    (args.out / "results.json").write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "machine": machine, "rows": table}, indent=2)
        + "\n"
    )
    (args.out / "results.md").write_text(markdown(rows, machine, args))
    plot(rows, args.out / "accuracy_vs_params.png")
    print(markdown(rows, machine, args))
    return table


def markdown(rows: list[Row], machine: str, args: argparse.Namespace) -> str:
    head = (
        "| model | params | in deltas | acc. converted | acc. after | epochs | time |\n|---|---|---|---|---|---|---|\n"
    )
    body = ""
    for r in rows:
        converted = "—" if r.acc_converted is None else f"{100 * r.acc_converted:.2f}%"
        body += f"| {r.model} | {r.params:,} | {r.params_deltas:,} | {converted} | {100 * r.acc:.2f}% | {r.epochs} | "
        body += f"{r.time_s:.0f} s |\n"
    return (
        f"Fashion-MNIST, {args.train_images} training images, 10,000 test images; teacher ResNet-"
        f"{6 * args.blocks + 2} of width {args.width}; machine: {machine}\n\n" + head + body
    )


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    conv = [r for r in rows if r.model.startswith("converted")]
    ax.plot([r.params for r in conv], [100 * r.acc for r in conv], "o-", label="converted + distilled")
    ax.plot(
        [r.params for r in conv], [100 * (r.acc_converted or 0) for r in conv], "x--", label="converted, no training"
    )
    for r in conv:
        ax.annotate(
            r.model.split(", ")[1], (r.params, 100 * r.acc), textcoords="offset points", xytext=(4, 4), fontsize=7
        )
    for r, marker in ((rows[0], "*"), (rows[-1], "s")):
        ax.plot([r.params], [100 * r.acc], marker, markersize=10, label=r.model)
    ax.set_xlabel("parameters (shared weights counted once)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Relaxed reuse of a trained ResNet, Fashion-MNIST")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
