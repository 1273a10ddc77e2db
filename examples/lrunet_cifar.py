#!/usr/bin/env python
"""Train LruNet with the recipe of Köpüklü et al., "Convolutional Neural Networks with Layer Reuse" (ICIP 2019).

One file, read it top to bottom: configuration, data, on-device augmentation, model, schedule, checkpoints,
the training loop, ``main()``. ``main(argv)`` returns the final metrics, which the script also prints as its
last line, in JSON.

The paper's recipe is the default: SGD with momentum 0.9, weight decay 5e-4 on all parameters, batch 256,
learning rate 0.1 for 200 epochs then 0.01 and 0.001 for 50 epochs each, cross-entropy, dropout 0.5 (0.7 for
CIFAR-100), width 1x (2x for CIFAR-100), random crop with padding 4, random rotation of up to 10 degrees,
horizontal flip, inputs in [0, 1] (the authors did not normalise them). ``--recipe fast`` aims at the paper's
accuracy in 30 epochs: cosine with a 2-epoch warm-up, lr 0.2, label smoothing 0.1, an EMA of the weights (0.999
per step, the model evaluated), Nesterov momentum, no weight decay on BatchNorm and biases; each ingredient is a
flag of its own, and a recipe fills only the options not given (RECIPES below).

Examples::

    # a real run in a few minutes on a CPU, on the Fashion-MNIST subset shipped with the repository
    python examples/lrunet_cifar.py --dataset fashion-mnist --data-dir examples/data/fashion_mnist_subset \\
        --reuse 4 --width 0.5 --epochs 8 --batch-size 64 --schedule onecycle

    # the paper's 14-LruNet-1x on CIFAR-10 (torchvision downloads the data into ./data)
    python examples/lrunet_cifar.py --dataset cifar10 --reuse 14

    # 10-LruNet-1x on all of Fashion-MNIST in 30 epochs on a GPU
    python examples/lrunet_cifar.py --dataset fashion-mnist --data-dir ../shared/data/fashion_mnist --reuse 10 \\
        --recipe fast

    # the same on 4 GPUs (the batch size is global: 256 split as 4 x 64), then continue it after a stop
    torchrun --nproc_per_node=4 examples/lrunet_cifar.py --dataset cifar10 --reuse 14 --out runs/c10-14
    torchrun --nproc_per_node=4 examples/lrunet_cifar.py --out runs/c10-14 --resume

Data live on the device as one uint8 tensor and are augmented there, a batch at a time (the fast CIFAR trainers'
way); the CPU runs the very same code. Model and batches are channels_last. On CUDA the script adds bf16
autocast, cudnn.benchmark and, with ``--compile``, ``torch.compile``. Under ``torchrun`` (one process too) it trains
data-parallel with DDP: each process takes an equal, strided share of every global batch, as
``DistributedSampler`` would. Each epoch's log line (flushed) gives its test accuracy and the elapsed time.

What the user can fix stops the script with one line on stderr (``lrunet_cifar.py: error: ...``) and a non-zero
exit, checked before any work where it can be: bad numbers, unreadable data, an unwritable ``--out``, a bad
``last.pt`` for ``--resume``; a full disk during a save (every file is replaced whole or not at all) and a run
whose loss turns NaN stop the same way. ``--resume`` with a larger ``--epochs`` extends a run. See
docs/training.md.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import inspect
import json
import math
import os
import re
import sys
import time
import warnings
import zipfile
import zlib
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

try:
    import reuse  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`: use the checkout's package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from reuse import ReuseError
from reuse.models import LruNet

# ----------------------------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    channels: int  # image channels the dataset has
    size: int  # image height and width
    torchvision_name: str  # class in torchvision.datasets
    drop_rate: float  # the paper's dropout for this dataset
    width: float  # the paper's width multiplier for this dataset


DATASETS: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo(10, 3, 32, "CIFAR10", drop_rate=0.5, width=1.0),
    "cifar100": DatasetInfo(100, 3, 32, "CIFAR100", drop_rate=0.7, width=2.0),
    "fashion-mnist": DatasetInfo(10, 1, 28, "FashionMNIST", drop_rate=0.5, width=1.0),
}
PAPER_EPOCHS = (200, 50, 50)  # epochs at lr, lr/10, lr/100 in the paper's schedule


@dataclass
class Config:
    dataset: str = "cifar10"  # cifar10 | cifar100 | fashion-mnist
    data_dir: str | None = None  # train.npz/test.npz folder, or torchvision root; None: ./data, downloading
    download: bool = True  # let torchvision download a missing dataset
    reuse: int = 8  # N, the uses of each LRU block
    width: float | None = None  # width multiplier; None: the paper's (1x, 2x for CIFAR-100)
    level: str | None = None  # layer | filter | kernel, passed to LruNet when it takes `level`
    shuffle: bool = True  # channel shuffle between the uses (the paper's); False: the no-shuffle ablation
    share: bool = True  # the uses share their convolutions (the paper's); False: new layers, same depth (Table 4)
    drop_rate: float | None = None  # dropout before the classifier; None: the paper's (0.5, 0.7 for CIFAR-100)
    epochs: int = 300  # total epochs; the paper's schedule is 200 + 50 + 50
    batch_size: int = 256  # GLOBAL batch, split over processes and --grad-accum micro-batches
    grad_accum: int = 1  # micro-batches per step in each process (same update, less memory)
    sync_bn: bool = False  # SyncBatchNorm across processes (CUDA DDP): statistics of the global batch
    lr: float = 0.1  # initial (paper, cosine) or peak (onecycle) learning rate
    momentum: float = 0.9
    weight_decay: float = 5e-4  # on all parameters, BatchNorm included, as the authors did
    schedule: str = "paper"  # paper | cosine | onecycle
    augment: bool = True  # random crop (padding 4), rotation (10 degrees), horizontal flip
    device: str = "auto"  # auto | cpu | cuda
    compile: bool = False  # torch.compile the model
    seed: int = 0
    out: str | None = None  # run directory; None: runs/<dataset>-<N>-lrunet-<w>x-<time>
    resume: bool = False  # continue the run in --out from its last.pt
    subset: int | None = None  # train on the first K images of a fixed shuffle of the training set
    test_subset: int | None = None  # evaluate on the first K images of a fixed shuffle of the test set
    eval_every: int = 1  # evaluate every K epochs (and after the last)
    progress: bool = True  # tqdm progress bar on the first process
    # The ingredients of --recipe fast; their defaults are the paper's recipe (see RECIPES).
    recipe: str = "paper"  # paper | fast: the defaults of the options below and of epochs, schedule, lr
    label_smoothing: float = 0.0  # of the training loss (the test loss is plain cross-entropy)
    warmup_epochs: float = 0.0  # linear warm-up of the paper and cosine schedules over this many epochs
    ema: float = 0.0  # per-step decay of an exponential moving average of the weights; 0: none; else it is evaluated
    nesterov: bool = False  # Nesterov momentum
    decay_norm_bias: bool = True  # weight decay on BatchNorm weights and biases too (the paper's); False: conv weights
    channels_last: bool = True  # model and batches in channels_last memory
    bf16: bool = True  # bf16 autocast on CUDA (no effect on a CPU)
    cpu_bf16: bool = False  # bf16 autocast on a CPU too (measured: no faster on an AVX512-BF16 EPYC; AMX CPUs may gain)


# Options a resumed run may change; every other one must match the run being resumed, but for --epochs, which may
# change to any number of epochs at least those done (the schedule is then recomputed: see place_scheduler).
RUNTIME_OPTIONS = {
    "data_dir", "download", "device", "compile", "out", "resume", "eval_every", "progress", "channels_last", "bf16",
    "cpu_bf16",
}  # fmt: skip

# --recipe NAME: the defaults it gives to the options not on the command line. ``paper`` is the dataclass's own
# defaults (the authors' recipe); ``fast`` aims at the paper's accuracy in 30 epochs instead of 300.
RECIPES: dict[str, dict[str, Any]] = {
    "paper": {},
    "fast": dict(
        epochs=30,
        schedule="cosine",
        lr=0.2,  # batch 256 with Nesterov and no decay on BatchNorm: twice the paper's 0.1
        warmup_epochs=2.0,
        label_smoothing=0.1,
        ema=0.999,  # an average over about the last 1000 steps (4 epochs of Fashion-MNIST), warmed up
        nesterov=True,
        decay_norm_bias=False,
        batch_size=256,
    ),
}

# Float options: (lowest, lowest allowed, highest, highest allowed). Every one must also be finite.
FLOAT_RANGES: dict[str, tuple[float, bool, float, bool]] = {
    "lr": (0.0, False, math.inf, False),
    "momentum": (0.0, True, 1.0, False),
    "weight_decay": (0.0, True, math.inf, False),
    "drop_rate": (0.0, True, 1.0, False),
    "width": (0.0, False, math.inf, False),
    "label_smoothing": (0.0, True, 1.0, False),
    "warmup_epochs": (0.0, True, math.inf, False),
    "ema": (0.0, True, 1.0, False),
}
POSITIVE_INTS = ("reuse", "epochs", "batch_size", "grad_accum", "eval_every", "subset", "test_subset")
# Boolean options whose flag is a negation: the flag that sets the field to False.
NEGATED_FLAGS = {
    "download": "--no-download",
    "augment": "--no-augment",
    "progress": "--no-progress",
    "shuffle": "--no-shuffle",
    "share": "--no-share",
}
# Boolean options with both flags, --NAME and --no-NAME (the fast recipe turns some on, the user may turn them off).
BOTH_WAYS = ("nesterov", "decay_norm_bias", "channels_last", "bf16")


def _parser(suppress: bool = False) -> argparse.ArgumentParser:
    """The command line; with ``suppress`` every default is left out, to learn which flags were given."""
    d = Config()
    p = argparse.ArgumentParser(
        prog="lrunet_cifar.py",
        description="Train N-LruNet-wx with the paper's recipe (Köpüklü et al., ICIP 2019).",
        argument_default=argparse.SUPPRESS if suppress else None,
    )

    def add(*flags: str, **kw: Any) -> None:
        if suppress:
            kw.pop("default", None)
        p.add_argument(*flags, **kw)

    add("--dataset", choices=sorted(DATASETS), default=d.dataset, help="default: %(default)s")
    add(
        "--data-dir",
        default=d.data_dir,
        help="folder with train.npz and test.npz, or a torchvision root (default: ./data, downloading)",
    )
    add("--no-download", dest="download", action="store_false", default=True, help="never download the data")
    add("--reuse", type=int, default=d.reuse, help="N, the uses of each LRU block (default: %(default)s)")
    add("--width", type=float, default=d.width, help="width multiplier (default: 1, or 2 for cifar100)")
    add(
        "--level",
        choices=("layer", "filter", "kernel"),
        default=d.level,
        help="grain of reuse, passed to LruNet(level=...) when it takes one (default: LruNet's)",
    )
    add(
        "--no-shuffle",
        dest="shuffle",
        action="store_false",
        default=True,
        help="no channel shuffle between the uses of a block (the ablation; default: the paper's shuffle)",
    )
    add(
        "--no-share",
        dest="share",
        action="store_false",
        default=True,
        help="every use gets its own convolutions: the same depth built from new layers (the paper's Table 4 "
        "baseline; default: the uses share them)",
    )
    add("--drop-rate", type=float, default=d.drop_rate, help="dropout (default: 0.5, or 0.7 for cifar100)")
    add("--epochs", type=int, default=d.epochs, help="default: %(default)s (the paper's 200 + 50 + 50)")
    add("--batch-size", type=int, default=d.batch_size, help="global batch, over all processes (default: %(default)s)")
    add(
        "--grad-accum",
        type=int,
        default=d.grad_accum,
        help="micro-batches per step in each process: the same update with less memory (default: %(default)s)",
    )
    add("--sync-bn", action="store_true", default=False, help="SyncBatchNorm over processes (torchrun on CUDA)")
    add("--lr", type=float, default=d.lr, help="initial or peak learning rate (default: %(default)s)")
    add("--momentum", type=float, default=d.momentum, help="default: %(default)s")
    add("--weight-decay", type=float, default=d.weight_decay, help="on all parameters (default: %(default)s)")
    add(
        "--schedule",
        choices=("paper", "cosine", "onecycle"),
        default=d.schedule,
        help="paper: lr, lr/10, lr/100 for 2/3, 1/6, 1/6 of the epochs; cosine and onecycle for short runs "
        "(default: %(default)s)",
    )
    add(
        "--no-augment",
        dest="augment",
        action="store_false",
        default=True,
        help="no crop, rotation or flip (default: the paper's augmentation)",
    )
    add("--device", choices=("auto", "cpu", "cuda"), default=d.device, help="default: %(default)s")
    add("--compile", action="store_true", default=False, help="torch.compile the model")
    add("--seed", type=int, default=d.seed, help="default: %(default)s")
    add("--out", default=d.out, help="run directory (default: runs/<dataset>-<N>-lrunet-<w>x-<time>)")
    add("--resume", action="store_true", default=False, help="continue the run in --out from its last.pt")
    add(
        "--subset",
        type=int,
        default=d.subset,
        metavar="K",
        help="train on K images, the first K of a fixed shuffle (every class, the same for every --seed)",
    )
    add("--test-subset", type=int, default=d.test_subset, metavar="K", help="evaluate on K test images, likewise")
    add(
        "--eval-every",
        type=int,
        default=d.eval_every,
        metavar="K",
        help="evaluate every K epochs and after the last (default: %(default)s)",
    )
    add("--no-progress", dest="progress", action="store_false", default=True, help="no progress bar")
    add(
        "--recipe",
        choices=sorted(RECIPES),
        default=d.recipe,
        help="paper: the authors' recipe (the defaults above); fast: 30 epochs, cosine with 2 warm-up epochs, lr "
        "0.2, label smoothing 0.1, EMA 0.999, Nesterov, no weight decay on BatchNorm and biases; any option "
        "given overrides the recipe's value (default: %(default)s)",
    )
    add("--label-smoothing", type=float, default=d.label_smoothing, help="of the training loss (default: 0)")
    add(
        "--warmup-epochs",
        type=float,
        default=d.warmup_epochs,
        metavar="E",
        help="linear warm-up of the paper and cosine schedules over E epochs (default: 0)",
    )
    add(
        "--ema",
        type=float,
        default=d.ema,
        metavar="DECAY",
        help="keep an exponential moving average of the weights with this per-step decay and evaluate it "
        "(default: 0, none)",
    )
    both = argparse.BooleanOptionalAction
    add("--nesterov", action=both, default=d.nesterov, help="Nesterov momentum (default: off)")
    add(
        "--decay-norm-bias",
        action=both,
        default=d.decay_norm_bias,
        help="weight decay on BatchNorm weights and biases too, as the paper (default: on)",
    )
    add("--channels-last", action=both, default=d.channels_last, help="channels_last memory (default: on)")
    add("--bf16", action=both, default=d.bf16, help="bf16 autocast on CUDA (default: on)")
    add(
        "--cpu-bf16",
        action=both,
        default=d.cpu_bf16,
        help="bf16 autocast on a CPU too (default: off; no faster for 14-LruNet on an AVX512-BF16 EPYC: measure)",
    )
    return p


def flag(name: str, value: Any = True) -> str:
    """The command-line flag of a Config field, e.g. ``--batch-size`` for ``batch_size``; for an option with both
    flags, the one that sets ``value``."""
    if name in BOTH_WAYS and value is False:
        return "--no-" + name.replace("_", "-")
    return NEGATED_FLAGS.get(name, "--" + name.replace("_", "-"))


def _range_text(low: float, low_ok: bool, high: float, high_ok: bool) -> str:
    if math.isinf(high):
        return f"{'>=' if low_ok else '>'} {low:g}"
    return f"in {'[' if low_ok else '('}{low:g}, {high:g}{']' if high_ok else ')'}"


def check_options(cfg: Config) -> None:
    """Refuse numbers that cannot make a run: non-positive counts, NaN or infinite floats, floats out of range."""
    for name in POSITIVE_INTS:
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise ReuseError(f"{flag(name)} must be at least 1, got {value}")
    for name, (low, low_ok, high, high_ok) in FLOAT_RANGES.items():
        value = getattr(cfg, name)
        if value is None:
            continue
        inside = (value >= low if low_ok else value > low) and (value <= high if high_ok else value < high)
        if not math.isfinite(value) or not inside:
            raise ReuseError(
                f"{flag(name)} must be a finite number {_range_text(low, low_ok, high, high_ok)}, got {value}"
            )
    if cfg.warmup_epochs and cfg.schedule == "onecycle":
        raise ReuseError(
            f"--warmup-epochs {cfg.warmup_epochs:g} does not go with --schedule onecycle, which warms up by itself "
            f"(its first 30%); drop one of them"
        )
    if cfg.warmup_epochs >= cfg.epochs:
        raise ReuseError(f"--warmup-epochs {cfg.warmup_epochs:g} must be fewer than --epochs {cfg.epochs}")


def apply_recipe(cfg: Config, given: set[str]) -> Config:
    """``cfg`` with the defaults of ``cfg.recipe`` for the options not in ``given``. The recipe's warm-up is at
    most a fifth of the run (a 1-epoch smoke test warms up for 0.2 epochs), and none under a onecycle schedule
    given on the command line (one-cycle has its own).

    Example:
        >>> cfg = apply_recipe(Config(recipe="fast", lr=0.05), {"recipe", "lr"})
        >>> cfg.epochs, cfg.schedule, cfg.lr, cfg.ema, cfg.nesterov, cfg.warmup_epochs
        (30, 'cosine', 0.05, 0.999, True, 2.0)
        >>> apply_recipe(Config(recipe="fast", epochs=1), {"recipe", "epochs"}).warmup_epochs
        0.2
    """
    values = {k: v for k, v in RECIPES[cfg.recipe].items() if k not in given}
    if "warmup_epochs" in values:
        epochs = values.get("epochs", cfg.epochs)
        values["warmup_epochs"] = min(values["warmup_epochs"], epochs / 5)
        if cfg.schedule == "onecycle" and "schedule" in given:
            values["warmup_epochs"] = 0.0
    return Config(**{**asdict(cfg), **values})


def parse_config(argv: Sequence[str] | None) -> tuple[Config, set[str]]:
    """The configuration, and the names of the options given on the command line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = Config(**vars(_parser().parse_args(argv)))
    given = set(vars(_parser(suppress=True).parse_args(argv)))
    cfg = apply_recipe(cfg, given)
    check_options(cfg)
    return cfg, given


