"""Backpropagation: the autograd reference every other algorithm is compared against."""

from __future__ import annotations

from torch import Tensor

from creditlab.algorithms import Algorithm, StepResult, register_algorithm


@register_algorithm
class Backprop(Algorithm):
    """``bp``: ``.grad`` = dL/dtheta by autograd."""

    name = "bp"
    defaults: dict = {}

    def step(self, x: Tensor, y: Tensor) -> StepResult:
        for p in self.params():
            p.grad = None
        out = self.model(x)
        loss = self.loss(out, y)
        loss.backward()
        return StepResult(loss.detach(), out.detach())
