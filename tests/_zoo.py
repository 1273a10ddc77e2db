"""The models and blocks the tests run on, and the one BatchNorm randomiser they use.

- ``ZOO``: every model a test file is parametrised over, each a :class:`Model` that says its input shape, the
  tests it is in (``features``) and, where a test checks a count, the count worked out by hand from the model's
  definition (a comment next to each says how). ``select("deploy")`` gives the ``pytest.param`` list of one
  feature, with the model's name as the id.
- ``BLOCKS``: the block types the library meets in CNNs, each with its hidden channel groups counted by hand.
- ``randomize(module, seed)``: BatchNorms as after training, so that a test of equivalence cannot pass because
  fresh BatchNorms are identities.

Import with ``from _zoo import ...`` (pytest puts ``tests/`` on the path). Building whole torchvision and timm
models is slow: ``Model.build`` and ``BlockCase.build`` build each once and hand out deep copies.
"""

from __future__ import annotations

import copy
import functools
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from _helpers import Residual, to_official
from torch import Tensor, nn

import reuse
from reuse.models import LruBlock, LruNet, load_official

# ----------------------------------------------------------------------------------------------------------
# The randomiser


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm (anything ``reuse.is_batchnorm`` accepts: timm's ``BatchNormAct2d``, torchvision's
    ``FrozenBatchNorm2d``) the affine parameters and running statistics of a trained network: scales of both
    signs and 0.5 to 1.5 in size, shifts in [-0.5, 0.5], means in [-0.2, 0.2], variances in [0.5, 2].

    In place; returns ``module``. The values come from a generator of their own seeded with ``seed``: the same
    seed gives the same values, and torch's global generator is left as it was.

    >>> bn = randomize(nn.BatchNorm2d(4), seed=1)
    >>> bool((bn.weight.abs() >= 0.5).all() and (bn.running_var >= 0.5).all())
    True
    """
    g = torch.Generator().manual_seed(seed)

    def uniform(t: Tensor, low: float, high: float) -> Tensor:
        return low + (high - low) * torch.rand(t.shape, generator=g, dtype=torch.float64)

    with torch.no_grad():
        for m in module.modules():
            if not reuse.is_batchnorm(m):
                continue
            if getattr(m, "weight", None) is not None:
                sign = torch.where(torch.rand(m.weight.shape, generator=g) < 0.5, -1.0, 1.0)
                m.weight.copy_(sign * uniform(m.weight, 0.5, 1.5))
            if getattr(m, "bias", None) is not None:
                m.bias.copy_(uniform(m.bias, -0.5, 0.5))
            if getattr(m, "running_mean", None) is not None:
                m.running_mean.copy_(uniform(m.running_mean, -0.2, 0.2))
            if getattr(m, "running_var", None) is not None:
                m.running_var.copy_(uniform(m.running_var, 0.5, 2.0))
    return module


# ----------------------------------------------------------------------------------------------------------
# Small models the registries below build


class ConvBnAct(nn.Sequential):
    """conv, BN, ReLU: no shortcut."""

    def __init__(self, channels: int, kernel: int = 3, groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(channels, channels, kernel, padding=kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
        )


class NestedNorms(nn.Module):
    """BatchNorms nested two containers deep, next to a shared parameter held by the container itself."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            ConvBnAct(channels), nn.Sequential(nn.Conv2d(channels, channels, 1), nn.BatchNorm2d(channels))
        )
        self.scale = nn.Parameter(torch.rand(1, channels, 1, 1) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x) * self.scale + x  # (B, C, H, W)


class Mlp(nn.Module):
    """A channels-last MLP with a residual (ConvNeXt's, ViT's): linear, GELU, linear."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(self.act(self.fc1(x)))  # (B, N, dim)


class DropoutResidual(nn.Module):
    """Conv, BN (cumulative-average statistics), dropout, conv, BN, shortcut: state and randomness per use."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels, momentum=None)
        self.drop = nn.Dropout(0.3)
        self.conv2 = nn.Conv2d(channels, channels, 1)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        y = self.drop(torch.relu(self.bn1(self.conv1(x))))  # (B, C, H, W)
        return torch.relu(self.bn2(self.conv2(y)) + x)  # (B, C, H, W)


