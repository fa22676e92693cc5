"""Invertible networks for GAIT-prop (Dalm, Ahmad, Ambrogioni, van Gerven; ``../shared/papers``
file 002, §2.1-2.2 and Appendix C; the authors' code is artcogsys/GAIT_prop_scaling).

One index convention throughout (the paper mixes two): layer ``l`` maps its input x_l (the
forwarded part of layer l-1's output) to the pre-activation a_l = W_l x_l + b_l and the output
h_l = f(a_l). An *invertible* layer is square, so its inverse is exact (Eq. 3, re-indexed):

    G_l(h_l) = W_l^{-1} (f^{-1}(h_l) - b_l).

Width changes go through *auxiliary units*: a square layer computes all of its ``width``
outputs, only the first ``keep`` pass forward, the rest are kept for the inverse (§2.2.3).
The first layer (e.g. 3072 -> 1024) is an ordinary non-square layer that is never inverted
(the authors' code: targets stop at the first hidden layer). The output layer is square and
linear (the authors' code; the paper's text says every layer is leaky-ReLU); its first C units
are the logits, the rest auxiliary.

The invertible convolution (Appendix C, Algorithm 2) has a k x k kernel with k^2 C_in output
channels, so its kernel reshapes to a square (k^2 C_in)^2 matrix M (row = output channel,
column = (c, kh, kw) of the receptive field). Its inverse is a transposed convolution with the
kernel of M^{-T}, which sums the exact reconstruction of every receptive field, minus
(n_x - 1) * x with x the layer's cached forward input and n_x the number of receptive fields
covering each input element: every input element is reconstructed exactly once while the
feedback of overlapping fields is summed. Padding is TensorFlow's 'same' (the authors' code).

Forward passes use the ordinary ``nn.Linear`` / ``nn.Conv2d`` submodules (``.linear``,
``.conv``), so backprop and feedback alignment (which swaps those modules' backward) run on
these nets unchanged; auxiliary units are simply not passed forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from creditlab.errors import ConfigError
from creditlab.models import register_model
from creditlab.models.activations import Activation, make_activation
from creditlab.models.init import check_init, init_weight_
from creditlab.models.mlp import parse_arch


def _activation(act: str | Activation, where: str, invertible: bool) -> Activation:
    f = make_activation(act) if isinstance(act, str) else act
    if invertible and not f.invertible:
        raise ConfigError(
            f"{where}: activation {f.name!r} is not invertible, so the layer has no exact inverse; "
            "use leaky_relu (slope > 0), linear, tanh or sigmoid"
        )
    return f


class InvertibleLayer(nn.Module):
    """Common interface: ``full(x) -> (a, h)`` (all ``width`` units), ``forward(x)`` (the first
    ``keep`` units of h), ``factorize()`` once per batch, ``inverse(h, factor, x)``."""

    act: Activation
    width: int
    keep: int
    invertible: bool

    def preact(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def full(self, x: Tensor) -> tuple[Tensor, Tensor]:
        a = self.preact(x)
        return a, self.act(a)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.preact(x))
        return h if self.keep == self.width else h[:, : self.keep]

    @property
    def weight(self) -> Tensor:
        raise NotImplementedError

    @property
    def bias(self) -> Tensor | None:
        raise NotImplementedError

    def square_matrix(self, weight: Tensor | None = None) -> Tensor:
        """The weight as the square matrix the inverse and the orthogonality regularizer use."""
        w = self.weight if weight is None else weight
        return w.reshape(w.shape[0], -1)

    def factorize(self) -> Any:
        raise NotImplementedError

    def inverse(self, h: Tensor, factor: Any = None, x: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def inverse_linear(self, dpre: Tensor, factor: Any = None, x: Tensor | None = None) -> Tensor:
        """The linear part of the inverse applied to a pre-activation difference:
        G(h + dh) - G(h) = inverse_linear(f^{-1}(h + dh) - f^{-1}(h))."""
        raise NotImplementedError

    def _require_invertible(self) -> None:
        if not self.invertible:
            raise ConfigError(
                f"{type(self).__name__} is the network's non-square first layer, which is never inverted "
                "(targets stop at the first hidden layer)"
            )


class InvertibleDense(InvertibleLayer):
    """Fully connected layer. ``invertible=True``: square ``width x width`` weight
    (width = in_features), of whose outputs the first ``keep`` pass forward (auxiliary units).
    ``invertible=False``: an ordinary ``in_features -> keep`` layer (the first layer)."""

    def __init__(
        self,
        in_features: int,
        keep: int,
        act: str | Activation = "leaky_relu(0.1)",
        invertible: bool = True,
        bias: bool = True,
        init: str = "orthogonal",
    ):
        super().__init__()
        if keep <= 0 or in_features <= 0:
            raise ConfigError(f"dense layer {in_features}->{keep}: sizes must be positive")
        if invertible and keep > in_features:
            raise ConfigError(
                f"dense layer {in_features}->{keep} cannot be inverted: a square layer of width {in_features} "
                f"forwards at most {in_features} units (auxiliary units can only narrow the forward width); "
                "make it the network's first (never inverted) layer, or keep widths non-increasing"
            )
        self.in_features = in_features
        self.invertible = invertible
        self.width = in_features if invertible else keep
        self.keep = keep
        self.act = _activation(act, f"dense layer {in_features}->{keep}", invertible)
        self.linear = nn.Linear(in_features, self.width, bias=bias)
        init_weight_(self.linear.weight, check_init(init))
        if bias:
            nn.init.zeros_(self.linear.bias)

    @property
    def weight(self) -> Tensor:
        return self.linear.weight

    @property
    def bias(self) -> Tensor | None:
        return self.linear.bias

    def preact(self, x: Tensor) -> Tensor:
        x = x.reshape(x.shape[0], -1)
        if x.shape[1] != self.in_features:
            raise ConfigError(f"dense layer expects {self.in_features} input features, got {x.shape[1]}")
        return self.linear(x)

    def factorize(self) -> tuple[Tensor, Tensor]:
        """LU factors of W^T (one factorisation per batch, shared by every sample). A row-major
        W is W^T in LAPACK's column-major order, so factoring W^T needs no transposing copy, and
        the batch's solves X W^T = Z (rows x = W^{-1} z) run as one untransposed-right-hand-side
        solve with these factors."""
        self._require_invertible()
        return torch.linalg.lu_factor(self.weight.detach().mT)

    def inverse(self, h: Tensor, factor: Any = None, x: Tensor | None = None) -> Tensor:
        """W^{-1} (f^{-1}(h) - b) for a batch (B, width) -> (B, in_features), one batched solve."""
        self._require_invertible()
        lu, piv = self.factorize() if factor is None else factor
        z = self.act.inverse(h)
        if self.bias is not None:
            z = z - self.bias.detach()
        return torch.linalg.lu_solve(lu, piv, z, left=False)  # rows: z W^{-T}, i.e. X W^T = Z

    def inverse_linear(self, dpre: Tensor, factor: Any = None, x: Tensor | None = None) -> Tensor:
        """W^{-1} dpre, batched."""
        self._require_invertible()
        lu, piv = self.factorize() if factor is None else factor
        return torch.linalg.lu_solve(lu, piv, dpre, left=False)

    def extra_repr(self) -> str:
        return f"width={self.width}, keep={self.keep}, invertible={self.invertible}, act={self.act.name}"


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int, int]:
    """TensorFlow 'SAME': (output size, pad before, pad after) along one axis."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return out, total // 2, total - total // 2


