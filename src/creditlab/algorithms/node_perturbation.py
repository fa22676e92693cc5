"""``np``: feedback weights learned by node perturbation (Lansdell, Prakash & Kording, ICLR 2020).

Every step runs two forward passes with the same weights (and, for a model with dropout, the
same dropout masks: the random-number state is replayed for the second pass):

* a *clean* pass, whose activations and errors drive every update (§2.2: "the gradients used
  for weight updates are computed using the deterministic baseline");
* a *noisy* pass, h~^i = f^i(h~^{i-1}) + xi^i with xi^i ~ N(0, sigma^2 I) on every hidden
  unit after its nonlinearity (the output is not perturbed; all hidden layers at once).

The per-sample loss difference gives the node-perturbation estimate of lambda^i = dL/dh^i
(§2.3, eq. 2): lambda_hat^i = (L~ - L) xi^i / sigma^2, unbiased to first order in sigma. The
feedback matrices B are fitted to it by least squares (eq. 3), ``fit=sgd`` (one step per batch
with learning rate ``b_lr``) or ``fit=ridge`` (exact recursive ridge, gamma, Appendix C.3); the
forward weights learn through B as in feedback alignment (``form=fa``, §4.1) or direct feedback
alignment (``form=dfa``, §4.3). During the first ``warmup`` steps only B learns (C.1); ``.grad``
of the forward weights stays None, so they are bitwise frozen. With ``b_lr=0`` (and
``fit=sgd``) this is feedback alignment with the initial B. See
:mod:`creditlab.algorithms._feedback_learning` for the shared machinery.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from creditlab.algorithms import register_algorithm
from creditlab.algorithms._feedback_learning import CleanPass, FeedbackLearner, loss_scale, np_estimate
from creditlab.distributed import noise_like
from creditlab.errors import ConfigError
from creditlab.rng import rng_state, set_rng_state


@register_algorithm
class NodePerturbation(FeedbackLearner):
    """``np:sigma=0.01,form=fa,fit=sgd,b_lr=5e-4,warmup=1000``."""

    name = "np"
    defaults: dict[str, Any] = {
        "sigma": 0.01, "form": "fa", "fit": "sgd", "b_lr": 5e-4, "gamma": 0.1, "warmup": 0,
        "order": "simultaneous", "b_init": "xavier", "b_optimizer": "run",
    }
    divergence_hint = "lower the learning rate, b_lr, or sigma"

    def __init__(self, model: nn.Module, loss: Any, **options: Any):
        super().__init__(model, loss, **options)
        self.sigma = float(self.options["sigma"])
        if not self.sigma > 0:
            raise ConfigError(f"algorithm 'np': sigma={self.sigma} must be > 0 (standard deviation of the node noise)")
        self._last_delta: float = float("nan")

    @torch.no_grad()
    def noisy_loss(self, x: Tensor, y: Tensor, clean: CleanPass) -> tuple[Tensor, list[Tensor]]:
        """Per-sample loss of the noisy pass and the noise drawn, with the dropout masks of the
        clean pass (the RNG state before the clean pass is replayed around the noise draw)."""
        dev = x.device
        noise = [noise_like(h) * self.sigma for h in clean.out[:-1]]
        after_noise = rng_state(dev)
        set_rng_state(dev, self._state_before)
        try:
            out = self.net.forward(x, noise)
        finally:
            set_rng_state(dev, after_noise)
        return self.loss.per_sample(out, y), noise

    def clean_pass(self, x: Tensor, y: Tensor) -> CleanPass:
        self._state_before = rng_state(x.device)
        return super().clean_pass(x, y)

    def targets(self, x: Tensor, y: Tensor, clean: CleanPass) -> list[Tensor]:
        noisy, noise = self.noisy_loss(x, y, clean)
        delta = (noisy - clean.per_sample) * loss_scale(self.loss, x.shape[0])
        self._last_delta = float(delta.abs().mean())
        return np_estimate(delta, noise, self.sigma)
