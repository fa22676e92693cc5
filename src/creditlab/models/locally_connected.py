"""Locally connected 2-D layer: a convolution's receptive fields without weight sharing.

Bartunov et al. (2018), §2.2 and Table 3: every output position p has its own filter
W_p (out_channels x in_channels*kh*kw) and its own bias, so

    y[n, o, p] = sum_i W[p, o, i] * cols[n, i, p] + b[o, p],

where ``cols = unfold(x)`` are the input patches (kernel, stride, zero padding as a conv).
With all W_p equal to one conv filter the layer equals ``nn.Conv2d`` (a test).

Computation: one batched matrix product over positions (``torch.bmm``) per chunk of output
rows, on position-major tensors: the input is copied once, zero-padded, into (H, W, C, N)
order, from which a chunk's patches (positions, C*kh*kw, N) are one strided copy; the output
comes out (positions, O, N) and is returned as an (N, O, oh, ow) view of it, which is the
(H, W, C, N) order the next LC layer reads without a transpose. The patches are never held
whole (for a chunk at a time, recomputed in the backward pass for the weight gradient): whole,
they are larger than the weights. The backward pass is hand-written: the input gradient is
the adjoint map (``W_p^T g_p`` per position, summed back into the input by one strided add per
kernel offset), the weight gradient ``g_p cols_p^T``; forward, adjoint and weight gradient are
three autograd Functions whose backward passes call each other, so derivatives of every order
are exact (tests: gradcheck and gradgradcheck against finite differences).

The transpose map ``h -> W^T h`` (the vector-Jacobian product of the layer in its input, used
by feedback alignment with B in place of W and by target-propagation inverses with the
sparsity of W^T, the paper's §5.4) is :func:`locally_connected2d_transpose`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from creditlab.errors import ConfigError


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ConfigError(f"expected an int or a pair, got {v!r}")
        return int(v[0]), int(v[1])
    return int(v), int(v)


def output_size(in_size: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int],
                padding: tuple[int, int]) -> tuple[int, int]:
    """Spatial output size, as for a convolution."""
    oh = (in_size[0] + 2 * padding[0] - kernel[0]) // stride[0] + 1
    ow = (in_size[1] + 2 * padding[1] - kernel[1]) // stride[1] + 1
    return oh, ow


class _Geometry(NamedTuple):
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    in_hw: tuple[int, int]
    out_hw: tuple[int, int]


#: bytes of input patches handled at once on a CPU: the patches of all positions (P x C*kh*kw x
#: batch numbers, often larger than the weights) are never materialised whole. Fresh allocations
#: that large are page-faulted in on every step (glibc maps anything above 32 MiB afresh), which
#: cost more than the matrix products; chunks this small are reused by the allocator and stay in
#: cache between the copy that makes them and the product that reads them. On other devices
#: (cached allocators) the chunks are larger, to keep kernel launches few.
CHUNK_BYTES_CPU = 4 << 20
CHUNK_BYTES_OTHER = 256 << 20


def _chunks(g: _Geometry, patch: int, batch: int, t: Tensor) -> list[tuple[int, int, int, int]]:
    """Rectangles of output positions (rows [r0, r1), columns [c0, c1)) handled together: whole
    rows, or parts of one row where a row's patches exceed the budget."""
    budget = CHUNK_BYTES_CPU if t.device.type == "cpu" else CHUNK_BYTES_OTHER
    oh, ow = g.out_hw
    per_position = max(1, patch * batch * t.element_size())
    if per_position * ow <= budget:
        rows = budget // (per_position * ow)
        return [(r, min(r + rows, oh), 0, ow) for r in range(0, oh, rows)]
    cols = max(1, budget // per_position)
    return [(r, r + 1, c, min(c + cols, ow)) for r in range(oh) for c in range(0, ow, cols)]


def _padded(x: Tensor, g: _Geometry) -> Tensor:
    """``x`` (N, C, H, W) zero-padded and position-major: (H + 2ph, W + 2pw, C, N), contiguous."""
    xt = x.permute(2, 3, 1, 0)
    ph, pw = g.padding
    if ph == 0 and pw == 0:
        return xt.contiguous()
    h, w, c, n = xt.shape
    xp = xt.new_zeros(h + 2 * ph, w + 2 * pw, c, n)
    xp[ph:ph + h, pw:pw + w] = xt
    return xp


def _position_major(h: Tensor) -> Tensor:
    """An output-shaped ``h`` (N, O, oh, ow) as (P, O, N) whose matrices (O, N) have one unit stride,
    as the matrix products need: a view when ``h`` is laid out (oh, ow, O, N) (this layer's own
    output layout), a blocked 2-D transpose when it is contiguous, else a copy."""
    n, o = h.shape[0], h.shape[1]
    hp = h.permute(2, 3, 1, 0).reshape(-1, o, n)
    if hp.is_contiguous():
        return hp
    if h.is_contiguous():  # (N*O, P) -> (P, N*O): torch's cache-blocked transpose, then (P, O, N) strided (NO, 1, O)
        return h.reshape(n * o, -1).t().contiguous().view(-1, n, o).transpose(1, 2)
    return hp.contiguous()


def _patches(xp: Tensor, g: _Geometry, ch: tuple[int, int, int, int]) -> Tensor:
    """The input patches of the positions of chunk ``ch``: (positions, C*kh*kw, N), in the weight's (C, kh, kw) order."""
    (kh, kw), (sh, sw), (r0, r1, c0, c1) = g.kernel, g.stride, ch
    win = xp[r0 * sh:(r1 - 1) * sh + kh, c0 * sw:(c1 - 1) * sw + kw].unfold(0, kh, sh).unfold(1, kw, sw)
    rows, cols, c, n = win.shape[:4]  # (rows, cols, C, N, kh, kw)
    return win.permute(0, 1, 2, 4, 5, 3).reshape(rows * cols, c * kh * kw, n)


def _positions(g: _Geometry, ch: tuple[int, int, int, int]) -> slice:
    r0, r1, c0, c1 = ch
    return slice(r0 * g.out_hw[1] + c0, (r1 - 1) * g.out_hw[1] + c1)


def _position_major_empty(n: int, c: int, h: int, w: int, like: Tensor) -> Tensor:
    """A new (N, C, H, W) tensor laid out in memory as (H, W, C, N) (not a view of anything)."""
    return torch.empty_strided((n, c, h, w), (1, n, w * c * n, c * n), dtype=like.dtype, device=like.device)


def _apply(xp: Tensor, weight: Tensor, g: _Geometry, out: Tensor) -> None:
    """``out`` (P, O, N) := W_p cols_p for every position p, chunk by chunk."""
    for ch in _chunks(g, weight.shape[2], xp.shape[-1], xp):
        ps = _positions(g, ch)
        torch.bmm(weight[ps], _patches(xp, g, ch), out=out[ps])


def _clip(lo: int, hi: int, stride: int, offset: int, size: int) -> tuple[int, int]:
    """The output indices r in [lo, hi) whose input index r * stride + offset lies in [0, size)."""
    return max(lo, -(offset // stride)), min(hi, (size - 1 - offset) // stride + 1)


def _adjoint(gp: Tensor, weight: Tensor, g: _Geometry, channels: int) -> Tensor:
    """The input gradient (N, C, H, W), laid out (H, W, C, N), of ``gp`` (P, O, N): col2im(W_p^T g_p).
    Each kernel offset adds its (non-overlapping) windows in one strided add, clipped to the
    input: what falls on the zero padding is dropped."""
    (kh, kw), (sh, sw), (ph, pw), (h, w) = g.kernel, g.stride, g.padding, g.in_hw
    n = gp.shape[-1]
    gx = _position_major_empty(n, channels, h, w, gp).zero_()
    gxt = gx.permute(2, 3, 1, 0)  # (H, W, C, N), contiguous
    for ch in _chunks(g, weight.shape[2], n, gp):
        ps, (r0, r1, c0, c1) = _positions(g, ch), ch
        cols = torch.bmm(weight[ps].transpose(1, 2), gp[ps]).view(r1 - r0, c1 - c0, channels, kh, kw, n)
        for i in range(kh):
            ra, rb = _clip(r0, r1, sh, i - ph, h)
            for j in range(kw):
                ca, cb = _clip(c0, c1, sw, j - pw, w)
                if ra < rb and ca < cb:
                    gxt[ra * sh + i - ph:(rb - 1) * sh + i - ph + 1:sh, ca * sw + j - pw:(cb - 1) * sw + j - pw + 1:sw] \
                        .add_(cols[ra - r0:rb - r0, ca - c0:cb - c0, :, i, j])
    return gx


def _weight_grad(gp: Tensor, xp: Tensor, g: _Geometry) -> Tensor:
    """(P, O, I): g_p cols_p^T for every position p."""
    n = xp.shape[-1]
    patch = xp.shape[2] * g.kernel[0] * g.kernel[1]
    out = gp.new_empty(gp.shape[0], gp.shape[1], patch)
    for ch in _chunks(g, patch, n, xp):
        ps = _positions(g, ch)
        torch.bmm(gp[ps], _patches(xp, g, ch).transpose(1, 2), out=out[ps])
    return out


# Three linear maps, each the others' derivative, so every order of derivative is exact:
#   y = LC(x; W)            d/dx: LC^T(g; W)           d/dW: Wgrad(g, x)
#   x = LC^T(h; W)          d/dh: LC(g; W)             d/dW: Wgrad(h, g)
#   G = Wgrad(h, x)         d/dh: LC(x; Gamma)         d/dx: LC^T(h; Gamma)
# Their backward passes call the other two Functions (plain kernels unless a graph is being built).

class _LC(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, g: _Geometry) -> Tensor:
        xp = _padded(x, g)
        y = _position_major_empty(x.shape[0], weight.shape[1], *g.out_hw, x)
        out = y.permute(2, 3, 1, 0).view(weight.shape[0], weight.shape[1], x.shape[0])  # (P, O, N)
        _apply(xp, weight, g, out)
        if bias is not None:
            out += bias.reshape(bias.shape[0], -1).t().unsqueeze(-1)
        ctx.geometry = g
        ctx.save_for_backward(x, weight, xp)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, xp = ctx.saved_tensors
        g = ctx.geometry
        gp = _position_major(grad)
        gx = _LCT.apply(grad, weight, g, gp) if ctx.needs_input_grad[0] else None
        gw = _LCW.apply(grad, x, g, gp, xp) if ctx.needs_input_grad[1] else None
        gb = grad.sum(0) if ctx.needs_input_grad[2] else None
        return gx, gw, gb, None


class _LCT(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, g: _Geometry, gp: Tensor | None = None) -> Tensor:
        ctx.geometry = g
        ctx.save_for_backward(h, weight)
        channels = weight.shape[2] // (g.kernel[0] * g.kernel[1])
        return _adjoint(_position_major(h) if gp is None else gp, weight, g, channels)

    @staticmethod
    def backward(ctx, grad: Tensor):
        h, weight = ctx.saved_tensors
        g = ctx.geometry
        gh = _LC.apply(grad, weight, None, g) if ctx.needs_input_grad[0] else None
        gw = _LCW.apply(h, grad, g) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None


class _LCW(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, x: Tensor, g: _Geometry, gp: Tensor | None = None,
                xp: Tensor | None = None) -> Tensor:
        ctx.geometry = g
        ctx.save_for_backward(h, x)
        return _weight_grad(_position_major(h) if gp is None else gp, _padded(x, g) if xp is None else xp, g)

    @staticmethod
    def backward(ctx, grad: Tensor):
        h, x = ctx.saved_tensors
        g = ctx.geometry
        gh = _LC.apply(x, grad, None, g) if ctx.needs_input_grad[0] else None
        gx = _LCT.apply(h, grad, g) if ctx.needs_input_grad[1] else None
        return gh, gx, None, None, None


def locally_connected2d(x: Tensor, weight: Tensor, bias: Tensor | None, kernel: tuple[int, int],
                        stride: tuple[int, int], padding: tuple[int, int], out_hw: tuple[int, int]) -> Tensor:
    """y = LC(x; W, b). ``weight`` is (P, O, C*kh*kw), ``bias`` (O, oh, ow) or None. The result
    is (N, O, oh, ow), laid out in memory as (oh, ow, O, N): the layout the matrix products make
    and the next LC layer reads without a transpose."""
    in_hw = (x.shape[2], x.shape[3])
    return _LC.apply(x, weight, bias, _Geometry(tuple(kernel), tuple(stride), tuple(padding), in_hw, tuple(out_hw)))


def locally_connected2d_transpose(h: Tensor, weight: Tensor, kernel: tuple[int, int], stride: tuple[int, int],
                                  padding: tuple[int, int], in_hw: tuple[int, int]) -> Tensor:
    """x = W^T h: the adjoint of the LC map (no bias); ``h`` is (N, O, oh, ow), result (N, C, H, W)."""
    g = _Geometry(tuple(kernel), tuple(stride), tuple(padding), tuple(in_hw), (h.shape[2], h.shape[3]))
    return _LCT.apply(h, weight, g)


def locally_connected2d_weight_grad(h: Tensor, x: Tensor, kernel: tuple[int, int], stride: tuple[int, int],
                                    padding: tuple[int, int]) -> Tensor:
    """dL/dW given dL/dy = ``h`` (N, O, oh, ow) and the input ``x``: (P, O, I)."""
    g = _Geometry(tuple(kernel), tuple(stride), tuple(padding), (x.shape[2], x.shape[3]), (h.shape[2], h.shape[3]))
    return _LCW.apply(h, x, g)


class LocallyConnected2d(nn.Module):
    """``LocallyConnected2d(in_channels, out_channels, kernel_size, stride, padding, in_size=(H, W))``.

    ``padding=None`` (default) zero-pads by kernel//2 so stride 1 keeps the spatial shape (the
    paper's Table 3). The input's spatial size must be given because every position has its own
    filter. Glorot (xavier) uniform init with a conv's fans (C*kh*kw, O*kh*kw), zero bias.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] | None = None, *,
                 in_size: int | tuple[int, int], bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding) if padding is not None else (self.kernel_size[0] // 2, self.kernel_size[1] // 2)
        self.in_size = _pair(in_size)
        self.out_size = output_size(self.in_size, self.kernel_size, self.stride, self.padding)
        if min(self.out_size) <= 0 or min(self.in_channels, self.out_channels) <= 0:
            raise ConfigError(
                f"LocallyConnected2d: kernel {self.kernel_size}, stride {self.stride}, padding {self.padding} "
                f"on input {self.in_channels}x{self.in_size} gives no output; use a smaller kernel or stride"
            )
        positions = self.out_size[0] * self.out_size[1]
        patch = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        fk = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(positions, self.out_channels, patch, **fk))
        self.bias = nn.Parameter(torch.empty(self.out_channels, *self.out_size, **fk)) if bias else None
        self.reset_parameters()

    def fans(self) -> tuple[int, int]:
        """(fan_in, fan_out) as for a conv with this kernel: (C*kh*kw, O*kh*kw)."""
        k = self.kernel_size[0] * self.kernel_size[1]
        return self.in_channels * k, self.out_channels * k

    def reset_parameters(self, init: str = "xavier") -> None:
        from creditlab.models.init import init_weight_

        fan_in, fan_out = self.fans()
        init_weight_(self.weight, init, fan_in=fan_in, fan_out=fan_out)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels or tuple(x.shape[2:]) != self.in_size:
            raise ConfigError(
                f"LocallyConnected2d expects input (N, {self.in_channels}, {self.in_size[0]}, {self.in_size[1]}), "
                f"got {tuple(x.shape)}"
            )
        return locally_connected2d(x, self.weight, self.bias, self.kernel_size, self.stride, self.padding, self.out_size)

    def transpose(self, h: Tensor, weight: Tensor | None = None) -> Tensor:
        """W^T h (or V^T h with ``weight`` = V of W's shape), in the input's shape."""
        return locally_connected2d_transpose(h, self.weight if weight is None else weight, self.kernel_size,
                                             self.stride, self.padding, self.in_size)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, in_size={self.in_size}, out_size={self.out_size}, bias={self.bias is not None}")


def parameter_count(in_channels: int, in_size: int, layers: list[tuple[int, int, int]]) -> list[int]:
    """Weights+biases of a stack of LC layers ``(kernel, channels, stride)``, one count per layer."""
    counts = []
    c, s = in_channels, in_size
    for k, o, st in layers:
        oh = (s + 2 * (k // 2) - k) // st + 1
        counts.append(oh * oh * o * c * k * k + o * oh * oh)
        c, s = o, oh
    return counts


__all__ = ["LocallyConnected2d", "locally_connected2d", "locally_connected2d_transpose",
           "locally_connected2d_weight_grad", "parameter_count", "output_size"]