class InvertibleConv2d(InvertibleLayer):
    """k x k convolution with 'same' padding. ``invertible=True``: k^2 C_in output channels
    (the kernel reshapes to a square matrix), of which the first ``filters`` pass forward.
    ``invertible=False``: an ordinary ``filters``-channel convolution (the first layer)."""

    def __init__(
        self,
        in_channels: int,
        filters: int,
        kernel_size: int,
        stride: int = 1,
        act: str | Activation = "leaky_relu(0.1)",
        invertible: bool = True,
        bias: bool = True,
        init: str = "orthogonal",
    ):
        super().__init__()
        if min(in_channels, filters, kernel_size, stride) <= 0:
            raise ConfigError(f"conv layer ({kernel_size}, {stride}, {filters}): sizes must be positive")
        full = in_channels * kernel_size * kernel_size
        if invertible and filters > full:
            raise ConfigError(
                f"conv layer (kernel {kernel_size}, stride {stride}, filters {filters}) on {in_channels} channels "
                f"cannot be inverted: the square kernel has k^2 C_in = {full} output channels, fewer than "
                f"{filters} filters (Dalm et al. §2.2.3); lower the filters or make it the first layer"
            )
        self.in_channels, self.kernel_size, self.stride = in_channels, kernel_size, stride
        self.invertible = invertible
        self.width = full if invertible else filters
        self.keep = filters
        self.act = _activation(act, f"conv layer ({kernel_size}, {stride}, {filters})", invertible)
        self.conv = nn.Conv2d(in_channels, self.width, kernel_size, stride=stride, padding=0, bias=bias)
        init_weight_(self.conv.weight, check_init(init))
        if bias:
            nn.init.zeros_(self.conv.bias)
        self._counts: dict[tuple, Tensor] = {}

    @property
    def weight(self) -> Tensor:
        return self.conv.weight

    @property
    def bias(self) -> Tensor | None:
        return self.conv.bias

    def _pads(self, h: int, w: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        return same_padding(h, self.kernel_size, self.stride), same_padding(w, self.kernel_size, self.stride)

    def preact(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ConfigError(f"conv layer expects (B, {self.in_channels}, H, W) input, got {tuple(x.shape)}")
        (_, pt, pb), (_, pl, pr) = self._pads(x.shape[2], x.shape[3])
        return self.conv(F.pad(x, (pl, pr, pt, pb)))

    def _transpose(self, z: Tensor, kernel: Tensor, in_hw: tuple[int, int]) -> Tensor:
        """Transposed convolution back onto the (unpadded) input grid."""
        h, w = in_hw
        (_, pt, pb), (_, pl, pr) = self._pads(h, w)
        y = F.conv_transpose2d(z, kernel, stride=self.stride)
        hp, wp = h + pt + pb, w + pl + pr
        y = F.pad(y, (0, wp - y.shape[3], 0, hp - y.shape[2]))  # uncovered border (stride > kernel)
        return y[:, :, pt : pt + h, pl : pl + w]

    def overlap_counts(self, in_hw: tuple[int, int], like: Tensor) -> Tensor:
        """n_x: how many receptive fields cover each input element, shape (1, 1, H, W)."""
        key = (in_hw, like.device, like.dtype)
        if key not in self._counts:
            (ho, _, _), (wo, _, _) = self._pads(*in_hw)
            ones = torch.ones((1, 1, ho, wo), device=like.device, dtype=like.dtype)
            k = torch.ones((1, 1, self.kernel_size, self.kernel_size), device=like.device, dtype=like.dtype)
            self._counts[key] = self._transpose(ones, k, in_hw)
        return self._counts[key]

    def factorize(self) -> Tensor:
        """The inverse kernel: M^{-T} reshaped back to (k^2 C_in, C_in, k, k) (Algorithm 2)."""
        self._require_invertible()
        m = self.square_matrix(self.weight.detach())
        return torch.linalg.inv(m).transpose(0, 1).reshape(self.weight.shape)

    def inverse(self, h: Tensor, factor: Any = None, x: Tensor | None = None) -> Tensor:
        """Algorithm 2: x_hat = ConvTranspose(f^{-1}(h) - b, M^{-T}) - (n_x - 1) * x."""
        self._require_invertible()
        if x is None:
            raise ConfigError("the invertible convolution's inverse needs the layer's cached forward input x")
        kernel = self.factorize() if factor is None else factor
        z = self.act.inverse(h)
        if self.bias is not None:
            z = z - self.bias.detach()[None, :, None, None]
        in_hw = (x.shape[2], x.shape[3])
        rec = self._transpose(z, kernel, in_hw)
        return rec - (self.overlap_counts(in_hw, x) - 1.0) * x

    def inverse_linear(self, dpre: Tensor, factor: Any = None, x: Tensor | None = None) -> Tensor:
        """ConvTranspose(dpre, M^{-T}): the feedback of overlapping fields summed; the overlap
        correction, a function of the forward input only, cancels in a difference."""
        self._require_invertible()
        if x is None:
            raise ConfigError("the invertible convolution's inverse needs the layer's cached forward input x")
        kernel = self.factorize() if factor is None else factor
        return self._transpose(dpre, kernel, (x.shape[2], x.shape[3]))

    def extra_repr(self) -> str:
        return (f"kernel={self.kernel_size}, stride={self.stride}, width={self.width}, keep={self.keep}, "
                f"invertible={self.invertible}, act={self.act.name}")


@dataclass
class InvTrace:
    """One forward pass: ``inputs[l]`` is x_l (what layer l received), ``pre[l]`` a_l and
    ``outs[l]`` h_l = f(a_l), both with all ``width`` units (auxiliary ones included)."""

    inputs: list[Tensor]
    pre: list[Tensor]
    outs: list[Tensor]


class InvertibleNet(nn.Module):
    """A stack of invertible layers whose first layer is never inverted; ``forward`` returns
    the output layer's first ``num_classes`` units (the logits)."""

    def __init__(self, layers: Sequence[nn.Module]):
        super().__init__()
        layers = list(layers)
        if not layers:
            raise ConfigError("an invertible network needs at least one layer")
        for i, layer in enumerate(layers):
            if not isinstance(layer, InvertibleLayer):
                what = type(layer).__name__
                hint = " (max-pooling discards information and has no inverse)" if "Pool" in what else ""
                raise ConfigError(
                    f"layer {i} ({what}) is not invertible{hint}; GAIT-prop networks are built from "
                    "InvertibleDense and InvertibleConv2d layers with invertible activations"
                )
            if i > 0 and not layer.invertible:
                raise ConfigError(f"layer {i} is marked non-invertible; only the first layer may be")
        self.layers = nn.ModuleList(layers)
        self.num_classes = layers[-1].keep

    def forward(self, x: Tensor) -> Tensor:
        h = x
        for layer in self.layers:
            h = layer(h)
        return h

    def trace(self, x: Tensor) -> InvTrace:
        """Forward pass keeping every layer's input and full output; each layer's input is
        detached, so autograd through ``pre[l]`` reaches only layer l's own parameters."""
        inputs, pre, outs = [], [], []
        h = x
        for layer in self.layers:
            h = h.detach()
            a, out = layer.full(h)
            inputs.append(h)
            pre.append(a)
            outs.append(out)
            h = out[:, : layer.keep]
        return InvTrace(inputs, pre, outs)

    def invert_layer(self, l: int, h: Tensor, x: Tensor, factor: Any = None) -> Tensor:
        """G_l(h): the input of layer l (shaped like x, its cached forward input)."""
        return self.layers[l].inverse(h, factor, x).reshape(x.shape)

    def reconstruct(self, trace: InvTrace) -> list[Tensor]:
        """Invert from the output down, l = L-1..1, each layer fed the full output of the one
        above as reconstructed (forwarded units) plus its own auxiliary units. Returns the
        reconstructed inputs x_l for l = 1..L-1 (index 0 is the first layer's, not inverted)."""
        L = len(self.layers)
        rec: list[Tensor] = [trace.inputs[0]] + [torch.empty(0)] * (L - 1)
        h = trace.outs[-1]
        for l in range(L - 1, 0, -1):
            x = self.invert_layer(l, h, trace.inputs[l])
            rec[l] = x
            below = self.layers[l - 1]
            h = torch.cat([x, trace.outs[l - 1][:, below.keep :]], dim=1)
        return rec


# ----------------------------------------------------------------------------------------
# builders
# ----------------------------------------------------------------------------------------
def invertible_from_arch(
    arch: str | Sequence[int],
    act: str | Sequence[str] = "leaky_relu(0.1)",
    out_act: str = "linear",
    bias: bool = True,
    init: str = "orthogonal",
) -> InvertibleNet:
    """The invertible version of an MLP spec ``n0-n1-...-nL``: the first layer n0 -> n1 is
    ordinary (never inverted); each later layer is square on its input width n_l with the first
    n_{l+1} units forwarded (auxiliary units); the output layer is square on n_{L-1}, linear by
    default (the authors' code), its first nL units the logits. Widths after the first layer
    must not increase. ``out_act='softmax'`` is accepted as a synonym of linear logits; ``act`` may
    be one activation or one per hidden layer."""
    sizes = parse_arch(list(arch) if not isinstance(arch, str) else arch)
    spec = "-".join(map(str, sizes))
    acts = [act] * (len(sizes) - 2) if isinstance(act, str) else list(act)
    if len(acts) != len(sizes) - 2:
        raise ConfigError(f"arch {spec}: {len(acts)} hidden activations given for {len(sizes) - 2} hidden layers")
    for i in range(1, len(sizes) - 1):
        if sizes[i + 1] > sizes[i]:
            raise ConfigError(
                f"arch {spec}: layer {i} widens {sizes[i]} -> {sizes[i + 1]}, which has no exact inverse; "
                "after the first layer widths must be non-increasing (auxiliary units only narrow)"
            )
    n = len(sizes) - 1
    layers: list[nn.Module] = []
    for i in range(n):
        f = out_act if i == n - 1 else acts[i]
        if i == 0:
            layers.append(InvertibleDense(sizes[0], sizes[1], f, invertible=False, bias=bias, init=init))
        else:
            layers.append(InvertibleDense(sizes[i], sizes[i + 1], f, invertible=True, bias=bias, init=init))
    return InvertibleNet(layers)


def invertible_fc(in_features: int, num_classes: int, width: int, hidden: int, act: str = "leaky_relu(0.1)",
                  bias: bool = True, init: str = "orthogonal") -> InvertibleNet:
    """in -> width (first, not inverted), hidden-1 square width layers, square linear output."""
    if hidden < 1:
        raise ConfigError(f"hidden={hidden}: need at least one hidden layer")
    if num_classes > width:
        raise ConfigError(f"num_classes={num_classes} exceeds the square output width {width}")
    return invertible_from_arch([in_features] + [width] * hidden + [num_classes], act, "linear", bias, init)


# The ImageNet net of the authors' code (kernel, stride, filters); 'same' padding.
IMAGENET_CONV = ((9, 4, 24), (3, 2, 24), (5, 2, 48), (3, 2, 48), (3, 1, 96), (3, 2, 96), (3, 1, 192))


def invertible_convnet(
    in_shape: Sequence[int],
    num_classes: int,
    convs: Sequence[Sequence[int]] = IMAGENET_CONV,
    act: str = "leaky_relu(0.1)",
    bias: bool = True,
    init: str = "orthogonal",
) -> InvertibleNet:
    """Conv layers (k, s, filters), the first non-square and never inverted, then a square
    linear dense output on the flattened last conv output whose first ``num_classes`` units
    are the logits. A 'pool'/'maxpool' entry is refused (not invertible)."""
    if len(in_shape) != 3:
        raise ConfigError(f"the invertible conv net needs (C, H, W) inputs, got in_shape={tuple(in_shape)}")
    c, h, w = (int(v) for v in in_shape)
    layers: list[nn.Module] = []
    for i, entry in enumerate(convs):
        if isinstance(entry, str):
            raise ConfigError(
                f"conv layer {i}: {entry!r} is not invertible (max-pooling discards information and has no "
                "inverse, Dalm et al. §4); use strided invertible convolutions"
            )
        if len(entry) != 3:
            raise ConfigError(f"conv layer {i}: expected (kernel, stride, filters), got {entry!r}")
        k, s, filters = (int(v) for v in entry)
        layers.append(InvertibleConv2d(c, filters, k, s, act, invertible=i > 0, bias=bias, init=init))
        c, h, w = filters, same_padding(h, k, s)[0], same_padding(w, k, s)[0]
    flat = c * h * w
    if num_classes > flat:
        raise ConfigError(f"the last conv output has {flat} units, fewer than num_classes={num_classes}")
    layers.append(InvertibleDense(flat, num_classes, "linear", invertible=True, bias=bias, init=init))
    return InvertibleNet(layers)


def _features(in_shape: Sequence[int]) -> int:
    return int(math.prod(int(v) for v in in_shape))


@register_model("gait-cifar-shallow", "GAIT-prop FC net: in -> 1024 (not inverted), 2 square 1024 layers, square linear output (Dalm et al. Fig. 2)")
def gait_cifar_shallow(in_shape, num_classes, width: int = 1024, hidden: int = 3, act: str = "leaky_relu(0.1)",
                       bias: bool = True, init: str = "orthogonal") -> InvertibleNet:
    return invertible_fc(_features(in_shape), num_classes, width, hidden, act, bias, init)


@register_model("gait-cifar-deep", "GAIT-prop FC net with 6 hidden 1024 layers (Dalm et al. Fig. 2)")
def gait_cifar_deep(in_shape, num_classes, width: int = 1024, hidden: int = 6, act: str = "leaky_relu(0.1)",
                    bias: bool = True, init: str = "orthogonal") -> InvertibleNet:
    return invertible_fc(_features(in_shape), num_classes, width, hidden, act, bias, init)


@register_model("gait-conv", "GAIT-prop invertible conv net: 7 convs of the authors' ImageNet net + square dense output")
def gait_conv(in_shape, num_classes, convs: Sequence[Sequence[int]] | None = None, act: str = "leaky_relu(0.1)",
              bias: bool = True, init: str = "orthogonal") -> InvertibleNet:
    return invertible_convnet(in_shape, num_classes, IMAGENET_CONV if convs is None else convs, act, bias, init)


def require_invertible(model: nn.Module, algo: str) -> InvertibleNet:
    if not isinstance(model, InvertibleNet):
        raise ConfigError(
            f"algorithm {algo!r} needs an invertible network (square orthogonal layers, auxiliary units), got "
            f"{type(model).__name__}; use --model gait-cifar-shallow|gait-cifar-deep|gait-conv, or --arch with "
            "an invertible activation (the CLI then builds invertible_from_arch)"
        )
    return model


__all__ = [
    "InvertibleLayer", "InvertibleDense", "InvertibleConv2d", "InvertibleNet", "InvTrace",
    "invertible_from_arch", "invertible_fc", "invertible_convnet", "IMAGENET_CONV", "same_padding",
    "require_invertible",
]
