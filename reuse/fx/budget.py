"""Choosing, under a parameter budget, which runs to tie and with which delta rank (``convert(budget=...)``).

Each run's options are: left as it is, or tied with a delta rank from :data:`RANKS` (capped at the layers' full
rank). The cost of an option is measured, not guessed: the run alone is tied that way (every other run as it
is), the running statistics are re-estimated on the first :data:`COST_IMAGES` calibration inputs, and the cost is
the mean KL divergence of the network's output from the original network's on those inputs (unlabeled: the
original network is the reference). Costs of different runs are taken to add up, and the cheapest combination
whose parameters fit the budget is chosen: exhaustively when the combinations are few, else greedily (from every
run at its cheapest, the step that saves the most parameters per unit of cost first).
"""

from __future__ import annotations

import copy
import itertools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reuse._data import model_device
from reuse.calibration import reestimate
from reuse.delta import DeltaRank, full_rank
from reuse.fx.build import Built, Prepared, build
from reuse.fx.options import Options
from reuse.fx.plan import PlannedRun

__all__ = ["COST_IMAGES", "RANKS", "Choice", "choose", "cost_inputs", "output_cost", "pick_init"]

RANKS = (0, 1, 2, 4, 8, 16, 32)  # the delta ranks a budget chooses from
COST_IMAGES = 512  # calibration inputs each option is measured on (fits and the final calibration use them all)
_EXHAUSTIVE = 200_000  # most combinations searched exhaustively


@torch.no_grad()
def output_cost(model: nn.Module, batches: Sequence[Tensor], reference: Sequence[Tensor]) -> float:
    """Mean KL divergence ``KL(softmax(reference) || softmax(model))`` per input over ``batches`` (eval mode);
    outputs that are not ``(B, classes)`` logits are compared by mean squared error instead."""
    device = model_device(model)
    modes = [(m, m.training) for m in model.modules()]
    total, count = 0.0, 0
    try:
        model.eval()
        for x, ref in zip(batches, reference):
            out = model(x.to(device)).double()  # (B, classes)
            ref = ref.double()
            if out.dim() == 2:
                total += float(F.kl_div(out.log_softmax(1), ref.log_softmax(1), log_target=True, reduction="sum"))
            else:
                total += float(((out - ref) ** 2).flatten(1).mean(1).sum())
            count += x.shape[0]
    finally:
        for m, mode in modes:
            m.training = mode
    return total / count


@dataclass(frozen=True)
class Choice:
    """What a budget chose for one run."""

    rank: int | None  # the delta rank to tie the run with; None: leave it as it is
    cost: float  # the measured cost of that choice (0.0 for a run left as it is)
    cheapest: float  # the least cost of tying the run at all


def choose(
    model: nn.Module, runs: Sequence[PlannedRun], prepared: Sequence[Prepared], opts: Options
) -> tuple[list[Choice], list[str]]:
    """One :class:`Choice` per run so that the model keeps at most ``opts.budget`` of its parameters at the least
    measured cost, and the notes that say what each option cost."""
    total = sum(p.numel() for p in model.parameters())
    limit = opts.budget * total
    batches, reference = cost_inputs(model, opts)
    options: list[list[tuple[int | None, int, float]]] = []  # per run: [(rank, params saved, cost)]
    for run, prep in zip(runs, prepared):
        rows: list[tuple[int | None, int, float]] = [(None, 0, 0.0)]
        for rank in _ranks(prep.blocks[0]):
            built = build(run, prep, opts, rank)
            cost = output_cost(_tied(model, run, built.layer, batches), batches, reference)
            rows.append((rank, run.params_before - built.params_after, cost))
        options.append(rows)
    notes = []
    picks = _pick(options, total - limit)
    if picks is None:  # even every run at its smallest does not fit: take the smallest
        picks = [max(rows, key=lambda r: r[1]) for rows in options]
        saved = sum(p[1] for p in picks)
        notes.append(
            f"budget={opts.budget} cannot be met by tying runs: the smallest conversion keeps "
            f"{(total - saved) / total:.3f} of the parameters; that one was taken"
        )
    notes.append(
        "budget: " + "; ".join(
            f"{run.path}: " + ", ".join(f"{'as is' if r is None else f'rank {r}'} -{s:,} cost {c:.4f}"
                                        for r, s, c in rows)
            for run, rows in zip(runs, options)
        )
    )  # fmt: skip
    choices = [Choice(p[0], p[2], min(c for _, _, c in rows[1:])) for p, rows in zip(picks, options)]
    return choices, notes


