"""The architectures of Bartunov et al. (2018), Table 3 (appendix): fully connected (FC),
locally connected (LC, no weight sharing) and, for the "BP convnet" baseline, the same shapes
as convolutions. tanh between layers, Glorot (xavier uniform) init, zero biases, and a linear
output of logits for softmax cross-entropy (§3: "All layers are initialized using the method
suggested by Glorot & Bengio ... we used the hyperbolic tangent as a nonlinearity").

LC/conv layers are given as (kernel, channels, stride) with zero padding kernel//2, so stride 1
keeps the spatial shape; there is no pooling and no final spatial averaging: the last LC map is
flattened into the FC layers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from creditlab.errors import ConfigError
from creditlab.models import register_model
from creditlab.models.activations import make_activation
from creditlab.models.init import check_init, init_weight_
from creditlab.models.locally_connected import LocallyConnected2d
from creditlab.models.mlp import MLP

# Table 3 (kernel, channels, stride) of the LC / conv stacks, then FC widths.
TABLE3: dict[str, tuple[list[tuple[int, int, int]], list[int]]] = {
    "mnist": ([(3, 32, 2), (3, 64, 2)], [1024]),
    "cifar": ([(5, 64, 2), (5, 128, 2), (3, 256, 1)], [1024]),
    "imagenet": ([(9, 48, 4), (3, 48, 2), (5, 96, 1), (3, 96, 2), (3, 192, 1), (3, 192, 2), (3, 384, 1)], []),
}
FC_WIDTHS = {"mnist": [256] * 5, "cifar": [1024] * 3}


class LayerStack(nn.Module):
    """A chain h_{l+1} = f_l(layer_l(h_l)) of Linear / Conv2d / LocallyConnected2d layers.

    Like :class:`~creditlab.models.MLP` it exposes ``layers`` and ``acts`` (the target-
    propagation algorithms work on either); a Linear layer flattens a spatial input.
    """

    def __init__(self, layers: list[nn.Module], acts: list[str], init: str = "xavier"):
        super().__init__()
        if len(layers) != len(acts):
            raise ConfigError(f"{len(layers)} layers but {len(acts)} activations")
        self.layers = nn.ModuleList(layers)
        self.acts = nn.ModuleList(make_activation(a) for a in acts)
        self.init_spec = check_init(init)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for layer in self.layers:
            if isinstance(layer, LocallyConnected2d):
                layer.reset_parameters(self.init_spec)
                continue
            init_weight_(layer.weight, self.init_spec)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)

    @staticmethod
    def layer_input(layer: nn.Module, h: Tensor) -> Tensor:
        return h.flatten(1) if isinstance(layer, nn.Linear) and h.dim() > 2 else h

    def forward(self, x: Tensor) -> Tensor:
        h = x
        for layer, f in zip(self.layers, self.acts):
            h = f(layer(self.layer_input(layer, h)))
        return h

    def trace(self, x: Tensor) -> list[Tensor]:
        """[h_0 = x, h_1, ..., h_L]."""
        hs = [x]
        for layer, f in zip(self.layers, self.acts):
            hs.append(f(layer(self.layer_input(layer, hs[-1]))))
        return hs


def _image_shape(in_shape: tuple[int, ...], model: str) -> tuple[int, int, int]:
    if len(in_shape) != 3:
        raise ConfigError(f"model {model!r} needs image input (C, H, W), got shape {tuple(in_shape)}")
    return int(in_shape[0]), int(in_shape[1]), int(in_shape[2])


def spatial_stack(kind: str, in_shape: tuple[int, ...], num_classes: int, table: str, act: str = "tanh",
                  init: str = "xavier", bias: bool = True) -> LayerStack:
    """Table 3's ``table`` row as LC (``kind="lc"``) or conv (``kind="conv"``) layers + FC + logits."""
    convs, fcs = TABLE3[table]
    c, h, w = _image_shape(in_shape, f"{table}-{kind}")
    layers: list[nn.Module] = []
    for k, o, s in convs:
        if kind == "lc":
            layer: nn.Module = LocallyConnected2d(c, o, k, s, in_size=(h, w), bias=bias)
            h, w = layer.out_size
        else:
            layer = nn.Conv2d(c, o, k, s, padding=k // 2, bias=bias)
            h, w = (h + 2 * (k // 2) - k) // s + 1, (w + 2 * (k // 2) - k) // s + 1
        if h <= 0 or w <= 0:
            raise ConfigError(f"input {tuple(in_shape)} is too small for the {table}-{kind} net (Table 3)")
        layers.append(layer)
        c = o
    width = c * h * w
    for n in fcs:
        layers.append(nn.Linear(width, n, bias=bias))
        width = n
    layers.append(nn.Linear(width, num_classes, bias=bias))
    return LayerStack(layers, [act] * (len(layers) - 1) + ["softmax"], init=init)


def fc_net(in_shape: tuple[int, ...], num_classes: int, table: str, act: str = "tanh", init: str = "xavier",
           bias: bool = True) -> MLP:
    n_in = 1
    for d in in_shape:
        n_in *= int(d)
    return MLP([n_in, *FC_WIDTHS[table], num_classes], act=act, out_act="softmax", bias=bias, init=init)


@register_model("mnist-fc")
def mnist_fc(in_shape: tuple[int, ...], num_classes: int, **opts: Any) -> nn.Module:
    """Bartunov et al. Table 3 MNIST FC: 5 x FC256 tanh, logits (an MLP)."""
    return fc_net(in_shape, num_classes, "mnist", **opts)


@register_model("cifar-fc")
def cifar_fc(in_shape: tuple[int, ...], num_classes: int, **opts: Any) -> nn.Module:
    """Bartunov et al. Table 3 CIFAR FC: 3 x FC1024 tanh, logits (an MLP)."""
    return fc_net(in_shape, num_classes, "cifar", **opts)


@register_model("mnist-lc")
def mnist_lc(in_shape: tuple[int, ...], num_classes: int, **opts: Any) -> nn.Module:
    """Bartunov et al. Table 3 MNIST LC: (3x3,32,s2), (3x3,64,s2), FC1024, logits."""
    return spatial_stack("lc", in_shape, num_classes, "mnist", **opts)


@register_model("cifar-lc")
def cifar_lc(in_shape: tuple[int, ...], num_classes: int, **opts: Any) -> nn.Module:
    """Bartunov et al. Table 3 CIFAR LC: (5x5,64,s2), (5x5,128,s2), (3x3,256,s1), FC1024, logits."""
    return spatial_stack("lc", in_shape, num_classes, "cifar", **opts)


@register_model("imagenet-lc")
def imagenet_lc(in_shape: tuple[int, ...], num_classes: int, **opts: Any) -> nn.Module:
    """Bartunov et al. Table 3 ImageNet LC: 7 LC layers (9x9,48,s4) ... (3x3,384,s1), logits."""
    return spatial_stack("lc", in_shape, num_classes, "imagenet", **opts)


@register_model("mnist-conv")
def mnist_conv(in_shape: tuple[int, ...], num_classes: int, **opts: Any) -> nn.Module:
    """The MNIST LC net of Table 3 with shared weights (conv): the 'BP convnet' baseline."""
    return spatial_stack("conv", in_shape, num_classes, "mnist", **opts)


@register_model("cifar-conv")
def cifar_conv(in_shape: tuple[int, ...], num_classes: int, **opts: Any) -> nn.Module:
    """The CIFAR LC net of Table 3 with shared weights (conv): the 'BP convnet' baseline."""
    return spatial_stack("conv", in_shape, num_classes, "cifar", **opts)


@register_model("imagenet-conv")
def imagenet_conv(in_shape: tuple[int, ...], num_classes: int, **opts: Any) -> nn.Module:
    """The ImageNet LC net of Table 3 with shared weights (conv)."""
    return spatial_stack("conv", in_shape, num_classes, "imagenet", **opts)


def memory_mib(model: nn.Module, dtype: torch.dtype = torch.float32) -> float:
    n = sum(p.numel() for p in model.parameters())
    return n * torch.empty((), dtype=dtype).element_size() / 2**20
