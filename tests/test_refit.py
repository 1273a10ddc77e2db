"""reuse.refit: the layers of a changed network fitted, in call order, to what their twins computed."""

from __future__ import annotations

import copy

import pytest
import torch
from _helpers import Residual, Snapshot
from _zoo import randomize
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import reuse
from reuse import ReuseError
from reuse.refitting import twins


def _with_bias(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)  # (N, D + 1)


@settings(max_examples=10, deadline=None)
@given(d_in=st.integers(2, 6), d_mid=st.integers(2, 6), pruned=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_a_linear_layer_is_the_least_squares_map_onto_its_twins_outputs(
    d_in: int, d_mid: int, pruned: int, seed: int
) -> None:
    """The oracle is torch.linalg.lstsq from the rows the layer now receives (with a column of ones for its bias)
    to what its twin computed, written here from the definition. The layer before may have another width (a
    pruned layer)."""
    torch.manual_seed(seed)
    ref = nn.Sequential(nn.Linear(d_in, d_mid), nn.Tanh(), nn.Linear(d_mid, 3)).eval()
    net = nn.Sequential(nn.Linear(d_in, pruned), nn.Tanh(), nn.Linear(pruned, 3)).eval()
    x = torch.randn(80, d_in)
    out = reuse.refit(net, ref, x)
    with torch.no_grad():
        rows = _with_bias(torch.tanh(net[0](x)).double())  # (80, pruned + 1): what the head now receives
        target = ref(x).double()  # (80, 3)
    want = torch.linalg.lstsq(rows, target).solution.T  # (3, pruned + 1)
    got = torch.cat([out[2].weight, out[2].bias[:, None]], 1).detach().double()
    residual = lambda w: float((rows @ w.T - target).pow(2).sum())  # noqa: E731
    gram = rows.T @ rows  # (D, D)
    ridged = gram + 1e-5 * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)  # the documented ridge
    torch.testing.assert_close(got, torch.linalg.solve(ridged, rows.T @ target).T, rtol=1e-3, atol=1e-3)
    assert residual(got) <= residual(want) * (1 + 5e-2) + 1e-6  # close to the least-squares fit
    before = torch.cat([net[2].weight, net[2].bias[:, None]], 1).detach().double()
    assert residual(want) < residual(before)  # and the law is not met by the head as it was
    assert torch.equal(out[0].weight, net[0].weight)  # its inputs are its twin's: kept


@settings(max_examples=10, deadline=None)
@given(
    c=st.sampled_from([2, 4, 6]),
    groups=st.sampled_from([1, 2]),
    kernel=st.sampled_from([1, 3]),
    stride=st.sampled_from([1, 2]),
    scale=st.floats(0.25, 4.0),
    seed=st.integers(0, 2**16),
)
def test_a_conv_after_a_rescaled_conv_takes_the_scale_back_exactly(
    c: int, groups: int, kernel: int, stride: int, scale: float, seed: int
) -> None:
    """A first conv multiplied by ``scale`` (an invertible change a conv after it can undo): the refitted second
    conv, grouped or not, makes the network compute what the reference computes."""
    torch.manual_seed(seed)

    def net() -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1, bias=False),
            nn.Conv2d(c, c, kernel, stride=stride, padding=kernel // 2, groups=groups),
        ).eval()

    ref, changed = net(), net()
    changed.load_state_dict(ref.state_dict())
    with torch.no_grad():
        changed[0].weight.mul_(scale)
    x = torch.randn(40, 3, 6, 6)
    out = reuse.refit(changed, ref, x)
    with torch.no_grad():
        torch.testing.assert_close(out(x), ref(x), rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(out[1].weight, ref[1].weight / scale, rtol=1e-3, atol=1e-3)


def test_layers_are_fitted_in_call_order_with_the_statistics_of_what_they_receive() -> None:
    """Each layer is fitted on the inputs the layers before it, as refitted, give it, with every BatchNorm
    re-estimated first: after the refit, the model's norms hold the statistics calibrate measures."""
    torch.manual_seed(0)
    ref = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 25, 4),
    )  # fmt: skip
    ref = randomize(ref, 0).eval()
    net = _copy_with_new_first_conv(ref)
    x = torch.randn(64, 3, 5, 5)
    out = reuse.refit(net, ref, x)
    assert not torch.equal(out[3].weight, net[3].weight) and not torch.equal(out[7].weight, net[7].weight)
    calibrated = reuse.calibrate(out, x)
    for a, b in zip(out.modules(), calibrated.modules()):
        if isinstance(a, nn.BatchNorm2d):
            torch.testing.assert_close(a.running_mean, b.running_mean)
            torch.testing.assert_close(a.running_var, b.running_var)
    with torch.no_grad():
        before = float((reuse.calibrate(net, x)(x) - ref(x)).pow(2).mean())
        after = float((out(x) - ref(x)).pow(2).mean())
    assert after < before


