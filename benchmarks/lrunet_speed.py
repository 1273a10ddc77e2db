"""Speed of the library's LruNet against the paper's implementation and the unrolled network, in one run.

    python benchmarks/lrunet_speed.py                       # N = 1, 8, 14; CPU, and CUDA when present
    python benchmarks/lrunet_speed.py --n 8 --reps 3        # one N, fewer repetitions
    python benchmarks/lrunet_speed.py --no-compile --json out.json
    python benchmarks/lrunet_speed.py --n 14 --threads 1     # one CPU thread
    python benchmarks/lrunet_speed.py --keep-freed-memory    # glibc keeps freed buffers (see keep_freed_memory)

Models (N-LruNet-1x, CIFAR input 3x32x32, 10 classes), all holding the same weights:

- ``naive``: the paper's block as its code writes it (``paper_lrunet.NaiveLruNet``): a Python loop over the
  uses, a list of BatchNorms, the multiplier-2 depthwise conv, the shuffle as cat + view + permute +
  contiguous; NCHW, eager.
- ``unrolled``: N independent blocks per stage (``paper_lrunet.UnrolledLruNet``), written the same way.
- ``library``: ``reuse.models.LruNet`` as it comes. For inference: ``reuse.optimize_for_inference(model)``
  (each use's BatchNorm folded into its own convs, weights channels_last), eager.
- ``library+compile``: the same optimized model under ``torch.compile`` with inductor's freezing (inference
  only; compile time reported apart).
- ``library save_memory=True``: ``LruNet(save_memory=True)``, whose blocks gather their repeated channels again
  in backward instead of keeping them (training only).
- ``library+ckpt``: ``LruNet`` with per-use activation checkpointing (training only, for the largest N).

Measured: a training step (forward, cross-entropy, backward, SGD with momentum) and an inference forward at
batch 256 (images/s), batch-1 latency (ms), and peak memory: on CPU the growth of the resident set (VmHWM)
over one step, measured in a child process that hands freed memory back to the OS; on CUDA
``torch.cuda.max_memory_allocated``. Every figure is the median of ``--reps`` timed repetitions after
warm-up; the models take turns within each repetition so that a change of machine load hits all alike.
Before timing, the outputs of all models are checked to agree (eval and train mode, and a gradient).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import ctypes.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from paper_lrunet import naive_from, unrolled_from  # noqa: E402

import reuse  # noqa: E402
from reuse.models import LruBlock, LruNet  # noqa: E402

# --- glibc's allocator ---------------------------------------------------------------------------------------

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters, <malloc.h>


def keep_freed_memory(limit: int = 1 << 30) -> bool:
    """Ask glibc's malloc to serve buffers of up to ``limit`` bytes from its heap and to keep freed memory there,
    the same as the environment variables ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_``.

    By default glibc maps every buffer of 32 MiB or more afresh and unmaps it when it is freed, so each one is
    page-faulted in again on first touch; at batch 256 the 2F-channel activations of LruNet's first stage are
    exactly 32 MiB (a fresh one filled in 18 ms instead of 1.7 ms on the 2-core AMD VM). Process-wide: every
    model of the run gets it alike. Returns whether the C library took both settings (False off glibc).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    return bool(libc.mallopt(M_MMAP_THRESHOLD, limit)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2 * limit))


# --- the machine ---------------------------------------------------------------------------------------------


def machine() -> dict[str, object]:
    """What ran the benchmark: CPU model, cores, torch threads, GPU, versions, load."""
    cpu = platform.processor() or platform.machine()
    try:
        text = Path("/proc/cpuinfo").read_text()
        cpu = re.search(r"model name\s*:\s*(.*)", text).group(1)  # type: ignore[union-attr]
        flags = re.search(r"flags\s*:\s*(.*)", text).group(1).split()  # type: ignore[union-attr]
        cpu += " (" + ", ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags) + ")"
    except (OSError, AttributeError):
        pass
    info: dict[str, object] = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


# --- the models ----------------------------------------------------------------------------------------------


def randomized(n: int, seed: int = 0) -> LruNet:
    """An LruNet whose BatchNorms have non-trivial affine parameters and running statistics, as if trained."""
    torch.manual_seed(seed)
    model = LruNet(num_classes=10, reuse=n)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