class SharedConvInSequential(nn.Module):
    """BatchNorms in a per-use container, the conv they follow in a shared one (a copy on write is needed)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.shared = nn.Sequential(nn.Conv2d(channels, channels, 1))
        self.norms = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        return self.norms(self.shared(x)) + x  # (B, C, H, W)


class Net(nn.Module):
    """Plain conv-BN pairs around two reused blocks, one nested inside a plain container."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.body = reuse.wrap(Residual(16, groups2=2), n=3)
        self.more = nn.Sequential(reuse.wrap(SharedConvInSequential(16), n=4, shuffle=False))
        self.head = nn.Linear(16, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.more(self.body(self.stem(x))).mean((2, 3)))  # (B, 5)


class Aliased(nn.Module):
    """One conv held under two attribute names, then a stack of same-structure blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.stem_alias = self.stem
        self.blocks = nn.Sequential(*[conv_bn() for _ in range(3)])

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.stem_alias(x))  # (B, 8, H, W)


def conv_bn(c: int = 8) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())


def stack(c: int = 8, n: int = 4, kernel: int = 3, groups: int = 1) -> nn.Sequential:
    """A stem and ``n`` residual blocks of one width: one run of ``n`` blocks, untied random weights."""
    return nn.Sequential(nn.Conv2d(3, c, 3, padding=1), *[Residual(c, kernel, groups) for _ in range(n)])


def plain_cnn() -> nn.Sequential:
    """Two convs of different inputs, a pool and a linear head: nothing to reuse."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )


def reused_inside() -> nn.Sequential:
    """A LayerReuse inside an nn.Sequential, followed by a convertible run (the repro of a seam bug)."""
    return nn.Sequential(nn.Conv2d(3, 8, 1), reuse.wrap(conv_bn(), n=2), *[conv_bn() for _ in range(3)])


def tied_blocks() -> nn.Sequential:
    """A stack whose blocks 1 and 2 share block 0's conv weight (tied by hand)."""
    net = nn.Sequential(nn.Conv2d(3, 8, 1), *[conv_bn() for _ in range(4)])
    net[2][0].weight = net[3][0].weight = net[1][0].weight
    return net


def official() -> LruNet:
    """A model loaded from a file in the authors' format (written from a randomised 2-LruNet, then read back)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "official-format-lru2.t7"
        torch.save({"net": to_official(randomize(LruNet(reuse=2, in_chans=1))), "acc": 1.0, "epoch": 1}, path)
        return load_official(path)


def checkpointed(model: LruNet) -> LruNet:
    model.set_grad_checkpointing(True)
    return model


def small_swin() -> nn.Module:
    """torchvision's Swin at 4x4 windows and 16 channels: a 4x4 patch grid at 32x32."""
    return torchvision.models.SwinTransformer([4, 4], 16, [2, 2, 4, 2], [1, 1, 2, 2], [4, 4])


# ----------------------------------------------------------------------------------------------------------
# The model registry

FEATURES = {  # what each tag puts a model into
    "checkpoint": "test_checkpoint.py: checkpointed training steps equal plain ones",
    "delta": "test_delta.py: full-rank deltas give the model back",
    "deploy": "test_deploy.py: ONNX export runs in onnxruntime with the model's outputs",
    "optimize": "test_optimize.py: optimize_for_inference folds every BatchNorm",
    "share_weights": "test_optimize.py: optimize_for_inference(share_weights=True)",
    "seams": "test_seams.py: every transform leaves a model that already reuses as it was",
    "trains_after": "test_seams.py: training works after inference, tracing and export",
    "script": "test_seams.py: TorchScript computes what the model computes",
    "exact": "test_fx.py: tied blocks -> convert(shuffle=False) computes the same function",
    "data": "test_convert_data_models.py: convert(data=...) on timm models",
    "zoo": "test_fx_zoo.py: the model-zoo matrix (every torchvision classifier, a timm sample)",
}


