"""LruBlock's fast path (true depthwise conv on repeated channels, one gather per use) computes the paper's block.

The reference is written here the way the paper states it: a depthwise conv with channel multiplier 2
(``Conv2d(F, 2F, 3, groups=F)``) and the shuffle as concatenate + view + permute.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _helpers import paper_block, paper_shuffle
from _zoo import randomize
from hypothesis import given, settings
from hypothesis import strategies as st

import reuse
from reuse.models import LruBlock, LruNet
from reuse.models._gather import repeat_gather


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_block_equals_the_paper_block(train: bool, channels_last: bool) -> None:
    torch.manual_seed(0)
    block = randomize(LruBlock(16)).train(train)
    twin = copy.deepcopy(block)
    x = torch.randn(3, 16, 5, 5)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, expected = block(x1), paper_block(twin, x2)
    torch.testing.assert_close(out, expected)
    assert out.is_contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x1.grad, x2.grad)
    for (name, p), q in zip(block.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    torch.testing.assert_close(block.dw_bn.running_var, twin.dw_bn.running_var)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_fused_shuffle_equals_shuffle_then_block(train: bool) -> None:
    torch.manual_seed(0)
    block = randomize(LruBlock(32)).train(train)
    twin = copy.deepcopy(block)
    x1 = torch.randn(2, 32, 4, 4, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    out, expected = block(x1, shuffle=(4, True)), paper_block(twin, paper_shuffle(x2, groups=4))
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(block.dw.weight.grad, twin.dw.weight.grad)


@st.composite
def gather_cases(draw: st.DrawFn) -> tuple[int, int, bool]:
    """Channels, shuffle groups (0: no shuffle), swap halves."""
    groups = draw(st.sampled_from([0, 1, 2, 4]))
    channels = max(groups, 1) * 2 * draw(st.integers(1, 4))
    return channels, groups, draw(st.booleans())


@settings(max_examples=20, deadline=None)
@given(gather_cases(), st.booleans())
def test_repeat_gather_and_its_backward(case: tuple[int, int, bool], channels_last: bool) -> None:
    """Both outputs are the gathers they claim, and the custom backward is the autograd of index_select."""
    channels, groups, swap = case
    x = torch.randn(2, channels, 3, 2, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    perm = reuse.shuffle_permutation(channels, groups, swap) if groups else torch.arange(channels)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    rep, shuffled = repeat_gather(x1, channels, groups, swap)
    exp_rep, exp_shuffled = x2[:, perm.repeat_interleave(2)], x2[:, perm]
    # exact: a gather copies values, no arithmetic, so any difference is a wrong index
    torch.testing.assert_close(rep, exp_rep, rtol=0, atol=0)
    torch.testing.assert_close(shuffled, exp_shuffled, rtol=0, atol=0)
    g1, g2 = torch.randn_like(exp_rep), torch.randn_like(exp_shuffled)
    ((rep * g1).sum() + (shuffled * g2).sum()).backward()
    ((exp_rep * g1).sum() + (exp_shuffled * g2).sum()).backward()
    torch.testing.assert_close(x1.grad, x2.grad)


def test_gradcheck_of_the_gather() -> None:
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: repeat_gather(t, 8, 2, True), (x,))
    assert torch.autograd.gradcheck(lambda t: repeat_gather(t, 8, 0, False), (x,))


def test_lrunet_equals_the_paper_loop() -> None:
    """A whole reused stage: the library's loop (fused shuffles) against the paper's explicit loop."""
    torch.manual_seed(0)
    stage = randomize(LruNet(reuse=4)).stage2.train()
    uses = copy.deepcopy(stage).uses
    x = torch.randn(4, 128, 8, 8)
    out = stage(x)
    expected = x
    for i, use in enumerate(uses):
        expected = paper_block(use, paper_shuffle(expected) if i else expected)
    torch.testing.assert_close(out, expected)


def test_wrong_channels_raise_reuse_error() -> None:
    with pytest.raises(reuse.ReuseError, match=r"LruBlock\(16\): needs an input of shape \(B, 16, H, W\)"):
        LruBlock(16)(torch.randn(1, 8, 4, 4))


def test_fx_trace_keeps_the_modules_and_the_gather_as_one_node() -> None:
    torch.manual_seed(0)
    block = randomize(LruBlock(16)).eval()
    gm = torch.fx.symbolic_trace(block, concrete_args={"shuffle": None})
    x = torch.randn(2, 16, 4, 4)
    torch.testing.assert_close(gm(x), block(x))
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["dw", "dw_bn", "pw", "pw_bn"]
    assert sum(n.target is repeat_gather for n in gm.graph.nodes) == 1


def _forward_watching_the_repeat(block: LruBlock, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``block(x)``, and whether the storage of the block's 2F repeated channels is still alive after it."""
    import reuse.models.lrunet as lrunet

    storages = []

    def spy(*args: object) -> tuple[torch.Tensor, torch.Tensor]:
        repeated, shuffled = repeat_gather(*args)  # type: ignore[arg-type]
        storages.append(repeated.untyped_storage()._weak_ref())
        return repeated, shuffled

    original = lrunet.repeat_gather
    lrunet.repeat_gather = spy
    try:
        out = block(x)
    finally:
        lrunet.repeat_gather = original
    return out, not torch.UntypedStorage._expired(storages[0])


