"""Kolen-Pollack learning (Kolen & Pollack 1994, as modified by Akrout et al. 2019, "Deep learning
without weight transport", eqs. 16-17): feedback alignment whose feedback matrix B_l is learned
with the *same* update as the forward weight W_l, plus weight decay on both,

    dW_l = delta_l x_l^T + lambda W_l,      dB_l = delta_l x_l^T + lambda B_l,

(Akrout et al. write B_l in W_l^T's shape and its update as the transposed local product x_l
delta_l^T; here B_l is stored in W_l's shape, so its update is W_l's own local product). With
plain SGD at learning rate eta both see the same gradient term, so

    (W_l - B_l)(t+1) = (1 - eta lambda) (W_l - B_l)(t)

and the difference decays to zero whatever the data: B_l becomes W_l without being copied from it.
Without decay, W_l - B_l stays exactly what it was at initialisation.

Options: ``decay`` (lambda, default 1e-4, the usual weight decay of ImageNet ResNet training;
Akrout et al.'s released numpy code runs without decay) and ``init`` (B's initial value, as for ``fa``:
``like`` = uniform with the forward weight's standard deviation, or an init spec). The decay is
written into ``.grad`` (W's and B's), so the optimizer applies it at its own learning rate: the
factor per step is 1 - lr * decay for SGD, and momentum and learning-rate schedules act on it as
on the gradient. (Akrout et al.'s numpy code multiplies both matrices by a factor each step,
``weight_decay * W - lr * dW``, with factor 1, i.e. no decay, in its MNIST and CIFAR-10 runs; a
factor f there is decay = (1 - f) / lr here.) With an adaptive optimizer (Adam) W and B are
normalised separately, so W - B shrinks but not by the exact factor above. The decay applies to
the weights, not to the biases. The optimizer's own ``weight_decay`` applies to both W and B.

B is trained only where it is used, in the layers that send an error to their input (not the
first layer, whose input is the data); ``diagnostics()`` reports those layers, and the angle to
backprop is computed on the update without the decay term (``reported_updates``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from creditlab.algorithms import StepResult, register_algorithm
from creditlab.algorithms._feedback import sending_layers
from creditlab.algorithms.fa import FeedbackAlignment
from creditlab.diagnostics.angles import current_updates
from creditlab.distributed import constant_share
from creditlab.errors import ConfigError
from creditlab.losses import Loss


@register_algorithm
class KolenPollack(FeedbackAlignment):
    """``kp``: options ``decay`` (weight decay on W and B, applied at the optimizer's learning
    rate), ``init`` (B's initial value, as for ``fa``) and ``unrouted`` (as for ``fa``: ``refuse``,
    the default, refuses by name modules the routing cannot reach, e.g. nn.LSTM or
    nn.MultiheadAttention; ``autograd`` lets autograd train them from the feedback error that
    reaches them, with no B of their own)."""

    name = "kp"
    defaults: dict[str, Any] = {"decay": 1e-4, "init": "like", "unrouted": "refuse"}
    divergence_hint = "lower the learning rate, or use kp:init=xavier for smaller initial feedback weights"

    def __init__(self, model: nn.Module, loss: Loss, **options: Any):
        super().__init__(model, loss, **options)
        self.decay = float(self.options["decay"])
        if not self.decay >= 0:
            raise ConfigError(f"kp option decay={self.options['decay']} must be >= 0")
        self._names = {id(p): n for n, p in model.named_parameters()}

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        # no lr or other hyper-parameters of its own: B is updated exactly as W is
        return [{"params": [self.B[n] for n, _ in self.layers], "name": "kp.feedback"}]

    def step(self, x: Tensor, y: Tensor) -> StepResult:
        B = self.B
        for b in B.values():
            b.grad = None
        res = super().step(x, y)  # W.grad = delta x^T with B^T in the backward pass
        lam = self.decay * constant_share()  # batch-independent: counted once across ranks
        sent = self.state.grad_inputs  # the layers that sent an error below in this pass
        with torch.no_grad():
            decayed: dict[int, Tensor] = {}  # each weight once, also one that two layers share
            for n, m in self.layers:
                w = m.weight
                g = w.grad
                if g is None:
                    continue
                if sent.get(n, False):  # B's update is W's local product plus B's own decay
                    b = B[n]
                    b.grad = torch.add(g, b, alpha=lam) if lam else g.clone()
                if lam:
                    decayed[id(w)] = w
            for w in decayed.values():
                w.grad.add_(w, alpha=lam)
        return res

    def reported_updates(self) -> dict[str, Tensor] | None:
        """The local-product updates without the decay term (what backprop is compared with)."""
        if not self.decay:
            return None
        lam = self.decay * constant_share()
        out = current_updates(self.model)
        for _, layer in self.layers:
            name = self._names.get(id(layer.weight))
            if name in out and layer.weight.grad is not None:
                out[name] = layer.weight.grad.detach() - lam * layer.weight.detach()
        return out

    def feedback_pairs(self) -> list[tuple[str, Tensor, Tensor]]:
        return [(n, m.weight.detach(), self.B[n]) for n, m in sending_layers(self.layers, self.state)]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state["B"].items():
            if k not in self.B or self.B[k].shape != v.shape:
                raise ConfigError(f"kp checkpoint has feedback {k!r} of shape {tuple(v.shape)} that this model lacks")
            self.B[k].copy_(v)  # in place: the optimizer holds these tensors

    def to(self, device=None, dtype=None) -> KolenPollack:
        for b in self.B.values():
            b.data = b.data.to(device=device, dtype=dtype)  # in place: the optimizer's group keeps B
        return self
