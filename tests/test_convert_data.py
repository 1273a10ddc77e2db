"""reuse.fx.convert with calibration data: alignment, the closed-form fit, re-estimated statistics, a budget."""

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
from reuse.fx.fit import fit_shared, refine_layers, weighted_low_rank
from reuse.models import LruNet


def stack(blocks: int = 4, width: int = 8, seed: int = 0) -> nn.Sequential:
    """A small trained-looking network: stem, ``blocks`` residual blocks of different weights, head."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        *[Residual(width) for _ in range(blocks)],
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, 5),
    )
    return randomize(net, seed).eval()


@pytest.fixture(scope="module")
def data() -> torch.Tensor:
    return torch.randn(48, 3, 6, 6, generator=torch.Generator().manual_seed(1))


def test_full_rank_fit_is_the_model_exactly(data: torch.Tensor) -> None:
    model = stack()
    new, rep = reuse.fx.convert(model, data=data, delta_rank=1.0, calibrate=False, report=True)
    (run,) = rep.converted
    assert (run.aligned, run.fitted, run.rank) == (1, 2, 1.0)  # Residual: one hidden group, two shared convs
    with torch.no_grad():
        torch.testing.assert_close(new(data), model(data), rtol=1e-4, atol=1e-4)


def test_the_model_handed_in_is_untouched(data: torch.Tensor) -> None:
    model = stack().train()
    snap = Snapshot.of(model)
    reuse.fx.convert(model, data=data, delta_rank=2)
    assert not snap.differences(model)


def test_fitted_rank_0_is_closer_than_the_mean_on_the_calibration_data(data: torch.Tensor) -> None:
    model = stack()
    with torch.no_grad():
        ref = model(data)
        errors = {
            init: float((reuse.fx.convert(model, data=data, init=init, calibrate=False)(data) - ref).pow(2).mean())
            for init in ("mean", "fit")
        }
    assert errors["fit"] < errors["mean"], errors


def _kl(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean KL(softmax(ref) || softmax(out)) per input, written out here rather than taken from the library."""
    p, logq = ref.double().softmax(1), out.double().log_softmax(1)
    return float((p * (p.log() - logq)).sum(1).mean())


@pytest.mark.parametrize(("seed", "rank"), [(0, 0), (1, 0), (2, 1), (3, 2)])
def test_auto_init_takes_the_cheaper_of_mean_and_fit(data: torch.Tensor, seed: int, rank: int) -> None:
    model = stack(seed=seed)  # one run; 48 inputs: the costs are measured on the data calibrated on
    with torch.no_grad():
        ref = model(data)
        outs = {init: reuse.fx.convert(model, data=data, init=init, delta_rank=rank)(data) for init in ("mean", "fit")}
        auto, rep = reuse.fx.convert(model, data=data, init="auto", delta_rank=rank, report=True)
        got = auto(data)
    kl = {init: _kl(out, ref) for init, out in outs.items()}
    picked = min(kl, key=kl.get)
    torch.testing.assert_close(got, outs[picked], rtol=1e-5, atol=1e-5)
    (note,) = [n for n in rep.notes if n.startswith("init='auto'")]
    assert f": {picked} (cost mean {kl['mean']:.4f}, fit {kl['fit']:.4f})" in note, (note, kl)
    assert rep.options["init"] == "auto"


def test_auto_init_under_a_budget(data: torch.Tensor) -> None:
    model = stack(blocks=5)
    new, rep = reuse.fx.convert(model, data=data, init="auto", budget=0.8, report=True)
    assert rep.params_after <= 0.8 * rep.params_before or any("cannot be met" in n for n in rep.notes)
    assert [n for n in rep.notes if n.startswith("init='auto'")]
    assert new(data).shape == (48, 5)


def _objective(w: torch.Tensor, targets: list[torch.Tensor], covs: list[torch.Tensor]) -> float:
    return float(sum(torch.trace((w - t) @ c @ (w - t).T) for t, c in zip(targets, covs)))


def test_the_shared_weight_minimises_the_calibration_error() -> None:
    """The law behind init="fit": the fitted W minimises sum_i tr((W - W_i) C_i (W - W_i)^T); any step away
    from it (or the mean) costs more."""
    g = torch.Generator().manual_seed(0)
    targets = [nn.Linear(6, 4, bias=False) for _ in range(3)]
    xs = [torch.randn(200, 6, generator=g) * torch.rand(6, generator=g) * 3 for _ in range(3)]
    covs = [(x.T @ x).double()[None] for x in xs]  # (1, 6, 6)
    shared = nn.Linear(6, 4, bias=False)
    fit_shared(shared, [None, None, None], targets, covs)
    ws = [t.weight.detach().double() for t in targets]
    best = _objective(shared.weight.detach().double(), ws, [c[0] for c in covs])
    mean = _objective(torch.stack(ws).mean(0), ws, [c[0] for c in covs])
    assert best < mean
    for _ in range(5):
        step = 1e-2 * torch.randn(4, 6, generator=g, dtype=torch.float64)
        assert best <= _objective(shared.weight.detach().double() + step, ws, [c[0] for c in covs]) + 1e-9


