"""The build step of :func:`reuse.fx.convert`: the :class:`~reuse.LayerReuse` of each planned run, built from its
blocks (aligned copies with ``align``) with shared weights from the first block, their mean, or fitted to what the
blocks computed on the calibration data, and with a delta rank. Nothing of the model is changed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from reuse.delta import DeltaRank, init_from_blocks
from reuse.fx.fit import align_blocks, fit_layers, owned_copies, refine_layers, run_inputs
from reuse.fx.options import FITTED, Options
from reuse.fx.plan import PlannedRun
from reuse.layer import LayerReuse

__all__ = ["Built", "Prepared", "build", "prepare"]


@dataclass(frozen=True, eq=False)
class Prepared:
    """A run's blocks as they will be tied, and what its first block receives on the calibration data."""

    blocks: tuple[nn.Module, ...]  # the blocks, or aligned copies of them with ``align``
    inputs: tuple[Tensor, ...] | None  # the first block's input batches; None without data
    aligned: int  # groups of hidden channels aligned per block
    moments: dict  # the input moments of the fit, filled by the first build and kept for the next ones


@dataclass(frozen=True, eq=False)
class Built:
    """What the build step did with one run: its LayerReuse, or why it has none."""

    layer: LayerReuse | None  # None: not built (``skipped`` says why)
    skipped: str = ""  # why the run is left as it is
    rank: DeltaRank = 0  # the delta rank of its uses
    params_after: int | None = None  # parameters of the LayerReuse (None: not built, as planned)
    params_deltas: int = 0  # of those, the ones in the per-use deltas
    aligned: int = 0  # groups of hidden channels aligned per block
    fitted: int = 0  # shared layers fitted to the calibration data
    cost: float | None = None  # with a budget: the measured cost of the run's choice

    def outcome(self) -> dict[str, object]:
        """The fields of the report's :class:`~reuse.fx.Run` that this step decided."""
        out = dict(skipped=self.skipped, rank=self.rank, params_deltas=self.params_deltas, aligned=self.aligned)
        out.update(fitted=self.fitted, cost=self.cost)
        return out if self.params_after is None else {**out, "params_after": self.params_after}


def prepare(model: nn.Module, runs: Sequence[PlannedRun], opts: Options) -> list[Prepared]:
    """For each run: its blocks as they will be tied (aligned copies when ``opts.align``, else the blocks) and the
    batches its first block receives (None without data)."""
    batches = opts.batches
    inputs = run_inputs(model, [r.modules[0] for r in runs], batches) if batches else [None] * len(runs)
    out = []
    for run, xs in zip(runs, inputs):
        blocks, aligned = list(run.units), 0
        if opts.align:
            blocks = owned_copies(run.units)
            aligned = align_blocks(blocks, opts.align, xs)
        out.append(Prepared(tuple(blocks), None if xs is None else tuple(xs), aligned, {}))
    return out


def build(run: PlannedRun, prepared: Prepared, opts: Options, rank: DeltaRank) -> Built:
    """The LayerReuse of a run: shared weights from the first block (or the mean, or fitted on the inputs with
    ``init="fit"``, then fitted again on the converted uses' inputs with ``init="refit"``), use ``i``'s per-use
    modules from block ``i``, and with a delta rank each use's deltas from the SVD of block ``i`` minus the shared
    weights (weighted by block ``i``'s inputs when fitted). Raises what :meth:`LayerReuse.from_blocks` raises for
    blocks it refuses."""
    blocks = prepared.blocks
    lr = LayerReuse.from_blocks(blocks, shuffle=run.shuffle, groups=opts.groups, per_use=run.rule)
    lr.training = run.modules[0].training
    if opts.init == "mean":
        _mean_init(lr, blocks)
    paths = lr.shared_layer_paths()
    deltas = 0
    if rank:
        lr.add_deltas(rank)
        for i, block in enumerate(blocks):
            init_from_blocks(lr.deltas(i), block)
        for m in lr.modules():
            m.training = lr.training
        deltas = sum(p.numel() for i in range(lr.n) for d in lr.deltas(i).values() for p in _own(d))
    fitted = 0
    if opts.init in FITTED and prepared.inputs is not None:  # "auto": fitted here, the caller measures both
        fitted = len(fit_layers(lr.uses, paths, blocks, prepared.inputs, prepared.moments))
        if opts.init == "refit":  # each layer again, in call order, on the inputs the converted uses give it
            refine_layers(lr.uses, paths, blocks, prepared.inputs)
    params = sum(p.numel() for p in lr.parameters())
    return Built(lr, rank=rank, params_after=params, params_deltas=deltas, aligned=prepared.aligned, fitted=fitted)


def _mean_init(lr: LayerReuse, blocks: Sequence[nn.Module]) -> None:
    """Set the shared floating-point parameters to the mean of the blocks' (in float64: the mean of k equal tensors
    is then exactly that tensor)."""
    sources = [dict(m.named_parameters(remove_duplicate=False)) for m in blocks]
    params = dict(lr.uses[0].named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name in lr.shared_names():
            if name in params and params[name].is_floating_point():
                params[name].copy_(torch.stack([s[name].double() for s in sources]).mean(0))


def _own(delta: nn.Module) -> list[nn.Parameter]:
    """A delta wrapper's own parameters (its factors and bias offset), not the shared layer's."""
    return [p for name, p in delta.named_parameters() if not name.startswith("base.")]