def resolve_defaults(cfg: Config) -> Config:
    """Fill the dataset-dependent defaults (width, dropout) from the paper."""
    info = DATASETS[cfg.dataset]
    width = info.width if cfg.width is None else cfg.width
    drop = info.drop_rate if cfg.drop_rate is None else cfg.drop_rate
    return Config(**{**asdict(cfg), "width": width, "drop_rate": drop})


def model_name(cfg: Config) -> str:
    """The paper's name of the model, e.g. ``8-LruNet-1x``; the ablations add ``-noshare`` / ``-noshuffle``."""
    return (
        f"{cfg.reuse}-LruNet-{cfg.width:g}x" + ("" if cfg.share else "-noshare") + ("" if cfg.shuffle else "-noshuffle")
    )


# -------------------------------------------------------------------------------------------------------- data


@dataclass
class Data:
    train_x: Tensor  # (N, H, W, C) uint8
    train_y: Tensor  # (N,) int64
    test_x: Tensor  # (M, H, W, C) uint8
    test_y: Tensor  # (M,) int64
    source: str  # where the arrays came from, for the log


def _missing_data_message(dataset: str, root: Path, reason: str) -> str:
    info = DATASETS[dataset]
    return (
        f"no {dataset} data: {reason}. "
        f"Either let torchvision download it (needs the network; it goes into {root}), "
        f"or put a local copy in a folder and pass --data-dir FOLDER, where FOLDER holds torchvision's "
        f"{info.torchvision_name} files or train.npz and test.npz (arrays `images`: uint8, N x H x W x C or "
        f"N x H x W; `labels`: int64). A small Fashion-MNIST subset ships with the repository: "
        f"--dataset fashion-mnist --data-dir examples/data/fashion_mnist_subset"
    )


