"""int8 accuracy against fp32 over several calibration samples: does it depend on which images calibrate?

    python benchmarks/int8_calibration.py                       # all models, all samples -> benchmarks/results/
    python benchmarks/int8_calibration.py --models lru10 --samples first512 random512-s0
    python benchmarks/int8_calibration.py --method minmax --out /tmp/bench   # the old default, for comparison

Models (the authors' weights from ``../shared/pretrained/lrunet-official``, real test sets from ``../shared/data``):

- ``lru1``, ``lru10``: 1- and 10-LruNet-1x, Fashion-MNIST (the real test set, 10,000 images).
- ``lru14``: 14-LruNet-1x, CIFAR-10, evaluated on the JPEG-q75 copy (fine for int8 against fp32; its absolute
  accuracy is not the paper's).
- ``resnet``: a small CIFAR-style ResNet (3 stages of 3 basic blocks, 16/32/64 channels) converted with
  ``reuse.fx.convert`` (each stage's blocks after the first become one reused block with per-use BatchNorms),
  then trained on Fashion-MNIST for ``--resnet-steps`` steps (SGD, batch 128, seeded, one thread; no trained one
  exists here). The trained weights are cached in ``--out``.

Calibration samples, from each dataset's training set, pixels in [0, 1] as the models were trained, batches of 64:
``first512`` (the first 512 images; on the class-major CIFAR copy: all airplanes), ``first64``, ``random512-sK``
(seeds 0, 1, 2) and ``class0`` (512 images of class 0 only); also accepted: ``randomN-sK``, ``classA+B``.

Every sample is quantized with ``reuse.deploy.quantize_onnx`` (the options given here, else its defaults), and
the int8 file's test accuracy is compared with the fp32 file's, both in onnxruntime on one thread. ``main()``
returns the rows; the run writes ``int8_calibration.json`` and ``.md`` (machine, threads, command, time).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import reuse
from reuse.models import load_official

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
FASHION, CIFAR = SHARED / "data" / "fashion_mnist", SHARED / "data" / "cifar10_jpeg_q75_lossy"
CHECKPOINTS = {
    "lru1": ("fashionmnist-lru1-ckpt-09117.t7", FASHION),
    "lru10": ("fashionmnist-lru10-ckpt-09346.t7", FASHION),
    "lru14": ("cifar10-lru14-ckpt-08934.t7", CIFAR),
}
SAMPLES = ("first512", "first64", "random512-s0", "random512-s1", "random512-s2", "class0")


def load_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``split.npz`` as float32 images (N, C, H, W) in [0, 1] and int64 labels (N,)."""
    data = np.load(folder / f"{split}.npz")
    images = data["images"]  # (N, H, W) or (N, H, W, C), uint8
    images = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)  # (N, C, H, W)
    return np.ascontiguousarray(images, dtype=np.float32) / 255, data["labels"].astype(np.int64)


def sample(name: str, labels: np.ndarray) -> np.ndarray:
    """Indices into the training set for the calibration sample ``name``."""
    if name.startswith("first"):
        return np.arange(int(name[5:]))
    if name.startswith("random"):
        size, seed = name[6:].split("-s")
        return np.random.default_rng(int(seed)).choice(len(labels), int(size), replace=False)
    classes = [int(c) for c in name[5:].split("+")]
    per_class = 512 // len(classes)
    return np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in classes])


def small_resnet(in_chans: int = 1, classes: int = 10) -> nn.Module:
    """A CIFAR-style ResNet: 3 stages of 3 basic blocks (16, 32, 64 channels), from torchvision's block."""
    from torchvision.models.resnet import BasicBlock

    def stage(cin: int, cout: int, stride: int) -> nn.Sequential:
        down = None
        if stride != 1 or cin != cout:
            down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        return nn.Sequential(BasicBlock(cin, cout, stride, down), BasicBlock(cout, cout), BasicBlock(cout, cout))

    return nn.Sequential(
        nn.Conv2d(in_chans, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        stage(16, 16, 1),
        stage(16, 32, 2),
        stage(32, 64, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, classes),
    )


def trained_resnet(out: Path, steps: int) -> nn.Module:
    """The converted ResNet, trained on Fashion-MNIST for ``steps`` batches of 128 (cached in ``out``)."""
    model = reuse.fx.convert(small_resnet(), example_inputs=torch.randn(1, 1, 28, 28))
    cache = out / f"resnet_fmnist_{steps}steps.pt"
    if cache.is_file():
        model.load_state_dict(torch.load(cache, map_location="cpu"))
        return model.eval()
    x, y = load_split(FASHION, "train")
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        index = torch.randint(len(x), (128,), generator=generator)
        loss = nn.functional.cross_entropy(model(x[index]), y[index])  # x[index]: (128, 1, 28, 28)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    print(
        f"resnet: {steps} steps of 128 in {time.perf_counter() - start:.0f} s, last loss {loss.item():.3f}", flush=True
    )
    torch.save(model.state_dict(), cache)
    return model.eval()


