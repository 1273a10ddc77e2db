"""Tests of ``reuse.convert`` / ``reuse.find_runs``: how runs are found, the exactness invariant, options,
errors, and that the model handed in is never touched. The model-zoo matrix is in test_fx_zoo.py."""

from __future__ import annotations

import copy
import io

import pytest
import timm
import torch
import torchvision
from _zoo import Model, randomize, select
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn
from torchvision.ops import StochasticDepth

import reuse
from reuse import LayerReuse, ReuseError, is_batchnorm

# --------------------------------------------------------------------------------------------------
# Helpers and toy models
# --------------------------------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def conv_bn(c: int, k: int = 3, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c, c, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(c), nn.ReLU())


class Residual(nn.Module):
    def __init__(self, c: int, k: int = 3, drop: float = 0.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, k, padding=k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.drop = StochasticDepth(drop, "row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(torch.relu(self.bn(self.conv(x))))  # (B, C, H, W)


class LoopNet(nn.Module):
    """Blocks in a ModuleList that forward loops over: the run is rewritten in a GraphModule."""

    def __init__(self, c: int = 8, n: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.ModuleList(Residual(c) for _ in range(n))
        self.head = nn.Linear(c, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)  # (B, C, H, W)
        for block in self.blocks:
            x = block(x)  # (B, C, H, W)
        return self.head(x.mean((2, 3)))  # (B, 5)


class Stage(nn.Module):
    def __init__(self, c: int = 8, n: int = 3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Residual(c) for _ in range(n))
        self.scale = 2.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x * self.scale


class StageNet(nn.Module):
    """A stage with its own looping forward inside a model: only the stage becomes a GraphModule."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stage = Stage()
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stage(self.stem(x)).mean((2, 3)))

    def features(self, x: torch.Tensor) -> torch.Tensor:  # a method the converted model must keep
        return self.stage(self.stem(x))


def stacked(c: int = 8, n: int = 4) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, c, 3, padding=1), *[conv_bn(c) for _ in range(n)], nn.AdaptiveAvgPool2d(1))


def tie_runs(model: nn.Module, runs: list[reuse.fx.Run]) -> None:
    """Make the blocks of every run share block 0's weights, except BatchNorm (kept per use)."""
    with torch.no_grad():
        for run in runs:
            if run.skipped:
                continue
            first, *others = run.units
            for unit in others:
                for a, b in zip(first, unit):
                    for m0, mi in zip(model.get_submodule(a).modules(), model.get_submodule(b).modules()):
                        if is_batchnorm(m0):
                            continue
                        for key, t in [*m0._parameters.items(), *m0._buffers.items()]:
                            if t is not None:
                                getattr(mi, key).copy_(t)


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------------------------
# Exactness: blocks sharing weights already -> convert(shuffle=False) computes the same function
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", select("exact"))
@pytest.mark.parametrize("init", ["first", "mean"])
def test_exactness_invariant(case: Model, init: str) -> None:
    torch.manual_seed(0)
    model = randomize(case.build()).eval()
    x = torch.randn(case.shape)
    runs = reuse.find_runs(model, example_inputs=x)
    assert any(not r.skipped for r in runs)
    if case.runs is not None:
        assert sum(not r.skipped for r in runs) == case.runs, "the runs counted by hand (tests/_zoo.py)"
    tie_runs(model, runs)
    with torch.no_grad():
        expected = model(x)
    new = reuse.convert(model, shuffle=False, init=init, example_inputs=x).eval()
    assert any(isinstance(m, LayerReuse) for m in new.modules())
    assert params(new) < params(model)
    with torch.no_grad():
        torch.testing.assert_close(new(x), expected, rtol=1e-4, atol=1e-5)


def test_resnet50_runs_follow_the_architecture() -> None:
    # ResNet-50 has [3, 4, 6, 3] bottlenecks per stage; the first of each has a downsample branch.
    runs = reuse.find_runs(torchvision.models.resnet50())
    expected = [tuple(f"layer{i}.{j}" for j in range(1, n)) for i, n in zip(range(1, 5), (3, 4, 6, 3))]
    assert [r.blocks for r in runs] == expected
    assert all(not r.skipped and r.shuffle and r.via == "sequential" for r in runs)


def test_first_init_takes_block_zero_and_norms_from_each_block() -> None:
    torch.manual_seed(0)
    model = stacked(n=3)
    randomize(model)
    new = reuse.convert(model, example_inputs=torch.randn(1, 3, 8, 8))
    reused = new[1]
    assert isinstance(reused, LayerReuse) and reused.n == 3
    assert torch.equal(reused.uses[0][0].weight, model[1][0].weight)
    assert reused.uses[2][0].weight is reused.uses[0][0].weight  # shared
    for i in range(3):
        bn, src = reused.uses[i][1], model[1 + i][1]
        assert bn is not src
        for key in ("weight", "bias", "running_mean", "running_var"):
            assert torch.equal(getattr(bn, key), getattr(src, key))


def test_mean_init_averages_the_shared_weights() -> None:
    torch.manual_seed(0)
    model = stacked(n=3)
    new = reuse.convert(model, init="mean", example_inputs=torch.randn(1, 3, 8, 8))
    mean = (model[1][0].weight + model[2][0].weight + model[3][0].weight) / 3
    torch.testing.assert_close(new[1].uses[0][0].weight, mean)


# --------------------------------------------------------------------------------------------------
# How runs are found
# --------------------------------------------------------------------------------------------------


def test_module_list_loop_becomes_graph_module() -> None:
    torch.manual_seed(0)
    model = LoopNet().eval()
    randomize(model)
    x = torch.randn(2, 3, 8, 8)
    runs = reuse.find_runs(model, example_inputs=x)
    assert [r.blocks for r in runs] == [("blocks.0", "blocks.1", "blocks.2", "blocks.3")]
    assert runs[0].via == "graph" and runs[0].owner == ""
    tie_runs(model, runs)
    new, rep = reuse.convert(model, shuffle=False, example_inputs=x, report=True)
    assert isinstance(new, fx.GraphModule) and rep.graph_modules == [""]
    assert isinstance(new.get_submodule("blocks.0"), LayerReuse)
    with torch.no_grad():
        torch.testing.assert_close(new(x), model(x))
    assert "GraphModule" in str(rep)


def test_stage_with_own_loop_is_the_only_graph_module() -> None:
    torch.manual_seed(0)
    model = StageNet().eval()
    x = torch.randn(2, 3, 8, 8)
    tie_runs(model, reuse.find_runs(model, example_inputs=x))
    new, rep = reuse.convert(model, shuffle=False, example_inputs=x, report=True)
    assert type(new) is StageNet and isinstance(new.stage, fx.GraphModule)
    assert rep.graph_modules == ["stage"]
    with torch.no_grad():
        torch.testing.assert_close(new(x), model(x))
        torch.testing.assert_close(new.features(x), model.features(x))


def test_nested_candidates_are_opened_when_the_outer_ones_form_no_run() -> None:
    class TwoBranches(nn.Module):  # two identical branches on the same input: not a chain, their blocks are
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Sequential(*[conv_bn(8) for _ in range(3)])
            self.b = nn.Sequential(*[conv_bn(8) for _ in range(3)])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x) + self.b(x)

    runs = reuse.find_runs(TwoBranches(), example_inputs=torch.randn(1, 8, 6, 6))
    assert sorted(r.blocks for r in runs if not r.skipped) == [("a.0", "a.1", "a.2"), ("b.0", "b.1", "b.2")]


def test_output_read_elsewhere_breaks_the_run_and_the_report_says_so() -> None:
    class Skips(nn.Module):  # U-Net-like: every block's output is also kept
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(conv_bn(8) for _ in range(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            outs = []
            for block in self.blocks:
                x = block(x)
                outs.append(x)
            return torch.cat(outs, 1)

    new, rep = reuse.convert(Skips(), example_inputs=torch.randn(1, 8, 6, 6), report=True)
    assert not rep.converted
    assert any("also feeds" in n for n in rep.notes)
    assert not any(isinstance(m, LayerReuse) for m in new.modules())


def test_block_called_twice_is_not_reused_again() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = conv_bn(8), conv_bn(8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(self.a(x)))

    runs = reuse.find_runs(Twice(), example_inputs=torch.randn(1, 8, 6, 6))
    assert all(r.skipped or "a" not in r.blocks for r in runs)
    assert any("called 2 times" in (r.note + r.skipped) for r in runs)


def test_shape_changing_blocks_and_min_run() -> None:
    class Down(nn.Module):  # same structure, but each halves the resolution
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.Sequential(*[nn.Conv2d(8, 8, 3, stride=2, padding=1) for _ in range(3)])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.blocks(x)

    [run] = reuse.find_runs(Down(), example_inputs=torch.randn(1, 8, 16, 16))
    assert run.skipped and "changes the shape" in run.skipped
    [run] = reuse.find_runs(stacked(n=2), min_run=3, example_inputs=torch.randn(1, 3, 8, 8))
    assert "min_run=3" in run.skipped
    _, rep = reuse.convert(stacked(n=2), min_run=3, example_inputs=torch.randn(1, 3, 8, 8), report=True)
    assert rep.params_after == rep.params_before and rep.skipped


def test_densenet_comes_back_unchanged_with_a_reason() -> None:
    model = torchvision.models.densenet121()
    new, rep = reuse.convert(model, example_inputs=torch.randn(1, 3, 32, 32), report=True)
    assert repr(new) == repr(model) and not rep.runs
    assert rep.notes and rep.notes[0].startswith("no run")


def test_transformer_blocks_run_without_shuffle() -> None:
    model = torchvision.models.VisionTransformer(32, 8, num_layers=3, num_heads=2, hidden_dim=32, mlp_dim=64)
    _, rep = reuse.convert(model, example_inputs=torch.randn(1, 3, 32, 32), report=True)
    [run] = rep.converted
    assert run.n == 3 and not run.shuffle and "not (B, C, H, W)" in run.note


def test_shuffle_only_where_the_channels_allow_it() -> None:
    x = torch.randn(1, 3, 6, 6)
    _, rep = reuse.convert(stacked(c=6, n=3), groups=4, example_inputs=x, report=True)
    [run] = rep.converted
    assert not run.shuffle and "groups=4 does not divide 6" in run.note
    _, rep = reuse.convert(stacked(c=6, n=3), groups=3, example_inputs=x, report=True)
    assert rep.converted[0].shuffle
    _, rep = reuse.convert(stacked(c=6, n=3), shuffle=False, example_inputs=x, report=True)
    assert not rep.converted[0].shuffle and not rep.converted[0].note


def test_stochastic_depth_is_kept_per_use() -> None:
    blocks = [Residual(8, drop=p) for p in (0.1, 0.2, 0.3)]
    model = nn.Sequential(nn.Conv2d(3, 8, 1), *blocks)
    new, rep = reuse.convert(model, example_inputs=torch.randn(1, 3, 4, 4), report=True)
    [run] = rep.converted
    assert run.per_use == ("StochasticDepth",)
    assert [use.drop.p for use in new[1].uses] == [0.1, 0.2, 0.3]
    assert new[1].uses[1].conv is new[1].uses[0].conv


def test_blocks_of_several_modules() -> None:
    # VGG-like: (conv, BN, ReLU) x 3, a pool, then alternating blocks A, B, A, B (like Swin's shifted windows).
    torch.manual_seed(0)
    a, b = (lambda: Residual(8, k=3)), (lambda: Residual(8, k=1))
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        *[m for _ in range(3) for m in (nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())],
        nn.MaxPool2d(2),
        a(),
        b(),
        a(),
        b(),
        a(),
    ).eval()
    randomize(model)
    x = torch.randn(2, 3, 8, 8)
    runs = [r for r in reuse.find_runs(model, example_inputs=x) if not r.skipped]
    assert [(r.period, r.n, r.units[0]) for r in runs] == [(3, 3, ("1", "2", "3")), (2, 2, ("11", "12"))]
    assert runs[0].block_type == "Conv2d+BatchNorm2d+ReLU"
    tie_runs(model, runs)
    new, rep = reuse.convert(model, shuffle=False, example_inputs=x, report=True)
    assert isinstance(new[1], LayerReuse) and new[1].n == 3 and isinstance(new[1].block, nn.Sequential)
    assert list(new._modules) == ["0", "1", "10", "11", "15"]  # the LayerReuse sit at their first module's name
    assert type(new[2]) is nn.MaxPool2d and isinstance(new[3], LayerReuse) and type(new[4]) is Residual
    with torch.no_grad():
        torch.testing.assert_close(new(x), model(x))
    vgg_conv, residual_pair = 8 * 8 * 9 + 8, 8 * 8 * 9 + 8 * 8  # a run keeps one set of shared weights
    assert rep.params_before - rep.params_after == 2 * vgg_conv + 1 * residual_pair


def test_drop_path_rates_of_real_models_are_kept_per_use() -> None:
    # torchvision's EfficientNet raises the stochastic-depth rate block by block.
    runs = reuse.find_runs(torchvision.models.efficientnet_b0())
    assert runs and all(r.per_use == ("StochasticDepth",) for r in runs)
    # timm's ConvNeXt holds nn.Identity in the network's first block (rate 0) and DropPath in the others.
    model = timm.create_model("convnext_atto", drop_path_rate=0.1)
    new = reuse.convert(model)
    uses = new.stages[0].blocks[0].uses
    assert type(uses[0].drop_path) is nn.Identity
    assert [u.drop_path.drop_prob for u in uses[1:]] == [b.drop_path.drop_prob for b in model.stages[0].blocks[1:]]


def test_different_activations_are_different_structures() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 1), conv_bn(8), conv_bn(8), conv_bn(8))
    model[2][2] = nn.GELU()
    runs = reuse.find_runs(model, example_inputs=torch.randn(1, 3, 4, 4))
    assert not any(not r.skipped and "2" in r.blocks for r in runs)


# --------------------------------------------------------------------------------------------------
# The contract: input untouched, report, state_dict, compile
# --------------------------------------------------------------------------------------------------


def test_input_model_is_never_modified() -> None:
    model = torchvision.models.resnet18()
    model.layer2.train(False)  # a mix of modes must survive too
    before, structure = state(model), repr(model)
    modes = [m.training for m in model.modules()]
    new = reuse.convert(model)
    assert repr(model) == structure and [m.training for m in model.modules()] == modes
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    ours = {p.data_ptr() for p in model.parameters()}
    assert not ours & {p.data_ptr() for p in new.parameters()}
    assert new.training == model.training
    with torch.no_grad():  # the new model trains without writing to the old one
        new.train()(torch.randn(2, 3, 32, 32))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_find_runs_leaves_the_model_alone() -> None:
    model = torchvision.models.mobilenet_v2()
    before, hooks = state(model), [len(m._forward_hooks) for m in model.modules()]
    reuse.find_runs(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert [len(m._forward_hooks) for m in model.modules()] == hooks and model.training


def test_converting_twice_changes_nothing_more() -> None:
    once = reuse.convert(torchvision.models.resnet50())
    twice, rep = reuse.convert(once, report=True)
    assert not rep.runs and repr(twice) == repr(once) and rep.params_after == rep.params_before


def test_inplace_converts_the_model_itself() -> None:
    model = stacked(n=3)
    new = reuse.convert(model, inplace=True, example_inputs=torch.randn(1, 3, 8, 8))
    assert new is model and isinstance(model[1], LayerReuse)


def test_report() -> None:
    model = torchvision.models.resnet50()
    new, rep = reuse.convert(model, report=True)
    assert new.reuse_report is rep and reuse.convert(model).reuse_report.params_after == rep.params_after
    assert rep.params_before == params(model) and rep.params_after == params(new)
    assert rep.params_before - rep.params_after == sum(r.params_before - r.params_after for r in rep.converted)
    # Bottleneck(C): 1x1 C->C/4, 3x3 C/4->C/4, 1x1 C/4->C; k blocks keep 1 conv set and k BN sets.
    for run, c in zip(rep.converted, (256, 512, 1024, 2048)):
        w = c // 4
        convs, norms = c * w + 9 * w * w + w * c, 2 * (w + w + c)
        assert (run.params_before, run.params_after) == (run.n * (convs + norms), convs + run.n * norms)
    text = str(rep)
    assert "ResNet: 4 run(s) converted" in text and "layer3.1 .. 5" in text


def test_state_dict_round_trip() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    a = reuse.convert(torchvision.models.resnet18()).eval()
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    b = reuse.convert(torchvision.models.resnet18()).eval()
    b.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))
    assert not any(k.startswith("layer1.0.uses.1.conv") for k in a.state_dict())  # shared weights stored once


