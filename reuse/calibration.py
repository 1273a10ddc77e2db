"""Re-estimating running statistics from unlabeled data: :func:`calibrate`.

A network whose weights changed without training (blocks tied by :func:`reuse.fx.convert`, weights averaged,
merged or pruned) still normalises with the statistics of the network it was: every BatchNorm then shifts and
scales its input by the wrong amounts, and the errors compound from layer to layer ("variance collapse", Jordan et
al., "REPAIR", ICLR 2023). Passing a few thousand unlabeled images through the network in training mode, with no
gradient step, measures the statistics of the network as it now is. With layer reuse each use's BatchNorm is its
own module, so each use gets the statistics of what it sees.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from reuse._checks import check_bool, check_module
from reuse._data import CalibrationData, model_device, take_batches
from reuse._errors import ReuseError

__all__ = ["calibrate", "reestimate", "running_stat_modules"]


def running_stat_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` whose running statistics :func:`calibrate` re-estimates: BatchNorm (1d/2d/3d,
    SyncBatchNorm, subclasses such as timm's ``BatchNormAct2d``) and InstanceNorm with ``track_running_stats``.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.BatchNorm2d(8, track_running_stats=False))
        >>> [type(m).__name__ for m in running_stat_modules(net)]
        ['BatchNorm2d']
    """
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats and m.running_mean is not None
    ]


def calibrate(model: nn.Module, data: CalibrationData, *, images: int = 2000, inplace: bool = False) -> nn.Module:
    """Re-estimate every running statistic of ``model`` from unlabeled inputs, with no gradient step.

    Each BatchNorm (and InstanceNorm with running statistics) forgets its statistics and measures them again as
    the plain average over the calibration batches (``momentum=None``), seeing what the model as it now is feeds
    it; every other module runs in eval mode (no dropout). Nothing else changes: weights, modes and momentums are
    as they were. A norm that no batch reaches keeps its old statistics (with a warning).

    Args:
        model: any network with running statistics; not changed unless ``inplace=True``.
        data: inputs as the model takes them (float, normalised as in training): a tensor ``(N, C, H, W)`` or an
            iterable of batches (a ``DataLoader``; of ``(inputs, labels)`` pairs, only the inputs are read).
        images: how many inputs to read (at most); the last batch is cut to size.
        inplace: calibrate ``model`` itself instead of a deep copy.

    Returns:
        The calibrated model (``model`` itself when ``inplace=True``).

    Raises:
        ReuseError: a model without running statistics, empty or malformed data, or a forward pass that fails on
            the data (with the batch's shape).

    Example:
        >>> import torch, reuse
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
        >>> x = 3 + 2 * torch.randn(64, 3, 8, 8)
        >>> fixed = reuse.calibrate(net, x)
        >>> bool(fixed[1].running_mean.abs().sum() > 0), float(net[1].running_mean.abs().sum())  # input untouched
        (True, 0.0)
        >>> fixed.training  # the mode handed in
        False
    """
    check_module(model, "calibrate")
    check_bool(inplace, "inplace", "calibrate")
    if not running_stat_modules(model):
        raise ReuseError(
            f"calibrate: {type(model).__name__} has no running statistics to re-estimate (no BatchNorm, nor "
            "InstanceNorm with track_running_stats=True); calibration changes nothing in such a model"
        )
    batches = take_batches(data, images, "calibrate")
    work = model if inplace else copy.deepcopy(model)
    reestimate(work, batches)
    return work


@torch.no_grad()
def reestimate(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """Reset and re-measure the running statistics of ``model`` in place (the work of :func:`calibrate`)."""
    norms = running_stat_modules(model)
    modes = [(m, m.training) for m in model.modules()]
    saved = [(m, m.momentum, copy.deepcopy(m.state_dict())) for m in norms]
    device = model_device(model)
    try:
        model.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # the plain average over all batches
            m.train()
        for i, x in enumerate(batches):
            try:
                model(x.to(device))
            except Exception as err:
                raise ReuseError(
                    f"calibrate: {type(model).__name__} failed on batch {i} of shape {tuple(x.shape)} "
                    f"({type(err).__name__}: {err}); give inputs as the model takes them"
                ) from None
    except BaseException:
        for m, _, state in saved:
            m.load_state_dict(state)
        raise
    finally:
        for m, momentum, _ in saved:
            m.momentum = momentum
        for m, mode in modes:
            m.training = mode
    unreached = [m for m, _, _ in saved if int(m.num_batches_tracked) == 0]
    for m, _, state in saved:
        if int(m.num_batches_tracked) == 0:
            m.load_state_dict(state)
    if unreached:
        names = {id(m): n for n, m in model.named_modules()}
        warnings.warn(
            f"calibrate: {len(unreached)} norm(s) saw no batch and keep their old statistics "
            f"({', '.join(names.get(id(m), '?') for m in unreached[:4])}): the forward pass never calls them",
            stacklevel=3,
        )
