"""The validate step of :func:`reuse.fx.convert` and :func:`reuse.fx.find_runs`: every option, the model and the
calibration data checked once, into one immutable :class:`Options`.

The defaults live in one place, :func:`reuse.fx.convert`'s signature; :func:`check_options` takes every option
explicitly and resolves the ones whose default depends on ``data`` (``shuffle``, ``init``, ``align``) or on
``level`` (``bank_size``).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import EllipsisType

from torch import Tensor, nn

from reuse._banked import check_mode
from reuse._banked_transform import BankSize, check_bank_size
from reuse._checks import check_bool, check_int, check_module
from reuse._data import take_batches
from reuse._errors import ReuseError
from reuse._per_use import PerUse, per_use_predicate
from reuse.delta import DeltaRank, check_rank
from reuse.fx.fit import ALIGNS

__all__ = ["BANK_SIZE", "FINDING", "FITTED", "INITS", "LEVELS", "Options", "check_options"]

LEVELS = ("layer", "filter", "kernel")  # grains of reuse: whole blocks, or filters or kernels from shared banks
INITS = ("first", "mean", "fit", "refit", "auto")  # where a run's shared weights come from
FITTED = ("fit", "refit", "auto")  # the inits that fit the shared weights to the calibration data
BANK_SIZE = 0.5  # level="filter"|"kernel" with bank_size left out: banks of half the entries they replace
FINDING = ("min_run", "shuffle", "groups", "per_use", "leaf_modules", "example_inputs")  # options that decide runs


@dataclass(frozen=True, eq=False)
class Options:
    """The options of one call, checked; see :func:`reuse.fx.convert` for what each does."""

    min_run: int  # fewest blocks in a run worth converting
    shuffle: bool  # the paper's channel shuffle between uses (where the channels allow it)
    groups: int  # groups of the shuffle
    init: str  # from the "first" block, the "mean" of the blocks, "fit" or "refit" to the data, or "auto"
    per_use: PerUse  # which modules each use gets its own copy of
    leaf_types: tuple[type[nn.Module], ...]  # leaf_modules given as classes
    leaf_paths: frozenset[str]  # leaf_modules given as qualified names
    example_inputs: tuple | None  # forward arguments the shapes are read with; None: guessed from the model
    inplace: bool  # convert the model handed in instead of a copy
    level: str  # one of LEVELS
    bank_size: BankSize  # level="filter"|"kernel": entries per bank (None at level="layer")
    mode: str  # level="filter"|"kernel": "index" or "mix"
    delta_rank: DeltaRank  # per-use low-rank deltas (0: plain reuse)
    batches: tuple[Tensor, ...] | None  # the calibration inputs read from data; None without data
    align: str | None  # how hidden channels are aligned before tying (one of ALIGNS), None: not aligned
    budget: float | None  # the fraction of the parameters to keep, each run's choice measured on the batches
    calibrate: bool  # re-estimate the running statistics on the batches after conversion
    report: bool  # convert also returns the report

    @property
    def images(self) -> int:
        """How many calibration inputs were read."""
        return sum(len(b) for b in self.batches) if self.batches is not None else 0


def check_options(
    model: object,
    *,
    min_run: object,
    shuffle: object,
    groups: object,
    init: object,
    leaf_modules: object,
    inplace: object,
    level: object,
    per_use: object,
    example_inputs: object,
    report: object,
    bank_size: object,
    mode: object,
    delta_rank: object,
    data: object,
    images: object,
    align: object,
    budget: object,
    calibrate: object,
) -> Options:
    """Every option of a call of :func:`reuse.fx.convert` checked (a ReuseError states the first rule broken),
    the model checked, the calibration data read into batches, and the data-dependent defaults resolved."""
    if level not in LEVELS:
        raise ReuseError(
            f"convert: level must be 'layer' (whole blocks), 'filter' or 'kernel' (shared banks), got {level!r}"
        )
    shuffle = check_bool(data is None if shuffle is None else shuffle, "shuffle", "convert")
    min_run = check_int(min_run, "min_run", "convert", at_least=2, about="blocks in a run")
    groups = check_int(groups, "groups", "convert", about="the channel shuffle's groups")
    init = ("first" if data is None else "fit") if init is None else init
    if init not in INITS:
        raise ReuseError(
            "convert: init must be 'first', 'mean', 'fit' (fitted to calibration data), 'refit' (fitted, then each "
            "layer fitted again on the converted uses' inputs) or 'auto' (per run, the better of 'mean' and 'fit' as "
            f"measured on the calibration data), got {init!r}"
        )
    try:
        per_use_predicate(per_use)  # type: ignore[arg-type]
    except ReuseError as err:
        raise ReuseError(f"convert: {err}") from None
    leaf_types, leaf_paths = _leaves(leaf_modules)
    example_inputs = _example_inputs(example_inputs)
    for name, value in (("inplace", inplace), ("report", report), ("calibrate", calibrate)):
        check_bool(value, name, "convert")
    batches, align = _data(data, images, align, init, shuffle, budget, level)
    if budget is not None and delta_rank:
        raise ReuseError(
            f"convert: budget chooses each run's delta rank itself; leave delta_rank out (got {delta_rank!r})"
        )
    check_rank(delta_rank, "convert")
    if delta_rank and level != "layer":
        raise ReuseError(
            f"convert: delta_rank is a per-use delta of reused blocks; it takes level='layer', got {level!r}"
        )
    _check_model(model)
    if level == "layer":
        if not isinstance(bank_size, EllipsisType) or mode != "index":
            raise ReuseError(
                "convert: bank_size and mode choose the banks of level='filter' or 'kernel'; "
                f"level='layer' reuses whole blocks and takes neither (got bank_size={bank_size!r}, mode={mode!r})"
            )
        bank_size = None
    else:
        bank_size = BANK_SIZE if isinstance(bank_size, EllipsisType) else bank_size
        check_bank_size(bank_size, "convert")
        check_mode(mode, "convert")
    return Options(
        min_run=min_run,
        shuffle=shuffle,
        groups=groups,
        init=init,  # type: ignore[arg-type]
        per_use=per_use,  # type: ignore[arg-type]
        leaf_types=leaf_types,
        leaf_paths=leaf_paths,
        example_inputs=example_inputs,
        inplace=inplace,  # type: ignore[arg-type]
        level=level,  # type: ignore[arg-type]
        bank_size=bank_size,  # type: ignore[arg-type]
        mode=mode,  # type: ignore[arg-type]
        delta_rank=delta_rank,  # type: ignore[arg-type]
        batches=batches,
        align=align,
        budget=budget,  # type: ignore[arg-type]
        calibrate=calibrate,  # type: ignore[arg-type]
        report=report,  # type: ignore[arg-type]
    )


def _leaves(leaf_modules: object) -> tuple[tuple[type[nn.Module], ...], frozenset[str]]:
    """``leaf_modules`` as classes and qualified names (whether the names exist is checked on the model)."""
    types, paths = [], []
    for leaf in leaf_modules if isinstance(leaf_modules, (list, tuple, set, frozenset)) else [leaf_modules]:
        if isinstance(leaf, type) and issubclass(leaf, nn.Module):
            types.append(leaf)
        elif isinstance(leaf, str):
            paths.append(leaf)
        else:
            raise ReuseError(
                f"convert: leaf_modules holds {leaf!r}; give module classes (nn.Module subclasses) or qualified names"
            )
    return tuple(types), frozenset(paths)


def _example_inputs(example_inputs: object) -> tuple | None:
    if isinstance(example_inputs, Tensor):
        return (example_inputs,)
    if example_inputs is not None and not isinstance(example_inputs, tuple):
        raise ReuseError(
            "convert: example_inputs must be a tensor or a tuple of forward arguments, "
            f"got {type(example_inputs).__name__}"
        )
    return example_inputs


def _data(
    data: object, images: object, align: object, init: str, shuffle: bool, budget: object, level: object
) -> tuple[tuple[Tensor, ...] | None, str | None]:
    """The calibration batches (None without data) and the alignment to use; ReuseError for options that need
    data they lack or that contradict it."""
    if align is not None and align not in ALIGNS:
        raise ReuseError(f"convert: align must be None, 'weights' or 'activations', got {align!r}")
    if budget is not None and (
        isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < budget <= 1.0
    ):
        raise ReuseError(f"convert: budget must be a fraction of the model's parameters in (0, 1], got {budget!r}")
    if data is None:
        for name, value in ((f"init={init!r}", init in FITTED), ("align='activations'", align == "activations")):
            if value:
                raise ReuseError(f"convert: {name} needs calibration inputs; pass data=<a tensor or a DataLoader>")
        if budget is not None:
            raise ReuseError("convert: budget measures each choice on calibration inputs; pass data=<inputs>")
        return None, align  # type: ignore[return-value]
    if level != "layer":
        raise ReuseError(f"convert: data calibrates reused blocks; it takes level='layer', got {level!r}")
    if shuffle and (init in FITTED or align):
        raise ReuseError(
            "convert: a shuffle between uses changes what a trained network computes, so its blocks cannot be "
            "aligned or fitted to it; pass shuffle=False (the default with data)"
        )
    return tuple(take_batches(data, images, "convert")), (align or "weights")  # type: ignore[return-value]


def _check_model(model: object) -> None:
    model = check_module(model, "convert")
    lazy = [n for n, p in model.named_parameters() if isinstance(p, nn.parameter.UninitializedParameter)]
    if lazy:
        raise ReuseError(
            f"convert: {type(model).__name__} has uninitialized lazy parameters ({lazy[0]}, ...); "
            "run one forward pass first so that their shapes are known"
        )
