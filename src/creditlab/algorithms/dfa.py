"""Direct feedback alignment (Nokland 2016; Bartunov et al. 2018, §2.1.1): the output error
e = dL/d(output) reaches every hidden layer directly through a fixed random matrix,

    delta a_l = (B_{l+1} e) * f'(a_l),   dW_l = delta a_l x_l^T,

while the output layer gets its true error. Generic over nn.Linear, nn.Conv2d and
LocallyConnected2d: B_{l+1} maps e (flattened) to the *input* of each parameterised layer but
the first, i.e. to the full shape of the hidden activity below it (after its nonlinearity and
any pooling); autograd then carries it through the nonlinearity (f') and pooling to the layer
below. With several consumers of one activity their projections add.

Parameters outside the routed layers (BatchNorm / LayerNorm affine parameters, class tokens,
position embeddings, embedding tables) get the local autograd gradient of the feedback error
that reaches them (the projected B e after the autograd path from it to their use; no weight
matrix transported), which is DFA's rule applied to them. (Between a projection and the layer
below, autograd carries the error through normalisations, their scale included, as through f'.)

Modules whose weight matrices the routing cannot reach and whose autograd backward would carry
the error through W^T (nn.LSTM and every nn.RNNBase, RNN cells, nn.MultiheadAttention, other
convolutions than nn.Conv2d, nn.Bilinear) are refused by name while they have trainable
parameters; ``unrouted=autograd`` accepts them: they and the layers they own are trained by
autograd (backprop inside them) from the feedback error that reaches them, and get no B. A routed
layer whose forward is never called while its weight is in the loss's graph (its parent uses the
weight directly) is refused by name in the first step it happens.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from creditlab.algorithms import Algorithm, StepResult, register_algorithm
from creditlab.algorithms._feedback import (
    Route,
    RouteState,
    Router,
    check_feedback_init,
    feedback_layers,
    init_feedback_,
)
from creditlab.errors import ConfigError
from creditlab.losses import Loss


@register_algorithm
class DirectFeedbackAlignment(Algorithm):
    """``dfa``: options ``init`` (``like`` = uniform with the standard deviation of the weight
    of the layer the projection feeds; or an init spec with fans (outputs, hidden units)) and
    ``noise`` (std of Gaussian noise on hidden layers' outputs in the training forward pass), and
    ``unrouted`` (``refuse``, the default, or ``autograd``: as for ``fa``).

    The matrices B are created on the first step, when the shapes are known (drawn from the
    global torch generator, so seeded runs are reproducible)."""

    name = "dfa"
    defaults: dict[str, Any] = {"init": "like", "noise": 0.0, "unrouted": "refuse"}
    divergence_hint = "lower the learning rate, or use dfa:init=xavier for smaller feedback weights"

    def __init__(self, model: nn.Module, loss: Loss, **options: Any):
        super().__init__(model, loss, **options)
        self.init = check_feedback_init(self.options["init"])
        self.noise = float(self.options["noise"])
        if self.noise < 0:
            raise ConfigError(f"dfa option noise={self.noise} must be >= 0 (a standard deviation)")
        self.layers = feedback_layers(model, self.options["unrouted"], self.name)
        self.B: dict[str, Tensor] = {}  # name -> (numel of the layer's input per sample, numel of output)
        self.state = RouteState(noise=self.noise)
        self.routes = [Route(name, layer, self._input_grad(name)) for name, layer in self.layers]
        self.router = Router(self.routes, self.state)

    def _input_grad(self, name: str):
        def grad(g: Tensor, x_shape: torch.Size) -> Tensor:
            e = self.state.e  # (batch, outputs), flattened
            b = self.B.get(name)
            if e is None or b is None:
                raise RuntimeError("dfa: output error or feedback matrix missing in backward (internal error)")
            return e.mm(b.t()).reshape(x_shape)

        return grad

    def _record_error(self, e: Tensor) -> None:
        self.state.e = e.detach().reshape(e.shape[0], -1)

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
        with torch.enable_grad(), self.router(self.model.training):
            out = self.model(x)
            loss = self.loss(out, y)
            self.router.check_forwards(loss, self.name)
            self._ensure_feedback(out)
            if out.grad_fn is None:
                raise ConfigError("dfa: the model output does not depend on any trainable parameter; nothing to train")
            # one backward pass: the hook records e = dL/d(out) before any layer below the output
            # (every routed layer) runs its backward, which reads it
            handle = out.register_hook(self._record_error)
            try:
                loss.backward()
            finally:
                handle.remove()
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
