"""Model-zoo matrix for ``reuse.convert``: every torchvision classification builder and a broad timm sample.

Each model is built without pretrained weights, converted, run forward and backward in train mode, and
checked: the model handed in is untouched, every parameter of the converted one gets a gradient, it has no
more parameters than the original, the report agrees with the model (parameter counts, one LayerReuse per
converted run), and a model with no run comes back unchanged with a report that says why. For the models
run for real, the exactness invariant too: the blocks of every run given the same weights, the converted
model without shuffle computes the same outputs in eval mode.

Models up to ``REAL_MAX_PARAMS`` parameters run for real on a small input (batch 2, mostly 32x32). Larger models,
and those that only accept their native input size, are built and run on the ``meta`` device: the
conversion and the whole forward and backward pass execute (shapes, autograd graph, a gradient for every
parameter) without arithmetic, so the matrix takes about a minute of CPU time.

The models, their inputs and what is known of them by hand (which have no run and why, how many runs the
others have) are in tests/_zoo.py (feature "zoo"). ``test_coverage_target`` runs ``find_runs`` over the whole
matrix and checks the coverage against those hand counts. ``python tests/test_fx_zoo.py`` prints the coverage
table of docs/convert.md.
"""

from __future__ import annotations

import contextlib
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from unittest import mock

import pytest
import torch
from _zoo import ZOO, Model, randomize, select
from test_fx import tie_runs  # pytest (import mode "prepend") puts tests/ on sys.path
from torch import nn

import reuse
from reuse import LayerReuse

REAL_MAX_PARAMS = 40_000_000  # larger models run on the meta device
ZOO_MODELS = [m for m in ZOO.values() if "zoo" in m.features]