def _copy_with_new_first_conv(ref: nn.Sequential) -> nn.Sequential:
    net = copy.deepcopy(ref)
    with torch.no_grad():
        net[0].weight.copy_(torch.randn_like(net[0].weight))  # a changed layer: everything after sees new inputs
    return net


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), inplace=st.booleans())
def test_the_inputs_are_never_modified_unless_inplace(seed: int, inplace: bool) -> None:
    torch.manual_seed(seed)
    ref = randomize(nn.Sequential(Residual(4), Residual(4), nn.Flatten(), nn.Linear(4 * 16, 3)), seed).eval()
    net = _copy_with_new_first_conv_residual(ref)
    snap_ref, snap_net = Snapshot.of(ref), Snapshot.of(net)
    x = torch.randn(20, 4, 4, 4)
    out = reuse.refit(net, ref, x, inplace=inplace)
    assert not snap_ref.differences(ref)
    assert (out is net) == inplace
    assert bool(snap_net.differences(net)) == inplace
    assert [m.training for m in out.modules()] == [m.training for m in net.modules()]


def _copy_with_new_first_conv_residual(ref: nn.Module) -> nn.Module:
    net = copy.deepcopy(ref)
    with torch.no_grad():
        net[0].conv1.weight.mul_(-1.5)
    return net


def test_a_model_that_reuses_keeps_its_shared_layers_and_refits_its_head() -> None:
    """A LayerReuse calls its shared convs once per use: they have no single twin and are left alone; the head
    after them is refitted."""
    torch.manual_seed(0)
    block = randomize(Residual(4), 0)
    ref = nn.Sequential(reuse.wrap(block, n=3, shuffle=False), nn.Flatten(), nn.Linear(64, 3)).eval()
    net = nn.Sequential(reuse.wrap(randomize(Residual(4), 1), n=3, shuffle=False), nn.Flatten(), nn.Linear(64, 3))
    net.load_state_dict(ref.state_dict())
    with torch.no_grad():
        net[0].uses[0].conv1.weight.mul_(0.5)
    net.eval()
    x = torch.randn(30, 4, 4, 4)
    out = reuse.refit(net, ref, x)
    assert torch.equal(out[0].uses[0].conv1.weight, net[0].uses[0].conv1.weight)
    assert not torch.equal(out[2].weight, net[2].weight)


def test_a_layer_called_twice_is_left_alone() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.fc = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.tanh(self.fc(torch.tanh(self.first(x)))))

    torch.manual_seed(0)
    ref, net = Twice().eval(), Twice().eval()
    net.fc.load_state_dict(ref.fc.state_dict())
    out = reuse.refit(net, ref, torch.randn(20, 4))
    assert torch.equal(out.fc.weight, ref.fc.weight)


def test_twins_need_the_same_name_kind_and_outputs() -> None:
    a = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1), nn.Conv2d(4, 4, 3, stride=2), nn.Linear(4, 2))
    b = nn.Sequential(nn.Conv2d(3, 6, 3), nn.Conv2d(6, 4, 1), nn.Conv2d(4, 4, 3), nn.Linear(3, 2))
    assert twins(b, a) == ["1", "3"]  # 0: fewer outputs; 2: another stride; 3: fewer inputs only
    c = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"))
    assert twins(c, nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"))) == []


def test_refit_errors_name_the_problem() -> None:
    ref = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(ReuseError, match=r"refit: no layer of Sequential has a twin in the reference"):
        reuse.refit(nn.Sequential(nn.Linear(4, 5)), ref, torch.randn(8, 4))
    with pytest.raises(ReuseError, match=r"refit: data yielded no batch"):
        reuse.refit(nn.Sequential(nn.Linear(4, 3)), ref, [])
    with pytest.raises(ReuseError, match=r"refit: the model \(Sequential\) failed on a batch of shape \(8, 5\)"):
        reuse.refit(nn.Sequential(nn.Linear(4, 3)), ref, torch.randn(8, 5))
    with pytest.raises((ReuseError, TypeError), match=r"refit"):
        reuse.refit("model", ref, torch.randn(8, 4))  # type: ignore[arg-type]
    with pytest.raises(ReuseError, match=r"inplace must be True or False"):
        reuse.refit(nn.Sequential(nn.Linear(4, 3)), ref, torch.randn(8, 4), inplace="yes")  # type: ignore[arg-type]
