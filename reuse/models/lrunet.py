"""LruNet, the reference model of "Convolutional Neural Networks with Layer Reuse" (Köpüklü et al., ICIP 2019).

Table 1 of the paper, input 32x32 (28x28 for Fashion-MNIST), with N uses of each LRU block::

    stem    conv 3x3 s2, 64 filters, BN, ReLU                  -> 64 x 16 x 16
    stage1  LRU block F=64  x N, maxpool 3x3 s2, concat self   -> 128 x 8 x 8
    stage2  LRU block F=128 x N, maxpool 3x3 s2, concat self   -> 256 x 4 x 4
    stage3  LRU block F=256 x N, concat self                   -> 512 x 4 x 4
    stage4  LRU block F=512 x N, maxpool 3x3 s2                -> 512 x 2 x 2
    head    conv 1x1 g8 -> 256, BN, ReLU, dropout, conv 1x1 -> classes, ReLU, average pool

The width multiplier scales 64/128/256/512/256. At 2x the authors keep the stem at 64 filters and
concatenate its output with itself to reach 128; other widths scale the stem too.
"""

import torch
from torch import Tensor, nn

from reuse._checks import check_bool, check_int
from reuse._errors import ReuseError
from reuse.layer import LayerReuse, wrap
from reuse.models._folded import folded_forward
from reuse.models._gather import repeat_gather, saved_as_gather
from reuse.models._layers import GlobalPool, SelfConcat, take_indices
from reuse.models._pointwise import grouped_pointwise, norm_pointwise, takes_fast_weight_grad, takes_norm_pointwise
from reuse.models._split import SplitLruUse, channel_affine

__all__ = ["LruBlock", "LruNet", "SelfConcat"]


