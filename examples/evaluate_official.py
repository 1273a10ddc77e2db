"""Evaluate one of the authors' released LruNet checkpoints and print its accuracy beside the reported one.

    python examples/evaluate_official.py \\
        --checkpoint ../shared/pretrained/lrunet-official/fashionmnist-lru10-ckpt-09346.t7 \\
        --data-dir ../shared/data/fashion_mnist

``--data-dir`` holds either ``test.npz`` (``images`` uint8 N x H x W or N x H x W x C, ``labels``), or
torchvision's copy of the test set (FashionMNIST / CIFAR10 / CIFAR100, picked from the checkpoint's input
channels and classes); ``--download`` lets torchvision fetch it (needs the internet).

The authors fed ``ToTensor()`` output: pixels in [0, 1], no mean/std normalisation. So does this script.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from reuse.models import load_official, read_official


def load_npz(path: Path) -> tuple[Tensor, Tensor]:
    """``test.npz`` as uint8 images (N, C, H, W) and int64 labels (N,)."""
    data = np.load(path)
    images = torch.from_numpy(data["images"])  # (N, H, W) or (N, H, W, C), uint8
    images = images.unsqueeze(1) if images.dim() == 3 else images.permute(0, 3, 1, 2)  # (N, C, H, W)
    return images.contiguous(), torch.from_numpy(data["labels"]).long()


def load_torchvision(root: Path, in_chans: int, num_classes: int, download: bool) -> tuple[Tensor, Tensor]:
    """The original test set through torchvision: Fashion-MNIST (1 channel), CIFAR-100 (100 classes) or CIFAR-10."""
    import torchvision

    if in_chans == 1:
        cls = torchvision.datasets.FashionMNIST
    else:
        cls = torchvision.datasets.CIFAR100 if num_classes == 100 else torchvision.datasets.CIFAR10
    try:
        ds = cls(root=str(root), train=False, download=download)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
        raise SystemExit(
            f"no test.npz in {root} and no torchvision {cls.__name__} test set there ({err}); "
            "pass --download to fetch it (needs the internet), or point --data-dir at a folder with test.npz"
        ) from None
    except OSError as err:  # no network
        raise SystemExit(f"could not download {cls.__name__} into {root}: {err}; offline? use a test.npz") from None
    images = torch.as_tensor(np.asarray(ds.data))  # (N, H, W) uint8 or (N, H, W, C) uint8
    images = images.unsqueeze(1) if images.dim() == 3 else images.permute(0, 3, 1, 2)  # (N, C, H, W)
    return images.contiguous(), torch.as_tensor(np.asarray(ds.targets)).long()


@torch.inference_mode()
def accuracy(model: torch.nn.Module, images: Tensor, labels: Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy (%) of ``model`` on uint8 ``images`` (N, C, H, W) scaled to [0, 1]."""
    device = next(model.parameters()).device
    channels_last = device.type == "cpu"  # about 1.5x faster on CPU for this network, same result
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    correct = 0
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].to(device).float().div_(255)  # (B, C, H, W) in [0, 1]
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        correct += (model(x).argmax(1).cpu() == labels[i : i + batch_size]).sum().item()
    return 100.0 * correct / len(images)


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="one of the authors' .t7 files")
    parser.add_argument("--data-dir", type=Path, required=True, help="folder with test.npz or torchvision's copy")
    parser.add_argument("--download", action="store_true", help="let torchvision download the test set")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--limit", type=int, default=0, help="evaluate the first N images only (0: all)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    reported = read_official(args.checkpoint).acc
    model = load_official(args.checkpoint).to(args.device)
    npz = args.data_dir / "test.npz"
    if npz.is_file():
        images, labels = load_npz(npz)
        source = str(npz)
    else:
        images, labels = load_torchvision(args.data_dir, model.in_chans, model.num_classes, args.download)
        source = f"torchvision test set in {args.data_dir}"
    if images.shape[1] != model.in_chans:
        raise SystemExit(
            f"{source} has {images.shape[1]}-channel images; {args.checkpoint.name} takes {model.in_chans}"
        )
    if args.limit:
        images, labels = images[: args.limit], labels[: args.limit]

    shown = f"{reported:.2f}%" if reported is not None else "n/a"
    start = time.perf_counter()
    acc = accuracy(model, images, labels, args.batch_size)
    seconds = time.perf_counter() - start
    print(
        f"{args.checkpoint.name}: {model.reuse}-LruNet-{model.width_mult:g}x, {len(labels)} images from {source}\n"
        f"  measured {acc:.2f}%   reported {shown}"
        + (f"   difference {acc - reported:+.2f} points" if reported is not None else "")
        + f"   ({seconds:.1f} s on {args.device}, {torch.get_num_threads()} threads)"
    )
    return acc


if __name__ == "__main__":
    main(sys.argv[1:])