def _as_nhwc(images: np.ndarray, path: Path, dataset: str) -> np.ndarray:
    info = DATASETS[dataset]
    if images.dtype != np.uint8:
        raise ReuseError(f"{path}: `images` must be uint8 (0..255), got {images.dtype}; convert with .astype(np.uint8)")
    if images.ndim == 3:
        images = images[..., None]  # (N, H, W, 1)
    if images.ndim != 4:
        raise ReuseError(f"{path}: `images` must be N x H x W x C or N x H x W, got shape {images.shape}")
    if images.shape[-1] != info.channels:
        raise ReuseError(
            f"{path}: `images` have {images.shape[-1]} channels (shape {images.shape}), {dataset} has "
            f"{info.channels}; is --dataset right? (channels must be the last axis)"
        )
    return images


NPZ_HINT = "write it again with numpy.savez_compressed(path, images=uint8_array, labels=int64_array)"


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The arrays ``images`` and ``labels`` of ``path``, read without unpickling anything (``allow_pickle=False``).
    A file that is no readable .npz of plain arrays is a ReuseError that names it and says why."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head != b"PK\x03\x04":  # an .npz is a zip archive; this also catches .npy, pickle and text files
        raise ReuseError(f"{path}: not an .npz archive (a zip file); its first bytes are {head!r}; {NPZ_HINT}")
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ReuseError(f"{path}: a truncated or corrupt .npz ({type(err).__name__}: {err}); {NPZ_HINT}") from None
    with npz:
        missing = {"images", "labels"} - set(npz.files)
        if missing:
            raise ReuseError(f"{path}: needs arrays `images` and `labels`, lacks {sorted(missing)}")
        arrays = []
        for key in ("images", "labels"):
            try:
                arrays.append(npz[key])
            except ValueError as err:
                if "allow_pickle" not in str(err):
                    raise ReuseError(f"{path}: `{key}` cannot be read ({err}); {NPZ_HINT}") from None
                raise ReuseError(
                    f"{path}: `{key}` is an array of Python objects (dtype=object), which only unpickling could "
                    f"read, and this script never unpickles data files (np.load(allow_pickle=False)); {NPZ_HINT}"
                ) from None
            except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as err:
                raise ReuseError(
                    f"{path}: `{key}` cannot be read, the file is truncated or corrupt ({type(err).__name__}: {err}); "
                    f"{NPZ_HINT}"
                ) from None
    return arrays[0], arrays[1]


def _load_npz(folder: Path, dataset: str) -> Data:
    arrays = []
    for split in ("train", "test"):
        path = folder / f"{split}.npz"
        if not path.is_file():
            raise ReuseError(_missing_data_message(dataset, folder, f"{folder} holds no {split}.npz"))
        images, labels = _read_npz(path)
        images = _as_nhwc(images, path, dataset)
        if labels.shape != (len(images),) or labels.dtype.kind not in "iu":
            raise ReuseError(
                f"{path}: `labels` must be integers of shape ({len(images)},), got {labels.dtype} {labels.shape}"
            )
        arrays += [torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels.astype(np.int64))]
    return Data(*arrays, source=f"{folder}/{{train,test}}.npz")


def _load_torchvision(root: Path, dataset: str, download: bool) -> Data:
    import torchvision

    cls = getattr(torchvision.datasets, DATASETS[dataset].torchvision_name)
    splits = []
    for train in (True, False):
        try:
            ds = cls(str(root), train=train, download=False)
        except RuntimeError:  # torchvision: "Dataset not found or corrupted"
            if not download:
                raise ReuseError(
                    _missing_data_message(
                        dataset,
                        root,
                        f"{root} holds neither train.npz/test.npz nor its files, and --no-download is set",
                    )
                ) from None
            try:
                ds = cls(str(root), train=train, download=True)
            except Exception as err:  # no network, proxy, disk full: say what happened and where to put the data
                reason = f"{root} holds no copy and the download failed ({type(err).__name__}: {err})"
                raise ReuseError(_missing_data_message(dataset, root, reason)) from None
        images = np.asarray(ds.data)  # CIFAR: (N, 32, 32, 3) numpy; Fashion-MNIST: (N, 28, 28) tensor
        splits += [torch.from_numpy(_as_nhwc(images, root, dataset)), torch.as_tensor(ds.targets, dtype=torch.int64)]
    return Data(*splits, source=f"torchvision.datasets.{cls.__name__}({root})")


def _fixed_selection(n: int, k: int | None) -> Tensor | None:
    """The first ``k`` of a shuffle of ``range(n)`` that never changes (seed 0): every class appears even in
    class-major files, and runs with different ``--seed`` see the same images."""
    if k is None or k >= n:
        return None
    return torch.randperm(n, generator=torch.Generator().manual_seed(0))[:k].sort().values


