"""Hidden channel groups and their alignment (reuse.align, reuse.fx.fit.align_blocks)."""

from __future__ import annotations

import copy

import pytest
import torch
from _helpers import Residual
from _zoo import BLOCKS, randomize
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from reuse import ReuseError
from reuse.align import assignment, hidden_groups, match_weights, permute_group
from reuse.fx.fit import align_blocks


def _block(name: str, seed: int) -> nn.Module:
    """A fresh block of the registry with trained-looking BatchNorms, in eval mode."""
    torch.manual_seed(seed)
    return randomize(BLOCKS[name].build(), seed).eval()


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_groups_are_the_ones_counted_by_hand(name: str) -> None:
    found = tuple((g.producer, g.consumers) for g in hidden_groups(BLOCKS[name].build()))
    assert found == BLOCKS[name].groups


@pytest.mark.parametrize("name", sorted(BLOCKS))
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_a_permutation_of_hidden_channels_never_changes_the_block(name: str, seed: int) -> None:
    block = _block(name, seed)
    x = torch.randn(BLOCKS[name].shape)
    with torch.no_grad():
        before = block(x)
        g = torch.Generator().manual_seed(seed)
        moved = 0
        for group in hidden_groups(block):
            perm = torch.randperm(group.channels, generator=g)
            moved += int(not torch.equal(perm, torch.arange(group.channels)))
            permute_group(block, group, perm)
        torch.testing.assert_close(block(x), before, rtol=1e-4, atol=1e-5)
    if BLOCKS[name].groups:
        assert moved, "the permutation must move something for the check to mean anything"


@pytest.mark.parametrize("name", ["residual", "tv_bottleneck", "tv_inverted_residual", "vgg_pair", "mlp"])
def test_weight_matching_undoes_a_permutation(name: str) -> None:
    """Block 1 is block 0 with its hidden channels shuffled and a little noise: matching puts them back."""
    a = _block(name, 0)
    b = copy.deepcopy(a)
    groups = hidden_groups(a)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.01 * p.std() * torch.randn(p.shape, generator=g))
        for group in groups:
            permute_group(b, group, torch.randperm(group.channels, generator=g))
    match_weights([a, b], groups)
    for group in groups:
        wa, wb = a.get_submodule(group.producer).weight, b.get_submodule(group.producer).weight
        assert (wa - wb).abs().max() < 0.1 * wa.abs().max(), f"{group.producer} not aligned back"


def test_activation_matching_undoes_a_permutation() -> None:
    """Residual blocks whose branch is small pass their input on nearly unchanged, so block 1 sees nearly what
    block 0 saw: the correlation of their hidden channels finds the permutation."""
    torch.manual_seed(0)
    a = randomize(Residual(8)).eval()
    with torch.no_grad():
        a.bn2.weight.mul_(0.01)
        a.bn2.bias.mul_(0.01)
    b = copy.deepcopy(a)
    group = hidden_groups(a)[0]
    perm = torch.tensor([3, 1, 7, 0, 2, 6, 4, 5])
    permute_group(b, group, perm)
    inputs = [torch.randn(16, 8, 6, 6) for _ in range(2)]
    assert align_blocks([a, b], "activations", inputs) == 1
    torch.testing.assert_close(b.conv1.weight, a.conv1.weight)
    torch.testing.assert_close(b.bn1.running_mean, a.bn1.running_mean)


def test_assignment_is_the_best_permutation() -> None:
    sim = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.2, 0.1], [0.0, 0.3, 0.7]])
    perm = assignment(sim)
    assert perm.tolist() == [1, 0, 2]  # row 1 -> column 0, row 0 -> column 1, row 2 -> column 2


def test_permute_group_refuses_a_non_permutation() -> None:
    block = Residual(4)
    group = hidden_groups(block)[0]
    with pytest.raises(ReuseError, match=r"permutation of range\(4\).*conv1"):
        permute_group(block, group, torch.tensor([0, 0, 1, 2]))


def test_untraceable_block_has_no_groups() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x) if x.sum() > 0 else x  # data-dependent control flow: FX cannot trace it

    assert hidden_groups(Branchy()) == []
