"""The two relaxations of predictive coding on one batch, as functions of tensors.

Both descend (synchronously: every value node from the previous step's values) the energy

    F(x) = sum_u 1/2 ||x_u - mu_u||^2 + gamma sum_n l(mu_out,n, y_n)

over the free value nodes x_u (every relaxed unit but the output, whose value is clamped to the
target through the loss term), one Euler step of size eta per iteration:

    x_u <- x_u - eta (eps_u - sum_{c in children(u)} J_{c,u}^T eps_c),   eps_u = x_u - mu_u,

with eps_out = -gamma dl/dmu_out (gamma: the output precision). :func:`relax_standard` recomputes every prediction mu_u and
Jacobian J at the current values each step (inference learning); :func:`relax_fixed` holds them
at the forward pass (the fixed-prediction assumption), which makes the iteration linear in eps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from creditlab.algorithms.graph_ar import GraphRelaxation, relax_graph_exact
from creditlab.algorithms.predictive_coding.predictions import Prediction, UnitPredictor

# the output term: mu_out -> (sum over the batch of l(mu_out, y), dl/dmu_out per sample)
OutputTerm = Callable[[Tensor], tuple[Tensor, Tensor]]


@dataclass
class Relaxed:
    """What a relaxation leaves: the free values ``x``, the errors ``eps`` of every relaxed unit
    (the output's is -dl/dmu_out), the batch-summed energy F after each step (index 0: before
    the first), and the standard variant's last predictions (at the final values)."""

    x: dict[str, Tensor]
    eps: dict[str, Tensor]
    energy: list[Tensor]
    predictions: dict[str, Prediction] = field(default_factory=dict)


def _sq(t: Tensor) -> Tensor:
    return torch.linalg.vector_norm(t) ** 2


def relax_standard(order: list[str], out: str, predictors: dict[str, UnitPredictor], x0: dict[str, Tensor],
                   steps: int, eta: float, output_term: OutputTerm) -> Relaxed:
    """Inference learning: ``steps`` gradient steps on F with every prediction at the current
    values. ``order``: the relaxed units in topological order (``out`` among them); ``x0``: the
    free values at t = 0; ``output_term``: the loss term of F and its gradient at mu_out (gamma
    included). The predictions at the final values are returned (the weight update reads them)."""
    free = [u for u in order if u != out]
    x = {u: x0[u] for u in free}
    const = {u: p.predict(x, params=True) for u, p in predictors.items() if p.constant}
    energy: list[Tensor] = []
    for t in range(int(steps) + 1):
        last = t == steps
        preds = {u: const[u] if u in const else predictors[u].predict(x, params=last) for u in order}
        eps = {u: x[u] - preds[u].mu for u in free}
        loss_sum, g_out = output_term(preds[out].mu)
        eps[out] = -g_out
        energy.append(loss_sum + 0.5 * torch.stack([_sq(eps[u]) for u in free]).sum() if free else loss_sum)
        if last:
            return Relaxed(x, eps, energy, preds)
        # x - eta (eps - sum of the children's J^T eps), into new tensors (x itself is read by
        # the predictions made from it)
        new = {u: torch.add(x[u], eps[u], alpha=-eta) for u in free}
        for c in order:
            for p, contrib in preds[c].vjp(eps[c]).items():
                new[p].add_(contrib, alpha=eta)
        x = new
    raise AssertionError("unreachable")


def relax_fixed(rel: GraphRelaxation, s0: dict[str, Tensor] | None, steps: float, eta: float, scale: float,
                output_sum: Tensor, trace: bool = True) -> Relaxed:
    """The fixed-prediction relaxation on graph AR's problem ``rel`` (pushes = the Jacobians at
    the forward values, transposed; ``rel.clamp`` = dL/dmu_out of the reduced loss), carried in
    the coordinates s_u = -scale eps_u (scale = r / gamma: the loss's reduction r, 1 for a sum
    or 1/N for a mean, over the output precision gamma), in which one step is
    s_u <- (1 - eta) s_u + eta sum_c J_{c,u}^T s_c and the equilibrium is s* = dL/dmu
    (backprop): exactly Activation Relaxation's iteration, started
    from s(0) = ``s0`` (None: zero, i.e. x(0) = the forward values). ``steps`` = inf gives s*
    with one backward pass. ``output_sum``: the loss term of F, gamma sum_n l (constant here).
    ``trace``: step by step, with F after every step; else s(T) from graph AR's closed form
    (:func:`relax_graph_exact`, the same states to rounding) and F at t = 0 and T only.
    Returns the states s (output included, as ``x``) and eps = -s / scale."""
    free = list(reversed(rel.free))
    rel.rows = {}
    if math.isinf(steps) or not trace:
        if math.isinf(steps):  # the fixed point; Conv2d / BatchNorm updates made in the same calls
            s = relax_graph_exact(rel, None, math.inf, 1.0, "synchronous", updates=True)
        else:
            s = relax_graph_exact(rel, s0, int(steps), eta, "synchronous")
        start = {u: torch.zeros_like(rel.forward[u]) for u in free} if s0 is None else s0
        energy = [_energy(start, free, scale, output_sum), _energy(s, free, scale, output_sum)]
        return Relaxed(s, {u: s[u] / -scale for u in s}, energy)
    s = {u: (torch.zeros_like(rel.forward[u]) if s0 is None else s0[u]) for u in free}
    from_out = {name: t[0] for name, t in rel.pushed(rel.out, [rel.clamp]).items()}
    energy = [_energy(s, free, scale, output_sum)]
    for _ in range(int(steps)):
        acc = dict(from_out)
        for u in free:
            for name, t in rel.pushed(u, [s[u]]).items():
                acc[name] = acc[name] + t[0] if name in acc else t[0]
        s = {u: torch.lerp(s[u], acc[u], eta) if u in acc else s[u] * (1.0 - eta) for u in free}
        energy.append(_energy(s, free, scale, output_sum))
    s[rel.out] = rel.clamp
    return Relaxed(s, {u: s[u] / -scale for u in s}, energy)


def _energy(s: dict[str, Tensor], free: list[str], scale: float, output_sum: Tensor) -> Tensor:
    if not free:
        return output_sum
    return output_sum + (0.5 / scale**2) * torch.stack([_sq(s[u]) for u in free]).sum()
