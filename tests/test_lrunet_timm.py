"""LruNet under timm's model contract: what timm's own ``tests/test_models.py`` checks for every registered model,
written here against independent expectations (shapes from Table 1, outputs recomputed with hooks and plain torch).
The peer suite itself is run outside the repository (see docs/lrunet.md, "timm's model tests").
"""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from _helpers import to_official
from _zoo import randomize
from timm.models import group_parameters
from torch import Tensor, nn

from reuse import ReuseError
from reuse.models import LruNet

# The outputs of the five feature levels of a 32x32 input at width 1 (Table 1): stem, stage 1-4.
LEVEL_SHAPES = [(64, 16, 16), (64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 4, 4)]


def level_outputs(model: LruNet, x: Tensor) -> list[Tensor]:
    """The outputs of stem, stage1..stage4 in a plain forward, caught with hooks."""
    caught: list[Tensor] = []
    handles = [
        m.register_forward_hook(lambda m, a, out: caught.append(out.clone()))
        for m in (model.stem, model.stage1, model.stage2, model.stage3, model.stage4)
    ]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return caught


@pytest.fixture
def model() -> LruNet:
    torch.manual_seed(0)
    return randomize(LruNet(reuse=2)).eval()


def test_reset_classifier_takes_timms_global_pool(model: LruNet) -> None:
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        features = model.forward_head(model.forward_features(x), pre_logits=True)  # (B, 256), average pooled
        model.reset_classifier(5, "max")
        maps = torch.relu(model.classifier(torch.relu(model.head_bn(model.head_conv(model.forward_features(x))))))
        torch.testing.assert_close(model(x), maps.amax((2, 3)))  # same ops, but a conv may pick another kernel
        model.reset_classifier(0)  # keeps the pooling: max
        assert model(x).shape == (2, 256) and model.num_classes == 0
        model.reset_classifier(0, "")
        assert model(x).shape == (2, 256, 2, 2)  # timm's pool_size (2, 2)
        model.reset_classifier(0, "avg")
        torch.testing.assert_close(model(x), features)
    with pytest.raises(ReuseError, match="global_pool"):
        model.reset_classifier(3, "median")


def test_create_model_without_classifier_and_pooling() -> None:
    model = timm.create_model("lrunet8_1x", num_classes=0, global_pool="").eval()
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 256, 2, 2)
    assert model.pretrained_cfg["pool_size"] == (2, 2)


def test_reset_classifier_follows_device_dtype_and_mode(model: LruNet) -> None:
    model = model.double().train()
    model.reset_classifier(7)
    assert model.classifier.weight.dtype == torch.float64 and model.classifier.training


@pytest.fixture
def release_like(tmp_path: Path) -> tuple[LruNet, Path]:
    """A 2-LruNet-1x for CIFAR-10 saved in the authors' format under a name of our own."""
    torch.manual_seed(1)
    source = randomize(LruNet(reuse=2), seed=1).eval()
    path = tmp_path / "cifar10-lru2-ours.t7"
    torch.save({"net": to_official(source), "acc": 50.0, "epoch": 1}, path)
    return source, path


@pytest.mark.parametrize("num_classes", [0, 5, 10])
def test_pretrained_with_any_num_classes(release_like: tuple[LruNet, Path], num_classes: int) -> None:
    source, path = release_like
    model = timm.create_model(
        "lrunet", reuse=2, pretrained=True, num_classes=num_classes, pretrained_cfg_overlay=dict(file=str(path))
    ).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        if num_classes == 0:  # no head: the pooled features of the file's network
            torch.testing.assert_close(model(x), source.forward_head(source.forward_features(x), pre_logits=True))
        elif num_classes == 10:
            torch.testing.assert_close(model(x), source(x))
        else:  # a new classifier on the file's features
            torch.testing.assert_close(model.forward_features(x), source.forward_features(x))
            assert model(x).shape == (2, 5)


def test_pretrained_still_refuses_another_network(release_like: tuple[LruNet, Path]) -> None:
    _, path = release_like
    with pytest.raises(ReuseError, match="reuse=3"):
        timm.create_model(
            "lrunet", reuse=3, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=str(path))
        )


def test_set_grad_checkpointing_checkpoints_every_use(model: LruNet) -> None:
    twin = LruNet(reuse=2)
    twin.load_state_dict(model.state_dict())
    model.train().set_grad_checkpointing(True)
    twin.train()
    assert model.grad_checkpointing and all(stage.checkpoint for stage in model.stages)
    x = torch.rand(4, 3, 32, 32)
    torch.manual_seed(0)
    out = model(x)
    torch.manual_seed(0)  # the same dropout mask
    expected = twin(x)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    expected.sum().backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    model.set_grad_checkpointing(False)
    assert not any(stage.checkpoint for stage in model.stages)


@pytest.mark.parametrize("coarse", [True, False])
def test_group_matcher_puts_every_parameter_in_one_group(model: LruNet, coarse: bool) -> None:
    groups = group_parameters(model, model.group_matcher(coarse=coarse))
    names = [n for g in groups.values() for n in g]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())  # each exactly once
    # stem; 4 stages (coarse) or 4 x 2 uses; the head (unmatched) last
    assert len(groups) == 1 + (4 if coarse else 8) + 1
    first, last = list(groups.values())[0], list(groups.values())[-1]
    assert all(n.startswith("stem.") for n in first) and "classifier.weight" in last


def test_forward_intermediates_are_the_level_outputs(model: LruNet) -> None:
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = level_outputs(model, x)
        final, feats = model.forward_intermediates(x)
        assert [tuple(f.shape[1:]) for f in feats] == LEVEL_SHAPES
        for f, e in zip(feats, expected):
            torch.testing.assert_close(f, e)
        torch.testing.assert_close(final, model.forward_features(x))
        only = model.forward_intermediates(x, indices=[1, -1], intermediates_only=True)
        torch.testing.assert_close(only, [expected[1], expected[4]])
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        torch.testing.assert_close(last_two, expected[3:])
        early, feats = model.forward_intermediates(x, indices=[2], stop_early=True)
        torch.testing.assert_close(feats, [expected[2]])
        assert early.shape[1:] == (256, 4, 4)  # stage 2's output after its pool and self-concatenation


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [(dict(output_fmt="NHWC"), "output_fmt"), (dict(indices=6), "indices"), (dict(indices=[5]), "indices")],
)
def test_forward_intermediates_bad_arguments(model: LruNet, kwargs: dict, match: str) -> None:
    with pytest.raises(ReuseError, match=match):
        model.forward_intermediates(torch.rand(1, 3, 32, 32), **kwargs)


def test_features_only_getter_and_pruning() -> None:
    torch.manual_seed(0)
    full = randomize(timm.create_model("lrunet8_1x")).eval()
    getter = timm.create_model("lrunet8_1x", features_only=True, feature_cls="getter", out_indices=(1, 3)).eval()
    getter.model.load_state_dict(
        {k: v for k, v in full.state_dict().items() if k in getter.model.state_dict()}, strict=True
    )
    assert getter.feature_info.channels() == [64, 256] and getter.feature_info.reduction() == [2, 8]
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = level_outputs(full, x)
        torch.testing.assert_close(getter(x), [expected[1], expected[3]])
    # pruned: no stage 4, no head
    assert isinstance(getter.model.stage4, nn.Identity) and isinstance(getter.model.head_conv, nn.Identity)
    assert sum(p.numel() for p in getter.parameters()) < sum(p.numel() for p in full.parameters())
