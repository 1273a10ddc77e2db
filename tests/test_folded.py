"""The inference fast path of folded LRU stages (reuse/models/_folded.py) and LayerReuse's ``forward_uses`` hook.

The reference is every use called one by one with the shuffle between two uses, each use's forward being the
block's own (tested against the paper's formulation in test_lrublock_fast.py).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from _zoo import randomize
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import reuse
from reuse.models import LruBlock, LruNet, _folded

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def folded_stage(channels: int, n: int, shuffle: bool, seed: int = 0) -> reuse.LayerReuse:
    torch.manual_seed(seed)
    layer = randomize(reuse.wrap(LruBlock(channels), n=n, shuffle=shuffle), seed=seed)
    return reuse.optimize_for_inference(layer)


def use_by_use(layer: reuse.LayerReuse, x: Tensor) -> Tensor:
    for i, use in enumerate(layer.uses):
        x = use(layer.shuffle(x) if i and layer.shuffle is not None else x)  # (B, C, H, W)
    return x


@settings(max_examples=25, deadline=None)
@given(
    channels=st.sampled_from([8, 16, 64]),
    n=st.integers(1, 4),
    shuffle=st.booleans(),
    batch=st.integers(1, 3),
    size=st.integers(1, 6),
    channels_last=st.booleans(),
    inference_mode=st.booleans(),
)
def test_the_fast_path_computes_the_uses_one_by_one_and_leaves_the_input_alone(
    channels: int, n: int, shuffle: bool, batch: int, size: int, channels_last: bool, inference_mode: bool
) -> None:
    layer = folded_stage(channels, n, shuffle)
    x = torch.randn(batch, channels, size, size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    before = x.clone()
    with torch.inference_mode() if inference_mode else torch.no_grad():
        fast = _folded.folded_forward(layer.uses, x, layer.shuffle)
        through_layer = layer(x)
        expected = use_by_use(layer, x)
    assert fast is not None, "a folded float32 CPU stage without gradients takes the fast path"
    torch.testing.assert_close(fast, expected)
    torch.testing.assert_close(through_layer, expected)
    assert torch.equal(x, before)


def test_optimized_lrunet_takes_the_fast_path_at_every_stage_and_equals_the_model(monkeypatch) -> None:
    torch.manual_seed(0)
    model = randomize(LruNet(num_classes=10, reuse=3)).eval()
    fast = reuse.optimize_for_inference(model)
    taken = []
    original = _folded._run

    def counted(*args: object) -> Tensor | None:
        out = original(*args)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(_folded, "_run", counted)
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)
    assert taken == [True] * 4 + [False] * 4  # the folded model's four stages; the model's own decline


def test_the_fast_path_declines_what_it_cannot_compute() -> None:
    layer = folded_stage(16, 3, True)
    x = torch.randn(2, 16, 4, 4)
    with torch.no_grad():
        unfolded = reuse.wrap(LruBlock(16), n=3).eval()
        assert _folded.folded_forward(unfolded.uses, x, unfolded.shuffle) is None  # BatchNorms still there
        assert _folded.folded_forward(layer.uses, x.double(), layer.shuffle) is None  # float64
        assert _folded.folded_forward(layer.uses, torch.randn(2, 8, 4, 4), layer.shuffle) is None  # wrong channels
    assert _folded.folded_forward(layer.uses, x.requires_grad_(), layer.shuffle) is None  # a gradient is asked for
    trainable = copy.deepcopy(layer)
    trainable.uses[1].pw.weight.requires_grad_(True)
    assert _folded.folded_forward(trainable.uses, torch.randn(2, 16, 4, 4), trainable.shuffle) is None


def test_a_wrong_input_still_gets_the_blocks_error() -> None:
    layer = folded_stage(16, 2, True)
    with torch.no_grad(), pytest.raises(reuse.ReuseError, match=r"LruBlock\(16\): needs an input of shape"):
        layer(torch.randn(1, 8, 4, 4))


@pytest.mark.filterwarnings("ignore:`torch.jit.trace:FutureWarning")
def test_graph_captures_see_the_plain_ops() -> None:
    layer = folded_stage(16, 3, True)
    x = torch.randn(1, 16, 4, 4)
    with torch.no_grad():
        traced = torch.jit.trace(layer, x)
        expected = use_by_use(layer, x)
    assert "mkldnn" not in str(traced.inlined_graph)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), expected)
    exported = torch.export.export(layer, (x,))
    assert "mkldnn" not in str(exported.graph)
    torch.testing.assert_close(exported.module()(x), expected)


@pytest.mark.parametrize("how", ["in place", "load_state_dict"])
def test_changed_weights_are_taken_up(how: str) -> None:
    layer = folded_stage(16, 3, True)
    x = torch.randn(1, 16, 4, 4)
    with torch.no_grad():
        layer(x)  # the plan is made and kept
        if how == "in place":
            layer.uses[2].pw.weight.mul_(-2.0)
            layer.uses[0].dw.bias.add_(1.0)
        else:
            layer.load_state_dict(folded_stage(16, 3, True, seed=1).state_dict())
        torch.testing.assert_close(layer(x), use_by_use(layer, x))


def test_one_plan_per_input_shape_and_no_more_than_a_few() -> None:
    layer = folded_stage(8, 2, True)
    with torch.no_grad():
        for size in range(1, 8):
            x = torch.randn(1, 8, size, size)
            torch.testing.assert_close(layer(x), use_by_use(layer, x))
    assert len(_folded._PLANS[layer.uses][1]) == _folded._SHAPES_KEPT


def test_a_onednn_failure_falls_back_to_the_plain_path_with_one_warning(monkeypatch) -> None:
    def fail(*args: object) -> None:
        raise RuntimeError("could not create a primitive\nmore")

    monkeypatch.setattr(_folded, "_run", fail)
    monkeypatch.setattr(_folded, "_DISABLED", [])
    layer = folded_stage(8, 2, True)
    x = torch.randn(1, 8, 3, 3)
    with torch.no_grad(), pytest.warns(UserWarning, match="fast path failed \\(could not create a primitive\\)"):
        out = layer(x)
    torch.testing.assert_close(out, use_by_use(layer, x))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x)  # off for the rest of the process: no second warning


# --- LayerReuse's hook, on a block of its own ----------------------------------------------------------------


class Doubling(nn.Module):
    """A block that runs its uses itself (times 2 per use) when asked to, and declines otherwise."""

    calls: list[str] = []  # noqa: RUF012

    def __init__(self, take: bool) -> None:
        super().__init__()
        self.take = take
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        Doubling.calls.append("use")
        return 2 * x

    @staticmethod
    def forward_uses(uses: nn.ModuleList, x: Tensor, shuffle: nn.Module | None) -> Tensor | None:
        Doubling.calls.append("forward_uses")
        return x * 2 ** len(uses) if uses[0].take else None


@pytest.mark.parametrize("take", [True, False])
def test_layer_reuse_asks_the_block_to_run_its_uses_first(take: bool) -> None:
    Doubling.calls = []
    layer = reuse.wrap(Doubling(take), n=3, shuffle=False)
    x = torch.randn(1, 4, 2, 2)
    torch.testing.assert_close(layer(x), 8 * x)
    assert Doubling.calls == (["forward_uses"] if take else ["forward_uses", "use", "use", "use"])


def test_checkpointed_training_and_fx_graphs_run_the_uses_one_by_one() -> None:
    Doubling.calls = []
    layer = reuse.LayerReuse(Doubling(True), n=2, shuffle=False, checkpoint=True)
    layer(torch.randn(1, 4, 2, 2, requires_grad=True))
    assert "forward_uses" not in Doubling.calls
    graph = torch.fx.symbolic_trace(reuse.LayerReuse(Doubling(True), n=2, shuffle=False))
    assert "forward_uses" not in Doubling.calls
    assert [n.op for n in graph.graph.nodes].count("call_function") == 2  # each use's 2 * x
