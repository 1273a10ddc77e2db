"""Deploy the authors' Fashion-MNIST LruNets: ONNX fp32 and int8 files that keep the reuse, measured.

    python examples/deploy_lrunet.py                                  # both released checkpoints, ../shared
    python examples/deploy_lrunet.py --checkpoint path/to/fashionmnist-lru10-ckpt-09346.t7 --data-dir DIR
    python examples/deploy_lrunet.py --no-compile --out /tmp/deploy   # skip torch.compile (about 1 min a shape)
    python examples/deploy_lrunet.py --weight-bits 7                  # int8 for an x86 CPU without VNNI

For each checkpoint: export with ``reuse.deploy.export_onnx`` (every shared weight stored once; each LRU use in
its fp32 form), export again with ``for_quantization=True`` and quantize that file to int8 with
``reuse.deploy.quantize_onnx`` calibrated on 512 training images, evaluate every path on the real
Fashion-MNIST test set (10,000 images) and time it. ``--data-dir`` holds ``train.npz`` and ``test.npz``
(``images`` uint8 N x 28 x 28, ``labels``), as in ``../shared/data/fashion_mnist``. Inputs are pixels in [0, 1],
as the authors trained. Needs ``pip install -e ".[deploy]"``.

Paths: ``eager`` (the library's LruNet), ``optimized`` (``reuse.optimize_for_inference``, one folded conv per
use), ``compiled`` (that, under ``torch.compile`` with inductor's freezing), ``onnxruntime fp32`` and
``onnxruntime int8``. Size: the file for the ONNX paths, the float32 parameters for the torch ones. Timing:
the paths take turns, a block of calls each, median of all calls; on a loaded machine read the ratios only.
``main()`` returns the table's rows.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

import reuse
from reuse.models import load_official

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CHECKPOINTS = ("fashionmnist-lru1-ckpt-09117.t7", "fashionmnist-lru10-ckpt-09346.t7")


def load_split(data_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``split.npz`` as float32 images (N, 1, 28, 28) in [0, 1] and int64 labels (N,)."""
    path = data_dir / f"{split}.npz"
    if not path.is_file():
        raise SystemExit(f"no {path}; pass --data-dir with Fashion-MNIST's train.npz and test.npz")
    data = np.load(path)
    return (data["images"][:, None].astype(np.float32) / 255), data["labels"].astype(np.int64)


def torch_predict(model: nn.Module, batch: int) -> Callable[[np.ndarray], np.ndarray]:
    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = model(torch.from_numpy(x).contiguous(memory_format=torch.channels_last))  # (B, 10)
        return out.float().numpy()

    return padded(run, batch) if batch else run


def padded(run: Callable[[np.ndarray], np.ndarray], batch: int) -> Callable[[np.ndarray], np.ndarray]:
    """Feed a compiled model (one static shape) a short last batch padded to ``batch``."""

    def fixed(x: np.ndarray) -> np.ndarray:
        if len(x) == batch:
            return run(x)
        pad = np.zeros((batch - len(x), *x.shape[1:]), dtype=x.dtype)
        return run(np.concatenate([x, pad]))[: len(x)]

    return fixed


