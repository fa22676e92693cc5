"""``lenet-biotorch``: the LeNet that BioTorch benchmarks on MNIST and Fashion-MNIST.

BioTorch (jsalbert/biotorch, ``biotorch/models/le_net.py``, ``LeNetMNIST``; its Benchmarks.md
table "MNIST & Fashion-MNIST") trains conv 5x5 1->6, ReLU, max-pool 2, conv 5x5 6->16, ReLU,
max-pool 2, conv 5x5 16->120, ReLU, flatten, Linear 120->84, ReLU, Linear 84->10 on images
resized to 32x32 (so the third convolution sees 5x5 and returns 1x1). Its layers are
initialised with ``init: xavier`` (Xavier-uniform weights, zero biases; the option in every
benchmark config), which is this model's default.

Resizing: BioTorch resizes the images with torchvision's ``Resize(32)`` before the network.
Here the model does it, as its first operation, with ``F.interpolate(mode="bilinear",
align_corners=False)`` on 28x28 input (``resize=32``; ``resize=0`` feeds the input unchanged,
which then must be 32x32). Upsampling by 32/28 with bilinear weights is the same
interpolation torchvision's tensor path computes; PIL's, which BioTorch's PIL images go
through, can differ in the last bits of the 8-bit pixel values. The resize has no parameters,
so every algorithm sees it as one more fixed operation on the input.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from creditlab.errors import ConfigError
from creditlab.models import register_model
from creditlab.models.init import init_module_


class LeNetBioTorch(nn.Module):
    def __init__(self, channels: int, num_classes: int, resize: int):
        super().__init__()
        self.resize = resize
        self.conv1 = nn.Conv2d(channels, 6, 5)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(16, 120, 5)
        self.relu3 = nn.ReLU()
        self.fc1 = nn.Linear(120, 84)
        self.relu4 = nn.ReLU()
        self.fc2 = nn.Linear(84, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if self.resize:
            x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear", align_corners=False)
        h = self.pool1(self.relu1(self.conv1(x)))
        h = self.pool2(self.relu2(self.conv2(h)))
        h = self.relu3(self.conv3(h)).flatten(1)
        return self.fc2(self.relu4(self.fc1(h)))


@register_model("lenet-biotorch", "BioTorch's MNIST LeNet: conv5x5 6, pool, conv5x5 16, pool, conv5x5 120, FC 84, "
                                  "ReLU, input resized to 32x32; options resize, init")
def lenet_biotorch(in_shape, num_classes, resize: int = 32, init: str = "xavier"):
    if len(in_shape) != 3:
        raise ConfigError(f"model 'lenet-biotorch' takes images (C, H, W); the data give shape {tuple(in_shape)}")
    if resize not in (0, 32) or isinstance(resize, bool):
        raise ConfigError(f"model 'lenet-biotorch': resize={resize!r} must be 32 (resize the images to 32x32, as "
                          f"BioTorch does) or 0 (images already 32x32)")
    if resize == 0 and tuple(in_shape[1:]) != (32, 32):
        raise ConfigError(f"model 'lenet-biotorch': with resize=0 the images must be 32x32 (they are "
                          f"{in_shape[1]}x{in_shape[2]}); keep resize=32")
    return init_module_(LeNetBioTorch(int(in_shape[0]), num_classes, resize), init)
