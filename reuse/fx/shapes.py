"""The input and output shape of every module on an example input, from one forward pass on the ``meta`` device
(no arithmetic), without changing anything of the model."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from reuse._errors import ReuseError

__all__ = ["Shape", "default_inputs", "record_shapes"]

Shape = tuple[int, ...] | None  # a tensor's shape; None for what is not one tensor


def default_inputs(model: nn.Module) -> tuple[Tensor, ...]:
    """An example input from timm's ``pretrained_cfg`` or the first convolution's ``in_channels``."""
    like = next(model.parameters(), None)
    dtype = like.dtype if like is not None and like.is_floating_point() else torch.float32
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and isinstance(cfg.get("input_size"), (tuple, list)):
        return (torch.zeros(1, *cfg["input_size"], dtype=dtype, device="meta"),)
    sizes = {nn.Conv1d: (224,), nn.Conv2d: (224, 224), nn.Conv3d: (16, 112, 112)}
    for m in model.modules():
        for conv, size in sizes.items():
            if isinstance(m, conv):
                return (torch.zeros(1, m.in_channels, *size, dtype=dtype, device="meta"),)
    raise ReuseError(
        f"convert: cannot guess an input for {type(model).__name__} (no convolution, no timm pretrained_cfg); "
        "pass example_inputs=torch.randn(1, C, H, W) (or a tuple of the forward's tensors)"
    )


def _shape(x: object) -> Shape:
    return tuple(x.shape) if isinstance(x, Tensor) else None


@contextlib.contextmanager
def _swapped_tensors(model: nn.Module, make: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Within the context, every parameter and buffer of ``model`` is replaced by ``make(tensor)``; on exit the
    very same tensor objects are put back, whatever happened.

    Swapped in each module's own registries, once per module object: a module or tensor reachable by several
    paths (a :class:`~reuse.LayerReuse`'s shared conv, tied weights) gets one replacement, seen through every
    path, and is restored once. (``torch.func.functional_call`` keys tensors by name and did not restore a
    tensor reached by two names: it left meta tensors in the model.)
    """
    replacement: dict[int, Tensor] = {}
    saved: list[tuple[dict, str, Tensor]] = []
    try:
        for module in {id(m): m for m in model.modules()}.values():
            for registry in (module._parameters, module._buffers):
                for name, t in list(registry.items()):
                    if t is None:
                        continue
                    new = replacement.get(id(t))
                    if new is None:
                        new = make(t)
                        if new is not t and isinstance(t, nn.Parameter):
                            new = nn.Parameter(new, requires_grad=t.requires_grad)
                        replacement[id(t)] = new
                    saved.append((registry, name, t))
                    registry[name] = new
        yield
    finally:
        for registry, name, t in reversed(saved):
            registry[name] = t


def record_shapes(
    model: nn.Module, inputs: tuple, modules: Iterable[nn.Module]
) -> dict[int, list[tuple[Shape, Shape]]]:
    """Input and output shape of each call of ``modules`` in one forward pass of ``model``.

    The pass runs in eval mode (any batch size goes) on the ``meta`` device: parameters and buffers are
    swapped for meta tensors (:func:`_swapped_tensors`), so no arithmetic is done. A model that cannot run
    on meta runs for real, under ``no_grad`` and on copies of the buffers. The tensors, hooks and modes are
    put back as they were: nothing of the model is changed.
    """
    records: dict[int, list[tuple[Shape, Shape]]] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict, out: object) -> None:
        x = args[0] if len(args) == 1 and not kwargs else None
        records.setdefault(id(module), []).append((_shape(x), _shape(out)))

    handles = []
    for m in modules:
        try:
            handles.append(m.register_forward_hook(hook, with_kwargs=True))
        except Exception:  # a module that takes no hooks (TorchScript) is simply not measured
            pass
    modes = [(m, m.training) for m in model.modules()]
    for m, _ in modes:  # eval mode, set directly: a custom train() may do more than set the flag
        m.training = False
    try:
        try:
            meta = tuple(torch.empty_like(x, device="meta") if isinstance(x, Tensor) else x for x in inputs)
            with torch.no_grad(), _swapped_tensors(model, lambda t: torch.empty_like(t, device="meta")):
                model(*meta)
        except Exception:
            records.clear()
            device = _device_of(model)
            real = tuple(
                torch.zeros_like(x, device=device) if isinstance(x, Tensor) and x.is_meta else x for x in inputs
            )
            try:
                with torch.no_grad(), _swapped_buffers(model):
                    model(*real)
            except Exception as err:
                shapes = [tuple(x.shape) for x in inputs if isinstance(x, Tensor)]
                raise ReuseError(
                    f"convert: {type(model).__name__} fails on the example input of shape(s) {shapes}: "
                    f"{type(err).__name__}: {str(err).strip()[:300]}; pass example_inputs= with an input it accepts"
                ) from None
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training
    return records


@contextlib.contextmanager
def _swapped_buffers(model: nn.Module) -> Iterator[None]:
    """Buffers replaced by clones (parameters left alone) within the context: a real forward changes nothing."""
    buffers = {id(b) for b in model.buffers()}
    with _swapped_tensors(model, lambda t: t.clone() if id(t) in buffers else t):
        yield


def _device_of(model: nn.Module) -> torch.device:
    t = next(model.parameters(), None)
    if t is None:
        t = next(model.buffers(), None)
    return t.device if t is not None and not t.is_meta else torch.device("cpu")
