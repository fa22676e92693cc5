"""Simplified difference target propagation (Bartunov et al. 2018, §2.1.2, Algorithm 1): the
penultimate target also by difference correction from h^_L = argmin L (the label), so no
gradient is computed anywhere but in the output layer's delta rule; inverses trained with the
denoising loss ||h - g(f(h~))||^2. Machinery and options: :mod:`creditlab.algorithms._targetprop`."""

from __future__ import annotations

from typing import Any

from creditlab.algorithms import register_algorithm
from creditlab.algorithms._targetprop import TargetPropagation


@register_algorithm
class SDTP(TargetPropagation):
    """``sdtp``: sigma, schedule, first, inverse_loss (default denoise), inv_lr, inv_beta1,
    inv_beta2, inv_eps, inv_init."""

    name = "sdtp"
    penultimate = "inverse"
    correction = True
    defaults: dict[str, Any] = dict(TargetPropagation.base_defaults)
