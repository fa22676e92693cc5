"""``vgg5``: the VGG-5 that PCX benchmarks on CIFAR-10 with predictive coding and backprop.

PCX (liukidar/pcx, tag v0.6.1, commit eaf42b18,
``examples/s4_1_discriminative_mode/VGG5/cifar10/PC_CE.py`` lines 36-72, the same network in
``BP_CE.py``, ``PC_SE.py`` and ``BP_SE.py`` there) trains four blocks of conv 3x3 (stride 1,
padding 1), activation, max-pool 2 (stride 2), with 128, 256, 512 and 512 channels, then one
Linear layer from the flattened 512x2x2 map to the classes: four convolutions and one linear
layer, hence "5". Every layer has a bias. The activation is the config's ``act_fn: gelu``
(every VGG-5 CIFAR-10 config there), ``jax.nn.gelu``, whose default is the tanh approximation:
here ``nn.GELU(approximate="tanh")``. PCX's layers wrap equinox's, whose default initialisation
draws weights and biases uniformly in +-1/sqrt(fan_in), which is PyTorch's default for
``nn.Conv2d`` and ``nn.Linear``; this model keeps it (``init=default``).

``width`` (default 128, PCX's) is the first block's channels; the blocks have width, 2 width,
4 width and 4 width (128, 256, 512, 512). The input must be C x H x W with H and W divisible by
16 (four poolings); the head reads 4 width x H/16 x W/16 (512 x 2 x 2 on CIFAR-10).

Where predictive coding puts its value nodes differs: PCX has one after each block (after the
pooling) and the output; creditlab's ``pc`` relaxes every unit of the traced graph (each
convolution with its activation, each pooling, the output; ``docs/predictive_coding.md``). The
forward network, and so backprop, FA and AR on it, are PCX's.
"""

from __future__ import annotations

from torch import Tensor, nn

from creditlab.errors import ConfigError
from creditlab.models import register_model
from creditlab.models.init import init_module_


class VGG5(nn.Module):
    def __init__(self, channels: int, num_classes: int, width: int, spatial: tuple[int, int]):
        super().__init__()
        widths = (width, 2 * width, 4 * width, 4 * width)
        layers: list[nn.Module] = []
        c_in = channels
        for c_out in widths:
            layers += [nn.Conv2d(c_in, c_out, 3, stride=1, padding=1), nn.GELU(approximate="tanh"),
                       nn.MaxPool2d(2, stride=2)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c_in * (spatial[0] // 16) * (spatial[1] // 16), num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


@register_model("vgg5", "PCX's VGG-5: 4 x (conv3x3 pad 1, GELU (tanh), max-pool 2) with 128-256-512-512 "
                        "channels, Linear head; options width, init")
def vgg5(in_shape, num_classes, width: int = 128, init: str = "default"):
    if len(in_shape) != 3:
        raise ConfigError(f"model 'vgg5' takes images (C, H, W); the data give shape {tuple(in_shape)}")
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ConfigError(f"model 'vgg5': width={width!r} must be a positive integer (PCX's is 128)")
    h, w = int(in_shape[1]), int(in_shape[2])
    if h % 16 or w % 16:
        raise ConfigError(f"model 'vgg5': the images are {h}x{w}; its four 2x2 poolings need sides divisible "
                          f"by 16 (CIFAR-10's 32x32)")
    return init_module_(VGG5(int(in_shape[0]), num_classes, width, (h, w)), init, keep_default=True)
