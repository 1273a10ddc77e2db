"""Refitting the layers of a changed network to what the original computed: :func:`refit`.

Once some layers of a trained network change (runs of blocks tied by :func:`reuse.fx.convert`, channels pruned),
every layer after them receives inputs it was not trained on. Such a layer, with a twin in the original network
(the same name, kind and output shape), can be fitted in closed form to give what its twin gave: with ``Xh`` the
rows it multiplies by its weight (im2col rows for a conv) on the calibration data, and ``Y`` its twin's outputs
there, the least-squares weight is ``A = Y^T Xh (Xh^T Xh + l I)^-1`` (a bias, where the layer has one, fitted with
it; the ridge ``l`` is 1e-5 of the mean diagonal of ``Xh^T Xh``, which keeps it invertible).
The layers are fitted in the order the network calls them, the running statistics re-estimated before each
(:func:`reuse.calibrate`), so each layer is fitted on the inputs the layers before it, as fitted, give it. A layer
whose inputs are those of its twin keeps its weights. No gradient step is taken.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reuse._checks import check_bool, check_module
from reuse._data import CalibrationData, model_device, take_batches
from reuse._errors import ReuseError
from reuse.calibration import reestimate, running_stat_modules

__all__ = ["layer_rows", "refit", "refit_layers", "ridged", "twins"]

_RIDGE = 1e-5  # of the mean eigenvalue of a second moment: keeps it invertible where the data span too little


class _Stop(Exception):
    """Raised by a hook once the layer being fitted has run: the rest of the forward pass is not needed."""


def refit(
    model: nn.Module, reference: nn.Module, data: CalibrationData, *, images: int = 2000, inplace: bool = False
) -> nn.Module:
    """Fit each layer of ``model`` that has a twin in ``reference`` to give, on the inputs it now receives, what
    its twin gives in ``reference``, in closed form (least squares), with no gradient step.

    A twin is the module of ``reference`` with the same name, of the same kind (``nn.Conv2d`` with zero padding
    or ``nn.Linear``), with the same number of outputs (and, for a conv, the same kernel, stride, padding,
    dilation and groups) and the same output shape on the data; each is called once per forward pass. The inputs
    may differ in size (a pruned layer before). Layers are fitted in the order ``model`` calls them, its running
    statistics re-estimated before each layer and after the last (as :func:`reuse.calibrate` does); a layer whose
    inputs equal its twin's on every batch keeps its weights. Use it after a transform that changed some layers
    of a trained network: ``reuse.fx.convert(..., init="refit")`` runs it on the layers outside the runs.

    Args:
        model: the changed network; not changed unless ``inplace=True``.
        reference: the network as trained (only read; run in eval mode).
        data: unlabeled inputs as both networks take them: a tensor ``(N, C, H, W)`` or an iterable of batches.
        images: how many inputs of ``data`` to read, at most.
        inplace: refit ``model`` itself instead of a deep copy.

    Returns:
        The refitted model (``model`` itself when ``inplace=True``).

    Raises:
        ReuseError: no layer of ``model`` has a twin in ``reference``, empty or malformed data, or a forward pass
            that fails on the data.

    Example:
        >>> import torch, reuse
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> ref = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
        >>> net = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3)).eval()  # the same shapes, new weights
        >>> net[0].load_state_dict(ref[0].state_dict())
        <All keys matched successfully>
        >>> net[0].weight.data[:, 0] = 0.0  # the first layer changed: it no longer reads input 0
        >>> x = torch.randn(500, 6)
        >>> fixed = reuse.refit(net, ref, x)
        >>> err = lambda m: float((m(x) - ref(x)).pow(2).mean().detach())
        >>> err(fixed) < err(net)  # the second layer refitted to the first one's new outputs
        True
        >>> torch.equal(fixed[0].weight, net[0].weight)  # the first layer's inputs are its twin's: kept
        True
    """
    check_module(model, "refit")
    check_module(reference, "refit")
    check_bool(inplace, "inplace", "refit")
    batches = take_batches(data, images, "refit")
    if not twins(model, reference):
        raise ReuseError(
            f"refit: no layer of {type(model).__name__} has a twin in the reference {type(reference).__name__} "
            "(a Conv2d or Linear of the same name, kind and output size); give the network the model was made from"
        )
    work = model if inplace else copy.deepcopy(model)
    refit_layers(work, reference, batches)
    return work


def twins(model: nn.Module, reference: nn.Module) -> list[str]:
    """Names of the layers of ``model`` that may have a twin in ``reference``: ``nn.Conv2d`` (zero padding) or
    ``nn.Linear`` of the same name, kind, number of outputs and, for a conv, geometry (the output shape on the
    data is checked when fitting).

    Example:
        >>> a = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1), nn.Flatten(), nn.Linear(4, 2))
        >>> b = nn.Sequential(nn.Conv2d(3, 6, 3), nn.Conv2d(6, 4, 1), nn.Flatten(), nn.Linear(4, 2))  # pruned
        >>> twins(b, a)  # the first conv lost outputs; the others keep theirs
        ['1', '3']
    """
    ref = dict(reference.named_modules())
    return [name for name, m in model.named_modules() if name in ref and _same_kind(m, ref[name])]


def _same_kind(m: nn.Module, r: nn.Module) -> bool:
    if type(m) is not type(r):
        return False
    if type(m) is nn.Linear:
        return m.out_features == r.out_features
    if type(m) is nn.Conv2d:
        geometry = ("out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")
        return m.padding_mode == "zeros" and all(getattr(m, a) == getattr(r, a) for a in geometry)
    return False


@torch.no_grad()
def refit_layers(model: nn.Module, reference: nn.Module, batches: Sequence[Tensor]) -> list[str]:
    """Refit, in place and in call order, each layer of ``model`` with a twin in ``reference`` whose inputs differ
    from its twin's on ``batches`` (the work of :func:`refit`); returns the names of the layers refitted."""
    order = _call_order(model, reference, twins(model, reference), batches[0])
    stats = bool(running_stat_modules(model))
    done = []
    for name in order:
        if stats:
            reestimate(model, list(batches))
        if _fit_layer(model, reference, name, batches):
            done.append(name)
    if stats and done:
        reestimate(model, list(batches))
    return done


