"""Helpers shared by the test files: the paper's LRU block and shuffle written as the paper states them, a
residual block, the authors' checkpoint format, snapshots of a model's state, loading a script. Import with
``from _helpers import ...`` (pytest puts ``tests/`` on the path). The models and blocks the tests run on, and
the BatchNorm randomiser, are in ``_zoo.py``."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reuse.models import LruBlock, LruNet


def paper_shuffle(x: torch.Tensor, groups: int = 2, swap_halves: bool = True) -> torch.Tensor:
    b, c, h, w = x.shape
    if swap_halves:
        x = torch.cat([x[:, c // 2 :], x[:, : c // 2]], dim=1)  # (B, C, H, W)
    return x.view(b, groups, c // groups, h, w).permute(0, 2, 1, 3, 4).reshape(b, c, h, w)  # (B, C, H, W)


def paper_block(block: LruBlock, x: torch.Tensor) -> torch.Tensor:
    """The block with the multiplier-2 depthwise conv of the paper, using ``block``'s own modules."""
    f = block.channels
    y = block.dw_bn(F.conv2d(x, block.dw.weight, block.dw.bias, padding=1, groups=f))  # (B, 2F, H, W)
    y = block.pw_bn(block.pw(y))  # (B, F, H, W)
    return torch.relu(y + x)  # (B, F, H, W)


class Residual(nn.Module):
    """Two convs with BNs and a shortcut, ResNet's basic block at one width (``groups2``: the second conv's
    groups, by default ``groups``)."""

    def __init__(self, channels: int, kernel: int = 3, groups: int = 1, groups2: int | None = None) -> None:
        super().__init__()
        pad = kernel // 2
        self.conv1 = nn.Conv2d(channels, channels, kernel, padding=pad, groups=groups, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, kernel, padding=pad, groups=groups2 or groups, bias=True)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))  # (B, C, H, W)
        return torch.relu(self.bn2(self.conv2(y)) + x)  # (B, C, H, W)


def load_script(path: Path, name: str) -> ModuleType:
    """A script of the repository (examples/, benchmarks/) imported as the module ``name``."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def to_official(model: LruNet) -> dict[str, Tensor]:
    """A state dict in the authors' naming (DataParallel 'module.' prefix, BN lists, no num_batches_tracked)."""
    out: dict[str, Tensor] = {}
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    heads = {"stem.0.": "features.0.", "stem.1.": "features.1.", "head_conv.": "classifier.0.",
             "head_bn.": "classifier.1.", "classifier.": "classifier.4."}  # fmt: skip
    for key, value in sd.items():
        parts = key.split(".")
        if parts[0].startswith("stage"):  # stageK.uses.I.(dw|pw|dw_bn|pw_bn).P
            stage, _, use, mod, param = parts
            key = f"{stage}.{mod}.{param}" if mod in ("dw", "pw") else f"{stage}.{mod}_list.{use}.{param}"
        else:
            prefix = next(p for p in heads if key.startswith(p))
            key = heads[prefix] + key[len(prefix) :]
        out["module." + key] = value.clone()
    return out


@dataclass
class Snapshot:
    """Everything of a model a transform must leave alone: every tensor (by every name it has: identity,
    values, device, dtype, requires_grad), every module object (by every path) and its train/eval mode."""

    tensors: dict[str, tuple[int, Tensor, torch.device, torch.dtype, bool]]
    modules: dict[str, tuple[int, bool]]

    @classmethod
    def of(cls, model: nn.Module) -> Snapshot:
        tensors = {}
        named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
        for name, t in named:
            tensors[name] = (id(t), t.detach().clone(), t.device, t.dtype, t.requires_grad)
        modules = {name: (id(m), m.training) for name, m in model.named_modules(remove_duplicate=False)}
        return cls(tensors, modules)

    def differences(self, model: nn.Module) -> list[str]:
        """What changed since the snapshot, as readable lines (empty: nothing)."""
        now = Snapshot.of(model)
        out = (
            [f"module paths {sorted(set(self.modules) ^ set(now.modules))}"]
            if now.modules.keys() != self.modules.keys()
            else []
        )
        out += [
            f"module {n} replaced or mode changed"
            for n in self.modules
            if n in now.modules and now.modules[n] != self.modules[n]
        ]
        if now.tensors.keys() != self.tensors.keys():
            out.append(f"tensor names {sorted(set(self.tensors) ^ set(now.tensors))}")
        for name, (ident, value, device, dtype, grad) in self.tensors.items():
            if name not in now.tensors:
                continue
            ident2, value2, device2, dtype2, grad2 = now.tensors[name]
            if (ident2, device2, dtype2, grad2) != (ident, device, dtype, grad):
                out.append(f"{name}: object, device, dtype or requires_grad changed ({device} -> {device2})")
            elif not torch.equal(value2, value):
                out.append(f"{name}: values changed")
        return out
