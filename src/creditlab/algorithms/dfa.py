"""Direct feedback alignment (Nokland 2016; Bartunov et al. 2018, §2.1.1): the output error
e = dL/d(output) reaches every hidden layer directly through a fixed random matrix,

    delta a_l = (B_{l+1} e) * f'(a_l),   dW_l = delta a_l x_l^T,

while the output layer gets its true error. Generic over nn.Linear, nn.Conv2d and
LocallyConnected2d: B_{l+1} maps e (flattened) to the *input* of each parameterised layer but
the first, i.e. to the full shape of the hidden activity below it (after its nonlinearity and
any pooling); autograd then carries it through the nonlinearity (f') and pooling to the layer
below. With several consumers of one activity their projections add.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from creditlab.algorithms import Algorithm, StepResult, register_algorithm
from creditlab.algorithms._feedback import (
    Route,
    RouteState,
    check_feedback_init,
    feedback_layers,
    init_feedback_,
    routed,
)
from creditlab.errors import ConfigError
from creditlab.losses import Loss


@register_algorithm
class DirectFeedbackAlignment(Algorithm):
    """``dfa``: options ``init`` (``like`` = uniform with the standard deviation of the weight
    of the layer the projection feeds; or an init spec with fans (outputs, hidden units)) and
    ``noise`` (std of Gaussian noise on hidden layers' outputs in the training forward pass).

    The matrices B are created on the first step, when the shapes are known (drawn from the
    global torch generator, so seeded runs are reproducible)."""

    name = "dfa"
    defaults: dict[str, Any] = {"init": "like", "noise": 0.0}
    divergence_hint = "lower the learning rate, or use dfa:init=xavier for smaller feedback weights"

    def __init__(self, model: nn.Module, loss: Loss, **options: Any):
        super().__init__(model, loss, **options)
        self.init = check_feedback_init(self.options["init"])
        self.noise = float(self.options["noise"])
        if self.noise < 0:
            raise ConfigError(f"dfa option noise={self.noise} must be >= 0 (a standard deviation)")
        self.layers = feedback_layers(model)
        self.B: dict[str, Tensor] = {}  # name -> (numel of the layer's input per sample, numel of output)
        self.state = RouteState(noise=self.noise)
        self.routes = [Route(name, layer, self._input_grad(name)) for name, layer in self.layers]

    def _input_grad(self, name: str):
        def grad(g: Tensor, x_shape: torch.Size) -> Tensor:
            e = self.state.e
            if e is None or name not in self.B:
                raise RuntimeError("dfa: output error or feedback matrix missing in backward (internal error)")
            return (e.reshape(e.shape[0], -1) @ self.B[name].t()).reshape(x_shape)

        return grad

    def _ensure_feedback(self, out: Tensor) -> None:
        k = out[0].numel()
        for name, layer in self.layers:
            if not self.state.grad_inputs.get(name, False):
                continue  # the first layer (its input is the data): nothing to send below
            shape = self.state.inputs[name]
            n = int(torch.Size(shape[1:]).numel())
            if name in self.B:
                if tuple(self.B[name].shape) != (n, k):
                    raise ConfigError(
                        f"dfa: layer {name!r} now sees input {tuple(shape)} and output width {k}, but its feedback "
                        f"matrix was made for {tuple(self.B[name].shape)}; input shapes must not change"
                    )
                continue
            b = out.new_empty(n, k)
            self.B[name] = init_feedback_(b, self.init, layer.weight, fan_in=k, fan_out=n)

    def step(self, x: Tensor, y: Tensor) -> StepResult:
        for p in self.params():
            p.grad = None
        self.state.e = None
        with torch.enable_grad(), routed(self.routes, self.state, training=self.model.training):
            out = self.model(x)
            loss = self.loss(out, y)
            self._ensure_feedback(out)
            (e,) = torch.autograd.grad(loss, out, retain_graph=True)
            self.state.e = e.detach()
            out.backward(e)
        self.state.e = None
        return StepResult(loss.detach(), out.detach())

    def state_dict(self) -> dict[str, Any]:
        return {"B": {k: v.clone() for k, v in self.B.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        known = {n for n, _ in self.layers}
        for k, v in state["B"].items():
            if k not in known:
                raise ConfigError(f"dfa checkpoint has feedback for layer {k!r} that this model lacks")
            p = self.layers[0][1].weight
            self.B[k] = v.to(device=p.device, dtype=p.dtype)

    def to(self, device=None, dtype=None) -> "DirectFeedbackAlignment":
        self.B = {k: v.to(device=device, dtype=dtype) for k, v in self.B.items()}
        return self
