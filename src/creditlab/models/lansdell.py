"""The networks of Lansdell, Prakash & Kording (ICLR 2020), Appendix C, each in two variants:
``paper`` (the text of Appendix C) and ``authors`` (the authors' code: benlansdell/synthfeedback
for MNIST and the autoencoder, benlansdell/ssdfa for CIFAR).

``lansdell_mnist`` defaults to ``variant=authors`` (the authors' code, whose linear output
layer is what makes the paper's step sizes work; the paper's sigmoid output is
``variant=paper``); the autoencoder and the CNN default to ``variant=paper``, with the authors'
set-ups as ``variant=authors``. The shipped experiments name their variant.

* ``lansdell_mnist``: 784-50-20-10 MLP with sigmoid hidden layers. ``variant=paper``: the output
  is y = sigma(W h) too (§2; Appendix C.1); ``variant=authors``: the authors' code (NPModel4*,
  y = W h + b, a linear output), which the MNIST experiments use. The output
  sigmoid matters: with MSE, SGD at the paper's step size (our lr 2e-4), backprop is at 88.6 %
  test error after 3 epochs with it and at 21.2 % without (its derivative, at most 1/4, shrinks
  every output error). The width of the first hidden layer is an option (``hidden``) for the
  784-N-50-10 sweep of Fig. 4D/E (then use ``hidden2=50``).
* ``lansdell_autoencoder``: 784-200-2-200-784 MLP with tanh, identity, tanh, relu (C.2). The
  output width is the input size (the target is the flattened input). In the authors' code only
  BP, FA, DAE and BP(Adam) use 200 hidden units (AENPModel5_ExactLsq_*, _DAE, _ADAM); node
  perturbation, synthetic gradients and the matched baseline (AENPModel5, _SynthGrad, _Matched)
  build 784-50-2-50-784: ``hidden=50`` (experiments/np-autoencoder-authors.yaml).
* ``lansdell_cnn``: the CIFAR CNN of C.4 (after Crafton et al. 2019). ``variant=paper``:
  Conv(3x3, stride 1, 32), MaxPool(3x3, stride 2), Conv(5x5, 1, 128), MaxPool(3x3, 2),
  Conv(5x5, 1, 256), MaxPool(3x3, 2), FC 2048, FC 2048, FC ``num_classes`` (logits; softmax in
  the cross-entropy loss), dropout 0.5 after each hidden FC layer, ReLU. ``variant=authors``
  (ssdfa/cifar10_conv*.py): the first conv is 5x5 with 96 channels, tanh everywhere, biases
  initialised to 0.1 (the weights' U(+-1/sqrt(fan_in)) is PyTorch's default for both), and
  every image standardised on its own first (TensorFlow's per_image_standardization:
  (x - mean) / max(std, 1/sqrt(numel)) over the image's pixels and channels). Padding is "same"
  in both (conv: k // 2; pool: 1), so a 32x32 input gives 16, 8, 4 pixels after the pools and
  256*4*4 = 4096 features. An ``nn.Sequential`` (the feedback learners split it into blocks at
  each Conv/Linear; the standardisation is a parameter-free first module), with an ``in_shape``
  attribute. The authors' CIFAR runs also use batch 128 and train B by plain SGD while W uses
  Adam (``np:...,b_optimizer=sgd``): experiments/np-cifar10-authors.yaml.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from creditlab.errors import ConfigError
from creditlab.models import MLP, register_model
from creditlab.models.activations import make_activation


def _flat(in_shape: tuple[int, ...]) -> int:
    return int(math.prod(in_shape))


VARIANTS = ("paper", "authors")


def _variant(model: str, variant: str) -> str:
    v = str(variant).strip().lower()
    if v not in VARIANTS:
        raise ConfigError(f"{model}: variant={variant!r}; valid: {', '.join(VARIANTS)}")
    return v


@register_model("lansdell_mnist")
def lansdell_mnist(in_shape, num_classes, hidden: int = 50, hidden2: int = 20, init: str = "xavier_normal",
                   bias: bool = True, out_act: str | None = None, variant: str = "authors") -> MLP:
    """784-50-20-10 sigmoid MLP, Lansdell et al. 2020 Fig. 2: the authors' code's linear output
    (``variant=authors``, the default, what experiments/np-mnist*.yaml use) or the paper's
    sigmoid output (``variant=paper``); ``out_act`` overrides either."""
    v = _variant("lansdell_mnist", variant)
    if out_act is None:
        out_act = "sigmoid" if v == "paper" else "linear"
    sizes = [_flat(in_shape), int(hidden), int(hidden2), int(num_classes)]
    return MLP(sizes, act="sigmoid", out_act=out_act, bias=bias, init=init)


@register_model("lansdell_autoencoder")
def lansdell_autoencoder(in_shape, num_classes=None, hidden: int = 200, latent: int = 2, init: str = "xavier_normal") -> MLP:
    """784-200-2-200-784 autoencoder (tanh, identity, tanh, relu), Lansdell et al. 2020 Fig. 3
    (``hidden=50``: the authors' NP, SG and matched networks)."""
    n = _flat(in_shape)
    return MLP([n, int(hidden), int(latent), int(hidden), n], act=["tanh", "linear", "tanh"], out_act="relu", init=init)


class PerImageStandardization(nn.Module):
    """(x - mean) / max(std, 1/sqrt(N)) per sample over its N = C H W values (TensorFlow's
    ``tf.image.per_image_standardization``, population std)."""

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(x.shape[0], -1)
        mean = flat.mean(dim=1, keepdim=True)
        std = flat.std(dim=1, unbiased=False, keepdim=True)
        floor = torch.full_like(std, 1.0 / math.sqrt(flat.shape[1]))
        return ((flat - mean) / torch.maximum(std, floor)).reshape(x.shape)


class LansdellCNN(nn.Sequential):
    """CIFAR CNN of Appendix C.4 (see the module docstring)."""

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, act: str = "relu", dropout: float = 0.5,
                 channels: tuple[int, int, int] = (32, 128, 256), fc: int = 2048,
                 kernels: tuple[int, int, int] = (3, 5, 5), standardize: bool = False,
                 bias_init: float | None = None):
        if len(in_shape) != 3:
            raise ConfigError(f"lansdell_cnn needs image input (C, H, W), got in_shape {tuple(in_shape)}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"lansdell_cnn: dropout={dropout} must be in [0, 1)")
        c, h, w = (int(s) for s in in_shape)
        c1, c2, c3 = (int(s) for s in channels)
        mods: list[nn.Module] = [PerImageStandardization()] if standardize else []
        for cin, cout, k in zip((c, c1, c2), (c1, c2, c3), (int(k) for k in kernels)):
            mods += [nn.Conv2d(cin, cout, k, stride=1, padding=k // 2), make_activation(act),
                     nn.MaxPool2d(3, stride=2, padding=1)]
            h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
        mods.append(nn.Flatten())
        feat = c3 * h * w
        for fin, fout in ((feat, fc), (fc, fc)):
            mods += [nn.Linear(fin, fout), make_activation(act), nn.Dropout(dropout)]
        mods.append(nn.Linear(fc, int(num_classes)))
        super().__init__(*mods)
        if bias_init is not None:
            with torch.no_grad():
                for m in self:
                    if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                        m.bias.fill_(float(bias_init))
        self.in_shape = (c, int(in_shape[1]), int(in_shape[2]))


@register_model("lansdell_cnn")
def lansdell_cnn(in_shape, num_classes, act: str | None = None, dropout: float = 0.5, width: float = 1.0,
                 variant: str = "paper", standardize: bool | None = None) -> LansdellCNN:
    """CIFAR-10/100 CNN of Lansdell et al. 2020 (Appendix C.4): ``variant=paper`` (3x3x32 first
    conv, ReLU) or ``variant=authors`` (5x5x96 first conv, tanh, biases 0.1, per-image
    standardisation); ``act`` and ``standardize`` override the variant's; ``width`` scales every
    layer (tests)."""
    v = _variant("lansdell_cnn", variant)
    authors = v == "authors"
    first, k1 = (96, 5) if authors else (32, 3)
    ch = tuple(max(1, int(round(c * width))) for c in (first, 128, 256))
    return LansdellCNN(tuple(in_shape), int(num_classes), act=act or ("tanh" if authors else "relu"),
                       dropout=dropout, channels=ch, fc=max(1, int(round(2048 * width))), kernels=(k1, 5, 5),
                       standardize=authors if standardize is None else bool(standardize),
                       bias_init=0.1 if authors else None)