def test_converted_model_pickles_with_per_use_rule() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 1), *[Residual(8, drop=p) for p in (0.1, 0.2)])
    new = reuse.convert(model, example_inputs=torch.randn(1, 3, 4, 4))
    buffer = io.BytesIO()
    torch.save(new, buffer)
    again = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    assert repr(again) == repr(new)


def test_backward_reaches_every_parameter() -> None:
    new = reuse.convert(torchvision.models.resnet18())
    new(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in new.parameters())


def test_torch_compile_accepts_the_converted_model() -> None:
    torch.manual_seed(0)
    model = stacked(c=4, n=2).eval()
    new = reuse.convert(model, example_inputs=torch.randn(1, 3, 4, 4)).eval()
    x = torch.randn(1, 3, 4, 4)
    compiled = torch.compile(new, fullgraph=True)  # inductor: about 8 s on the 2-core CPU
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), new(x))


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # FX cannot trace this
            return self.conv(x)
        return x


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.gate = DataDependent()
        self.blocks = nn.Sequential(*[conv_bn(8) for _ in range(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.gate(self.stem(x)))


def test_untraceable_model_names_module_line_and_fix() -> None:
    with pytest.raises(ReuseError) as info:
        reuse.convert(Untraceable(), example_inputs=torch.randn(1, 3, 4, 4))
    msg = str(info.value)
    assert "module 'gate' (DataDependent)" in msg
    assert "if x.sum() > 0:" in msg and "test_fx.py" in msg
    assert "leaf_modules=[DataDependent]" in msg
    assert info.value.__suppress_context__ and info.value.__cause__ is None  # no FX traceback attached
    # The fix it names works, by class or by name.
    for leaf in (DataDependent, "gate"):
        _, rep = reuse.convert(Untraceable(), leaf_modules=[leaf], example_inputs=torch.randn(1, 3, 4, 4), report=True)
        assert [r.blocks for r in rep.converted] == [("blocks.0", "blocks.1", "blocks.2")]


def test_untraceable_root_forward() -> None:
    class Root(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.Sequential(*[conv_bn(8) for _ in range(2)])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.blocks(x) if x.shape[0] > int(x.mean()) else x

    with pytest.raises(ReuseError, match=r"in the forward of Root itself.*convert the submodules"):
        reuse.convert(Root(), example_inputs=torch.randn(1, 8, 4, 4))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"level": "block"}, r"level must be 'layer' \(whole blocks\), 'filter' or 'kernel'"),
        ({"level": "filter", "mode": "soft"}, r"mode"),
        ({"min_run": 1}, r"min_run must be an int >= 2"),
        ({"init": "avg"}, r"init must be 'first', 'mean', 'fit' .* or 'auto'"),
        ({"groups": 0}, r"groups must be a positive int"),
        ({"leaf_modules": [3]}, r"leaf_modules holds 3"),
        ({"leaf_modules": ["nope"]}, r"leaf_modules names 'nope', which is not a submodule"),
        ({"per_use": "every"}, r"per_use must be"),
        ({"example_inputs": [1]}, r"example_inputs must be a tensor or a tuple"),
        ({"example_inputs": torch.randn(1, 5, 8, 8)}, r"fails on the example input of shape\(s\) \[\(1, 5, 8, 8\)\]"),
        ({"inplace": "no"}, r"inplace must be True or False, got 'no' \(str\)"),
        ({"shuffle": "yes"}, r"shuffle must be True or False"),
        ({"report": 1}, r"report must be True or False"),
        ({"bank_size": 0.5}, r"bank_size and mode choose the banks of level='filter' or 'kernel'"),
        ({"level": "kernel", "bank_size": float("nan")}, r"bank_size must be"),
    ],
)
def test_bad_options(kwargs: dict, match: str) -> None:
    with pytest.raises(ReuseError, match=match):
        reuse.convert(stacked(n=2), **kwargs)


