"""LocallyConnected2d against nn.Conv2d and autograd."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

import creditlab.models.locally_connected as lcmod
from creditlab.errors import ConfigError
from creditlab.models.locally_connected import (
    LocallyConnected2d,
    locally_connected2d,
    locally_connected2d_transpose,
    locally_connected2d_weight_grad,
    parameter_count,
)


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


# ---- the hand-written backward: against finite differences and an unfold + einsum reference ----
# (in_channels, out_channels, kernel, stride, padding, in_size): strides 1 and 2, default and
# custom padding, a non-square input, a 1x1 kernel
GEOMETRIES = [(2, 3, 3, 2, None, (7, 6)), (2, 2, 3, 1, None, (5, 5)), (3, 2, 5, 2, None, (9, 9)),
              (1, 2, 1, 1, None, (4, 3)), (2, 2, 3, 2, 0, (7, 7))]


def _reference(x, weight, bias, lc):
    """The layer's defining formula with torch's unfold and one einsum."""
    cols = F.unfold(x, lc.kernel_size, padding=lc.padding, stride=lc.stride)
    out = torch.einsum("nip,poi->nop", cols, weight).reshape(x.shape[0], weight.shape[1], *lc.out_size)
    return out + bias if bias is not None else out


@pytest.fixture(params=["one chunk", "a chunk per position"])
def chunking(request, monkeypatch):
    """The whole layer in one chunk, or every position in a chunk of its own (parts of rows)."""
    if request.param == "a chunk per position":
        monkeypatch.setattr(lcmod, "CHUNK_BYTES_CPU", 1)
    else:
        monkeypatch.setattr(lcmod, "CHUNK_BYTES_CPU", 1 << 40)
    return request.param


def _layer(c, o, k, s, pad, size):
    torch.manual_seed(0)
    lc = LocallyConnected2d(c, o, k, s, pad, in_size=size).double()
    with torch.no_grad():
        lc.bias.normal_()
    return lc


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_locally_connected_forward_and_gradients_equal_the_unfold_einsum_reference(geometry, chunking):
    lc = _layer(*geometry)
    x = torch.randn(3, geometry[0], *lc.in_size, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, lc.out_channels, *lc.out_size, dtype=torch.float64)
    y = lc(x)
    ref = _reference(x, lc.weight, lc.bias, lc)
    assert torch.allclose(y, ref, atol=1e-12)
    got = torch.autograd.grad(y, (x, lc.weight, lc.bias), g)
    want = torch.autograd.grad(ref, (x, lc.weight, lc.bias), g)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-12)


# small enough for finite differences of second derivatives: stride 2 with padding, stride 1, a 1x1 kernel
SMALL_GEOMETRIES = [(2, 2, 3, 2, None, (5, 4)), (1, 2, 3, 1, None, (3, 3)), (2, 1, 1, 1, None, (2, 3))]


@pytest.mark.parametrize("geometry", SMALL_GEOMETRIES)
def test_locally_connected_maps_are_exact_to_second_order(geometry, chunking):
    """LC, its adjoint and its weight gradient against finite differences, first and second derivatives."""
    lc = _layer(*geometry)
    k, s, p = lc.kernel_size, lc.stride, lc.padding
    x = torch.randn(2, geometry[0], *lc.in_size, dtype=torch.float64, requires_grad=True)
    h = torch.randn(2, lc.out_channels, *lc.out_size, dtype=torch.float64, requires_grad=True)
    w = lc.weight.detach().clone().requires_grad_(True)
    b = lc.bias.detach().clone().requires_grad_(True)
    maps = [(lambda x, w, b: locally_connected2d(x, w, b, k, s, p, lc.out_size), (x, w, b)),
            (lambda h, w: locally_connected2d_transpose(h, w, k, s, p, lc.in_size), (h, w)),
            (lambda h, x: locally_connected2d_weight_grad(h, x, k, s, p), (h, x))]
    for fn, inputs in maps:
        assert gradcheck(fn, inputs)
        assert gradgradcheck(fn, inputs)


def test_locally_connected_is_the_same_for_inputs_and_output_gradients_in_any_memory_layout():
    lc = _layer(3, 4, 3, 2, None, (7, 7))
    base = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    g = torch.randn(2, 4, *lc.out_size, dtype=torch.float64)
    results = []
    for x, gy in [(base, g), (base.contiguous(memory_format=torch.channels_last), g.permute(2, 3, 1, 0).contiguous()
                                 .permute(3, 2, 0, 1)), (base.permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0),
                                                         g.contiguous(memory_format=torch.channels_last))]:
        x = x.clone().requires_grad_(True)
        y = lc(x)
        results.append((y.detach(), *torch.autograd.grad(y, (x, lc.weight), gy)))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.allclose(a, b, atol=1e-12)


def test_locally_connected_stack_trains_like_the_reference_stack():
    """Two LC layers with tanh between them (the second reads the first's position-major output):
    the loss gradient of every parameter equals the reference formula's."""
    torch.manual_seed(3)
    l1, l2 = LocallyConnected2d(2, 3, 3, 2, in_size=8).double(), LocallyConnected2d(3, 2, 3, 1, in_size=4).double()
    x = torch.randn(4, 2, 8, 8, dtype=torch.float64)
    params = [l1.weight, l1.bias, l2.weight, l2.bias]
    ours = torch.autograd.grad(l2(torch.tanh(l1(x))).square().sum(), params)
    ref_out = _reference(torch.tanh(_reference(x, l1.weight, l1.bias, l1)), l2.weight, l2.bias, l2)
    refs = torch.autograd.grad(ref_out.square().sum(), params)
    for a, b in zip(ours, refs):
        assert torch.allclose(a, b, atol=1e-10)


def test_locally_connected_outputs_take_in_place_operations():
    """The outputs are tensors of their own, not views made inside a custom Function (which
    autograd forbids modifying in place): an in-place ReLU after the layer or after its transpose
    gives the reference's gradients."""
    lc = _layer(2, 3, 3, 2, None, (6, 6))
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    h = torch.randn(2, 3, *lc.out_size, dtype=torch.float64, requires_grad=True)
    ours = torch.autograd.grad(torch.relu_(lc(x)).sum() + torch.relu_(lc.transpose(h)).sum(), (x, h, lc.weight))
    ref_t = torch.autograd.grad(_reference(x, lc.weight, lc.bias, lc), x, h, create_graph=True)[0]  # W^T h
    refs = torch.autograd.grad(torch.relu(_reference(x, lc.weight, lc.bias, lc)).sum() + torch.relu(ref_t).sum(),
                               (x, h, lc.weight))
    for a, b in zip(ours, refs):
        assert torch.allclose(a, b, atol=1e-12)
