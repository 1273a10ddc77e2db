"""Load the authors' released LruNet checkpoints (github.com/okankop/CNN-layer-reuse, ``pretrained/*.t7``).

Their files are ``torch.save`` dicts ``{'net': state_dict, 'acc': float, 'epoch': int}``, saved from
``nn.DataParallel`` (every key starts with ``module.``) by a PyTorch old enough to write no
``num_batches_tracked``. Their module names map onto :class:`~reuse.models.LruNet` as::

    features.0 / features.1                 -> stem.0 / stem.1          (conv, BN)
    stageK.dw.weight, stageK.pw.weight      -> stageK.uses.0.dw / .pw   (the shared convs, stored once)
    stageK.dw_bn_list.{i}, pw_bn_list.{i}   -> stageK.uses.{i}.dw_bn / .pw_bn   (BN of use i)
    classifier.0 / .1 / .4                  -> head_conv / head_bn / classifier

N, the width, the classes and the input channels are read off the tensors' shapes.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from reuse._errors import ReuseError
from reuse.models.lrunet import LruNet

__all__ = [
    "OFFICIAL_URL",
    "RELEASE_SHA256",
    "OfficialCheckpoint",
    "convert_official",
    "file_sha256",
    "load_official",
    "read_official",
]

OFFICIAL_URL = "https://github.com/okankop/CNN-layer-reuse/raw/master/pretrained/{file}"
"""Public address of a released file; ``OFFICIAL_URL.format(file="cifar10-lru14-ckpt-08934.t7")``."""

# (the authors' name, LruNet's name); each pattern must match a whole key.
_RENAMES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), repl)
    for pattern, repl in (
        (r"features\.0\.weight", r"stem.0.weight"),
        (r"features\.1\.(\w+)", r"stem.1.\1"),
        (r"(stage[1-4])\.(dw|pw)\.weight", r"\1.uses.0.\2.weight"),
        (r"(stage[1-4])\.(dw|pw)_bn_list\.(\d+)\.(\w+)", r"\1.uses.\3.\2_bn.\4"),
        (r"classifier\.0\.weight", r"head_conv.weight"),
        (r"classifier\.1\.(\w+)", r"head_bn.\1"),
        (r"classifier\.4\.(weight|bias)", r"classifier.\1"),
    )
)
_INFERRED = ("num_classes", "width_mult", "reuse", "in_chans")

RELEASE_SHA256: dict[str, str] = {
    "cifar10-lru1-ckpt-08391.t7": "6bac007ff78004d21884f7b0682f7978796f92a0e850cac6c1168ba756d81465",
    "cifar10-lru14-ckpt-08934.t7": "bc6991084834975d549134aa79cffaaf471a525649f2f0fa11151bdee9664bfe",
    "cifar100-lru1-2x-ckpt-06322.t7": "683a13b33520ac18d1fa2a9b74610cd9eba169c76f5ce11db89079fc0298dbe3",
    "cifar100-lru14-2x-ckpt-06884.t7": "62d4b4e9b8f3feff7ceb56c9ccf2f675615d3b369f38f8161f414f6b890a0da0",
    "fashionmnist-lru1-ckpt-09117.t7": "f0b96bdedd6cf8027b4aaecf360ee8c32c7dd60d6224a603196850c306b7f58e",
    "fashionmnist-lru10-ckpt-09346.t7": "aba6b4783ece6267aa761f6fff161b4cf651e005f92e6b3a842449aef1e2fe15",
}
"""sha256 of the authors' six release files (commit 1dd8d42 of okankop/CNN-layer-reuse), by file name."""


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_release_digest(path: Path) -> None:
    """A file named like one of the authors' releases must be that release, byte for byte."""
    expected = RELEASE_SHA256.get(path.name)
    if expected is None:
        return
    actual = file_sha256(path)
    if actual != expected:
        raise ReuseError(
            f"load_official: {path} is named like the authors' release file {path.name}, but its sha256 is "
            f"{actual}, not the release's {expected}: the file is corrupt or modified; download it again from "
            f"{OFFICIAL_URL.format(file=path.name)} (if it is a checkpoint of your own, give it another name)"
        )


