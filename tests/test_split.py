"""The fp32 export form of LruBlock (reuse/models/_split.py): one use split by the parity of its depthwise channels
computes the paper's block, whatever the norms, widths, groups and shuffle; the deploy hook that puts it in place.

The reference is the paper's block (multiplier-2 depthwise conv, the shuffle as concatenate + view + permute),
written in tests/_helpers.py, never the code under test.
"""

from __future__ import annotations

import torch
from _helpers import paper_block, paper_shuffle
from _zoo import randomize
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import reuse
from reuse.deploy._export import export_forms
from reuse.models import LruBlock, LruNet
from reuse.models._split import SplitLruUse


@st.composite
def blocks(draw: st.DrawFn) -> tuple[LruBlock, int, int, bool | None]:
    """An eval-mode LruBlock of random width and pointwise groups, with trained-looking BatchNorms that are
    kept as they are, folded into the convs (``optimize_for_inference``) or made per-channel affine maps
    (``share_weights=True``); a batch size and a shuffle (``None``: no shuffle, else swap_halves)."""
    groups = draw(st.sampled_from([1, 2, 4, 8]))
    channels = groups * draw(st.integers(1, 4)) * 2  # even: the shuffle of 2 groups
    block = randomize(LruBlock(channels, pw_groups=groups), seed=draw(st.integers(0, 2**16))).eval()
    with torch.no_grad():
        block.dw.weight.normal_(generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
    kind = draw(st.sampled_from(["batchnorm", "folded", "affine"]))
    if kind == "folded":
        block = reuse.optimize_for_inference(nn.Sequential(block), channels_last=False)[0]
        assert isinstance(block.dw_bn, nn.Identity) and block.dw.bias is not None
    elif kind == "affine":
        block = reuse.optimize_for_inference(reuse.wrap(block, n=2), channels_last=False, share_weights=True).uses[1]
        assert isinstance(block.dw_bn, reuse.optimize.ChannelAffine)
    return block, draw(st.integers(1, 3)), channels, draw(st.sampled_from([None, False, True]))


@settings(max_examples=40, deadline=None)
@given(blocks())
def test_the_split_use_computes_the_paper_block(case: tuple) -> None:
    block, batch, channels, swap = case
    x = torch.randn(batch, channels, 5, 4)
    shuffle = None if swap is None else (2, swap)
    split = block.export_form()
    assert isinstance(split, SplitLruUse)
    with torch.no_grad():
        expected = paper_block(block, x if swap is None else paper_shuffle(x, 2, swap))
        got = split(x, shuffle=shuffle)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_no_split_form_in_training_or_for_other_norms() -> None:
    block = LruBlock(16)
    assert block.train().export_form() is None
    block.eval().pw_bn = nn.GroupNorm(4, 16)  # not a per-channel affine map of the conv's output alone
    assert block.export_form() is None


def test_the_split_form_does_not_touch_the_block() -> None:
    block = randomize(LruBlock(16)).eval()
    before = {k: v.clone() for k, v in block.state_dict().items()}
    SplitLruUse(block)(torch.randn(2, 16, 3, 3), shuffle=(2, True))
    assert all(torch.equal(v, before[k]) for k, v in block.state_dict().items())


def test_export_forms_replaces_every_use_and_every_path_to_it() -> None:
    model = randomize(LruNet(width_mult=0.25, reuse=3)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    shared = model.stages[0].uses[1]
    model.extra = nn.ModuleList([shared])  # a second path to one use
    assert export_forms(model) == 4 * 3
    assert not [m for m in model.modules() if isinstance(m, LruBlock)]
    assert model.extra[0] is model.stages[0].uses[1]  # both paths lead to the one replacement
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)
