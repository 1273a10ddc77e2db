"""Two reference LruNets for the speed benchmark, written the way the paper describes them.

- :class:`NaiveLruNet`: the paper's LRU block as a Python loop over the N uses, with a list of BatchNorms
  per conv, the multiplier-2 depthwise conv as written (``Conv2d(F, 2F, 3, groups=F)``), and the channel
  shuffle as concatenate + view + permute + contiguous.
- :class:`UnrolledLruNet`: the same network without reuse: N independent blocks per stage (N times the
  weights), same shuffle between them.

Both take their weights from a library ``reuse.models.LruNet`` (:func:`naive_from`, :func:`unrolled_from`),
so that the benchmark can check that all three compute the same function. Nothing here imports the
library's fast paths: it is the baseline.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["NaiveLruNet", "UnrolledLruNet", "naive_from", "paper_shuffle", "unrolled_from"]


def paper_shuffle(x: Tensor, groups: int = 2) -> Tensor:
    """The paper's shuffle: exchange the channel halves, then ShuffleNet's group shuffle."""
    b, c, h, w = x.shape
    x = torch.cat([x[:, c // 2 :], x[:, : c // 2]], dim=1)  # (B, C, H, W), halves exchanged
    x = x.view(b, groups, c // groups, h, w).permute(0, 2, 1, 3, 4).contiguous()  # (B, C/g, g, H, W)
    return x.view(b, c, h, w)  # (B, C, H, W)


class NaiveLruStage(nn.Module):
    """One LRU block used ``n`` times: shared convs, a list of BatchNorms, a Python loop over the uses."""

    def __init__(self, planes: int, n: int, shuffle: bool = True) -> None:
        super().__init__()
        self.n = n
        self.shuffle = shuffle
        self.dw = nn.Conv2d(planes, 2 * planes, 3, padding=1, groups=planes, bias=False)
        self.dw_bn_list = nn.ModuleList([nn.BatchNorm2d(2 * planes) for _ in range(n)])
        self.pw = nn.Conv2d(2 * planes, planes, 1, groups=8, bias=False)
        self.pw_bn_list = nn.ModuleList([nn.BatchNorm2d(planes) for _ in range(n)])

    def forward(self, x: Tensor) -> Tensor:
        for i in range(self.n):
            if i and self.shuffle:
                x = paper_shuffle(x)  # (B, F, H, W)
            y = self.dw_bn_list[i](self.dw(x))  # (B, 2F, H, W)
            y = self.pw_bn_list[i](self.pw(y))  # (B, F, H, W)
            x = torch.relu(y + x)  # (B, F, H, W)
        return x


class UnrolledLruStage(nn.Module):
    """``n`` independent LRU blocks (each its own convs and BatchNorms), the paper's shuffle between them."""

    def __init__(self, planes: int, n: int, shuffle: bool = True) -> None:
        super().__init__()
        self.shuffle = shuffle
        self.blocks = nn.ModuleList([NaiveLruStage(planes, 1) for _ in range(n)])

    def forward(self, x: Tensor) -> Tensor:
        for i, block in enumerate(self.blocks):
            if i and self.shuffle:
                x = paper_shuffle(x)  # (B, F, H, W)
            x = block(x)  # (B, F, H, W)
        return x


