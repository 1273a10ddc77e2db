"""Model-zoo matrix for ``reuse.convert``: every torchvision classification builder and a broad timm sample.

Each model is built without pretrained weights, converted, run forward and backward in train mode, and
checked: the model handed in is untouched, every parameter of the converted one gets a gradient, it has no
more parameters than the original, the report agrees with the model (parameter counts, one LayerReuse per
converted run), and a model with no run comes back unchanged with a report that says why. For the models
run for real, the exactness invariant too: the blocks of every run given the same weights, the converted
model without shuffle computes the same outputs in eval mode.

Models up to ``REAL_MAX_PARAMS`` parameters run for real on a small input (32x32, batch 2). Larger models,
and those that only accept their native input size, are built and run on the ``meta`` device: the
conversion and the whole forward and backward pass execute (shapes, autograd graph, a gradient for every
parameter) without arithmetic, so the matrix takes about a minute of CPU time.

``python tests/test_fx_zoo.py`` prints the coverage table of docs/convert.md.
"""

from __future__ import annotations

import contextlib
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from unittest import mock

import pytest
import timm
import torch
import torchvision
from test_fx import randomize_norms, tie_runs  # pytest (import mode "prepend") puts tests/ on sys.path
from torch import nn

import reuse
from reuse import LayerReuse

REAL_MAX_PARAMS = 40_000_000  # larger models run on the meta device

TORCHVISION = torchvision.models.list_models(module=torchvision.models)

# A broad sample of timm families: the CNN families the issue names and their relatives, then a few
# transformer and hybrid families to show where layer reuse does (ViT) and does not (alternating blocks) apply.
TIMM = [
    "resnet18", "resnet50d", "resnetrs50", "resnetv2_50", "resnet50_gn", "legacy_seresnet18", "skresnet18",
    "ecaresnet26t", "resnext50_32x4d", "seresnext26d_32x4d", "resnext26ts", "res2net50_14w_8s", "res2next50",
    "resnest14d", "regnetx_002", "regnety_002", "regnetz_b16", "regnetv_040", "efficientnet_b0",
    "tf_efficientnet_lite0", "efficientnet_em", "efficientnetv2_rw_t", "mobilenetv1_100", "mobilenetv2_050",
    "mobilenetv3_small_050", "mobilenetv3_large_100", "mobilenetv4_conv_small", "mixnet_s", "mnasnet_100",
    "fbnetc_100", "spnasnet_100", "lcnet_050", "hardcorenas_a", "tinynet_e", "ghostnet_050", "ghostnetv2_100",
    "rexnet_100", "repghostnet_050", "convnext_atto", "convnextv2_atto", "inception_next_atto", "vgg11",
    "vgg11_bn", "repvgg_a0", "mobileone_s0", "densenet121", "dla34", "dpn68", "cspresnet50", "cspdarknet53",
    "cs3darknet_s", "darknet53", "hrnet_w18_small", "selecsls42b", "gernet_s", "ese_vovnet19b_dw", "hgnet_tiny",
    "hgnetv2_b0", "nf_resnet26", "inception_v3", "xception41", "fastvit_t8", "efficientvit_b0", "repvit_m0_9",
    "starnet_s1", "fasternet_t0", "edgenext_xx_small", "mobilevit_xxs", "poolformerv2_s12", "convmixer_768_32",
    "vit_tiny_patch16_224", "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "mixer_s16_224",
]  # fmt: skip

# Models whose input size is fixed by their configuration (token grids, windows, auxiliary heads): run on meta
# at their native size rather than rebuilt for a small input.
NATIVE_SIZE = {
    "torchvision.maxvit_t": 224,
    "torchvision.inception_v3": 299,
    "timm.inception_v3": 299,
    "timm.swin_tiny_patch4_window7_224": 224,
    "timm.vit_tiny_patch16_224": 224,
    "timm.deit_tiny_patch16_224": 224,
    "timm.mixer_s16_224": 224,
    "timm.mobilevit_xxs": 256,
}
KWARGS = {  # builder arguments for a small input
    "torchvision.vit_b_16": {"image_size": 32},
    "torchvision.vit_b_32": {"image_size": 32},
    "torchvision.vit_l_16": {"image_size": 32},
    "torchvision.vit_l_32": {"image_size": 32},
    "torchvision.vit_h_14": {"image_size": 28},
}
SMALL = 32
SIZE = {"torchvision.alexnet": 64, "timm.ghostnetv2_100": 64}  # models that need more than SMALL

# Models with no run: they come back unchanged. The reason is checked by hand (see docs/convert.md); the test
# checks that these, and only these, convert nothing.
_CONCAT = "each layer reads the concatenation of all earlier outputs: widths grow, no two layers alike"
_TWO = "two blocks per stage and the first one downsamples: never two same-structure blocks in a row"
_OSA = "one-shot aggregation: every layer's output also feeds the block's final concatenation"
NO_RUN = {
    "torchvision.alexnet": "every convolution has its own width",
    "torchvision.densenet121": _CONCAT,
    "torchvision.densenet161": _CONCAT,
    "torchvision.densenet169": _CONCAT,
    "torchvision.densenet201": _CONCAT,
    "torchvision.googlenet": "every inception module has its own widths",
    "torchvision.squeezenet1_0": "every fire module has its own widths",
    "torchvision.squeezenet1_1": "every fire module has its own widths",
    "timm.densenet121": _CONCAT,
    "timm.ecaresnet26t": _TWO,
    "timm.seresnext26d_32x4d": _TWO,
    "timm.resnext26ts": _TWO,
    "timm.nf_resnet26": _TWO,
    "timm.hardcorenas_a": _TWO,
    "timm.tinynet_e": "one or two blocks per stage and the first one downsamples",
    "timm.resnest14d": "one block per stage",
    "timm.rexnet_100": "the width grows at every block",
    "timm.dla34": "tree aggregation: blocks feed aggregation nodes, not one another",
    "timm.dpn68": "dual-path blocks concatenate: the width grows at every block",
    "timm.selecsls42b": "blocks concatenate their features; no two blocks alike",
    "timm.ese_vovnet19b_dw": _OSA,
    "timm.hgnet_tiny": _OSA,
    "timm.hgnetv2_b0": _OSA,
}


