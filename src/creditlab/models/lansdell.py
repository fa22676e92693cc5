"""The networks of Lansdell, Prakash & Kording (ICLR 2020), Appendix C.

* ``lansdell_mnist``: 784-50-20-10 MLP with a sigmoid at every layer, the output included
  (y = sigma(W h), §2; Appendix C.1; the authors' code has a linear output: ``out_act=linear``).
  The width of the first hidden layer is an option
  (``hidden``) for the 784-N-50-10 sweep of Fig. 4D/E (then use ``hidden2=50``).
* ``lansdell_autoencoder``: 784-200-2-200-784 MLP with tanh, identity, tanh, relu (C.2).
  The output width is the input size (the target is the flattened input).
* ``lansdell_cnn``: the CIFAR CNN of C.4 (after Crafton et al. 2019): Conv(3x3, stride 1, 32),
  MaxPool(3x3, stride 2), Conv(5x5, 1, 128), MaxPool(3x3, 2), Conv(5x5, 1, 256),
  MaxPool(3x3, 2), FC 2048, FC 2048, FC ``num_classes`` (logits; softmax in the
  cross-entropy loss), dropout 0.5 after each hidden FC layer. Padding is not published: we use
  "same" padding (conv: k // 2; pool: 1), so a 32x32 input gives 16, 8, 4 pixels after the
  pools and 256*4*4 = 4096 features. An ``nn.Sequential`` (the feedback learners split it
  into blocks at each Conv/Linear), with an ``in_shape`` attribute.
"""

from __future__ import annotations

import math

from torch import nn

from creditlab.errors import ConfigError
from creditlab.models import MLP, register_model
from creditlab.models.activations import make_activation


def _flat(in_shape: tuple[int, ...]) -> int:
    return int(math.prod(in_shape))


@register_model("lansdell_mnist")
def lansdell_mnist(in_shape, num_classes, hidden: int = 50, hidden2: int = 20, init: str = "xavier_normal",
                   bias: bool = True, out_act: str = "sigmoid") -> MLP:
    """784-50-20-10 sigmoid MLP (sigmoid output), Lansdell et al. 2020 Fig. 2.

    ``out_act=linear`` gives the authors' code (NPModel4*: y = W h, no output sigmoid)."""
    sizes = [_flat(in_shape), int(hidden), int(hidden2), int(num_classes)]
    return MLP(sizes, act="sigmoid", out_act=out_act, bias=bias, init=init)


@register_model("lansdell_autoencoder")
def lansdell_autoencoder(in_shape, num_classes=None, hidden: int = 200, latent: int = 2, init: str = "xavier_normal") -> MLP:
    """784-200-2-200-784 autoencoder (tanh, identity, tanh, relu), Lansdell et al. 2020 Fig. 3."""
    n = _flat(in_shape)
    return MLP([n, int(hidden), int(latent), int(hidden), n], act=["tanh", "linear", "tanh"], out_act="relu", init=init)


class LansdellCNN(nn.Sequential):
    """CIFAR CNN of Appendix C.4 (see the module docstring)."""

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, act: str = "relu", dropout: float = 0.5,
                 channels: tuple[int, int, int] = (32, 128, 256), fc: int = 2048):
        if len(in_shape) != 3:
            raise ConfigError(f"lansdell_cnn needs image input (C, H, W), got in_shape {tuple(in_shape)}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"lansdell_cnn: dropout={dropout} must be in [0, 1)")
        c, h, w = (int(s) for s in in_shape)
        c1, c2, c3 = (int(s) for s in channels)
        mods: list[nn.Module] = []
        for cin, cout, k in ((c, c1, 3), (c1, c2, 5), (c2, c3, 5)):
            mods += [nn.Conv2d(cin, cout, k, stride=1, padding=k // 2), make_activation(act),
                     nn.MaxPool2d(3, stride=2, padding=1)]
            h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
        mods.append(nn.Flatten())
        feat = c3 * h * w
        for fin, fout in ((feat, fc), (fc, fc)):
            mods += [nn.Linear(fin, fout), make_activation(act), nn.Dropout(dropout)]
        mods.append(nn.Linear(fc, int(num_classes)))
        super().__init__(*mods)
        self.in_shape = (c, int(in_shape[1]), int(in_shape[2]))


@register_model("lansdell_cnn")
def lansdell_cnn(in_shape, num_classes, act: str = "relu", dropout: float = 0.5, width: float = 1.0) -> LansdellCNN:
    """CIFAR-10/100 CNN of Lansdell et al. 2020 (Appendix C.4); ``width`` scales every layer (tests)."""
    ch = tuple(max(1, int(round(c * width))) for c in (32, 128, 256))
    return LansdellCNN(tuple(in_shape), int(num_classes), act=act, dropout=dropout, channels=ch,
                       fc=max(1, int(round(2048 * width))))
