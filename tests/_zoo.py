"""A registry of the block types the library meets in CNNs, for tests parametrised over them
(``from _zoo import BLOCKS``): each entry builds one block and says the input shape it takes and the hidden
channel groups it has, counted by hand from the block's definition (producer, consumers)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import timm
import torch
import torchvision
from _helpers import Residual
from torch import nn

from reuse.models.lrunet import LruBlock


@dataclass(frozen=True)
class BlockCase:
    make: Callable[[], nn.Module]
    shape: tuple[int, ...]  # an input
    groups: tuple[tuple[str, tuple[str, ...]], ...]  # hidden groups by hand: (producer, consumers)

    def build(self) -> nn.Module:
        """A fresh block (a copy of one made once: building whole timm and torchvision models is slow)."""
        if self not in _MADE:
            _MADE[self] = self.make()
        return copy.deepcopy(_MADE[self])


_MADE: dict[BlockCase, nn.Module] = {}


class Mlp(nn.Module):
    """A channels-last MLP with a residual (ConvNeXt's, ViT's): linear, GELU, linear."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(x)))  # (B, N, dim)


BLOCKS: dict[str, BlockCase] = {
    "residual": BlockCase(lambda: Residual(8), (2, 8, 5, 5), (("conv1", ("conv2",)),)),
    "tv_basic": BlockCase(lambda: torchvision.models.resnet18().layer1[1], (2, 64, 4, 4), (("conv1", ("conv2",)),)),
    "tv_bottleneck": BlockCase(
        lambda: torchvision.models.resnet50().layer1[1], (2, 256, 4, 4), (("conv1", ("conv2",)), ("conv2", ("conv3",)))
    ),
    "tv_inverted_residual": BlockCase(
        lambda: torchvision.models.mobilenet_v2().features[3], (2, 24, 6, 6), (("conv.0.0", ("conv.2",)),)
    ),
    "tv_convnext": BlockCase(
        lambda: torchvision.models.convnext_tiny().features[1][1], (2, 96, 5, 5), (("block.3", ("block.5",)),)
    ),
    "timm_resnet_bottleneck": BlockCase(
        lambda: timm.create_model("resnet26d").layer2[1], (2, 512, 4, 4), (("conv1", ("conv2",)), ("conv2", ("conv3",)))
    ),
    "timm_mbconv_se": BlockCase(  # the SE's multiplication ties the expanded channels: only the SE's own are hidden
        lambda: timm.create_model("efficientnet_b0").blocks[1][1],
        (2, 24, 6, 6),
        (("se.conv_reduce", ("se.conv_expand",)),),
    ),
    "vgg_pair": BlockCase(
        lambda: nn.Sequential(
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1)
        ),
        (2, 8, 5, 5),
        (("0", ("3",)),),
    ),
    "mlp": BlockCase(lambda: Mlp(6), (2, 3, 6), (("fc1", ("fc2",)),)),
    "lru_block": BlockCase(lambda: LruBlock(16), (2, 16, 6, 6), ()),  # depthwise + pointwise into the residual
}