@contextlib.contextmanager
def _no_init() -> Iterator[None]:
    """Skip weight initialisation (the tensors stay uninitialised): a fast build for a model bound for meta."""
    names = [n for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")]
    with contextlib.ExitStack() as stack:
        for n in names:
            stack.enter_context(mock.patch.object(torch.nn.init, n, lambda t, *a, **k: t))
        yield


def build(case: Model, meta: bool) -> nn.Module:
    """A fresh model, seeded (not ``case.build()``'s cached copy: the matrix would hold every model at once); on
    the meta device when ``meta`` (built there directly when the builder allows)."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not meta:
            return case.make()
        try:
            with torch.device("meta"):
                return case.make()
        except Exception:  # builders that compute with tensors (torchvision RegNet): build without init, then move
            with _no_init():
                return case.make().to("meta")


def _tensors(out: object) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


def _state(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass
class Outcome:
    id: str
    device: str
    params_before: int
    params_after: int
    runs: int
    report: reuse.ConversionReport
    seconds: float


def check(case: Model) -> Outcome:
    """Convert one zoo model and run every check on it; returns what the coverage table shows."""
    start = time.perf_counter()
    meta_model = build(case, meta=True)
    meta = case.native or _count(meta_model) > REAL_MAX_PARAMS
    model = meta_model if meta else build(case, meta=False)
    x = torch.randn(case.shape, device="meta" if meta else "cpu")
    # Every in-place write bumps a tensor's version counter: (object, version) pins the whole state.
    before = {k: (v, v._version) for k, v in _state(model)}
    structure = repr(model)

    new, rep = reuse.convert(model, example_inputs=x, report=True)

    # The model handed in is untouched.
    assert repr(model) == structure
    after = dict(_state(model))
    assert after.keys() == before.keys()
    assert all(after[k] is t and t._version == v for k, (t, v) in before.items())

    # The report agrees with the models.
    assert rep.params_before == _count(model)
    assert rep.params_after == _count(new) <= rep.params_before
    saved = sum(r.params_before - r.params_after for r in rep.converted)
    assert rep.params_before - rep.params_after == saved
    reused = sorted(m.n for m in new.modules() if isinstance(m, LayerReuse))
    assert reused == sorted(r.n for r in rep.converted)
    assert all(r.skipped for r in rep.skipped)
    if not rep.converted:
        assert repr(new) == structure, "a model with no run comes back unchanged"
        assert rep.notes or rep.skipped, "and the report says why"

    # Forward and backward in train mode: every parameter gets a gradient.
    new.train()
    loss = sum(t.float().mean() for t in _tensors(new(x)))
    loss.backward()
    missing = [n for n, p in new.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"

    # Exactness (real models): with the blocks of every run sharing weights, the converted model without
    # shuffle computes the same function in eval mode.
    if not meta and rep.converted:
        model.eval()
        randomize(model)
        tie_runs(model, rep.converted)
        exact = reuse.convert(model, shuffle=False, example_inputs=x).eval()
        with torch.no_grad():
            for a, b in zip(_tensors(exact(x)), _tensors(model(x)), strict=True):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    return Outcome(
        case.name,
        "meta" if meta else "cpu",
        rep.params_before,
        rep.params_after,
        len(rep.converted),
        rep,
        time.perf_counter() - start,
    )


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Small inputs gain nothing from two threads; on a shared, loaded CPU the second thread's barrier waits
    made a 32x32 forward 20x slower (measured: DenseNet-121 check 42 s with 2 threads, 2 s with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("case", select("zoo"))  # the slowest (>= 1.2 s of CPU time each) marked heavy
def test_zoo(case: Model) -> None:
    out = check(case)
    if case.runs == 0:
        assert out.runs == 0, f"{case.name} now converts: give it its runs in tests/_zoo.py and docs/convert.md"
    else:
        assert out.runs > 0, f"{case.name} no longer converts anything: {out.report.notes}"
    if case.runs is not None:
        assert out.runs == case.runs, f"{case.name}: {out.runs} runs converted, {case.runs} counted by hand"


def runs_found(case: Model) -> int:
    """How many runs ``reuse.find_runs`` finds and would convert in the model, built and traced on meta."""
    model = build(case, meta=True)
    return sum(not r.skipped for r in reuse.find_runs(model, example_inputs=torch.randn(case.shape, device="meta")))


@pytest.mark.heavy
def test_coverage_target() -> None:
    """``find_runs`` on every model of the matrix (on the meta device): at least 85% of the torchvision builders
    and 75% of the timm sample have a run to convert; the models without one are those tests/_zoo.py says have
    none (each with its reason, checked by hand), and where it counts runs by hand, find_runs finds as many.
    (That every model converts and runs forward and backward is test_zoo's part.)"""
    found = {case.name: runs_found(case) for case in ZOO_MODELS}
    for source, share in (("torchvision", 0.85), ("timm", 0.75)):
        names = [case.name for case in ZOO_MODELS if case.source == source]
        with_run = [name for name in names if found[name] > 0]
        assert len(with_run) >= share * len(names), f"{source}: {len(with_run)} of {len(names)} have a run"
    assert {name for name, n in found.items() if n == 0} == {case.name for case in ZOO_MODELS if case.runs == 0}
    counted = {case.name: case.runs for case in ZOO_MODELS if case.runs}
    assert {name: found[name] for name in counted} == counted
    assert len(counted) >= 50, "most of the matrix's families have their runs counted by hand"


def coverage_table() -> str:
    """The coverage table of docs/convert.md, from a fresh run of the whole matrix."""
    rows = [
        "| model | run on | parameters before | after | runs converted | seconds | remark |",
        "|---|---|---|---|---|---|---|",
    ]
    ok = {"torchvision": [0, 0, 0], "timm": [0, 0, 0]}  # converted and ran, with a run, total
    for case in ZOO_MODELS:
        source = case.source
        ok[source][2] += 1
        try:
            o = check(case)
            ok[source][0] += 1
            ok[source][1] += o.runs > 0
            remark = "" if o.runs else "no run: " + (case.why_no_run or "; ".join(o.report.notes))
            counts = [f"{o.params_before:,}", f"{o.params_after:,}", str(o.runs), f"{o.seconds:.1f}"]
            cells = [case.name, o.device, *counts]
            rows.append("| " + " | ".join([*cells, remark]) + " |")
        except Exception as err:  # the table lists failures too
            rows.append(f"| {case.name} | | | | | | FAILED: {type(err).__name__}: {str(err)[:200]} |")
        print(rows[-1], file=sys.stderr, flush=True)
    summary = [
        f"{source}: {a}/{n} convert and run forward and backward ({100 * a / n:.0f}%), "
        f"{r}/{n} with at least one run converted ({100 * r / n:.0f}%)"
        for source, (a, r, n) in ok.items()
    ]
    return "\n".join(summary + [""] + rows)


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(coverage_table())
