"""Losses with the analytic output derivative that local rules clamp to.

* ``mse``: L = sum over output units of (x^L - T)^2, summed over the batch by default
  (``reduction=sum``, as the AR authors' code computes it; the AR paper's text writes 1/2 sum,
  and its learning rate 0.0005 goes with the code's sum). dL/dx^L = 2 (x^L - T) per sample.
* ``cross_entropy``: L = -sum_i T_i log softmax(a^L)_i on the logits a^L, averaged over the
  batch by default (``reduction=mean``); dL/da^L = softmax(a^L) - T per sample (AR paper,
  Appendix B), so no softmax Jacobian enters a relaxation.

Targets are either integer class labels (one-hot encoded to the output width) or a float
tensor of the output's shape (autoencoders).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from creditlab.distributed import batch_total
from creditlab.errors import ConfigError
from creditlab.spec import check_options, choice, parse_spec

LOSSES = ("mse", "cross_entropy")


def as_targets(target: Tensor, out: Tensor) -> Tensor:
    """One-hot float targets in ``out``'s dtype/device, or ``target`` itself if already dense."""
    if target.dtype in (torch.int64, torch.int32, torch.uint8, torch.int16, torch.int8):
        return torch.nn.functional.one_hot(target.long(), out.shape[1]).to(out.dtype)
    if target.shape != out.shape:
        raise ConfigError(f"target shape {tuple(target.shape)} does not match output shape {tuple(out.shape)}")
    return target.to(out.dtype)


class Loss:
    """A loss L(out, target) with ``per_sample``, the reduced value and the analytic ``grad``."""

    name = "loss"

    def __init__(self, reduction: str = "sum"):
        self.reduction = choice(f"loss {self.name}", "reduction", reduction, ("sum", "mean"))

    def per_sample(self, out: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

    def sample_grad(self, out: Tensor, t: Tensor) -> Tensor:
        raise NotImplementedError

    def __call__(self, out: Tensor, target: Tensor) -> Tensor:
        return self.reduce(self.per_sample(out, target))

    def reduce(self, per: Tensor) -> Tensor:
        """The batch loss from per-sample losses: their sum, or their mean over the *global*
        batch (:func:`creditlab.distributed.batch_total`; the local batch outside a
        data-parallel run)."""
        if self.reduction == "sum":
            return per.sum()
        n = batch_total(per.shape[0])
        return per.mean() if n == per.shape[0] else per.sum() / n

    def grad(self, out: Tensor, target: Tensor) -> Tensor:
        """dL/d(out) of the reduced loss, computed in closed form."""
        g = self.sample_grad(out, as_targets(target, out))
        return g if self.reduction == "sum" else g / batch_total(out.shape[0])

    def spec(self) -> str:
        return f"{self.name}:reduction={self.reduction}"


class MSELoss(Loss):
    name = "mse"

    def per_sample(self, out: Tensor, target: Tensor) -> Tensor:
        t = as_targets(target, out)
        return ((out - t) ** 2).reshape(out.shape[0], -1).sum(1)

    def sample_grad(self, out: Tensor, t: Tensor) -> Tensor:
        return 2.0 * (out - t)


class CrossEntropyLoss(Loss):
    name = "cross_entropy"

    def per_sample(self, out: Tensor, target: Tensor) -> Tensor:
        t = as_targets(target, out)
        return -(t * torch.log_softmax(out, dim=1)).sum(1)

    def sample_grad(self, out: Tensor, t: Tensor) -> Tensor:
        return torch.softmax(out, dim=1) - t


def build_loss(spec: str | dict[str, Any]) -> Loss:
    """``mse``, ``mse:reduction=mean``, ``cross_entropy``, ``cross_entropy:reduction=sum``."""
    if isinstance(spec, dict):
        name, opts = spec.get("name", ""), {k: v for k, v in spec.items() if k != "name"}
    else:
        name, opts = parse_spec(spec)
    if name in ("mse", "squared_error"):
        return MSELoss(**check_options("loss", "mse", opts, {"reduction": "sum"}))
    if name in ("cross_entropy", "ce"):
        return CrossEntropyLoss(**check_options("loss", "cross_entropy", opts, {"reduction": "mean"}))
    raise ConfigError(f"unknown loss {name!r}; valid: {', '.join(LOSSES)}")