def ort_accuracy(path: str, x: np.ndarray, y: np.ndarray, batch: int = 500) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    logits = np.concatenate([session.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)])
    return 100.0 * float((logits.argmax(1) == y).mean())


def run_model(name: str, samples: list[str], out: Path, options: dict, resnet_steps: int) -> list[dict]:
    if name == "resnet":
        model, folder = trained_resnet(out, resnet_steps), FASHION
    else:
        checkpoint, folder = CHECKPOINTS[name]
        model = load_official(SHARED / "pretrained" / "lrunet-official" / checkpoint)
    x_train, y_train = load_split(folder, "train")
    x_test, y_test = load_split(folder, "test")
    fp32 = reuse.deploy.export_onnx(model, out / f"{name}.onnx", torch.from_numpy(x_test[:1]), for_quantization=True)
    fp32_acc = ort_accuracy(fp32.path, x_test, y_test)
    print(f"{name}: fp32 {fp32_acc:.2f}%", flush=True)
    rows = []
    for s in samples:
        images = x_train[sample(s, y_train)]  # (n, C, H, W)
        start = time.perf_counter()
        report = reuse.deploy.quantize_onnx(
            fp32.path, out / f"{name}.{s}.int8.onnx", [images[i : i + 64] for i in range(0, len(images), 64)], **options
        )
        seconds = time.perf_counter() - start
        acc = ort_accuracy(report.path, x_test, y_test)
        settled = [c for c in report.coverage if c.stable is not None]
        worst = min(settled, key=lambda c: c.stable) if settled else None
        rows.append(
            {
                "model": name,
                "sample": s,
                "images": len(images),
                "fp32 %": fp32_acc,
                "int8 %": acc,
                "drop": fp32_acc - acc,
                "quantize s": seconds,
                "warnings": len(getattr(report, "warnings", [])),
                "centred": next((n.split(":")[1].split("(")[0].strip() for n in report.notes if "kept" in n), ""),
                "least stable group": None if worst is None else f"{worst.group}: {worst.stable:.2f}",
            }
        )
        print(f"  {s}: int8 {acc:.2f}% (drop {fp32_acc - acc:+.2f}), {seconds:.0f} s", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| model | sample | images | fp32 % | int8 % | drop (points) | center='auto' | warnings |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['sample']} | {r['images']} | {r['fp32 %']:.2f} | {r['int8 %']:.2f} "
            f"| {r['drop']:+.2f} | {r['centred']} | {r['warnings']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["lru1", "lru10", "lru14", "resnet"])
    parser.add_argument("--samples", nargs="+", default=list(SAMPLES))
    parser.add_argument("--method", help="quantize_onnx's method (default: its own)")
    parser.add_argument("--percentile", type=float, help="quantize_onnx's percentile (default: its own)")
    parser.add_argument("--out", type=Path, default=Path("int8_calibration_out"), help="where the files go")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results", help="where json/md go")
    parser.add_argument("--resnet-steps", type=int, default=300, help="training steps of the ResNet")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    options = {"method": args.method} if args.method else {}
    if args.percentile is not None:
        options["percentile"] = args.percentile
    start = time.time()
    rows = []
    for name in args.models:
        rows += run_model(name, args.samples, args.out, options, args.resnet_steps)
    worst = max(r["drop"] for r in rows)
    meta = {
        "command": "python " + " ".join(["benchmarks/int8_calibration.py", *(argv if argv is not None else [])]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores ({platform.processor() or platform.platform()})",
        "threads": 1,
        "torch": torch.__version__,
        "onnxruntime": __import__("onnxruntime").__version__,
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(start)),
        "minutes": (time.time() - start) / 60,
        "options": options,
        "worst drop": worst,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "int8_calibration.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    header = "\n".join(f"- {k}: {v if not isinstance(v, float) else round(v, 2)}" for k, v in meta.items())
    text = f"# int8 against fp32 over calibration samples\n\n{header}\n\n{table(rows)}\n"
    (args.results / "int8_calibration.md").write_text(text)
    print(text)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