def test_a_truthy_string_does_not_convert_in_place() -> None:
    model = stacked(n=3)
    with pytest.raises(ReuseError, match="inplace"):
        reuse.convert(model, inplace="no")
    assert not any(isinstance(m, LayerReuse) for m in model.modules())
    with pytest.raises(ReuseError, match="shuffle"):
        reuse.find_runs(model, shuffle="no")


def test_not_a_module() -> None:
    with pytest.raises(ReuseError, match="needs an nn.Module, got function"):
        reuse.convert(lambda x: x)  # type: ignore[arg-type]
    lazy = nn.Sequential(nn.LazyConv2d(8, 1), nn.LazyConv2d(8, 1))
    with pytest.raises(ReuseError, match=r"uninitialized lazy parameters \(0.weight, ...\); run one forward pass"):
        reuse.find_runs(lazy)
    with pytest.raises(ReuseError, match="cannot guess an input"):
        reuse.convert(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)))


# --------------------------------------------------------------------------------------------------
# Property tests on generated stacks of blocks
# --------------------------------------------------------------------------------------------------

KINDS = ("conv", "residual", "dropout", "pair")


def block_modules(draw: st.DrawFn, cfg: tuple) -> list[nn.Module]:
    """The modules of one block: one module, or two for a pair (a block of two modules)."""
    kind, c, k, groups = cfg
    if kind == "conv":
        return [conv_bn(c, k, groups)]
    if kind == "residual":  # each with its own stochastic-depth rate, kept per use
        return [Residual(c, k, drop=draw(st.sampled_from([0.0, 0.1, 0.2])))]
    if kind == "dropout":  # each with its own dropout rate, kept per use
        return [conv_bn(c, k, groups).append(nn.Dropout(draw(st.sampled_from([0.0, 0.1, 0.3]))))]
    return [Residual(c, 3), Residual(c, 1)]  # alternating blocks, like Swin's shifted windows


