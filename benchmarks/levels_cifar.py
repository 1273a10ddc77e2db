"""Layer, filter and kernel reuse side by side: 8-LruNet-1x at each grain, its parameters and FLOPs, and the
accuracy each reaches on CIFAR-10 after the same short CPU training run.

    nice -n 10 python benchmarks/levels_cifar.py                 # train layer, filter, kernel in turn
    python benchmarks/levels_cifar.py --costs-only               # the parameter / FLOP table, no training

Data: ``../shared/data/cifar10_jpeg_q75_lossy`` (see its README). Those images were saved as quality-75 JPEGs:
they are NOT the original CIFAR-10 pixels, so the figures here are for comparing grains with each other, not
with the paper. Every grain gets the same images, the same order, the same augmentation draws and the same
one-cycle schedule; only the model differs. ``main()`` returns the rows it prints.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from reuse import filter_reuse, kernel_reuse
from reuse.models import LruNet

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("REUSE_SHARED", ROOT.parent / "shared"))
DATA = SHARED / "data" / "cifar10_jpeg_q75_lossy"
MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1) * 255
STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1) * 255


# --- costs --------------------------------------------------------------------------------------------------------
def count_params(model: nn.Module) -> int:
    """Parameters, each shared tensor (a bank, a reused block) counted once."""
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, size: int = 32) -> dict[str, int]:
    """FLOPs of one 3 x size x size image in eval mode, by ``torch.utils.flop_counter`` (2 per multiply-add; it
    counts convolutions and matmuls, so a mix-mode weight build shows up as ``mm``, a gather and scaling do not)."""
    model = model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.randn(1, 3, size, size))
    by_op = {str(op).split(".")[1]: n for op, n in counter.get_flop_counts()["Global"].items()}  # aten.<op>
    return {"total": counter.get_total_flops(), **by_op}


VARIANTS = {
    # name: (level of LruNet, extra conversion of the four stages or None)
    "layer": ("layer", None),
    "filter": ("filter", None),  # LruNet(level="filter"): index mode, banks of 1/4
    "kernel": ("kernel", None),  # LruNet(level="kernel"): index mode, banks of 1/4
    "filter, index, bank 1/2": ("layer", lambda s: filter_reuse(s, bank_size=0.5, inplace=True)),
    "filter, index, bank 1/8": ("layer", lambda s: filter_reuse(s, bank_size=0.125, inplace=True)),
    "filter, mix, 16 filters": ("layer", lambda s: filter_reuse(s, bank_size=16, mode="mix", inplace=True)),
    "kernel, index, bank 1/8": ("layer", lambda s: kernel_reuse(s, bank_size=0.125, inplace=True)),
    "kernel, mix, 4 kernels": ("layer", lambda s: kernel_reuse(s, bank_size=4, mode="mix", inplace=True)),
}


def build(variant: str, reuse: int = 8) -> LruNet:
    level, extra = VARIANTS[variant]
    model = LruNet(num_classes=10, reuse=reuse, level=level)
    if extra is not None:
        extra(nn.ModuleList(model.stages))
    return model


# --- data ---------------------------------------------------------------------------------------------------------
def load(split: str, per_class: int) -> tuple[Tensor, Tensor]:
    """The first ``per_class`` images of each class (the arrays are class-major): uint8 (N, 3, 32, 32), labels (N,)."""
    path = DATA / f"{split}.npz"
    if not path.exists():
        raise SystemExit(f"{path} not found: set REUSE_SHARED to the folder that holds data/cifar10_jpeg_q75_lossy")
    arrays = np.load(path)
    images, labels = arrays["images"], arrays["labels"]
    keep = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)])
    x = torch.from_numpy(images[keep]).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32) uint8
    return x, torch.from_numpy(labels[keep])


def normalize(x: Tensor) -> Tensor:
    return ((x.float() - MEAN) / STD).contiguous(memory_format=torch.channels_last)  # (B, 3, 32, 32)


def augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """Random crop with 4 pixels of zero padding and a random horizontal flip, per image: (B, 3, 32, 32) uint8."""
    b = x.shape[0]
    padded = F.pad(x, (4, 4, 4, 4))  # (B, 3, 40, 40)
    dy, dx = torch.randint(0, 9, (2, b), generator=generator)
    rows = dy[:, None] + torch.arange(32)  # (B, 32)
    cols = dx[:, None] + torch.arange(32)  # (B, 32)
    out = padded[torch.arange(b)[:, None, None, None], torch.arange(3)[None, :, None, None], rows[:, None, :, None],
                 cols[:, None, None, :]]  # (B, 3, 32, 32)  # fmt: skip
    flip = torch.rand(b, generator=generator) < 0.5  # (B,)
    return torch.where(flip[:, None, None, None], out.flip(3), out)  # (B, 3, 32, 32)


# --- training -----------------------------------------------------------------------------------------------------
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch: int = 250) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            correct += (model(normalize(x[i : i + batch])).argmax(1) == y[i : i + batch]).sum().item()
    return correct / len(x)


def train(variant: str, args: argparse.Namespace, data: tuple[Tensor, Tensor, Tensor, Tensor]) -> dict:
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(args.seed)
    model = build(variant, args.reuse).to(memory_format=torch.channels_last)
    row = {"variant": variant, "params": count_params(model), "flops": count_flops(model)["total"]}
    model = model.to(memory_format=torch.channels_last)
    steps_per_epoch = len(x_train) // args.batch
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch, pct_start=0.25
    )
    generator = torch.Generator().manual_seed(args.seed)  # the same draws for every variant
    start, load0 = time.perf_counter(), os.getloadavg()[0]
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        total = 0.0
        for step in range(steps_per_epoch):
            idx = order[step * args.batch : (step + 1) * args.batch]
            inputs = normalize(augment(x_train[idx], generator))  # (B, 3, 32, 32)
            loss = F.cross_entropy(model(inputs), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item()
        print(f"  {variant}: epoch {epoch + 1}/{args.epochs} loss {total / steps_per_epoch:.3f} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
    train_s = time.perf_counter() - start
    accuracy = evaluate(model, x_test, y_test)
    row.update(
        accuracy=accuracy,
        train_s=round(train_s, 1),
        total_s=round(time.perf_counter() - start, 1),
        train_img_per_s=round(args.epochs * steps_per_epoch * args.batch / train_s, 1),
        load_avg_start=round(load0, 2),
        load_avg_end=round(os.getloadavg()[0], 2),
    )
    return row


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), "?")
    threads = torch.get_num_threads()
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({threads} threads), {platform.system()}"


def write_json(path: Path, payload: object) -> None:
    """Write whole or not at all: a temp file in the same folder, then os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        json.dump(payload, f, indent=2)
    os.replace(f.name, path)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=["layer", "filter", "kernel"], choices=list(VARIANTS))
    parser.add_argument("--reuse", type=int, default=8, help="N of N-LruNet-1x")
    parser.add_argument("--train-per-class", type=int, default=150)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.1, help="peak of the one-cycle schedule")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--costs-only", action="store_true", help="print parameters and FLOPs of every variant")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "levels_cifar.json")
    args = parser.parse_args(argv)

    if args.costs_only:
        rows = []
        for variant in VARIANTS:
            model = build(variant, args.reuse)
            flops = count_flops(model)
            rows.append(
                {"variant": variant, "params": count_params(model), **{f"flops_{k}": v for k, v in flops.items()}}
            )
            print(rows[-1], flush=True)
        return rows

    x_train, y_train = load("train", args.train_per_class)
    x_test, y_test = load("test", args.test_per_class)
    print(f"{len(x_train)} training images, {len(x_test)} test images; {machine()}", flush=True)
    rows = []
    for variant in args.variants:
        rows.append(train(variant, args, (x_train, y_train, x_test, y_test)))
        print(rows[-1], flush=True)
        write_json(args.out, {"args": {k: str(v) for k, v in vars(args).items()}, "machine": machine(), "rows": rows})
    print("\n| grain | params | MFLOPs | accuracy | train time |")
    print("|---|---|---|---|---|")
    for r in rows:
        cells = [r["variant"], f"{r['params']:,}", f"{r['flops'] / 1e6:.1f}", f"{100 * r['accuracy']:.1f}%"]
        print("| " + " | ".join([*cells, f"{r['train_s']:.0f} s"]) + " |")
    return rows


if __name__ == "__main__":
    main()
