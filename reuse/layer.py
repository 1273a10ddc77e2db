"""Layer reuse: one block applied N times, with its own normalisation per use.

Köpüklü et al., "Convolutional Neural Networks with Layer Reuse" (ICIP 2019). Instead of stacking N
copies of a block, :class:`LayerReuse` feeds one block its own output N times. Convolution weights
(and every other parameter) are shared by all uses; each use has its own BatchNorm, because the
feature statistics differ from use to use; a channel shuffle between two uses lets grouped filters
see other channels at every use (none after the last use).

How it is stored: ``uses[0]`` is the block handed in; ``uses[i]`` for ``i > 0`` is a light copy of it
whose per-use modules (BatchNorm by default) are deep copies and whose other submodules are the very
same module objects as in ``uses[0]``. So ``parameters()`` yields every shared tensor once, a traced
graph calls ``uses.i.bn`` for the norm of use ``i`` and ``uses.0.conv`` for the shared conv, and
``state_dict()`` keeps shared tensors once, under ``uses.0.``.
"""

from __future__ import annotations

import contextlib
import copy
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.module import _addindent  # torch's indenting of nested reprs: no public equivalent
from torch.utils.checkpoint import checkpoint as _checkpoint

from reuse._checks import check_bool, check_int
from reuse._errors import ReuseError
from reuse._per_use import PerUse, is_batchnorm, is_norm, per_use_predicate
from reuse._tree import check_same_structure, clone_for_use, replace_at
from reuse.delta import DeltaRank, LowRank, check_rank, low_rank, resolve_rank, takes_delta
from reuse.shuffle import ChannelShuffle, check_shuffle

__all__ = ["LayerReuse", "PerUse", "is_batchnorm", "is_norm", "wrap"]


def _named_tensors(module: nn.Module) -> Iterator[tuple[str, Tensor]]:
    yield from module.named_parameters(remove_duplicate=False)
    yield from module.named_buffers(remove_duplicate=False)