def shared_params(cfg: tuple) -> int:
    """Weights a block shares between uses (its convolutions; the BatchNorms stay per use)."""
    kind, c, k, groups = cfg
    if kind == "pair":
        return c * c * 9 + c * c
    return c * c // groups * k * k


@st.composite
def stacks(draw: st.DrawFn) -> tuple[nn.Sequential, list[tuple[tuple[str, ...], int]], int]:
    """A stem, then segments that each repeat one block 1-3 times. A segment either goes on with the
    block of the one before (no separator: the two merge into one run) or starts after a separator conv
    found nowhere else (kernel 2j+1 for the j-th), which may change the width. So the runs expected are
    the segments of at least two blocks. Returns the model, the expected runs (module names, period)
    and the parameters a converted model saves."""
    c = draw(st.sampled_from([4, 6, 8]))
    layers: list[nn.Module] = [nn.Conv2d(3, c, 3, padding=1)]
    segments: list[tuple[tuple, list[str]]] = []
    for j in range(draw(st.integers(1, 3))):
        if not (segments and draw(st.booleans())):
            c_new = draw(st.sampled_from([4, 6, 8]))
            layers.append(nn.Conv2d(c, c_new, 2 * j + 1, padding=j))  # the separator
            c = c_new
            kind = draw(st.sampled_from(KINDS))
            k = 0 if kind == "pair" else draw(st.sampled_from([1, 3]))
            groups = 1 if kind in ("residual", "pair") else draw(st.sampled_from([g for g in (1, 2) if c % g == 0]))
            segments.append(((kind, c, k, groups), []))
        cfg, names = segments[-1]
        for _ in range(draw(st.integers(1, 3))):
            for m in block_modules(draw, cfg):
                names.append(str(len(layers)))
                layers.append(m)
    runs, saved = [], 0
    for cfg, names in segments:
        period = 2 if cfg[0] == "pair" else 1
        n = len(names) // period
        if n >= 2:
            runs.append((tuple(names), period))
            saved += (n - 1) * shared_params(cfg)
    return nn.Sequential(*layers), runs, saved


