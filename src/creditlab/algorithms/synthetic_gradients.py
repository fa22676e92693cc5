"""``sg``: synthetic gradients of the node-perturbation form, fitted to the *true* gradient.

The baseline of Lansdell, Prakash & Kording (ICLR 2020), §4.4 and Appendix C.5: g^i = B e~
exactly as in ``np`` (``form=fa`` or ``dfa``), but B is fitted by least squares to the true
hidden-unit gradient lambda^i = dL/dh^i from backprop (not biologically plausible: it needs
the gradient as a supervisory signal), instead of the node-perturbation estimate. This
separates "approximating the gradient" from "adding noise". It differs from Jaderberg et al.
(2016), whose synthetic gradient is B^T h + c. With ``fit=ridge,gamma`` tiny and
``order=sequential`` the fit is exact on a linear network, and the updates equal backprop's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from creditlab.algorithms import register_algorithm
from creditlab.algorithms._feedback_learning import CleanPass, FeedbackLearner
from creditlab.rng import rng_state, set_rng_state


@register_algorithm
class SyntheticGradient(FeedbackLearner):
    """``sg:form=fa,fit=sgd,b_lr=5e-4``."""

    name = "sg"
    defaults: dict[str, Any] = {
        "form": "fa", "fit": "sgd", "b_lr": 5e-4, "gamma": 0.1, "warmup": 0,
        "order": "simultaneous", "b_init": "xavier", "b_optimizer": "run",
    }

    def clean_pass(self, x: Tensor, y: Tensor) -> CleanPass:
        self._state_before = rng_state(x.device)
        return super().clean_pass(x, y)

    def targets(self, x: Tensor, y: Tensor, clean: CleanPass) -> list[Tensor]:
        """lambda^i = dL/dh^i by autograd on a full-graph pass (same dropout masks)."""
        dev = x.device
        after = rng_state(dev)
        set_rng_state(dev, self._state_before)
        try:
            with torch.enable_grad():
                hs, out = self.net.hidden_outputs(x)
                value = self.loss(out, y)
                grads = torch.autograd.grad(value, hs)
        finally:
            set_rng_state(dev, after)
        return [g.detach() for g in grads]
