"""reuse: parameter reuse for convolutional networks.

Layer reuse (one block applied N times with per-use BatchNorm and a channel shuffle, after
Köpüklü et al., ICIP 2019), an FX pass that converts the stacked blocks of any CNN, finer grains
of reuse, and LruNet, the paper's reference model.

``import reuse`` imports torch and the core, not timm; ``import reuse.models`` (or the first use of
``reuse.models``) registers LruNet's names with timm, so that ``timm.create_model("lrunet14_1x")`` works.

Example:
    >>> import torch, reuse
    >>> block = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8))
    >>> reuse.wrap(block, n=4)(torch.randn(1, 8, 6, 6)).shape
    torch.Size([1, 8, 6, 6])
"""

from reuse._errors import ReuseError

__all__ = [
    "ReuseError",
    "ChannelShuffle",
    "LayerReuse",
    "channel_shuffle",
    "is_batchnorm",
    "is_norm",
    "shuffle_permutation",
    "wrap",
    "FilterBank",
    "FilterReuseConv2d",
    "KernelBank",
    "KernelReuseConv2d",
    "filter_reuse",
    "kernel_reuse",
    "ConversionReport",
    "convert",
    "find_runs",
    "optimize_for_inference",
    "calibrate",
    "refit",
    "Profile",
    "profile",
]

from reuse.calibration import calibrate
from reuse.filter import FilterBank, FilterReuseConv2d, filter_reuse
from reuse.fx import ConversionReport, convert, find_runs
from reuse.kernel import KernelBank, KernelReuseConv2d, kernel_reuse
from reuse.layer import LayerReuse, is_batchnorm, is_norm, wrap
from reuse.optimize import optimize_for_inference
from reuse.profiling import Profile, profile
from reuse.refitting import refit
from reuse.shuffle import ChannelShuffle, channel_shuffle, shuffle_permutation

__version__ = "0.1.0"

_LAZY = ("models", "deploy")  # imported on first use: reuse.models imports timm (about 1.7 s) to register LruNet


def __getattr__(name: str) -> object:
    """``reuse.models`` and ``reuse.deploy`` without an import of their own; ``import reuse`` stays light (no timm,
    no onnx)."""
    if name in _LAZY:
        import importlib

        return importlib.import_module(f"reuse.{name}")
    raise AttributeError(f"module 'reuse' has no attribute {name!r}")
