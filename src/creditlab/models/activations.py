"""Elementwise activations with the derivative (and, where it exists, the inverse) that the
local learning rules need.

Every activation is an ``nn.Module`` usable in ordinary PyTorch code; ``df(a)`` is the
derivative evaluated at the pre-activation ``a`` and ``inverse(y)`` maps an output back to
the pre-activation (GAIT-prop and target propagation need it).

Every invertible activation also has ``inverse_diff(a, dh)`` = f^{-1}(f(a) + dh) - a in a form
that does not cancel: the direct difference of two O(1) numbers loses an O(dh) signal in
float32 (GAIT-prop's targets are nudges of size gamma ~ 1e-7). The forms used:

* linear: dh; leaky ReLU (piecewise linear): dh / f'(a) exactly while the kink is not
  crossed; a crossing step is O(|a|), so the direct form is exact to rounding there;
* tanh: atanh(h + dh) - atanh(h) = atanh(dh / (1 - h (h + dh))), with 1 - h^2 = sech^2(a)
  from a (no 1 - h^2 cancellation for saturated units);
* sigmoid: logit(h + dh) - logit(h) = log1p(dh / h) - log1p(-dh / (1 - h)), with
  h = sigmoid(a) and 1 - h = sigmoid(-a) from a.

A custom invertible activation without ``inverse_diff`` is refused by name where the
difference form is needed (:meth:`Activation.inverse_diff`).
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from creditlab.errors import ConfigError


class Activation(nn.Module):
    name: str = "activation"
    invertible: bool = False

    def forward(self, a: Tensor) -> Tensor:  # noqa: D401
        raise NotImplementedError

    def df(self, a: Tensor) -> Tensor:
        """f'(a), elementwise."""
        raise NotImplementedError

    def inverse(self, y: Tensor) -> Tensor:
        raise ConfigError(f"activation {self.name!r} has no inverse; use leaky_relu, tanh, sigmoid or linear")

    def inverse_diff(self, a: Tensor, dh: Tensor) -> Tensor:
        """f^{-1}(f(a) + dh) - a without cancellation (see the module docstring)."""
        raise ConfigError(
            f"activation {self.name!r} has no non-cancelling difference form f^-1(f(a) + dh) - a, so its "
            "small-step targets lose their signal in float32; use leaky_relu, tanh, sigmoid or linear, "
            "or run in float64"
        )

    @property
    def has_inverse_diff(self) -> bool:
        return type(self).inverse_diff is not Activation.inverse_diff

    def extra_repr(self) -> str:
        return ""


class Linear(Activation):
    name = "linear"
    invertible = True

    def forward(self, a: Tensor) -> Tensor:
        return a

    def df(self, a: Tensor) -> Tensor:
        return torch.ones_like(a)

    def inverse(self, y: Tensor) -> Tensor:
        return y

    def inverse_diff(self, a: Tensor, dh: Tensor) -> Tensor:
        return dh


class ReLU(Activation):
    name = "relu"

    def forward(self, a: Tensor) -> Tensor:
        return torch.relu(a)

    def df(self, a: Tensor) -> Tensor:
        return (a > 0).to(a.dtype)


class LeakyReLU(Activation):
    invertible = True

    def __init__(self, slope: float = 0.1):
        super().__init__()
        if not slope > 0:
            raise ConfigError(f"leaky_relu slope must be > 0 to be invertible, got {slope}")
        self.slope = float(slope)
        self.name = f"leaky_relu({self.slope:g})"

    def forward(self, a: Tensor) -> Tensor:
        return torch.where(a > 0, a, self.slope * a)

    def df(self, a: Tensor) -> Tensor:
        one = torch.ones_like(a)
        return torch.where(a > 0, one, one * self.slope)

    def inverse(self, y: Tensor) -> Tensor:
        return torch.where(y > 0, y, y / self.slope)

    def inverse_diff(self, a: Tensor, dh: Tensor) -> Tensor:
        """dh / f'(a) where h + dh stays on a's side of the kink; across it the direct form,
        whose terms are then O(|dh|) themselves (h = a or slope * a exactly)."""
        h = self.forward(a)
        same = (h + dh > 0) == (a > 0)
        return torch.where(same, dh / self.df(a), self.inverse(h + dh) - a)

    def extra_repr(self) -> str:
        return f"slope={self.slope:g}"


class Tanh(Activation):
    name = "tanh"
    invertible = True

    def forward(self, a: Tensor) -> Tensor:
        return torch.tanh(a)

    def df(self, a: Tensor) -> Tensor:
        return 1.0 - torch.tanh(a) ** 2

    def inverse(self, y: Tensor) -> Tensor:
        return torch.atanh(y)

    def inverse_diff(self, a: Tensor, dh: Tensor) -> Tensor:
        """atanh(dh / (1 - h (h + dh))) = atanh(dh / (sech^2(a) - h dh)), h = tanh(a)."""
        h = torch.tanh(a)
        e = torch.exp(-2.0 * a.abs())
        sech2 = 4.0 * e / (1.0 + e) ** 2
        return torch.atanh(dh / (sech2 - h * dh))


class Sigmoid(Activation):
    name = "sigmoid"
    invertible = True

    def forward(self, a: Tensor) -> Tensor:
        return torch.sigmoid(a)

    def df(self, a: Tensor) -> Tensor:
        s = torch.sigmoid(a)
        return s * (1.0 - s)

    def inverse(self, y: Tensor) -> Tensor:
        return torch.logit(y)

    def inverse_diff(self, a: Tensor, dh: Tensor) -> Tensor:
        """log1p(dh / h) - log1p(-dh / (1 - h)), h = sigmoid(a), 1 - h = sigmoid(-a)."""
        return torch.log1p(dh / torch.sigmoid(a)) - torch.log1p(-dh / torch.sigmoid(-a))


class Softmax(Linear):
    """Marks a logits output whose softmax is folded into the cross-entropy loss: the module
    outputs the logits (identity), and the loss applies the softmax.  This is Appendix B of
    the AR paper: the output state is clamped at the logits to softmax(a^L) - T."""

    name = "softmax"


ACTIVATIONS = ("linear", "relu", "leaky_relu(slope)", "tanh", "sigmoid", "softmax")


def make_activation(spec: str) -> Activation:
    """``relu``, ``tanh``, ``sigmoid``, ``linear``, ``softmax``, ``leaky_relu`` or ``leaky_relu(0.2)``."""
    text = str(spec).strip().lower()
    m = re.fullmatch(r"leaky_relu(?:\(([-+0-9.eE]+)\)|:([-+0-9.eE]+))?", text)
    if m:
        slope = m.group(1) or m.group(2)
        return LeakyReLU(float(slope) if slope else 0.1)
    table = {"linear": Linear, "identity": Linear, "relu": ReLU, "tanh": Tanh, "sigmoid": Sigmoid, "softmax": Softmax}
    if text not in table:
        raise ConfigError(f"unknown activation {spec!r}; valid: {', '.join(ACTIVATIONS)}")
    return table[text]()
