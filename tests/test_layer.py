"""Layer reuse: equivalence with an unrolled loop of tied blocks, storage of shared weights, integrations, errors."""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Callable

import pytest
import torch
from _helpers import Residual
from _zoo import BLOCKS, ConvBnAct, NestedNorms, randomize, select_blocks
from einops import rearrange
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import reuse
from reuse import LayerReuse, ReuseError, wrap
from reuse.models import LruBlock, LruNet


# --- the blocks of tests/_zoo.py with the feature "wrap" ----------------------------------------------------
def reference_shuffle(x: torch.Tensor, groups: int = 2) -> torch.Tensor:
    half = x.shape[1] // 2
    x = torch.cat([x[:, half:], x[:, :half]], dim=1)
    return rearrange(x, "b (g c) h w -> b (c g) h w", g=groups)


def unrolled(blocks: list[nn.Module], x: torch.Tensor, shuffle: bool, groups: int = 2) -> torch.Tensor:
    """The paper's loop written out: block i, shuffle, block i+1, ..."""
    for i, block in enumerate(blocks):
        if i and shuffle:
            x = reference_shuffle(x, groups)
        x = block(x)
    return x


def shared_and_per_use(block: nn.Module) -> tuple[list[str], list[str]]:
    shared, per_use = [], []
    for name, module in block.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            (per_use if reuse.is_batchnorm(module) else shared).append(f"{name}.{pname}".lstrip("."))
    return shared, per_use


def check_equivalent(
    make_block: Callable[[], nn.Module], n: int, shuffle: bool, x: torch.Tensor, train: bool, seed: int = 0
) -> None:
    """wrap(block, n) == n tied copies of the block: outputs, gradients, running statistics."""
    block = randomize(make_block(), seed)
    copies = [copy.deepcopy(block) for _ in range(n)]
    model = wrap(block, n, shuffle=shuffle)
    model.train(train)
    for c in copies:
        c.train(train)

    out = model(x)
    expected = unrolled(copies, x, shuffle)
    torch.testing.assert_close(out, expected)

    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    shared, per_use = shared_and_per_use(block)
    for name in shared:  # the shared weight's gradient is the sum of the per-use gradients
        total = sum(c.get_parameter(name).grad for c in copies)
        torch.testing.assert_close(model.uses[0].get_parameter(name).grad, total)
    for i, c in enumerate(copies):
        for name in per_use:
            torch.testing.assert_close(model.uses[i].get_parameter(name).grad, c.get_parameter(name).grad)
        for name, buf in c.named_buffers():
            torch.testing.assert_close(model.uses[i].get_buffer(name), buf)


@pytest.mark.parametrize("name", select_blocks("wrap"))
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shuffle", [True, False], ids=["shuffle", "noshuffle"])
def test_registry_block_equals_unrolled_loop(name: str, train: bool, shuffle: bool) -> None:
    torch.manual_seed(0)
    check_equivalent(BLOCKS[name].build, 4, shuffle, torch.randn(BLOCKS[name].shape), train)


@st.composite
def blocks(draw: st.DrawFn) -> tuple[Callable[[], nn.Module], int, int]:
    """A conv block (with or without shortcut), its channels, and how many uses."""
    groups = draw(st.sampled_from([1, 2, 4]))
    channels = groups * draw(st.sampled_from([2, 4]))
    kernel = draw(st.sampled_from([1, 3, 5]))
    shortcut = draw(st.booleans())
    n = draw(st.integers(1, 5))
    kind = Residual if shortcut else ConvBnAct
    return (lambda: kind(channels, kernel, groups)), channels, n


@settings(max_examples=25, deadline=None)
@given(blocks(), st.booleans(), st.booleans(), st.integers(0, 2**16))
def test_generated_blocks_equal_unrolled_loop(spec: tuple, shuffle: bool, train: bool, seed: int) -> None:
    make_block, channels, n = spec
    torch.manual_seed(seed)
    check_equivalent(make_block, n, shuffle, torch.randn(2, channels, 5, 5), train, seed)


# --- storage: shared tensors once, norms per use -----------------------------------------------------------
def test_parameters_and_state_dict_hold_shared_tensors_once() -> None:
    block = LruBlock(16)
    model = wrap(block, n=8)
    n_shared = block.dw.weight.numel() + block.pw.weight.numel()
    n_norms = 2 * (2 * 32 + 2 * 16)  # dw_bn over 32 channels, pw_bn over 16: weight and bias
    assert sum(p.numel() for p in model.parameters()) == n_shared + 8 * n_norms // 2
    sd = model.state_dict()
    assert [k for k in sd if k.endswith("dw.weight") or k.endswith("pw.weight")] == [
        "uses.0.dw.weight",
        "uses.0.pw.weight",
    ]
    assert sum(k.endswith("dw_bn.running_mean") for k in sd) == 8
    ptrs = [t.data_ptr() for t in sd.values() if t.numel()]
    assert len(ptrs) == len(set(ptrs)), "a tensor is stored under two names"


