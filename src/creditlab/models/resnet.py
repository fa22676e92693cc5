"""CIFAR ResNets with BatchNorm: ``resnet20``, ``resnet56`` (He et al. 2016, §4.2) and the
CIFAR variant of ``resnet18``.

``resnet20`` / ``resnet56`` (He, Zhang, Ren & Sun, "Deep Residual Learning for Image
Recognition", CVPR 2016, §4.2): a 3x3 convolution with ``width`` (16) filters, then 3 stages of
n basic blocks (n = 3 for 20 layers, n = 9 for 56: 6n + 2 weighted layers) with width, 2*width
and 4*width (16/32/64) channels on feature maps of 32, 16 and 8 pixels (for 32x32 input; the
first block of stages 2 and 3 has stride 2), global average pooling and one linear layer. A
basic block is conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU.

Shortcut where the shape changes (``shortcut`` option): ``A`` (the default, the paper's CIFAR
choice, "option A": parameter-free identity: the input subsampled with stride 2 (``x[:, :,
::2, ::2]``) and zero-padded with the missing channels (appended after the existing ones) by
``F.pad``), or ``B`` (a 1x1 convolution with the block's stride followed by BatchNorm, the
paper's "option B" projection). All other shortcuts are identities. With option A a resnet20 has
0.27 M parameters, as the paper's Table 6.

``resnet18``: the CIFAR variant common in the literature (e.g. kuangliu/pytorch-cifar): a 3x3
stride-1 stem with ``width`` (64) filters, BN, ReLU and no max-pool, then 4 stages of 2 basic
blocks with 64/128/256/512 channels (strides 1, 2, 2, 2), global average pooling, linear;
projection shortcuts (``shortcut=B``, the default here; ``A`` is accepted).

``width`` scales every stage (tests use 2 or 4). ``init``: ``he`` (the default: He et al. 2015
normal init of every convolution, fan-out mode, as torchvision; the linear layer keeps PyTorch's
default) or any init spec of :mod:`creditlab.models.init` for every conv and linear weight;
BatchNorm starts at weight 1, bias 0, biases of the linear layer at 0.

Written for ``torch.fx`` (graph Activation Relaxation traces the module): no data-dependent
Python control flow and no in-place operations (``F.relu(x)``, ``out = out + shortcut``).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from creditlab.errors import ConfigError
from creditlab.models import register_model
from creditlab.models.init import check_init, init_weight_

SHORTCUTS = ("A", "B")


class ShortcutA(nn.Module):
    """Option A: parameter-free; spatial subsampling by ``stride`` and zero channels appended."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        if out_channels < in_channels:
            raise ConfigError(f"shortcut A cannot reduce channels ({in_channels} -> {out_channels})")
        self.stride = stride
        self.extra = out_channels - in_channels

    def forward(self, x: Tensor) -> Tensor:
        s = self.stride
        return F.pad(x[:, :, ::s, ::s], (0, 0, 0, 0, 0, self.extra))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, zero_channels={self.extra}"


class BasicBlock(nn.Module):
    """conv3x3(stride)-BN-ReLU-conv3x3-BN + shortcut, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, shortcut: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = ShortcutA(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return F.relu(out)


class CifarResNet(nn.Module):
    """Stem conv3x3-BN-ReLU, stages of basic blocks (the first block of every stage but the first
    has stride 2), global average pooling, linear."""

    def __init__(self, in_channels: int, num_classes: int, stage_channels: list[int], blocks: list[int],
                 shortcut: str):
        super().__init__()
        c = stage_channels[0]
        self.conv1 = nn.Conv2d(in_channels, c, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        stages = []
        for i, (width, n) in enumerate(zip(stage_channels, blocks)):
            layers = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(BasicBlock(c, width, stride, shortcut))
                c = width
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.stages(out)
        out = out.mean(dim=(2, 3))  # global average pooling
        return self.fc(out)


def _init(model: nn.Module, init: str) -> nn.Module:
    text = str(init).strip().lower()
    spec = "he" if text in ("he", "kaiming") else check_init(text)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            if spec == "he":
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            else:
                init_weight_(m.weight, spec)
        elif isinstance(m, nn.Linear):
            if spec != "he":
                init_weight_(m.weight, spec)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    model.init_spec = spec  # type: ignore[assignment]
    return model


def _build(name: str, in_shape, num_classes: int, widths: list[int], blocks: list[int], shortcut: str,
           init: str) -> nn.Module:
    if len(in_shape) != 3:
        raise ConfigError(f"model {name!r} needs image input (C, H, W), got in_shape={tuple(in_shape)}; "
                          "use an image dataset (cifar10, mnist, ...)")
    sc = str(shortcut).strip().upper()
    if sc not in SHORTCUTS:
        raise ConfigError(f"model {name!r}: shortcut={shortcut!r}; choose A (parameter-free: strided "
                          "subsampling + zero channels) or B (1x1 conv + BatchNorm projection)")
    if min(widths) < 1:
        raise ConfigError(f"model {name!r}: width must be >= 1")
    return _init(CifarResNet(int(in_shape[0]), num_classes, widths, blocks, sc), init)


def _width(width, name: str) -> int:
    try:
        w = int(width)
    except (TypeError, ValueError):
        raise ConfigError(f"model {name!r}: width={width!r} must be an integer (channels of the first stage)") from None
    if w < 1 or w != width:
        raise ConfigError(f"model {name!r}: width={width!r} must be an integer >= 1")
    return w


@register_model("resnet20", "He et al. 2016 CIFAR ResNet-20 (3x3 stem, 3 stages x 3 blocks, 16/32/64 ch, BatchNorm, "
                            "shortcut A); options width, shortcut=A|B, init")
def resnet20(in_shape, num_classes, width: int = 16, shortcut: str = "A", init: str = "he"):
    w = _width(width, "resnet20")
    return _build("resnet20", in_shape, num_classes, [w, 2 * w, 4 * w], [3, 3, 3], shortcut, init)


@register_model("resnet56", "He et al. 2016 CIFAR ResNet-56 (3x3 stem, 3 stages x 9 blocks, 16/32/64 ch, BatchNorm, "
                            "shortcut A); options width, shortcut=A|B, init")
def resnet56(in_shape, num_classes, width: int = 16, shortcut: str = "A", init: str = "he"):
    w = _width(width, "resnet56")
    return _build("resnet56", in_shape, num_classes, [w, 2 * w, 4 * w], [9, 9, 9], shortcut, init)


@register_model("resnet18", "ResNet-18, CIFAR variant (3x3 stem, no max-pool, 4 stages x 2 blocks, 64-128-256-512 ch, "
                            "projection shortcuts); options width, shortcut=B|A, init")
def resnet18(in_shape, num_classes, width: int = 64, shortcut: str = "B", init: str = "he"):
    w = _width(width, "resnet18")
    return _build("resnet18", in_shape, num_classes, [w, 2 * w, 4 * w, 8 * w], [2, 2, 2, 2], shortcut, init)
