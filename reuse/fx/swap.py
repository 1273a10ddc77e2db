"""The apply step of :func:`reuse.fx.convert`: each built :class:`~reuse.LayerReuse` put in place of its run's
blocks, in their ``nn.Sequential``, or in a ``torch.fx.GraphModule`` of the module whose ``forward`` calls them.
The model handed in is deep-copied first unless ``inplace``."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass

from torch import fx, nn

from reuse._errors import ReuseError
from reuse.fx.options import Options
from reuse.fx.plan import Plan, PlannedRun
from reuse.fx.trace import BlockTracer
from reuse.layer import LayerReuse

__all__ = ["Applied", "apply"]


@dataclass(frozen=True, eq=False)
class Applied:
    """The converted model and what the swap could not do."""

    model: nn.Module  # the converted model: a copy, or the model handed in with ``inplace``
    failed: Mapping[int, str]  # run index -> why its LayerReuse could not be swapped in (graph runs only)
    graph_modules: tuple[str, ...]  # modules replaced by a GraphModule ("" = the model)
    notes: tuple[str, ...]  # one per GraphModule made


def apply(model: nn.Module, plan: Plan, layers: Mapping[int, LayerReuse], opts: Options) -> Applied:
    """Swap ``layers`` (run index -> its LayerReuse) into ``model`` (a deep copy unless ``opts.inplace``)."""
    runs = plan.runs
    in_sequential = [i for i in layers if runs[i].via == "sequential"]
    work = model if opts.inplace else _copy(model, [m for i in in_sequential for m in runs[i].modules])
    for i in in_sequential:
        _swap_in_sequential(work, runs[i], layers[i])
    in_graph = [i for i in layers if runs[i].via == "graph"]
    owners = sorted({runs[i].owner for i in in_graph}, key=lambda p: -p.count(".") - bool(p))  # innermost first
    failed: dict[int, str] = {}
    graph_modules, notes = [], []
    for owner in owners:
        mine = [i for i in in_graph if runs[i].owner == owner]
        work, why = _swap_in_graph(work, owner, [runs[i] for i in mine], [layers[i] for i in mine], plan, opts)
        failed.update({i: why[k] for k, i in enumerate(mine) if k in why})
        if len(why) < len(mine):
            graph_modules.append(owner)
            what = f"'{owner}'" if owner else f"the model ({type(model).__name__})"
            notes.append(
                f"{what} is now a torch.fx.GraphModule: its forward calls the blocks itself "
                "(not as an nn.Sequential), so its traced forward was rewritten"
            )
    return Applied(work, failed, tuple(graph_modules), tuple(notes))


def _swap_in_sequential(model: nn.Module, run: PlannedRun, lr: LayerReuse) -> None:
    """Put ``lr`` where the run's first block is in its nn.Sequential, and drop the other blocks."""
    owner = model.get_submodule(run.owner)
    names = [b.rpartition(".")[2] for b in run.blocks]
    rebuilt = [(k, lr if k == names[0] else v) for k, v in owner._modules.items() if k not in names[1:]]
    owner._modules.clear()
    owner._modules.update(rebuilt)


def _swap_in_graph(
    model: nn.Module, owner_path: str, runs: list[PlannedRun], lrs: list[LayerReuse], plan: Plan, opts: Options
) -> tuple[nn.Module, dict[int, str]]:
    """Trace the owner alone, replace each run's calls by one call of its LayerReuse, and put a GraphModule
    of the result where the owner was. Returns the (possibly new) model and why runs failed, by position in
    ``runs``."""
    owner = model.get_submodule(owner_path)
    leaves = set()
    for path in plan.leaf_paths:  # the same leaves as when the runs were found, in ``model``
        try:
            leaves.add(id(model.get_submodule(path)))
        except AttributeError:  # swapped out of an nn.Sequential already
            pass
    tracer = BlockTracer(leaves, opts.leaf_types)
    try:
        graph = tracer.trace(owner)
    except Exception as err:
        why = f"{owner_path or 'the model'} cannot be traced alone ({type(err).__name__}: {err})"
        return model, dict.fromkeys(range(len(runs)), why)
    nodes = {n.target: n for n in graph.nodes if n.op == "call_module"}
    prefix = owner_path + "." if owner_path else ""
    failed = {}
    for k, (run, lr) in enumerate(zip(runs, lrs)):
        rel = [b[len(prefix) :] for b in run.blocks]
        chain = [nodes.get(r) for r in rel]
        linked = all(n is not None for n in chain) and all(
            b.args == (a,) and not b.kwargs and len(a.users) == 1 for a, b in zip(chain, chain[1:])
        )
        if not linked:
            failed[k] = f"traced alone, {owner_path or 'the model'} does not call the blocks as a chain"
            continue
        with graph.inserting_after(chain[-1]):
            new = graph.call_module(rel[0], args=chain[0].args)
        chain[-1].replace_all_uses_with(new)
        for n in reversed(chain):
            graph.erase_node(n)
        parent_path, _, name = rel[0].rpartition(".")
        setattr(owner.get_submodule(parent_path), name, lr)
    if len(failed) == len(runs):
        return model, failed
    gm = fx.GraphModule(owner, graph)
    gm.training = owner.training
    if not owner_path:
        return gm, failed
    parent_path, _, name = owner_path.rpartition(".")
    setattr(model.get_submodule(parent_path), name, gm)
    return model, failed


def _copy(model: nn.Module, dropped: list[nn.Module]) -> nn.Module:
    """A deep copy of ``model`` but for ``dropped`` (blocks about to be swapped out: copying them is wasted)."""
    try:
        return copy.deepcopy(model, {id(m): None for m in dropped})
    except Exception as err:
        raise ReuseError(
            f"convert: cannot deep-copy {type(model).__name__} ({type(err).__name__}: {err}); "
            "pass inplace=True to convert the model itself"
        ) from None
