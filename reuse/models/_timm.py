"""LruNet in timm's registry: ``import reuse`` makes ``timm.create_model("lrunet14_1x")`` work.

Registered names (N-LruNet-wx is ``lrunet{N}_{w}x``), with the authors' released weights as pretrained tags:

=================  ==========================================================================
name               pretrained tags (the authors' files, MIT license)
=================  ==========================================================================
``lrunet1_1x``     ``.cifar10`` (83.91%), ``.fashion_mnist`` (91.17%, 1 input channel, 28x28)
``lrunet1_2x``     ``.cifar100`` (63.22%)
``lrunet8_1x``     none (the paper's default N)
``lrunet10_1x``    ``.fashion_mnist`` (93.46%, 1 input channel, 28x28)
``lrunet14_1x``    ``.cifar10`` (89.34%)
``lrunet14_2x``    ``.cifar100`` (68.84%)
``lrunet``         none; any N and width: ``timm.create_model("lrunet", reuse=6, width_mult=1.5)``
=================  ==========================================================================

Every name takes LruNet's arguments as keyword arguments (``num_classes``, ``in_chans``, ``drop_rate``, and for
``lrunet`` also ``reuse`` and ``width_mult``). Inputs are in [0, 1] without normalisation (``mean=0, std=1``
in the pretrained config), as the authors trained them.

To load a local copy of a released file instead of downloading it::

    timm.create_model("lrunet14_1x", pretrained=True, pretrained_cfg_overlay=dict(file="cifar10-lru14-ckpt-08934.t7"))
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import Tensor

from reuse._errors import ReuseError
from reuse.models._official import OFFICIAL_URL, check_release_digest, convert_official, lrunet_state_dict
from reuse.models.lrunet import LruNet

__all__ = ["checkpoint_filter_fn"]

_CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_FASHION = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_PAPER = dict(
    paper_name="Convolutional Neural Networks with Layer Reuse",
    paper_ids="arXiv:1901.09615",
    origin_url="https://github.com/okankop/CNN-layer-reuse",
)


def _cfg(file: str | None = None, *, num_classes: int = 10, in_chans: int = 3, size: int = 32, **kwargs: Any) -> dict:
    """One pretrained config; ``file`` is the name of the authors' release file (None: no weights)."""
    return {
        "url": OFFICIAL_URL.format(file=file) if file else None,
        "num_classes": num_classes,
        "input_size": (in_chans, size, size),
        "pool_size": (2, 2),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": (0.0,) * in_chans,  # the authors fed ToTensor() output, in [0, 1], unnormalised
        "std": (1.0,) * in_chans,
        "first_conv": "stem.0",
        "classifier": "classifier",
        **({"license": "mit"} if file else {}),
        **_PAPER,
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "lrunet1_1x.cifar10": _cfg("cifar10-lru1-ckpt-08391.t7", label_names=_CIFAR10, notes=("acc 83.91",)),
        "lrunet1_1x.fashion_mnist": _cfg(
            "fashionmnist-lru1-ckpt-09117.t7", in_chans=1, size=28, label_names=_FASHION, notes=("acc 91.17",)
        ),
        "lrunet1_2x.cifar100": _cfg("cifar100-lru1-2x-ckpt-06322.t7", num_classes=100, notes=("acc 63.22",)),
        "lrunet8_1x": _cfg(),
        "lrunet10_1x.fashion_mnist": _cfg(
            "fashionmnist-lru10-ckpt-09346.t7", in_chans=1, size=28, label_names=_FASHION, notes=("acc 93.46",)
        ),
        "lrunet14_1x.cifar10": _cfg("cifar10-lru14-ckpt-08934.t7", label_names=_CIFAR10, notes=("acc 89.34",)),
        "lrunet14_2x.cifar100": _cfg("cifar100-lru14-2x-ckpt-06884.t7", num_classes=100, notes=("acc 68.84",)),
        "lrunet": _cfg(),
    }
)


