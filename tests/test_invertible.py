"""Invertible layers and networks for GAIT-prop: exact inverses (float64), the invertible
convolution's overlap correction (Dalm et al. Appendix C), and refusal of configurations that
have no exact inverse."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from creditlab.algorithms import build_algorithm
from creditlab.errors import ConfigError
from creditlab.losses import build_loss
from creditlab.models import build_named_model
from creditlab.models.invertible import (
    InvertibleConv2d,
    InvertibleDense,
    InvertibleNet,
    invertible_convnet,
    invertible_from_arch,
    same_padding,
)

D64 = torch.float64


def test_dense_inverse_with_auxiliary_units_reconstructs_input_float64():
    torch.manual_seed(0)
    layer = InvertibleDense(12, 5, "leaky_relu(0.1)").to(D64)
    with torch.no_grad():
        layer.weight.add_(0.3 * torch.randn_like(layer.weight))  # not orthogonal: the inverse is exact anyway
        layer.bias.normal_()
    x = torch.randn(9, 12, dtype=D64)
    _, h = layer.full(x)
    assert h.shape == (9, 12) and layer(x).shape == (9, 5)
    torch.testing.assert_close(layer.inverse(h), x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("act", ["leaky_relu(0.1)", "tanh", "linear"])
def test_whole_fc_net_inverse_reconstructs_every_inverted_layer_input(act):
    torch.manual_seed(1)
    net = invertible_from_arch("20-16-16-12-5", act).to(D64)
    tr = net.trace(torch.randn(7, 20, dtype=D64))
    rec = net.reconstruct(tr)
    for l in range(1, len(net.layers)):
        torch.testing.assert_close(rec[l], tr.inputs[l], rtol=0, atol=1e-11)


def _count_receptive_fields(h: int, w: int, k: int, s: int) -> torch.Tensor:
    """Oracle for n_x: fold(unfold(ones)) on the 'same'-padded grid, cropped."""
    (_, pt, pb), (_, pl, pr) = same_padding(h, k, s), same_padding(w, k, s)
    ones = torch.ones(1, 1, h + pt + pb, w + pl + pr, dtype=D64)
    cols = F.unfold(ones, k, stride=s)
    folded = F.fold(cols, (h + pt + pb, w + pl + pr), k, stride=s)
    return folded[:, :, pt : pt + h, pl : pl + w]


@pytest.mark.parametrize("k,s,hw", [(3, 1, (7, 7)), (5, 2, (9, 8)), (3, 2, (6, 7)), (2, 2, (6, 6)), (2, 3, (7, 8)), (9, 4, (13, 13))])
def test_overlap_counts_equal_number_of_covering_receptive_fields(k, s, hw):
    layer = InvertibleConv2d(2, 3, k, s).to(D64)
    x = torch.zeros(1, 2, *hw, dtype=D64)
    torch.testing.assert_close(layer.overlap_counts(hw, x), _count_receptive_fields(*hw, k, s), rtol=0, atol=0)


@pytest.mark.parametrize("k,s,hw", [(3, 1, (7, 7)), (5, 2, (9, 8)), (3, 2, (6, 7)), (2, 2, (6, 6)), (2, 3, (7, 8))])
def test_invertible_conv_reconstructs_input_exactly_with_and_without_overlaps(k, s, hw):
    torch.manual_seed(2)
    layer = InvertibleConv2d(3, 4, k, s).to(D64)
    with torch.no_grad():
        layer.weight.add_(0.2 * torch.randn_like(layer.weight))
        layer.bias.normal_()
    assert layer.width == 3 * k * k and layer.keep == 4
    x = torch.randn(2, 3, *hw, dtype=D64)
    _, h = layer.full(x)
    torch.testing.assert_close(layer.inverse(h, x=x), x, rtol=0, atol=1e-11)


def test_conv_inverse_without_overlap_correction_counts_overlapping_elements_repeatedly():
    """The correction term matters: dropping it reconstructs n_x * x (Appendix C)."""
    torch.manual_seed(3)
    layer = InvertibleConv2d(2, 2, 3, 1).to(D64)
    x = torch.randn(1, 2, 6, 6, dtype=D64)
    _, h = layer.full(x)
    rec = layer.inverse(h, x=x)
    n = layer.overlap_counts((6, 6), x)
    uncorrected = rec + (n - 1) * x
    torch.testing.assert_close(uncorrected, n * x, rtol=0, atol=1e-11)
    assert n.max() == 9


def test_convnet_of_the_imagenet_experiment_reconstructs_every_inverted_layer_input():
    torch.manual_seed(4)
    net = invertible_convnet((3, 32, 32), 10).to(D64)
    assert len(net.layers) == 8 and not net.layers[0].invertible
    assert [l.width for l in net.layers[1:7]] == [216, 600, 432, 432, 864, 864]
    tr = net.trace(torch.randn(2, 3, 32, 32, dtype=D64))
    rec = net.reconstruct(tr)
    for l in range(1, len(net.layers)):
        scale = tr.inputs[l].abs().max()
        assert (rec[l] - tr.inputs[l]).abs().max() <= 1e-10 * scale


def test_registered_models_have_the_papers_shapes():
    shallow = build_named_model("gait-cifar-shallow", (3, 32, 32), 10)
    deep = build_named_model("gait-cifar-deep", (3, 32, 32), 10)
    assert len(shallow.layers) == 4 and len(deep.layers) == 7
    assert shallow.layers[0].linear.weight.shape == (1024, 3072)
    assert all(l.linear.weight.shape == (1024, 1024) for l in deep.layers[1:])
    assert shallow.layers[-1].keep == 10 and shallow.layers[-1].act.name == "linear"
    conv = build_named_model("gait-conv", (3, 32, 32), 10)
    assert conv(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_square_layers_start_orthogonal():
    net = invertible_convnet((3, 16, 16), 5, convs=[(3, 2, 4), (3, 1, 6)])
    for layer in net.layers[1:]:
        m = layer.square_matrix().double()
        torch.testing.assert_close(m @ m.T, torch.eye(m.shape[0], dtype=D64), rtol=0, atol=1e-5)


def test_backprop_trains_an_invertible_net_through_forwarded_units_only():
    """Plain autograd works unchanged; auxiliary units get no gradient (not passed forward)."""
    torch.manual_seed(5)
    net = invertible_from_arch("10-8-6-3").to(D64)
    loss = build_loss("cross_entropy")
    algo = build_algorithm("bp", net, loss)
    algo.step(torch.randn(5, 10, dtype=D64), torch.randint(0, 3, (5,)))
    mid, out = net.layers[1], net.layers[2]
    assert mid.linear.weight.grad[6:].abs().max() == 0 and mid.linear.weight.grad[:6].abs().max() > 0
    assert out.linear.weight.grad[3:].abs().max() == 0 and out.linear.weight.grad[:3].abs().max() > 0


def test_non_square_layer_without_auxiliary_units_is_refused():
    with pytest.raises(ConfigError, match="cannot be inverted"):
        InvertibleDense(8, 12, invertible=True)
    with pytest.raises(ConfigError, match="widens"):
        invertible_from_arch("20-16-18-5")
    with pytest.raises(ConfigError, match="cannot be inverted"):
        InvertibleConv2d(2, 20, 3, 1)  # 3*3*2 = 18 < 20 filters


def test_relu_is_refused_in_an_invertible_layer():
    with pytest.raises(ConfigError, match="not invertible"):
        invertible_from_arch("20-16-16-5", act="relu")
    with pytest.raises(ConfigError, match="not invertible"):
        InvertibleConv2d(2, 4, 3, 1, act="relu")


def test_max_pooling_is_refused():
    with pytest.raises(ConfigError, match="max-pooling"):
        InvertibleNet([InvertibleConv2d(3, 4, 3, 1, invertible=False), nn.MaxPool2d(2)])
    with pytest.raises(ConfigError, match="max-pooling"):
        invertible_convnet((3, 16, 16), 5, convs=[(3, 2, 4), "maxpool", (3, 1, 6)])


def test_first_layer_is_never_inverted():
    net = invertible_from_arch("20-16-5")
    with pytest.raises(ConfigError, match="never inverted"):
        net.layers[0].inverse(torch.zeros(1, 16))
    with pytest.raises(ConfigError, match="only the first layer"):
        InvertibleNet([InvertibleDense(4, 4), InvertibleDense(4, 4, invertible=False)])


def test_invertible_from_arch_builds_square_layers_with_auxiliary_units_and_linear_logits():
    net = invertible_from_arch("784-784-784-784-10", "leaky_relu")
    shapes = [tuple(l.linear.weight.shape) for l in net.layers]
    assert shapes == [(784, 784)] * 4
    assert [l.keep for l in net.layers] == [784, 784, 784, 10]
    assert not net.layers[0].invertible and all(l.invertible for l in net.layers[1:])
    assert net.layers[-1].act.name == "linear" and net.layers[1].act.name == "leaky_relu(0.1)"
    assert net(torch.rand(3, 1, 28, 28)).shape == (3, 10)