@dataclass(frozen=True)
class Model:
    """One model of the registry."""

    name: str  # the test id: "torchvision.resnet50", "lrunet-0.25x-r2"
    make: Callable[[], nn.Module]  # builds it (its weights drawn from torch's global generator)
    shape: tuple[int, ...]  # an input it takes
    features: frozenset[str]  # the tests it is in: keys of FEATURES
    runs: int | None = None  # runs of equal blocks reuse.convert converts, counted by hand (None: not counted)
    why_no_run: str = ""  # for runs == 0: why there is none, checked by hand
    block_type: str = ""  # the class of every run's blocks, read from the definition ("": not checked)
    native: bool = False  # the input size is fixed by the configuration (token grids, windows, aux heads)
    heavy: bool = False  # the zoo matrix's check takes >= 1.2 s of CPU time: marked heavy there

    def build(self) -> nn.Module:
        """A fresh copy of the model, built once with torch's generator seeded with 0 (the global generator is
        left as it was)."""
        if self.name not in _BUILT:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                _BUILT[self.name] = self.make()
        return copy.deepcopy(_BUILT[self.name])

    @property
    def source(self) -> str:
        """Where the builder comes from: "torchvision", "timm", or "tests" for the models defined here."""
        head = self.name.split(".")[0]
        return head if head in ("torchvision", "timm") else "tests"


_BUILT: dict[str, nn.Module] = {}


def _m(name: str, make: Callable[[], nn.Module], shape: tuple[int, ...], *features: str, **expected: object) -> Model:
    return Model(name, make, shape, frozenset(features), **expected)


_CIFAR, _MNIST = (2, 3, 32, 32), (2, 1, 28, 28)

# Models written here or built from LruNet, with the tests they are in.
_OWN = [
    _m("lrunet-r2", lambda: LruNet(reuse=2), _CIFAR, "checkpoint"),
    _m("lrunet-r3", lambda: LruNet(reuse=3), (4, 3, 32, 32), "optimize"),
    _m("lrunet-2x-r1", lambda: LruNet(reuse=1, width_mult=2.0), _CIFAR, "optimize", "share_weights"),
    _m("lrunet-0.25x-r1", lambda: LruNet(width_mult=0.25, reuse=1), _CIFAR, "deploy", "trains_after"),
    _m("lrunet-0.25x-r2", lambda: LruNet(width_mult=0.25, reuse=2), _CIFAR, "deploy"),
    _m("lrunet-0.25x-r3", lambda: LruNet(width_mult=0.25, reuse=3), _CIFAR, "seams", "trains_after", "script"),
    _m("lrunet-0.25x-r8-gray", lambda: LruNet(width_mult=0.25, reuse=8, in_chans=1), _MNIST, "deploy"),
    _m(
        "lrunet-0.25x-r3-no-shuffle",
        lambda: LruNet(width_mult=0.25, reuse=3, shuffle=False),
        _CIFAR,
        "trains_after",
        "script",
    ),
    _m(
        "lrunet-0.25x-r2-no-share",
        lambda: LruNet(width_mult=0.25, reuse=2, share=False),
        _CIFAR,
        "seams",
        "trains_after",
    ),
    _m("lrunet-0.25x-r2-filter", lambda: LruNet(width_mult=0.25, reuse=2, level="filter"), _CIFAR, "trains_after"),
    _m("lrunet-0.25x-r2-kernel", lambda: LruNet(width_mult=0.25, reuse=2, level="kernel"), _CIFAR, "trains_after"),
    _m(
        "lrunet-0.25x-r2-checkpointed",
        lambda: checkpointed(LruNet(width_mult=0.25, reuse=2)),
        _CIFAR,
        "trains_after",
    ),
    _m("lrunet-official-r2", official, _MNIST, "seams"),
    _m(
        "resnet18-converted",
        lambda: reuse.convert(torchvision.models.resnet18(num_classes=10)),
        _CIFAR,
        "deploy",
        "trains_after",
        "script",
    ),
    _m(
        "wrap-lrublock",
        lambda: reuse.wrap(LruBlock(16), n=4),
        (3, 16, 6, 6),
        "checkpoint",
        "optimize",
        "share_weights",
    ),
    _m("wrap-dropout-residual", lambda: reuse.wrap(DropoutResidual(8), n=3, shuffle=True), (4, 8, 5, 5), "checkpoint"),
    _m("net", Net, (4, 3, 8, 8), "optimize", "share_weights"),
    _m("plain-cnn", plain_cnn, (2, 3, 12, 12), "deploy"),
    # 4 Residual(8) after a stem conv of another input width: one run (the 4 blocks)
    _m("stack", stack, (2, 3, 8, 8), "delta", runs=1),
    _m("reused-inside", reused_inside, (2, 3, 8, 8), "seams", "script"),
    _m("aliased", Aliased, (2, 3, 8, 8), "seams"),
    _m("tied-blocks", tied_blocks, (2, 3, 8, 8), "seams"),
    _m(
        "channel-shuffle",
        lambda: nn.Sequential(nn.Conv2d(3, 8, 1), reuse.ChannelShuffle(groups=4)),
        _CIFAR,
        "script",
    ),
    _m("small-swin", small_swin, _CIFAR, "exact"),
    _m(
        "timm.convnext_atto-drop_path",  # Identity and DropPath modules in the blocks
        lambda: timm.create_model("convnext_atto", drop_path_rate=0.1),
        _CIFAR,
        "exact",
    ),
]

