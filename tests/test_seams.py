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
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from _helpers import Snapshot, randomize, to_official
from torch import Tensor, nn

import reuse
from reuse.models import LruNet, _gather, load_official

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ----------------------------------------------------------------------------------------------------------
# A zoo of models that already reuse, tie or alias: (factory, input shape).


def conv_bn(c: int = 8) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())


class Aliased(nn.Module):
    """One conv held under two attribute names, then a stack of same-structure blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.stem_alias = self.stem
        self.blocks = nn.Sequential(*[conv_bn() for _ in range(3)])

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.stem_alias(x))  # (B, 8, H, W)


def reused_inside() -> nn.Module:
    """The issue's repro: a LayerReuse inside an nn.Sequential, followed by a convertible run."""
    return nn.Sequential(nn.Conv2d(3, 8, 1), reuse.wrap(conv_bn(), n=2), *[conv_bn() for _ in range(3)])


def tied_blocks() -> nn.Module:
    """A stack whose blocks 1 and 2 share block 0's conv weight (tied by hand)."""
    net = nn.Sequential(nn.Conv2d(3, 8, 1), *[conv_bn() for _ in range(4)])
    net[2][0].weight = net[3][0].weight = net[1][0].weight
    return net


def official(tmp: Path) -> nn.Module:
    """A model loaded from a file in the authors' format (written here from a random LruNet)."""
    source = randomize(LruNet(reuse=2, in_chans=1))
    path = tmp / "official-format-lru2.t7"
    torch.save({"net": to_official(source), "acc": 1.0, "epoch": 1}, path)
    return load_official(path)


ZOO: dict[str, tuple[Callable[[Path], nn.Module], tuple[int, ...]]] = {
    "lrunet": (lambda tmp: randomize(LruNet(reuse=3, width_mult=0.25)), (2, 3, 32, 32)),
    "lrunet_no_share": (lambda tmp: LruNet(reuse=2, width_mult=0.25, share=False), (2, 3, 32, 32)),
    "load_official": (official, (2, 1, 28, 28)),
    "reused_inside": (lambda tmp: randomize(reused_inside()), (2, 3, 8, 8)),
    "aliased": (lambda tmp: randomize(Aliased()), (2, 3, 8, 8)),
    "tied_blocks": (lambda tmp: randomize(tied_blocks()), (2, 3, 8, 8)),
}

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
@pytest.mark.parametrize("name", sorted(ZOO))
def test_transforms_leave_the_model_handed_in_as_it_was(name: str, transform: str, train: bool, tmp_path: Path) -> None:
    make, shape = ZOO[name]
    model = make(tmp_path).train(train)
    x = torch.rand(shape)
    before = Snapshot.of(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "left unfolded" and "no convertible conv" warnings are not the point
        TRANSFORMS[transform](model, x)
    assert before.differences(model) == []


@pytest.mark.parametrize("name", sorted(ZOO))
def test_convert_keeps_what_already_reuses_and_computes_the_same(name: str, tmp_path: Path) -> None:
    make, shape = ZOO[name]
    model = make(tmp_path).eval()
    x = torch.rand(shape)
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

PUBLIC_MODELS: dict[str, Callable[[], nn.Module]] = {
    "lrunet1": lambda: LruNet(reuse=1, width_mult=0.25),
    "lrunet3": lambda: LruNet(reuse=3, width_mult=0.25),
    "lrunet3_no_shuffle": lambda: LruNet(reuse=3, width_mult=0.25, shuffle=False),
    "lrunet2_no_share": lambda: LruNet(reuse=2, width_mult=0.25, share=False),
    "lrunet2_filter": lambda: LruNet(reuse=2, width_mult=0.25, level="filter"),
    "lrunet2_kernel": lambda: LruNet(reuse=2, width_mult=0.25, level="kernel"),
    "lrunet2_checkpointed": lambda: _checkpointed(LruNet(reuse=2, width_mult=0.25)),
    "converted_resnet18": lambda: reuse.convert(torchvision.models.resnet18(num_classes=10)),
}


def _checkpointed(model: LruNet) -> LruNet:
    model.set_grad_checkpointing(True)
    return model


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
@pytest.mark.parametrize("name", sorted(PUBLIC_MODELS))
def test_training_works_after(name: str, before: str) -> None:
    """Forward and backward, on the same model and on a fresh one, after another way of running it."""
    _gather._INDICES.clear()  # what ran before this test must not decide what runs here
    torch.manual_seed(0)
    model = PUBLIC_MODELS[name]()
    x = torch.rand(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        BEFORE[before](model, x)
    for m in (model, PUBLIC_MODELS[name]()):
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


SCRIPTED: dict[str, Callable[[], nn.Module]] = {
    "lrunet3": lambda: randomize(LruNet(reuse=3, width_mult=0.5)),
    "lrunet2_no_shuffle": lambda: randomize(LruNet(reuse=2, width_mult=0.5, shuffle=False)),
    "wrap": lambda: nn.Sequential(nn.Conv2d(3, 8, 1), randomize(reuse.wrap(conv_bn(), n=3))),
    "channel_shuffle": lambda: nn.Sequential(nn.Conv2d(3, 8, 1), reuse.ChannelShuffle(groups=4)),
    "converted_resnet18": lambda: randomize(reuse.convert(torchvision.models.resnet18(num_classes=10))),
}


@pytest.mark.parametrize("via_fx", [False, True], ids=["module", "fx_graph"])
@pytest.mark.parametrize("name", sorted(SCRIPTED))
def test_torchscript_computes_what_the_model_computes(name: str, via_fx: bool) -> None:
    torch.manual_seed(0)
    model = SCRIPTED[name]().eval()
    x = torch.rand(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)  # torch.jit.script is deprecated in torch 2.14
        scripted = torch.jit.script(torch.fx.symbolic_trace(model) if via_fx else model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-5, atol=1e-5)
