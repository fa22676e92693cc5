"""``lenet-biotorch``: BioTorch's MNIST LeNet (biotorch/models/le_net.py, LeNetMNIST) as built here:
its layer shapes, the 32x32 resize it is benchmarked with, Xavier-uniform init with zero biases,
and one-line refusals of shapes it cannot take."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from creditlab.errors import ConfigError
from creditlab.models import build_named_model


def test_the_layers_are_biotorchs_and_the_third_conv_sees_5x5_after_the_resize():
    torch.manual_seed(0)
    m = build_named_model("lenet-biotorch", (1, 28, 28), 10)
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters() if n.endswith("weight")}
    assert shapes == {"conv1.weight": (6, 1, 5, 5), "conv2.weight": (16, 6, 5, 5), "conv3.weight": (120, 16, 5, 5),
                      "fc1.weight": (84, 120), "fc2.weight": (10, 84)}
    x = torch.rand(3, 1, 28, 28)
    seen = {}
    m.conv3.register_forward_hook(lambda mod, i, o: seen.update(inp=i[0].shape, out=o.shape))
    assert m(x).shape == (3, 10)
    assert seen == {"inp": (3, 16, 5, 5), "out": (3, 120, 1, 1)}
    # the resize is bilinear to 32x32; resize=0 on 32x32 images is the same network without it
    m0 = build_named_model("lenet-biotorch", (1, 32, 32), 10, resize=0)
    m0.load_state_dict(m.state_dict())
    x32 = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.equal(m0(x32), m(x))


def test_weights_are_xavier_uniform_and_biases_zero():
    torch.manual_seed(0)
    m = build_named_model("lenet-biotorch", (1, 28, 28), 10)
    for mod in (m.conv1, m.conv2, m.conv3, m.fc1, m.fc2):
        fan_in, fan_out = torch.nn.init._calculate_fan_in_and_fan_out(mod.weight)
        bound = (6 / (fan_in + fan_out)) ** 0.5
        assert mod.weight.abs().max() <= bound and mod.weight.abs().max() > 0.9 * bound
        assert torch.count_nonzero(mod.bias) == 0


@pytest.mark.parametrize("shape, options, message", [
    ((1, 28, 28), {"resize": 28}, "resize=28 must be 32"),
    ((1, 28, 28), {"resize": 0}, "with resize=0 the images must be 32x32"),
    ((784,), {}, "takes images"),
])
def test_shapes_it_cannot_take_are_refused_in_one_line(shape, options, message):
    with pytest.raises(ConfigError, match=message) as e:
        build_named_model("lenet-biotorch", shape, 10, **options)
    assert "\n" not in str(e.value)
