"""Data-aware conversion of a trained network: the inputs each run sees, its blocks' hidden channels aligned, and
its shared weights and per-use deltas fitted to what the blocks computed, in closed form (no gradient step).

For a shared layer used by blocks ``1..k``, block ``i`` computed ``W_i x`` on its own inputs ``x``; with ``C_i``
the second moment of those inputs (im2col rows for a conv), the tied layer's error over the calibration data is
``sum_i tr((W + D_i - W_i) C_i (W + D_i - W_i)^T)``. The shared ``W`` minimising it for given deltas is
``(sum_i (W_i - D_i) C_i) (sum_i C_i)^-1``; the best rank-``r`` ``D_i`` for a given ``W`` is the truncated SVD of
``(W_i - W) C_i^(1/2)``, mapped back by ``C_i^(-1/2)`` (an activation-weighted SVD). The two are alternated a
few times. Every other tensor (each use's BatchNorm) is the block's own; :func:`reuse.calibrate` then
re-estimates the running statistics of the network as converted.

That fit sees each layer on the original blocks' inputs, so a tied layer's error is not seen by the layers after
it. :func:`refine_layers` (``convert(init="refit")``) fits each layer once more, in the order the block calls
them, from the inputs the converted uses pass along to what the original blocks computed.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from reuse._checks import check_int
from reuse._data import model_device
from reuse._tracing import layer_graph
from reuse.align import (
    ChannelGroup,
    activation_similarity,
    assignment,
    hidden_groups,
    match_weights,
    permute_group,
)
from reuse.delta import LowRank
from reuse.layer import is_batchnorm
from reuse.refitting import layer_rows, ridged

__all__ = [
    "ALIGNS",
    "align_blocks",
    "fit_layers",
    "fit_shared",
    "fittable",
    "owned_copies",
    "refine_layers",
    "run_inputs",
    "weighted_low_rank",
]

ALIGNS = ("weights", "activations")
_ROUNDS = 4  # alternations of the shared weight and the deltas


@torch.no_grad()
def run_inputs(model: nn.Module, firsts: Sequence[nn.Module], batches: Sequence[Tensor]) -> list[list[Tensor] | None]:
    """What each run's first block receives when ``model`` runs on ``batches`` in eval mode: one list of batches
    per run, or None for a run whose first block was not called exactly once a batch."""
    seen: list[list[Tensor]] = [[] for _ in firsts]
    hooks = [
        m.register_forward_pre_hook(lambda _m, args, i=i: seen[i].append(args[0].detach()))
        for i, m in enumerate(firsts)
    ]
    modes = [(m, m.training) for m in model.modules()]
    device = model_device(model)
    try:
        model.eval()
        for x in batches:
            model(x.to(device))
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes:
            m.training = mode
    return [s if len(s) == len(batches) else None for s in seen]


def align_blocks(blocks: Sequence[nn.Module], how: str, inputs: Sequence[Tensor] | None) -> int:
    """Permute the hidden channels of ``blocks`` (copies the caller owns) in place so that they match: by
    ``"weights"`` (no data) or by the correlation of their ``"activations"`` on ``inputs`` (the first block's
    input batches; each block is fed the one before's output). Returns the number of groups aligned per block."""
    groups = hidden_groups(blocks[0])
    if not groups or len(blocks) < 2:
        return 0
    if how == "weights" or inputs is None:
        match_weights(blocks, groups)
        return len(groups)
    moments = _hidden_moments(blocks, groups, inputs)
    for i in range(1, len(blocks)):
        for g, m in zip(groups, moments):
            cross, mean, var = m["cross"][i], m["mean"], m["var"]
            perm = assignment(activation_similarity(cross, mean[i], mean[0], var[i], var[0]))  # (C,)
            permute_group(blocks[i], g, perm)
    return len(groups)


@torch.no_grad()
def _hidden_moments(blocks: Sequence[nn.Module], groups: Sequence[ChannelGroup], inputs: Sequence[Tensor]) -> list:
    """For each group: per block the mean and variance of each hidden channel and its cross moment with block 0's,
    over every position of every batch (blocks chained as in the network)."""
    k = len(blocks)
    acc = [dict(cross=[0.0] * k, s=[0.0] * k, s2=[0.0] * k, n=0) for _ in groups]
    hidden: list[list[Tensor | None]] = [[None] * k for _ in groups]
    hooks = []
    for i, block in enumerate(blocks):
        for j, g in enumerate(groups):
            consumer = block.get_submodule(g.consumers[0])
            hooks.append(consumer.register_forward_pre_hook(lambda _m, a, i=i, j=j: hidden[j].__setitem__(i, a[0])))
    for _ in _chain(blocks, inputs, hooks):  # after each batch has gone through every block
        for j, g in enumerate(groups):
            rows = [_rows(h, g.layout) for h in hidden[j]]  # k x (samples, C)
            a = acc[j]
            a["n"] += rows[0].shape[0]
            for i in range(k):
                a["cross"][i] = a["cross"][i] + rows[i].T @ rows[0]  # (C, C)
                a["s"][i] = a["s"][i] + rows[i].sum(0)
                a["s2"][i] = a["s2"][i] + (rows[i] ** 2).sum(0)
    out = []
    for a in acc:
        n = a["n"]
        mean = [s / n for s in a["s"]]
        var = [s2 / n - mu**2 for s2, mu in zip(a["s2"], mean)]
        out.append(dict(cross=[c / n for c in a["cross"]], mean=mean, var=var))
    return out


def _rows(h: Tensor, layout: str) -> Tensor:
    """Hidden activations as rows of channels, in float64: ``(B, C, ...)`` or ``(..., C)`` -> ``(samples, C)``."""
    if layout == "conv":
        h = h.transpose(0, 1).reshape(h.shape[1], -1).T  # (B*H*W, C)
    else:
        h = h.reshape(-1, h.shape[-1])  # (samples, C)
    return h.double()


# ---------------------------------------------------------------------------------------------- fitting


def fittable(layer: nn.Module) -> bool:
    """Layers whose inputs the fit can read: ``nn.Linear`` and ``nn.Conv2d`` with zero padding."""
    return type(layer) is nn.Linear or (type(layer) is nn.Conv2d and layer.padding_mode == "zeros")


@torch.no_grad()
def fit_layers(
    uses: Sequence[nn.Module],
    paths: Sequence[str],
    blocks: Sequence[nn.Module],
    inputs: Sequence[Tensor],
    cache: dict | None = None,
) -> list[str]:
    """Fit the shared layer at each of ``paths`` (and each use's delta, where the use has one) to what block ``i``
    computed there on the calibration inputs; ``uses`` are the LayerReuse's uses, ``blocks`` the (aligned)
    original blocks, ``inputs`` the first block's input batches; ``cache`` keeps the input moments between calls
    on the same blocks. Layers :func:`fittable` refuses keep their initial weights. Returns the paths fitted."""
    paths = [p for p in paths if fittable(blocks[0].get_submodule(p))]
    if not paths:
        return []
    cache = {} if cache is None else cache
    missing = [p for p in paths if p not in cache]
    if missing:
        cache.update(_input_moments(blocks, missing, inputs))
    moments = cache
    norms = norm_after(blocks[0], paths)
    for p in paths:
        targets = [b.get_submodule(p) for b in blocks]
        views = [u.get_submodule(p) for u in uses]
        deltas = [v if isinstance(v, LowRank) else None for v in views]
        shared = deltas[0].base if deltas[0] is not None else views[0]
        after = [u.get_submodule(norms[p]) for u in uses] if norms.get(p) else None
        fit_shared(shared, deltas, targets, moments[p], after)
    return paths


def norm_after(block: nn.Module, paths: Sequence[str]) -> dict[str, str]:
    """``{path: norm path}`` for each layer whose output goes to a BatchNorm and nowhere else (in ``block``'s graph):
    such a layer's output may be fitted up to a scale per channel, which the norm takes back."""
    try:
        graph = layer_graph(block)
    except Exception:
        return {}
    modules = dict(block.named_modules())
    out = {}
    for node in graph.nodes:
        if node.op == "call_module" and node.target in paths and len(node.users) == 1:
            (user,) = node.users
            m = modules.get(user.target) if user.op == "call_module" else None
            if m is not None and is_batchnorm(m) and user.args == (node,):
                out[node.target] = user.target
    return out


@torch.no_grad()
def refine_layers(
    uses: Sequence[nn.Module],
    paths: Sequence[str],
    blocks: Sequence[nn.Module],
    inputs: Sequence[Tensor],
    *,
    sweeps: int = 1,
) -> list[str]:
    """Fit each shared layer again, in the order the block runs them, on the inputs the CONVERTED uses give it.

    :func:`fit_layers` fits every layer on the original blocks' inputs ``X_i``, so an error of a tied layer is not
    seen by the layers after it. Here use ``i``'s layer at ``p`` receives ``Xh_i`` (the uses chained from the
    run's input, with every layer as fitted so far) and should give what block ``i`` computed, ``W_i X_i``; the
    least-squares map from one to the other is ``A_i = W_i M_i Ch_i^-1`` (``M_i = X_i^T Xh_i``,
    ``Ch_i = Xh_i^T Xh_i``), and ``sum_i |Xh_i (W + D_i)^T - X_i W_i^T|^2`` differs from
    ``sum_i tr((W + D_i - A_i) Ch_i (W + D_i - A_i)^T)`` by a constant, so :func:`fit_shared` solves it with
    targets ``A_i`` and moments ``Ch_i``. Once a layer is refitted, the norm after it (one per use) takes its
    inputs' statistics in the converted uses (as :func:`reuse.calibrate` would),
    so that the next layer is refitted on the inputs it will see. ``sweeps`` passes over the layers. Layers
    :func:`fittable` refuses are left alone; returns the paths refitted.
    ``convert(init="refit")`` runs one sweep after :func:`fit_layers`."""
    sweeps = check_int(sweeps, "sweeps", "refine_layers", about="passes over the layers")
    paths = _in_call_order(blocks[0], [p for p in paths if fittable(blocks[0].get_submodule(p))])
    norms = norm_after(blocks[0], paths)
    for _ in range(sweeps):
        for p in paths:
            cross, own = _paired_moments(uses, blocks, p, inputs)
            ws = [b.get_submodule(p).weight.detach().double() for b in blocks]
            g = own[0].shape[0]
            targets = []
            for w, m, c in zip(ws, cross, own):
                w = w.reshape(g, -1, c.shape[-1])  # (g, rows, D)
                targets.append(torch.linalg.solve(ridged(c), (w @ m).transpose(1, 2)).transpose(1, 2))  # W M Ch^-1
            views = [u.get_submodule(p) for u in uses]
            deltas = [v if isinstance(v, LowRank) else None for v in views]
            shared = deltas[0].base if deltas[0] is not None else views[0]
            after = [u.get_submodule(norms[p]) for u in uses] if norms.get(p) else None
            if after is not None and len({id(n) for n in after}) < len(after):
                after = None  # one norm for several uses: fit_shared leaves it alone
            origs = [b.get_submodule(p) for b in blocks]
            fit_shared(shared, deltas, origs, own, after, weights=targets)
            if after is not None:  # the next layer's inputs as calibration will leave them
                _reestimate(uses, norms[p], inputs)
    return list(paths)


def _in_call_order(block: nn.Module, paths: Sequence[str]) -> list[str]:
    """``paths`` in the order ``block``'s graph calls them (as given where the block cannot be traced)."""
    try:
        graph = layer_graph(block)
    except Exception:
        return list(paths)
    order = [n.target for n in graph.nodes if n.op == "call_module" and n.target in paths]
    return list(dict.fromkeys(order)) + [p for p in paths if p not in order]


@torch.no_grad()
def _paired_moments(
    uses: Sequence[nn.Module], blocks: Sequence[nn.Module], path: str, inputs: Sequence[Tensor]
) -> tuple[list[Tensor], list[Tensor]]:
    """Per use ``i``: ``M_i = X_i^T Xh_i`` and ``Ch_i = Xh_i^T Xh_i`` (each ``(g, D, D)``), with ``X_i`` the input
    rows of block ``i``'s layer at ``path`` (the blocks chained from ``inputs``) and ``Xh_i`` those of use ``i``'s
    (the uses chained from the same inputs)."""
    k = len(blocks)
    layer = blocks[0].get_submodule(path)
    seen: dict[str, list[Tensor]] = {"orig": [], "conv": []}
    hooks, hooked = [], set()
    for i in range(k):
        for side, owner in (("orig", blocks[i]), ("conv", uses[i])):
            target = owner.get_submodule(path)  # the uses may share one module: hook it once
            if id(target) not in hooked:
                hooked.add(id(target))
                grab = lambda _m, args, side=side: seen[side].append(layer_rows(layer, args[0]))  # noqa: E731
                hooks.append(target.register_forward_pre_hook(grab))
    cross: list = [0.0] * k
    own: list = [0.0] * k
    modes = [(m, m.training) for mod in (*blocks, *uses) for m in mod.modules()]
    try:
        for m, _ in modes:
            m.training = False
        for x in inputs:
            xo = xc = x
            for i in range(k):
                xo, xc = blocks[i](xo), uses[i](xc)
                for xr, xh in zip(seen["orig"], seen["conv"]):  # (g, samples, D) each
                    cross[i] = cross[i] + xr.transpose(1, 2) @ xh  # (g, D, D)
                    own[i] = own[i] + xh.transpose(1, 2) @ xh  # (g, D, D)
                seen["orig"].clear()
                seen["conv"].clear()
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes:
            m.training = mode
    return cross, own


def _reestimate(uses: Sequence[nn.Module], norm: str, inputs: Sequence[Tensor]) -> None:
    """Give the norm at ``norm`` of each use the mean and (biased) variance per channel of its inputs in the
    converted uses, in eval mode, use by use (use ``i``'s statistics see the earlier uses' new ones)."""
    for i, use in enumerate(uses):
        bn = use.get_submodule(norm)
        sums: list = [0.0, 0.0, 0]

        def grab(_m: nn.Module, args: tuple, sums: list = sums) -> None:
            h = args[0].transpose(0, 1).reshape(args[0].shape[1], -1).double()  # (C, B*H*W)
            sums[0], sums[1], sums[2] = sums[0] + h.sum(1), sums[1] + (h**2).sum(1), sums[2] + h.shape[1]

        for _ in _chain(uses[: i + 1], inputs, [bn.register_forward_pre_hook(grab)]):
            pass
        mean = sums[0] / sums[2]  # (C,)
        bn.running_mean.copy_(mean.to(bn.running_mean))
        bn.running_var.copy_((sums[1] / sums[2] - mean**2).clamp_min(0).to(bn.running_var))


@torch.no_grad()
def _input_moments(blocks: Sequence[nn.Module], paths: Sequence[str], inputs: Sequence[Tensor]) -> dict:
    """``{path: [C_i per block]}``: the second moment ``(g, D, D)`` of each layer's input rows (per group)."""
    k = len(blocks)
    out: dict[str, list] = {p: [0.0] * k for p in paths}
    hooks = []
    for i, block in enumerate(blocks):
        for p in paths:
            layer = block.get_submodule(p)

            def grab(m: nn.Module, args: tuple, i: int = i, p: str = p) -> None:
                rows = layer_rows(m, args[0])  # (g, samples, D)
                out[p][i] = out[p][i] + rows.transpose(1, 2) @ rows  # (g, D, D)

            hooks.append(layer.register_forward_pre_hook(grab))
    for _ in _chain(blocks, inputs, hooks):
        pass
    return out


def _chain(blocks: Sequence[nn.Module], inputs: Sequence[Tensor], hooks: list) -> Iterator[None]:
    """Feed each batch through the blocks in turn (eval mode, no grad), yielding after each; then remove ``hooks``
    and give every module its mode back."""
    modes = [(m, m.training) for b in blocks for m in b.modules()]
    try:
        for b in blocks:
            b.eval()
        with torch.no_grad():
            for x in inputs:
                for b in blocks:
                    x = b(x)
                yield
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes:
            m.training = mode


@torch.no_grad()
def fit_shared(
    shared: nn.Module,
    deltas: list[LowRank | None],
    targets: list[nn.Module],
    covs: list[Tensor],
    norms: list[nn.Module] | None = None,
    weights: list[Tensor] | None = None,
) -> None:
    """Solve for the shared weight and the deltas of one layer (see the module docstring). With ``norms`` (use
    ``i``'s BatchNorm right after the layer), each block's output channels are first scaled to the same size on
    its inputs (a BatchNorm makes a channel's scale arbitrary: what matters is its direction), and each use's norm
    statistics are scaled alike, so the use computes what its block did wherever the fit is exact. ``weights``
    (``(g, rows, D)`` per block) stand in for the targets' own weights (their biases are kept)."""
    g = covs[0].shape[0]
    if weights is None:
        weights = [t.weight.detach() for t in targets]
    ws = [w.double().reshape(g, -1, covs[0].shape[-1]) for w in weights]  # k x (g, rows, D)
    covs = [ridged(c) for c in covs]
    scales = [w.new_ones(w.shape[0] * w.shape[1]) for w in ws]  # (O,) per block
    if norms is not None and len({id(n) for n in norms}) < len(norms):
        norms = None  # one norm for several uses: its statistics cannot follow each use's scale
    if norms is not None and all(t.bias is None for t in targets):
        sizes = torch.stack(
            [torch.einsum("grd,gde,gre->gr", w, c, w).clamp_min(1e-30).sqrt().flatten() for w, c in zip(ws, covs)]
        )  # (k, O)
        scales = list(sizes / sizes.mean(0, keepdim=True))  # k x (O,): block i's channel sizes against the mean
        ws = [w / s.reshape(w.shape[0], w.shape[1], 1) for w, s in zip(ws, scales)]
    total = torch.stack(covs).sum(0)  # (g, D, D)
    ds = [torch.zeros_like(w) for w in ws]
    rounds = _ROUNDS if any(d is not None for d in deltas) else 1
    for _ in range(rounds):
        rhs = sum((w - d) @ c for w, d, c in zip(ws, ds, covs))  # (g, rows, D)
        shared_w = torch.linalg.solve(total, rhs.transpose(1, 2)).transpose(1, 2)  # (g, rows, D); C symmetric
        ds = [
            weighted_low_rank(w - shared_w, c, d.rank) if d is not None else torch.zeros_like(w)
            for w, c, d in zip(ws, covs, deltas)
        ]
    shared.weight.copy_(shared_w.reshape(shared.weight.shape).to(shared.weight.dtype))
    if shared.bias is not None:
        shared.bias.copy_(torch.stack([t.bias.detach() for t in targets]).mean(0))
    for d, diff, t in zip(deltas, ds, targets):
        if d is not None:
            bias = t.bias.detach() - shared.bias if (shared.bias is not None and t.bias is not None) else None
            d.set_delta(diff.reshape(shared.weight.shape), bias)  # exact: diff is of rank d.rank already
    if norms is not None and all(t.bias is None for t in targets):
        for norm, scale in zip(norms, scales):  # the norm sees its channels divided by ``scale``: so its statistics
            scale = scale.to(norm.running_mean)
            norm.running_mean.div_(scale)
            norm.running_var.div_(scale**2)


def weighted_low_rank(diff: Tensor, cov: Tensor, rank: int) -> Tensor:
    """The rank-``rank`` matrix ``D`` minimising ``tr((diff - D) cov (diff - D)^T)``, per group."""
    vals, vecs = torch.linalg.eigh(cov)  # (g, D), (g, D, D)
    root = vals.clamp_min(vals[:, -1:] * 1e-12).sqrt()  # (g, D)
    u, s, vh = torch.linalg.svd(diff @ (vecs * root[:, None, :]), full_matrices=False)  # diff C^(1/2) in the eigenbasis
    low = (u[:, :, :rank] * s[:, None, :rank]) @ vh[:, :rank]  # (g, rows, D)
    return (low / root[:, None, :]) @ vecs.transpose(1, 2)  # back: times C^(-1/2)


def owned_copies(units: Sequence[nn.Module]) -> list[nn.Module]:
    """Deep copies of a run's blocks, to align without touching the model handed in."""
    return [copy.deepcopy(u) for u in units]