@dataclass(frozen=True)
class OfficialCheckpoint:
    """One of the authors' files, read: their state dict (``module.`` removed) and what it says about itself."""

    state_dict: dict[str, Tensor] = field(repr=False)
    acc: float | None  # the test accuracy (%) the file reports
    epoch: int | None  # the epoch it was saved at
    config: dict[str, float | int]  # LruNet arguments read off the tensors: num_classes, width_mult, reuse, in_chans


def _strip_prefix(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state_dict.items()}


def _official_config(state_dict: dict[str, Tensor], where: str) -> dict[str, float | int]:
    """Read N, width, classes and input channels off the tensors of an official state dict."""
    needed = ("features.0.weight", "stage1.pw.weight", "classifier.4.weight")
    absent = [k for k in needed if k not in state_dict]
    if absent:
        raise ReuseError(
            f"load_official: {where} is not an LruNet checkpoint of the authors' code: it lacks {absent} "
            f"(it has {len(state_dict)} keys, e.g. {list(state_dict)[:3]}); "
            "pass one of their files (pretrained/*-lru*-ckpt-*.t7) or load your own state dict with load_state_dict"
        )
    uses = {int(m.group(1)) for k in state_dict if (m := re.fullmatch(r"stage1\.dw_bn_list\.(\d+)\.weight", k))}
    return {
        "num_classes": int(state_dict["classifier.4.weight"].shape[0]),
        "width_mult": state_dict["stage1.pw.weight"].shape[0] / 64,
        "reuse": max(uses) + 1 if uses else 0,
        "in_chans": int(state_dict["features.0.weight"].shape[1]),
    }


