"""The entry points of the pass: :func:`convert` and :func:`find_runs`, and the checking of their options."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

from reuse._checks import check_bool, check_bools
from reuse._data import CalibrationData, take_batches
from reuse._errors import ReuseError
from reuse.calibration import reestimate, running_stat_modules
from reuse.delta import DeltaRank, check_rank
from reuse.filter import FilterReuseConv2d, filter_reuse
from reuse.fx.budget import choose
from reuse.fx.find import _Found, _Options, _Planner
from reuse.fx.fit import ALIGNS, align_blocks, owned_copies, run_inputs
from reuse.fx.report import ConversionReport, Run
from reuse.fx.structure import _count
from reuse.fx.swap import _build, _copy, _swap_in_graph, _swap_in_sequential
from reuse.kernel import KernelReuseConv2d, kernel_reuse
from reuse.layer import LayerReuse, PerUse, _per_use_predicate

_LEVELS = ("layer", "filter", "kernel")
_INITS = ("first", "mean", "fit")
_BANK_DEFAULT = 0.5  # convert(level="filter"|"kernel"): banks of half the entries they replace


class _Default(enum.Enum):
    """The type of :data:`_DEFAULT`: ``bank_size`` left out (0.5 at the filter and kernel levels)."""

    BANK_SIZE = "0.5"

    def __repr__(self) -> str:
        return self.value


_DEFAULT = _Default.BANK_SIZE


def _convert_banked(
    model: nn.Module, level: str, bank_size: int | float | None, mode: str, inplace: bool, before: int, report: bool
) -> nn.Module | tuple[nn.Module, ConversionReport]:
    """``convert(level="filter"|"kernel")``: every compatible conv draws its weight from a shared bank."""
    grain = {"filter": filter_reuse, "kernel": kernel_reuse}[level]
    work = grain(model, bank_size, mode, inplace=inplace)  # type: ignore[arg-type]
    banked = [m for m in work.modules() if isinstance(m, (FilterReuseConv2d, KernelReuseConv2d))]
    banks = {id(m.bank) for m in banked}
    rep = ConversionReport(
        model=type(model).__name__,
        params_before=before,
        params_after=_count([work]),
        notes=[f"level={level!r}: {len(banked)} conv(s) draw their weights from {len(banks)} shared bank(s)"],
        options=dict(level=level, bank_size=bank_size, mode=mode),
    )
    work.reuse_report = rep
    return (work, rep) if report else work


def _options(
    min_run: object,
    shuffle: object,
    groups: object,
    init: object,
    per_use: object,
    leaf_modules: object,
    example_inputs: object,
    level: object = "layer",
) -> _Options:
    if level not in _LEVELS:
        raise ReuseError(
            f"convert: level must be 'layer' (whole blocks), 'filter' or 'kernel' (shared banks), got {level!r}"
        )
    check_bool(shuffle, "shuffle", "convert")
    if isinstance(min_run, bool) or not isinstance(min_run, int) or min_run < 2:
        raise ReuseError(f"convert: min_run must be an int >= 2 (blocks in a run), got {min_run!r}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ReuseError(f"convert: groups must be a positive int (the channel shuffle's groups), got {groups!r}")
    if init not in _INITS:
        raise ReuseError(f"convert: init must be 'first', 'mean' or 'fit' (fitted to calibration data), got {init!r}")
    try:
        _per_use_predicate(per_use)  # type: ignore[arg-type]
    except ReuseError as err:
        raise ReuseError(f"convert: {err}") from None
    leaf_types, leaf_paths = [], []
    for leaf in leaf_modules if isinstance(leaf_modules, (list, tuple, set, frozenset)) else [leaf_modules]:
        if isinstance(leaf, type) and issubclass(leaf, nn.Module):
            leaf_types.append(leaf)
        elif isinstance(leaf, str):
            leaf_paths.append(leaf)
        else:
            raise ReuseError(
                f"convert: leaf_modules holds {leaf!r}; give module classes (nn.Module subclasses) or qualified names"
            )
    if isinstance(example_inputs, Tensor):
        example_inputs = (example_inputs,)
    elif example_inputs is not None and not isinstance(example_inputs, tuple):
        raise ReuseError(
            "convert: example_inputs must be a tensor or a tuple of forward arguments, "
            f"got {type(example_inputs).__name__}"
        )
    return _Options(
        min_run,
        shuffle,  # type: ignore[arg-type]
        groups,
        init,
        per_use,
        tuple(leaf_types),
        frozenset(leaf_paths),
        example_inputs,  # type: ignore[arg-type]
    )


def _data_options(
    data: object, images: object, align: object, init: str, shuffle: bool, budget: object, level: str
) -> tuple[list[Tensor] | None, str | None]:
    """The calibration batches (None without data) and the alignment to use; ReuseError for options that need
    data they lack or that contradict it."""
    if align is not None and align not in ALIGNS:
        raise ReuseError(f"convert: align must be None, 'weights' or 'activations', got {align!r}")
    if budget is not None and (
        isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < budget <= 1.0
    ):
        raise ReuseError(f"convert: budget must be a fraction of the model's parameters in (0, 1], got {budget!r}")
    if data is None:
        for name, value in (("init='fit'", init == "fit"), ("align='activations'", align == "activations")):
            if value:
                raise ReuseError(f"convert: {name} needs calibration inputs; pass data=<a tensor or a DataLoader>")
        if budget is not None:
            raise ReuseError("convert: budget measures each choice on calibration inputs; pass data=<inputs>")
        return None, align
    if level != "layer":
        raise ReuseError(f"convert: data calibrates reused blocks; it takes level='layer', got {level!r}")
    if shuffle and (init == "fit" or align):
        raise ReuseError(
            "convert: a shuffle between uses changes what a trained network computes, so its blocks cannot be "
            "aligned or fitted to it; pass shuffle=False (the default with data)"
        )
    return take_batches(data, images, "convert"), (align or "weights")


def _prepare(
    model: nn.Module, todo: list[_Found], batches: list[Tensor] | None, align: str | None
) -> dict[int, tuple[list[nn.Module], list[Tensor] | None, dict]]:
    """For each run: its blocks as they will be tied (aligned copies when ``align``, else the blocks) and the
    batches its first block receives (None without data)."""
    inputs = run_inputs(model, [f.modules[0] for f in todo], batches) if batches else [None] * len(todo)
    out = {}
    for f, xs in zip(todo, inputs):
        blocks = f.units
        if align:
            blocks = owned_copies(f.units)
            f.run.aligned = align_blocks(blocks, align, xs)
        out[id(f)] = (blocks, xs, {})  # the last: input moments of the fit, kept between builds
    return out


def _check_model(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise ReuseError(f"convert: needs an nn.Module, got {type(model).__name__}")
    lazy = [n for n, p in model.named_parameters() if isinstance(p, nn.parameter.UninitializedParameter)]
    if lazy:
        raise ReuseError(
            f"convert: {type(model).__name__} has uninitialized lazy parameters ({lazy[0]}, ...); "
            "run one forward pass first so that their shapes are known"
        )


def _plan(model: nn.Module, opts: _Options) -> tuple[_Planner, list[_Found], list[str]]:
    _check_model(model)
    planner = _Planner(model, opts)
    found, notes = planner.plan()
    reused = [p or "the model" for p, m in planner.by_path.items() if isinstance(m, LayerReuse)]
    if reused:  # outermost ones only: a LayerReuse is never entered
        outer = [p for p in reused if not any(p.startswith(q + ".") for q in reused if q != p)]
        notes.append(
            f"kept {len(outer)} LayerReuse module(s) as they are, already reused ({_span_list(outer)}): "
            "convert neither enters nor re-converts them"
        )
    return planner, found, notes


def _span_list(names: list[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


_FINDING = ("min_run", "shuffle", "groups", "per_use", "leaf_modules", "example_inputs")  # options that decide runs


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
    unknown = sorted(set(options) - set(_FINDING))
    if unknown:
        raise TypeError(f"find_runs() got unexpected keyword arguments {unknown}; it takes {', '.join(_FINDING)}")
    defaults = dict(min_run=2, shuffle=True, groups=2, per_use="batchnorm", leaf_modules=(), example_inputs=None)
    o = {**defaults, **options}
    opts = _options(
        o["min_run"], o["shuffle"], o["groups"], "first", o["per_use"], o["leaf_modules"], o["example_inputs"]
    )
    _, found, _ = _plan(model, opts)
    return [f.run for f in found]


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
    bank_size: int | float | None | _Default = _DEFAULT,
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
        init: shared weights from the ``"first"`` block of each run, the ``"mean"`` of its blocks, or ``"fit"``:
            fitted in closed form, with each use's delta, to reproduce what every block computed on ``data``
            (see :mod:`reuse.fx.fit`). By default ``"fit"`` when ``data`` is given, else ``"first"``.
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
            replaces (float in (0, 1]; by default 0.5, which stores about half the weights), or None (as many
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
    if shuffle is None:
        shuffle = data is None
    if init is None:
        init = "first" if data is None else "fit"
    opts = _options(min_run, shuffle, groups, init, per_use, leaf_modules, example_inputs, level)
    check_bools("convert", inplace=inplace, report=report, calibrate=calibrate)
    batches, align = _data_options(data, images, align, init, shuffle, budget, level)
    if budget is not None and delta_rank:
        raise ReuseError(
            f"convert: budget chooses each run's delta rank itself; leave delta_rank out (got {delta_rank!r})"
        )
    opts.delta_rank = check_rank(delta_rank, "convert")
    if delta_rank and level != "layer":
        raise ReuseError(
            f"convert: delta_rank is a per-use delta of reused blocks; it takes level='layer', got {level!r}"
        )
    _check_model(model)
    params_before = _count([model])
    if level != "layer":
        size = _BANK_DEFAULT if isinstance(bank_size, _Default) else bank_size
        return _convert_banked(model, level, size, mode, inplace, params_before, report)
    if not isinstance(bank_size, _Default) or mode != "index":
        raise ReuseError(
            "convert: bank_size and mode choose the banks of level='filter' or 'kernel'; "
            f"level='layer' reuses whole blocks and takes neither (got bank_size={bank_size!r}, mode={mode!r})"
        )
    planner, found, notes = _plan(model, opts)  # reads the model, writes nothing
    todo = [f for f in found if not f.run.skipped]
    prepared = _prepare(model, todo, batches, align)  # aligned copies of the blocks and their inputs
    if budget is not None:
        ranks = choose(model, todo, prepared, opts, batches, budget, notes)
        for f in todo:
            if ranks[id(f)] is None:
                f.run.skipped = f"left as it is to fit budget={budget} (cost {f.run.cost:.4f} if tied)"
            else:
                f.run.rank = ranks[id(f)]
        todo = [f for f in todo if not f.run.skipped]
    lrs = {}
    for f in todo:  # LayerReuse.from_blocks copies what it takes from the blocks
        try:
            blocks, inputs, cache = prepared[id(f)]
            lrs[id(f)] = _build(f, opts, blocks, inputs, f.run.rank if budget is not None else None, cache)
        except ReuseError as err:  # a run the planner accepted but LayerReuse refuses: skip it, say why
            f.run.skipped = f"LayerReuse refused the blocks: {err}"
    todo = [f for f in todo if id(f) in lrs]
    work = model if inplace else _copy(model, [m for f in todo if f.run.via == "sequential" for m in f.modules])
    for f in todo:
        if f.run.via == "sequential":
            _swap_in_sequential(work, f.run, lrs[id(f)])
    owners = sorted({f.run.owner for f in todo if f.run.via == "graph"}, key=lambda p: -p.count(".") - bool(p))
    graph_modules = []
    for owner in owners:
        fs = [f for f in todo if f.run.via == "graph" and f.run.owner == owner]
        work, failed = _swap_in_graph(work, owner, fs, [lrs[id(f)] for f in fs], planner)
        for f in fs:
            f.run.skipped = failed.get(id(f), "")
        if len(failed) < len(fs):
            graph_modules.append(owner)
            what = f"'{owner}'" if owner else f"the model ({type(model).__name__})"
            notes.append(
                f"{what} is now a torch.fx.GraphModule: its forward calls the blocks itself "
                "(not as an nn.Sequential), so its traced forward was rewritten"
            )
    if batches is not None and calibrate and running_stat_modules(work):
        reestimate(work, batches)
        notes.append(f"running statistics re-estimated on {sum(len(b) for b in batches)} calibration input(s)")
    rep = ConversionReport(
        model=type(model).__name__,
        runs=[f.run for f in found],
        params_before=params_before,
        params_after=_count([work]),
        notes=notes,
        graph_modules=graph_modules,
        options=dict(
            min_run=min_run,
            shuffle=shuffle,
            groups=groups,
            init=init,
            per_use=per_use,
            level=level,
            delta_rank=delta_rank,
            align=align,
            budget=budget,
            images=sum(len(b) for b in batches) if batches is not None else 0,
        ),  # fmt: skip
    )
    work.reuse_report = rep
    return (work, rep) if report else work
