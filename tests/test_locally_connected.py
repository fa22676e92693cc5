"""LocallyConnected2d against nn.Conv2d and autograd."""

import pytest
import torch
from torch import nn

from creditlab.errors import ConfigError
from creditlab.models.locally_connected import LocallyConnected2d, parameter_count




@pytest.mark.parametrize("k,stride,size", [(3, 1, 7), (3, 2, 8), (5, 2, 9), (1, 1, 4)])
def test_locally_connected_with_tied_filters_equals_conv2d(k, stride, size):
    torch.manual_seed(0)
    lc = LocallyConnected2d(3, 4, k, stride, in_size=size).double()
    conv = nn.Conv2d(3, 4, k, stride, padding=k // 2).double()
    with torch.no_grad():
        lc.weight.copy_(conv.weight.reshape(4, -1).expand_as(lc.weight))
        lc.bias.copy_(conv.bias[:, None, None].expand_as(lc.bias))
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    assert torch.allclose(lc(x), conv(x), atol=1e-12)


def test_locally_connected_stride_one_keeps_spatial_shape():
    lc = LocallyConnected2d(2, 5, 3, 1, in_size=(6, 7))
    assert lc(torch.randn(3, 2, 6, 7)).shape == (3, 5, 6, 7)


def test_locally_connected_filters_are_untied():
    torch.manual_seed(0)
    lc = LocallyConnected2d(1, 1, 3, 1, in_size=4).double()
    x = torch.randn(1, 1, 4, 4, dtype=torch.float64)
    out = lc(x)
    with torch.no_grad():
        lc.weight[5].zero_()  # position (1, 1) only
    out2 = lc(x)
    diff = (out - out2).abs().reshape(-1)
    assert diff[5] > 0 and torch.count_nonzero(diff) == 1


def test_locally_connected_transpose_is_the_adjoint():
    torch.manual_seed(1)
    lc = LocallyConnected2d(2, 3, 3, 2, in_size=7, bias=False).double()
    x = torch.randn(2, 2, 7, 7, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, *lc.out_size, dtype=torch.float64)
    (vjp,) = torch.autograd.grad(lc(x), x, g)
    assert torch.allclose(lc.transpose(g), vjp, atol=1e-12)


def test_locally_connected_parameter_count_matches_module():
    lc1 = LocallyConnected2d(3, 64, 5, 2, in_size=32)
    lc2 = LocallyConnected2d(64, 128, 5, 2, in_size=16)
    counts = parameter_count(3, 32, [(5, 64, 2), (5, 128, 2)])
    assert counts == [sum(p.numel() for p in lc1.parameters()), sum(p.numel() for p in lc2.parameters())]


def test_locally_connected_rejects_wrong_input_shape():
    lc = LocallyConnected2d(2, 3, 3, in_size=5)
    with pytest.raises(ConfigError, match="expects input"):
        lc(torch.randn(1, 2, 6, 6))