@settings(max_examples=25, deadline=None)
@given(stacks(), st.integers(0, 2**16))
def test_generated_stacks(stack: tuple, seed: int) -> None:
    model, expected, saved = stack
    torch.manual_seed(seed)
    model.eval()
    randomize(model, seed)
    x = torch.randn(2, 3, 5, 5)
    runs = reuse.find_runs(model, example_inputs=x)
    assert [(r.blocks, r.period) for r in runs if not r.skipped] == expected
    new, rep = reuse.convert(model, example_inputs=x, report=True)
    assert rep.params_before - rep.params_after == saved
    for run in rep.converted:  # shuffle exactly where the paper's shuffle fits the channels
        assert run.shuffle == (run.input_shape[1] % 2 == 0)
    new.train()(x).sum().backward()
    assert all(p.grad is not None for p in new.parameters())
    # Exactness: tie the weights of every run, then convert without shuffle.
    tie_runs(model, runs)
    exact = reuse.convert(model, shuffle=False, example_inputs=x).eval()
    with torch.no_grad():
        torch.testing.assert_close(exact(x), model(x), rtol=1e-4, atol=1e-5)


def test_deepcopy_of_a_converted_model_keeps_sharing() -> None:
    new = reuse.convert(stacked(n=3), example_inputs=torch.randn(1, 3, 8, 8))
    twin = copy.deepcopy(new)
    assert twin[1].uses[1][0] is twin[1].uses[0][0] and twin[1].uses[0][0] is not new[1].uses[0][0]


@pytest.mark.parametrize("level", ["filter", "kernel"])
def test_level_chooses_the_grain(level: str) -> None:
    """level='filter'|'kernel' banks the convs: exact at full size (bank_size=None), fewer parameters by
    default (banks of half the entries) and when compressed further."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(1, 3, 32, 32)
    exact = reuse.convert(model, level=level, bank_size=None)
    torch.testing.assert_close(exact(x), model(x))
    default = reuse.convert(model, level=level)
    n_model = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in default.parameters()) < 0.7 * n_model  # a finer grain of reuse: a smaller model
    banked_type = reuse.FilterReuseConv2d if level == "filter" else reuse.KernelReuseConv2d
    assert isinstance(exact.layer1[0].conv1, banked_type)
    small, rep = reuse.convert(model, level=level, bank_size=0.25, report=True)
    assert rep.params_after == sum(p.numel() for p in small.parameters()) < rep.params_before
    assert f"level='{level}'" in rep.notes[0] and small.reuse_report is rep
    small(x).sum().backward()
    for name, value in model.state_dict().items():  # the model handed in is untouched
        assert torch.equal(value, before[name]), name
