"""Activation Relaxation (Millidge, Tschantz, Seth, Buckley; ``../shared/papers`` file 000).

After the forward sweep the hidden states x^l (l = 1..L-1) relax by Euler steps of

    dx^l/dt = -x^l + J_l^T x^{l+1},    J_l^T v = B_l^T (f'(a_l) * v)           (§1, Eq. 5)

with a_l the forward pre-activation (held fixed), B_l = W_l (``feedback=transpose``), fixed
random psi_l^T (``random``, feedback alignment, §3.1) or learned psi_l^T (``learned``, Eq. 6),
and f' dropped with ``derivative=false`` (Eqs. 7-8). The output state is *clamped* to
c = dL/dx^L (Appendices A-B; Algorithm 1 relaxes the output to the same value instead, which
has the same equilibrium). At equilibrium x^l = dL/dx^l, and the weights update with the local
product dW_l = (x^{l+1} * f'(a_l)) x_fwd^{l T} (bias: the sum of x^{l+1} * f'(a_l)).

Two schedules: ``synchronous`` (every layer from the previous step's states: the paper's single
parallel phase) and ``sweep`` (top-down, each layer uses the just-updated layer above: what the
authors' code does). Two modes:

* ``simulate`` runs the T steps one by one (and can record the convergence trace, Fig. 1);
* ``exact`` gives the same x(T) in closed form. With the Jacobians fixed one step is
  x <- M x + eta b, with M = (1-eta) I + eta N (synchronous) or (1-eta)(I - eta N)^{-1}
  (sweep), N the nilpotent block-superdiagonal map (N x)_l = J_l^T x_{l+1}. The fixed point
  is x* = sum_k N^k b, i.e. x*_l = J_l^T ... J_{L-1}^T c (backprop through the feedback), and
  x(T) = x* + M^T (x(0) - x*) with M^T = sum_k w_k N^k,
      w_k = C(T,k) (1-eta)^(T-k) eta^k            (synchronous)
      w_k = (1-eta)^T C(T+k-1,k) eta^k            (sweep, negative-binomial weights).
  So x(T)_l = x*_l + sum_k w_k J_l^T...J_{l+k-1}^T e_{l+k}, e = x(0) - x*: O(L^2)
  Jacobian-vector products, batched into one matmul per layer (see :func:`relax_exact` for the
  order that keeps the widest layers cheapest). ``init=zero`` needs only x*:
  x(T)_l = (1 - sum_{k<=L-1-l} w_k) x*_l. ``steps=inf`` returns x*.

Learned feedback (Eq. 6): psi_l (shape of W_l^T) receives exactly the weight update's local
product, transposed (psi.grad = dW_l^T), through the same optimizer, as the authors' code
does. The paper prints Eq. 6 with a + sign because its states carry the opposite sign there;
with our states (= +dL/dx) the optimizer's descent on both gives the same rule. Consequence:
with the same optimizer and learning rate and no decay, psi - W^T stays at its initial value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from creditlab.algorithms import Algorithm, StepResult, register_algorithm
from creditlab.algorithms._ar_options import (
    AR_DEFAULTS,
    DIVERGENCE_HINT,
    check_relaxation_options,
)
from creditlab.algorithms._relaxation_weights import relaxation_weights, tail_weights
from creditlab.algorithms._residuals import RelaxationResidual
from creditlab.algorithms._verify import guard_first_step, snapshot
from creditlab.errors import ConfigError
from creditlab.models import MLP, require_mlp
from creditlab.models.init import init_weight_


# ----------------------------------------------------------------------------------------
# pure functions
# ----------------------------------------------------------------------------------------
@dataclass
class Relaxation:
    """Per-batch relaxation problem: the chain's backward maps and the clamp.

    ``back[l]`` (l = 1..L-1) is B_l of shape (out, in) and ``deriv[l]`` is f'(a_l) (or None to
    drop it), so J_l^T v = (v * deriv[l]) @ back[l]; ``clamp`` is c = dL/dx^L."""

    back: list[Tensor | None]
    deriv: list[Tensor | None]
    clamp: Tensor

    @property
    def depth(self) -> int:  # L
        return len(self.back)

    def jt(self, l: int, v: Tensor) -> Tensor:
        d = self.deriv[l]
        return (v if d is None else v * d) @ self.back[l]  # type: ignore[operator]

    def euler(self, l: int, x: Tensor, above: Tensor, eta: float) -> Tensor:
        """One Euler step x + eta (-x + J_l^T above), fused into one addmm."""
        d = self.deriv[l]
        return torch.addmm(x, above if d is None else above * d, self.back[l], beta=1.0 - eta, alpha=eta)  # type: ignore[arg-type]

    def fixed_point(self) -> list[Tensor | None]:
        """x*_l for l = 1..L (index L is the clamp); index 0 is None."""
        L = self.depth
        xs: list[Tensor | None] = [None] * (L + 1)
        xs[L] = self.clamp
        for l in range(L - 1, 0, -1):
            xs[l] = self.jt(l, xs[l + 1])  # type: ignore[arg-type]
        return xs


def relax_exact(
    rel: Relaxation, init: list[Tensor | None] | None, steps: float, eta: float, schedule: str
) -> list[Tensor | None]:
    """States after ``steps`` Euler steps in closed form (``init`` None means zero states).

    With a_m = 1 - sum_{k <= L-1-m} w_k, x(T) = (I - M^T) x* + M^T x(0) reads, per layer,
    x(T)_m = a_m x*_m + sum_{j >= m} w_{j-m} J_m^T...J_{j-1}^T x(0)_j. Folding a_m x*_m into the
    chain from the clamp gives one vector per target layer m, G_m, carried down from the top:
    G_m <- a_m c at the output, G_m <- w_{l-m} x(0)_l + J_l^T G_m at layer l >= m, x(T)_m = G_m at
    layer m. Layer l carries the l vectors of the layers at or below it through one batched
    product, so the widest (lowest) layers see the fewest."""
    L = rel.depth
    if math.isinf(steps):
        return rel.fixed_point()
    T = int(steps)
    w = relaxation_weights(T, eta, schedule, max(L - 2, 0))
    xs: list[Tensor | None] = [None] * (L + 1)
    xs[L] = rel.clamp
    # a[m] = 1 - sum_{k<=L-1-m} w_k for m = 1..L-1, the tail summed directly (no cancellation)
    tail = tail_weights(T, eta, schedule, max(L - 2, 0))
    a = [1.0] + [tail[L - 1 - m] for m in range(1, L)]
    if init is None:
        star = rel.fixed_point()
        for m in range(1, L):
            xs[m] = star[m] * a[m]  # type: ignore[operator]
        return xs
    c = rel.clamp
    # G[m-1] for m = 1..l, stacked: (l, B, n)
    scale = torch.tensor(a[1:L], dtype=c.dtype, device=c.device).view(-1, 1, 1)
    G = scale * c.unsqueeze(0)
    for l in range(L - 1, 0, -1):
        wl = torch.tensor([w[l - m] for m in range(1, l + 1)], dtype=c.dtype, device=c.device).view(-1, 1, 1)
        G = rel.jt(l, G[:l]) + wl * init[l].unsqueeze(0)  # type: ignore[union-attr]
        xs[l] = G[l - 1]
    return xs


def relax_simulate(
    rel: Relaxation,
    init: list[Tensor | None] | None,
    steps: int,
    eta: float,
    schedule: str,
    target: list[Tensor | None] | None = None,
) -> tuple[list[Tensor | None], list[list[float]]]:
    """Euler steps one by one. With ``target`` (per-layer dL/dx^l) also returns the trace
    ``trace[t][l-1]`` = mean squared error between x^l(t) and target^l, t = 0..steps."""
    if math.isinf(steps):
        raise ConfigError("ar: mode=simulate needs a finite number of steps; use mode=exact for steps=inf")
    L = rel.depth
    xs: list[Tensor | None] = [None] * (L + 1)
    xs[L] = rel.clamp
    zeros = rel.fixed_point() if init is None else None
    for l in range(1, L):
        xs[l] = torch.zeros_like(zeros[l]) if zeros is not None else init[l].clone()  # type: ignore[arg-type,index,union-attr]
    trace: list[list[float]] = []

    def record() -> None:
        if target is not None:
            trace.append([float(((xs[l] - target[l]) ** 2).mean()) for l in range(1, L)])  # type: ignore[operator]

    record()
    for _ in range(int(steps)):
        if schedule == "synchronous":
            new = [rel.euler(l, xs[l], xs[l + 1], eta) for l in range(1, L)]  # type: ignore[arg-type]
            for l in range(1, L):
                xs[l] = new[l - 1]
        else:
            for l in range(L - 1, 0, -1):
                xs[l] = rel.euler(l, xs[l], xs[l + 1], eta)  # type: ignore[arg-type]
        record()
    return xs, trace


# ----------------------------------------------------------------------------------------
# the algorithm
# ----------------------------------------------------------------------------------------
@register_algorithm
class ActivationRelaxation(RelaxationResidual, Algorithm):
    """``ar``: Activation Relaxation on an MLP (see the module docstring for the equations).

    Options: ``mode`` exact|simulate, ``steps`` (int or inf), ``eta``, ``init`` forward|zero,
    ``schedule`` synchronous|sweep, ``feedback`` transpose|random|learned, ``derivative``
    (f' in the relaxation), ``update_derivative`` (f' in the weight update), ``feedback_lr``
    (default: the weight learning rate), ``feedback_decay`` (L2 decay of learned psi),
    ``feedback_init`` (default: the model's init scheme)."""

    name = "ar"
    defaults = dict(AR_DEFAULTS)
    divergence_hint = DIVERGENCE_HINT

    def __new__(cls, model: nn.Module, loss=None, **options: Any):
        # any other module: graph AR (Appendix A), creditlab.algorithms.graph_ar
        if cls is ActivationRelaxation and not isinstance(model, MLP):
            from creditlab.algorithms.graph_ar import GraphActivationRelaxation

            return GraphActivationRelaxation(model, loss, **options)
        return super().__new__(cls)

    def __init__(self, model: nn.Module, loss, **options: Any):
        super().__init__(model, loss, **options)
        self.mlp: MLP = require_mlp(model, self.name)
        o = self.options
        check_relaxation_options(o)
        for key in ("derivative", "update_derivative"):
            if not isinstance(o[key], bool):
                raise ConfigError(f"ar option {key}={o[key]!r} on an MLP must be true or false "
                                  "(no_conv / no_fc apply to graph models with conv layers)")
        self.feedback: nn.ParameterList | None = None
        if o["feedback"] != "transpose":
            kw = self.factory_kwargs()
            init = o["feedback_init"] or self.mlp.init_spec
            psis = []
            for layer in self.mlp.layers[1:]:
                w = torch.empty(layer.weight.shape, **kw)
                init_weight_(w, init)
                psis.append(nn.Parameter(w.t().contiguous(), requires_grad=o["feedback"] == "learned"))
            self.feedback = nn.ParameterList(psis)
        self.last_trace: list[list[float]] | None = None
        self._verified = False
        self._rel: Relaxation | None = None

    # -- optimizer and checkpoint plumbing ------------------------------------------
    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        if self.options["feedback"] != "learned":
            return []
        return [{
            "params": list(self.feedback),  # type: ignore[arg-type]
            "lr": self.options["feedback_lr"] or lr,
            "weight_decay": float(self.options["feedback_decay"]),
            "name": "ar.feedback",
        }]

    def state_dict(self) -> dict[str, Any]:
        if self.feedback is None:
            return {}
        return {"feedback": [p.detach().clone() for p in self.feedback]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.feedback is not None:
            with torch.no_grad():
                for p, v in zip(self.feedback, state["feedback"]):
                    p.copy_(v)

    def backward_weight(self, l: int) -> Tensor:
        """B_l (shape of W_l) used for J_l^T: W_l or psi_l^T."""
        if self.feedback is None:
            return self.mlp.layers[l].weight
        return self.feedback[l - 1].t()

    def diagnostics(self) -> dict[str, float]:
        """Per hidden state ``relax_residual/layers.L`` (the state the layer ``layers.L``
        produces; and ``relax_residual_max``, ``_mean``): :meth:`relaxation_residuals`; with
        learned or random feedback, the alignment of psi^T with W per layer."""
        out = self.residual_diagnostics()
        if self.feedback is None:
            return out
        from creditlab.diagnostics.feedback import feedback_alignment

        pairs = [(f"layers.{l}", self.mlp.layers[l].weight.detach(), self.feedback[l - 1].detach().t())
                 for l in range(1, len(self.mlp.layers))]
        return {**out, **feedback_alignment(pairs)}

    def _watched(self) -> list[Tensor]:
        return list(self.mlp.parameters()) + (list(self.feedback) if self.feedback is not None else [])

    # -- the algorithm ---------------------------------------------------------------
    @torch.no_grad()
    def build(self, trace, target: Tensor) -> Relaxation:
        L = len(self.mlp.layers)
        acts = self.mlp.activations
        back: list[Tensor | None] = [None] + [self.backward_weight(l) for l in range(1, L)]
        deriv: list[Tensor | None] = [None] + [
            acts[l].df(trace.pre[l]) if self.options["derivative"] else None for l in range(1, L)
        ]
        return Relaxation(back, deriv, self.loss.grad(trace.out, target))

    @torch.no_grad()
    def relax(self, trace, target: Tensor, record: bool = False) -> list[Tensor | None]:
        o = self.options
        rel = self.build(trace, target)
        self._rel = rel
        init = trace.xs if o["init"] == "forward" else None
        if o["mode"] == "exact":
            return relax_exact(rel, init, o["steps"], float(o["eta"]), o["schedule"])
        goal = true_state_gradients(self.mlp, trace, self.loss.grad(trace.out, target)) if record else None
        states, self.last_trace = relax_simulate(rel, init, o["steps"], float(o["eta"]), o["schedule"], goal)
        return states

    def step(self, x: Tensor, y: Tensor) -> StepResult:
        pending = self.options["verify"] == "first" and not self._verified
        before = snapshot(self.mlp, x.device) if pending else None
        self._forget_relaxation()
        with torch.no_grad():
            trace = self.mlp.trace(x)
            loss = self.loss(trace.out, y)
            states = self.relax(trace, y)
            labels = {f"layers.{l - 1}": l for l in range(1, len(self.mlp.layers))}  # by the layer producing it
            self._remember_relaxation(labels, *((None, None) if math.isinf(self.options["steps"]) else (self._rel, states)))
            self._rel = None
            grads, fb = self.updates(trace, states, bool(self.options["update_derivative"]))
            for p, g in grads.values():
                p.grad = g
            for l, g in fb.items():
                self.feedback[l - 1].grad = g  # type: ignore[index]
        if pending:
            try:
                self._verified = self._verify(x, y, trace, grads, before)
            except ConfigError:
                for p, _ in grads.values():
                    p.grad = None
                raise
        return StepResult(loss, trace.out)

    @torch.no_grad()
    def updates(self, trace, states: list[Tensor | None], update_derivative: bool
                ) -> tuple[dict[str, tuple[Tensor, Tensor]], dict[int, Tensor]]:
        """The local products dW_l = (x^{l+1} f'(a_l)) x^{l T} (bias: the summed delta) by
        parameter name, and learned psi_l's updates (dW_l transposed) by layer."""
        acts = self.mlp.activations
        grads: dict[str, tuple[Tensor, Tensor]] = {}
        fb: dict[int, Tensor] = {}
        for l, layer in enumerate(self.mlp.layers):
            delta = states[l + 1]
            if update_derivative:
                delta = delta * acts[l].df(trace.pre[l])  # type: ignore[operator]
            gw = delta.t() @ trace.xs[l]  # type: ignore[union-attr]
            if layer.weight.requires_grad:  # a frozen parameter keeps .grad None
                grads[f"layers.{l}.weight"] = (layer.weight, gw)
            if layer.bias is not None and layer.bias.requires_grad:
                grads[f"layers.{l}.bias"] = (layer.bias, delta.sum(0))  # type: ignore[union-attr]
            if self.options["feedback"] == "learned" and l >= 1:
                fb[l] = gw.t().clone()
        return grads, fb

    def _verify(self, x: Tensor, y: Tensor, trace, grads: dict[str, tuple[Tensor, Tensor]], before) -> bool:
        o = self.options
        backprop = math.isinf(o["steps"]) and o["feedback"] == "transpose" and o["derivative"] and o["update_derivative"]

        def updates() -> dict[str, Tensor | None]:
            if backprop:
                return {k: g for k, (_, g) in grads.items()}
            star = true_state_gradients(self.mlp, trace, self.loss.grad(trace.out, y))
            return {k: g for k, (_, g) in self.updates(trace, star, True)[0].items()}

        return guard_first_step(self.name, self.mlp, self.loss, x, y, before, trace.out, updates)


@torch.no_grad()
def true_state_gradients(mlp: MLP, trace, clamp: Tensor) -> list[Tensor | None]:
    """dL/dx^l by exact backprop (transpose weights, with f'), l = 1..L; index 0 is None."""
    L = len(mlp.layers)
    acts = mlp.activations
    rel = Relaxation([None] + [mlp.layers[l].weight for l in range(1, L)],
                     [None] + [acts[l].df(trace.pre[l]) for l in range(1, L)], clamp)
    return rel.fixed_point()
