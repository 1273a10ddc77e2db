"""The inference fast path of a folded LRU stage: all the uses of one :class:`~reuse.models.LruBlock` in one loop.

After :func:`reuse.optimize_for_inference`, each use of an LRU block is a gather, a depthwise conv with bias and a
grouped 1x1 conv with bias followed by the shortcut and a ReLU. At batch 1 each of those ops costs tens of
microseconds of framework overhead (a module call, a oneDNN weight reorder per call, a fresh buffer for the sum),
more than its arithmetic. :func:`folded_forward` runs the N uses of a stage without module calls, with oneDNN's
convolutions on weights reordered once (``torch.ops.mkldnn._reorder_convolution_weight``, cached per weight)
and the pointwise conv, the shortcut add and the ReLU fused into one call. These are the oneDNN ops that
``torch.compile``'s freezing emits on CPU; here they run in eager mode.

It applies only where it computes exactly what the uses compute one by one: every use folded (its BatchNorms
replaced by ``nn.Identity``, its convs plain ``nn.Conv2d`` with a bias), a float32 CPU input, no gradient asked
for, no graph being captured (``torch.compile``, ``torch.export``, tracing: those see the plain ops), oneDNN
available. Otherwise it declines (returns None) and :class:`~reuse.LayerReuse` runs the uses one by one.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from reuse.models._gather import gather_indices, gather_nhwc

__all__ = ["folded_forward"]

_SHAPES_KEPT = 4  # plans kept per stage, one per input shape (oneDNN picks its kernel by shape)
_DISABLED: list[str] = []  # why the fast path is off in this process (a oneDNN op failed once)


def folded_forward(uses: Sequence[nn.Module], x: Tensor, shuffle: nn.Module | None) -> Tensor | None:
    """The uses of a folded LRU stage applied in turn (the shuffle between two uses), or None where the fast path
    does not apply.

    Example:
        >>> import reuse
        >>> from reuse.models import LruNet
        >>> stage = reuse.optimize_for_inference(LruNet(reuse=3)).stage1
        >>> x = torch.randn(1, 64, 16, 16)
        >>> with torch.no_grad():
        ...     fast = folded_forward(stage.uses, x, stage.shuffle)
        ...     slow = x
        ...     for i, use in enumerate(stage.uses):
        ...         slow = use(stage.shuffle(slow) if i else slow)
        >>> torch.testing.assert_close(fast, slow)
        >>> folded_forward(LruNet(reuse=3).stage1.uses, x, None) is None  # BatchNorms not folded: declines
        True
    """
    if not _applies(x):
        return None
    try:
        return _run(uses, x, shuffle)
    except RuntimeError as err:  # a oneDNN build without these ops: say so once, then run the plain path
        _DISABLED.append(str(err).splitlines()[0])
        warnings.warn(
            f"LruBlock: the folded inference fast path failed ({_DISABLED[0]}); running the uses one by one",
            stacklevel=3,
        )
        return None


def _applies(x: Tensor) -> bool:
    """Whether the call needs nothing the fused oneDNN ops cannot give (the uses are checked by :func:`_plan`)."""
    if _DISABLED or not isinstance(x, Tensor) or x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 4:
        return False
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.compiler.is_exporting():
        return False
    return torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled


_Step = tuple[Tensor, Tensor, tuple, Tensor, Tensor, tuple]  # dw weight, bias, conv args; pw the same
_PLANS: WeakIdKeyDictionary = WeakIdKeyDictionary()  # uses -> (token, {input shape: [step per use]})


def _token(uses: Sequence[nn.Module]) -> tuple | None:
    """What the plan of ``uses`` depends on: the convs and norms of each use, their tensors' storage and version.
    None where a use is not a folded LRU block. Plain dict reads: this runs on every call."""
    token = []
    for use in uses:
        modules = use._modules
        dw, pw = modules["dw"], modules["pw"]
        if type(modules["dw_bn"]) is not nn.Identity or type(modules["pw_bn"]) is not nn.Identity:
            return None
        if type(dw) is not nn.Conv2d or type(pw) is not nn.Conv2d:
            return None
        for conv in (dw, pw):
            for t in (conv._parameters["weight"], conv._parameters["bias"]):
                if t is None:
                    return None
                token.append((id(t), t.data_ptr(), t._version, t.requires_grad))
    return tuple(token)


def _plan(uses: Sequence[nn.Module], shape: torch.Size) -> list[_Step] | None:
    """Per use, the reordered weights, biases and conv arguments for an input of ``shape``; made once per shape
    and kept while the uses' tensors are unchanged (an in-place update or ``load_state_dict`` makes it again)."""
    token = _token(uses)
    if token is None:
        return None
    entry = _PLANS.get(uses)
    if entry is None or entry[0] != token:
        entry = (token, {})
        _PLANS[uses] = entry
    plans = entry[1]
    plan = plans.get(shape)
    if plan is None:
        channels = uses[0].channels
        repeated = torch.Size((shape[0], 2 * channels, *shape[2:]))
        plan = [(*_prepared(use.dw, repeated), *_prepared(use.pw, repeated)) for use in uses]
        if len(plans) >= _SHAPES_KEPT:
            plans.pop(next(iter(plans)))
        plans[shape] = plan
    return plan


def _prepared(conv: nn.Conv2d, shape: torch.Size) -> tuple[Tensor, Tensor, tuple]:
    """``conv``'s weight in oneDNN's blocked layout for inputs of ``shape``, its bias, its conv arguments."""
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        raise _NotFoldable
    with torch.inference_mode(False), torch.no_grad():  # a normal tensor, usable in and out of inference mode
        weight = torch.ops.mkldnn._reorder_convolution_weight(
            conv.weight.detach(), conv.padding, conv.stride, conv.dilation, conv.groups, list(shape)
        )
    return weight, conv.bias.detach(), (conv.padding, conv.stride, conv.dilation, conv.groups)


class _NotFoldable(Exception):
    """A conv the fused ops do not take (string padding, a padding mode other than zeros)."""


def _run(uses: Sequence[nn.Module], x: Tensor, shuffle: nn.Module | None) -> Tensor | None:
    channels = uses[0].channels
    if x.shape[1] != channels:
        return None  # the block's own forward raises the error that says so
    try:
        plan = _plan(uses, x.shape)
    except _NotFoldable:
        return None
    if plan is None or (torch.is_grad_enabled() and (x.requires_grad or any(t[3] for t in _PLANS[uses][0]))):
        return None  # not folded, or a gradient is asked for
    groups, swap = (shuffle.groups, shuffle.swap_halves) if shuffle is not None else (0, False)
    first = gather_indices(channels, 0, False, x.device)[1]  # (2C,), the repeat alone
    later = gather_indices(channels, groups, swap, x.device)[1]  # (2C,), the shuffle and the repeat
    pointwise = torch.ops.mkldnn._convolution_pointwise
    for i, (dw_w, dw_b, dw_args, pw_w, pw_b, pw_args) in enumerate(plan):
        xr = gather_nhwc(x, later if i and groups else first)  # (B, 2C, H, W) channels_last
        shortcut = xr[:, ::2] if i and groups else x  # (B, C, H, W), the shuffled input
        y = pointwise(xr, dw_w, dw_b, *dw_args, "none", [], "")  # (B, 2C, H, W), depthwise conv
        x = pointwise.binary(y, shortcut, pw_w, pw_b, *pw_args, "add", None, "relu", [], "")  # (B, C, H, W)
    return x  # relu(pw(y) + shortcut), one oneDNN call a use
