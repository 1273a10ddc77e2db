#!/usr/bin/env python
"""Fill ``.gpudata/`` with the data that ``benchmarks/gpu_check.sh`` reads on a GPU machine without the shared
folder or a network:

- ``.gpudata/fashion_mnist/{train,test}.npz``: the full Fashion-MNIST (60,000 / 10,000), copied byte for byte;
- ``.gpudata/cifar10_subset/{train,test}.npz``: a class-balanced subset of the CIFAR-10 JPEG copy (quality 75,
  lossy), by default 7,000 training and 3,000 test images, the same per class, picked by a seeded shuffle of
  each class, in a fixed shuffled order; the same format (``images`` uint8 N x 32 x 32 x 3, ``labels`` int64);
- ``.gpudata/MANIFEST.json``: what each file is, its image count and sha256.

    python benchmarks/pack_gpu_data.py                       # from ../shared/data beside the repository
    python benchmarks/pack_gpu_data.py --cifar-train 6000 --cifar-test 2000 --shared /path/to/shared/data

It stops with one line when the total would pass ``--max-mib`` (60 MiB: the device machine takes 64 MiB of
ignored files in all), or when a count is not a multiple of 10 or more than the copy holds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
CLASSES = 10


class PackError(Exception):
    """A problem the user can fix: printed as one line."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def balanced_subset(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Indices of ``count // 10`` images of each class, picked by a seeded shuffle of each class, then shuffled
    together (the copy is class-major; a subset in that order would start with one class only).

    Example:
        >>> idx = balanced_subset(np.repeat(np.arange(10), 5), 20, seed=0)
        >>> np.bincount(np.repeat(np.arange(10), 5)[idx]).tolist()
        [2, 2, 2, 2, 2, 2, 2, 2, 2, 2]
    """
    if count % CLASSES:
        raise PackError(f"{count} images cannot be split evenly over {CLASSES} classes; pass a multiple of 10")
    rng = np.random.default_rng(seed)
    per_class = count // CLASSES
    picked = []
    for c in range(CLASSES):
        members = np.flatnonzero(labels == c)
        if len(members) < per_class:
            raise PackError(f"class {c} has {len(members)} images, fewer than the {per_class} asked for")
        picked.append(rng.permutation(members)[:per_class])
    return rng.permutation(np.concatenate(picked))


def pack(shared: Path, dest: Path, cifar_train: int, cifar_test: int, max_mib: float) -> dict[str, dict]:
    """Write ``dest``; return the manifest."""
    fashion, cifar = shared / "fashion_mnist", shared / "cifar10_jpeg_q75_lossy"
    for folder in (fashion, cifar):
        for split in ("train", "test"):
            if not (folder / f"{split}.npz").is_file():
                raise PackError(f"{folder / (split + '.npz')} does not exist; pass --shared DIR (the shared data)")
    (dest / "fashion_mnist").mkdir(parents=True, exist_ok=True)
    (dest / "cifar10_subset").mkdir(parents=True, exist_ok=True)
    manifest: dict[str, dict] = {}
    for split in ("train", "test"):
        target = dest / "fashion_mnist" / f"{split}.npz"
        shutil.copyfile(fashion / f"{split}.npz", target)
        with np.load(target, allow_pickle=False) as d:
            n = len(d["labels"])
        manifest[f"fashion_mnist/{split}.npz"] = {"source": str(fashion / f"{split}.npz"), "images": n}
    for split, count, seed in (("train", cifar_train, 0), ("test", cifar_test, 1)):
        with np.load(cifar / f"{split}.npz", allow_pickle=False) as d:
            images, labels = d["images"], d["labels"]
        idx = balanced_subset(labels, count, seed)
        target = dest / "cifar10_subset" / f"{split}.npz"
        np.savez_compressed(target, images=images[idx], labels=labels[idx].astype(np.int64))
        manifest[f"cifar10_subset/{split}.npz"] = {
            "source": f"{cifar / (split + '.npz')}: {count // CLASSES} per class, seeded shuffle (seed {seed})",
            "images": count,
        }
    total = 0
    for name, entry in manifest.items():
        size = (dest / name).stat().st_size
        total += size
        entry |= {"bytes": size, "sha256": _sha256(dest / name)}
    if total > max_mib * 2**20:
        for name in manifest:  # not left behind, to be carried by mistake
            (dest / name).unlink()
        (dest / "MANIFEST.json").unlink(missing_ok=True)
        raise PackError(
            f"{dest} holds {total / 2**20:.1f} MiB, more than --max-mib {max_mib:g}; pass smaller --cifar-train / "
            f"--cifar-test (each CIFAR image takes about 2.8 kB)"
        )
    (dest / "MANIFEST.json").write_text(json.dumps({"total_bytes": total, "files": manifest}, indent=2) + "\n")
    return manifest


def main(argv: Sequence[str] | None = None) -> dict[str, dict]:
    p = argparse.ArgumentParser(prog="pack_gpu_data.py", description="Fill .gpudata/ for benchmarks/gpu_check.sh.")
    p.add_argument("--shared", type=Path, default=SHARED, help="the shared data folder (default: %(default)s)")
    p.add_argument("--dest", type=Path, default=ROOT / ".gpudata", help="default: %(default)s")
    p.add_argument("--cifar-train", type=int, default=7000, help="CIFAR-10 training images (default: %(default)s)")
    p.add_argument("--cifar-test", type=int, default=3000, help="CIFAR-10 test images (default: %(default)s)")
    p.add_argument("--max-mib", type=float, default=60.0, help="the most it may hold (default: %(default)s)")
    args = p.parse_args(argv)
    manifest = pack(args.shared, args.dest, args.cifar_train, args.cifar_test, args.max_mib)
    total = sum(e["bytes"] for e in manifest.values())
    for name, entry in manifest.items():
        print(f"{args.dest / name}: {entry['images']} images, {entry['bytes'] / 2**20:.1f} MiB")
    print(f"total {total / 2**20:.1f} MiB in {args.dest}")
    return manifest


if __name__ == "__main__":
    try:
        main()
    except PackError as err:
        print(f"pack_gpu_data.py: error: {err}", file=sys.stderr)
        sys.exit(2)