class LruBlock(nn.Module):
    """The paper's LRU block: depthwise 3x3 conv F -> 2F (channel multiplier 2), BN, pointwise 1x1 conv
    2F -> F in 8 groups, BN, shortcut, ReLU. Reuse it with :func:`reuse.wrap`.

    How it runs fast: a depthwise conv with channel multiplier 2 misses oneDNN's fast depthwise kernel on
    CPU. Output channel ``2c+e`` of that conv reads input channel ``c`` with filter ``w[2c+e]``; the same
    filters applied as a *true* depthwise conv (``groups=2F``) to the input with every channel repeated twice
    give the very same result, fast. So ``dw`` is stored as ``Conv2d(2F, 2F, 3, groups=2F)``, whose weight
    has the paper's shape ``(2F, 1, 3, 3)`` (the authors' checkpoints load unchanged), and the forward
    first gathers the channels ``x[:, [0, 0, 1, 1, ...]]`` in ``channels_last`` layout. Under
    :class:`reuse.LayerReuse`, the shuffle between two uses is a channel gather too: the block takes the
    shuffle (``fuses_shuffle = True``) and does both in the one gather. The output is ``channels_last``.
    Once :func:`reuse.optimize_for_inference` has folded its BatchNorms, an inference call on CPU runs all the
    uses of a stage in one loop (``forward_uses``): oneDNN convolutions on weights reordered once, the pointwise
    conv, shortcut and ReLU fused in one call (reuse/models/_folded.py).

    Args:
        channels: F, the block's input and output channels.
        pw_groups: groups of the pointwise conv (the paper's 8).
        save_memory: in training, the depthwise conv's backward keeps the block's input (F channels) and gathers
            the 2F repeated channels again, instead of keeping them: a third less saved activation memory per use
            on CPU (14-LruNet-1x at batch 256: 2,113 instead of 3,102 MiB), one more gather per use in backward
            (a step up to 13% slower there). Same results. Off by default (``False``: the repeated channels are kept).

    In training on CPU the depthwise norm and the pointwise conv run as one autograd node that keeps the norm's
    input, not its output, and computes the conv's weight gradient as one einsum (reuse/models/_pointwise.py):
    the memory of the repeated channels is paid for by the norm's output not kept.

    Example:
        >>> LruBlock(64)(torch.randn(2, 64, 8, 8)).shape
        torch.Size([2, 64, 8, 8])
        >>> LruBlock(64).dw.weight.shape  # F -> 2F depthwise filters, as in the paper
        torch.Size([128, 1, 3, 3])
    """

    fuses_shuffle = True  # LayerReuse hook: forward(x, shuffle=(g, swap)) shuffles in its own gather
    forward_uses = staticmethod(folded_forward)  # LayerReuse hook: folded uses in one loop on fused oneDNN ops

    save_memory: bool = True  # blocks pickled before the option existed regathered: they load with that

    def __init__(self, channels: int, pw_groups: int = 8, *, save_memory: bool = False) -> None:
        super().__init__()
        check_bool(save_memory, "save_memory", "LruBlock")
        if channels % pw_groups:
            raise ReuseError(f"LruBlock: pw_groups={pw_groups} does not divide {channels} channels")
        self.channels = channels
        self.save_memory = save_memory
        # The paper's Conv2d(F, 2F, 3, groups=F), applied to the input with each channel repeated twice.
        self.dw = nn.Conv2d(2 * channels, 2 * channels, 3, padding=1, groups=2 * channels, bias=False)
        self.dw_bn = nn.BatchNorm2d(2 * channels)
        self.pw = nn.Conv2d(2 * channels, channels, 1, groups=pw_groups, bias=False)
        self.pw_bn = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor, shuffle: tuple[int, bool] | None = None) -> Tensor:
        """``block(x)``, or with ``shuffle=(groups, swap_halves)`` ``block(channel_shuffle(x, groups, swap_halves))``
        with the shuffle done in the block's own gather."""
        groups, swap = 0, False
        if shuffle is not None:
            groups, swap = shuffle
        xr, shortcut = repeat_gather(x, self.channels, groups, swap)  # (B, 2F, H, W) repeated; (B, F, H, W)
        z = self._depthwise(xr, x, groups, swap)  # (B, 2F, H, W)
        y = self.pw_bn(self._norm_pointwise(z))  # (B, F, H, W): pw(dw_bn(z)), then its norm
        return y.add_(shortcut).relu_()  # (B, F, H, W), shortcut; in place: fewer fresh buffers, each one page-faults

    def export_form(self) -> nn.Module | None:
        """Deploy hook: the module :func:`reuse.deploy.export_onnx` writes in this block's place, the same
        function split by the parity of the depthwise channels, so that onnxruntime runs it with a gather of F
        channels and no strided slice (1.27x / 2.06x the batch-256 throughput of 14-LruNet on 1 / 2 threads; see
        reuse/models/_split.py). ``None`` (the block is exported as it is) in training mode or when a norm is
        not a per-channel affine map in eval mode.

        Example:
            >>> block = LruBlock(16).eval()
            >>> x = torch.randn(2, 16, 4, 4)
            >>> torch.allclose(block.export_form()(x), block(x), atol=1e-5)
            True
        """
        if self.training or channel_affine(self.dw, self.dw_bn) is None or channel_affine(self.pw, self.pw_bn) is None:
            return None
        return SplitLruUse(self)

    def _norm_pointwise(self, z: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self.pw(self.dw_bn(z))  # (B, F, H, W)
        return self._norm_pointwise_eager(z)

    @torch.jit.unused
    def _norm_pointwise_eager(self, z: Tensor) -> Tensor:
        """Training on CPU (models/_pointwise.py): the depthwise norm and the pointwise conv in one autograd node that
        keeps the norm's input, not its output (one 2F-channel tensor less for backward), and computes the conv's
        weight gradient as one einsum; or, with another norm or hooks, the conv alone with that weight gradient."""
        if takes_norm_pointwise(z, self.dw_bn, self.pw):
            return norm_pointwise(z, self.dw_bn, self.pw)  # (B, F, H, W)
        y = self.dw_bn(z)  # (B, 2F, H, W)
        if takes_fast_weight_grad(y, self.pw):
            return grouped_pointwise(y, self.pw)  # (B, F, H, W)
        return self.pw(y)  # (B, F, H, W)

    def _depthwise(self, xr: Tensor, source: Tensor, groups: int, swap: bool) -> Tensor:
        if torch.jit.is_scripting() or not self.save_memory:
            return self.dw(xr)  # (B, 2F, H, W)
        return self._depthwise_saving_memory(xr, source, groups, swap)

    @torch.jit.unused
    def _depthwise_saving_memory(self, xr: Tensor, source: Tensor, groups: int, swap: bool) -> Tensor:
        with saved_as_gather(xr, source, self.channels, groups, swap):  # backward keeps source, not the 2F channels
            return self.dw(xr)  # (B, 2F, H, W)


# One node in torch.fx graphs: its indices are built from the channel count.
torch.fx.wrap("repeat_gather")


def _widths(width_mult: float) -> tuple[int, tuple[int, int, int, int], int]:
    if isinstance(width_mult, bool) or not isinstance(width_mult, (int, float)) or not width_mult > 0:
        raise ReuseError(
            f"LruNet: width_mult must be a positive number, got {width_mult!r}; the paper uses 1.0 and 2.0"
        )
    stages = tuple(int(round(c * width_mult)) for c in (64, 128, 256, 512))
    head = int(round(256 * width_mult))
    stem = 64 if width_mult in (1.0, 2.0) else stages[0]
    for c in (*stages, head):
        if c % 8:
            raise ReuseError(
                f"LruNet: width_mult={width_mult} gives {c} channels, not a multiple of 8 "
                "(the pointwise convolutions use 8 groups); pick a width that keeps 64*width a multiple of 8"
            )
    return stem, stages, head  # type: ignore[return-value]


class LruNet(nn.Module):
    """N-LruNet-wx: the paper's network, each LRU block used ``reuse`` times.

    Args:
        num_classes: number of classes.
        width_mult: width multiplier w (1.0 and 2.0 are the authors' models).
        reuse: N, the number of uses of each LRU block.
        drop_rate: dropout before the last convolution (0.5; the paper uses 0.7 for CIFAR-100).
        in_chans: input channels (3, or 1 for Fashion-MNIST).
        shuffle: channel shuffle between uses, as in the paper.
        level: the grain of reuse inside the LRU blocks: ``"layer"`` (the paper's), ``"filter"`` or ``"kernel"``
            (their convs also draw filters or kernels from banks shared across the stages; see ``_reuse_block_convs``).
        global_pool: timm's pooling of the head: ``"avg"`` (the paper's), ``"max"``, ``"avgmax"`` or ``""`` (none).
        share: the uses of an LRU block share its convolutions (the paper's LruNet). ``share=False`` builds the
            same depth from new layers, every use with its own weights, shuffles and all else unchanged: the
            baseline of the paper's Table 4 (8 uses: 901,962 parameters, the paper's 902k).
        save_memory: the blocks' backward gathers their repeated channels again rather than keeping them
            (:class:`LruBlock`): a third less activation memory in training, a slightly slower step.

    Example:
        >>> model = LruNet(num_classes=10, reuse=14)
        >>> sum(p.numel() for p in model.parameters())  # the paper's 206k
        206282
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    __jit_unused_properties__ = ["stages"]  # noqa: RUF012 - TorchScript's opt-out list

    def __init__(
        self,
        num_classes: int = 10,
        width_mult: float = 1.0,
        reuse: int = 8,
        drop_rate: float = 0.5,
        in_chans: int = 3,
        shuffle: bool = True,
        level: str = "layer",
        share: bool = True,
        global_pool: str = "avg",
        save_memory: bool = False,
    ) -> None:
        super().__init__()
        check_int(reuse, "reuse", "LruNet", about="the number of uses of each LRU block; 1 is no reuse")
        check_int(num_classes, "num_classes", "LruNet", at_least=0, about="0 gives no classifier")
        check_int(in_chans, "in_chans", "LruNet", about="3 for RGB, 1 for Fashion-MNIST")
        check_bool(shuffle, "shuffle", "LruNet")
        check_bool(share, "share", "LruNet")
        check_bool(save_memory, "save_memory", "LruNet")
        if not share and level != "layer":
            raise ReuseError(
                f"LruNet: share=False builds new layers for every use; it takes level='layer', got {level!r}"
            )
        stem, (c1, c2, c3, c4), head = _widths(width_mult)
        self.num_classes = num_classes
        self.width_mult = width_mult
        self.reuse = reuse
        self.drop_rate = drop_rate
        self.in_chans = in_chans
        self.share = share
        per_use = "batchnorm" if share else "all"
        self.num_features = c4
        self.head_hidden_size = head

        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, stem, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(stem), nn.ReLU(inplace=True)
        )
        self.stem_concat = SelfConcat() if stem != c1 else nn.Identity()
        self.stage1 = wrap(LruBlock(c1, save_memory=save_memory), reuse, shuffle=shuffle, per_use=per_use)
        self.pool1 = nn.MaxPool2d(3, stride=2, padding=1)
        self.concat1 = SelfConcat()
        self.stage2 = wrap(LruBlock(c2, save_memory=save_memory), reuse, shuffle=shuffle, per_use=per_use)
        self.pool2 = nn.MaxPool2d(3, stride=2, padding=1)
        self.concat2 = SelfConcat()
        self.stage3 = wrap(LruBlock(c3, save_memory=save_memory), reuse, shuffle=shuffle, per_use=per_use)
        self.concat3 = SelfConcat()
        self.stage4 = wrap(LruBlock(c4, save_memory=save_memory), reuse, shuffle=shuffle, per_use=per_use)
        self.pool4 = nn.MaxPool2d(3, stride=2, padding=1)

        self.head_conv = nn.Conv2d(c4, head, 1, groups=8, bias=False)
        self.head_bn = nn.BatchNorm2d(head)
        self.head_drop = nn.Dropout(drop_rate)
        self.classifier = nn.Conv2d(head, num_classes, 1) if num_classes > 0 else nn.Identity()
        self.global_pool = GlobalPool(global_pool)
        self.grad_checkpointing = False
        # timm's features_only: the stage outputs; the children run in this order in forward_features.
        self.feature_info = [
            dict(num_chs=stem, reduction=2, module="stem"),
            dict(num_chs=c1, reduction=2, module="stage1"),
            dict(num_chs=c2, reduction=4, module="stage2"),
            dict(num_chs=c3, reduction=8, module="stage3"),
            dict(num_chs=c4, reduction=8, module="stage4"),
        ]
        _reuse_block_convs(self, level)

    @property
    def stages(self) -> list[LayerReuse]:
        """The four reused LRU blocks."""
        return [self.stage1, self.stage2, self.stage3, self.stage4]

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.stem_concat(self.stem(x))  # (B, 64w, H/2, W/2)
        x = self.concat1(self.pool1(self.stage1(x)))  # (B, 128w, H/4, W/4)
        x = self.concat2(self.pool2(self.stage2(x)))  # (B, 256w, H/8, W/8)
        x = self.concat3(self.stage3(x))  # (B, 512w, H/8, W/8)
        return self.pool4(self.stage4(x))  # (B, 512w, H/16, W/16)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = torch.relu(self.head_bn(self.head_conv(x)))  # (B, 256w, h, w)
        x = self.head_drop(x)
        if pre_logits:
            return self.global_pool(x)  # (B, 256w), or (B, 256w, h, w) without pooling
        x = torch.relu(self.classifier(x))  # (B, classes, h, w), the authors' ReLU on the class maps
        return self.global_pool(x)  # (B, classes), or (B, classes, h, w) without pooling

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    # ------------------------------------------------------------------------------ timm's model interface

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the last convolution with a new one for ``num_classes`` classes (0: no classifier), and the
        global pooling when ``global_pool`` is given (``""``: none)."""
        check_int(num_classes, "num_classes", "LruNet", at_least=0, about="0 gives no classifier")
        if global_pool is not None:
            self.global_pool = GlobalPool(global_pool)
        like = self.stem[0].weight
        self.num_classes = num_classes
        if num_classes > 0:
            self.classifier = nn.Conv2d(self.head_hidden_size, num_classes, 1, device=like.device, dtype=like.dtype)
        else:
            self.classifier = nn.Identity()
        self.classifier.train(self.training)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of every use of every stage (:class:`~reuse.LayerReuse`'s ``checkpoint``):
        training keeps each use's input only and recomputes the rest in backward."""
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.checkpoint = enable

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        """timm's parameter groups (layer-wise learning-rate decay): the stem, then one group per stage
        (``coarse``) or per use of a stage; the head falls in the last group. A stage's shared convs sit in
        its use 0."""
        return dict(stem=r"^stem", blocks=r"^stage(\d+)" if coarse else r"^stage(\d+)\.uses\.(\d+)")

    def _levels(self) -> list[tuple[nn.Module, list[nn.Module]]]:
        """The feature levels of :attr:`feature_info`: the module whose output is the level's feature, and
        the modules that lead from it to the next level."""
        return [
            (self.stem, [self.stem_concat]),
            (self.stage1, [self.pool1, self.concat1]),
            (self.stage2, [self.pool2, self.concat2]),
            (self.stage3, [self.concat3]),
            (self.stage4, [self.pool4]),
        ]

    @torch.jit.ignore
    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | tuple[int, ...] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """timm's feature API: the features of the levels in :attr:`feature_info` (stem, stage 1-4).

        Args:
            x: input images, ``(B, C, H, W)``.
            indices: levels to return: None (all five), an int n (the last n) or a list (negative from the end).
            norm: accepted for timm's signature; LruNet has no final norm, so it changes nothing.
            stop_early: stop after the last level asked for (the first output is then that level's input to
                the next one, not ``forward_features``'s).
            output_fmt: only ``"NCHW"``.
            intermediates_only: return the list only.

        Returns:
            ``(forward_features(x), intermediates)``, or the intermediates alone.

        Example:
            >>> feats = LruNet(reuse=2).forward_intermediates(torch.rand(1, 3, 32, 32), intermediates_only=True)
            >>> [tuple(f.shape[1:]) for f in feats]
            [(64, 16, 16), (64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 4, 4)]
        """
        if output_fmt != "NCHW":
            raise ReuseError(f"LruNet.forward_intermediates: output_fmt must be 'NCHW', got {output_fmt!r}")
        take, last = take_indices(len(self.feature_info), indices)
        levels = self._levels()[: last + 1] if stop_early else self._levels()
        intermediates = []
        for i, (level, following) in enumerate(levels):
            x = level(x)  # (B, C_i, H_i, W_i)
            if i in take:
                intermediates.append(x)
            for module in following:
                x = module(x)  # (B, C, H, W): pooled, self-concatenated
        if intermediates_only:
            return intermediates
        return x, intermediates

    @torch.jit.ignore
    def prune_intermediate_layers(
        self, indices: int | list[int] | tuple[int, ...] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop what no level in ``indices`` needs (later stages, and the head if ``prune_head``); returns the
        levels kept. timm's ``features_only=True, feature_cls="getter"`` calls it."""
        take, last = take_indices(len(self.feature_info), indices)
        names = [
            ("stem_concat", "stage1"),
            ("pool1", "concat1", "stage2"),
            ("pool2", "concat2", "stage3"),
            ("concat3", "stage4"),
            ("pool4",),
        ]
        for group in names[last:]:
            for name in group:
                setattr(self, name, nn.Identity())
        if prune_head or last < len(names) - 1:
            for name in ("head_conv", "head_bn", "head_drop"):
                setattr(self, name, nn.Identity())
            self.reset_classifier(0, "")
            self.num_features = self.head_hidden_size = self.feature_info[last]["num_chs"]
        return take


def _reuse_block_convs(net: LruNet, level: str) -> None:
    """Finer reuse inside the LRU blocks: ``level="filter"`` swaps their convs for :class:`reuse.FilterReuseConv2d`
    (FRU), ``"kernel"`` their 3x3 depthwise convs for :class:`reuse.KernelReuseConv2d` (KRU; 1x1 kernels are single
    numbers, left as they are). Index mode, one bank per filter shape (kernel size) shared by the four stages,
    each a quarter of the filters (kernels) it replaces. ``"layer"`` leaves the blocks as the paper has them."""
    from reuse.filter import filter_reuse
    from reuse.kernel import kernel_reuse

    convert = {"filter": filter_reuse, "kernel": kernel_reuse}
    if level != "layer" and level not in convert:
        raise ReuseError(f"LruNet: level must be 'layer', 'filter' or 'kernel', got {level!r}")
    net.level = level
    if level in convert:
        convert[level](nn.ModuleList(net.stages), bank_size=0.25, mode="index", inplace=True)
