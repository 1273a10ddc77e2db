"""Count what a reused network costs: parameters stored and unrolled, multiply-adds per call, weight traffic.

Layer reuse stores a block's weights once and runs them N times. So a profiler must count compute per
*call* (a block used N times costs N times) while counting storage once; and the memory traffic of the
weights differs with caching: read once per forward if the reused weights stay in cache (the paper's
argument), N times if every use fetches them again. Counters that attach to modules and count each module
once get the compute of a reused block wrong; :func:`profile` counts with ``torch.utils.flop_counter``,
which sees every call, and counts weight reads with a forward pre-hook per call on every module that owns
parameters.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from reuse._checks import check_module
from reuse._errors import ReuseError

__all__ = ["ModuleCost", "Profile", "profile"]


@dataclass(frozen=True)
class ModuleCost:
    """The costs of one direct child of the profiled model (or ``(self)``: the model's own parameters)."""

    name: str
    params: int  # unique parameters, as stored
    params_unrolled: int  # each parameter counted once per call that reads it
    macs: int  # multiply-adds of one forward, counted per call


@dataclass(frozen=True)
class Profile:
    """What one forward pass of a model costs. Printing it shows a table next to the unrolled equivalent.

    ``params`` counts each stored tensor once (shared weights once); ``params_unrolled`` counts each
    parameter once per module call that reads it, which is the size of the same network with N independent
    blocks. ``macs`` and ``flops`` count every call (``flops`` is ``torch.utils.flop_counter``'s total:
    convolutions and matrix products, 2 FLOPs per multiply-add; element-wise work and BatchNorm are not
    counted). ``weight_bytes_cached`` reads every parameter used once per forward (reused weights stay in
    cache); ``weight_bytes_uncached`` reads it once per call (N times for a block used N times).
    """

    params: int  # unique parameters, as stored
    params_unrolled: int  # as if every use had its own weights
    macs: int  # multiply-adds per forward, counted per call
    flops: int  # FLOPs per forward (torch.utils.flop_counter), counted per call
    weight_bytes_cached: int  # bytes of parameters read per forward, each parameter once
    weight_bytes_uncached: int  # bytes of parameters read per forward, once per call that reads them
    input_size: tuple[int, ...]  # the input the forward was run on
    modules: tuple[ModuleCost, ...] = ()  # per direct child of the model (the table skips those costing nothing)

    def __str__(self) -> str:
        rows = [
            ("parameters", self.params, self.params_unrolled, _count),
            ("multiply-adds (MACs)", self.macs, self.macs, _count),
            ("FLOPs", self.flops, self.flops, _count),
            ("weight bytes read, cached", self.weight_bytes_cached, self.weight_bytes_uncached, _bytes),
            ("weight bytes read, uncached", self.weight_bytes_uncached, self.weight_bytes_uncached, _bytes),
        ]
        lines = [
            f"Profile of one forward, input {tuple(self.input_size)}",
            f"{'':30}{'reused':>14}{'unrolled':>14}",
            *(f"{name:30}{fmt(a):>14}{fmt(b):>14}" for name, a, b, fmt in rows),
        ]
        if self.modules:
            lines += ["", f"{'module':30}{'params':>14}{'unrolled':>14}{'MACs':>14}"]
            lines += [
                f"{m.name:30}{_count(m.params):>14}{_count(m.params_unrolled):>14}{_count(m.macs):>14}"
                for m in self.modules
                if m.params or m.macs
            ]
        return "\n".join(lines)


def _shape(input_size: object) -> tuple[int, ...]:
    """``input_size`` as a shape of positive ints, or a ReuseError."""
    rule = "profile: input_size must be a shape of positive ints, batch included, such as (1, 3, 32, 32)"
    if isinstance(input_size, int) or not isinstance(input_size, Sequence) or isinstance(input_size, str):
        raise ReuseError(f"{rule}; got {input_size!r}")
    shape = tuple(input_size)
    if not shape or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        raise ReuseError(f"{rule}; got {shape}")
    return shape


def _count(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def _bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


@torch.no_grad()
def profile(
    model: nn.Module,
    input_size: Sequence[int],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Profile:
    """Run one forward of ``model`` on zeros of ``input_size`` and count its costs, per call.

    The forward runs in eval mode without gradients (BatchNorm running statistics are not touched) and the
    model's train/eval modes are restored afterwards. A parameter counts as read each time the module that
    owns it directly is called.

    Args:
        model: any module taking one tensor.
        input_size: the input's shape, batch included: ``(1, 3, 32, 32)``.
        dtype: the input's dtype.
        device: the input's device (default: where the model's first parameter is).

    Returns:
        A :class:`Profile`.

    Example:
        >>> import reuse
        >>> block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        >>> p = reuse.profile(reuse.wrap(block, n=4), (1, 8, 16, 16))
        >>> p.macs == 4 * 8 * 8 * 9 * 16 * 16, p.params, p.params_unrolled  # 576 + 4 x 16, unrolled 4 x 592
        (True, 640, 2368)
    """
    check_module(model, "profile")
    shape = _shape(input_size)
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else "cpu"

    reads: Counter[int] = Counter()  # id(parameter) -> calls that read it
    child_macs: Counter[str] = Counter()
    owners = {m for m in model.modules() if next(m.parameters(recurse=False), None) is not None}
    modes = {m: m.training for m in model.modules()}
    from torch.utils.flop_counter import FlopCounterMode  # here, not at import: it pulls in triton (~0.2 s)

    flop_counter = FlopCounterMode(display=False)

    def count_reads(module: nn.Module, args: object) -> None:
        for p in module.parameters(recurse=False):
            reads[id(p)] += 1

    def flops_now() -> int:
        return flop_counter.get_total_flops()

    handles = [m.register_forward_pre_hook(count_reads) for m in owners]
    for name, child in model.named_children():
        start: list[int] = []
        handles.append(child.register_forward_pre_hook(lambda m, a, s=start: s.append(flops_now())))
        handles.append(
            child.register_forward_hook(lambda m, a, o, s=start, n=name: child_macs.update({n: flops_now() - s.pop()}))
        )
    try:
        for m in modes:  # eval mode, set directly: a custom train() may do more than set the flag
            m.training = False
        with flop_counter:
            try:
                model(torch.zeros(shape, dtype=dtype, device=device))
            except Exception as err:  # the model's own error, whatever its type: say which input it got
                msg = (str(err).strip().splitlines() or [""])[0][:300]
                hint = (
                    f"; input_size includes the batch: try (1, {', '.join(map(str, shape))})" if len(shape) == 3 else ""
                )
                raise ReuseError(
                    f"profile: {type(model).__name__} fails on an input of shape {shape}: "
                    f"{type(err).__name__}: {msg}{hint}"
                ) from None
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training

    def params(module: nn.Module, unrolled: bool, seen: set[int]) -> int:
        total = 0
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * (max(1, reads[id(p)]) if unrolled else 1)
        return total

    unique = {id(p): p for p in model.parameters()}.values()
    flops = flop_counter.get_total_flops()
    seen_plain: set[int] = set()
    seen_unrolled: set[int] = set()
    modules = tuple(
        ModuleCost(name, params(child, False, seen_plain), params(child, True, seen_unrolled), child_macs[name] // 2)
        for name, child in model.named_children()
    )
    own = [p for p in model.parameters(recurse=False) if id(p) not in seen_plain]
    if own:
        n_own = sum(p.numel() for p in own)
        modules += (ModuleCost("(self)", n_own, sum(p.numel() * max(1, reads[id(p)]) for p in own), 0),)
    return Profile(
        params=sum(p.numel() for p in unique),
        params_unrolled=sum(p.numel() * max(1, reads[id(p)]) for p in unique),
        macs=flops // 2,
        flops=flops,
        weight_bytes_cached=sum(p.numel() * p.element_size() for p in unique if reads[id(p)]),
        weight_bytes_uncached=sum(p.numel() * p.element_size() * reads[id(p)] for p in unique),
        input_size=shape,
        modules=modules,
    )
