"""How a run is found (the plan step of :func:`reuse.fx.convert`): candidate blocks, chains of calls in the
traced graph, blocks of several modules, and why a chain is cut or skipped. The model is only read; the result is
an immutable :class:`~reuse.fx.plan.Plan`."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

from torch import fx, nn

from reuse._errors import ReuseError
from reuse._per_use import PerUse, is_norm, per_use_predicate
from reuse.fx.options import Options
from reuse.fx.plan import Plan, PlannedRun
from reuse.fx.report import span
from reuse.fx.shapes import Shape, default_inputs, record_shapes
from reuse.fx.structure import KeepPerUse, Structure, count_params, shared_count
from reuse.fx.trace import BlockTracer, trace_model
from reuse.layer import LayerReuse
from reuse.shuffle import check_shuffle

__all__ = ["MAX_PERIOD", "find"]

MAX_PERIOD = 4  # most modules in one block made of consecutive modules (VGG: conv, BN, ReLU)


def find(model: nn.Module, opts: Options) -> Plan:
    """The runs of ``model`` (checked by :func:`reuse.fx.options.check_options`), converted or skipped."""
    return _Planner(model, opts).plan()


class _Planner:
    """Finds the runs of one model (without changing it)."""

    def __init__(self, model: nn.Module, opts: Options) -> None:
        self.model = model
        self.opts = opts
        self.struct = Structure()
        named = list(model.named_modules(remove_duplicate=False))
        seen = Counter(id(m) for _, m in named)
        self.path: dict[int, str] = {}
        self.by_path: dict[str, nn.Module] = {}
        self.parent: dict[int, tuple[nn.Module, str]] = {}
        for name, m in model.named_modules():
            self.path[id(m)] = name
            self.by_path[name] = m
            for child_name, child in m.named_children():
                self.parent.setdefault(id(child), (m, child_name))
        self.shared = {i for i, count in seen.items() if count > 1}  # reachable by several paths
        self.candidates = self._candidates()
        self.leaf_ids: set[int] = set()
        for leaf in opts.leaf_paths:
            if leaf not in self.by_path:
                raise ReuseError(
                    f"convert: leaf_modules names '{leaf}', which is not a submodule of {type(model).__name__}; "
                    "give qualified names as in model.named_modules(), or module classes"
                )
            self.leaf_ids.add(id(self.by_path[leaf]))
        self.leaves: set[int] = set()
        self.param_paths: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            self.param_paths.setdefault(id(p), []).append(name)

    def _candidates(self) -> dict[int, nn.Module]:
        """Modules with weights, reachable by one path, with a sibling of the same structure."""
        out: dict[int, nn.Module] = {}
        for m in self.by_path.values():
            groups: dict[int, list[nn.Module]] = {}
            for child in m.children():
                if id(child) in self.shared or isinstance(child, LayerReuse):
                    continue
                if not self.struct.weightless(child):
                    groups.setdefault(self.struct.key(child), []).append(child)
            for group in groups.values():
                if len(group) > 1:
                    out.update((id(c), c) for c in group)
        return out

    def plan(self) -> Plan:
        """The runs, model-level notes, and the leaves of the final trace."""
        kept = self._kept_note()
        params = count_params([self.model])
        if not self.candidates:
            return Plan(params, (), ("no run: no module has a sibling of the same structure", *kept))
        inputs = self.opts.example_inputs or default_inputs(self.model)
        self.shapes = record_shapes(self.model, inputs, [m for p, m in self.by_path.items() if p])
        active = set(self.candidates)
        opened: list[PlannedRun] = []
        inside = {i: self._has_candidate_below(m) for i, m in self.candidates.items()}
        while True:
            tracer = BlockTracer(active | self.leaf_ids, self.opts.leaf_types)
            graph = trace_model(self.model, tracer, "model", len(inputs))
            found, notes = self._runs(graph, tracer)
            in_runs = {id(m) for f in found if not f.skipped for m in f.modules}
            called = {id(self.by_path[n.target]) for n in graph.nodes if n.op == "call_module"}
            to_open = {i for i in active & called if inside[i] and i not in in_runs}
            if not to_open:
                break
            for f in found:  # keep the explanation of a skipped outer run whose blocks we now look into
                if f.skipped and any(id(m) in to_open for m in f.modules):
                    opened.append(replace(f, skipped=f.skipped + " (looked for runs inside its blocks instead)"))
            active -= to_open
        if not found:
            notes.insert(0, "no run: no two same-structure blocks are called one after the other")
        leaves = tuple(self.path[i] for i in active | self.leaf_ids)
        return Plan(params, tuple(opened + found), (*notes, *kept), leaves)

    def _kept_note(self) -> tuple[str, ...]:
        """The note on the LayerReuse modules the model holds already (outermost ones: one is never entered)."""
        reused = [p or "the model" for p, m in self.by_path.items() if isinstance(m, LayerReuse)]
        if not reused:
            return ()
        outer = [p for p in reused if not any(p.startswith(q + ".") for q in reused if q != p)]
        listed = ", ".join(outer[:4]) + (f", ... ({len(outer)} in all)" if len(outer) > 4 else "")
        return (
            f"kept {len(outer)} LayerReuse module(s) as they are, already reused ({listed}): "
            "convert neither enters nor re-converts them",
        )

    def _has_candidate_below(self, module: nn.Module) -> bool:
        return any(id(m) in self.candidates for m in module.modules() if m is not module)

    def _runs(self, graph: fx.Graph, tracer: BlockTracer) -> tuple[list[PlannedRun], list[str]]:
        """Chains of sibling modules, each call fed only by the previous one, cut into runs."""
        calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
        attrs = [n.target for n in graph.nodes if n.op == "get_attr"]
        nxt: dict[fx.Node, fx.Node] = {}
        notes: list[str] = []
        for n in graph.nodes:
            m = self._called(n)
            if m is None or len(n.args) != 1 or n.kwargs or not isinstance(n.args[0], fx.Node):
                continue
            p = n.args[0]
            pm = self._called(p)
            if pm is None or self.parent[id(pm)][0] is not self.parent[id(m)][0]:
                continue
            if len(p.users) != 1:
                if id(pm) in self.candidates and self.struct.key(pm) == self.struct.key(m):
                    others = ", ".join(sorted(u.name for u in p.users if u is not n))
                    notes.append(
                        f"{p.target} -> {n.target}: same structure, but {p.target}'s output also feeds {others}, "
                        "so they cannot become one reused block"
                    )
                continue
            nxt[p] = n
        fed = set(nxt.values())
        found = []
        for start in [n for n in nxt if n not in fed]:
            chain = [start]
            while chain[-1] in nxt:
                chain.append(nxt[chain[-1]])
            for period, units in self._periodic(chain):
                found += self._segments(units, period, calls, attrs, tracer)
        return found, notes

    def _called(self, node: fx.Node) -> nn.Module | None:
        """The module a call_module node calls, if it may belong to a run (one path, not a LayerReuse)."""
        if node.op != "call_module":
            return None
        m = self.by_path.get(node.target)
        return None if m is None or id(m) in self.shared or isinstance(m, LayerReuse) else m

    def _periodic(self, chain: list[fx.Node]) -> list[tuple[int, list[list[fx.Node]]]]:
        """Cut a chain of sibling calls into repeats of one block: ``p`` consecutive modules (``p = 1``: a
        block module, such as a ResNet bottleneck; ``p > 1``: VGG's conv, ReLU or Swin's alternating
        blocks) whose structures repeat. From left to right, the period covering most modules wins, the
        smaller one on a tie; a block starts with a module that has weights and is not a norm (conv, BN, ReLU
        rather than BN, ReLU, conv)."""
        mods = [self.by_path[n.target] for n in chain]
        keys = [self.struct.key(m) for m in mods]
        starts = [not self.struct.weightless(m) and not is_norm(m) for m in mods]
        out = []
        i = 0
        while i < len(chain):
            best = (1, 0)  # (period, repeats)
            for p in range(1, MAX_PERIOD + 1):
                if not starts[i]:
                    break
                r = 1
                while i + (r + 1) * p <= len(chain) and keys[i + r * p : i + (r + 1) * p] == keys[i : i + p]:
                    r += 1
                if r >= 2 and r * p > best[0] * best[1]:
                    best = (p, r)
            p, r = best
            if r >= 2:
                out.append((p, [chain[i + u * p : i + (u + 1) * p] for u in range(r)]))
                i += p * r
            else:
                i += 1
        return out

    def _segments(
        self, units: list[list[fx.Node]], period: int, calls: Counter, attrs: list[str], tracer: BlockTracer
    ) -> list[PlannedRun]:
        """Split repeats at the blocks that cannot be reused (shape change, several calls) and check the rest."""
        segments: list[list[list[fx.Node]]] = [[]]
        left_out: list[str] = []
        for unit in units:
            why = self._unit_problem(unit, calls)
            if why:
                left_out.append(f"{span([n.target for n in unit])} left out: {why}")
                segments.append([])
            else:
                segments[-1].append(unit)
        out = [self._found(seg, period, "; ".join(left_out), attrs, tracer) for seg in segments if seg]
        if not out:  # every block was left out: report the repeats themselves
            out.append(replace(self._found(units, period, "", attrs, tracer, check=False), skipped="; ".join(left_out)))
        return out

    def _found(
        self,
        units: list[list[fx.Node]],
        period: int,
        note: str,
        attrs: list[str],
        tracer: BlockTracer,
        check: bool = True,
    ) -> PlannedRun:
        mods = [self.by_path[n.target] for unit in units for n in unit]
        if period == 1:
            blocks = mods
        else:  # a block of several modules becomes an nn.Sequential of them (the modules are not changed)
            blocks = [nn.Sequential(*mods[u * period : (u + 1) * period]) for u in range(len(units))]
        run = PlannedRun(
            blocks=tuple(n.target for unit in units for n in unit),
            block_type="+".join(type(m).__name__ for m in mods[:period]),
            period=period,
            modules=tuple(mods),
            units=tuple(blocks),
            rule=self._rule(blocks),
            input_shape=self.shapes[id(mods[0])][0][0] if self.shapes.get(id(mods[0])) else None,
            params_before=count_params(mods),
            note=note,
        )
        if not check:
            return run
        problem, owner = self._run_problem(run, attrs, tracer)
        return replace(run, skipped=problem, owner=owner) if problem else self._settled(run, owner)

    def _unit_problem(self, unit: list[fx.Node], calls: Counter) -> str:
        for n in unit:
            if calls[n.target] > 1:
                return f"{n.target} is called {calls[n.target]} times in the forward (already shared)"
            recs = self.shapes.get(id(self.by_path[n.target]), [])
            if len(recs) != 1:
                return f"called {len(recs)} times on the example input" if recs else "not called on the example input"
        x, y = self.shapes[id(self.by_path[unit[0].target])][0][0], self.shapes[id(self.by_path[unit[-1].target])][0][1]
        if x is None or y is None:
            return "does not map one tensor to one tensor"
        if x != y:
            return f"changes the shape {x} -> {y}"
        return ""

    def _run_problem(self, run: PlannedRun, attrs: list[str], tracer: BlockTracer) -> tuple[str, str]:
        """Why the run cannot be converted ("" if it can), and the module whose forward calls its blocks."""
        mods = run.modules
        if run.n < self.opts.min_run:
            return f"{run.n} block(s) in a row, fewer than min_run={self.opts.min_run}", ""
        prefixes = tuple(b + "." for b in run.blocks)
        read = [a for a in attrs if a.startswith(prefixes)]
        if read:
            return f"the forward reads {read[0]} directly, a tensor inside a block", ""
        inside = {id(p) for m in mods for p in m.parameters()}
        for pid in inside:
            outside = [q for q in self.param_paths[pid] if not q.startswith(prefixes)]
            if outside:
                return f"a block's parameter is tied to {outside[0]}, outside the run", ""
        for m in mods:
            for sub_name, sub in m.named_modules():
                if sub._forward_hooks or sub._forward_pre_hooks or sub._backward_hooks:
                    name = f"{self.path[id(m)]}.{sub_name}".rstrip(".")
                    return f"{name} has hooks; register them after converting", ""
        owners = {c for b in run.blocks for c in tracer.callers.get(b, [])}
        if len(owners) != 1:
            return f"its blocks are called from different modules ({', '.join(sorted(owners))})", ""
        owner = owners.pop()
        if shared_count(run.units[0], run.rule) == 0:
            return "nothing to share: every parameter is per use", owner
        return "", owner

    def _rule(self, blocks: list[nn.Module]) -> PerUse:
        """The per-use rule of a run: the option, plus its weightless modules that differ between blocks."""
        classes = self._per_use_classes(blocks)
        return KeepPerUse(self.opts.per_use, classes) if classes else self.opts.per_use

    def _per_use_classes(self, blocks: list[nn.Module]) -> tuple[type[nn.Module], ...]:
        """Classes of block 0's weightless submodules that differ (class or settings) in another block."""
        classes: list[type[nn.Module]] = []
        first = blocks[0]
        for name, sub in first.named_modules():
            if not name or not self.struct.weightless(sub):
                continue
            parent = first.get_submodule(name.rpartition(".")[0])
            if parent is not first and self.struct.weightless(parent):
                continue  # inside a larger weightless subtree
            if any(self.struct.full_key(o.get_submodule(name)) != self.struct.full_key(sub) for o in blocks[1:]):
                if type(sub) not in classes:
                    classes.append(type(sub))
        return tuple(classes)

    def _settled(self, run: PlannedRun, owner_path: str) -> PlannedRun:
        """The run with its shuffle, per-use classes, the way it is swapped in, and its parameter count decided."""
        block = run.units[0]
        shuffle, why = _shuffle_choice(self.opts.shuffle, self.opts.groups, run.input_shape, block)
        owner = self.by_path[owner_path]
        names = [self.parent[id(m)][1] for m in run.modules]
        keys = list(owner._modules)
        in_owner = all(self.parent[id(m)][0] is owner for m in run.modules)
        consecutive = in_owner and keys[keys.index(names[0]) : keys.index(names[0]) + len(names)] == names
        per_use = count_params([block], per_use_predicate(run.rule))
        return replace(
            run,
            shuffle=shuffle,
            note="; ".join(filter(None, [why, run.note])),
            per_use=tuple(c.__name__ for c in getattr(run.rule, "classes", ())),
            via="sequential" if type(owner).forward is nn.Sequential.forward and consecutive else "graph",
            owner=owner_path,
            params_after=shared_count(block, run.rule) + run.n * per_use,
        )


def _shuffle_choice(requested: bool, groups: int, shape: Shape, block: nn.Module) -> tuple[bool, str]:
    """Shuffle as the paper does, when dim 1 of a 4-D input is the channels a convolution reads."""
    if not requested:
        return False, ""
    if shape is None or len(shape) != 4:
        return False, f"no shuffle: input shape {shape} is not (B, C, H, W)"
    channels = shape[1]
    convs = [m for m in block.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    if not any(c.in_channels == channels for c in convs):
        return False, f"no shuffle: no convolution of the block reads dim 1 ({channels}) as its channels"
    try:
        check_shuffle(channels, groups, True)
    except ReuseError as err:
        return False, f"no shuffle: {err}"
    return True, ""
