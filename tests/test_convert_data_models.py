"""convert(data=...) the way users combine it: timm models of several block types, then training, inference-mode
evaluation and ONNX export of the result."""

from __future__ import annotations

import pytest
import torch
from _helpers import Snapshot
from _zoo import ZOO, Model, randomize, select
from torch import nn

import reuse


def trained_looking(case: Model) -> nn.Module:
    return randomize(case.build()).eval()


RESNET18 = ZOO["timm.resnet18"]


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("case", select("data"))  # timm models whose stages hold runs of equal blocks
def test_a_timm_model_at_full_rank_is_kept_exactly(case: Model, images: torch.Tensor) -> None:
    """Aligned, fitted and with full-rank deltas, each use is its block again: the outputs do not change."""
    model = trained_looking(case)
    snap = Snapshot.of(model)
    new, rep = reuse.fx.convert(model, data=images, delta_rank=1.0, calibrate=False, report=True)
    assert rep.converted and {r.block_type for r in rep.converted} == {case.block_type}
    assert all(r.aligned >= 1 and r.fitted >= 2 for r in rep.converted), rep.converted
    with torch.no_grad():
        torch.testing.assert_close(new(images), model(images), rtol=1e-3, atol=1e-3)
    assert not snap.differences(model)


@pytest.mark.parametrize("case", select("data"))
def test_a_timm_model_at_rank_0_is_closer_with_the_data_than_without(case: Model, images: torch.Tensor) -> None:
    model = reuse.calibrate(trained_looking(case), images)  # its statistics those of the data, as after training
    with torch.no_grad():
        ref = model(images)
        errors = {
            "mean": float((reuse.fx.convert(model, init="mean", shuffle=False)(images) - ref).pow(2).mean()),
            "data": float((reuse.fx.convert(model, data=images)(images) - ref).pow(2).mean()),
        }
    assert errors["data"] < errors["mean"], errors


@pytest.mark.parametrize("init", ["fit", "refit"])
def test_trained_after_conversion_then_exported_to_onnx(images: torch.Tensor, tmp_path, init: str) -> None:
    """convert(data=) -> a training step -> inference-mode evaluation -> ONNX: the file computes the trained model."""
    pytest.importorskip("onnx", reason="export needs onnx (pip install 'torch-reuse[deploy]')")
    ort = pytest.importorskip("onnxruntime", reason="the check runs the file in onnxruntime")
    model = reuse.calibrate(trained_looking(RESNET18), images)
    student = reuse.fx.convert(model, data=images, init=init, delta_rank=2).train()
    before = [p.detach().clone() for p in student.parameters()]
    opt = torch.optim.SGD(student.parameters(), lr=0.05)
    loss = nn.functional.cross_entropy(student(images), torch.arange(len(images)) % 7)
    loss.backward()
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, student.parameters())), "the step changed nothing"
    student.eval()
    with torch.inference_mode():
        expected = student(images[:4])
    report = reuse.deploy.export_onnx(student, tmp_path / "student.onnx", images[:1])
    session = ort.InferenceSession(str(tmp_path / "student.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: images[:4].numpy()})
    torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-3, atol=1e-3)
    assert report.param_bytes < 4 * sum(p.numel() for p in model.parameters())  # the shared weights once


@pytest.mark.parametrize(
    "options",
    [
        dict(delta_rank=2),
        dict(delta_rank=2, init="refit"),
        dict(delta_rank=2, align="activations"),
        dict(budget=0.6),
        dict(init="mean", align="weights"),
    ],
    ids=["fit", "refit", "activations", "budget", "mean"],
)
def test_every_tensor_is_made_on_the_models_device(options: dict, images: torch.Tensor) -> None:
    """With the default device set to ``meta``, a tensor the library makes without naming a device lands there and
    cannot mix with the model's CPU tensors: the CPU stand-in for a model on a GPU (found by a CUDA run)."""
    model = reuse.calibrate(trained_looking(RESNET18), images[:8])
    with torch.device("meta"):
        new = reuse.fx.convert(model, data=images[:8], **options)
        reuse.calibrate(new, images[:8])
    assert {t.device.type for t in [*new.parameters(), *new.buffers()]} == {"cpu"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_convert_with_data_on_cuda_equals_the_cpu(images: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # float32 convs, as on the CPU
    model = reuse.calibrate(trained_looking(RESNET18), images)
    cpu = reuse.fx.convert(model, data=images, delta_rank=2)
    gpu = reuse.fx.convert(model.cuda(), data=images.cuda(), delta_rank=2)
    assert {p.device.type for p in gpu.parameters()} == {"cuda"}
    with torch.no_grad():
        torch.testing.assert_close(gpu(images.cuda()).cpu(), cpu(images), rtol=1e-3, atol=1e-3)
