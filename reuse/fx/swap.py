"""How a run is swapped in: the :class:`~reuse.LayerReuse` built from a run's blocks, put in place of the blocks
in their ``nn.Sequential``, or in a ``torch.fx.GraphModule`` of the module whose ``forward`` calls them."""

from __future__ import annotations

import copy

import torch
from torch import fx, nn

from reuse._errors import ReuseError
from reuse.delta import DeltaRank, init_from_blocks
from reuse.fx.find import _Found, _Options, _Planner
from reuse.fx.fit import fit_layers
from reuse.fx.report import Run
from reuse.fx.trace import _Tracer
from reuse.layer import LayerReuse


def _build(
    found: _Found,
    opts: _Options,
    blocks: list[nn.Module] | None = None,
    inputs: list[torch.Tensor] | None = None,
    rank: DeltaRank | None = None,
    cache: dict | None = None,
) -> LayerReuse:
    """The LayerReuse of a run: shared weights from the first block (or the mean, or fitted on ``inputs`` with
    ``init="fit"``), use ``i``'s per-use modules from block ``i``, and with a delta rank (``rank``, else
    ``opts.delta_rank``) each use's deltas from the SVD of block ``i`` minus the shared weights (weighted by
    block ``i``'s inputs when fitted). ``blocks``: the run's blocks as they should be tied (aligned copies)."""
    run = found.run
    blocks = found.units if blocks is None else blocks
    rank = opts.delta_rank if rank is None else rank
    lr = LayerReuse.from_blocks(blocks, shuffle=run.shuffle, groups=opts.groups, per_use=found.rule)
    lr.training = found.modules[0].training
    if opts.init == "mean":
        sources = [dict(m.named_parameters(remove_duplicate=False)) for m in blocks]
        params = dict(lr.uses[0].named_parameters(remove_duplicate=False))
        with torch.no_grad():
            for name in lr.shared_names():
                if name in params and params[name].is_floating_point():
                    # in float64: the mean of k equal tensors is then exactly that tensor
                    params[name].copy_(torch.stack([s[name].double() for s in sources]).mean(0))
    paths = lr._shared_layer_paths()
    run.params_deltas, run.rank = 0, rank
    if rank:
        lr._add_deltas(rank)
        for i, block in enumerate(blocks):
            init_from_blocks(lr.deltas(i), block)
        for m in lr.modules():
            m.training = lr.training
        run.params_deltas = sum(p.numel() for i in range(lr.n) for d in lr.deltas(i).values() for p in _own(d))
    if opts.init == "fit" and inputs is not None:
        fitted = fit_layers(lr.uses, paths, blocks, inputs, cache)
        run.fitted = len(fitted)
    run.params_after = sum(p.numel() for p in lr.parameters())
    return lr


def _own(delta: nn.Module) -> list[nn.Parameter]:
    """A delta wrapper's own parameters (its factors and bias offset), not the shared layer's."""
    return [p for name, p in delta.named_parameters() if not name.startswith("base.")]


def _swap_in_sequential(model: nn.Module, run: Run, lr: LayerReuse) -> None:
    """Put ``lr`` where the run's first block is in its nn.Sequential, and drop the other blocks."""
    owner = model.get_submodule(run.owner)
    names = [b.rpartition(".")[2] for b in run.blocks]
    rebuilt = [(k, lr if k == names[0] else v) for k, v in owner._modules.items() if k not in names[1:]]
    owner._modules.clear()
    owner._modules.update(rebuilt)


def _swap_in_graph(
    model: nn.Module, owner_path: str, founds: list[_Found], lrs: list[LayerReuse], planner: _Planner
) -> tuple[nn.Module, dict[int, str]]:
    """Trace the owner alone, replace each run's calls by one call of its LayerReuse, and put a GraphModule
    of the result where the owner was. Returns the (possibly new) model and why runs failed, by run id."""
    owner = model.get_submodule(owner_path)
    leaves = set()
    for path in planner.leaf_paths():  # the same leaves as when the runs were found, in ``model``
        try:
            leaves.add(id(model.get_submodule(path)))
        except AttributeError:  # swapped out of an nn.Sequential already
            pass
    tracer = _Tracer(leaves, planner.opts.leaf_types)
    try:
        graph = tracer.trace(owner)
    except Exception as err:
        why = f"{owner_path or 'the model'} cannot be traced alone ({type(err).__name__}: {err})"
        return model, {id(f): why for f in founds}
    nodes = {n.target: n for n in graph.nodes if n.op == "call_module"}
    prefix = owner_path + "." if owner_path else ""
    failed = {}
    for f, lr in zip(founds, lrs):
        rel = [b[len(prefix) :] for b in f.run.blocks]
        chain = [nodes.get(r) for r in rel]
        linked = all(n is not None for n in chain) and all(
            b.args == (a,) and not b.kwargs and len(a.users) == 1 for a, b in zip(chain, chain[1:])
        )
        if not linked:
            failed[id(f)] = f"traced alone, {owner_path or 'the model'} does not call the blocks as a chain"
            continue
        with graph.inserting_after(chain[-1]):
            new = graph.call_module(rel[0], args=chain[0].args)
        chain[-1].replace_all_uses_with(new)
        for n in reversed(chain):
            graph.erase_node(n)
        parent_path, _, name = rel[0].rpartition(".")
        setattr(owner.get_submodule(parent_path), name, lr)
    if len(failed) == len(founds):
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
