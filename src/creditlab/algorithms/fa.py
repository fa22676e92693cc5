"""Feedback alignment (Lillicrap et al. 2016; Bartunov et al. 2018, §2.1.1): backprop with a
fixed random matrix B_l of W_l's shape in place of W_l in the backward pass,

    delta_{l-1} = (B_l^T delta_l) * f'(a_{l-1}),   dW_l = delta_l x_l^T,

for every nn.Linear, nn.Conv2d and LocallyConnected2d of any model (everything else, e.g.
pooling, dropout and activations, is differentiated by autograd). B_l is never trained.

Parameters outside those layers (BatchNorm / LayerNorm affine parameters, class tokens, position
embeddings, embedding tables) get the local autograd gradient of the feedback error that reaches
them: the error at their use times what they multiply there, no weight matrix transported, which
is FA's rule dW = delta x^T applied to them. (The error that a normalisation passes on to the
layer below goes through autograd's derivative of the normalisation, its scale included, as
through an activation's f'.)

Modules whose weight matrices the routing cannot reach and whose autograd backward would carry
the error through W^T, i.e. backprop inside them (nn.LSTM, nn.GRU and every nn.RNNBase, RNN
cells, nn.MultiheadAttention, whose ``in_proj_weight`` is a bare parameter and whose ``out_proj``
is never called, convolutions other than nn.Conv2d, nn.Bilinear), are refused by name while they
have trainable parameters. ``unrouted=autograd`` accepts them: they, and the layers they own
(MultiheadAttention's ``out_proj``), are trained by autograd from the feedback error that
reaches them (e.g. an LSTM by backprop through time from the error its head's B sends it), and
get no B and no alignment diagnostics. A routed layer whose forward is never called while its
weight is in the loss's graph (its parent uses the weight directly) is refused by name in the
first step it happens.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from creditlab.algorithms import Algorithm, StepResult, register_algorithm
from creditlab.algorithms._feedback import (
    Route,
    Router,
    RouteState,
    check_feedback_init,
    feedback_layers,
    init_feedback_,
    layer_fans,
)
from creditlab.diagnostics import feedback_alignment
from creditlab.errors import ConfigError
from creditlab.losses import Loss


@register_algorithm
class FeedbackAlignment(Algorithm):
    """``fa``: options ``init`` (``like`` = uniform with the forward weight's standard deviation
    at construction, i.e. scaled like the forward init; or any init spec: ``xavier``,
    ``orthogonal``, ``normal(0.05)``, ...) and ``noise`` (std of Gaussian noise on every hidden
    layer's output in the training forward pass; 0 = none) and ``unrouted`` (``refuse``, the
    default: refuse by name a module with trainable parameters that the routing cannot reach,
    e.g. nn.LSTM or nn.MultiheadAttention; ``autograd``: such modules are trained by autograd from
    the feedback error that reaches them)."""

    name = "fa"
    defaults: dict[str, Any] = {"init": "like", "noise": 0.0, "unrouted": "refuse"}
    divergence_hint = "lower the learning rate, or use fa:init=xavier for smaller feedback weights"

    def __init__(self, model: nn.Module, loss: Loss, **options: Any):
        super().__init__(model, loss, **options)
        self.init = check_feedback_init(self.options["init"])
        self.noise = float(self.options.get("noise", 0.0))
        if self.noise < 0:
            raise ConfigError(f"{self.name} option noise={self.noise} must be >= 0 (a standard deviation)")
        self.layers = feedback_layers(model, self.options.get("unrouted", "refuse"), self.name)
        self.B: dict[str, Tensor] = self._initial_feedback()
        self.state = RouteState(noise=self.noise)
        self.routes = [Route(name, layer, feedback=partial(self.feedback, name, layer)) for name, layer in self.layers]
        self.router = Router(self.routes, self.state)

    # ---- hooks for the feedback-weight families built on FA (signsym, kp, wm) ----------------
    def _initial_feedback(self) -> dict[str, Tensor]:
        """B of every routed layer at construction (FA: drawn by ``init``, then fixed)."""
        out = {}
        for name, layer in self.layers:
            fan_in, fan_out = layer_fans(layer)
            out[name] = init_feedback_(torch.empty_like(layer.weight, requires_grad=False), self.init,
                                       layer.weight, fan_in, fan_out)
        return out

    def feedback(self, name: str, layer: nn.Module) -> Tensor:
        """The B (W's shape) that layer ``name`` sends its error through in this backward pass."""
        return self.B[name]

    def _before_backward(self) -> None:
        """Runs inside the routed block after the forward pass, before ``loss.backward()``."""

    def feedback_pairs(self) -> list[tuple[str, Tensor, Tensor]]:
        """(layer name, W, B) for the alignment diagnostics."""
        return [(name, layer.weight.detach(), self.B[name]) for name, layer in self.layers]

    def step(self, x: Tensor, y: Tensor) -> StepResult:
        for p in self.params():
            p.grad = None
        with torch.enable_grad(), self.router(self.model.training):
            out = self.model(x)
            loss = self.loss(out, y)
            self.router.check_forwards(loss, self.name)
            self._before_backward()
            loss.backward()
        return StepResult(loss.detach(), out.detach())

    def diagnostics(self) -> dict[str, float]:
        return feedback_alignment(self.feedback_pairs())

    def state_dict(self) -> dict[str, Any]:
        return {"B": {k: v.clone() for k, v in self.B.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state["B"].items():
            if k not in self.B or self.B[k].shape != v.shape:
                raise ConfigError(f"{self.name} checkpoint has feedback {k!r} of shape {tuple(v.shape)} that this model lacks")
            self.B[k] = v.to(self.B[k])

    def to(self, device=None, dtype=None) -> "FeedbackAlignment":
        self.B = {k: v.to(device=device, dtype=dtype) for k, v in self.B.items()}
        return self
