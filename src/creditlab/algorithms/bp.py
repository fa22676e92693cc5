"""Backpropagation: the autograd reference every other algorithm is compared against.

Options (both off by default, and then the step is plain autograd):

* ``noise=sigma``: Gaussian noise N(0, sigma^2) added to every hidden unit after its
  nonlinearity during the training forward pass (the "BP w. noise" rows of Lansdell et al.,
  ICLR 2020, Table 2 and Appendix C.5). Needs an ``MLP`` or an ``nn.Sequential`` of
  Linear/Conv2d layers (the hidden units are the block outputs of
  :func:`creditlab.algorithms._feedback_learning.split_blocks`).
* ``input_noise=sigma``: Gaussian noise added to the input only (a denoising autoencoder,
  Vincent et al. 2008; the paper's DAE uses 0.3); the target is unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor

from creditlab.algorithms import Algorithm, StepResult, register_algorithm
from creditlab.distributed import noise_like
from creditlab.errors import ConfigError


@register_algorithm
class Backprop(Algorithm):
    """``bp``: ``.grad`` = dL/dtheta by autograd (``bp:noise=0.02``, ``bp:input_noise=0.3``)."""

    name = "bp"
    defaults: dict = {"noise": 0.0, "input_noise": 0.0}

    def __init__(self, model, loss, **options):
        super().__init__(model, loss, **options)
        self.noise = float(self.options["noise"])
        self.input_noise = float(self.options["input_noise"])
        if self.noise < 0 or self.input_noise < 0:
            raise ConfigError(f"algorithm 'bp': noise={self.noise} and input_noise={self.input_noise} must be >= 0")
        self.net = None
        if self.noise > 0:
            from creditlab.algorithms._feedback_learning import split_blocks

            self.net = split_blocks(model, "bp:noise")

    def step(self, x: Tensor, y: Tensor) -> StepResult:
        for p in self.params():
            p.grad = None
        if self.input_noise > 0:
            x = x + self.input_noise * noise_like(x)
        if self.net is not None:
            out = self._noisy_forward(x)
        else:
            out = self.model(x)
        loss = self.loss(out, y)
        loss.backward()
        return StepResult(loss.detach(), out.detach())

    def _noisy_forward(self, x: Tensor) -> Tensor:
        h = self.net.prepare(x)
        last = len(self.net.blocks) - 1
        for i, blk in enumerate(self.net.blocks):
            h = blk(h)
            if i < last:
                h = h + self.noise * noise_like(h)
        return h