# The zoo matrix: every torchvision classification builder and a broad sample of timm families (the CNN families
# and their relatives, then a few transformer and hybrid families to show where layer reuse does (ViT) and does
# not (alternating blocks) apply).
TORCHVISION = torchvision.models.list_models(module=torchvision.models)
TIMM = [
    "resnet18", "resnet50d", "resnetrs50", "resnetv2_50", "resnet50_gn", "legacy_seresnet18", "skresnet18",
    "ecaresnet26t", "resnext50_32x4d", "seresnext26d_32x4d", "resnext26ts", "res2net50_14w_8s", "res2next50",
    "resnest14d", "regnetx_002", "regnety_002", "regnetz_b16", "regnetv_040", "efficientnet_b0",
    "tf_efficientnet_lite0", "efficientnet_em", "efficientnetv2_rw_t", "mobilenetv1_100", "mobilenetv2_050",
    "mobilenetv3_small_050", "mobilenetv3_large_100", "mobilenetv4_conv_small", "mixnet_s", "mnasnet_100",
    "fbnetc_100", "spnasnet_100", "lcnet_050", "hardcorenas_a", "tinynet_e", "ghostnet_050", "ghostnetv2_100",
    "rexnet_100", "repghostnet_050", "convnext_atto", "convnextv2_atto", "inception_next_atto", "vgg11",
    "vgg11_bn", "repvgg_a0", "mobileone_s0", "densenet121", "dla34", "dpn68", "cspresnet50", "cspdarknet53",
    "cs3darknet_s", "darknet53", "hrnet_w18_small", "selecsls42b", "gernet_s", "ese_vovnet19b_dw", "hgnet_tiny",
    "hgnetv2_b0", "nf_resnet26", "inception_v3", "xception41", "fastvit_t8", "efficientvit_b0", "repvit_m0_9",
    "starnet_s1", "fasternet_t0", "edgenext_xx_small", "mobilevit_xxs", "poolformerv2_s12", "convmixer_768_32",
    "vit_tiny_patch16_224", "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "mixer_s16_224",
]  # fmt: skip