def test_wrapping_keeps_the_blocks_statistics_for_every_use() -> None:
    block = randomize(Residual(8))
    before = copy.deepcopy(block.state_dict())
    model = wrap(block, n=3)
    assert model.uses[0] is block, "use 0 is the block handed in"
    for use in model.uses:
        for name, value in before.items():
            torch.testing.assert_close(use.state_dict()[name], value, rtol=0, atol=0)
    assert model.uses[1].bn1 is not block.bn1 and model.uses[1].conv1 is block.conv1
    for name, value in block.state_dict().items():  # the block itself is not modified
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)


def test_n_equal_one_is_the_block() -> None:
    block = randomize(Residual(8)).eval()
    x = torch.randn(2, 8, 4, 4)
    expected = block(x)
    model = wrap(block, n=1)
    assert list(model.parameters()) == list(block.parameters())
    torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize(
    "norm, per_use, expected",
    [
        (lambda: nn.BatchNorm1d(4), "batchnorm", True),
        (lambda: nn.BatchNorm3d(4), "batchnorm", True),
        (lambda: nn.SyncBatchNorm(4), "batchnorm", True),
        (lambda: __import__("torchvision").ops.FrozenBatchNorm2d(4), "batchnorm", True),
        (lambda: __import__("timm").layers.BatchNormAct2d(4), "batchnorm", True),
        (lambda: nn.GroupNorm(2, 4), "batchnorm", False),
        (lambda: nn.GroupNorm(2, 4), "norms", True),
        (lambda: nn.LayerNorm(4), "norms", True),
        (lambda: nn.InstanceNorm2d(4, affine=True), "norms", True),
        (lambda: nn.Conv2d(4, 4, 1), "norms", False),
    ],
)
def test_which_modules_are_per_use(norm: Callable[[], nn.Module], per_use: str, expected: bool) -> None:
    block = nn.Sequential(nn.Identity(), norm())
    model = LayerReuse(block, n=3, shuffle=False, per_use=per_use)  # type: ignore[arg-type]
    distinct = model.uses[1][1] is not model.uses[0][1]
    assert distinct == expected


def test_per_use_predicate() -> None:
    block = nn.Sequential(nn.Conv2d(4, 4, 1), nn.Dropout(0.1))
    model = wrap(block, n=2, shuffle=False, per_use=lambda m: isinstance(m, nn.Dropout))
    assert model.uses[1][1] is not model.uses[0][1] and model.uses[1][0] is model.uses[0][0]


def test_state_dict_round_trip_and_load_into_a_fresh_model() -> None:
    torch.manual_seed(0)
    model = wrap(randomize(NestedNorms(8)), n=4)
    model.train()
    model(torch.randn(4, 8, 5, 5))  # move the running statistics apart use by use
    model.eval()
    fresh = wrap(NestedNorms(8), n=4).eval()
    result = fresh.load_state_dict(model.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(fresh(x), model(x))
    assert fresh.uses[3].body[0][0] is fresh.uses[0].body[0][0], "loading keeps the sharing"
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(fresh(x), model(x))


def test_load_state_dict_reports_missing_keys() -> None:
    model = wrap(Residual(8), n=2)
    sd = model.state_dict()
    del sd["uses.1.bn1.weight"]
    with pytest.raises(RuntimeError, match=r"uses\.1\.bn1\.weight"):
        model.load_state_dict(sd)


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))], ids=["deepcopy", "pickle"])
def test_copies_keep_the_sharing(clone: Callable[[nn.Module], nn.Module]) -> None:
    model = wrap(Residual(8), n=3)
    other = clone(model)
    assert other.uses[2].conv1 is other.uses[0].conv1 and other.uses[2].bn1 is not other.uses[0].bn1
    assert other.uses[0].conv1 is not model.uses[0].conv1
    assert sum(p.numel() for p in other.parameters()) == sum(p.numel() for p in model.parameters())
    x = torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(other.eval()(x), model.eval()(x))


def test_from_blocks_takes_norms_from_each_block() -> None:
    blocks = [randomize(Residual(8), seed=i) for i in range(3)]  # each block its own BatchNorms
    before = [copy.deepcopy(b.state_dict()) for b in blocks]
    model = LayerReuse.from_blocks(blocks, shuffle=False)
    for i, b in enumerate(blocks):
        torch.testing.assert_close(model.uses[i].bn2.running_var, b.bn2.running_var, rtol=0, atol=0)
        assert model.uses[i].bn2 is not b.bn2
        torch.testing.assert_close(model.uses[i].conv1.weight, blocks[0].conv1.weight, rtol=0, atol=0)
        for k, v in b.state_dict().items():
            torch.testing.assert_close(v, before[i][k], rtol=0, atol=0)
    with pytest.raises(ReuseError, match="differs in structure"):
        LayerReuse.from_blocks([Residual(8), Residual(16)])


