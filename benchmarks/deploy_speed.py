"""Deployment paths of 14-LruNet-1x against the paper's implementation, side by side in one run.

    python benchmarks/deploy_speed.py                          # writes benchmarks/results/deploy_speed.{json,md}
    python benchmarks/deploy_speed.py --no-compile --rounds 3  # quicker
    python benchmarks/deploy_speed.py --n 8 --out /tmp/bench

Models (N-LruNet-1x, CIFAR input 3x32x32, 10 classes, BatchNorms randomized as if trained), one set of weights:

- ``naive``: the paper's implementation (``paper_lrunet.NaiveLruNet``), eager, NCHW: the reference of the ratios.
- ``eager``: ``reuse.models.LruNet`` as it comes (channels_last input).
- ``optimized (folded)``: ``reuse.optimize_for_inference(model)``: one folded conv per use (7.4x the parameters).
- ``optimized (shared)``: ``reuse.optimize_for_inference(model, share_weights=True)``: one conv per shared weight,
  each use's BatchNorm a per-use channel scale and shift.
- ``compiled (folded)`` / ``compiled (shared)``: those two under ``torch.compile`` with inductor's freezing.
- ``onnxruntime fp32 (folded)``: torch's TorchScript ONNX export of the folded model (what one got before).
- ``onnxruntime fp32 (for_quantization)``: ``reuse.deploy.export_onnx(..., for_quantization=True)``: every
  shared weight stored once, the blocks as they are (the file ``quantize_onnx`` reads).
- ``onnxruntime fp32``: ``reuse.deploy.export_onnx``: the same, each LRU block in its fp32 export form (split by
  the parity of its depthwise channels: no strided slice, half the gather).
- ``onnxruntime int8``: ``reuse.deploy.quantize_onnx`` of the ``for_quantization`` file, calibrated on random
  inputs (for timing and size only; accuracy: examples/deploy_lrunet.py on real data).
- ``executorch (xnnpack)``: ``reuse.deploy.export_pte``, when ExecuTorch is installed.

Timing: batch-1 latency (ms) and batch-256 throughput (img/s). The paths take turns in every round, a block of
calls each after a warm-up call, with a pause between blocks (thread pools that spin after a call go idle), and
each figure is the median of all its timed calls. Outputs of every fp32 path are checked against ``naive``
first. The file sizes are those of the artifacts (``.onnx``, ``.pte``), or the float32 parameters of a torch
module; ``x params`` divides by the model's own float32 parameter bytes.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from deploy_lrunet import race  # noqa: E402  (one timing loop for the example and the benchmark)
from lrunet_speed import machine, randomized  # noqa: E402
from paper_lrunet import naive_from  # noqa: E402

import reuse  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def torch_fn(model: nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        with torch.inference_mode():
            return model(x)

    return run


def ort_fn(path: Path, x: torch.Tensor) -> Callable[[], np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    return lambda: session.run(None, feed)[0]


def pte_fn(path: Path, x: torch.Tensor) -> Callable[[], object]:
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(path.read_bytes()).load_method("forward")
    return lambda: method.execute([x])


def export_folded(model: nn.Module, path: Path) -> int:
    """torch.onnx.export (TorchScript) of the folded model, dynamic batch: the path one had before."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.randn(1, 3, 32, 32),),
            buffer,
            dynamo=False,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        )
    path.write_bytes(buffer.getvalue())
    return len(buffer.getvalue())


def compiled(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, float]:
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    fast = torch.compile(model, dynamic=False)
    start = time.perf_counter()
    torch_fn(fast, x)()
    return fast, time.perf_counter() - start


