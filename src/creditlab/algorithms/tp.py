"""Vanilla target propagation (Bartunov et al. 2018, §2.1.2): targets propagated down through
the learned inverses only, h^_l = g_{l+1}(h^_{l+1}) from h^_L = the label (no difference
correction). Machinery and options: :mod:`creditlab.algorithms._targetprop`."""

from __future__ import annotations

from typing import Any

from creditlab.algorithms import register_algorithm
from creditlab.algorithms._targetprop import TargetPropagation


@register_algorithm
class TP(TargetPropagation):
    """``tp``: schedule=parallel|alternating, first=inverse|forward, sigma (inverse-training noise),
    inverse_loss=denoise|preserve, inv_lr, inv_beta1, inv_beta2, inv_eps, inv_init."""

    name = "tp"
    penultimate = "inverse"
    correction = False
    defaults: dict[str, Any] = dict(TargetPropagation.base_defaults)