def _call_order(model: nn.Module, reference: nn.Module, names: Sequence[str], x: Tensor) -> list[str]:
    """``names`` in the order ``model`` calls them on ``x``, keeping those called once by both networks."""
    calls: dict[str, list[int]] = {n: [0, 0] for n in names}
    order: list[str] = []
    hooks = []
    for side, net in enumerate((model, reference)):
        mods = dict(net.named_modules())
        for n in names:

            def seen(_m: nn.Module, _a: tuple, n: str = n, side: int = side) -> None:
                calls[n][side] += 1
                if side == 0:
                    order.append(n)

            hooks.append(mods[n].register_forward_pre_hook(seen))
    try:
        _run(model, x, "model")
        _run(reference, x, "reference")
    finally:
        for h in hooks:
            h.remove()
    return [n for n in dict.fromkeys(order) if calls[n] == [1, 1]]


def _fit_layer(model: nn.Module, reference: nn.Module, name: str, batches: Sequence[Tensor]) -> bool:
    """Least squares of ``model``'s layer ``name`` onto its twin's outputs; False where the inputs are the twin's
    on every batch or the output shapes differ (left as it is)."""
    layer, twin = model.get_submodule(name), reference.get_submodule(name)
    bias = layer.bias is not None
    cross: Tensor | float = 0.0  # (g, out/g, D): Y^T Xh
    own: Tensor | float = 0.0  # (g, D, D): Xh^T Xh
    changed = False
    for x in batches:
        xh, yh = _run_to(model, layer, x, "model")
        xr, y = (t.to(xh.device) for t in _run_to(reference, twin, x, "reference"))  # the reference may be elsewhere
        if yh.shape != y.shape:
            return False  # the same kind of layer, but another output size here: not a twin
        changed = changed or xh.shape != xr.shape or not torch.equal(xh, xr)
        rows = layer_rows(layer, xh)  # (g, samples, D)
        if bias:
            rows = torch.cat([rows, rows.new_ones(*rows.shape[:2], 1)], -1)  # (g, samples, D + 1)
        target = _out_rows(layer, y)  # (g, samples, out/g)
        cross = cross + target.transpose(1, 2) @ rows
        own = own + rows.transpose(1, 2) @ rows
    if not changed:
        return False
    a = torch.linalg.solve(ridged(own), cross.transpose(1, 2)).transpose(1, 2)  # (g, out/g, D): Y^T Xh (Xh^T Xh)^-1
    if bias:
        layer.bias.copy_(a[..., -1].reshape(layer.bias.shape).to(layer.bias))
        a = a[..., :-1]
    layer.weight.copy_(a.reshape(layer.weight.shape).to(layer.weight))
    return True


