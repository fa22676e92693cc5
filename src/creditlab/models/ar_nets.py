"""Built-in graph models for graph Activation Relaxation (AR paper, Appendices A and C).

Test graphs (small, any input shape: the input is flattened first): ``resmlp`` (residual MLP),
``branch-add`` and ``branch-concat`` (two branches merged by addition / concatenation),
``fanout3`` (one node feeding three children whose paths to the output differ in length),
``conv-pool`` (conv + max-pool + flatten + linear). CNNs: ``ar-cnn`` (Appendix C's CIFAR-10
CNN) and ``lenet5``. All use tanh hidden units and a linear output, as Appendix C states.

Reading of Appendix C chosen for ``ar-cnn`` (the text gives filter counts only): two 5x5
convolutions with 'same' zero padding (2) and stride 1, 3->32 and 32->64 filters, each
followed by tanh and 2x2 max-pooling (stride 2); then the fully connected layers "of 64, 120
and 10 neurons" read as three Linear layers flatten->64->120->10 (the appendix's "two fully
connected layers" counted as the two hidden ones, 64 and 120, before the 10-unit output).
``fc=120`` gives the other reading (64 taken as the channels entering the FC stack: two FC
layers flatten->120->10). For 3x32x32 input the flatten has 64*8*8 = 4096 units; for
1x28x28 (MNIST-shaped) 64*7*7 = 3136.

``lenet5``: conv 5x5 C->6 (no padding), tanh, maxpool 2, conv 5x5 6->16, tanh, maxpool 2,
flatten, FC 120, 84, num_classes (tanh hidden, linear output). 3x32x32 -> 16*5*5 = 400
flattened units; 1x28x28 -> 16*4*4 = 256.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from creditlab.errors import ConfigError
from creditlab.models import make_activation, register_model
from creditlab.models.init import init_module_


def _init(module: nn.Module, init: str) -> nn.Module:
    """init_weight_ on every Linear/Conv2d weight, zero biases; records ``init_spec``."""
    return init_module_(module, init)


def _features(in_shape: tuple[int, ...]) -> int:
    return int(math.prod(in_shape))


def _image_shape(in_shape: tuple[int, ...], model: str) -> tuple[int, int, int]:
    if len(in_shape) != 3:
        raise ConfigError(f"model {model!r} needs image input (C, H, W), got in_shape={tuple(in_shape)}; "
                          "use an image dataset (mnist, cifar10, ...)")
    return int(in_shape[0]), int(in_shape[1]), int(in_shape[2])


class ResMLP(nn.Module):
    """x -> h0 = f(W_in x); h_{b+1} = h_b + f(W_b h_b) (b < blocks); out = W_out h_B."""

    def __init__(self, n_in: int, hidden: int, n_out: int, blocks: int, act: str):
        super().__init__()
        self.flatten = nn.Flatten()
        self.inp = nn.Linear(n_in, hidden)
        self.act_in = make_activation(act)
        self.blocks = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(blocks))
        self.acts = nn.ModuleList(make_activation(act) for _ in range(blocks))
        self.out = nn.Linear(hidden, n_out)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act_in(self.inp(self.flatten(x)))
        for lin, f in zip(self.blocks, self.acts):
            h = h + f(lin(h))
        return self.out(h)


class Branches(nn.Module):
    """h = f(W_0 x); a = f(W_a h); b = f(W_b f(W_b2 h)) (longer branch); merge by add or concat."""

    def __init__(self, n_in: int, hidden: int, n_out: int, merge: str, act: str):
        super().__init__()
        self.merge = merge
        self.flatten = nn.Flatten()
        self.inp = nn.Linear(n_in, hidden)
        self.fa = nn.Linear(hidden, hidden)
        self.fb2 = nn.Linear(hidden, hidden)
        self.fb = nn.Linear(hidden, hidden)
        self.f0, self.f1, self.f2, self.f3 = (make_activation(act) for _ in range(4))
        self.out = nn.Linear(2 * hidden if merge == "concat" else hidden, n_out)

    def forward(self, x: Tensor) -> Tensor:
        h = self.f0(self.inp(self.flatten(x)))
        a = self.f1(self.fa(h))
        b = self.f3(self.fb(self.f2(self.fb2(h))))
        z = torch.cat([a, b], dim=1) if self.merge == "concat" else a + b
        return self.out(z)


class FanOut3(nn.Module):
    """h feeds three children: a = f(W_a h), b = f(W_b h) * h (product with h itself),
    c = f(W_d f(W_c h)); out = W_o (a + b + c) + W_s h (h also skips to the output)."""

    def __init__(self, n_in: int, hidden: int, n_out: int, act: str):
        super().__init__()
        self.flatten = nn.Flatten()
        self.inp = nn.Linear(n_in, hidden)
        self.fa, self.fb, self.fc, self.fd = (nn.Linear(hidden, hidden) for _ in range(4))
        self.g0, self.g1, self.g2, self.g3, self.g4 = (make_activation(act) for _ in range(5))
        self.out = nn.Linear(hidden, n_out)
        self.skip = nn.Linear(hidden, n_out, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.g0(self.inp(self.flatten(x)))
        a = self.g1(self.fa(h))
        b = self.g2(self.fb(h)) * h
        c = self.g4(self.fd(self.g3(self.fc(h))))
        return self.out(a + b + c) + self.skip(h)


class ConvPool(nn.Module):
    """conv 3x3 (pad 1) C->channels, tanh, maxpool 2, flatten, linear."""

    def __init__(self, in_shape: tuple[int, int, int], channels: int, n_out: int, act: str):
        super().__init__()
        c, h, w = in_shape
        self.conv = nn.Conv2d(c, channels, 3, padding=1)
        self.f = make_activation(act)
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels * (h // 2) * (w // 2), n_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.flatten(self.pool(self.f(self.conv(x)))))


def _cnn(in_shape: tuple[int, int, int], convs: list[tuple[int, int, int]], fc: list[int], n_out: int,
         act: str, name: str) -> nn.Sequential:
    """conv(k, pad) -> act -> maxpool 2 per entry (out_channels, kernel, padding), flatten, FCs."""
    c, h, w = in_shape
    mods: list[nn.Module] = []
    for out_c, k, pad in convs:
        mods += [nn.Conv2d(c, out_c, k, padding=pad), make_activation(act), nn.MaxPool2d(2)]
        c, h, w = out_c, (h + 2 * pad - k + 1) // 2, (w + 2 * pad - k + 1) // 2
        if h < 1 or w < 1:
            raise ConfigError(f"model {name!r}: input {in_shape} is too small for its convolutions and pooling")
    mods.append(nn.Flatten())
    n = c * h * w
    for m in fc:
        mods += [nn.Linear(n, m), make_activation(act)]
        n = m
    mods += [nn.Linear(n, n_out), make_activation("linear")]
    return nn.Sequential(*mods)


def _hidden_list(v: int | str | list[int], name: str) -> list[int]:
    if isinstance(v, int):
        return [v]
    if isinstance(v, str):
        try:
            return [int(s) for s in v.split("-") if s]
        except ValueError:
            raise ConfigError(f"model {name!r}: fc={v!r} must be sizes joined by '-', e.g. '64-120'") from None
    return [int(s) for s in v]


@register_model("resmlp", "residual MLP: tanh blocks h + f(W h), linear output (graph-AR test graph)")
def resmlp(in_shape, num_classes, hidden: int = 16, blocks: int = 2, act: str = "tanh", init: str = "xavier"):
    return _init(ResMLP(_features(in_shape), hidden, num_classes, blocks, act), init)


@register_model("branch-add", "two branches of different depth merged by addition (graph-AR test graph)")
def branch_add(in_shape, num_classes, hidden: int = 16, act: str = "tanh", init: str = "xavier"):
    return _init(Branches(_features(in_shape), hidden, num_classes, "add", act), init)


@register_model("branch-concat", "two branches of different depth merged by concatenation (graph-AR test graph)")
def branch_concat(in_shape, num_classes, hidden: int = 16, act: str = "tanh", init: str = "xavier"):
    return _init(Branches(_features(in_shape), hidden, num_classes, "concat", act), init)


@register_model("fanout3", "one node feeding three children plus a skip (graph-AR test graph)")
def fanout3(in_shape, num_classes, hidden: int = 16, act: str = "tanh", init: str = "xavier"):
    return _init(FanOut3(_features(in_shape), hidden, num_classes, act), init)


@register_model("conv-pool", "conv 3x3 + tanh + maxpool 2 + flatten + linear (graph-AR test graph)")
def conv_pool(in_shape, num_classes, channels: int = 4, act: str = "tanh", init: str = "xavier"):
    return _init(ConvPool(_image_shape(in_shape, "conv-pool"), channels, num_classes, act), init)


@register_model("ar-cnn", "AR paper Appendix C CNN: conv5x5 32, pool, conv5x5 64, pool, FC 64-120-10, tanh")
def ar_cnn(in_shape, num_classes, fc: int | str | list[int] = "64-120", act: str = "tanh", init: str = "xavier"):
    shape = _image_shape(in_shape, "ar-cnn")
    net = _cnn(shape, [(32, 5, 2), (64, 5, 2)], _hidden_list(fc, "ar-cnn"), num_classes, act, "ar-cnn")
    return _init(net, init)


@register_model("lenet5", "LeNet-5-style CNN: conv5x5 6, pool, conv5x5 16, pool, FC 120-84, tanh, linear output")
def lenet5(in_shape, num_classes, act: str = "tanh", init: str = "xavier"):
    shape = _image_shape(in_shape, "lenet5")
    return _init(_cnn(shape, [(6, 5, 0), (16, 5, 0)], [120, 84], num_classes, act, "lenet5"), init)
