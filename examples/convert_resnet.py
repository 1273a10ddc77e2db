"""Convert torchvision's ResNet-50 and a timm model to layer reuse, and check the conversion is exact.

    python examples/convert_resnet.py [--timm-model convnext_atto] [--size 64]

For each model it prints the report of ``reuse.convert`` (each run of stacked blocks, replaced by one
block used k times, and the parameters before and after), the time the conversion took, and the
exactness check: once the blocks of every run share the same weights, the converted model (without
shuffle) computes the same outputs as the original, because use i keeps block i's BatchNorm.
"""

from __future__ import annotations

import argparse
import time

import timm
import torch
import torchvision
from torch import nn

import reuse


def tie_runs(model: nn.Module, runs: list[reuse.fx.Run]) -> None:
    """Give the blocks of every run block 0's weights, BatchNorms excepted (they stay one per use)."""
    with torch.no_grad():
        for run in runs:
            if run.skipped:
                continue
            first = model.get_submodule(run.blocks[0])
            for name in run.blocks[1:]:
                for m0, mi in zip(first.modules(), model.get_submodule(name).modules()):
                    if not reuse.is_batchnorm(m0):
                        for key, t in [*m0._parameters.items(), *m0._buffers.items()]:
                            if t is not None:
                                getattr(mi, key).copy_(t)


def convert_one(name: str, model: nn.Module, size: int) -> dict[str, float]:
    """Convert ``model``, print the report, and measure the exactness gap; returns the figures."""
    model.eval()
    x = torch.randn(2, 3, size, size)  # (B, 3, H, W)

    start = time.perf_counter()
    converted, report = reuse.convert(model, report=True)  # default options: shuffle, first block's weights
    seconds = time.perf_counter() - start
    print(f"\n== {name}: converted in {seconds:.2f} s")
    print(report)
    with torch.no_grad():
        y = converted.eval()(x)  # (B, classes)
    print(f"output {tuple(y.shape)}")

    # Exactness: tie the weights of each run, then convert without shuffle.
    tie_runs(model, reuse.find_runs(model))
    exact = reuse.convert(model, shuffle=False).eval()
    with torch.no_grad():
        gap = (exact(x) - model(x)).abs().max().item()
    print(f"exactness: max |converted - original| = {gap:.2e} (blocks of each run tied, shuffle=False)")
    return {
        "seconds": seconds,
        "params_before": report.params_before,
        "params_after": report.params_after,
        "runs": len(report.converted),
        "gap": gap,
    }


def main(timm_model: str = "convnext_atto", size: int = 64) -> dict[str, dict[str, float]]:
    torch.manual_seed(0)
    return {
        "resnet50": convert_one("torchvision resnet50", torchvision.models.resnet50(), size),
        timm_model: convert_one(f"timm {timm_model}", timm.create_model(timm_model, pretrained=False), size),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timm-model", default="convnext_atto", help="any timm model name")
    parser.add_argument("--size", type=int, default=64, help="input size of the exactness check")
    args = parser.parse_args()
    main(args.timm_model, args.size)