def _run_to(net: nn.Module, layer: nn.Module, x: Tensor, who: str) -> tuple[Tensor, Tensor]:
    """What ``layer`` receives and gives when ``net`` runs on ``x`` in eval mode; the pass stops there."""
    got: dict[str, Tensor] = {}

    def grab(_m: nn.Module, args: tuple, out: Tensor) -> None:
        got["x"], got["y"] = args[0].detach(), out.detach()
        raise _Stop

    hook = layer.register_forward_hook(grab)
    try:
        _run(net, x, who)
    finally:
        hook.remove()
    return got["x"], got["y"]


def _run(net: nn.Module, x: Tensor, who: str) -> None:
    """``net(x)`` in eval mode (modes given back), stopping quietly where a hook raises :class:`_Stop`."""
    modes = [(m, m.training) for m in net.modules()]
    try:
        net.eval()
        net(x.to(model_device(net)))
    except _Stop:
        pass
    except Exception as err:
        raise ReuseError(
            f"refit: the {who} ({type(net).__name__}) failed on a batch of shape {tuple(x.shape)} "
            f"({type(err).__name__}: {err}); give inputs as both networks take them"
        ) from None
    finally:
        for m, mode in modes:
            m.training = mode


def ridged(c: Tensor) -> Tensor:
    """``c + l I`` per group, ``l`` 1e-5 of the mean diagonal of ``c`` (second moments ``(g, D, D)``)."""
    scale = torch.diagonal(c, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)  # (g,)
    return c + _RIDGE * scale[:, None, None] * torch.eye(c.shape[-1], dtype=c.dtype, device=c.device)


def layer_rows(layer: nn.Module, x: Tensor) -> Tensor:
    """The rows ``layer`` (``nn.Linear`` or ``nn.Conv2d``) multiplies by its weight, per group, in float64:
    ``(g, samples, D)``."""
    if isinstance(layer, nn.Linear):
        return x.reshape(1, -1, x.shape[-1]).double()  # (1, samples, in)
    cols = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)  # (B, C*kh*kw, L)
    cols = cols.reshape(x.shape[0], layer.groups, -1, cols.shape[-1])  # (B, g, C/g*kh*kw, L)
    return cols.permute(1, 0, 3, 2).reshape(layer.groups, -1, cols.shape[2]).double()  # (g, B*L, D)


def _out_rows(layer: nn.Module, y: Tensor) -> Tensor:
    """A layer's outputs as rows per group, in float64: ``(g, samples, out/g)``."""
    if isinstance(layer, nn.Linear):
        return y.reshape(1, -1, y.shape[-1]).double()  # (1, samples, out)
    b, o = y.shape[:2]
    y = y.reshape(b, layer.groups, o // layer.groups, -1)  # (B, g, O/g, L)
    return y.permute(1, 0, 3, 2).reshape(layer.groups, -1, o // layer.groups).double()  # (g, B*L, O/g)