@settings(max_examples=20, deadline=None)
@given(k=st.integers(2, 4), d=st.integers(2, 6), seed=st.integers(0, 2**16))
def test_the_refit_solves_least_squares_on_the_converted_inputs(k: int, d: int, seed: int) -> None:
    """The law behind refine_layers: a shared linear layer is refitted so that, on the inputs the CONVERTED uses
    give it (use i's input is use i-1's output), the uses reproduce what the original blocks computed on theirs;
    the oracle here is torch.linalg.lstsq on the stacked rows, not the library's normal equations."""
    g = torch.Generator().manual_seed(seed)
    blocks = [nn.Linear(d, d, bias=False) for _ in range(k)]
    with torch.no_grad():
        for b in blocks:
            b.weight.copy_(torch.randn(d, d, generator=g, dtype=torch.float64).float() / d**0.5)
    xs = [torch.randn(64, d, generator=g) for _ in range(2)]
    lr = reuse.LayerReuse.from_blocks(blocks, shuffle=False)
    start = lr.uses[0].weight.detach().double().clone()  # the first block's weight: what the uses run before
    refine_layers(lr.uses, [""], blocks, xs, sweeps=1)
    x = torch.cat(xs).double()  # (N, d)
    ins, outs, orig, conv = [], [], x, x
    for b in blocks:
        ins.append(conv)
        orig = orig @ b.weight.detach().double().T  # (N, d): what block i computed
        outs.append(orig)
        conv = conv @ start.T  # the converted chain as it stood before the refit
    want = torch.linalg.lstsq(torch.cat(ins), torch.cat(outs)).solution.T  # (d, d)
    torch.testing.assert_close(lr.uses[0].weight.detach().double(), want, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("sweeps", [0, -1, 1.5, True])
def test_the_refit_refuses_a_sweep_count_that_is_not_a_positive_int(sweeps: object) -> None:
    blocks = [nn.Linear(3, 3) for _ in range(2)]
    lr = reuse.LayerReuse.from_blocks(blocks, shuffle=False)
    with pytest.raises(ReuseError, match=r"refine_layers: sweeps must be a positive int"):
        refine_layers(lr.uses, [""], blocks, [torch.randn(4, 3)], sweeps=sweeps)  # type: ignore[arg-type]


def test_the_refit_leaves_each_norm_with_its_inputs_statistics_in_the_converted_chain() -> None:
    """After the refit, the BatchNorm after a refitted conv holds the per-channel mean and biased variance of what
    that conv gives in the converted uses (use i fed by uses 0..i-1, eval mode), computed here by running them."""
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()) for _ in range(3)]
    for b in blocks:
        randomize(b, seed=len(blocks))
        b.eval()
    lr = reuse.LayerReuse.from_blocks(blocks, shuffle=False).eval()
    xs = [torch.randn(8, 4, 5, 5) for _ in range(2)]
    assert refine_layers(lr.uses, ["0"], blocks, xs) == ["0"]
    with torch.no_grad():
        h = torch.cat(xs)  # (16, 4, 5, 5)
        for use in lr.uses:
            y = use[0](h)  # (16, 4, 5, 5): the shared conv's output in this use
            torch.testing.assert_close(use[1].running_mean, y.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(use[1].running_var, y.var((0, 2, 3), unbiased=False), rtol=1e-4, atol=1e-5)
            h = use(h)


def test_refitting_identical_blocks_keeps_them_exactly() -> None:
    """Blocks that are one block: on any inputs, the least-squares refit of each (grouped) conv is that conv."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False), nn.ReLU(), nn.Conv2d(8, 8, 1)).eval()
    blocks = [copy.deepcopy(block) for _ in range(3)]
    lr = reuse.LayerReuse.from_blocks(blocks, shuffle=False).eval()
    xs = [torch.randn(16, 8, 6, 6) for _ in range(2)]
    with torch.no_grad():
        ref = lr(xs[0])
        assert refine_layers(lr.uses, lr.shared_layer_paths(), blocks, xs, sweeps=2) == ["0", "2"]
        torch.testing.assert_close(lr(xs[0]), ref, rtol=1e-4, atol=1e-4)


class _Lin(nn.Module):
    """A block that is one linear map: the uses' chained inputs are then linear too, so lstsq is an oracle."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


@settings(max_examples=10, deadline=None)
@given(k=st.integers(2, 4), d=st.integers(2, 6), seed=st.integers(0, 2**16))
def test_fit_and_refit_are_least_squares_fits_of_the_chain(k: int, d: int, seed: int) -> None:
    """convert's init="fit" at rank 0 is lstsq from every block's input rows to its outputs; init="refit" is lstsq
    from the rows the fitted uses pass along (use i's input is use i-1's output) to the same outputs. Both oracles
    are torch.linalg.lstsq on the stacked rows, written here from the definitions."""
    torch.manual_seed(seed)
    net = nn.Sequential(*[_Lin(d) for _ in range(k)]).eval()
    x = torch.randn(64, d)
    got = {
        init: reuse.fx.convert(net, data=x, init=init, calibrate=False, example_inputs=x[:1])[0].uses[0].fc.weight
        for init in ("fit", "refit")
    }
    ins, outs, h = [], [], x.double()
    for block in net:
        ins.append(h)
        h = h @ block.fc.weight.detach().double().T  # (64, d): what block i computed
        outs.append(h)
    fit = torch.linalg.lstsq(torch.cat(ins), torch.cat(outs)).solution.T  # (d, d)
    chained, h = [], x.double()
    for _ in net:
        chained.append(h)
        h = h @ fit.T  # the fitted uses, chained
    refit = torch.linalg.lstsq(torch.cat(chained), torch.cat(outs)).solution.T  # (d, d)
    torch.testing.assert_close(got["fit"].detach().double(), fit, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got["refit"].detach().double(), refit, rtol=1e-4, atol=1e-4)


def test_theweighted_low_rank_delta_beats_the_plain_svd() -> None:
    g = torch.Generator().manual_seed(0)
    diff = torch.randn(1, 5, 7, generator=g, dtype=torch.float64)
    x = torch.randn(300, 7, generator=g, dtype=torch.float64) * torch.logspace(-1, 1, 7, dtype=torch.float64)
    cov = (x.T @ x)[None]  # (1, 7, 7)
    d = weighted_low_rank(diff, cov, 2)
    assert torch.linalg.matrix_rank(d[0]) == 2
    u, s, vh = torch.linalg.svd(diff[0])
    plain = (u[:, :2] * s[:2]) @ vh[:2]
    err = lambda m: float(torch.trace((diff[0] - m) @ cov[0] @ (diff[0] - m).T))  # noqa: E731
    assert err(d[0]) < err(plain)


def test_running_statistics_are_re_estimated(data: torch.Tensor) -> None:
    model = stack()
    new, rep = reuse.fx.convert(model, data=data, report=True)
    assert any("re-estimated on 48 calibration input(s)" in n for n in rep.notes)
    assert rep.options["images"] == 48 and rep.options["align"] == "weights"
    kept = reuse.fx.convert(model, data=data, calibrate=False)
    layer = next(m for m in new.modules() if isinstance(m, reuse.LayerReuse))
    same = next(m for m in kept.modules() if isinstance(m, reuse.LayerReuse))
    assert not torch.allclose(layer.uses[1].bn1.running_mean, same.uses[1].bn1.running_mean)


def test_budget_one_keeps_everything_and_a_small_budget_ties(data: torch.Tensor) -> None:
    model = stack(blocks=4)
    total = sum(p.numel() for p in model.parameters())
    same, rep = reuse.fx.convert(model, data=data, budget=1.0, report=True)
    assert rep.converted == [] and rep.params_after == total  # leaving a run as it is costs nothing
    assert "left as it is" in rep.runs[0].skipped
    # by hand: 4 Residual(8) blocks of 2 * (8*8*9) + 8 (conv2's bias) + 4 * 8 (two BNs) = 1,192 parameters each;
    # tied at rank 0: one set of convs (1,160) and 4 uses' BNs (4 * 32): saves 3 * 1,160 = 3,480
    assert total == 3 * 8 * 9 + 8 + 16 + 4 * 1192 + 8 * 5 + 5
    new, rep = reuse.fx.convert(model, data=data, budget=(total - 3480) / total, report=True)
    (run,) = rep.converted
    assert run.rank == 0 and run.cost is not None and run.cost >= 0
    assert rep.params_after == total - 3480
    assert any(n.startswith("budget: ") and "rank 1" in n for n in rep.notes)


def test_a_budget_that_cannot_be_met_takes_the_smallest_and_says_so(data: torch.Tensor) -> None:
    model = stack(blocks=2)
    new, rep = reuse.fx.convert(model, data=data, budget=0.1, report=True)
    assert rep.converted and rep.converted[0].rank == 0
    assert any("cannot be met" in n for n in rep.notes)


@pytest.mark.parametrize("init", [None, "auto", "refit"])
def test_a_model_that_already_reuses_is_kept_and_calibrated(init: str | None) -> None:
    torch.manual_seed(0)
    model = randomize(LruNet(reuse=2, width_mult=0.25)).eval()
    new, rep = reuse.fx.convert(model, data=torch.randn(8, 3, 32, 32), init=init, report=True)
    assert rep.converted == [] and any("kept" in n for n in rep.notes)
    assert not torch.allclose(new.stage1.uses[1].dw_bn.running_mean, model.stage1.uses[1].dw_bn.running_mean)
    new.train()(torch.randn(2, 3, 32, 32)).sum().backward()  # and it trains


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (dict(init="fit"), r"init='fit' needs calibration inputs"),
        (dict(init="auto"), r"init='auto' needs calibration inputs"),
        (dict(init="refit"), r"init='refit' needs calibration inputs"),
        (dict(init="best", data=torch.randn(4, 3, 6, 6)), r"init must be 'first', 'mean', 'fit' .* or 'auto'"),
        (dict(align="activations"), r"align='activations' needs calibration inputs"),
        (dict(budget=0.5), r"budget measures each choice on calibration inputs"),
        (dict(data=torch.randn(4, 3, 6, 6), budget=0.0), r"budget must be a fraction"),
        (dict(data=torch.randn(4, 3, 6, 6), budget=True), r"budget must be a fraction"),
        (dict(align="both"), r"align must be None, 'weights' or 'activations'"),
        (dict(data=torch.randn(4, 3, 6, 6), budget=0.5, delta_rank=2), r"budget chooses each run's delta rank"),
        (dict(data=torch.randn(4, 3, 6, 6), shuffle=True), r"pass shuffle=False"),
        (dict(data=torch.randn(4, 3, 6, 6), level="filter"), r"it takes level='layer'"),
        (dict(data=torch.randn(4, 3, 6, 6), images=0), r"images must be a positive int"),
        (dict(data=torch.randn(4, 3, 6, 6), calibrate="yes"), r"calibrate must be True or False"),
        (dict(data=torch.zeros(4, 3, 6, 6, dtype=torch.uint8)), r"convert: batch 0 of data is torch.uint8"),
    ],
)
def test_bad_options_are_refused(options: dict, match: str) -> None:
    with pytest.raises(ReuseError, match=match):
        reuse.fx.convert(stack(blocks=2), **options)