def build(n: int, folder: Path, compile_: bool) -> tuple[dict, dict, dict, dict]:
    """The paths: {name: (size bytes, {batch: fn})}, and the checks."""
    model = randomized(n).eval()
    params = 4 * sum(p.numel() for p in model.parameters())
    naive = naive_from(model).eval()
    folded = reuse.optimize_for_inference(model)
    shared = reuse.optimize_for_inference(model, share_weights=True)
    x = {b: torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(b)) for b in (1, 256)}
    xc = {b: t.contiguous(memory_format=torch.channels_last) for b, t in x.items()}

    sizes: dict[str, int] = {}
    fp32 = reuse.deploy.export_onnx(model, folder / "lrunet.onnx", x[1])
    fp32_b256 = reuse.deploy.export_onnx(model, folder / "lrunet_b256.onnx", x[256][:256])
    blocks = reuse.deploy.export_onnx(model, folder / "lrunet.blocks.onnx", x[1], for_quantization=True)
    calibration = [torch.rand(32, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    int8 = reuse.deploy.quantize_onnx(blocks.path, folder / "lrunet.int8.onnx", calibration)
    sizes["onnxruntime fp32 (folded)"] = export_folded(folded, folder / "folded.onnx")
    checks = {
        "fp32 file, example batch 1 / 256 (bytes)": [fp32.file_bytes, fp32_b256.file_bytes],
        "fp32 check": fp32.check + f": max |difference| {fp32.max_abs_diff:.1e}",
        "int8 check": int8.check + f": top-1 agreement {int8.agreement}",
    }

    fns: dict[str, dict[int, Callable[[], object]]] = {
        "naive": {b: torch_fn(naive, x[b]) for b in x},
        "eager": {b: torch_fn(model, xc[b]) for b in x},
        "optimized (folded)": {b: torch_fn(folded, xc[b]) for b in x},
        "optimized (shared)": {b: torch_fn(shared, xc[b]) for b in x},
    }
    sizes.update(
        {
            "naive": params,
            "eager": params,
            "optimized (folded)": 4 * sum(p.numel() for p in folded.parameters()),
            "optimized (shared)": 4 * sum(p.numel() for p in shared.parameters()),
        }
    )
    compile_s = {}
    if compile_:
        for name, module in (("folded", folded), ("shared", shared)):
            made = {b: compiled(copy.deepcopy(module), xc[b]) for b in x}
            fns[f"compiled ({name})"] = {b: torch_fn(m, xc[b]) for b, (m, _) in made.items()}
            compile_s[name] = {b: round(s, 1) for b, (_, s) in made.items()}
            sizes[f"compiled ({name})"] = sizes[f"optimized ({name})"]
    fns["onnxruntime fp32 (folded)"] = {b: ort_fn(folder / "folded.onnx", x[b]) for b in x}
    fns["onnxruntime fp32 (for_quantization)"] = {b: ort_fn(folder / "lrunet.blocks.onnx", x[b]) for b in x}
    fns["onnxruntime fp32"] = {b: ort_fn(folder / "lrunet.onnx", x[b]) for b in x}
    fns["onnxruntime int8"] = {b: ort_fn(folder / "lrunet.int8.onnx", x[b]) for b in x}
    sizes["onnxruntime fp32"], sizes["onnxruntime int8"] = fp32.file_bytes, int8.file_bytes
    sizes["onnxruntime fp32 (for_quantization)"] = blocks.file_bytes
    try:
        pte = {b: reuse.deploy.export_pte(model, folder / f"lrunet_b{b}.pte", x[b]) for b in x}
        fns["executorch (xnnpack)"] = {b: pte_fn(Path(pte[b].path), x[b]) for b in x}
        sizes["executorch (xnnpack)"] = pte[1].file_bytes
    except reuse.ReuseError as err:
        checks["executorch"] = str(err)

    # outputs of every fp32 path against the paper's code, at batch 1 and 256
    diffs = {}
    for name, by_batch in fns.items():
        if "int8" in name or name == "naive":
            continue
        worst = 0.0
        for b in x:
            ref = fns["naive"][b]()
            out = by_batch[b]()
            out = out[0] if isinstance(out, (list, tuple)) else out
            worst = max(worst, float(np.abs(np.asarray(torch.as_tensor(out).float()) - ref.float().numpy()).max()))
        diffs[name] = worst
    if max(diffs.values()) > 1e-3:
        raise SystemExit(f"the paths disagree with the paper's code: {diffs}; not timing")
    checks["max |difference| against naive"] = diffs
    checks["compile_s"] = compile_s
    return fns, sizes, checks, {"params_bytes": params, "n": n}


def table(rows: list[dict]) -> str:
    lines = [
        "| path | size (bytes) | x params | batch-1 ms | x naive | batch-256 img/s | x naive |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['path']} | {r['bytes']:,} | {r['x params']:.2f} | {r['batch-1 ms']:.2f} | "
            f"{r['latency x naive']:.1f}x | {r['batch-256 img/s']:.0f} | {r['throughput x naive']:.1f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=14, help="uses of each block (N-LruNet-1x)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of turns (median over all calls)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (about 1 min a graph)")
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="threads for torch and onnxruntime alike"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for deploy_speed.json and .md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine()
    print("machine:", json.dumps(info), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        fns, sizes, checks, meta = build(args.n, Path(tmp), not args.no_compile)
        print("checks:", json.dumps(checks), flush=True)
        latency = race({k: v[1] for k, v in fns.items()}, args.rounds, 20)
        throughput = race({k: v[256] for k, v in fns.items()}, args.rounds, 2)
    info["load_avg_after"] = [round(v, 2) for v in os.getloadavg()]
    rows = [
        {
            "path": name,
            "bytes": sizes[name],
            "x params": sizes[name] / meta["params_bytes"],
            "batch-1 ms": 1e3 * latency[name],
            "latency x naive": latency["naive"] / latency[name],
            "batch-256 img/s": 256 / throughput[name],
            "throughput x naive": throughput["naive"] / throughput[name],
        }
        for name in fns
    ]
    text = table(rows)
    head = (
        f"{meta['n']}-LruNet-1x, {info['cpu']}, {info['torch_threads']} threads, torch {info['torch']}, "
        f"load average before {info['load_avg_1_5_15']}, after {info['load_avg_after']}, {info['date']}"
    )
    report = {"machine": info, "model": f"{meta['n']}-LruNet-1x", "rows": rows, "checks": checks}
    args.out.mkdir(parents=True, exist_ok=True)
    for suffix, content in (("json", json.dumps(report, indent=1)), ("md", f"{head}\n\n{text}\n")):
        target = args.out / f"deploy_speed.{suffix}"
        fd, tmp = tempfile.mkstemp(dir=args.out, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(content)
        os.replace(tmp, target)
    print(head)
    print(text)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
