"""Features combined the way users combine them.

Each feature has its own tests elsewhere; these cross them: every public function that takes a model, applied
to models that already reuse (LruNet, a model loaded from the authors' format, a LayerReuse inside a plain
network, tied weights, a module held under two names), must leave the model exactly as it was; training must
work after evaluation under ``inference_mode`` and ``no_grad``, after ``torch.jit.trace``, ``torch.export`` and
ONNX export; tracing gives one graph whatever ran before; TorchScript runs every public model.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable

import pytest
import timm
import torch
from _helpers import Snapshot
from _zoo import Model, randomize, select
from torch import Tensor, nn

import reuse
from reuse.models import LruNet, _gather

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ----------------------------------------------------------------------------------------------------------
# Models that already reuse, tie or alias (_zoo.py, feature "seams"), and what is done to them.

TRANSFORMS: dict[str, Callable[[nn.Module, Tensor], object]] = {
    "find_runs": lambda m, x: reuse.find_runs(m, example_inputs=x),
    "convert": lambda m, x: reuse.convert(m, example_inputs=x),
    "convert_filter": lambda m, x: reuse.convert(m, level="filter"),
    "convert_kernel": lambda m, x: reuse.convert(m, level="kernel"),
    "filter_reuse": lambda m, x: reuse.filter_reuse(m, bank_size=0.5),
    "kernel_reuse": lambda m, x: reuse.kernel_reuse(m, bank_size=0.5),
    "profile": lambda m, x: reuse.profile(m, tuple(x.shape)),
    "optimize_for_inference": lambda m, x: reuse.optimize_for_inference(m),
}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
@pytest.mark.parametrize("case", select("seams"))
def test_transforms_leave_the_model_handed_in_as_it_was(case: Model, transform: str, train: bool) -> None:
    model = randomize(case.build()).train(train)
    x = torch.rand(case.shape)
    before = Snapshot.of(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "left unfolded" and "no convertible conv" warnings are not the point
        TRANSFORMS[transform](model, x)
    assert before.differences(model) == []


@pytest.mark.parametrize("case", select("seams"))
def test_convert_keeps_what_already_reuses_and_computes_the_same(case: Model) -> None:
    model = randomize(case.build()).eval()
    x = torch.rand(case.shape)
    new, rep = reuse.convert(model, example_inputs=x, report=True)
    kept = [m for m in model.modules() if isinstance(m, reuse.LayerReuse)]
    if kept:
        assert any("kept" in n and "LayerReuse" in n for n in rep.notes), rep.notes
        assert sum(isinstance(m, reuse.LayerReuse) for m in new.modules()) >= len(kept)
    if not rep.converted:  # nothing converted: the same function, exactly
        with torch.no_grad():
            torch.testing.assert_close(new(x), model(x))


def test_convert_of_an_lrunet_is_the_same_lrunet() -> None:
    """LruNet's stages are already reused: convert finds no run, says so, and returns an equal copy."""
    model = randomize(LruNet(reuse=4, width_mult=0.5)).eval()
    new, rep = reuse.convert(model, report=True)
    assert rep.converted == [] and rep.params_after == rep.params_before
    assert any("kept 4 LayerReuse" in n for n in rep.notes)
    assert new is not model and type(new) is LruNet
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(new(x), model(x))
    new.train()(x).sum().backward()  # the copy trains on its own weights
    assert model.stage1.uses[0].dw.weight.grad is None


def test_find_runs_keeps_the_weights_of_a_reused_block_on_their_device() -> None:
    """The issue's repro: the shape pass left meta tensors in a LayerReuse's shared conv."""
    lr = reuse.wrap(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)), n=2)
    m = nn.Sequential(nn.Conv2d(3, 8, 1), lr)
    reuse.find_runs(m, example_inputs=torch.randn(1, 3, 8, 8))
    assert lr.uses[0][0].weight.device.type == "cpu" and lr.uses[1][0].weight is lr.uses[0][0].weight