def check_identical(lib: LruNet, device: torch.device) -> dict[str, float]:
    """Largest relative output differences against the naive model, in float32: eval, train (forward and a
    shared weight's gradient). The models compute the same function; bf16 timings reuse this check."""
    torch.manual_seed(1)
    x = torch.randn(8, 3, 32, 32, device=device)
    lib = copy.deepcopy(lib).to(device)
    naive, unrolled = naive_from(lib).to(device), unrolled_from(lib).to(device)
    diffs: dict[str, float] = {}
    with torch.no_grad():
        ref = naive.eval()(x).float()
        scale = ref.abs().max().item()
        diffs["eval: unrolled"] = (unrolled.eval()(x).float() - ref).abs().max().item() / scale
        diffs["eval: library"] = (lib.eval()(x).float() - ref).abs().max().item() / scale
        optimized = reuse.optimize_for_inference(lib)(x).float()
        diffs["eval: library optimized"] = (optimized - ref).abs().max().item() / scale
    lib.train(), naive.train()
    lib.head_drop.p = naive.head_drop.p = 0.0  # the library's activations are channels_last: other dropout masks
    out_naive = naive(x).float()
    out_lib = lib(x).float()
    diffs["train: library"] = (out_lib - out_naive).abs().max().item() / out_naive.abs().max().item()
    out_naive.square().sum().backward()
    out_lib.square().sum().backward()
    g_naive = naive.stage2.dw.weight.grad.view_as(lib.stage2.uses[0].dw.weight)
    g_lib = lib.stage2.uses[0].dw.weight.grad
    diffs["train grad: library"] = (g_lib - g_naive).abs().max().item() / g_naive.abs().max().item()
    return diffs


# --- timing --------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def race(fns: dict[str, Callable[[], object]], reps: int, warmup: int, device: torch.device) -> dict[str, float]:
    """Median seconds per call of each function; the functions take turns in every repetition."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model.train()

    def step() -> None:
        with torch.autocast(x.device.type, dtype, enabled=dtype != torch.float32):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def infer(model: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> Callable[[], None]:
    model.eval()

    def forward() -> None:
        with torch.inference_mode(), torch.autocast(x.device.type, dtype, enabled=dtype != torch.float32):
            model(x)

    return forward


def compiled(model: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> tuple[nn.Module, float]:
    """``torch.compile`` with inductor's freezing (weights become constants); returns the compile time."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    fast = torch.compile(model, dynamic=False)
    start = time.perf_counter()
    infer(fast, x, dtype)()
    synchronize(x.device)
    return fast, time.perf_counter() - start


# --- peak memory ---------------------------------------------------------------------------------------------

_CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_TOP_PAD_": "0"}