def cost_inputs(model: nn.Module, opts: Options) -> tuple[list[Tensor], list[Tensor]]:
    """The first :data:`COST_IMAGES` calibration inputs and the original model's outputs on them: what every
    option's cost is measured on."""
    batches = _first(list(opts.batches or ()), COST_IMAGES)
    return batches, _outputs(model, batches)


def pick_init(
    model: nn.Module,
    run: PlannedRun,
    prepared: Prepared,
    opts: Options,
    rank: DeltaRank,
    measure: tuple[list[Tensor], list[Tensor]],
) -> tuple[Built, str]:
    """``init="auto"``: the run tied at ``rank`` from the mean of its aligned blocks and from the fit, each
    measured as a budget's options are (the run alone tied, statistics re-estimated, KL from the original
    network's outputs on ``measure``, see :func:`cost_inputs`); the cheaper one, and a note giving both costs."""
    batches, reference = measure
    costs = {}
    for init in ("mean", "fit"):
        built = build(run, prepared, replace(opts, init=init), rank)
        costs[init] = (output_cost(_tied(model, run, built.layer, batches), batches, reference), built)
    best = min(costs, key=lambda k: costs[k][0])
    note = f"{run.path}: {best} (cost mean {costs['mean'][0]:.4f}, fit {costs['fit'][0]:.4f})"
    return costs[best][1], note


def _first(batches: list[Tensor], images: int) -> list[Tensor]:
    out, seen = [], 0
    for b in batches:
        if seen >= images:
            break
        out.append(b[: images - seen])
        seen += out[-1].shape[0]
    return out


def _ranks(block: nn.Module) -> list[int]:
    """The ranks worth trying on a block: :data:`RANKS` up to the largest full rank of its convs and linears."""
    fulls = [full_rank(m) for m in block.modules() if type(m) in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)]
    top = max(fulls, default=0)
    return [r for r in RANKS if r <= top] or [0]


def _outputs(model: nn.Module, batches: Sequence[Tensor]) -> list[Tensor]:
    device = model_device(model)
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            return [model(x.to(device)).detach() for x in batches]
    finally:
        for m, mode in modes:
            m.training = mode


def _tied(model: nn.Module, run: PlannedRun, lr: nn.Module, batches: list[Tensor]) -> nn.Module:
    """A copy of ``model`` computing with ``lr`` in place of the run (the run's first module calls ``lr``, its
    others pass their input on), its running statistics re-estimated on ``batches``."""
    names = {id(m): n for n, m in model.named_modules()}
    paths = [names[id(m)] for m in run.modules]
    twin = copy.deepcopy(model)
    first = twin.get_submodule(paths[0])
    first.forward = lr.forward  # type: ignore[method-assign]
    first.add_module("_reuse_tied", lr)  # so that copies, devices and reestimate see lr's BatchNorms
    for p in paths[1:]:
        twin.get_submodule(p).forward = _identity  # type: ignore[method-assign]
    with warnings.catch_warnings():  # the run's own blocks are bypassed: their norms see nothing, as meant
        warnings.simplefilter("ignore")
        reestimate(twin, batches)
    return twin


def _identity(x: Any) -> Any:
    return x


def _pick(per_run: list[list[tuple[int | None, int, float]]], need: float) -> list[tuple] | None:
    """One option per run saving at least ``need`` parameters at the least total cost, or None if none does."""
    if sum(max(r[1] for r in rows) for rows in per_run) < need:
        return None
    if math.prod(len(rows) for rows in per_run) <= _EXHAUSTIVE:
        best, best_cost = None, math.inf
        for combo in itertools.product(*per_run):
            if sum(c[1] for c in combo) >= need:
                cost = sum(c[2] for c in combo)
                if cost < best_cost:
                    best, best_cost = list(combo), cost
        return best
    picks = [min(rows, key=lambda r: (r[2], -r[1])) for rows in per_run]  # the cheapest of each: then shrink
    while sum(p[1] for p in picks) < need:
        steps = [
            ((o[2] - p[2]) / (o[1] - p[1]), i, o)
            for i, (p, rows) in enumerate(zip(picks, per_run))
            for o in rows
            if o[1] > p[1]
        ]
        _, i, o = min(steps, key=lambda s: s[0])
        picks[i] = o
    return picks