def ort_predict(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def accuracy(predict: Callable[[np.ndarray], np.ndarray], x: np.ndarray, y: np.ndarray, batch: int = 256) -> float:
    logits = np.concatenate([predict(x[i : i + batch]) for i in range(0, len(x), batch)])
    return 100.0 * float((logits.argmax(1) == y).mean())


def race(fns: dict[str, Callable[[], object]], rounds: int, calls: int) -> dict[str, float]:
    """Median seconds per call: the functions take turns, ``calls`` timed calls each per round, after a warm-up
    call, with a pause between turns (thread pools that spin after a call go idle before the next path)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            fn()
            for _ in range(calls):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
            time.sleep(0.05)
    return {name: statistics.median(t) for name, t in times.items()}


def deploy_one(
    checkpoint: Path, data_dir: Path, out: Path, compile_: bool, rounds: int, reduce_range: bool | str = "auto"
) -> list[dict]:
    model = load_official(checkpoint).eval()
    x_train, _ = load_split(data_dir, "train")
    x_test, y_test = load_split(data_dir, "test")
    calibration = x_train[np.random.default_rng(0).choice(len(x_train), 512, replace=False)]  # (512, 1, 28, 28)
    stem = checkpoint.stem
    fp32 = reuse.deploy.export_onnx(model, out / f"{stem}.onnx", torch.from_numpy(x_test[:1]))
    to_quantize = reuse.deploy.export_onnx(
        model, out / f"{stem}.for-int8.onnx", torch.from_numpy(x_test[:1]), for_quantization=True
    )
    batches = [calibration[i : i + 64] for i in range(0, 512, 64)]
    int8 = reuse.deploy.quantize_onnx(
        to_quantize.path, out / f"{stem}.int8.onnx", batches, input_range=(0, 1), reduce_range=reduce_range
    )
    print(fp32, int8, sep="\n", flush=True)

    params = 4 * sum(p.numel() for p in model.parameters())
    optimized = reuse.optimize_for_inference(model)
    paths: dict[str, tuple[int, dict[int, Callable[[np.ndarray], np.ndarray]]]] = {
        "eager": (params, {0: torch_predict(model, 0)}),
        "optimized": (4 * sum(p.numel() for p in optimized.parameters()), {0: torch_predict(optimized, 0)}),
    }
    if compile_:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        compiled = {b: torch.compile(optimized, dynamic=False) for b in (1, 256)}  # one graph per batch size
        paths["compiled"] = (paths["optimized"][0], {b: torch_predict(c, b) for b, c in compiled.items()})
    paths["onnxruntime fp32"] = (fp32.file_bytes, {0: ort_predict(Path(fp32.path))})
    paths["onnxruntime int8"] = (int8.file_bytes, {0: ort_predict(Path(int8.path))})

    def at(name: str, batch: int) -> Callable[[np.ndarray], np.ndarray]:
        fns = paths[name][1]
        return fns.get(batch, fns.get(0))  # type: ignore[return-value]

    one, big = x_test[:1], x_test[:256]
    latency = race({n: functools.partial(at(n, 1), one) for n in paths}, rounds, 20)
    throughput = race({n: functools.partial(at(n, 256), big) for n in paths}, rounds, 2)
    rows = []
    for name, (size, _) in paths.items():
        acc = accuracy(at(name, 256), x_test, y_test)
        rows.append(
            {
                "model": f"{model.reuse}-LruNet-1x",
                "path": name,
                "bytes": size,
                "x params": size / params,
                "batch-1 ms": 1e3 * latency[name],
                "batch-256 img/s": 256 / throughput[name],
                "accuracy %": acc,
            }
        )
        print(f"  {name}: {acc:.2f}%", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| model | path | size (bytes) | x fp32 params | batch-1 (ms) | batch-256 (img/s) | test accuracy (%) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['path']} | {r['bytes']:,} | {r['x params']:.2f} | {r['batch-1 ms']:.2f} "
            f"| {r['batch-256 img/s']:.0f} | {r['accuracy %']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, nargs="+", help="the authors' .t7 files (default: both, ../shared)")
    parser.add_argument("--data-dir", type=Path, default=SHARED / "data" / "fashion_mnist")
    parser.add_argument("--out", type=Path, default=Path("deploy_out"), help="where the .onnx files go")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="threads for torch and onnxruntime alike"
    )
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds (median over all calls)")
    parser.add_argument(
        "--weight-bits",
        choices=("auto", "7", "8"),
        default="auto",
        help="int8 weights of 7 bits (for x86 CPUs without VNNI, where 8 saturate onnxruntime's kernels) or 8; "
        "auto: 7 on such a CPU (default)",
    )
    args = parser.parse_args(argv)
    reduce_range = {"auto": "auto", "7": True, "8": False}[args.weight_bits]
    torch.set_num_threads(args.threads)
    checkpoints = args.checkpoint or [SHARED / "pretrained" / "lrunet-official" / c for c in CHECKPOINTS]
    for c in checkpoints:
        if not c.is_file():
            raise SystemExit(f"no checkpoint {c}; pass --checkpoint with one of the authors' Fashion-MNIST files")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for c in checkpoints:
        rows += deploy_one(c, args.data_dir, args.out, not args.no_compile, args.rounds, reduce_range)
    print(f"\n{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(table(rows))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