SMALL = 32  # the zoo's input size, where a model takes it
SIZE = {  # models whose input size is not SMALL
    "torchvision.alexnet": 64,  # needs more than SMALL
    "timm.ghostnetv2_100": 64,  # needs more than SMALL
    "torchvision.mobilenet_v2": 64,  # its last BatchNorms see 1x1 maps at 32x32, 2x2 here (test_delta trains them)
    "torchvision.vit_h_14": 28,  # built for it (KWARGS): patches of 14
}
NATIVE_SIZE = {  # input sizes fixed by the configuration (token grids, windows, auxiliary heads): run on meta
    "torchvision.maxvit_t": 224,
    "torchvision.inception_v3": 299,
    "timm.inception_v3": 299,
    "timm.swin_tiny_patch4_window7_224": 224,
    "timm.vit_tiny_patch16_224": 224,
    "timm.deit_tiny_patch16_224": 224,
    "timm.mixer_s16_224": 224,
    "timm.mobilevit_xxs": 256,
}
KWARGS = {  # builder arguments for a small input
    "torchvision.vit_b_16": {"image_size": 32},
    "torchvision.vit_b_32": {"image_size": 32},
    "torchvision.vit_l_16": {"image_size": 32},
    "torchvision.vit_l_32": {"image_size": 32},
    "torchvision.vit_h_14": {"image_size": 28},
}
HEAVY = {  # the slowest checks of the zoo matrix (>= 1.2 s of CPU time each, measured on the 2-core CPU)
    "torchvision.efficientnet_b7",
    "torchvision.efficientnet_v2_l",
    "torchvision.efficientnet_v2_m",
    "torchvision.maxvit_t",
    "torchvision.resnet152",
    "torchvision.vit_h_14",
    "torchvision.regnet_y_128gf",
}

# Models with no run, and why (checked by hand against the definitions; docs/convert.md lists them).
_CONCAT = "each layer reads the concatenation of all earlier outputs: widths grow, no two layers alike"
_TWO = "two blocks per stage and the first one downsamples: never two same-structure blocks in a row"
_OSA = "one-shot aggregation: every layer's output also feeds the block's final concatenation"
NO_RUN = {
    "torchvision.alexnet": "every convolution has its own width",
    "torchvision.densenet121": _CONCAT,
    "torchvision.densenet161": _CONCAT,
    "torchvision.densenet169": _CONCAT,
    "torchvision.densenet201": _CONCAT,
    "torchvision.googlenet": "every inception module has its own widths",
    "torchvision.squeezenet1_0": "every fire module has its own widths",
    "torchvision.squeezenet1_1": "every fire module has its own widths",
    "timm.densenet121": _CONCAT,
    "timm.ecaresnet26t": _TWO,
    "timm.seresnext26d_32x4d": _TWO,
    "timm.resnext26ts": _TWO,
    "timm.nf_resnet26": _TWO,
    "timm.hardcorenas_a": _TWO,
    "timm.tinynet_e": "one or two blocks per stage and the first one downsamples",
    "timm.resnest14d": "one block per stage",
    "timm.rexnet_100": "the width grows at every block",
    "timm.dla34": "tree aggregation: blocks feed aggregation nodes, not one another",
    "timm.dpn68": "dual-path blocks concatenate: the width grows at every block",
    "timm.selecsls42b": "blocks concatenate their features; no two blocks alike",
    "timm.ese_vovnet19b_dw": _OSA,
    "timm.hgnet_tiny": _OSA,
    "timm.hgnetv2_b0": _OSA,
}