def test_backward_keeps_the_input_not_the_repeated_channels() -> None:
    """With ``save_memory=True`` the 2F repeated channels are freed after the forward (backward gathers them again
    from the input)."""
    block = LruBlock(16, save_memory=True).train()
    out, alive = _forward_watching_the_repeat(block, torch.randn(2, 16, 4, 4, requires_grad=True))
    assert not alive, "the repeated input is still alive after the forward"
    out.sum().backward()  # and backward still works (it gathers again)

    h = torch.randn(2, 16, 4, 4, requires_grad=True) * 1.0
    out = block(h)
    with torch.no_grad():
        h.add_(1.0)  # the input backward needs is changed under its feet
    with pytest.raises(RuntimeError, match="modified in place after the forward"):
        out.sum().backward()


@pytest.mark.parametrize("save_memory", [True, False])
def test_save_memory_changes_what_backward_keeps_not_the_numbers(save_memory: bool) -> None:
    torch.manual_seed(0)
    reference = randomize(LruNet(num_classes=10, reuse=3, drop_rate=0.0)).train()
    model = LruNet(num_classes=10, reuse=3, drop_rate=0.0, save_memory=save_memory).train()
    model.load_state_dict(reference.state_dict())
    assert all(b.save_memory is save_memory for b in model.modules() if isinstance(b, LruBlock))
    x = torch.randn(2, 3, 32, 32)
    out, expected = model(x), reference(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out.square().sum().backward()
    expected.square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(
    "make", [lambda: LruBlock(16, save_memory=False), lambda: LruBlock(16)], ids=["False", "default"]
)
def test_save_memory_false_keeps_the_repeated_channels_for_backward(make) -> None:  # noqa: ANN001
    """The mirror of the test above: with ``save_memory=False``, the default, the 2F repeated channels outlive the
    forward."""
    block = make().train()
    assert block.save_memory is False
    out, alive = _forward_watching_the_repeat(block, torch.randn(2, 16, 4, 4, requires_grad=True))
    assert alive, "the repeated input was freed: backward would gather again"
    out.sum().backward()


def test_save_memory_options_are_checked_and_old_blocks_default_to_it() -> None:
    with pytest.raises(reuse.ReuseError, match="save_memory"):
        LruBlock(16, save_memory=1)  # type: ignore[arg-type]
    with pytest.raises(reuse.ReuseError, match="save_memory"):
        LruNet(save_memory="no")  # type: ignore[arg-type]
    block = LruBlock(16)
    del block.save_memory  # as a block pickled before the option existed
    assert block.save_memory is True
    block.train()(torch.randn(2, 16, 4, 4, requires_grad=True)).sum().backward()


def test_save_memory_reaches_the_blocks_through_timm() -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model("lrunet1_1x", save_memory=True)
    blocks = [b for b in model.modules() if isinstance(b, LruBlock)]
    assert blocks and all(b.save_memory for b in blocks)
    assert not any(b.save_memory for b in timm.create_model("lrunet1_1x").modules() if isinstance(b, LruBlock))


@pytest.mark.parametrize("save_memory", [True, False])
def test_save_memory_scripts_and_trains_under_torchscript(save_memory: bool) -> None:
    torch.manual_seed(0)
    model = randomize(LruNet(num_classes=10, reuse=2, drop_rate=0.0, save_memory=save_memory)).train()
    scripted = torch.jit.script(copy.deepcopy(model))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(scripted(x), model(x))
