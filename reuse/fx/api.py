"""The entry points of the pass: :func:`convert` and :func:`find_runs`, and the checking of their options."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

from reuse._checks import check_bool, check_bools
from reuse._errors import ReuseError
from reuse.delta import DeltaRank, check_rank
from reuse.filter import FilterReuseConv2d, filter_reuse
from reuse.fx.find import _Found, _Options, _Planner
from reuse.fx.report import ConversionReport, Run
from reuse.fx.structure import _count
from reuse.fx.swap import _build, _copy, _swap_in_graph, _swap_in_sequential
from reuse.kernel import KernelReuseConv2d, kernel_reuse
from reuse.layer import LayerReuse, PerUse, _per_use_predicate

_LEVELS = ("layer", "filter", "kernel")
_INITS = ("first", "mean")
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
        raise ReuseError(f"convert: init must be 'first' or 'mean', got {init!r}")
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
    shuffle: bool = True,
    groups: int = 2,
    init: str = "first",
    leaf_modules: Iterable[type[nn.Module] | str] = (),
    inplace: bool = False,
    level: str = "layer",
    per_use: PerUse = "batchnorm",
    example_inputs: Tensor | tuple | None = None,
    report: bool = False,
    bank_size: int | float | None | _Default = _DEFAULT,
    mode: str = "index",
    delta_rank: DeltaRank = 0,
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
            converted without shuffle and the report says why.
        groups: groups of the shuffle.
        init: shared weights from the ``"first"`` block of each run or the ``"mean"`` of its blocks.
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
    opts = _options(min_run, shuffle, groups, init, per_use, leaf_modules, example_inputs, level)
    check_bools("convert", inplace=inplace, report=report)
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
    lrs = {}
    for f in todo:  # LayerReuse.from_blocks copies what it takes from the blocks
        try:
            lrs[id(f)] = _build(f, opts)
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
        ),  # fmt: skip
    )
    work.reuse_report = rep
    return (work, rep) if report else work