def load_data(cfg: Config) -> Data:
    """Load the dataset of ``cfg`` as uint8 NHWC tensors on the CPU, validate it, apply the subsets."""
    if cfg.data_dir is not None:
        folder = Path(cfg.data_dir).expanduser()
        if (folder / "train.npz").is_file() or (folder / "test.npz").is_file():
            data = _load_npz(folder, cfg.dataset)
        else:
            data = _load_torchvision(folder, cfg.dataset, cfg.download)
    else:
        data = _load_torchvision(Path("data"), cfg.dataset, cfg.download)
    num_classes = DATASETS[cfg.dataset].num_classes
    for name, labels in (("train", data.train_y), ("test", data.test_y)):
        if len(labels) == 0:
            raise ReuseError(f"{data.source}: the {name} split is empty")
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ReuseError(
                f"{data.source}: {name} labels span {int(labels.min())}..{int(labels.max())}, "
                f"{cfg.dataset} has classes 0..{num_classes - 1}; is --dataset right?"
            )
    if data.train_x.shape[1:] != data.test_x.shape[1:]:
        raise ReuseError(
            f"{data.source}: train images {tuple(data.train_x.shape[1:])} and test images "
            f"{tuple(data.test_x.shape[1:])} differ in shape"
        )
    if (sel := _fixed_selection(len(data.train_y), cfg.subset)) is not None:
        data.train_x, data.train_y = data.train_x[sel], data.train_y[sel]
    if (sel := _fixed_selection(len(data.test_y), cfg.test_subset)) is not None:
        data.test_x, data.test_y = data.test_x[sel], data.test_y[sel]
    return data


# ------------------------------------------------------------------------------------------ on-device augmentation


@dataclass
class AugParams:
    """Random draws for a batch of images; index it like a tensor to select images."""

    dx: Tensor  # (B,) int64, crop offset along the width, 0..2*pad
    dy: Tensor  # (B,) int64, crop offset along the height
    angle: Tensor  # (B,) float32, rotation in degrees
    flip: Tensor  # (B,) bool, mirror left-right

    def __getitem__(self, index: Any) -> AugParams:
        return AugParams(self.dx[index], self.dy[index], self.angle[index], self.flip[index])

    def to(self, device: torch.device) -> AugParams:
        return AugParams(*(t.to(device, non_blocking=True) for t in (self.dx, self.dy, self.angle, self.flip)))


def draw_aug_params(n: int, gen: torch.Generator, pad: int = 4, degrees: float = 10.0) -> AugParams:
    """Draw crop offsets, angles and flips for ``n`` images from ``gen`` (a CPU generator: the same draws on
    every device and in every process)."""
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)  # (n,)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)  # (n,)
    angle = (torch.rand(n, generator=gen) * 2 - 1) * degrees  # (n,), uniform in [-degrees, degrees]
    flip = torch.rand(n, generator=gen) < 0.5  # (n,)
    return AugParams(dx, dy, angle, flip)


def to_float(x: Tensor) -> Tensor:
    """uint8 NHWC images to float NCHW in [0, 1]; the result is a channels_last view of the NHWC memory.

    Example:
        >>> to_float(torch.full((2, 4, 4, 3), 255, dtype=torch.uint8)).shape
        torch.Size([2, 3, 4, 4])
    """
    return x.permute(0, 3, 1, 2).float().div_(255)  # (B, C, H, W)


