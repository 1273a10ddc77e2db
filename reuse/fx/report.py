"""What :func:`reuse.fx.convert` reports: the runs it found (:class:`Run`) and the model-level report
(:class:`ConversionReport`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["ConversionReport", "Run", "span"]


@dataclass
class Run:
    """A chain of same-structure blocks, each fed by the previous one's output.

    A block is one module (``period == 1``: a ResNet bottleneck) or ``period`` consecutive modules whose
    structures repeat (VGG's conv and ReLU, Swin's alternating blocks); ``blocks`` names every module.
    ``skipped`` is empty for a run that is (or, from :func:`find_runs`, would be) converted, and says
    why otherwise.
    """

    blocks: tuple[str, ...]  # qualified names of the modules, in call order: n blocks of ``period`` modules
    block_type: str  # class name(s) of a block, "Conv2d+ReLU" for a block of several modules
    input_shape: tuple[int, ...] | None = None  # shape the first block sees on the example input
    skipped: str = ""  # why the run is not converted; "" when it is
    shuffle: bool = False  # channel shuffle between uses
    note: str = ""  # remarks: no shuffle and why, blocks left out of the chain
    per_use: tuple[str, ...] = ()  # classes kept one per use besides the ``per_use`` option (drop-path, ...)
    params_before: int = 0  # parameters of the k blocks
    params_after: int = 0  # parameters of the LayerReuse: shared ones once, per-use ones k times
    params_deltas: int = 0  # of params_after, those in the per-use low-rank deltas (convert's delta_rank)
    via: str = ""  # "sequential" (swapped in its nn.Sequential) or "graph" (owner traced into a GraphModule)
    owner: str = ""  # the module whose forward calls the blocks ("" is the model itself)
    period: int = 1  # modules per block; a block of several is reused as an nn.Sequential of them
    rank: int | float = 0  # the delta rank of this run (convert's delta_rank, or the one a budget chose)
    aligned: int = 0  # groups of hidden channels aligned per block before tying (convert's align)
    fitted: int = 0  # shared layers fitted to the calibration data (init="fit")
    cost: float | None = None  # with a budget: the measured cost of this run's choice alone (see reuse.fx.budget)

    @property
    def path(self) -> str:
        """Where the :class:`~reuse.LayerReuse` sits after conversion: the first module's name."""
        return self.blocks[0]

    @property
    def n(self) -> int:
        """Number of blocks, the uses of the reused block."""
        return len(self.blocks) // self.period

    @property
    def units(self) -> list[tuple[str, ...]]:
        """The blocks, each as the names of its ``period`` modules."""
        p = self.period
        return [self.blocks[i : i + p] for i in range(0, len(self.blocks), p)]

    def __len__(self) -> int:
        return self.n


@dataclass
class ConversionReport:
    """What :func:`convert` did: the runs it found, converted or skipped, and the parameter counts.

    Parameters are counted once each, shared ones included (``sum(p.numel() for p in m.parameters())``).
    ``str(report)`` is a table.
    """

    model: str  # class name of the model handed in
    runs: list[Run] = field(default_factory=list)  # every run found, converted or skipped
    params_before: int = 0  # parameters of the model handed in
    params_after: int = 0  # parameters of the converted model
    notes: list[str] = field(default_factory=list)  # model-level remarks (no run found, GraphModules made)
    graph_modules: list[str] = field(default_factory=list)  # modules replaced by a GraphModule ("" = model)
    options: dict[str, Any] = field(default_factory=dict)  # the options of the call

    @property
    def converted(self) -> list[Run]:
        """The runs replaced by a :class:`~reuse.LayerReuse`."""
        return [r for r in self.runs if not r.skipped]

    @property
    def skipped(self) -> list[Run]:
        """The runs left as they were, each with its reason."""
        return [r for r in self.runs if r.skipped]

    def __str__(self) -> str:
        saved = self.params_before - self.params_after
        pct = 100.0 * saved / self.params_before if self.params_before else 0.0
        lines = [
            f"{self.model}: {len(self.converted)} run(s) converted, {len(self.skipped)} skipped; "
            f"parameters {self.params_before:,} -> {self.params_after:,} ({-pct:+.1f}%)"
        ]
        if self.runs:
            rows = [("run", "k", "block", "input", "shuffle", "params", "status")]
            for r in self.runs:
                names = span(list(r.blocks))
                shape = "x".join(map(str, r.input_shape)) if r.input_shape else "-"
                params = f"{r.params_before:,} -> {r.params_after:,}" if not r.skipped else f"{r.params_before:,}"
                if r.params_deltas and not r.skipped:
                    params += f" ({r.params_deltas:,} in deltas)"
                status = f"skipped: {r.skipped}" if r.skipped else "converted" + (f" ({r.via})" if r.via else "")
                if not r.skipped:
                    status += _data_steps(r)
                rows.append((names, str(r.n), r.block_type, shape, "yes" if r.shuffle else "no", params, status))
            widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
            for row in rows:
                lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
        notes = [f"{r.blocks[0]}: {r.note}" for r in self.runs if r.note] + self.notes
        lines += [f"  note: {n}" for n in notes]
        return "\n".join(lines)


def span(names: list[str]) -> str:
    """``a.1 .. 3`` for a.1, a.2, a.3."""
    return names[0] if len(names) == 1 else f"{names[0]} .. {names[-1].rpartition('.')[2]}"


def _data_steps(run: Run) -> str:
    """``, 1 hidden group aligned, 2 layers fitted, cost 0.0123``: what a conversion with data did to a run."""
    parts = []
    if run.aligned:
        parts.append(f"{run.aligned} hidden group(s) aligned")
    if run.fitted:
        parts.append(f"{run.fitted} layer(s) fitted")
    if run.cost is not None:
        parts.append(f"rank {run.rank} by budget, cost {run.cost:.4f}")
    return "".join(f", {p}" for p in parts)