# Runs of equal blocks, counted by hand from the definitions (a stage of k blocks whose first one changes the
# width or the resolution holds one run of k - 1 blocks when k >= 3; a stage of k equal blocks, one run of k).
_RESNET = 4  # layers [3, 4, 6, 3] or deeper: block 0 of every layer has a downsample, blocks 1.. form a run
RUNS = {
    "torchvision.resnet18": 1,  # [2, 2, 2, 2]: layer1's two 64-channel blocks; layers 2-4 keep 1 after block 0
    "torchvision.resnet34": 4,  # [3, 4, 6, 3] basic blocks: layer1's 3, then 3, 5 and 2 after each block 0
    "torchvision.resnet50": _RESNET,
    "torchvision.resnet101": _RESNET,  # [3, 4, 23, 3]
    "torchvision.resnet152": _RESNET,  # [3, 8, 36, 3]
    "torchvision.resnext50_32x4d": _RESNET,
    "torchvision.resnext101_32x8d": _RESNET,
    "torchvision.resnext101_64x4d": _RESNET,
    "torchvision.wide_resnet50_2": _RESNET,
    "torchvision.wide_resnet101_2": _RESNET,
    "timm.resnet18": 1,
    "timm.resnet50d": _RESNET,
    "timm.resnext50_32x4d": _RESNET,
    # VGG cfgs (vgg.py): a run is 2+ equal conv-ReLU pairs between two pools; the first conv of a stage changes
    # the width. A [.., 512, 512, M, 512, 512, M]: the last stage only. B (vgg13): the same. D (vgg16): 256 x3,
    # 512 x3, 512 x3 -> 3 runs. E (vgg19): 4 convs in each of the last three stages -> 3 runs.
    "torchvision.vgg11": 1,
    "torchvision.vgg11_bn": 1,
    "torchvision.vgg13": 1,
    "torchvision.vgg13_bn": 1,
    "torchvision.vgg16": 3,
    "torchvision.vgg16_bn": 3,
    "torchvision.vgg19": 3,
    "torchvision.vgg19_bn": 3,
    "timm.vgg11": 1,
    "timm.vgg11_bn": 1,
    # MobileNetV2 (t, c, n, s) = (1,16,1), (6,24,2), (6,32,3), (6,64,4), (6,96,3), (6,160,3), (6,320,1): the
    # stages of n >= 3 -> 4 runs.
    "torchvision.mobilenet_v2": 4,
    "timm.mobilenetv2_050": 4,
    # MobileNetV3 bneck_conf lists: large repeats (40,5,120,40), (80,3,184,80), (160,5,960,160) twice each -> 3;
    # small repeats (40,5,240,40) and (96,5,576,96) twice each -> 2.
    "torchvision.mobilenet_v3_large": 3,
    "torchvision.mobilenet_v3_small": 2,
    # MNASNet _stack repeats 3, 3, 3, 2, 4, 1 (timm's arch_def: r3, r3, r4, r2, r3, r1): 4 stacks of 3+ blocks.
    "torchvision.mnasnet1_0": 4,
    "timm.mnasnet_100": 4,
    # EfficientNet-B0 MBConv layers 1, 2, 2, 3, 3, 4, 1: the three stages of 3+ blocks.
    "torchvision.efficientnet_b0": 3,
    "timm.efficientnet_b0": 3,
    # ConvNeXt: the downsampling layers sit between the stages, every stage is one run of equal blocks.
    "torchvision.convnext_tiny": 4,  # [3, 3, 9, 3]
    "torchvision.convnext_small": 4,  # [3, 3, 27, 3]
    "torchvision.convnext_base": 4,
    "torchvision.convnext_large": 4,
    "timm.convnext_atto": 4,  # (2, 2, 6, 2)
    "timm.convnextv2_atto": 4,
    # Transformers: the encoder's layers are one run.
    "torchvision.vit_b_16": 1,
    "torchvision.vit_b_32": 1,
    "torchvision.vit_l_16": 1,
    "torchvision.vit_l_32": 1,
    "torchvision.vit_h_14": 1,
    "timm.vit_tiny_patch16_224": 1,
    "timm.deit_tiny_patch16_224": 1,
    "timm.mixer_s16_224": 1,
    # Swin alternates unshifted and shifted windows: a period-2 run in the stage of 6 or 18 blocks; the stages of
    # 2 blocks hold one pair only.
    "torchvision.swin_t": 1,
    "torchvision.swin_s": 1,
    "torchvision.swin_b": 1,
    "torchvision.swin_v2_t": 1,
    "torchvision.swin_v2_s": 1,
    "torchvision.swin_v2_b": 1,
    "timm.swin_tiny_patch4_window7_224": 1,
}
EXACT = {"torchvision.resnet18", "torchvision.resnet50", "torchvision.mobilenet_v2", "torchvision.efficientnet_b0"}
DELTA = {"torchvision.resnet18", "torchvision.mobilenet_v2"}  # two CNNs of different block types
DATA = {  # the block type of every run of the models convert(data=...) is tested on
    "timm.resnet18": "BasicBlock",  # layer1: two BasicBlocks of one shape
    "timm.mobilenetv2_050": "InvertedResidual",  # expansion, depthwise, projection: the hidden group goes through dw
}