# --- errors -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, -1, 2.0, True, "8"])
def test_bad_n(n: object) -> None:
    with pytest.raises(ReuseError, match="n must be a positive int"):
        wrap(Residual(8), n=n)  # type: ignore[arg-type]


def test_non_module_block() -> None:
    with pytest.raises(ReuseError, match="block must be an nn.Module, got function"):
        wrap(lambda x: x, n=2)  # type: ignore[arg-type]


def test_shape_changing_block_names_class_and_shapes() -> None:
    model = wrap(nn.Sequential(nn.Conv2d(8, 16, 1)), n=2)
    with pytest.raises(ReuseError, match=r"block Sequential changes the shape \(1, 8, 4, 4\) -> \(1, 16, 4, 4\)"):
        model(torch.randn(1, 8, 4, 4))


def test_groups_that_do_not_divide_the_channels() -> None:
    model = wrap(ConvBnAct(6), n=2, groups=4)
    with pytest.raises(ReuseError, match=r"ConvBnAct with input shape \(1, 6, 3, 3\).*groups=4 does not divide 6"):
        model(torch.randn(1, 6, 3, 3))
    assert wrap(ConvBnAct(6), n=2, groups=4, shuffle=False)(torch.randn(1, 6, 3, 3)).shape == (1, 6, 3, 3)


def test_non_tensor_output() -> None:
    class Pair(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x, x

    with pytest.raises(ReuseError, match="returned tuple, not a tensor"):
        wrap(Pair(), n=2)(torch.randn(1, 4))


def test_bad_per_use() -> None:
    with pytest.raises(ReuseError, match="per_use must be"):
        wrap(Residual(8), n=2, per_use="everything")  # type: ignore[arg-type]


# --- representation and integrations -----------------------------------------------------------------------
def test_repr_shows_the_block_once() -> None:
    text = repr(wrap(LruBlock(16), n=8))
    assert text.startswith(
        "LayerReuse(n=8, shuffle=ChannelShuffle(groups=2, swap_halves=True), per_use='batchnorm', block=LruBlock("
    )
    assert text.count("(dw): Conv2d") == 1


class Net(nn.Module):
    """A model that contains a reused block between ordinary layers."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.body = wrap(randomize(LruBlock(16)), n=3)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)).mean((2, 3)))  # (B, 5)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_fx_symbolic_trace(train: bool) -> None:
    torch.manual_seed(0)
    model = Net().train(train)
    twin = copy.deepcopy(model)
    gm = torch.fx.symbolic_trace(twin)
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(gm(x), model(x))
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert "body.uses.2.dw_bn" in targets and "body.uses.0.dw" in targets and "body.uses.1.dw" not in targets
    if train:  # the traced graph updates the statistics of use 2, not use 0
        torch.testing.assert_close(
            gm.get_submodule("body.uses.2.dw_bn").running_mean, model.body.uses[2].dw_bn.running_mean
        )


def test_torch_compile() -> None:
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(torch.compile(model)(x), model(x), rtol=1e-4, atol=1e-5)


def _invoke_subgraph_calls(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """Compile ``model`` with a backend that keeps dynamo's graph; the region each invoke_subgraph node calls."""
    graphs: list[torch.fx.GraphModule] = []

    def keep(gm: torch.fx.GraphModule, example_inputs: object) -> torch.fx.GraphModule:
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    out = torch.compile(model, backend=keep)(x)
    calls = [
        str(node.args[1])
        for gm in graphs
        for node in gm.graph.nodes
        if node.op == "call_function" and type(node.target).__name__ == "InvokeSubgraphHOP"
    ]
    return out, calls


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_compile_regions_compiles_the_block_once_for_the_uses_after_the_first_in_eval(train: bool) -> None:
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
    model = randomize(reuse.wrap(block, n=5, compile_regions=True)).train(train)
    twin = copy.deepcopy(model)
    x = torch.randn(2, 8, 5, 5)
    out, calls = _invoke_subgraph_calls(model, x)
    torch.testing.assert_close(out, twin(x))
    if train:  # BatchNorm statistics are updated in place, which regions do not take: every use inlined
        assert calls == []
        torch.testing.assert_close(model.uses[3][1].running_mean, twin.uses[3][1].running_mean)
    else:
        assert len(calls) == 4 and len(set(calls)) == 1, calls  # uses 1-4 (with the shuffle) call one region
    _, inlined = _invoke_subgraph_calls(reuse.wrap(block, n=5).train(train), x)
    assert inlined == []  # the default: every use inlined


def test_compile_regions_with_inductor_computes_the_model() -> None:
    torch.manual_seed(0)
    model = randomize(LruNet(reuse=3)).eval()
    for stage in model.stages:
        stage.compile_regions = True
    assert "compile_regions=True" in repr(model.stage1)
    x = torch.randn(2, 3, 32, 32)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(model)(x), model(x), rtol=1e-4, atol=1e-5)


