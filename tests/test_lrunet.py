"""LruNet: the paper's tables, shapes, timm registration and the authors' released checkpoints.

Expected figures come from the paper (Tables 2, 5, 6 and the text) and from the authors' release README,
never from the code under test. Tests marked ``shared`` need ``../shared`` (checkpoints and data) and skip
when it is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from _helpers import to_official
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import reuse
from reuse import ReuseError
from reuse.models import LruNet, convert_official, load_official, read_official

# ----------------------------------------------------------------------------------------------------------
# The paper's tables: (table, N, width, classes, input channels, parameters in thousands as printed).
TABLE_2 = [
    ("cifar10", n, 1.0, 10, 3, k)
    for n, k in zip((1, 2, 4, 6, 8, 10, 12, 14, 16), (131, 137, 149, 160, 172, 183, 195, 206, 218))
]
TABLE_5 = [
    ("cifar100", n, 2.0, 100, 3, k)
    for n, k in zip((1, 2, 4, 6, 8, 10, 12, 14, 16), (514, 525, 549, 572, 595, 618, 641, 664, 687))
]
TABLE_6 = [
    ("fashion_mnist", n, 1.0, 10, 1, k) for n, k in zip((1, 2, 4, 6, 8, 10, 12), (130, 136, 148, 159, 171, 182, 194))
]
ROWS = TABLE_2 + TABLE_5 + TABLE_6


def _row_id(row: tuple) -> str:
    table, n, w, *_ = row
    return f"{table}-{n}-LruNet-{w:g}x"


def table1_params(n: int, width: float, classes: int, in_chans: int) -> int:
    """Parameters of N-LruNet-wx counted by hand from the paper's Table 1 (not from the code)."""
    stem = 64 if width in (1.0, 2.0) else int(64 * width)
    total = in_chans * 9 * stem + 2 * stem  # conv 3x3 (no bias) + BN
    for f in (int(c * width) for c in (64, 128, 256, 512)):
        total += 9 * 2 * f  # depthwise 3x3, F -> 2F, groups F
        total += f * (2 * f // 8)  # pointwise 2F -> F, 8 groups
        total += n * (2 * 2 * f + 2 * f)  # one BN pair per use
    head = int(256 * width)
    total += head * (int(512 * width) // 8) + 2 * head  # pointwise 8 groups + BN
    return total + head * classes + classes  # last conv, with bias


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def conv_params(model: nn.Module) -> int:
    """What the authors' main.py prints as convolution parameters: every Conv2d/Linear weight and bias."""
    return sum(p.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) for p in m.parameters())


@pytest.mark.parametrize("row", ROWS, ids=_row_id)
def test_parameters_match_the_papers_tables(row: tuple) -> None:
    _, n, width, classes, in_chans, paper_k = row
    model = LruNet(num_classes=classes, width_mult=width, reuse=n, in_chans=in_chans)
    count = n_params(model)
    assert count == table1_params(n, width, classes, in_chans)
    assert round(count / 1000) == paper_k


@pytest.mark.parametrize(("width", "classes", "paper_k"), [(1.0, 10, 125), (2.0, 100, 501)])
def test_convolution_parameters_of_14_lrunet(width: float, classes: int, paper_k: int) -> None:
    model = LruNet(num_classes=classes, width_mult=width, reuse=14)
    assert round(conv_params(model) / 1000) == paper_k


def unshared_params(n: int, width: float, classes: int, in_chans: int) -> int:
    """The same depth built from new layers (Table 4 of the paper): each of the n - 1 further uses adds its
    own depthwise and pointwise convs to the reused network's count (by hand from Table 1)."""
    convs = sum(9 * 2 * f + f * (2 * f // 8) for f in (int(c * width) for c in (64, 128, 256, 512)))
    return table1_params(n, width, classes, in_chans) + (n - 1) * convs


@pytest.mark.parametrize("n", [1, 2, 8])
def test_no_share_builds_new_layers_for_every_use(n: int) -> None:
    model = LruNet(reuse=n, share=False)
    assert n_params(model) == unshared_params(n, 1.0, 10, 3)
    weights = [use.pw.weight for use in model.stage2.uses]
    assert len({id(w) for w in weights}) == n  # nothing shared
    model(torch.rand(2, 3, 32, 32)).sum().backward()
    assert all(w.grad is not None for w in weights)


def test_no_share_at_8_uses_is_the_papers_902k_network() -> None:
    assert round(n_params(LruNet(reuse=8, share=False)) / 1000) == 902  # Table 4: the 67-deep net of new layers


@pytest.mark.parametrize("kwargs", [dict(share="no"), dict(share=1), dict(share=False, level="filter")])
def test_bad_share_is_a_reuse_error(kwargs: dict) -> None:
    with pytest.raises(ReuseError, match="share"):
        LruNet(**kwargs)


def test_shared_weights_are_counted_once() -> None:
    one, eight = LruNet(reuse=1), LruNet(reuse=8)
    bn_per_use = sum(6 * f for f in (64, 128, 256, 512))  # two BNs (weight + bias) of 2F and F channels
    assert n_params(eight) - n_params(one) == 7 * bn_per_use
    assert conv_params(eight) == conv_params(one)


# ----------------------------------------------------------------------------------------------------------
# Shapes and the timm-style model interface.
@pytest.mark.parametrize(("in_chans", "size"), [(1, 28), (3, 32)])
@pytest.mark.parametrize("width", [1.0, 2.0])
def test_forward_shapes(in_chans: int, size: int, width: float) -> None:
    model = LruNet(num_classes=7, width_mult=width, reuse=2, in_chans=in_chans).eval()
    x = torch.randn(3, in_chans, size, size)
    feats = model.forward_features(x)
    assert feats.shape == (3, int(512 * width), 2, 2)  # both sizes end on the 2x2 map
    assert model.forward_head(feats, pre_logits=True).shape == (3, int(256 * width))
    assert model(x).shape == (3, 7)


def test_stem_follows_the_authors_at_1x_and_2x_and_scales_elsewhere() -> None:
    assert LruNet(width_mult=1.0).stem[0].out_channels == 64
    two = LruNet(width_mult=2.0)
    assert two.stem[0].out_channels == 64 and isinstance(two.stem_concat, reuse.models.SelfConcat)
    half = LruNet(width_mult=0.5)
    assert half.stem[0].out_channels == 32 and isinstance(half.stem_concat, nn.Identity)


@pytest.mark.parametrize("width", [0.25, 0.5, 1.5, 3.0])
def test_other_widths(width: float) -> None:
    model = LruNet(width_mult=width, reuse=2).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert n_params(model) == table1_params(2, width, 10, 3)


@pytest.mark.parametrize("width", [0, -1.0, 0.3, 0.1, 1.1, "1x", None, True])
def test_bad_width_is_a_reuse_error(width: object) -> None:
    with pytest.raises(ReuseError, match="width_mult"):
        LruNet(width_mult=width)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "name"), [({"reuse": 0}, "reuse"), ({"reuse": 2.0}, "reuse"), ({"in_chans": 0}, "in_chans")]
)
def test_bad_arguments_are_reuse_errors(kwargs: dict, name: str) -> None:
    with pytest.raises(ReuseError, match=name):
        LruNet(**kwargs)


def test_reset_classifier_and_no_classifier() -> None:
    model = LruNet(reuse=1).eval()
    x = torch.randn(2, 3, 32, 32)
    model.reset_classifier(5)
    assert model(x).shape == (2, 5) and model.get_classifier().out_channels == 5
    model.reset_classifier(0)
    assert model(x).shape == (2, 256)
    assert LruNet(num_classes=0, reuse=1).eval()(x).shape == (2, 256)


def test_backward_reaches_every_parameter() -> None:
    model = LruNet(reuse=2, drop_rate=0.0)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


# ----------------------------------------------------------------------------------------------------------
# timm.
NAMES = {"lrunet1_1x": (1, 1.0), "lrunet1_2x": (1, 2.0), "lrunet8_1x": (8, 1.0), "lrunet10_1x": (10, 1.0),
         "lrunet14_1x": (14, 1.0), "lrunet14_2x": (14, 2.0)}  # fmt: skip
RELEASED = {  # the authors' README: file -> (timm name with tag, reported accuracy)
    "cifar10-lru1-ckpt-08391.t7": ("lrunet1_1x.cifar10", 83.91),
    "cifar10-lru14-ckpt-08934.t7": ("lrunet14_1x.cifar10", 89.34),
    "cifar100-lru1-2x-ckpt-06322.t7": ("lrunet1_2x.cifar100", 63.22),
    "cifar100-lru14-2x-ckpt-06884.t7": ("lrunet14_2x.cifar100", 68.84),
    "fashionmnist-lru1-ckpt-09117.t7": ("lrunet1_1x.fashion_mnist", 91.17),
    "fashionmnist-lru10-ckpt-09346.t7": ("lrunet10_1x.fashion_mnist", 93.46),
}


def _run(code: str) -> str:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout


@pytest.mark.parametrize(
    "code",
    [
        "import reuse.models, timm; print(timm.create_model('lrunet14_1x').reuse)",
        "import reuse, timm; reuse.models; print(timm.create_model('lrunet14_1x').reuse)",  # first use imports it
        "from reuse.models import LruNet; import timm; print(timm.create_model('lrunet14_1x').reuse)",
    ],
)
def test_reuse_models_registers_with_timm(code: str) -> None:
    assert _run(code).strip() == "14"


def test_plain_import_reuse_does_not_import_timm() -> None:
    """The core is light: timm (about 1.7 s to import) comes only with reuse.models."""
    assert _run("import sys, reuse; print('timm' in sys.modules, 'reuse.models' in sys.modules)").split() == [
        "False",
        "False",
    ]


def test_import_reuse_registers_the_names() -> None:
    assert set(NAMES) | {"lrunet"} <= set(timm.list_models("lrunet*"))
    assert {name for name, _ in RELEASED.values()} == set(timm.list_pretrained("lrunet*"))


@pytest.mark.parametrize("name", sorted(NAMES))
def test_timm_create_model(name: str) -> None:
    n, width = NAMES[name]
    model = timm.create_model(name, num_classes=10, in_chans=3, drop_rate=0.3)
    assert isinstance(model, LruNet) and (model.reuse, model.width_mult, model.drop_rate) == (n, width, 0.3)
    assert n_params(model) == table1_params(n, width, 10, 3)


def test_timm_generic_name_takes_any_n_and_width() -> None:
    model = timm.create_model("lrunet", reuse=3, width_mult=0.5, num_classes=4, in_chans=1)
    assert (model.reuse, model.width_mult, model.in_chans) == (3, 0.5, 1)
    assert model.eval()(torch.randn(1, 1, 28, 28)).shape == (1, 4)
    with pytest.raises(ReuseError, match="lrunet"):
        timm.create_model("lrunet14_1x", reuse=3)


def test_timm_features_only() -> None:
    model = timm.create_model("lrunet1_2x", features_only=True, out_indices=(1, 2, 3, 4))
    shapes = [tuple(f.shape) for f in model(torch.randn(1, 3, 32, 32))]
    assert shapes == [(1, 128, 16, 16), (1, 256, 8, 8), (1, 512, 4, 4), (1, 1024, 4, 4)]


@pytest.mark.parametrize("file", sorted(RELEASED))
def test_pretrained_cfgs_point_at_the_authors_release(file: str) -> None:
    name, _ = RELEASED[file]
    cfg = timm.get_pretrained_cfg(name)
    assert cfg.url == f"https://github.com/okankop/CNN-layer-reuse/raw/master/pretrained/{file}"
    assert cfg.license == "mit" and cfg.mean == (0.0,) * cfg.input_size[0] and set(cfg.std) == {1.0}
    assert cfg.num_classes == (100 if "cifar100" in file else 10)
    assert cfg.input_size == ((1, 28, 28) if "fashion" in file else (3, 32, 32))


# ----------------------------------------------------------------------------------------------------------
# The authors' checkpoint format, built here from Table 1 and their naming, and an unrolled reading of it.
def unrolled_forward(sd: dict[str, Tensor], x: Tensor) -> Tensor:
    """The paper's network read straight off the authors' tensors, in plain torch (eval mode)."""
    sd = {k.removeprefix("module."): v for k, v in sd.items()}

    def bn(t: Tensor, p: str) -> Tensor:
        w, b, m, v = (sd[f"{p}.{s}"] for s in ("weight", "bias", "running_mean", "running_var"))
        return F.batch_norm(t, m, v, w, b, training=False, eps=1e-5)

    def shuffle(t: Tensor) -> Tensor:  # exchange the halves, then the 2-group shuffle
        b, c, h, w = t.shape
        t = torch.cat([t[:, c // 2 :], t[:, : c // 2]], 1)
        return t.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)

    x = F.relu(bn(F.conv2d(x, sd["features.0.weight"], stride=2, padding=1), "features.1"))
    for k in (1, 2, 3, 4):
        f = sd[f"stage{k}.pw.weight"].shape[0]
        if x.shape[1] != f:
            x = torch.cat([x, x], 1)  # the 2x stem, and the concatenation after stages 1-3
        uses = len({key.split(".")[2] for key in sd if key.startswith(f"stage{k}.dw_bn_list.")})
        for i in range(uses):
            if i:
                x = shuffle(x)
            y = bn(F.conv2d(x, sd[f"stage{k}.dw.weight"], padding=1, groups=f), f"stage{k}.dw_bn_list.{i}")
            y = bn(F.conv2d(y, sd[f"stage{k}.pw.weight"], groups=8), f"stage{k}.pw_bn_list.{i}")
            x = F.relu(y + x)
        if k != 3:
            x = F.max_pool2d(x, 3, stride=2, padding=1)
    x = F.relu(bn(F.conv2d(x, sd["classifier.0.weight"], groups=8), "classifier.1"))
    x = F.relu(F.conv2d(x, sd["classifier.4.weight"], sd["classifier.4.bias"]))
    return x.mean((2, 3))


def _randomised(model: LruNet, seed: int = 0) -> LruNet:
    """Give every BN non-trivial statistics so that a wrong mapping shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


@pytest.fixture
def synthetic(tmp_path: Path) -> tuple[LruNet, Path]:
    """A 3-LruNet-2x, 1 input channel, 7 classes, saved the way the authors saved theirs."""
    model = _randomised(LruNet(num_classes=7, width_mult=2.0, reuse=3, in_chans=1))
    path = tmp_path / "synthetic-lru3-2x.t7"
    torch.save({"net": to_official(model), "acc": 12.5, "epoch": 3}, path)
    return model, path


def test_load_official_round_trip(synthetic: tuple[LruNet, Path]) -> None:
    source, path = synthetic
    ckpt = read_official(path)
    assert (ckpt.acc, ckpt.epoch) == (12.5, 3)
    assert ckpt.config == {"num_classes": 7, "width_mult": 2.0, "reuse": 3, "in_chans": 1}
    model = load_official(path, drop_rate=0.7)
    assert not model.training and model.drop_rate == 0.7
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        expected = unrolled_forward(ckpt.state_dict, x)
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(source(x), expected, rtol=1e-4, atol=1e-5)


def test_timm_loads_a_local_file(synthetic: tuple[LruNet, Path]) -> None:
    source, path = synthetic
    # The generic name's config says 10 classes, 3 channels: tell timm what the file holds, or it drops the head.
    overlay = dict(file=str(path), num_classes=7, input_size=(1, 28, 28))
    model = timm.create_model("lrunet", reuse=3, width_mult=2.0, pretrained=True, pretrained_cfg_overlay=overlay)
    assert (model.num_classes, model.in_chans) == (7, 1)
    model.eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x))
    with pytest.raises(ReuseError, match=r"reuse=3.*missing stage1\.uses\.3\.dw_bn"):
        timm.create_model("lrunet", reuse=4, width_mult=2.0, pretrained=True, pretrained_cfg_overlay=overlay)


def test_load_official_missing_and_unexpected_keys(synthetic: tuple[LruNet, Path], tmp_path: Path) -> None:
    _, path = synthetic
    blob = torch.load(path, weights_only=True)
    del blob["net"]["module.stage3.pw_bn_list.1.running_var"]
    blob["net"]["module.stage3.extra.weight"] = torch.ones(1)
    bad = tmp_path / "bad.t7"
    torch.save(blob, bad)
    with pytest.raises(ReuseError, match=r"missing stage3\.uses\.1\.pw_bn\.running_var.*unexpected stage3\.extra"):
        load_official(bad)


def test_load_official_bad_files_and_arguments(synthetic: tuple[LruNet, Path], tmp_path: Path) -> None:
    _, path = synthetic
    with pytest.raises(ReuseError, match="no checkpoint file"):
        load_official(tmp_path / "absent.t7")
    corrupt = tmp_path / "corrupt.t7"
    corrupt.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ReuseError, match="could not read"):
        load_official(corrupt)
    foreign = tmp_path / "foreign.t7"
    torch.save({"weights": torch.ones(2)}, foreign)
    with pytest.raises(ReuseError, match="not an LruNet checkpoint"):
        load_official(foreign)
    with pytest.raises(ReuseError, match="reuse=5 disagrees"):
        load_official(path, reuse=5)
    with pytest.raises(ReuseError, match="unknown LruNet arguments"):
        load_official(path, depth=3)


def test_convert_official_names() -> None:
    renamed, unknown = convert_official(
        {"module.features.1.running_mean": 1, "stage4.pw.weight": 2, "module.classifier.4.bias": 3, "junk": 4}
    )
    assert renamed == {"stem.1.running_mean": 1, "stage4.uses.0.pw.weight": 2, "classifier.bias": 3}
    assert unknown == ["junk"]


@st.composite
def lrunet_configs(draw: st.DrawFn) -> dict:
    return dict(
        reuse=draw(st.integers(1, 3)),
        width_mult=draw(st.sampled_from([0.25, 0.5, 1.0, 2.0])),
        num_classes=draw(st.integers(1, 12)),
        in_chans=draw(st.sampled_from([1, 3])),
    )


@settings(max_examples=6, deadline=None)
@given(lrunet_configs())
def test_official_format_round_trip_any_config(config: dict) -> None:
    model = _randomised(LruNet(**config))
    renamed, unknown = convert_official(to_official(model))
    assert unknown == []
    expected = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert renamed.keys() == expected.keys()
    assert all(torch.equal(renamed[k], expected[k]) for k in expected)


# ----------------------------------------------------------------------------------------------------------
# The authors' released files (../shared).
def shared_dir() -> Path:
    return Path(os.environ.get("REUSE_SHARED") or Path(__file__).resolve().parents[1].parent / "shared")


def shared_file(*parts: str) -> Path:
    path = shared_dir().joinpath(*parts)
    if not path.is_file():
        pytest.skip(f"needs {path} (the shared checkpoints and data; set REUSE_SHARED to their folder)")
    return path


def official_file(file: str) -> Path:
    return shared_file("pretrained", "lrunet-official", file)


TABLE_ROW = {  # file -> the paper's parameter count (k) for its N, width and dataset
    "cifar10-lru1-ckpt-08391.t7": 131,
    "cifar10-lru14-ckpt-08934.t7": 206,
    "cifar100-lru1-2x-ckpt-06322.t7": 514,
    "cifar100-lru14-2x-ckpt-06884.t7": 664,
    "fashionmnist-lru1-ckpt-09117.t7": 130,
    "fashionmnist-lru10-ckpt-09346.t7": 182,
}


@pytest.mark.shared
@pytest.mark.parametrize("file", sorted(RELEASED))
def test_released_checkpoint_loads_strictly_and_reads_as_unrolled(file: str) -> None:
    path = official_file(file)
    ckpt = read_official(path)
    assert ckpt.acc == pytest.approx(RELEASED[file][1])
    assert not any(k.endswith("num_batches_tracked") for k in ckpt.state_dict)
    model = load_official(path)
    assert round(n_params(model) / 1000) == TABLE_ROW[file]
    assert n_params(model) == sum(v.numel() for k, v in ckpt.state_dict.items() if "running" not in k)
    size = 28 if model.in_chans == 1 else 32
    x = torch.rand(4, model.in_chans, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), unrolled_forward(ckpt.state_dict, x), rtol=1e-4, atol=1e-4)


@pytest.mark.shared
@pytest.mark.parametrize("file", sorted(RELEASED))
def test_released_checkpoint_through_timm(file: str) -> None:
    path = official_file(file)
    name, _ = RELEASED[file]
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    reference = load_official(path).state_dict()
    state = model.state_dict()
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in reference)


@pytest.mark.shared
@pytest.mark.parametrize(
    "file",
    [
        "fashionmnist-lru1-ckpt-09117.t7",  # measured: about 10 s of CPU time, one thread
        # 10 uses of each block, measured: 89 s of CPU time on one thread (325 s wall on a loaded 2-core box)
        pytest.param("fashionmnist-lru10-ckpt-09346.t7", marks=pytest.mark.heavy),
    ],
)
def test_fashion_mnist_accuracy_reproduces_the_reported_one(file: str) -> None:
    data = np.load(shared_file("data", "fashion_mnist", "test.npz"))
    images = torch.from_numpy(data["images"]).unsqueeze(1)  # (10000, 1, 28, 28) uint8
    labels = torch.from_numpy(data["labels"])  # (10000,)
    assert images.shape == (10000, 1, 28, 28)
    model = load_official(official_file(file)).to(memory_format=torch.channels_last)
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(images), 1000):
            x = (images[i : i + 1000].float() / 255).contiguous(memory_format=torch.channels_last)  # [0, 1]
            correct += (model(x).argmax(1) == labels[i : i + 1000]).sum().item()
    accuracy = 100 * correct / len(images)
    assert abs(accuracy - RELEASED[file][1]) <= 0.05, f"{file}: {accuracy:.2f}% against {RELEASED[file][1]}%"


# ----------------------------------------------------------------------------------------------------------
# The examples.
def _example(name: str):  # noqa: ANN202
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def table1_conv_macs(classes: int = 10) -> int:
    """Multiply-adds of 1-LruNet-1x's convolutions on 32x32, by hand from Table 1."""
    total = 3 * 9 * 64 * 16 * 16  # stem, 16x16 output
    for f, hw in ((64, 16 * 16), (128, 8 * 8), (256, 4 * 4), (512, 4 * 4)):
        total += 9 * 2 * f * hw + (2 * f // 8) * f * hw  # depthwise x2, pointwise in 8 groups
    return total + (512 // 8) * 256 * 4 + 256 * classes * 4  # head conv, last conv on the 2x2 map


def test_paper_tables_counts() -> None:
    tables = _example("paper_tables")
    r = tables.row(1, 1.0, 10, 3, 32)
    assert r["params"] == table1_params(1, 1.0, 10, 3)
    assert r["mflops"] * 1e6 == pytest.approx(table1_conv_macs())
    conventions = tables.flop_conventions()
    assert next(iter(conventions.values())) * 1e6 == pytest.approx(table1_conv_macs())
    assert all(value > 2.9 for value in conventions.values())


@pytest.mark.shared
def test_evaluate_official_example_agrees_with_a_direct_count() -> None:
    data_dir = shared_file("data", "fashion_mnist", "test.npz").parent
    path = official_file("fashionmnist-lru1-ckpt-09117.t7")
    acc = _example("evaluate_official").main(["--checkpoint", str(path), "--data-dir", str(data_dir), "--limit", "500"])
    data = np.load(data_dir / "test.npz")
    x = torch.from_numpy(data["images"][:500]).float().div(255).unsqueeze(1)  # (500, 1, 28, 28) in [0, 1]
    with torch.no_grad():
        direct = (load_official(path)(x).argmax(1).numpy() == data["labels"][:500]).mean() * 100
    assert acc == pytest.approx(direct)


# ----------------------------------------------------------------------------------------------------------
# The release files are verified by their sha256.
def test_a_file_named_like_a_release_must_be_that_release(synthetic: tuple[LruNet, Path], tmp_path: Path) -> None:
    _, path = synthetic
    impostor = tmp_path / "fashionmnist-lru1-ckpt-09117.t7"  # a release's name, other bytes
    impostor.write_bytes(path.read_bytes())
    with pytest.raises(ReuseError, match=r"sha256 is [0-9a-f]{64}, not the release's f0b96bde.*give it another name"):
        load_official(impostor)
    with pytest.raises(ReuseError, match="sha256"):
        timm.create_model("lrunet", reuse=3, pretrained=True, pretrained_cfg_overlay=dict(file=str(impostor)))
    assert load_official(path).reuse == 3  # under a name of its own, the same bytes load


@pytest.mark.shared
def test_a_release_with_flipped_bytes_is_refused(tmp_path: Path) -> None:
    """The issue's repro: 64 bytes zeroed in a release file loaded silently with logits off by 27."""
    source = official_file("fashionmnist-lru1-ckpt-09117.t7")
    data = bytearray(source.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    broken = tmp_path / source.name
    broken.write_bytes(bytes(data))
    with pytest.raises(ReuseError, match="corrupt or modified"):
        load_official(broken)
