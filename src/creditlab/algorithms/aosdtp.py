"""Auxiliary-output SDTP (Bartunov et al. 2018, §2.1.2, Eq. 3): the top layer is [o, z] with
z = aux_act(A h_{L-1}) a set of ``aux`` random features of the penultimate activity (A fixed,
Glorot-initialised, never trained), and

    h^_{L-1} = h_{L-1} - g_L(o, z) + g_L(o^, z),

o = softmax output, o^ = the label; lower targets by difference correction as in SDTP. The
nonlinearity of z is not in the paper: tanh by default (the network's own nonlinearity), any
activation by ``aux_act``. Machinery and options: :mod:`creditlab.algorithms._targetprop`."""

from __future__ import annotations

from typing import Any

from creditlab.algorithms import register_algorithm
from creditlab.algorithms._targetprop import TargetPropagation


@register_algorithm
class AOSDTP(TargetPropagation):
    """``aosdtp``: aux (number of auxiliary units, 512), aux_act (tanh), and SDTP's options."""

    name = "aosdtp"
    penultimate = "aux"
    correction = True
    defaults: dict[str, Any] = {**TargetPropagation.base_defaults, "aux": 512, "aux_act": "tanh"}