def _drop_shared_keys(module: LayerReuse, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict post-hook: keep each shared tensor once, under ``uses.0.``."""
    for name in module.shared_names():
        for i in range(1, module.n):
            state_dict.pop(f"{prefix}uses.{i}.{name}", None)


def _fill_shared_keys(module: LayerReuse, state_dict: dict, prefix: str, *args: object) -> None:
    """Load pre-hook: every use reads a shared tensor from its single ``uses.0.`` entry.

    A state dict may also hold the tensor under a later use (one written by other code, or edited): that entry
    must then equal use 0's, since one tensor cannot take two values.
    """
    for name in module.shared_names():
        key0 = f"{prefix}uses.0.{name}"
        value = state_dict.get(key0)
        if value is None:
            continue
        for i in range(1, module.n):
            key = f"{prefix}uses.{i}.{name}"
            other = state_dict.setdefault(key, value)
            if other is not value and not _same_values(other, value):
                raise ReuseError(
                    f"LayerReuse.load_state_dict: {key} differs from {key0}, but the {module.n} uses share that "
                    "tensor, so it can take only one value; drop the later uses' entries (a LayerReuse saves a "
                    "shared tensor once, under uses.0.), or load the blocks into LayerReuse.from_blocks"
                )


def _same_values(a: object, b: object) -> bool:
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        return a is b
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.detach().cpu(), b.detach().cpu())


class LayerReuse(nn.Module):
    """Apply one block ``n`` times, with per-use normalisation and a channel shuffle between uses.

    The block is adopted, not copied: its parameters become the shared ones and its own BatchNorms
    serve use 0. Every other use starts from a copy of those BatchNorms (weights and running
    statistics), so wrapping a trained block keeps its statistics. Parameters are stored and counted
    once: ``sum(p.numel() for p in m.parameters())`` is the block's count plus the extra norms.

    Args:
        block: any module whose output has the shape of its input.
        n: number of uses, at least 1. ``n=1`` is the block itself.
        shuffle: shuffle the channels between two uses (never after the last).
        groups: groups of the shuffle; must divide the channels.
        swap_halves: exchange the two halves of the channels before the group shuffle (the paper's variant).
        per_use: which submodules get one copy per use (see :data:`PerUse`).
        checkpoint: activation checkpointing per use (non-reentrant, so DDP-safe): a training forward keeps
            only each use's input and recomputes the rest during backward. The recomputation restores the
            use's buffers, so BatchNorm running statistics advance exactly once per forward.
        delta_rank: relaxed reuse (:mod:`reuse.delta`): every use gets its own low-rank delta on each shared
            plain conv and linear, so that use ``i`` computes with ``W + B_i A_i``; an int (the rank, capped at
            each layer's full rank), a float in (0, 1] (a fraction of each layer's full rank) or 0 (none, the
            default: plain reuse). The deltas start at zero (``B = 0``); ``reuse.fx.convert(..., delta_rank=r)``
            starts them from the blocks it replaces. With deltas, every use (the first too) is a light copy of
            the block whose shared layers are wrapped (:class:`reuse.delta.LowRankConv`); the block handed in is
            not modified.
        compile_regions: under ``torch.compile``, each use is a nested compile region
            (``torch.compiler.nested_compile_region``): the block's code is traced and compiled once and the
            compiled region called for every use, instead of N inlined copies. Shorter cold compiles of deep
            reuse; the steady state can be slower (no fusion across uses: docs/performance.md). Eval mode only,
            and not with inductor's freezing: in training mode (a region may not update BatchNorm statistics in
            place) and under ``torch._inductor.config.freezing`` (a region cannot take frozen parameters) the
            uses are inlined, as of torch 2.14. No effect in eager mode, TorchScript or FX.

    A block may take the shuffle over: if its class sets ``fuses_shuffle = True``, its forward must accept
    ``forward(x, shuffle=(groups, swap_halves))`` and return ``block(channel_shuffle(x, groups, swap_halves))``,
    e.g. folding the shuffle into a gather it does anyway (:class:`reuse.models.LruBlock` does). LayerReuse then
    passes the shuffle's settings instead of applying it (in eager mode; TorchScript and FX graphs apply it).
    A block may also run all the uses itself: if its class has ``forward_uses(uses, x, shuffle)``, an eager call
    without checkpointing tries it first; it returns what the uses compute one by one (the shuffle between two
    uses), or None to decline, and the uses then run one by one (:class:`reuse.models.LruBlock` runs folded uses
    this way in inference, on fused oneDNN ops).

    Example:
        >>> block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        >>> m = LayerReuse(block, n=4)
        >>> m(torch.randn(2, 8, 5, 5)).shape
        torch.Size([2, 8, 5, 5])
        >>> sum(p.numel() for p in m.parameters())  # 576 conv weights once + 4 BatchNorms of 16
        640
    """

    __jit_unused_properties__ = ["block"]  # noqa: RUF012 - TorchScript's opt-out list
    compile_regions = False  # the default, also for modules pickled before the option existed

    def __init__(
        self,
        block: nn.Module,
        n: int = 8,
        *,
        shuffle: bool = True,
        groups: int = 2,
        swap_halves: bool = True,
        per_use: PerUse = "batchnorm",
        checkpoint: bool = False,
        delta_rank: DeltaRank = 0,
        compile_regions: bool = False,
    ) -> None:
        super().__init__()
        _check_args(block, n, groups)
        check_bool(shuffle, "shuffle", "LayerReuse")
        check_bool(swap_halves, "swap_halves", "LayerReuse")
        check_bool(checkpoint, "checkpoint", "LayerReuse")
        check_bool(compile_regions, "compile_regions", "LayerReuse")
        check_rank(delta_rank, "LayerReuse")
        self.n = n
        self.delta_rank = 0
        self.per_use = per_use
        self.checkpoint = checkpoint
        self.compile_regions = compile_regions
        self.shuffle = ChannelShuffle(groups, swap_halves) if shuffle else None
        is_per_use = per_use_predicate(per_use)
        self.uses = nn.ModuleList([block] + [clone_for_use(block, is_per_use) for _ in range(n - 1)])
        self._register_hooks()
        if delta_rank:
            self.add_deltas(delta_rank)

    @classmethod
    @torch.jit.ignore
    def from_blocks(cls, blocks: Sequence[nn.Module], **options: Any) -> LayerReuse:
        """Build a reused block from ``len(blocks)`` blocks of one structure: shared modules come from
        ``blocks[0]``, per-use module ``i`` is a copy of the one in ``blocks[i]``. The blocks are not modified.
        ``options`` are the keyword options of :class:`LayerReuse` (``shuffle``, ``groups``, ``per_use``, ...).

        Example:
            >>> blocks = [nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)) for _ in range(3)]
            >>> m = LayerReuse.from_blocks(blocks, shuffle=False)
            >>> m.n, m.uses[2][1] is blocks[2][1]
            (3, False)
        """
        if not blocks:
            raise ReuseError("LayerReuse.from_blocks: needs at least one block, got none")
        rank = check_rank(options.pop("delta_rank", 0), "LayerReuse.from_blocks")
        first = copy.deepcopy(blocks[0])
        self = cls(first, n=1, **options)
        is_per_use = per_use_predicate(self.per_use)
        for i, other in enumerate(blocks[1:], start=1):
            check_same_structure(blocks[0], other, i, is_per_use)
            self.uses.append(clone_for_use(first, is_per_use, source=other))
        self.n = len(blocks)
        if rank:
            self.add_deltas(rank)
        return self

    def add_deltas(self, rank: DeltaRank) -> None:
        """Wrap each shared plain conv and linear of every use in a low-rank delta of that use's own (zero at
        first, so the function is unchanged), as ``delta_rank=rank`` at construction does; for code that sets
        the shared weights first (``reuse.fx.convert``'s ``init="mean"``).

        Example:
            >>> m = LayerReuse(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)), n=2, shuffle=False)
            >>> m.add_deltas(2)
            >>> sorted(m.deltas(1)), m.delta_rank
            (['0'], 2)
        """
        check_rank(rank, "LayerReuse.add_deltas")
        if self.delta_rank:
            raise ReuseError(
                f"LayerReuse.add_deltas: this block already has deltas (delta_rank={self.delta_rank!r}); "
                "build it again with the rank wanted"
            )
        if not rank:
            return
        paths = self.shared_layer_paths()
        for i in range(self.n):
            private: set[nn.Module] = set()  # modules of this use copied here: safe to change
            wrapped: dict[int, nn.Module] = {}  # shared layer -> its wrapper in this use (a layer under two names)
            for path in paths:
                base = self.uses[i].get_submodule(path)
                if id(base) not in wrapped:
                    wrapped[id(base)] = low_rank(base, resolve_rank(rank, base))
                private.update(replace_at(self.uses, f"{i}.{path}", wrapped[id(base)], owned=private.__contains__))
        self.delta_rank = rank

    def shared_layer_paths(self) -> list[str]:
        """Paths (relative to a use, every alias) of the plain convs and linears that all uses share.

        Example:
            >>> LayerReuse(nn.Sequential(nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8)), n=3).shared_layer_paths()
            ['0']
        """
        first = dict(self.uses[0].named_modules(remove_duplicate=False))
        others = [dict(use.named_modules(remove_duplicate=False)) for use in self.uses[1:]]
        return [
            path
            for path, m in first.items()
            if path and takes_delta(m) and all(other.get(path) is m for other in others)
        ]

    def deltas(self, use: int) -> dict[str, nn.Module]:
        """The delta wrappers of use ``use``, by their path relative to the use (empty without deltas)."""
        return {name: m for name, m in self.uses[use].named_modules() if isinstance(m, LowRank)}

    def _register_hooks(self) -> None:
        self.register_state_dict_post_hook(_drop_shared_keys)
        self.register_load_state_dict_pre_hook(_fill_shared_keys)

    @property
    def block(self) -> nn.Module:
        """The block as seen by use 0; its non-per-use modules are the shared ones."""
        return self.uses[0]

    def shared_names(self) -> list[str]:
        """Names (relative to one use) of the parameters and buffers that every use shares.

        Example:
            >>> m = LayerReuse(nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)), n=2)
            >>> m.shared_names()
            ['0.weight', '0.bias']
        """
        per_use = [dict(_named_tensors(use)) for use in self.uses]
        return [name for name, t in per_use[0].items() if all(other.get(name) is t for other in per_use[1:])]

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self._forward_scripted(x)
        return self._forward_eager(x)

    def _forward_scripted(self, x: Tensor) -> Tensor:
        """What TorchScript compiles: the uses in a row, the shuffle between them (not fused into the block,
        no checkpointing, no checks)."""
        for i, use in enumerate(self.uses):
            if i > 0 and self.shuffle is not None:
                x = self.shuffle(x)  # (B, C, H, W), channels shuffled
            x = use(x)  # (B, C, H, W)
        return x

    @torch.jit.unused
    def _forward_eager(self, x: Tensor) -> Tensor:
        fx_tracing = isinstance(x, torch.fx.Proxy)
        check = not fx_tracing and not torch.jit.is_tracing()
        recompute = self.checkpoint and torch.is_grad_enabled() and check  # a traced graph holds no checkpoints
        forward_uses = getattr(type(self.uses[0]), "forward_uses", None)
        if forward_uses is not None and check and not recompute:
            y = forward_uses(self.uses, x, self.shuffle)
            if y is not None:
                return y  # (B, C, H, W)
        for i, use in enumerate(self.uses):
            shuffle = self.shuffle if i else None
            fuse = shuffle is not None and getattr(use, "fuses_shuffle", False) and not fx_tracing
            if recompute:
                y = _checkpoint(
                    _apply_use, use, x, shuffle, fuse, use_reentrant=False, context_fn=_restore_buffers_of(use)
                )
            elif self.compile_regions and not self.training and torch.compiler.is_compiling() and not _freezing():
                y = _use_region(use, x, shuffle, fuse)  # (B, C, H, W), one compiled region for every use
            else:
                y = _apply_use(use, x, shuffle, fuse)  # (B, C, H, W)
            if i == 0 and check:
                self._check_first_use(x, y)
            x = y
        return x

    @torch.jit.unused
    def _check_first_use(self, x: Tensor, y: object) -> None:
        name = type(self.uses[0]).__name__
        if not isinstance(y, Tensor):
            raise ReuseError(
                f"LayerReuse: block {name} returned {type(y).__name__}, not a tensor; "
                "layer reuse feeds a block its own output, so it needs a block that maps a tensor to a tensor"
            )
        if y.shape != x.shape:
            raise ReuseError(
                f"LayerReuse: block {name} changes the shape {tuple(x.shape)} -> {tuple(y.shape)}; "
                "layer reuse feeds a block its own output, so the block must keep the shape "
                "(reuse the blocks after a stage's first, downsampling block)"
            )
        if self.shuffle is not None and self.n > 1:
            try:
                check_shuffle(x.shape[1], self.shuffle.groups, self.shuffle.swap_halves)
            except ReuseError as err:
                raise ReuseError(
                    f"LayerReuse around {name} with input shape {tuple(x.shape)}: {err}; or pass shuffle=False"
                ) from None

    def __repr__(self) -> str:
        block = _addindent(repr(self.uses[0]), 2)
        per_use = self.per_use if isinstance(self.per_use, str) else getattr(self.per_use, "__name__", "custom")
        ckpt = ", checkpoint=True" if self.checkpoint else ""
        ckpt += ", compile_regions=True" if self.compile_regions else ""
        delta = f", delta_rank={self.delta_rank!r}" if self.delta_rank else ""
        return f"LayerReuse(n={self.n}, shuffle={self.shuffle!r}, per_use={per_use!r}{ckpt}{delta}, block={block})"


def _apply_use(use: nn.Module, x: Tensor, shuffle: ChannelShuffle | None, fuse: bool) -> Tensor:
    """One use: ``use(shuffle(x))``, the shuffle handed to the block when it takes it over."""
    if shuffle is None:
        return use(x)  # (B, C, H, W)
    if fuse:
        return use(x, shuffle=(shuffle.groups, shuffle.swap_halves))  # (B, C, H, W), shuffled in the block's gather
    return use(shuffle(x))  # (B, C, H, W)


@torch.compiler.assume_constant_result
def _freezing() -> bool:
    """Whether inductor's freezing is on (read when the graph is traced; False where inductor is not loaded).
    Nested compile regions cannot take frozen parameters (torch 2.14: dynamo fails with "Freevar has no source"),
    so with freezing the uses are inlined."""
    inductor_config = sys.modules.get("torch._inductor.config")
    return bool(inductor_config is not None and inductor_config.freezing)


@torch.compiler.nested_compile_region
def _use_region(use: nn.Module, x: Tensor, shuffle: ChannelShuffle | None, fuse: bool) -> Tensor:
    """:func:`_apply_use` as a nested compile region: compiled once, its parameters inputs of the region."""
    return _apply_use(use, x, shuffle, fuse)  # (B, C, H, W)


class _RestoreBuffers:
    """Context of a checkpoint's recomputation: on exit, put back every buffer of ``module`` that the
    recomputed forward changed (BatchNorm running statistics, ``num_batches_tracked``), so that state
    advances once per forward, not twice. Unchanged buffers are left alone (no version bump)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __enter__(self) -> None:
        self.saved = [(b, b.clone()) for b in self.module.buffers()]

    def __exit__(self, *exc: object) -> None:
        with torch.no_grad():
            for buffer, before in self.saved:
                if not torch.equal(buffer, before):
                    buffer.copy_(before)
        self.saved = []


