"""Difference target propagation (Lee et al. 2015; Bartunov et al. 2018, §2.1.2, Eq. 2):
h^_l = g_{l+1}(h^_{l+1}) + h_l - g_{l+1}(h_{l+1}), with the penultimate target by a gradient
step through the output layer, h^_{L-1} = h_{L-1} - alpha dL/dh_{L-1} (``alpha_loss=sum``, the
default: L summed over the batch, so each sample steps by alpha times its own gradient;
``alpha_loss=mean``: L averaged over the batch as in Lee et al.'s and Meulemans et al.'s code and
the published alphas, a step of alpha/B per sample), and inverses trained
with the noise-preserving loss ||h~ - g(f(h~))||^2 (the paper's appendix §5.1).
Machinery and options: :mod:`creditlab.algorithms._targetprop`."""

from __future__ import annotations

from typing import Any

from creditlab.algorithms import register_algorithm
from creditlab.algorithms._targetprop import TargetPropagation


@register_algorithm
class DTP(TargetPropagation):
    """``dtp``: alpha (penultimate gradient step), alpha_loss (sum|mean: the loss alpha steps on),
    sigma, schedule, first, inverse_loss
    (default preserve), inv_lr, inv_beta1, inv_beta2, inv_eps, inv_init."""

    name = "dtp"
    penultimate = "gradient"
    correction = True
    defaults: dict[str, Any] = {**TargetPropagation.base_defaults, "alpha": 0.1, "alpha_loss": "sum",
                                 "inverse_loss": "preserve"}