def augment(x: Tensor, p: AugParams, pad: int = 4) -> Tensor:
    """The paper's augmentation on a batch, on whatever device ``x`` is: random crop with zero padding ``pad``,
    then rotation about the centre (nearest pixel, zero fill, as torchvision's ``RandomRotation``), then a
    horizontal flip. Takes uint8 ``(B, H, W, C)``, returns float ``(B, C, H, W)`` in [0, 1].

    Example:
        >>> x = torch.arange(16, dtype=torch.uint8).reshape(1, 4, 4, 1)
        >>> p = AugParams(torch.tensor([4]), torch.tensor([4]), torch.tensor([0.0]), torch.tensor([True]))
        >>> (augment(x, p) * 255).round().int()[0, 0, 0].tolist()  # centre crop, no rotation, mirrored
        [3, 2, 1, 0]
    """
    b, h, w, _ = x.shape
    dev = x.device
    padded = F.pad(x, (0, 0, pad, pad, pad, pad))  # (B, H+2p, W+2p, C), zeros around
    rows = p.dy.to(dev)[:, None] + torch.arange(h, device=dev)  # (B, H)
    cols = p.dx.to(dev)[:, None] + torch.arange(w, device=dev)  # (B, W)
    x = padded[torch.arange(b, device=dev)[:, None, None], rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    x = to_float(x)  # (B, C, H, W), channels_last memory
    rad = p.angle.to(dev, torch.float32) * (math.pi / 180)  # (B,)
    cos, sin = torch.cos(rad), torch.sin(rad)  # (B,)
    sign = 1.0 - 2.0 * p.flip.to(dev, torch.float32)  # (B,), -1 mirrors
    # Output pixel -> input pixel: rotate about the centre, in pixel units (hence h/w on the off-diagonal).
    theta = torch.stack(
        [
            torch.stack([cos * sign, -sin * (h / w), torch.zeros_like(cos)], 1),
            torch.stack([sin * (w / h) * sign, cos, torch.zeros_like(cos)], 1),
        ],
        1,
    )  # (B, 2, 3)
    grid = F.affine_grid(theta, [b, x.shape[1], h, w], align_corners=False)  # (B, H, W, 2)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)  # (B, C, H, W)


# ------------------------------------------------------------------------------------------------------- model


def build_model(cfg: Config, in_chans: int) -> nn.Module:
    """N-LruNet-wx for ``cfg``; ``--level`` goes to LruNet's ``level=`` when its constructor takes one, and
    ``--no-shuffle`` / ``--no-share`` to its ``shuffle=False`` / ``share=False`` (left out when not given, so an
    older LruNet without them still builds the paper's model)."""
    kwargs: dict[str, Any] = dict(
        num_classes=DATASETS[cfg.dataset].num_classes,
        width_mult=cfg.width,
        reuse=cfg.reuse,
        drop_rate=cfg.drop_rate,
        in_chans=in_chans,
    )
    if cfg.level is not None:
        if "level" in inspect.signature(LruNet).parameters:
            kwargs["level"] = cfg.level
        elif cfg.level != "layer":
            raise ReuseError(
                f"--level {cfg.level}: this version of reuse.models.LruNet has no `level` argument, so it can "
                "only reuse whole layers; update the reuse package to one with filter and kernel reuse, "
                "or drop --level (layer reuse is what LruNet does)"
            )
    for name in ("shuffle", "share"):
        if not getattr(cfg, name):
            if name not in inspect.signature(LruNet).parameters:
                raise ReuseError(
                    f"{flag(name)}: this version of reuse.models.LruNet has no `{name}` argument; update the reuse "
                    f"package, or drop {flag(name)}"
                )
            kwargs[name] = False
    try:
        return LruNet(**kwargs)
    except ReuseError as err:
        raise ReuseError(f"cannot build {model_name(cfg)} (--reuse {cfg.reuse} --width {cfg.width:g}): {err}") from None


def count_mflops(model: nn.Module, shape: tuple[int, int, int], device: torch.device) -> float:
    """Forward FLOPs for one image, in millions, by ``torch.utils.flop_counter`` (2 FLOPs per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, *shape, device=device))  # (1, C, H, W)
    model.train(was_training)
    return counter.get_total_flops() / 1e6


def param_groups(model: nn.Module, cfg: Config) -> list[dict[str, Any]]:
    """The optimiser's parameter groups: one with weight decay on everything (the paper's), or with
    ``--no-decay-norm-bias`` the convolution and linear weights decayed and the BatchNorm weights and all biases
    (every parameter of one dimension) not. Shared weights appear once (``parameters()`` lists each once).

    Example:
        >>> groups = param_groups(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)), Config(decay_norm_bias=False))
        >>> [(len(g["params"]), g["weight_decay"]) for g in groups]
        [(1, 0.0005), (3, 0.0)]
    """
    if cfg.decay_norm_bias:
        return [{"params": list(model.parameters()), "weight_decay": cfg.weight_decay}]
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]


class WeightEMA:
    """An exponential moving average of a model's parameters and floating-point buffers (BatchNorm statistics),
    updated after every optimiser step: ``ema += (1 - d) * (weights - ema)`` with ``d = min(decay, (1 + t) /
    (10 + t))`` at update ``t`` (the usual warm-up, so that the first steps' random weights fade fast). Integer
    buffers are copied. A shared weight is one tensor and is averaged once.

    Example:
        >>> net = nn.Linear(2, 1)
        >>> ema = WeightEMA(net, decay=0.5)
        >>> with torch.no_grad():
        ...     _ = net.weight.add_(1.0)
        >>> ema.update()  # t = 1: d = min(0.5, 2 / 11)
        >>> torch.allclose(ema.module.weight, net.weight - 2 / 11)
        True
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay, self.updates = decay, 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)  # deepcopy keeps shared weights shared
        pairs = list(zip(self.module.parameters(), model.parameters(), strict=True))
        pairs += zip(self.module.buffers(), model.buffers(), strict=True)
        self._floats = [(e, m) for e, m in pairs if e.is_floating_point()]
        self._others = [(e, m) for e, m in pairs if not e.is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the current weights of the model it was made from."""
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_([e for e, _ in self._floats], [m.detach() for _, m in self._floats], 1.0 - d)
        for e, m in self._others:
            e.copy_(m)

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["weights"])
        self.updates = state["updates"]


# ---------------------------------------------------------------------------------------------------- schedule


def make_scheduler(
    opt: torch.optim.Optimizer, cfg: Config, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """A per-step learning-rate schedule. ``paper``: lr for 2/3 of the epochs, lr/10 for 1/6, lr/100 for 1/6
    (200/50/50 at 300 epochs); ``cosine``: cosine from lr to 0; ``onecycle``: PyTorch's one-cycle with peak lr.
    ``--warmup-epochs W`` multiplies the paper and cosine schedules by ``(step + 1) / S`` over their first
    ``S = round(W * steps_per_epoch)`` steps (a linear ramp to lr; the cosine still spans the whole run)."""
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total)
    if cfg.schedule == "cosine":
        shape: Callable[[int], float] = lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))  # noqa: E731
    else:
        m1 = round(cfg.epochs * PAPER_EPOCHS[0] / sum(PAPER_EPOCHS))
        m2 = round(cfg.epochs * sum(PAPER_EPOCHS[:2]) / sum(PAPER_EPOCHS))
        shape = lambda step: 0.1 ** ((step // steps_per_epoch >= m1) + (step // steps_per_epoch >= m2))  # noqa: E731
    warm = round(cfg.warmup_epochs * steps_per_epoch)
    factor = lambda step: shape(step) * min(1.0, (step + 1) / warm) if warm else shape(step)  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def place_scheduler(
    opt: torch.optim.Optimizer, cfg: Config, steps_per_epoch: int, step: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """A new schedule for ``cfg.epochs``, placed at ``step`` (the optimiser steps already taken): the optimiser's
    learning rate (and one-cycle's momentum) become the new schedule's values at that step, and it goes on from
    there. Used when a resumed run changes ``--epochs``: the steps taken are not redone, the rest follows the
    schedule of the new length."""
    sched = make_scheduler(opt, cfg, steps_per_epoch)
    sched.last_epoch = step - 1
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": deliberate here
        warnings.simplefilter("ignore", UserWarning)
        sched.step()  # last_epoch = step; the lr of every group set for it
    return sched


# ------------------------------------------------------------------------------------------------- checkpoints


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` through ``write(tmp)`` on a temporary file next to it, then rename: a crash or kill at any
    moment leaves either the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(obj: dict[str, Any], path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


# The files of a run directory, each written through atomic_write (hence `.NAME.PID.tmp` while it is written).
RUN_FILES = ("last.pt", "best.pt", "config.json", "metrics.jsonl", "curves.png", "final.json", "write-probe")
_TEMPORARY = re.compile(r"\.(" + "|".join(re.escape(n) for n in RUN_FILES) + r")\.(\d+)\.tmp")
CHECKPOINT_KEYS = ("config", "epoch", "best_acc", "history", "model", "optimizer", "scheduler")


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows: assume it lives
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale_temporaries(out: Path) -> list[str]:
    """Delete the temporary files that a killed save left in the run directory ``out``: only names of the
    form ``.FILE.PID.tmp`` with FILE one of :data:`RUN_FILES`, and only when process PID is gone (or is this
    one, which has written nothing yet). Returns the names removed."""
    removed = []
    for path in sorted(out.glob(".*.tmp")) if out.is_dir() else []:
        match = _TEMPORARY.fullmatch(path.name)
        if match and path.is_file() and (int(match[2]) == os.getpid() or not _pid_alive(int(match[2]))):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


def check_writable(out: Path) -> None:
    """Make sure files can be created in ``out`` before any work starts: create it (and its parents), write
    and delete a probe file. Folders this created are removed again, so a run that stops before its first
    write leaves nothing behind."""
    created = [p for p in (out, *out.parents) if not p.exists()]
    probe = out / f".write-probe.{os.getpid()}.tmp"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ReuseError(
            f"--out {out}: cannot write there ({type(err).__name__}: {err.strerror or err}); pass a writable "
            f"directory to --out"
        ) from None
    finally:
        for folder in created:  # the deepest first
            try:
                folder.rmdir()
            except OSError:
                pass


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read ``path``, a ``last.pt`` of this script, for ``--resume``. A file that cannot be read (truncated,
    corrupt, text) or that is some other torch file (a plain state dict) is a ReuseError that says which."""
    fix = f"restore {path.name} from a copy, or start a new run with another --out"
    try:
        ckpt = torch.load(path, map_location="cpu")
    except Exception as err:  # noqa: BLE001 - torch raises many kinds (zip, unpickling, EOF): all mean "unreadable"
        reason = re.split(r"(?<=\.)\s", str(err).strip(), maxsplit=1)[0][:200]  # the first sentence
        raise ReuseError(
            f"--resume: {path} cannot be read ({type(err).__name__}: {reason}): it is truncated, corrupt or not a "
            f"torch file; {fix}"
        ) from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        what = f"a dict with {len(ckpt)} keys" if isinstance(ckpt, dict) else f"a {type(ckpt).__name__}"
        raise ReuseError(
            f"--resume: {path} is not a checkpoint of lrunet_cifar.py: it is {what}, without {', '.join(missing)} "
            f"(a plain state dict?); {fix}"
        )
    try:
        Config(**ckpt["config"])
    except TypeError as err:
        raise ReuseError(
            f"--resume: {path} holds a configuration this script does not know ({err}); was it written by another "
            f"version of lrunet_cifar.py? {fix}"
        ) from None
    return ckpt


def plot_curves(history: list[dict[str, Any]], path: Path, title: str) -> None:
    """Loss and accuracy per epoch, train and test, to ``path`` (PNG); skipped without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    epochs = [h["epoch"] for h in history]
    tested = [h for h in history if h["test_acc"] is not None]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], label="train")
    ax_loss.plot([h["epoch"] for h in tested], [h["test_loss"] for h in tested], "o-", label="test")
    ax_acc.plot(epochs, [100 * h["train_acc"] for h in history], label="train")
    ax_acc.plot([h["epoch"] for h in tested], [100 * h["test_acc"] for h in tested], "o-", label="test")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


# -------------------------------------------------------------------------------------------------- processes


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    distributed: bool = False  # in a process group (started by torchrun): the model trains wrapped in DDP

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_kind: str) -> Dist:
    """Join the process group when started by ``torchrun`` (NCCL on CUDA, gloo on CPU), with one process too:
    ``torchrun --nproc_per_node=1`` runs the DDP code path, a cheap check of it on one GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and "RANK" not in os.environ:  # a plain `python lrunet_cifar.py`
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device_kind == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
    return Dist(rank, world, local_rank, distributed=True)


def _seed(*parts: int) -> int:
    """A seed from integers (seed, epoch, rank), the same in every process and every session."""
    s = 0
    for p in parts:
        s = (s * 1_000_003 + p + 7) % (2**63)
    return s


def _all_reduce(values: list[float], dd: Dist, device: torch.device) -> list[float]:
    if dd.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# ---------------------------------------------------------------------------------------------------- training


EVAL_BATCH = 512  # images per forward pass of evaluate()


@torch.no_grad()
def evaluate(
    model: nn.Module, x: Tensor, y: Tensor, ctx: Any, dd: Dist, channels_last: bool = True
) -> tuple[float, float]:
    """Mean loss (plain cross-entropy) and accuracy on ``(x, y)``, each process taking a strided share, summed
    over processes; the model is left in the mode it had."""
    was_training = model.training
    model.eval()
    x, y = x[dd.rank :: dd.world], y[dd.rank :: dd.world]
    batch = EVAL_BATCH
    loss_sum = torch.zeros((), device=y.device)
    correct = torch.zeros((), device=y.device, dtype=torch.int64)
    for i in range(0, len(y), batch):
        xb = to_float(x[i : i + batch])  # (b, C, H, W), channels_last memory
        xb = xb if channels_last else xb.contiguous()  # (b, C, H, W)
        with ctx:
            logits = model(xb).float()  # (b, classes)
        loss_sum += F.cross_entropy(logits, y[i : i + batch], reduction="sum")
        correct += (logits.argmax(1) == y[i : i + batch]).sum()
    loss_sum, correct, count = _all_reduce([loss_sum.item(), float(correct.item()), float(len(y))], dd, y.device)
    model.train(was_training)
    return loss_sum / count, correct / count


def _progress(total: int, desc: str, enabled: bool) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:
        enabled = False
    if not enabled:
        return None
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, mininterval=1 if sys.stderr.isatty() else 30)


def train_epoch(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    data: Data,
    cfg: Config,
    epoch: int,
    dd: Dist,
    ctx: Any,
    ema: WeightEMA | None = None,
) -> dict[str, float]:
    """One epoch. Every step takes a global batch of ``cfg.batch_size`` images of a shuffle that depends only on
    (seed, epoch); process ``r`` of ``W`` with ``A`` micro-batches takes the images at positions
    ``r + W*a :: W*A`` of it (a strided share, as ``DistributedSampler``), so one process with ``A = K`` computes
    the same update as K processes with ``A = 1``. The shuffle is padded by wrapping so every batch is full.
    After every optimiser step the scheduler steps, and ``ema`` (when given) moves towards the new weights."""
    x_all, y_all, device = data.train_x, data.train_y, data.train_x.device
    memory = torch.channels_last if cfg.channels_last else torch.contiguous_format
    n, parts = len(y_all), dd.world * cfg.grad_accum
    steps = math.ceil(n / cfg.batch_size)
    gen = torch.Generator().manual_seed(_seed(cfg.seed, epoch))
    order = torch.randperm(n, generator=gen).repeat(math.ceil(steps * cfg.batch_size / n))[: steps * cfg.batch_size]
    aug = draw_aug_params(len(order), gen).to(device) if cfg.augment else None
    order = order.to(device, non_blocking=True)  # (steps * B,)
    torch.manual_seed(_seed(cfg.seed, epoch, dd.rank))  # dropout: own masks per process, reproducible on resume

    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    bar = _progress(steps, f"epoch {epoch + 1}/{cfg.epochs}", dd.main and cfg.progress)
    t0 = last_log = time.perf_counter()
    for step in range(steps):
        batch = slice(step * cfg.batch_size, (step + 1) * cfg.batch_size)
        for a in range(cfg.grad_accum):
            part = slice(dd.rank + dd.world * a, None, parts)
            idx = order[batch][part]  # (B / parts,)
            xb = augment(x_all[idx], aug[batch][part]) if aug is not None else to_float(x_all[idx])  # (b, C, H, W)
            xb = xb.contiguous(
                memory_format=memory
            )  # (b, C, H, W); channels_last: a no-op unless grid_sample changed it
            yb = y_all[idx]  # (b,)
            ddp = getattr(model, "_orig_mod", model)  # under torch.compile, the DDP module inside
            sync = a == cfg.grad_accum - 1 or not isinstance(ddp, nn.parallel.DistributedDataParallel)
            with ctx, nullcontext() if sync else ddp.no_sync():
                logits = model(xb).float()  # (b, classes)
                loss = F.cross_entropy(logits, yb, label_smoothing=cfg.label_smoothing)
                (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach() * len(yb)
            correct += (logits.argmax(1) == yb).sum()
            seen += len(yb)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if ema is not None:
            ema.update()
        if bar is not None:
            bar.update(1)
            now = time.perf_counter()
            if now - last_log > 1 or step == steps - 1:  # .item() waits for the GPU: about once a second
                last_log = now
                bar.set_postfix(
                    loss=f"{loss_sum.item() / seen:.3f}",
                    acc=f"{100 * correct.item() / seen:.1f}%",
                    img_s=f"{seen * dd.world / (now - t0):.0f}",
                    lr=f"{sched.get_last_lr()[0]:.3g}",
                )
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    loss_total, correct_total, seen_total = _all_reduce([loss_sum.item(), float(correct.item()), seen], dd, device)
    return {
        "train_loss": loss_total / seen_total,
        "train_acc": correct_total / seen_total,
        "epoch_s": elapsed,
        "img_per_s": seen_total / elapsed,
    }


def time_training(cfg: Config, device: torch.device, steps: int = 3) -> tuple[float, float]:
    """Seconds per training step of ``cfg``'s model at ``cfg.batch_size`` (``train_epoch``'s own step:
    augmentation, forward, backward, optimiser, schedule, EMA) and per ``evaluate`` batch of ``EVAL_BATCH``
    images, on random images of ``cfg.dataset``'s shape, each after a warm-up; without ``torch.compile``. It
    estimates a run's time before the run (``cfg`` with its defaults resolved, as ``resolve_defaults`` gives).

    Example:
        >>> cfg = resolve_defaults(Config(dataset="fashion-mnist", reuse=1, width=0.25, batch_size=4, epochs=1))
        >>> step_s, eval_s = time_training(cfg, torch.device("cpu"), steps=1)
        >>> step_s > 0 and eval_s > 0
        True
    """
    cfg = Config(**{**asdict(cfg), "progress": False, "grad_accum": 1})
    info, dd = DATASETS[cfg.dataset], Dist()
    ctx = autocast(cfg, device)
    torch.manual_seed(0)
    model = build_model(cfg, info.channels).to(device)
    model = model.to(memory_format=torch.channels_last) if cfg.channels_last else model
    opt = torch.optim.SGD(param_groups(model, cfg), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    sched = make_scheduler(opt, cfg, steps + 1)  # room for the warm-up step and the timed ones
    ema = WeightEMA(model, cfg.ema) if cfg.ema > 0 else None
    n = max(cfg.batch_size * steps, EVAL_BATCH)
    shape = (n, info.size, info.size, info.channels)
    x = torch.randint(0, 256, shape, dtype=torch.uint8, device=device)  # (n, H, W, C)
    y = torch.randint(0, info.num_classes, (n,), device=device)  # (n,)
    test_x, test_y = x[:EVAL_BATCH], y[:EVAL_BATCH]  # (512, H, W, C), (512,)
    warm = Data(x[: cfg.batch_size], y[: cfg.batch_size], test_x, test_y, source="random")  # one step
    timed = Data(x[: cfg.batch_size * steps], y[: cfg.batch_size * steps], test_x, test_y, source="random")
    train_epoch(model, opt, sched, warm, cfg, 0, dd, ctx, ema)
    step_s = train_epoch(model, opt, sched, timed, cfg, 1, dd, ctx, ema)["epoch_s"] / steps
    evaluate(model, test_x, test_y, ctx, dd, cfg.channels_last)  # warm-up
    t0 = time.perf_counter()
    evaluate(model, test_x, test_y, ctx, dd, cfg.channels_last)  # ends with .item(): the device has finished
    return step_s, time.perf_counter() - t0


# -------------------------------------------------------------------------------------------------------- main


def autocast(cfg: Config, device: torch.device) -> Any:
    """bf16 autocast where asked (``--bf16`` on CUDA, ``--cpu-bf16`` on a CPU), else a context that does nothing.

    Example:
        >>> autocast(Config(cpu_bf16=True), torch.device("cpu")).fast_dtype
        torch.bfloat16
        >>> type(autocast(Config(), torch.device("cpu"))).__name__
        'nullcontext'
    """
    wanted = cfg.bf16 if device.type == "cuda" else cfg.cpu_bf16
    return torch.autocast(device.type, dtype=torch.bfloat16) if wanted else nullcontext()


def pick_device(kind: str, local_rank: int = 0) -> torch.device:
    """The device of ``--device KIND`` (auto, cpu or cuda) for the process of local rank ``local_rank``: auto is
    CUDA when torch sees a GPU, else the CPU; cuda without a GPU is a ReuseError.

    Example:
        >>> pick_device("cpu")
        device(type='cpu')
    """
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ReuseError("--device cuda: torch sees no CUDA device here; use --device cpu or auto")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


@dataclass
class Run:
    """A run before it trains: its configuration, its directory and, when resumed, the checkpoint it continues."""

    cfg: Config
    out: Path
    ckpt: dict[str, Any] | None  # the last.pt to continue from (--resume), else None
    epochs_changes: list[dict[str, int]]  # each change of --epochs on a resume: after_epoch, from, to
    removed: list[str]  # stale temporary files deleted from the run directory


def _clash(name: str, value: Any, saved: Any) -> str:
    if name in BOTH_WAYS:
        return f"{flag(name, value)} (the run has {flag(name, saved)})"
    if isinstance(value, bool):  # a given boolean flag always sets the non-default, so the run has the default
        return f"{flag(name)} (the run was started without it)"
    return f"{flag(name)} {value} (the run has {saved})"


def _resume_config(cfg: Config, given: set[str], out: Path, ckpt: dict[str, Any]) -> Config:
    """The configuration of the run in ``out``, with this command line's runtime options and ``--epochs``."""
    saved, done = Config(**ckpt["config"]), ckpt["epoch"]
    clash = [
        _clash(k, getattr(cfg, k), getattr(saved, k))
        for k in sorted(given - RUNTIME_OPTIONS - {"epochs"})
        if getattr(cfg, k) != getattr(saved, k)
    ]
    if clash:
        raise ReuseError(
            f"--resume {out}: a resumed run keeps its configuration (only --epochs may change), but "
            f"{', '.join(clash)}; drop these flags, or start a new run with another --out"
        )
    epochs = cfg.epochs if "epochs" in given else saved.epochs
    if epochs < done:
        raise ReuseError(
            f"--resume {out}: --epochs {epochs} is fewer than the {done} epochs the run has done; pass --epochs "
            f"{done} or more, or leave --epochs out to keep the run's {saved.epochs}"
        )
    # Runtime options come from this command line; --data-dir from the run unless given again.
    runtime = {k: getattr(cfg, k) for k in RUNTIME_OPTIONS if k != "data_dir" or k in given}
    return Config(**{**asdict(saved), **runtime, "epochs": epochs})


def _prepare_run(cfg: Config, given: set[str], dd: Dist) -> Run:
    """The run directory, the effective config and, with ``--resume``, the checkpoint to continue from; checks
    that the directory is writable and clears the temporaries of a killed save, all before any work starts."""
    ckpt, changes = None, []
    if cfg.resume:
        if cfg.out is None:
            raise ReuseError("--resume needs --out DIR, the run directory whose last.pt to continue")
        out = Path(cfg.out)
        if not (out / "last.pt").is_file():
            raise ReuseError(f"--resume: {out / 'last.pt'} does not exist; start the run without --resume")
        ckpt = load_checkpoint(out / "last.pt")
        cfg = _resume_config(cfg, given, out, ckpt)
        changes = list(ckpt.get("epochs_changes", []))
        if cfg.epochs != ckpt["config"]["epochs"]:
            changes.append({"after_epoch": ckpt["epoch"], "from": ckpt["config"]["epochs"], "to": cfg.epochs})
    else:
        cfg = resolve_defaults(cfg)
        if cfg.out is None:
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            variant = ("" if cfg.share else "-noshare") + ("" if cfg.shuffle else "-noshuffle")
            name = f"runs/{cfg.dataset}-{cfg.reuse}-lrunet-{cfg.width:g}x{variant}-{stamp}"
            if dd.distributed:  # every process must use the directory of process 0
                box = [name]
                dist.broadcast_object_list(box, src=0)
                name = box[0]
            cfg = Config(**{**asdict(cfg), "out": name})
        out = Path(cfg.out)
        if (out / "last.pt").exists():
            raise ReuseError(
                f"--out {out} already holds a run (last.pt); pass --resume to continue it, or another --out to "
                f"start anew"
            )
    removed = []
    if dd.main:
        check_writable(out)
        removed = remove_stale_temporaries(out)
    return Run(cfg, out, ckpt, changes, removed)


def recipe_text(cfg: Config, cuda: bool) -> str:
    """The recipe's ingredients for the start line, e.g. ``recipe fast: warm-up 2 epochs, label smoothing 0.1,
    ...``."""
    parts = [
        f"recipe {cfg.recipe}: weight decay {cfg.weight_decay:g}" + ("" if cfg.decay_norm_bias else " (not on BN/bias)")
    ]
    parts += [f"warm-up {cfg.warmup_epochs:g} epochs"] if cfg.warmup_epochs else []
    parts += [f"label smoothing {cfg.label_smoothing:g}"] if cfg.label_smoothing else []
    parts += [f"EMA {cfg.ema:g}"] if cfg.ema else []
    parts += ["Nesterov"] if cfg.nesterov else []
    parts += ["channels_last"] if cfg.channels_last else []
    parts += ["bf16 autocast"] if (cuda and cfg.bf16) or (not cuda and cfg.cpu_bf16) else []
    parts += ["torch.compile"] if cfg.compile else []
    return ", ".join(parts)


class RunDiverged(ReuseError):
    """The loss of a run became NaN or infinite; the run stopped before it saved anything of that epoch."""


def _check_finite(epoch: int, cfg: Config, losses: dict[str, float | None], out: Path) -> None:
    """Stop a diverged run (a NaN or infinite loss) before it saves anything of the epoch."""
    for what, value in losses.items():
        if value is not None and not math.isfinite(value):
            kept = f"{out / 'last.pt'} still holds epoch {epoch}" if epoch else "no checkpoint was written"
            raise RunDiverged(
                f"epoch {epoch + 1}/{cfg.epochs}: the {what} loss is {value}: the run diverged; nothing of this "
                f"epoch was saved, {kept}; start a new run with a lower --lr (this one has {cfg.lr})"
            )


def _write_or_stop(path: Path, write: Callable[[Path], None], out: Path, done: int) -> None:
    """``write(path)``; a disk error (full, read-only) becomes one ReuseError that says what is kept: every file
    of the run is replaced in one rename or not at all, so ``last.pt`` still holds epoch ``done``, whole."""
    try:
        write(path)
    except OSError as err:
        kept = f"{out / 'last.pt'} still holds epoch {done}, whole" if done else "no epoch was saved yet"
        then = f"continue with --out {out} --resume" if done else "start the run again"
        raise ReuseError(f"writing {path} failed ({err.strerror or err}); {kept}; free space, then {then}") from None


def _save_epoch(
    out: Path,
    state: dict[str, Any],
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    improved: bool,
    title: str,
    ema: WeightEMA | None = None,
) -> None:
    """Write the run directory after an epoch: best.pt (when the test accuracy improved) before last.pt, so a
    kill between the two leaves a last.pt that agrees with best.pt; then metrics.jsonl and curves.png. best.pt
    holds the weights that were evaluated: the EMA's when there is one."""
    done, history = state["epoch"] - 1, state["history"]  # last.pt holds epoch `done` until it is replaced
    weights = model.state_dict()
    if improved:
        tested = weights if ema is None else ema.module.state_dict()
        best = {**state, "model": tested, "test_acc": history[-1]["test_acc"], "ema": ema is not None}
        _write_or_stop(out / "best.pt", lambda p: save_checkpoint(best, p), out, done)
    full = {**state, "model": weights, "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}
    if ema is not None:
        full["ema"] = ema.state_dict()
    _write_or_stop(out / "last.pt", lambda p: save_checkpoint(full, p), out, done)
    lines = "".join(json.dumps(h) + "\n" for h in history)
    _write_or_stop(out / "metrics.jsonl", lambda p: write_text(p, lines), out, done + 1)
    _write_or_stop(out / "curves.png", lambda p: plot_curves(history, p, title), out, done + 1)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train as configured by ``argv`` (the command line when None); return the final metrics."""
    wall0 = time.perf_counter()
    cfg, given = parse_config(argv)
    dd = setup_distributed("cuda" if pick_device(cfg.device, 0).type == "cuda" else "cpu")
    try:
        return _run(cfg, given, dd, wall0)
    finally:
        if dd.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _run(cfg: Config, given: set[str], dd: Dist, wall0: float) -> dict[str, Any]:
    run = _prepare_run(cfg, given, dd)
    cfg, out, ckpt = run.cfg, run.out, run.ckpt
    device = pick_device(cfg.device, dd.local_rank)
    cuda = device.type == "cuda"
    if cfg.batch_size % (dd.world * cfg.grad_accum):
        raise ReuseError(
            f"--batch-size {cfg.batch_size} is the global batch; it must split evenly over {dd.world} processes x "
            f"{cfg.grad_accum} micro-batches (--grad-accum)"
        )
    if cfg.sync_bn and dd.world > 1 and not cuda:
        raise ReuseError(
            "--sync-bn needs CUDA: PyTorch's SyncBatchNorm has no CPU implementation; drop --sync-bn "
            "(each process then normalises with the statistics of its share of the batch)"
        )
    log = (lambda *a: print(*a, flush=True)) if dd.main else (lambda *a: None)  # flushed: logs survive a kill

    torch.manual_seed(cfg.seed)  # the same initial weights in every process
    model = build_model(cfg, in_chans=DATASETS[cfg.dataset].channels)  # before the data: a bad --width stops here

    data = load_data(cfg)  # its channels were checked against the dataset's
    shape = (data.train_x.shape[3], data.train_x.shape[1], data.train_x.shape[2])  # (C, H, W)
    data = Data(*(t.to(device) for t in (data.train_x, data.train_y, data.test_x, data.test_y)), source=data.source)

    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ctx = autocast(cfg, device)

    model = model.to(device)
    if cfg.sync_bn and dd.world > 1:
        # Replaces every BatchNorm, the per-use copies inside the reused blocks included; shared convolutions
        # stay shared (the conversion keeps modules without BatchNorm as they are).
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    params = sum(p.numel() for p in model.parameters())  # shared weights count once
    mflops = count_mflops(model, shape, device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)  # faster on CUDA, and on CPU for LruNet (measured)
    opt = torch.optim.SGD(param_groups(model, cfg), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    ema = WeightEMA(model, cfg.ema) if cfg.ema > 0 else None  # of the initial weights; resumed below
    steps_per_epoch = math.ceil(len(data.train_y) / cfg.batch_size)
    sched = make_scheduler(opt, cfg, steps_per_epoch)

    start_epoch, best_acc, history, resumed = 0, -1.0, [], ""
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as err:
            raise ReuseError(
                f"--resume: the weights in {out / 'last.pt'} do not fit the model of its own configuration "
                f"({str(err).splitlines()[0]}); start a new run with another --out"
            ) from None
        opt.load_state_dict(ckpt["optimizer"])
        if ema is not None:
            if "ema" not in ckpt:
                raise ReuseError(f"--resume: {out / 'last.pt'} has no EMA weights, its run has --ema {cfg.ema}")
            ema.load_state_dict(ckpt["ema"])
        start_epoch, best_acc, history = ckpt["epoch"], ckpt["best_acc"], ckpt["history"]
        resumed = f" | resuming after epoch {start_epoch}"
        if cfg.epochs == ckpt["config"]["epochs"]:
            sched.load_state_dict(ckpt["scheduler"])
        else:  # --epochs changed: the schedule of the new length, from the step reached
            sched = place_scheduler(opt, cfg, steps_per_epoch, start_epoch * steps_per_epoch)
            resumed += (
                f", --epochs {ckpt['config']['epochs']} -> {cfg.epochs}: the {cfg.schedule} schedule is recomputed "
                f"for {cfg.epochs} epochs and goes on from step {start_epoch * steps_per_epoch} of "
                f"{cfg.epochs * steps_per_epoch} (lr now {sched.get_last_lr()[0]:.4g})"
            )
    train_model: nn.Module = model
    if dd.distributed:
        # Reused blocks use their weights several times per forward; autograd sums those uses before the
        # weight's gradient hook fires once, so DDP's default (static set of used parameters) reduces them right.
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if cuda else None, gradient_as_bucket_view=True
        )
    if cfg.compile:
        train_model = torch.compile(train_model)

    if dd.main:
        out.mkdir(parents=True, exist_ok=True)
        config = {**asdict(cfg), "epochs_changes": run.epochs_changes}
        _write_or_stop(
            out / "config.json", lambda p: write_text(p, json.dumps(config, indent=2) + "\n"), out, start_epoch
        )
    name = model_name(cfg)
    log(
        f"{name} on {cfg.dataset} ({data.source}: {len(data.train_y)} train, {len(data.test_y)} test images) | "
        f"{params / 1e3:.1f}k params, {mflops:.1f} MFLOPs | {device.type} x {dd.world} | batch {cfg.batch_size}, "
        f"{steps_per_epoch} steps/epoch, schedule {cfg.schedule}, lr {cfg.lr} | {recipe_text(cfg, cuda)} | "
        f"run dir {out}"
        + resumed
        + (f" | removed stale temporary files: {', '.join(run.removed)}" if run.removed else "")
    )

    for epoch in range(start_epoch, cfg.epochs):
        stats = train_epoch(train_model, opt, sched, data, cfg, epoch, dd, ctx, ema)
        test_loss = test_acc = test_acc_raw = None
        last = epoch + 1 == cfg.epochs
        if (epoch + 1) % cfg.eval_every == 0 or last:
            if dd.distributed:  # BatchNorm statistics of process 0 for everyone, as DDP's buffer broadcast does
                for b in [*model.buffers(), *(ema.module.buffers() if ema is not None else ())]:
                    dist.broadcast(b, src=0)
            tested = model if ema is None else ema.module  # the EMA is what a run with --ema delivers
            test_loss, test_acc = evaluate(tested, data.test_x, data.test_y, ctx, dd, cfg.channels_last)
            test_acc_raw = test_acc if ema is None else None
            if ema is not None and last:  # what the EMA adds, once per run
                test_acc_raw = evaluate(model, data.test_x, data.test_y, ctx, dd, cfg.channels_last)[1]
        _check_finite(epoch, cfg, {"training": stats["train_loss"], "test": test_loss}, out)
        prev_time = history[-1]["time_s"] if history else 0.0
        record = {
            "epoch": epoch + 1,
            "lr": sched.get_last_lr()[0],
            **stats,
            "test_loss": test_loss,
            "test_acc": test_acc,
            "test_acc_raw": test_acc_raw,  # the trained weights' own accuracy (with --ema: after the last epoch only)
            "time_s": prev_time + stats["epoch_s"],
            "wall_s": time.perf_counter() - wall0,  # of this session (a resumed run starts again from 0)
        }
        history.append(record)
        improved = test_acc is not None and test_acc > best_acc
        best_acc = max(best_acc, test_acc) if test_acc is not None else best_acc
        log(
            f"epoch {epoch + 1}/{cfg.epochs}  train loss {stats['train_loss']:.4f} acc {100 * stats['train_acc']:.2f}%"
            + (f"  test loss {test_loss:.4f} acc {100 * test_acc:.2f}%" if test_acc is not None else "")
            + (f" (EMA; without: {100 * test_acc_raw:.2f}%)" if ema is not None and test_acc_raw is not None else "")
            + f"  {stats['epoch_s']:.1f} s, {stats['img_per_s']:.0f} img/s"
            + f"  elapsed {record['time_s']:.0f} s training, {record['wall_s']:.0f} s wall"
        )
        if dd.main:
            state = {
                "config": asdict(cfg),
                "epoch": epoch + 1,
                "best_acc": best_acc,
                "history": history,
                "epochs_changes": run.epochs_changes,
            }
            _save_epoch(out, state, model, opt, sched, improved, f"{name} on {cfg.dataset}", ema)
        if dd.distributed:
            dist.barrier()

    last_acc = next((h["test_acc"] for h in reversed(history) if h["test_acc"] is not None), None)
    last_raw = next((h.get("test_acc_raw") for h in reversed(history) if h.get("test_acc_raw") is not None), None)
    final = {
        "model": name,
        "dataset": cfg.dataset,
        "params": params,
        "mflops": round(mflops, 2),
        "best_acc": best_acc if best_acc >= 0 else None,
        "last_acc": last_acc,
        "last_acc_raw": last_raw,  # without the EMA (the same as last_acc when there is none)
        "recipe": cfg.recipe,
        "ema": cfg.ema,
        "epochs": cfg.epochs,
        "share": cfg.share,
        "shuffle": cfg.shuffle,
        "train_images": len(data.train_y),
        "test_images": len(data.test_y),
        "train_time_s": round(history[-1]["time_s"], 1) if history else 0.0,
        "wall_s": round(time.perf_counter() - wall0, 1),
        "device": f"{device.type} x {dd.world}",
        "ddp": dd.distributed,
        "out": str(out),
    }
    if dd.main:
        text = json.dumps(final, indent=2) + "\n"
        _write_or_stop(out / "final.json", lambda p: write_text(p, text), out, cfg.epochs)
        print(json.dumps(final), flush=True)
    return final


def run_cli(prog: str, run: Callable[[], object], interrupted: str) -> None:
    """Call ``run()`` as a command line: an error the user can fix (a ``ReuseError``) prints as one line
    ``PROG: error: ...`` on stderr and exits with status 2, an ``OSError`` that no check saw coming (a folder
    removed mid-run, ...) the same way with status 1, and Ctrl-C prints ``PROG: interrupted; INTERRUPTED`` and
    exits with 130; never a traceback.

    Example:
        >>> def bad() -> None:
        ...     raise ReuseError("--epochs must be at least 1")
        >>> try:
        ...     run_cli("demo.py", bad, "run it again")  # stderr: demo.py: error: --epochs must be at least 1
        ... except SystemExit as stop:
        ...     print(stop.code)
        2
    """
    try:
        run()
    except ReuseError as err:
        print(f"{prog}: error: {' '.join(str(err).splitlines())}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        print(f"{prog}: error: {type(err).__name__}: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; {interrupted}", file=sys.stderr)
        sys.exit(130)


def cli(argv: Sequence[str] | None = None) -> None:
    """The command line: errors the user can fix print as one line on stderr and exit non-zero, never a
    traceback."""
    run_cli("lrunet_cifar.py", lambda: main(argv), "continue with --out DIR --resume")


if __name__ == "__main__":
    cli()
