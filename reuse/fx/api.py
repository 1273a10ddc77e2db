"""The entry points of the pass, :func:`convert` and :func:`find_runs`.

:func:`convert` is one path of five steps, each in a module of its own:

1. validate (:mod:`reuse.fx.options`): every option, the model and the data checked once, into one ``Options``;
2. plan (:mod:`reuse.fx.find`): the runs, found by reading the model, as an immutable ``Plan``;
3. build (:mod:`reuse.fx.build`, with :mod:`reuse.fx.budget`): one LayerReuse per run to convert;
4. apply (:mod:`reuse.fx.swap`): those swapped into a copy of the model (or the model, ``inplace=True``);
5. report (:mod:`reuse.fx.report`): running statistics re-estimated on the data; the ``ConversionReport``.

:func:`find_runs` is steps 1 and 2. ``level="filter"|"kernel"`` goes from step 1 to :func:`reuse.filter_reuse` or
:func:`reuse.kernel_reuse`.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterable
from dataclasses import replace
from types import EllipsisType
from typing import Any

from torch import Tensor, nn

from reuse._banked import BankedConv2d
from reuse._banked_transform import BankSize
from reuse._data import CalibrationData
from reuse._errors import ReuseError
from reuse._per_use import PerUse
from reuse.calibration import reestimate, running_stat_modules
from reuse.delta import DeltaRank
from reuse.filter import filter_reuse
from reuse.fx.budget import Choice, choose, cost_inputs, pick_init
from reuse.fx.build import Built, build, prepare
from reuse.fx.find import find
from reuse.fx.options import FINDING, Options, check_options
from reuse.fx.plan import Plan
from reuse.fx.report import ConversionReport, Run
from reuse.fx.structure import count_params
from reuse.fx.swap import Applied, apply
from reuse.kernel import kernel_reuse
from reuse.refitting import refit_layers

__all__ = ["convert", "find_runs"]


def find_runs(model: nn.Module, **options: Any) -> list[Run]:
    """The runs :func:`convert` would convert or skip; ``model`` is not changed.

    Args:
        model: any network.
        **options: the options of :func:`convert` that decide the runs, with its defaults: ``min_run``,
            ``shuffle``, ``groups``, ``per_use``, ``leaf_modules``, ``example_inputs``.

    Raises:
        TypeError: another option (``init``, ``inplace``, ``level``, ...: they change what is built, not what
            is found).

    Example:
        >>> import torchvision
        >>> runs = find_runs(torchvision.models.resnet34())
        >>> [(r.blocks[0], r.n, r.skipped) for r in runs]
        [('layer1.0', 3, ''), ('layer2.1', 3, ''), ('layer3.1', 5, ''), ('layer4.1', 2, '')]
    """
    unknown = sorted(set(options) - set(FINDING))
    if unknown:
        raise TypeError(f"find_runs() got unexpected keyword arguments {unknown}; it takes {', '.join(FINDING)}")
    opts = check_options(model, **{**_DEFAULTS, **options})
    return [run.record() for run in find(model, opts).runs]


def convert(
    model: nn.Module,
    *,
    min_run: int = 2,
    shuffle: bool | None = None,
    groups: int = 2,
    init: str | None = None,
    leaf_modules: Iterable[type[nn.Module] | str] = (),
    inplace: bool = False,
    level: str = "layer",
    per_use: PerUse = "batchnorm",
    example_inputs: Tensor | tuple | None = None,
    report: bool = False,
    bank_size: BankSize | EllipsisType = ...,
    mode: str = "index",
    delta_rank: DeltaRank = 0,
    data: CalibrationData | None = None,
    images: int = 2000,
    align: str | None = None,
    budget: float | None = None,
    calibrate: bool = True,
) -> nn.Module | tuple[nn.Module, ConversionReport]:
    """Replace each run of same-structure stacked blocks in ``model`` by one reused block.

    A run of ``k`` blocks becomes ``LayerReuse.from_blocks(blocks)``: one set of shared weights used
    ``k`` times, with use ``i``'s BatchNorm (weights and running statistics) and drop-path copied from
    block ``i``, so a pretrained network keeps its statistics. See the module docstring for how runs
    are found; :func:`find_runs` lists them without converting.

    Args:
        model: any network; not changed unless ``inplace=True``.
        min_run: fewest blocks in a run worth converting (at least 2).
        shuffle: the paper's channel shuffle between uses, where the channels allow it (a 4-D input whose
            dim 1 a convolution reads as channels, divisible by ``groups`` and even); other runs are
            converted without shuffle and the report says why. By default True, but False when ``data`` is
            given (a trained network's blocks had no shuffle between them).
        groups: groups of the shuffle.
        init: shared weights from the ``"first"`` block of each run, the ``"mean"`` of its blocks, ``"fit"``:
            fitted in closed form, with each use's delta, to reproduce what every block computed on ``data``
            (see :mod:`reuse.fx.fit`), ``"refit"``: fitted so, then each layer, in the order the block runs them,
            fitted again on the inputs the converted uses give it, each norm re-estimated as it goes, and then
            every layer outside the runs that follows them (the head, the blocks between runs) fitted to what it
            computed in ``model``, on the inputs the converted network gives it (:func:`reuse.refit`; running
            statistics are then re-estimated even with ``calibrate=False``; closer on the MobileNet of
            docs/convert.md, at twice the time or more), or ``"auto"``: per run, whichever of
            the aligned mean and the fit costs less on ``data``, measured as a budget's options are (the report's
            notes give both costs; a trained network's runs differ: see docs/convert.md). By default ``"fit"`` when
            ``data`` is given, else ``"first"``.
        leaf_modules: module classes or qualified names that tracing must not enter (for code FX cannot trace).
        inplace: convert ``model`` itself instead of a deep copy.
        level: grain of reuse: ``"layer"`` (runs of whole blocks, the default), ``"filter"`` or ``"kernel"``
            (every compatible conv draws its filters or kernels from a bank shared by all convs of its shape:
            :func:`reuse.filter_reuse`, :func:`reuse.kernel_reuse`; ``bank_size`` and ``mode`` go to them).
        per_use: which modules each use gets its own copy of (see :data:`reuse.layer.PerUse`); weightless
            modules whose settings differ between blocks (drop-path rates) are always kept per use.
        example_inputs: input(s) of ``forward`` used to read the shapes (on the meta device, no arithmetic);
            by default ``(1, C, 224, 224)`` from timm's ``pretrained_cfg`` or the first convolution.
        report: also return the :class:`ConversionReport`.
        bank_size: with ``level="filter"|"kernel"``: entries per bank (int), a fraction of what the bank
            replaces (float in (0, 1]; left out, 0.5, which stores about half the weights), or None (as many
            entries as replaced: the model computes exactly what it did, but does not get smaller; kernel
            reuse at full size even grows it by one scale per kernel).
        mode: with ``level="filter"|"kernel"``: ``"index"`` or ``"mix"``.
        delta_rank: relaxed reuse: every use gets a low-rank delta of its own on each shared conv and linear
            (see :mod:`reuse.delta`), started from the truncated SVD of the difference between the block it
            replaces and the shared weights; an int (the rank), a float in (0, 1] (a fraction of each layer's
            full rank) or 0 (plain reuse, the default). At full rank (``1.0``) the converted model computes what
            the model handed in computes, whatever its blocks' weights; the report gives each run's parameters
            in the deltas.
        data: unlabeled calibration inputs of a trained network (a tensor ``(N, C, H, W)`` or an iterable of
            batches, as for :func:`reuse.calibrate`): used to align the blocks' hidden channels, to fit the shared
            weights (``init="fit"``) and, after conversion, to re-estimate every running statistic (each use's
            BatchNorm measures what it now sees). No gradient step is taken.
        images: how many inputs of ``data`` to read, at most.
        align: put each block's hidden channels (found from its graph: see :mod:`reuse.align`) in the order of
            the run's first block before tying: ``"weights"`` (weight matching, no data) or ``"activations"``
            (correlation on ``data``); None (the default) is ``"weights"`` with ``data`` (measured better than
            ``"activations"`` on a trained ResNet-32: see docs/convert.md), no alignment without. A permutation of
            hidden channels never changes what a block computes.
        budget: with ``data``: the fraction of the model's parameters the result may keep, in (0, 1]; each run is
            tied, with a delta rank, or left as it is, as measured on ``data`` (see :mod:`reuse.fx.budget`);
            the report gives each run's choice and its measured cost.
        calibrate: with ``data``: re-estimate the running statistics of the converted model on it (see
            :func:`reuse.calibrate`); False leaves each use with its block's statistics.

    Returns:
        The converted model, with the report as its ``reuse_report`` attribute; ``(model, report)`` when
        ``report=True``. Runs in an ``nn.Sequential`` are swapped in place and the model keeps its class;
        a module whose own ``forward`` calls the blocks becomes a ``torch.fx.GraphModule``.

    Raises:
        ReuseError: bad options, a model FX cannot trace (with the module path, the failing line and the
            fix), or a model that fails on the example input.

    Example:
        >>> import torch, torchvision
        >>> net = torchvision.models.resnet34()
        >>> new, rep = convert(net, report=True)
        >>> [(r.path, r.n) for r in rep.converted]
        [('layer1.0', 3), ('layer2.1', 3), ('layer3.1', 5), ('layer4.1', 2)]
        >>> new.layer3[1]  # doctest: +ELLIPSIS
        LayerReuse(n=5, shuffle=ChannelShuffle(groups=2, swap_halves=True), per_use='batchnorm', block=BasicBlock(...
        >>> new(torch.randn(1, 3, 64, 64)).shape
        torch.Size([1, 1000])
        >>> # saved: k - 1 copies of two 3x3 convs (C x C) per run; BatchNorms stay one per use
        >>> rep.params_before - rep.params_after == 18 * (2 * 64**2 + 2 * 128**2 + 4 * 256**2 + 1 * 512**2)
        True
        >>> type(net.layer3[1]).__name__  # the model handed in is unchanged
        'BasicBlock'
    """
    opts = check_options(  # 1. validate: every option, the model and the data, once
        model, min_run=min_run, shuffle=shuffle, groups=groups, init=init, leaf_modules=leaf_modules,
        inplace=inplace, level=level, per_use=per_use, example_inputs=example_inputs, report=report,
        bank_size=bank_size, mode=mode, delta_rank=delta_rank, data=data, images=images, align=align,
        budget=budget, calibrate=calibrate,
    )  # fmt: skip
    if opts.level != "layer":
        return _convert_banked(model, opts)
    plan = find(model, opts)  # 2. plan: the runs, read from the model (immutable)
    built, notes = _build(model, plan, opts)  # 3. build: one LayerReuse per run to convert
    refitting = opts.init == "refit" and opts.batches is not None
    reference = copy.deepcopy(model) if refitting and opts.inplace else model  # apply changes an inplace model
    applied = apply(model, plan, {i: b.layer for i, b in built.items() if b.layer is not None}, opts)  # 4. apply
    if refitting:  # 4b. the layers outside the runs, fitted to the inputs the converted runs give them
        notes += _refit_outside(applied.model, reference, opts)
    return _report(model, plan, built, applied, [*plan.notes, *notes, *applied.notes], opts)  # 5. report


_DEFAULTS = {name: p.default for name, p in inspect.signature(convert).parameters.items() if name != "model"}
"""convert's defaults, the only copy: find_runs takes them for the options it is not given."""


def _build(model: nn.Module, plan: Plan, opts: Options) -> tuple[dict[int, Built], list[str]]:
    """Step 3: for each run to convert (by index in the plan), its LayerReuse, or why it is left as it is; and the
    budget's notes. Blocks are aligned first with ``align``; with a ``budget``, each run's delta rank (or none)
    is chosen by measuring every option."""
    todo = plan.todo
    runs = [plan.runs[i] for i in todo]
    prepared = prepare(model, runs, opts)  # aligned copies of the blocks and their inputs
    choices: list[Choice | None] = [None] * len(runs)
    notes: list[str] = []
    if opts.budget is not None:
        choices, notes = choose(model, runs, prepared, opts)  # type: ignore[assignment]
    built = {}
    measure = cost_inputs(model, opts) if opts.init == "auto" and opts.batches else None
    picked: list[str] = []
    for i, run, prep, choice in zip(todo, runs, prepared, choices):
        cost = None if choice is None else choice.cost
        if choice is not None and choice.rank is None:
            why = f"left as it is to fit budget={opts.budget} (cost {choice.cheapest:.4f} if tied)"
            built[i] = Built(None, skipped=why, aligned=prep.aligned, cost=cost)
            continue
        rank = opts.delta_rank if choice is None else choice.rank
        try:  # LayerReuse.from_blocks copies what it takes from the blocks
            if measure is not None:
                made, note = pick_init(model, run, prep, opts, rank, measure)
                picked.append(note)
            else:
                made = build(run, prep, opts, rank)
            built[i] = replace(made, cost=cost)
        except ReuseError as err:  # a run the planner accepted but LayerReuse refuses: skip it, say why
            built[i] = Built(None, skipped=f"LayerReuse refused the blocks: {err}", aligned=prep.aligned, cost=cost)
    if picked:
        notes.append("init='auto': " + "; ".join(picked))
    return built, notes


def _refit_outside(work: nn.Module, reference: nn.Module, opts: Options) -> list[str]:
    """``init="refit"``, after the runs are swapped in: every layer outside them with a twin in the model handed in
    (its head, the blocks between runs, runs left as they are) is fitted, in call order, to what its twin
    computed, on the inputs the converted network gives it (:func:`reuse.refit`)."""
    done = refit_layers(work, reference, list(opts.batches or ()))
    if not done:
        return []
    shown = ", ".join(done[:6]) + (f", ... ({len(done)} in all)" if len(done) > 6 else "")
    return [f"init='refit': {len(done)} layer(s) outside the runs refitted to the model's outputs ({shown})"]


def _report(
    model: nn.Module, plan: Plan, built: dict[int, Built], applied: Applied, notes: list[str], opts: Options
) -> nn.Module | tuple[nn.Module, ConversionReport]:
    """Step 5: the running statistics re-estimated on the data, and the report made from the plan and the
    outcome of each step; attached to the converted model as ``reuse_report``."""
    work = applied.model
    if opts.batches is not None and opts.calibrate and running_stat_modules(work):
        reestimate(work, list(opts.batches))
        notes.append(f"running statistics re-estimated on {opts.images} calibration input(s)")
    runs = []
    for i, run in enumerate(plan.runs):
        outcome = built[i].outcome() if i in built else {}
        runs.append(run.record(**outcome, **({"skipped": applied.failed[i]} if i in applied.failed else {})))
    rep = ConversionReport(
        model=type(model).__name__,
        runs=runs,
        params_before=plan.params,
        params_after=count_params([work]),
        notes=notes,
        graph_modules=list(applied.graph_modules),
        options=dict(
            min_run=opts.min_run,
            shuffle=opts.shuffle,
            groups=opts.groups,
            init=opts.init,
            per_use=opts.per_use,
            level=opts.level,
            delta_rank=opts.delta_rank,
            align=opts.align,
            budget=opts.budget,
            images=opts.images,
        ),  # fmt: skip
    )
    work.reuse_report = rep
    return (work, rep) if opts.report else work


def _convert_banked(model: nn.Module, opts: Options) -> nn.Module | tuple[nn.Module, ConversionReport]:
    """``convert(level="filter"|"kernel")``: every compatible conv draws its weight from a shared bank
    (:func:`reuse.filter_reuse`, :func:`reuse.kernel_reuse`)."""
    before = count_params([model])
    grain = {"filter": filter_reuse, "kernel": kernel_reuse}[opts.level]
    work = grain(model, opts.bank_size, opts.mode, inplace=opts.inplace)  # type: ignore[arg-type]
    banked = [m for m in work.modules() if isinstance(m, BankedConv2d)]
    banks = {id(m.bank) for m in banked}
    rep = ConversionReport(
        model=type(model).__name__,
        params_before=before,
        params_after=count_params([work]),
        notes=[f"level={opts.level!r}: {len(banked)} conv(s) draw their weights from {len(banks)} shared bank(s)"],
        options=dict(level=opts.level, bank_size=opts.bank_size, mode=opts.mode),
    )
    work.reuse_report = rep
    return (work, rep) if opts.report else work