# ----------------------------------------------------------------------------------------------------------
# Training after evaluation, tracing and export.


def _before_inference_mode(model: nn.Module, x: Tensor) -> None:
    with torch.inference_mode():
        model.eval()(x)


def _before_no_grad(model: nn.Module, x: Tensor) -> None:
    with torch.no_grad():
        model.eval()(x)


def _before_jit_trace(model: nn.Module, x: Tensor) -> None:
    torch.jit.trace(model.eval(), x, check_trace=True)


def _before_export(model: nn.Module, x: Tensor) -> None:
    torch.export.export(model.eval(), (x,))


def _before_onnx(model: nn.Module, x: Tensor) -> None:
    pytest.importorskip("onnx", reason="ONNX export needs the onnx package (pip install 'torch-reuse[deploy]')")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (x,), io.BytesIO(), dynamo=False)


BEFORE: dict[str, Callable[[nn.Module, Tensor], None]] = {
    "inference_mode": _before_inference_mode,
    "no_grad": _before_no_grad,
    "jit_trace": _before_jit_trace,
    "export": _before_export,
    "onnx": _before_onnx,
}


@pytest.mark.parametrize("before", sorted(BEFORE))
@pytest.mark.parametrize("case", select("trains_after"))
def test_training_works_after(case: Model, before: str) -> None:
    """Forward and backward, on the same model and on a fresh one, after another way of running it."""
    _gather._INDICES.clear()  # what ran before this test must not decide what runs here
    torch.manual_seed(0)
    model = case.build()
    x = torch.rand(case.shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        BEFORE[before](model, x)
    for m in (model, case.build()):
        m.train()(x).logsumexp(1).mean().backward()
        assert all(p.grad is not None for p in m.parameters())


@pytest.mark.parametrize("name", sorted(timm.list_models("lrunet*")))
def test_every_registered_name_trains_after_an_inference_mode_forward(name: str) -> None:
    """Lightning validates under inference_mode: the next training step must work, in any model."""
    _gather._INDICES.clear()
    model = timm.create_model(name)
    size = model.pretrained_cfg["input_size"]
    x = torch.rand(2, *size)
    with torch.inference_mode():
        model.eval()(x)
    model.train()(x).mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def _trace_code(model: nn.Module, x: Tensor, grad: bool) -> str:
    with torch.set_grad_enabled(grad), warnings.catch_warnings():
        warnings.simplefilter("error", category=torch.jit.TracerWarning)  # a warning means the trace may lie
        return torch.jit.trace(model, x, check_trace=True).code


@pytest.mark.parametrize("name", ["lrunet1_1x", "lrunet8_1x"])
def test_jit_trace_gives_one_graph_cold_warm_and_in_any_grad_mode(name: str) -> None:
    model = timm.create_model(name).eval()
    x = torch.rand(2, 3, 32, 32)
    _gather._INDICES.clear()
    cold = _trace_code(model, x, grad=True)
    with torch.no_grad():
        model(x)  # fills the index cache
    assert _gather._INDICES, "the eager forward is expected to cache its indices"
    assert _trace_code(model, x, grad=True) == cold
    assert _trace_code(model, x, grad=False) == cold
    traced = torch.jit.trace(model, x)
    other_batch = torch.rand(5, 3, 32, 32)
    with torch.no_grad():  # nothing in the trace depends on the batch it was traced with
        torch.testing.assert_close(traced(other_batch), model(other_batch))


@pytest.mark.parametrize("via_fx", [False, True], ids=["module", "fx_graph"])
@pytest.mark.parametrize("case", select("script"))
def test_torchscript_computes_what_the_model_computes(case: Model, via_fx: bool) -> None:
    torch.manual_seed(0)
    model = randomize(case.build()).eval()
    x = torch.rand(case.shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)  # torch.jit.script is deprecated in torch 2.14
        scripted = torch.jit.script(torch.fx.symbolic_trace(model) if via_fx else model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-5, atol=1e-5)