def _restore_buffers_of(use: nn.Module) -> Callable[[], tuple[contextlib.AbstractContextManager, _RestoreBuffers]]:
    return lambda: (contextlib.nullcontext(), _RestoreBuffers(use))


def _check_args(block: object, n: object, groups: object) -> None:
    if not isinstance(block, nn.Module):
        raise ReuseError(
            f"LayerReuse: block must be an nn.Module, got {type(block).__name__}; "
            "wrap a module such as nn.Sequential(...) or your block class"
        )
    check_int(n, "n", "LayerReuse", about="the number of uses; n=1 is no reuse")
    check_int(groups, "groups", "LayerReuse", about="it must divide the channels")


def wrap(block: nn.Module, n: int = 8, shuffle: bool = True, groups: int = 2, **options: Any) -> LayerReuse:
    """Reuse ``block`` ``n`` times: shared weights, per-use BatchNorm, the paper's shuffle between uses.

    ``wrap(block, n, shuffle, groups, **options)`` is ``LayerReuse(block, n, shuffle=shuffle, groups=groups,
    **options)``; see :class:`LayerReuse` for the arguments and the other options (``swap_halves``,
    ``per_use``, ``checkpoint``, ``delta_rank``, ``compile_regions``).

    Example:
        >>> import reuse
        >>> block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16))
        >>> m = reuse.wrap(block, n=8)
        >>> m.n, m(torch.randn(1, 16, 4, 4)).shape
        (8, torch.Size([1, 16, 4, 4]))
    """
    return LayerReuse(block, n, shuffle=shuffle, groups=groups, **options)