def checkpoint_filter_fn(state_dict: dict[str, Any], model: LruNet) -> dict[str, Tensor]:
    """timm's pretrained filter: the authors' checkpoint (the ``{'net', 'acc', 'epoch'}`` dict or its ``net``)
    as a complete state dict for ``model``. A state dict already in LruNet's names passes through.

    Raises:
        ReuseError: the file does not fit the model (another N or width), listing the keys.
    """
    if isinstance(state_dict.get("net"), dict):
        state_dict = state_dict["net"]
    if any(k.startswith(("stem.", "module.stem.")) for k in state_dict):
        return {k.removeprefix("module."): v for k, v in state_dict.items()}
    renamed, _ = convert_official(state_dict)
    if not renamed:
        raise ReuseError(
            f"LruNet pretrained: the checkpoint holds no LruNet weights (keys {list(state_dict)[:5]}); "
            "point pretrained_cfg_overlay=dict(file=...) at one of the authors' .t7 files"
        )
    if model.num_classes == 0:  # no classifier to load: timm drops a classifier of another size after us
        state_dict = {k: v for k, v in state_dict.items() if not _is_classifier_key(k)}
    return lrunet_state_dict(state_dict, model, "the pretrained checkpoint", caller="LruNet pretrained")


def _is_classifier_key(key: str) -> bool:
    """The last conv of the authors' head (``classifier.4``), which ``num_classes=0`` leaves out."""
    return key.removeprefix("module.").startswith("classifier.4.")


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> LruNet:
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    if pretrained and isinstance(overlay, dict) and overlay.get("file"):
        path = Path(overlay["file"])
        if path.is_file():  # a local copy of a release file must be that file (timm reports a missing one)
            try:
                check_release_digest(path)
            except ReuseError as err:
                raise ReuseError(f"timm.create_model({variant!r}, pretrained=True): {err}") from None
    return build_model_with_cfg(LruNet, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


def _fixed(variant: str, reuse: int, width_mult: float, pretrained: bool, kwargs: dict[str, Any]) -> LruNet:
    for name, value in (("reuse", reuse), ("width_mult", width_mult)):
        if name in kwargs and kwargs[name] != value:
            raise ReuseError(
                f"timm.create_model({variant!r}, {name}={kwargs[name]!r}): {variant} is fixed at {name}={value}; "
                f'use timm.create_model("lrunet", reuse=..., width_mult=...) for any N and width'
            )
    return _create(variant, pretrained, **{**kwargs, "reuse": reuse, "width_mult": width_mult})


# The fixed names: (N, width, what the entry point's docstring says).
_FIXED = {
    "lrunet1_1x": (1, 1.0, "131k parameters on CIFAR-10"),
    "lrunet1_2x": (1, 2.0, "514k parameters on CIFAR-100"),
    "lrunet8_1x": (8, 1.0, "172k parameters on CIFAR-10"),
    "lrunet10_1x": (10, 1.0, "183k parameters on CIFAR-10, 182k on Fashion-MNIST"),
    "lrunet14_1x": (14, 1.0, "206k parameters on CIFAR-10"),
    "lrunet14_2x": (14, 2.0, "664k parameters on CIFAR-100"),
}


def _register_fixed(name: str, reuse: int, width_mult: float, about: str) -> None:
    """Register ``name`` with timm: ``timm.create_model(name)`` builds N-LruNet-wx of that N and width."""

    def entry(pretrained: bool = False, **kwargs: Any) -> LruNet:
        return _fixed(name, reuse, width_mult, pretrained, kwargs)

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = f"{reuse}-LruNet-{width_mult:g}x ({about})."
    globals()[name] = register_model(entry)


for _name, _spec in _FIXED.items():
    _register_fixed(_name, *_spec)


@register_model
def lrunet(pretrained: bool = False, **kwargs: Any) -> LruNet:
    """N-LruNet-wx for any N and width: ``timm.create_model("lrunet", reuse=N, width_mult=w)`` (default 8, 1.0).

    It has no weights of its own; ``pretrained=True`` with ``pretrained_cfg_overlay=dict(file=...)`` loads a file
    made for the N and width asked for.
    """
    return _create("lrunet", pretrained, **kwargs)