def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))  # type: ignore[union-attr]


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Growth of the resident set over one call (Linux): peak RSS during it minus RSS before it."""
    fn()  # warm-up: gradients, optimizer state and oneDNN caches exist from here on
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) * 1024


def cuda_peak_bytes(fn: Callable[[], object]) -> int:
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def memory_child(n: int, batch: int, ckpt: bool) -> dict[str, int]:
    """Run in a fresh process (with the allocator set to hand memory back): peak memory of each model."""
    dtype = torch.float32
    lib = randomized(n)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    out = {}
    for name, make in models_for(lib, ckpt).items():
        model = make()
        out[f"train {name}"] = cpu_peak_bytes(train_step(model, x, y, dtype))
        del model
    for name, make in inference_models(lib).items():
        out[f"infer {name}"] = cpu_peak_bytes(infer(make(), x, dtype))
    return out


def cpu_memory(n: int, batch: int, ckpt: bool) -> dict[str, int]:
    cmd = [sys.executable, __file__, "--memory-child", f"{n},{batch},{int(ckpt)}"]
    env = {**os.environ, **_CHILD_ENV}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


# --- the comparison ------------------------------------------------------------------------------------------


def models_for(lib: LruNet, ckpt: bool) -> dict[str, Callable[[], nn.Module]]:
    """Training models, built on demand so that only one is alive in the memory child."""
    made: dict[str, Callable[[], nn.Module]] = {
        "naive": lambda: naive_from(lib),
        "unrolled": lambda: unrolled_from(lib),
        "library": lambda: copy.deepcopy(lib),
        "library save_memory=True": lambda: saving_memory(lib),
    }
    if ckpt:

        def checkpointed() -> nn.Module:
            model = copy.deepcopy(lib)
            for stage in model.stages:
                stage.checkpoint = True
            return model

        made["library+ckpt"] = checkpointed
    return made


def saving_memory(lib: LruNet) -> LruNet:
    """A copy of ``lib`` whose blocks gather their repeated channels again in backward (``save_memory=True``)."""
    model = copy.deepcopy(lib)
    for block in model.modules():
        if isinstance(block, LruBlock):
            block.save_memory = True
    return model


def inference_models(lib: LruNet) -> dict[str, Callable[[], nn.Module]]:
    return {
        "naive": lambda: naive_from(lib).eval(),
        "unrolled": lambda: unrolled_from(lib).eval(),
        "library": lambda: reuse.optimize_for_inference(lib),
    }


def bench_n(n: int, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, object]:
    lib = randomized(n)
    result: dict[str, object] = {"identical": check_identical(lib, device)}
    worst = max(result["identical"].values())  # type: ignore[union-attr]
    if worst > (1e-4 if device.type == "cpu" else 1e-2):  # CUDA convolutions may use TF32
        raise SystemExit(f"N={n}: the models disagree (largest relative difference {worst:.2e}); not timing")
    lib = lib.to(device)
    ckpt = n == max(args.n) and not args.no_checkpoint
    x = torch.randn(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    x1 = torch.randn(1, 3, 32, 32, device=device)

    trainers = {name: train_step(make().to(device), x, y, dtype) for name, make in models_for(lib, ckpt).items()}
    if args.cpu_bf16 and device.type == "cpu":  # the library under bf16 autocast (examples/lrunet_cifar.py --cpu-bf16)
        trainers["library (bf16 autocast)"] = train_step(copy.deepcopy(lib), x, y, torch.bfloat16)
    result["train_s"] = race(trainers, args.reps, 1, device)
    del trainers

    inference = {name: make().to(device) for name, make in inference_models(lib).items()}
    big = {name: infer(m, x, dtype) for name, m in inference.items()}
    one = {name: infer(m, x1, dtype) for name, m in inference.items()}
    if not args.no_compile:
        compile_s = {}
        fast_big, compile_s["batch"] = compiled(inference["library"], x, dtype)
        fast_one, compile_s["batch 1"] = compiled(inference["library"], x1, dtype)
        with torch.inference_mode(), torch.autocast(device.type, dtype, enabled=dtype != torch.float32):
            ref = inference["naive"](x1).float()
            diff = (fast_one(x1).float() - ref).abs().max().item() / ref.abs().max().item()
        result["identical"][f"eval: library+compile ({dtype})"] = diff  # type: ignore[index]
        big["library+compile"] = infer(fast_big, x, dtype)
        one["library+compile"] = infer(fast_one, x1, dtype)
        result["compile_s"] = compile_s
    result["infer_s"] = race(big, args.reps, 2, device)
    result["latency_s"] = race(one, args.latency_reps, 10, device)

    if device.type == "cuda":
        mem = {}
        for name, make in models_for(lib, ckpt).items():
            mem[f"train {name}"] = cuda_peak_bytes(train_step(make().to(device), x, y, dtype))
        for name, model in inference.items():
            mem[f"infer {name}"] = cuda_peak_bytes(infer(model, x, dtype))
        result["peak_bytes"] = mem
    elif sys.platform.startswith("linux") and not args.no_memory:
        result["peak_bytes"] = cpu_memory(n, args.batch, ckpt)
    return result


def table(results: dict[int, dict], batch: int) -> str:
    """Markdown: one row per model and N, ratios against the naive model."""
    head = (
        f"| N | model | train img/s (b{batch}) | x naive | inference img/s (b{batch}) | x naive "
        "| batch-1 latency ms | x naive | peak memory train / infer MB |"
    )
    lines = [head, "|" + "---|" * 9]
    for n, r in results.items():
        names = list(dict.fromkeys([*r["train_s"], *r["infer_s"]]))
        mem = r.get("peak_bytes", {})
        for name in names:
            cells = [str(n), name]
            for key, per in (("train_s", batch), ("infer_s", batch)):
                t, t0 = r[key].get(name), r[key]["naive"]
                cells += [f"{per / t:.1f}", f"{t0 / t:.2f}x"] if t else ["-", "-"]
            t, t0 = r["latency_s"].get(name), r["latency_s"]["naive"]
            cells += [f"{1e3 * t:.2f}", f"{t0 / t:.2f}x"] if t else ["-", "-"]
            tm, im = mem.get(f"train {name}"), mem.get(f"infer {name}")
            cells.append(" / ".join(f"{b / 2**20:.0f}" if b is not None else "-" for b in (tm, im)))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[1, 8, 14], help="numbers of uses N")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions (median)")
    parser.add_argument("--latency-reps", type=int, default=50, help="timed batch-1 calls (median)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to compile on CPU)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    parser.add_argument("--no-checkpoint", action="store_true", help="skip the checkpointed model")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch's CPU threads")
    parser.add_argument(
        "--cpu-bf16", action="store_true", help="on a CPU, also time the library's training under bf16 autocast"
    )
    parser.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="glibc keeps freed buffers instead of mapping each large one afresh (all models alike; not in the "
        "peak-memory children)",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        n, batch, ckpt = (int(v) for v in args.memory_child.split(","))
        print(json.dumps(memory_child(n, batch, bool(ckpt))))
        return {}

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    info = machine()
    info["keep_freed_memory"] = keep_freed_memory() if args.keep_freed_memory else False
    if args.keep_freed_memory and not info["keep_freed_memory"]:
        print("--keep-freed-memory: not glibc, or mallopt refused; the allocator is left as it is", file=sys.stderr)
    print("machine:", json.dumps(info), flush=True)
    results = {}
    for n in args.n:
        start = time.perf_counter()
        results[n] = bench_n(n, args, device, dtype)
        print(f"N={n} done in {time.perf_counter() - start:.0f} s: {json.dumps(results[n])}", flush=True)
    info["load_avg_after"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    report = {"machine": info, "device": str(device), "dtype": str(dtype), "batch": args.batch, "results": results}
    print()
    print(f"{device} ({dtype}), {info['cpu'] if device.type == 'cpu' else info.get('gpu')}")
    print(table(results, args.batch))
    for n, r in results.items():
        worst = max(r["identical"].values())
        print(f"N={n}: largest relative output difference against naive {worst:.1e}; compile s {r.get('compile_s')}")
    if args.json:
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1))
        os.replace(tmp, args.json)
    return report


if __name__ == "__main__":
    main()