def convert_official(state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Rename the authors' keys to LruNet's.

    Args:
        state_dict: their state dict, with or without the ``module.`` prefix.

    Returns:
        ``(renamed, unknown)``: the tensors under LruNet's names, and the keys that have no place in LruNet.

    Example:
        >>> renamed, unknown = convert_official({"module.stage2.dw_bn_list.3.running_var": torch.ones(2), "x": None})
        >>> list(renamed), unknown
        (['stage2.uses.3.dw_bn.running_var'], ['x'])
    """
    renamed: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in _strip_prefix(state_dict).items():
        for pattern, repl in _RENAMES:
            if pattern.fullmatch(key):
                renamed[pattern.sub(repl, key)] = value
                break
        else:
            unknown.append(key)
    return renamed, unknown


def read_official(path: str | os.PathLike) -> OfficialCheckpoint:
    """Read one of the authors' ``.t7`` files (weights only, no code is unpickled).

    A file named like one of the six release files must have that file's sha256 (:data:`RELEASE_SHA256`).

    Args:
        path: the file, e.g. ``fashionmnist-lru10-ckpt-09346.t7``.

    Returns:
        An :class:`OfficialCheckpoint`. A bare state dict (without ``net``/``acc``/``epoch``) is accepted too.

    Raises:
        ReuseError: the file is missing, unreadable, or not an LruNet checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise ReuseError(
            f"load_official: no checkpoint file at {path}; download the authors' file from "
            f"{OFFICIAL_URL.format(file=path.name or '<file>')} and pass its path"
        )
    check_release_digest(path)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for truncated or foreign files
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        raise ReuseError(
            f"load_official: could not read {path} as a PyTorch checkpoint ({type(err).__name__}: {reason}); "
            "the file is truncated, corrupt or not a torch.save file: download it again and compare its sha256 "
            "with the one the authors' release lists"
        ) from None
    if isinstance(blob, dict) and isinstance(blob.get("net"), dict):
        state_dict, acc, epoch = blob["net"], blob.get("acc"), blob.get("epoch")
    elif isinstance(blob, dict) and all(isinstance(v, Tensor) for v in blob.values()):
        state_dict, acc, epoch = blob, None, None
    else:
        keys = list(blob)[:5] if isinstance(blob, dict) else "-"
        raise ReuseError(
            f"load_official: {path} holds a {type(blob).__name__} with keys {keys}, "
            "not the authors' {'net': state_dict, 'acc', 'epoch'} dict nor a state dict; pass one of their .t7 files"
        )
    state_dict = _strip_prefix(state_dict)
    config = _official_config(state_dict, str(path))
    return OfficialCheckpoint(
        state_dict=state_dict,
        acc=float(acc) if acc is not None else None,
        epoch=int(epoch) if epoch is not None else None,
        config=config,
    )


def _listing(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > limit else shown


def lrunet_state_dict(
    official: dict[str, Tensor], model: LruNet, where: str = "the checkpoint", caller: str = "load_official"
) -> dict[str, Tensor]:
    """The authors' state dict as a complete, strict state dict for ``model``.

    Every key of ``model.state_dict()`` must come from the file, except ``num_batches_tracked``, which their
    files never hold: it is taken from ``model`` (it only matters for ``momentum=None``).

    Raises:
        ReuseError: listing the keys the file lacks and the keys LruNet has no place for.
    """
    renamed, unknown = convert_official(official)
    expected = model.state_dict()
    for key, value in expected.items():
        if key.endswith("num_batches_tracked") and key not in renamed:
            renamed[key] = value.clone()
    missing = [k for k in expected if k not in renamed]
    unexpected = unknown + [k for k in renamed if k not in expected]
    if missing or unexpected:
        try:
            holds = ", ".join(f"{k}={v}" for k, v in _official_config(_strip_prefix(official), where).items())
        except ReuseError:
            holds = "no LruNet"
        raise ReuseError(
            f"{caller}: {where} (it holds {holds}) does not fit {_describe(model)}: "
            + (f"missing {_listing(missing)}" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"unexpected {_listing(unexpected)}" if unexpected else "")
            + "; build the model with the file's N, width, classes and input channels "
            "(reuse.models.load_official(path) reads them from the file)"
        )
    return renamed


def _describe(model: LruNet) -> str:
    return (
        f"LruNet(num_classes={model.num_classes}, width_mult={model.width_mult}, reuse={model.reuse}, "
        f"in_chans={model.in_chans})"
    )


def load_official(path: str | os.PathLike, **model_kwargs: object) -> LruNet:
    """Build the LruNet a released checkpoint describes and load its weights, strictly.

    The authors fed images as ``ToTensor()`` output in [0, 1], without mean/std normalisation: do the same.

    Args:
        path: one of the authors' ``.t7`` files.
        **model_kwargs: further :class:`LruNet` arguments (``drop_rate``; default 0.5, it does not change
            evaluation). ``num_classes``, ``width_mult``, ``reuse`` and ``in_chans`` are read from the file;
            passing one that disagrees is an error (use ``model.reset_classifier(k)`` to fine-tune to k classes).

    Returns:
        The model, in eval mode.

    Raises:
        ReuseError: missing or corrupt file, a key the model lacks or the file lacks, a shape that disagrees.

    Example:
        >>> model = load_official("fashionmnist-lru10-ckpt-09346.t7")  # doctest: +SKIP
        >>> model.reuse, model.in_chans  # doctest: +SKIP
        (10, 1)
    """
    ckpt = read_official(path)
    allowed = set(inspect.signature(LruNet.__init__).parameters) - {"self"}
    bad = sorted(set(model_kwargs) - allowed)
    if bad:
        raise ReuseError(f"load_official: unknown LruNet arguments {bad}; LruNet takes {sorted(allowed)}")
    for name in _INFERRED:
        if name in model_kwargs and model_kwargs[name] != ckpt.config[name]:
            raise ReuseError(
                f"load_official: {name}={model_kwargs[name]!r} disagrees with {path}, which holds "
                f"{name}={ckpt.config[name]!r}; leave {name} out (it is read from the file)"
                + (
                    "; to fine-tune to other classes call model.reset_classifier(k) after loading"
                    if name == "num_classes"
                    else ""
                )
            )
    kwargs = {**ckpt.config, **model_kwargs}
    try:
        model = LruNet(**kwargs)  # type: ignore[arg-type]
    except ReuseError as err:
        raise ReuseError(
            f"load_official: {path} describes an LruNet this library cannot build ({kwargs}): {err}"
        ) from None
    state_dict = lrunet_state_dict(ckpt.state_dict, model, str(path))
    expected = model.state_dict()
    wrong = [
        f"{k} {tuple(v.shape)} (model {tuple(expected[k].shape)})"
        for k, v in state_dict.items()
        if v.shape != expected[k].shape
    ]
    if wrong:
        raise ReuseError(
            f"load_official: {path} does not fit {_describe(model)}: shapes differ for {_listing(wrong, 4)}; "
            "the authors' code supports widths 1x and 2x only"
        )
    model.load_state_dict(state_dict, strict=True)
    return model.eval()