def _zoo_model(source: str, name: str) -> Model:
    key = f"{source}.{name}"
    kwargs = KWARGS.get(key, {})
    if source == "torchvision":
        make = functools.partial(torchvision.models.get_model_builder(name), **kwargs)
    else:
        make = functools.partial(timm.create_model, name, pretrained=False, **kwargs)
    size = NATIVE_SIZE.get(key) or SIZE.get(key, SMALL)
    features = {"zoo"} | {tag for tag, keys in (("exact", EXACT), ("delta", DELTA), ("data", DATA)) if key in keys}
    return Model(
        key,
        make,
        (2, 3, size, size),
        frozenset(features),
        runs=0 if key in NO_RUN else RUNS.get(key),
        why_no_run=NO_RUN.get(key, ""),
        block_type=DATA.get(key, ""),
        native=key in NATIVE_SIZE,
        heavy=key in HEAVY,
    )


ZOO: dict[str, Model] = {
    m.name: m
    for m in [*_OWN, *(_zoo_model("torchvision", n) for n in TORCHVISION), *(_zoo_model("timm", n) for n in TIMM)]
}
assert all(m.features <= FEATURES.keys() for m in ZOO.values()), "a tag that no test reads"


def select(feature: str) -> list:
    """The models of one feature as ``pytest.param``s (id: the model's name; heavy ones marked), for
    ``@pytest.mark.parametrize("model", select("deploy"))``."""
    if feature not in FEATURES:
        raise KeyError(f"no feature {feature!r}: one of {sorted(FEATURES)}")
    return [
        pytest.param(m, id=m.name, marks=[pytest.mark.heavy] if m.heavy else [])
        for m in ZOO.values()
        if feature in m.features
    ]


# ----------------------------------------------------------------------------------------------------------
# The block registry


@dataclass(frozen=True)
class BlockCase:
    make: Callable[[], nn.Module]
    shape: tuple[int, ...]  # an input
    groups: tuple[tuple[str, tuple[str, ...]], ...]  # hidden groups by hand: (producer, consumers)
    features: frozenset[str] = frozenset()  # "wrap": test_layer.py's wrap(block, n) == an unrolled loop

    def build(self) -> nn.Module:
        """A fresh block (a copy of one made once, with torch's generator seeded with 0: building whole timm and
        torchvision models is slow)."""
        if self not in _MADE:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                _MADE[self] = self.make()
        return copy.deepcopy(_MADE[self])


_MADE: dict[BlockCase, nn.Module] = {}
_WRAP = frozenset({"wrap"})

BLOCKS: dict[str, BlockCase] = {
    "residual": BlockCase(lambda: Residual(8), (2, 8, 5, 5), (("conv1", ("conv2",)),), _WRAP),
    "conv_bn_act": BlockCase(lambda: ConvBnAct(8), (2, 8, 5, 5), (), _WRAP),  # its conv's output leaves the block
    "nested": BlockCase(  # the first conv feeds only the 1x1 conv; the 1x1's output is scaled and added to x
        lambda: NestedNorms(8), (2, 8, 5, 5), (("body.0.0", ("body.1.0",)),), _WRAP
    ),
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
    "lru_block": BlockCase(lambda: LruBlock(16), (2, 16, 6, 6), (), _WRAP),  # depthwise + pointwise into the residual
}


def select_blocks(feature: str) -> list[str]:
    """The names of the blocks of one feature (sorted), for ``@pytest.mark.parametrize("name", ...)``."""
    return sorted(name for name, case in BLOCKS.items() if feature in case.features)