class _PaperNet(nn.Module):
    """Table 1 of the paper (width 1x or 2x), with the stage class given."""

    def __init__(self, stage: type[nn.Module], num_classes: int, width_mult: float, n: int, in_chans: int) -> None:
        super().__init__()
        c1, c2, c3, c4 = (int(round(c * width_mult)) for c in (64, 128, 256, 512))
        head = int(round(256 * width_mult))
        stem = 64 if width_mult in (1.0, 2.0) else c1
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, stem, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(stem), nn.ReLU(inplace=True)
        )
        self.stem_twice = stem != c1
        self.stage1, self.stage2, self.stage3, self.stage4 = (stage(c, n) for c in (c1, c2, c3, c4))
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.head_conv = nn.Conv2d(c4, head, 1, groups=8, bias=False)
        self.head_bn = nn.BatchNorm2d(head)
        self.head_drop = nn.Dropout(0.5)
        self.classifier = nn.Conv2d(head, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)  # (B, 64, H/2, W/2)
        if self.stem_twice:
            x = torch.cat([x, x], 1)
        x = self.pool(self.stage1(x))  # (B, 64w, H/4, W/4)
        x = self.stage2(torch.cat([x, x], 1))  # (B, 128w, H/4, W/4)
        x = self.stage3(torch.cat([self.pool(x)] * 2, 1))  # (B, 256w, H/8, W/8)
        x = self.pool(self.stage4(torch.cat([x, x], 1)))  # (B, 512w, H/16, W/16)
        x = self.head_drop(torch.relu(self.head_bn(self.head_conv(x))))  # (B, 256w, h, w)
        return torch.relu(self.classifier(x)).mean((2, 3))  # (B, classes)


class NaiveLruNet(_PaperNet):
    """N-LruNet-wx as the paper's code writes it: reused blocks as Python loops with BatchNorm lists."""

    def __init__(self, num_classes: int = 10, width_mult: float = 1.0, reuse: int = 8, in_chans: int = 3) -> None:
        super().__init__(NaiveLruStage, num_classes, width_mult, reuse, in_chans)


class UnrolledLruNet(_PaperNet):
    """N-LruNet-wx without reuse: N independent blocks per stage."""

    def __init__(self, num_classes: int = 10, width_mult: float = 1.0, reuse: int = 8, in_chans: int = 3) -> None:
        super().__init__(UnrolledLruStage, num_classes, width_mult, reuse, in_chans)


def _common_state(model: nn.Module) -> dict[str, Tensor]:
    """The stem and head tensors of a library LruNet, under the names used here."""
    sd = model.state_dict()
    return {k: v for k, v in sd.items() if k.split(".")[0] in ("stem", "head_conv", "head_bn", "classifier")}


def naive_from(model: nn.Module) -> NaiveLruNet:
    """A :class:`NaiveLruNet` holding the weights of a library ``LruNet`` (same function)."""
    n = model.reuse
    net = NaiveLruNet(model.num_classes, model.width_mult, n, model.in_chans)
    state = _common_state(model)
    for k, stage in enumerate(model.stages, start=1):
        block = stage.uses[0]
        state[f"stage{k}.dw.weight"] = block.dw.weight.detach().view_as(net.get_submodule(f"stage{k}.dw").weight)
        state[f"stage{k}.pw.weight"] = block.pw.weight.detach()
        for i, use in enumerate(stage.uses):
            for name in ("dw_bn", "pw_bn"):
                for key, value in use.get_submodule(name).state_dict().items():
                    state[f"stage{k}.{name}_list.{i}.{key}"] = value
    net.load_state_dict(state)
    return net.train(model.training)


def unrolled_from(model: nn.Module) -> UnrolledLruNet:
    """An :class:`UnrolledLruNet` whose N blocks per stage all start from the library ``LruNet``'s weights."""
    n = model.reuse
    net = UnrolledLruNet(model.num_classes, model.width_mult, n, model.in_chans)
    state = _common_state(model)
    for k, stage in enumerate(model.stages, start=1):
        block = stage.uses[0]
        for i, use in enumerate(stage.uses):
            prefix = f"stage{k}.blocks.{i}"
            state[f"{prefix}.dw.weight"] = block.dw.weight.detach().view_as(net.get_submodule(f"{prefix}.dw").weight)
            state[f"{prefix}.pw.weight"] = block.pw.weight.detach()
            for name in ("dw_bn", "pw_bn"):
                for key, value in use.get_submodule(name).state_dict().items():
                    state[f"{prefix}.{name}_list.0.{key}"] = value
    net.load_state_dict(state)
    return net.train(model.training)
