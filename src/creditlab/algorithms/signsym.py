"""Sign symmetry (Liao, Leibo & Poggio 2016; Xiao et al. 2018), in BioTorch's three variants:
feedback alignment whose feedback matrix carries the *current* signs of the forward weights,

    B_l = sign(W_l) o M_l,   delta_{l-1} = (B_l^T delta_l) * f'(a_{l-1}),   dW_l = delta_l x_l^T,

formed anew at every step from W_l as it is then, on every nn.Linear, nn.Conv2d and
LocallyConnected2d of any model (the routing of :mod:`creditlab.algorithms.fa`). The variants
differ in the magnitudes M_l:

* ``usf`` (uniform sign-concordant feedback): M_l = s_l, one number per layer, the standard
  deviation of the layer's initialisation (``init=like``: of W_l at construction; ``init=xavier``:
  sqrt(2 / (fan_in + fan_out)); ``init=default``, PyTorch's: 1 / sqrt(3 fan_in); ``normal(s)``: s);
* ``brsf`` (batchwise random magnitudes): M_l = |R_l| with R_l drawn from the initialisation
  afresh at every step (``like``: uniform with W_l's standard deviation at construction);
* ``frsf`` (fixed random magnitudes): M_l = |R_l| drawn once, at construction, and kept
  (checkpointed); only the signs follow W_l.

Where BioTorch (``jsalbert/biotorch``, ``layers/fa_constructor``) and the papers differ, this
module follows BioTorch:

* Liao et al. define uSF as B = sign(W), magnitude one, and make it train with batch
  normalisation and the "Batch Manhattan" update (the sign of the gradient). BioTorch scales
  sign(W) by the standard deviation of its layer initialisation (xavier: sqrt(2 / (fan_in +
  fan_out)); PyTorch's default: 1 / sqrt(3 fan_in)) against exploding gradients, as Xiao
  et al.'s code does (``willwx/sign-symmetry``: a conv's He-init standard deviation, a linear
  layer's 1 / sqrt(fan_in), the bound of PyTorch's default init);
  here that scale is ``init``'s. Liao et al.'s unscaled feedback is ``signsym:init=normal(1)``.
* Liao et al. write brSF and frSF as V = M o sign(W) with M random magnitudes redrawn after every
  update (brSF) or fixed for the whole run (frSF). BioTorch draws M from the layer's init
  distribution (xavier uniform in its configs) and takes its absolute value, noting that as its
  modification; the same is done here with ``init``'s distribution.
* BioTorch draws brSF's magnitudes in every forward call (evaluation passes included) and
  reinitialises the forward weights with its own init; here they are drawn once per training
  step, for the layers whose feedback is used, and the model keeps its own initialisation.
* BioTorch's brSF with its non-xavier init calls an unimported name; there is no such failure here.

B is needed only by layers that send an error to their input (not by the first layer, whose
input is the data), so it is formed only there; ``diagnostics()`` reports those layers. For
``brsf`` the magnitudes come from the global torch generator (seeded runs reproduce; in a
data-parallel run every rank draws the same ones).
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import Tensor, nn

from creditlab.algorithms import register_algorithm
from creditlab.algorithms._feedback import layer_fans, like_std, sending_layers
from creditlab.algorithms.fa import FeedbackAlignment
from creditlab.errors import ConfigError
from creditlab.losses import Loss
from creditlab.models.init import init_weight_
from creditlab.spec import choice

VARIANTS = ("usf", "brsf", "frsf")


def init_std(spec: str, weight: Tensor, fan_in: int, fan_out: int) -> float:
    """Standard deviation of the entries an init spec draws for ``weight`` (with ``init_weight_``'s
    fans), ``like`` = the standard deviation of ``weight`` itself."""
    if spec == "like":
        return like_std(weight, fan_in)
    m = re.fullmatch(r"normal\(([0-9.eE+-]+)\)", spec)
    if m:
        return float(m.group(1))
    if spec in ("xavier", "glorot", "xavier_normal"):
        return math.sqrt(2.0 / (fan_in + fan_out))
    if spec == "orthogonal":  # rows (or columns) orthonormal: sum of squares min(r, c)
        r = weight.shape[0]
        c = weight.numel() // max(r, 1)
        return math.sqrt(min(r, c) / (r * c))
    torch_fan_in = nn.init._calculate_fan_in_and_fan_out(weight)[0]  # default: kaiming uniform a=sqrt(5)
    return 1.0 / math.sqrt(3.0 * torch_fan_in)


@register_algorithm
class SignSymmetry(FeedbackAlignment):
    """``signsym``: options ``variant`` (``usf`` | ``brsf`` | ``frsf``) and ``init``, the
    initialisation whose scale (uSF) or distribution (brSF, frSF: its absolute value) gives the
    feedback magnitudes: ``like`` (the forward weight's standard deviation at construction, uniform
    for the random variants) or an init spec (``xavier`` is BioTorch's default, ``default``
    PyTorch's); ``unrouted`` as for ``fa`` (``refuse``, the default: modules the routing cannot
    reach, e.g. nn.LSTM or nn.MultiheadAttention, are refused by name; ``autograd``: they are
    trained by autograd from the feedback error that reaches them)."""

    name = "signsym"
    defaults: dict[str, Any] = {"variant": "usf", "init": "like", "unrouted": "refuse"}
    divergence_hint = "lower the learning rate, or use signsym:init=xavier for smaller feedback magnitudes"

    def __init__(self, model: nn.Module, loss: Loss, **options: Any):
        self.variant = choice("algorithm signsym", "variant", str(options.get("variant", "usf")).lower(), VARIANTS)
        super().__init__(model, loss, **options)

    # ---- the magnitudes ------------------------------------------------------------------
    def _initial_feedback(self) -> dict[str, Tensor]:
        self.scale: dict[str, float] = {}  # usf: s_l; brsf: the init std for init=like
        self.M: dict[str, Tensor] = {}  # frsf: fixed |R_l|
        for name, layer in self.layers:
            fan_in, fan_out = layer_fans(layer)
            if self.variant == "frsf":
                self.M[name] = self._draw(layer, like_std(layer.weight, fan_in) if self.init == "like" else 0.0)
            elif self.variant == "usf" or self.init == "like":
                self.scale[name] = init_std(self.init, layer.weight, fan_in, fan_out)
        return {}  # B is formed from W's signs at every step

    def _draw(self, layer: nn.Module, std: float) -> Tensor:
        """|R| for one layer: R from ``init`` (``like``: uniform with standard deviation ``std``).
        (No autograd: a fresh tensor filled in place; ``init_weight_`` runs under no_grad.)"""
        m = torch.empty_like(layer.weight, requires_grad=False)
        if self.init == "like":
            return m.uniform_(0.0, std * math.sqrt(3.0))  # |U(-a, a)| = U(0, a)
        fan_in, fan_out = layer_fans(layer)
        return init_weight_(m, self.init, fan_in=fan_in, fan_out=fan_out).abs_()

    def feedback(self, name: str, layer: nn.Module) -> Tensor:
        # no autograd to disable: every operand is detached (called in the backward pass, per layer)
        sign = torch.sign(layer.weight.detach())
        if self.variant == "usf":
            b = sign.mul_(self.scale[name])
        elif self.variant == "frsf":
            b = sign.mul_(self.M[name])
        else:
            b = sign.mul_(self._draw(layer, self.scale.get(name, 0.0)))
        self.B[name] = b  # the feedback of this step, for the diagnostics
        return b

    def feedback_pairs(self) -> list[tuple[str, Tensor, Tensor]]:
        return [(n, m.weight.detach(), self.B[n]) for n, m in sending_layers(self.layers, self.state) if n in self.B]

    # ---- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"variant": self.variant, "scale": dict(self.scale), "M": {k: v.clone() for k, v in self.M.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("variant", self.variant) != self.variant:
            raise ConfigError(f"signsym checkpoint is of variant {state['variant']!r}, not {self.variant!r}")
        known = {n: m for n, m in self.layers}
        for k, v in state.get("M", {}).items():
            if k not in known or tuple(v.shape) != tuple(known[k].weight.shape):
                raise ConfigError(f"signsym checkpoint has magnitudes {k!r} of shape {tuple(v.shape)} that this "
                                  "model lacks")
            self.M[k] = v.to(known[k].weight)
        self.scale.update({k: float(v) for k, v in state.get("scale", {}).items() if k in known})

    def to(self, device=None, dtype=None) -> SignSymmetry:
        self.M = {k: v.to(device=device, dtype=dtype) for k, v in self.M.items()}
        self.B = {k: v.to(device=device, dtype=dtype) for k, v in self.B.items()}
        return self
