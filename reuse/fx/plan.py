"""What the planner (:mod:`reuse.fx.find`) hands to the later steps of :func:`reuse.fx.convert`: an immutable
:class:`Plan` of :class:`PlannedRun` records. The build and swap steps read it and never change it; the report's
:class:`~reuse.fx.Run` records are made from it once, at the end (:meth:`PlannedRun.record`)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from torch import nn

from reuse._per_use import PerUse
from reuse.fx.report import Run
from reuse.fx.shapes import Shape

__all__ = ["Plan", "PlannedRun"]


@dataclass(frozen=True, eq=False)
class PlannedRun:
    """A run as found: the names the report shows, and the modules it takes to build its LayerReuse."""

    blocks: tuple[str, ...]  # qualified names of the modules, in call order: n blocks of ``period`` modules
    block_type: str  # class name(s) of a block, "Conv2d+ReLU" for a block of several modules
    period: int  # modules per block
    modules: tuple[nn.Module, ...]  # every module of the run, in call order
    units: tuple[nn.Module, ...]  # its blocks: the modules themselves, or nn.Sequential wrappers of ``period``
    rule: PerUse  # the per_use of its LayerReuse: the option, plus weightless modules that differ between blocks
    input_shape: Shape  # shape the first block sees on the example input
    params_before: int  # parameters of the blocks
    note: str = ""  # remarks: no shuffle and why, blocks left out of the chain
    skipped: str = ""  # why the run is not converted; "" when it is to be
    # decided for a run to convert (left at these values for a skipped one):
    shuffle: bool = False  # channel shuffle between uses
    per_use: tuple[str, ...] = ()  # classes kept one per use besides the ``per_use`` option
    via: str = ""  # "sequential" (swapped in its nn.Sequential) or "graph" (owner traced into a GraphModule)
    owner: str = ""  # the module whose forward calls the blocks ("" is the model itself)
    params_after: int = 0  # parameters of its LayerReuse without deltas: shared ones once, per-use ones n times

    @property
    def n(self) -> int:
        """Number of blocks, the uses of the reused block."""
        return len(self.blocks) // self.period

    @property
    def path(self) -> str:
        """The first module's name, where the LayerReuse will sit."""
        return self.blocks[0]

    def record(self, **outcome: Any) -> Run:
        """The report's record of this run; ``outcome`` holds the :class:`~reuse.fx.Run` fields that later steps
        decided (``skipped``, ``params_after``, ``rank``, ...)."""
        planned = {f.name: getattr(self, f.name) for f in fields(Run) if hasattr(self, f.name)}
        return Run(**{**planned, **outcome})


@dataclass(frozen=True, eq=False)
class Plan:
    """Every run found in a model, converted or skipped, and what the swap step needs to trace as the planner did."""

    params: int  # parameters of the model as planned (shared ones once)
    runs: tuple[PlannedRun, ...]  # in the order found; the report lists them so
    notes: tuple[str, ...]  # model-level remarks (no run found, LayerReuse modules kept)
    leaf_paths: tuple[str, ...] = ()  # modules kept whole in the planner's last trace

    @property
    def todo(self) -> tuple[int, ...]:
        """Indices of the runs to convert."""
        return tuple(i for i, run in enumerate(self.runs) if not run.skipped)
