"""Cold ``torch.compile`` time of N-LruNet with and without ``compile_regions``, and the compiled models' speed.

    python benchmarks/compile_time.py                    # 14-LruNet-1x, optimized for inference, inductor
    python benchmarks/compile_time.py --n 8 --threads 1 --out /tmp/ct

Each compile is timed in a fresh process with inductor's caches off (``TORCHINDUCTOR_FORCE_DISABLE_CACHES=1``):
the time of the first call, which traces, compiles and runs, and the child's CPU time; the child also compares
the output with eager. Then one process compiles both variants and times them side by side (the two take turns;
median of the calls) at batch 1 and at batch 256. Writes ``compile_time.{json,md}`` to ``--out`` (default
benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import reuse  # noqa: E402
from reuse.models import LruNet  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {"inlined uses": False, "compile_regions": True}


def model(n: int, regions: bool) -> torch.nn.Module:
    """N-LruNet-1x with seeded weights, folded for inference; each stage a region when asked."""
    torch.manual_seed(0)
    lib = LruNet(num_classes=10, reuse=n).eval()
    fast = reuse.optimize_for_inference(lib)
    for stage in fast.stages:
        stage.compile_regions = regions
    return fast


def child(n: int, regions: bool, batch: int) -> dict[str, object]:
    """In a fresh process: cold compile time, kernel count, largest difference from eager."""
    m = model(n, regions)
    x = torch.randn(batch, 3, 32, 32)
    with torch.inference_mode():
        expected = m(x)
        start = time.perf_counter()
        out = torch.compile(m, dynamic=False)(x)
        seconds = time.perf_counter() - start
    cpu = time.process_time()
    return {
        "compile_s": seconds,
        "process_cpu_s": cpu,
        "max_abs_diff": (out - expected).abs().max().item(),
    }


def cold(n: int, regions: bool, batch: int, threads: int) -> dict[str, object]:
    env = {**os.environ, "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1", "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, __file__, "--child", f"{n},{int(regions)},{batch}", "--threads", str(threads)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"compile_time: the child for compile_regions={regions} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def steady(n: int, reps: int) -> dict[str, dict[int, float]]:
    """Both variants compiled in this process, then timed in turn: seconds per call, median."""
    out: dict[str, dict[int, float]] = {name: {} for name in VARIANTS}
    for batch, calls in ((1, 20), (256, 1)):
        x = torch.randn(batch, 3, 32, 32)
        fns = {}
        with torch.inference_mode():
            for name, regions in VARIANTS.items():
                fns[name] = torch.compile(model(n, regions), dynamic=False)
                fns[name](x)
            times: dict[str, list[float]] = {name: [] for name in VARIANTS}
            for _ in range(reps):
                for name, fn in fns.items():
                    start = time.perf_counter()
                    for _ in range(calls):
                        fn(x)
                    times[name].append((time.perf_counter() - start) / calls)
        for name in VARIANTS:
            out[name][batch] = statistics.median(times[name])
    return out


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=14, help="uses of each block (N-LruNet-1x)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--reps", type=int, default=7, help="timed rounds of the compiled models (median)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        n, regions, batch = (int(v) for v in args.child.split(","))
        print(json.dumps(child(n, bool(regions), batch)))
        return {}
    info = {
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "torch": torch.__version__,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_avg_before": [round(v, 2) for v in os.getloadavg()],
        "command": "python benchmarks/compile_time.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    colds = {name: cold(args.n, regions, 1, args.threads) for name, regions in VARIANTS.items()}
    print("cold:", json.dumps(colds), flush=True)
    speed = steady(args.n, args.reps)
    info["load_avg_after"] = [round(v, 2) for v in os.getloadavg()]
    lines = [
        "| variant | cold compile s (batch 1) | child CPU s | max abs diff vs eager | batch-1 ms | batch-256 img/s |",
        "|---|---|---|---|---|---|",
    ]
    for name in VARIANTS:
        c = colds[name]
        lines.append(
            f"| {name} | {c['compile_s']:.1f} | {c['process_cpu_s']:.1f} | {c['max_abs_diff']:.1e} | "
            f"{1e3 * speed[name][1]:.2f} | {256 / speed[name][256]:.0f} |"
        )
    head = (
        f"{args.n}-LruNet-1x, optimize_for_inference, inductor (no freezing: regions are inlined under it); "
        + json.dumps(info)
    )
    text = head + "\n\n" + "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    for suffix, content in (
        ("json", json.dumps({"machine": info, "cold": colds, "steady_s": speed}, indent=1)),
        ("md", text),
    ):
        fd, tmp = tempfile.mkstemp(dir=args.out, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(content)
        os.replace(tmp, args.out / f"compile_time.{suffix}")
    print(text)
    return {"cold": colds, "steady_s": speed}


if __name__ == "__main__":
    main()
