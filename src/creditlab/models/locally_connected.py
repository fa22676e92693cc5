"""Locally connected 2-D layer: a convolution's receptive fields without weight sharing.

Bartunov et al. (2018), §2.2 and Table 3: every output position p has its own filter
W_p (out_channels x in_channels*kh*kw) and its own bias, so

    y[n, o, p] = sum_i W[p, o, i] * cols[n, i, p] + b[o, p],

where ``cols = unfold(x)`` are the input patches (kernel, stride, zero padding as a conv).
The contraction over i for all positions at once is one batched einsum over p (no Python loop
over positions). With all W_p equal to one conv filter the layer equals ``nn.Conv2d`` (a test).

The transpose map ``h -> W^T h`` (the vector-Jacobian product of the layer in its input, used
by feedback alignment with B in place of W and by target-propagation inverses with the
sparsity of W^T, the paper's §5.4) is :func:`locally_connected2d_transpose`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


def locally_connected2d(x: Tensor, weight: Tensor, bias: Tensor | None, kernel: tuple[int, int],
                        stride: tuple[int, int], padding: tuple[int, int], out_hw: tuple[int, int]) -> Tensor:
    """y = LC(x; W, b). ``weight`` is (P, O, C*kh*kw), ``bias`` (O, oh, ow) or None."""
    cols = F.unfold(x, kernel, padding=padding, stride=stride)  # (N, I, P)
    out = torch.einsum("nip,poi->nop", cols, weight)
    out = out.reshape(x.shape[0], weight.shape[1], out_hw[0], out_hw[1])
    if bias is not None:
        out = out + bias
    return out


def locally_connected2d_transpose(h: Tensor, weight: Tensor, kernel: tuple[int, int], stride: tuple[int, int],
                                  padding: tuple[int, int], in_hw: tuple[int, int]) -> Tensor:
    """x = W^T h: the adjoint of the LC map (no bias); ``h`` is (N, O, oh, ow), result (N, C, H, W)."""
    g = h.reshape(h.shape[0], h.shape[1], -1)  # (N, O, P)
    cols = torch.einsum("nop,poi->nip", g, weight)
    return F.fold(cols, in_hw, kernel, padding=padding, stride=stride)


def locally_connected2d_weight_grad(h: Tensor, x: Tensor, kernel: tuple[int, int], stride: tuple[int, int],
                                    padding: tuple[int, int]) -> Tensor:
    """dL/dW given dL/dy = ``h`` (N, O, oh, ow) and the input ``x``: (P, O, I)."""
    cols = F.unfold(x, kernel, padding=padding, stride=stride)
    g = h.reshape(h.shape[0], h.shape[1], -1)
    return torch.einsum("nop,nip->poi", g, cols)


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
