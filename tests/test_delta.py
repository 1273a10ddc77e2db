"""Relaxed reuse: per-use low-rank deltas (``delta_rank``) on LayerReuse and ``reuse.fx.convert``.

Expected values come from first principles: at full rank a truncated SVD is the matrix itself, so the converted
model must compute what the model handed in computes, whatever its blocks' weights; at rank 0 it is plain reuse;
the weight error of a truncated SVD falls with the rank (Eckart-Young); parameter counts follow the closed form
``g * r * (O/g + C/g * kh * kw)`` (+ ``O`` for a bias offset) per use and layer, written out here by hand.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from _helpers import Residual, Snapshot
from _zoo import Model, randomize, select, stack
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import reuse
from reuse import LayerReuse, ReuseError
from reuse.delta import LowRankConv, LowRankLinear, delta_params, full_rank, resolve_rank

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def outputs(model: nn.Module, x: torch.Tensor, seed: int = 3) -> torch.Tensor:
    torch.manual_seed(seed)  # the same dropout masks in train mode
    with torch.no_grad():
        return model(x)


# ----------------------------------------------------------------------------------------------------------
# Full rank: the original, exactly.


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("init", ["first", "mean"])
@pytest.mark.parametrize("case", select("delta"))
def test_full_rank_reconstructs_the_model(case: Model, init: str, train: bool) -> None:
    torch.manual_seed(0)
    model = randomize(case.build()).train(train)
    x = torch.randn(4, *case.shape[1:])  # batch 4: in train mode the last BatchNorms normalise over 1x1 or 2x2 maps
    new, rep = reuse.convert(model, shuffle=False, init=init, delta_rank=1.0, example_inputs=x, report=True)
    assert len(rep.converted) == case.runs, "the runs counted by hand: the test means something only with one"
    new.train(train)
    expected = outputs(model, x)
    scale = max(1.0, expected.abs().max().item())  # float32 rounding grows with the outputs (1000 logits near 3)
    # In train mode the last BatchNorms normalise over 4 values (batch 4, 1x1 maps): they divide the float32 rounding
    # of the SVD's reconstruction by a small batch deviation (4.2e-5 on ResNet-18 on an AMD EPYC, 2026-12-06).
    atol = (1e-4 if train else 1e-5) * scale
    torch.testing.assert_close(outputs(new, x), expected, rtol=1e-4, atol=atol)


@settings(max_examples=12, deadline=None)
@given(
    c=st.sampled_from([4, 6, 8]),
    n=st.integers(2, 4),
    kernel=st.sampled_from([1, 3]),
    groups=st.sampled_from([1, 2]),
    seed=st.integers(0, 1000),
)
def test_full_rank_reconstructs_any_stack(c: int, n: int, kernel: int, groups: int, seed: int) -> None:
    torch.manual_seed(seed)
    model = randomize(stack(c, n, kernel, groups), seed).eval()
    x = torch.randn(2, 3, 6, 6)
    new = reuse.convert(model, shuffle=False, init="mean", delta_rank=1.0, example_inputs=x)
    torch.testing.assert_close(outputs(new, x), outputs(model, x), rtol=1e-4, atol=1e-5)


def test_rank_zero_is_plain_convert() -> None:
    torch.manual_seed(0)
    model = randomize(stack()).eval()
    x = torch.randn(2, 3, 8, 8)
    plain = reuse.convert(model, shuffle=False, example_inputs=x)
    zero = reuse.convert(model, shuffle=False, example_inputs=x, delta_rank=0)
    assert repr(zero) == repr(plain)
    assert not any(isinstance(m, (LowRankConv, LowRankLinear)) for m in zero.modules())
    torch.testing.assert_close(outputs(zero, x), outputs(plain, x))


def near_blocks(c: int = 8, n: int = 4, spread: float = 0.2, seed: int = 0) -> nn.Sequential:
    """A stack whose blocks are perturbations of one block, as the blocks of a trained stage are alike."""
    torch.manual_seed(seed)
    model = randomize(stack(c, n), seed)
    with torch.no_grad():
        for block in model[2:]:
            for name in ("conv1", "conv2"):
                w = block.get_submodule(name).weight
                w.copy_(model[1].get_submodule(name).weight + spread * w.std() * torch.randn_like(w))
    return model.eval()


def test_errors_fall_as_the_rank_grows() -> None:
    """Weight error: a truncated SVD, so non-increasing in the rank whatever the weights (Eckart-Young). Output
    error: non-increasing on a fixed model whose blocks are alike (for unrelated random blocks the network is too
    chaotic for the weight error to order the output error)."""
    model = near_blocks()
    x = torch.randn(8, 3, 8, 8)
    reference = outputs(model, x)
    ranks = [0, 1, 2, 4, 8]  # 8 = full rank of an 8-channel 3x3 conv: min(8, 72)
    out_err, w_err = [], []
    for r in ranks:
        new = reuse.convert(model, shuffle=False, init="mean", delta_rank=r, example_inputs=x)
        out_err.append((outputs(new, x) - reference).square().mean().item())
        lr = new[1]
        err = 0.0
        for i in range(lr.n):
            for path in ("conv1", "conv2"):
                used = lr.uses[i].get_submodule(path).weight
                err += (used - model[1 + i].get_submodule(path).weight).pow(2).sum().item()
        w_err.append(err)
    assert all(a >= b - 1e-9 for a, b in zip(w_err, w_err[1:])), w_err
    assert all(a >= b - 1e-9 for a, b in zip(out_err, out_err[1:])), out_err
    assert w_err[-1] < 1e-8 and out_err[-1] < 1e-10 and out_err[0] > 1e4 * max(out_err[-1], 1e-14)


# ----------------------------------------------------------------------------------------------------------
# Parameters, gradients.


def by_hand(o: int, c: int, k: int, g: int, r: int, bias: bool) -> int:
    """One use's delta: per group B (O/g x r) and A (r x C/g*k), plus a bias offset of O."""
    return g * (o // g * r + r * (c // g) * k) + (o if bias else 0)


@pytest.mark.parametrize(("rank", "r"), [(1, 1), (3, 3), (9, 4), (0.5, 2), (1.0, 4)])
def test_parameter_counts_follow_the_closed_form(rank: int | float, r: int) -> None:
    """Grouped convs 8 -> 8 in 2 groups, 3x3: full rank min(8/2, 8/2 * 9) = 4; an int is capped there, a
    fraction is of it."""
    model = stack(c=8, n=3, groups=2)  # conv1 8->8 g2 3x3 no bias; conv2 8->8 g2 3x3 bias
    x = torch.randn(1, 3, 8, 8)
    new, rep = reuse.convert(model, shuffle=False, delta_rank=rank, example_inputs=x, report=True)
    per_use = by_hand(8, 8, 9, 2, r, bias=False) + by_hand(8, 8, 9, 2, r, bias=True)
    run = rep.converted[0]
    assert run.params_deltas == 3 * per_use
    shared = 8 * 4 * 9 + 8 * 4 * 9 + 8  # two grouped 3x3 convs, one bias
    norms = 3 * 2 * 2 * 8  # two BatchNorms per use
    assert run.params_after == shared + norms + 3 * per_use == sum(p.numel() for p in new[1].parameters())
    assert f"{run.params_deltas:,} in deltas" in str(rep)


def test_helpers_count_like_the_closed_form() -> None:
    conv = nn.Conv2d(12, 6, (3, 5), groups=3)
    assert full_rank(conv) == min(6 // 3, 4 * 15) == 2
    assert delta_params(conv, 2) == by_hand(6, 12, 15, 3, 2, bias=True)
    assert resolve_rank(0.5, nn.Conv2d(16, 16, 3)) == 8 and resolve_rank(99, conv) == 2
    assert delta_params(nn.Linear(10, 4), 3) == 3 * (4 + 10) + 4


def test_gradients_reach_every_delta() -> None:
    torch.manual_seed(0)
    model = randomize(stack()).train()
    x = torch.randn(2, 3, 8, 8)
    new = reuse.convert(model, shuffle=False, init="mean", delta_rank=2, example_inputs=x).train()
    new(x).square().mean().backward()
    deltas = [m for m in new.modules() if isinstance(m, LowRankConv)]
    assert len(deltas) == 4 * 2
    for d in deltas:
        assert d.A.grad is not None and d.B.grad is not None and d.B.grad.abs().sum() > 0 and d.A.grad.abs().sum() > 0
    assert new[1].uses[0].conv1.base.weight.grad is not None


# ----------------------------------------------------------------------------------------------------------
# What a model with deltas goes through.


@pytest.fixture
def relaxed() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = randomize(stack()).eval()
    x = torch.randn(2, 3, 8, 8)
    return model, reuse.convert(model, shuffle=False, init="mean", delta_rank=2, example_inputs=x).eval(), x


def test_state_dict_round_trip(relaxed: tuple[nn.Module, nn.Module, torch.Tensor]) -> None:
    _, new, x = relaxed
    other = reuse.convert(randomize(stack(), seed=9), shuffle=False, delta_rank=2, example_inputs=x).eval()
    buf = io.BytesIO()
    torch.save(new.state_dict(), buf)
    buf.seek(0)
    other.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    torch.testing.assert_close(outputs(other, x), outputs(new, x))
    keys = list(new.state_dict())
    assert "1.uses.0.conv1.base.weight" in keys and "1.uses.1.conv1.base.weight" not in keys  # shared once
    assert "1.uses.3.conv1.A" in keys and "1.uses.3.conv1.B" in keys  # per use


def test_deepcopy_keeps_the_sharing(relaxed: tuple[nn.Module, nn.Module, torch.Tensor]) -> None:
    _, new, x = relaxed
    twin = copy.deepcopy(new)
    uses = twin[1].uses
    assert uses[2].conv1.base is uses[0].conv1.base and uses[2].conv1 is not uses[0].conv1
    assert uses[0].conv1.base is not new[1].uses[0].conv1.base
    torch.testing.assert_close(outputs(twin, x), outputs(new, x))


def test_fx_trace_and_export(relaxed: tuple[nn.Module, nn.Module, torch.Tensor]) -> None:
    _, new, x = relaxed
    traced = torch.fx.symbolic_trace(new)
    torch.testing.assert_close(outputs(traced, x), outputs(new, x))
    exported = torch.export.export(new, (x,))
    torch.testing.assert_close(exported.module()(x), outputs(new, x), rtol=1e-6, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)
        scripted = torch.jit.script(new)
    torch.testing.assert_close(outputs(scripted, x), outputs(new, x), rtol=1e-6, atol=1e-6)


def test_optimize_for_inference_folds_each_use_with_its_own_weight(
    relaxed: tuple[nn.Module, nn.Module, torch.Tensor],
) -> None:
    _, new, x = relaxed
    fast = reuse.optimize_for_inference(new)
    torch.testing.assert_close(outputs(fast, x), outputs(new, x), rtol=1e-4, atol=1e-5)
    convs = [fast[1].uses[i].conv1 for i in range(4)]
    assert all(type(c) is nn.Conv2d for c in convs)  # deltas merged, BatchNorm folded: plain convs
    assert len({id(c.weight) for c in convs}) == 4  # the deltas make the weights differ: one per use
    assert all(isinstance(fast[1].uses[i].bn1, nn.Identity) for i in range(4))


def test_the_model_handed_in_is_never_modified() -> None:
    torch.manual_seed(0)
    model = randomize(stack()).train()
    before = Snapshot.of(model)
    reuse.convert(model, init="mean", delta_rank=1.0, example_inputs=torch.randn(1, 3, 8, 8))
    assert before.differences(model) == []
    block = Residual(8)
    before = Snapshot.of(block)
    reuse.wrap(block, n=3, delta_rank=2)
    assert before.differences(block) == [] and type(block.conv1) is nn.Conv2d


# ----------------------------------------------------------------------------------------------------------
# wrap / LayerReuse with deltas.


def test_wrap_with_deltas_starts_as_plain_reuse_and_counts_once() -> None:
    torch.manual_seed(0)
    block = randomize(Residual(8)).eval()
    plain = reuse.wrap(copy.deepcopy(block), n=3, shuffle=False)
    relaxed = reuse.wrap(copy.deepcopy(block), n=3, shuffle=False, delta_rank=2).eval()
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(relaxed(x), plain.eval()(x))  # B = 0: no change yet
    per_use = by_hand(8, 8, 9, 1, 2, bias=False) + by_hand(8, 8, 9, 1, 2, bias=True)
    assert sum(p.numel() for p in relaxed.parameters()) == sum(p.numel() for p in plain.parameters()) + 3 * per_use
    assert "delta_rank=2" in repr(relaxed)


def test_add_deltas_later_equals_deltas_at_construction() -> None:
    torch.manual_seed(0)
    block = randomize(Residual(8)).eval()
    at_once = reuse.wrap(copy.deepcopy(block), n=3, shuffle=False, delta_rank=2).eval()
    later = reuse.wrap(copy.deepcopy(block), n=3, shuffle=False).eval()
    assert later.shared_layer_paths() == ["conv1", "conv2"]  # Residual: two convs, both shared
    later.add_deltas(2)
    assert later.delta_rank == 2 and [sorted(later.deltas(i)) for i in range(3)] == [["conv1", "conv2"]] * 3
    assert sum(p.numel() for p in later.parameters()) == sum(p.numel() for p in at_once.parameters())
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(later(x), at_once(x))
    with pytest.raises(ReuseError, match=r"add_deltas: this block already has deltas \(delta_rank=2\)"):
        later.add_deltas(1)
    with pytest.raises(ReuseError, match="LayerReuse.add_deltas: delta_rank must be"):
        later.add_deltas(-1)


def test_a_conv_under_two_names_gets_one_delta_per_use() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.again = self.conv
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.again(self.conv(x)))  # (B, C, H, W)

    m = LayerReuse(Twice(), n=2, shuffle=False, delta_rank=1)
    for use in m.uses:
        assert isinstance(use.conv, LowRankConv) and use.again is use.conv
    assert m.uses[0].conv is not m.uses[1].conv and m.uses[0].conv.base is m.uses[1].conv.base


@pytest.mark.parametrize("rank", [-1, 1.5, float("nan"), "2", True, None])
def test_bad_ranks_are_reuse_errors(rank: object) -> None:
    with pytest.raises(ReuseError, match="delta_rank must be"):
        reuse.wrap(Residual(8), n=2, delta_rank=rank)
    with pytest.raises(ReuseError, match="delta_rank must be"):
        reuse.convert(stack(), delta_rank=rank, example_inputs=torch.randn(1, 3, 8, 8))


def test_deltas_need_the_layer_level() -> None:
    with pytest.raises(ReuseError, match="takes level='layer'"):
        reuse.convert(stack(), level="filter", delta_rank=2)
