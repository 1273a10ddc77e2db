"""How long ``reuse.convert`` takes on torchvision's ResNet-50 (target: under 2 s on a 2-core CPU).

    python benchmarks/convert_speed.py [--repeat 5] [--model resnet50]

Prints the time of each conversion (default options: a deep copy of the model, tracing, shapes on the
meta device, building the reused blocks), then the median and the best, and the share of each step
in one profiled conversion. ``main()`` returns the median in seconds.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import time

import torch
import torchvision

import reuse


def _steps(model: torch.nn.Module) -> dict[str, float]:
    """Cumulative seconds of the main steps of one conversion, from cProfile."""
    profile = cProfile.Profile()
    profile.enable()
    reuse.convert(model)
    profile.disable()
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    wanted = {
        "deepcopy": ("copy.py", "deepcopy"),
        "shapes (meta forward)": ("fx.py", "_record_shapes"),
        "trace": ("fx.py", "_trace"),
        "build LayerReuse": ("fx.py", "_build"),
        "total": ("fx.py", "convert"),
    }
    out = {}
    for label, (file, func) in wanted.items():
        times = [v[3] for (f, _, fn), v in stats.items() if fn == func and os.path.basename(f) == file]
        out[label] = max(times, default=0.0)
    return out


def main(model_name: str = "resnet50", repeat: int = 5) -> float:
    torch.manual_seed(0)
    model = torchvision.models.get_model(model_name)
    print(f"{model_name}, torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads")
    reuse.convert(model)  # warm-up: first-call costs (imports, meta kernels)
    times = []
    for i in range(repeat):
        start = time.perf_counter()
        reuse.convert(model)
        times.append(time.perf_counter() - start)
        print(f"  run {i}: {times[-1]:.3f} s")
    median = statistics.median(times)
    print(f"convert({model_name}): median {median:.3f} s, best {min(times):.3f} s over {repeat} runs")
    for label, seconds in _steps(model).items():
        print(f"  {label:24s} {seconds:.3f} s")
    return median


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50", help="a torchvision classification model")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    main(args.model, args.repeat)