def test_compile_regions_with_freezing_inline_the_uses(monkeypatch) -> None:
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config, "freezing", True)  # frozen parameters cannot enter a region
    block = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))
    layer = randomize(reuse.wrap(block, n=3, compile_regions=True)).eval()
    x = torch.randn(1, 8, 2, 2)
    out, calls = _invoke_subgraph_calls(layer, x)
    assert calls == []
    torch.testing.assert_close(out, layer(x))


def test_compile_regions_is_checked() -> None:
    with pytest.raises(reuse.ReuseError, match="compile_regions"):
        reuse.LayerReuse(nn.Conv2d(4, 4, 1), n=2, compile_regions="yes")  # type: ignore[arg-type]


def test_torch_export() -> None:
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 3, 6, 6)
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), model(x), rtol=1e-5, atol=1e-6)


def test_train_and_eval_modes_differ_per_use() -> None:
    model = Net()
    model.train()
    model(torch.randn(4, 3, 6, 6))
    stats = [use.dw_bn.running_mean.clone() for use in model.body.uses]
    assert not torch.equal(stats[0], stats[1]), "each use keeps its own running statistics"
    model.eval()
    model(torch.randn(4, 3, 6, 6))
    for use, before in zip(model.body.uses, stats):
        torch.testing.assert_close(use.dw_bn.running_mean, before, rtol=0, atol=0)


def test_channels_last_and_bfloat16() -> None:
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 3, 6, 6)
    expected = model(x)
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    torch.testing.assert_close(cl(x.to(memory_format=torch.channels_last)), expected, rtol=1e-4, atol=1e-5)
    bf = copy.deepcopy(model).to(torch.bfloat16)
    assert bf.body.uses[1].dw is bf.body.uses[0].dw
    out = bf(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=0.1, atol=0.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda() -> None:
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 3, 6, 6)
    expected = model(x)
    gpu = copy.deepcopy(model).cuda()
    assert gpu.body.uses[2].dw.weight.is_cuda and gpu.body.uses[2].dw is gpu.body.uses[0].dw
    torch.testing.assert_close(gpu(x.cuda()).cpu(), expected, rtol=1e-4, atol=1e-4)


class AliasedNorm(nn.Module):
    """A block holding one BatchNorm under two attribute names, and calling it through the alias."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.bn_alias = self.bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn_alias(self.conv(x))  # (B, C, H, W)


def test_a_module_under_two_names_is_one_copy_per_use() -> None:
    m = wrap(AliasedNorm(), n=3, shuffle=False).train()
    for i, use in enumerate(m.uses):
        assert use.bn is use.bn_alias, f"use {i}: the two names must stay one module"
        assert all(use.bn is not other.bn for other in m.uses[:i]), f"use {i} shares a BatchNorm with an earlier use"
    m(torch.randn(2, 4, 5, 5))
    assert [int(use.bn.num_batches_tracked) for use in m.uses] == [1, 1, 1]  # each use's statistics advance once


def test_strict_load_refuses_a_later_use_that_disagrees_on_a_shared_tensor() -> None:
    m = wrap(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)), n=2)
    sd = m.state_dict()
    sd["uses.1.0.weight"] = sd["uses.0.0.weight"] + 1.0
    before = m.uses[0][0].weight.detach().clone()
    with pytest.raises(ReuseError, match=r"uses\.1\.0\.weight differs from uses\.0\.0\.weight"):
        m.load_state_dict(sd, strict=True)
    assert torch.equal(m.uses[0][0].weight, before)
    sd["uses.1.0.weight"] = sd["uses.0.0.weight"].clone()  # the same values twice: fine
    m.load_state_dict(sd, strict=True)


@pytest.mark.parametrize("option", ["shuffle", "swap_halves", "checkpoint"])
@pytest.mark.parametrize("value", ["no", 1, None])
def test_bool_options_take_only_bools(option: str, value: object) -> None:
    with pytest.raises(ReuseError, match=f"{option} must be True or False"):
        wrap(nn.Conv2d(4, 4, 1), n=2, **{option: value})


def test_per_use_all_shares_nothing() -> None:
    m = wrap(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)), n=3, per_use="all")
    assert m.shared_names() == []
    assert len({id(use[0].weight) for use in m.uses}) == 3
    assert sum(p.numel() for p in m.parameters()) == 3 * (4 * 4 * 9 + 4 + 8)