def test_weight_alignment_without_data_and_the_old_defaults() -> None:
    model = stack()
    plain = reuse.fx.convert(model)
    assert next(m for m in plain.modules() if isinstance(m, reuse.LayerReuse)).shuffle is not None  # shuffle stays on
    _, rep = reuse.fx.convert(model, align="weights", init="mean", report=True)
    assert rep.converted[0].aligned == 1 and rep.converted[0].fitted == 0


def test_refit_also_fits_the_head_to_the_models_outputs(data: torch.Tensor) -> None:
    """init="refit" ends by fitting the layers outside the runs (here the head) on what the converted network
    gives them: the head is the least-squares map (lstsq, with a column of ones for its bias) from its inputs in
    the converted network to the logits of the model handed in."""
    model = stack()
    new, rep = reuse.fx.convert(model, data=data, init="refit", report=True)
    assert any(n.startswith("init='refit': 1 layer(s) outside the runs refitted") and "(9)" in n for n in rep.notes)
    seen = {}
    head = new.get_submodule("9")  # the model's head keeps its name
    hook = head.register_forward_pre_hook(lambda _m, a: seen.__setitem__("x", a[0].detach().double()))
    with torch.no_grad():
        new(data)
        hook.remove()
        rows = torch.cat([seen["x"], torch.ones(len(data), 1, dtype=torch.float64)], 1)  # (48, 9)
        want = torch.linalg.lstsq(rows, model(data).double()).solution.T  # (5, 9)
    got = torch.cat([head.weight, head.bias[:, None]], 1).double()
    torch.testing.assert_close(rows @ got.T, rows @ want.T, rtol=1e-3, atol=1e-3)
    plain = reuse.fx.convert(model, data=data, init="refit", inplace=False)
    assert torch.equal(plain.get_submodule("9").weight, head.weight)  # deterministic


def test_refit_inplace_fits_to_the_model_as_it_was(data: torch.Tensor) -> None:
    model = stack()
    want = reuse.fx.convert(model, data=data, init="refit")
    got = reuse.fx.convert(model, data=data, init="refit", inplace=True)
    assert got is model
    with torch.no_grad():
        torch.testing.assert_close(got(data), want(data))