@dataclass
class Case:
    """One zoo model: how to build it and what input it gets."""

    id: str  # "torchvision.resnet50"
    build: Callable[..., nn.Module]
    kwargs: dict

    @property
    def native(self) -> int | None:
        return NATIVE_SIZE.get(self.id)

    @property
    def size(self) -> int:
        return self.native or self.kwargs.get("image_size", SIZE.get(self.id, SMALL))


def _cases() -> list[Case]:
    tv = [
        Case(f"torchvision.{n}", torchvision.models.get_model_builder(n), KWARGS.get(f"torchvision.{n}", {}))
        for n in TORCHVISION
    ]
    tm = [Case(f"timm.{n}", functools_partial(timm.create_model, n), KWARGS.get(f"timm.{n}", {})) for n in TIMM]
    return tv + tm


def functools_partial(fn: Callable, name: str) -> Callable[..., nn.Module]:
    def build(**kwargs: object) -> nn.Module:
        return fn(name, pretrained=False, **kwargs)

    return build


@contextlib.contextmanager
def _no_init() -> Iterator[None]:
    """Skip weight initialisation (the tensors stay uninitialised): a fast build for a model bound for meta."""
    names = [n for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")]
    with contextlib.ExitStack() as stack:
        for n in names:
            stack.enter_context(mock.patch.object(torch.nn.init, n, lambda t, *a, **k: t))
        yield


def build(case: Case, meta: bool) -> nn.Module:
    """The model, seeded; on the meta device when ``meta`` (built there directly when the builder allows)."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not meta:
            return case.build(**case.kwargs)
        try:
            with torch.device("meta"):
                return case.build(**case.kwargs)
        except Exception:  # builders that compute with tensors (torchvision RegNet): build without init, then move
            with _no_init():
                return case.build(**case.kwargs).to("meta")


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


def check(case: Case) -> Outcome:
    """Convert one zoo model and run every check on it; returns what the coverage table shows."""
    start = time.perf_counter()
    meta_model = build(case, meta=True)
    meta = case.native is not None or _count(meta_model) > REAL_MAX_PARAMS
    model = meta_model if meta else build(case, meta=False)
    x = torch.randn(2, 3, case.size, case.size, device="meta" if meta else "cpu")
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
        randomize_norms(model)
        tie_runs(model, rep.converted)
        exact = reuse.convert(model, shuffle=False, example_inputs=x).eval()
        with torch.no_grad():
            for a, b in zip(_tensors(exact(x)), _tensors(model(x)), strict=True):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    return Outcome(
        case.id,
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


CASES = _cases()
# The slowest checks (>= 1.2 s of CPU time each, measured on the 2-core CPU; the whole matrix takes about a minute
# of CPU time): deselect with -m "not heavy" for a quick run; CI runs them.
HEAVY = {
    "torchvision.efficientnet_b7",
    "torchvision.efficientnet_v2_l",
    "torchvision.efficientnet_v2_m",
    "torchvision.maxvit_t",
    "torchvision.resnet152",
    "torchvision.vit_h_14",
    "torchvision.regnet_y_128gf",
}


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, id=c.id, marks=[pytest.mark.heavy] if c.id in HEAVY else []) for c in CASES],
)
def test_zoo(case: Case) -> None:
    out = check(case)
    if case.id in NO_RUN:
        assert out.runs == 0, f"{case.id} now converts: remove it from NO_RUN and docs/convert.md"
    else:
        assert out.runs > 0, f"{case.id} no longer converts anything: {out.report.notes}"


def test_coverage_target() -> None:
    """At least 95% of the torchvision builders and of the timm sample convert and run (all of them do: those
    in NO_RUN come back unchanged, as they should); and at least 85% of the torchvision builders and 75% of
    the timm sample have at least one run converted."""
    for source, names, share in (("torchvision", TORCHVISION, 0.85), ("timm", TIMM, 0.75)):
        ids = [f"{source}.{n}" for n in names]
        assert sum(i not in NO_RUN for i in ids) >= share * len(ids)


def coverage_table() -> str:
    """The coverage table of docs/convert.md, from a fresh run of the whole matrix."""
    rows = [
        "| model | run on | parameters before | after | runs converted | seconds | remark |",
        "|---|---|---|---|---|---|---|",
    ]
    ok = {"torchvision": [0, 0, 0], "timm": [0, 0, 0]}  # converted and ran, with a run, total
    for case in CASES:
        source = case.id.split(".")[0]
        ok[source][2] += 1
        try:
            o = check(case)
            ok[source][0] += 1
            ok[source][1] += o.runs > 0
            remark = "" if o.runs else "no run: " + NO_RUN.get(case.id, "; ".join(o.report.notes))
            cells = [case.id, o.device, f"{o.params_before:,}", f"{o.params_after:,}", str(o.runs), f"{o.seconds:.1f}"]
            rows.append("| " + " | ".join([*cells, remark]) + " |")
        except Exception as err:  # the table lists failures too
            rows.append(f"| {case.id} | | | | | | FAILED: {type(err).__name__}: {str(err)[:200]} |")
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
