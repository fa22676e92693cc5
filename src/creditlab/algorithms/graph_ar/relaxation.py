"""The relaxation of one batch on a graph: the problem (units in topological order, their
edge pushes, the clamp) and its solution after T Euler steps, in closed form (``exact``) or
step by step (``simulate``)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from creditlab.algorithms._relaxation_weights import tail_weights, weights
from creditlab.errors import ConfigError

PushFn = Callable[[Tensor], dict[str, Tensor]]


def no_push(s: Tensor) -> dict[str, Tensor]:
    """The push of a unit with no relaxing parent (e.g. the first layer)."""
    return {}


@dataclass
class GraphRelaxation:
    """The relaxation problem of one batch: units in topological order (relaxed only), their
    edge pushes (stacked vectors (K, *state) -> contributions to each relaxed parent), the
    forward states, and the output unit clamped to ``clamp``."""

    order: list[str]
    push: dict[str, PushFn]
    forward: dict[str, Tensor]
    out: str
    clamp: Tensor

    @property
    def free(self) -> list[str]:
        return [u for u in self.order if u != self.out]

    def fixed_point(self) -> dict[str, Tensor]:
        return relax_graph_exact(self, None, math.inf, 1.0, "synchronous")


def accumulate(acc: dict[str, Tensor], name: str, t: Tensor) -> None:
    """acc[name] += t, zero-padding the stack dimension (0) on the right where lengths differ."""
    if name not in acc:
        acc[name] = t
        return
    a = acc[name]
    if a.shape[0] < t.shape[0]:
        a, t = t, a
    if a.shape[0] == t.shape[0]:
        acc[name] = a + t
    else:
        a = a.clone()
        a[: t.shape[0]] += t
        acc[name] = a


def relax_graph_exact(rel: GraphRelaxation, init: dict[str, Tensor] | None, steps: float, eta: float,
                      schedule: str) -> dict[str, Tensor]:
    """Closed-form states after ``steps`` Euler steps (``init`` None: zero states). Includes
    the clamped output unit."""
    states: dict[str, Tensor] = {rel.out: rel.clamp}
    acc: dict[str, Tensor] = {}
    for name, t in rel.push[rel.out](rel.clamp.unsqueeze(0)).items():
        accumulate(acc, name, t)
    free = list(reversed(rel.free))
    if math.isinf(steps):
        for u in free:
            a = acc.get(u)
            x = a[0] if a is not None else torch.zeros_like(rel.forward[u])
            states[u] = x
            for name, t in rel.push[u](x.unsqueeze(0)).items():
                accumulate(acc, name, t)
        return states
    T = int(steps)
    if init is not None:
        # stack A_u = [x*_u, E_u[1], E_u[2], ...]; pushed S_u = [x*_u, E_u[0], E_u[1], ...]
        wall = torch.tensor(weights(T, float(eta), schedule, len(rel.order) + 1),
                            dtype=rel.clamp.dtype, device=rel.clamp.device)
        for u in free:
            a = acc.get(u)
            if a is None:
                a = torch.zeros_like(rel.forward[u]).unsqueeze(0)
            star = a[0]
            e0 = init[u] - star
            if rel.push[u] is no_push:  # nothing to carry on: skip building the stack
                wk = wall[1: a.shape[0]].reshape(-1, *([1] * star.dim()))
                states[u] = star + wall[0] * e0 + (wk * a[1:]).sum(0)
                continue
            s = torch.cat([star.unsqueeze(0), e0.unsqueeze(0), a[1:]], 0)
            wk = wall[: s.shape[0] - 1].reshape(-1, *([1] * star.dim()))
            states[u] = star + (wk * s[1:]).sum(0)
            for name, t in rel.push[u](s).items():
                accumulate(acc, name, t)
        return states
    # init=zero: graded parts G_u[m] with labels m (only the path lengths that exist)
    labels: dict[str, list[int]] = {}
    gacc: dict[str, dict[int, Tensor]] = {}

    def add(name: str, lab: list[int], t: Tensor) -> None:
        d = gacc.setdefault(name, {})
        for i, m in enumerate(lab):
            d[m] = d[m] + t[i] if m in d else t[i]

    for name, t in rel.push[rel.out](rel.clamp.unsqueeze(0)).items():
        add(name, [0], t)
    tail = tail_weights(T, float(eta), schedule, max(len(rel.order), 1))
    for u in free:
        d = gacc.get(u, {})
        if not d:
            states[u] = torch.zeros_like(rel.forward[u])
            continue
        lab = sorted(d)
        g = torch.stack([d[m] for m in lab], 0)
        coef = torch.tensor([tail[m] for m in lab], dtype=g.dtype, device=g.device)
        states[u] = torch.tensordot(coef, g, dims=1)
        labels[u] = lab
        for name, t in rel.push[u](g).items():
            add(name, [m + 1 for m in lab], t)
    return states


def relax_graph_simulate(rel: GraphRelaxation, init: dict[str, Tensor] | None, steps: int, eta: float,
                         schedule: str) -> dict[str, Tensor]:
    """Euler steps one by one (synchronous, or a sweep in reverse topological order)."""
    if math.isinf(steps):
        raise ConfigError("ar: mode=simulate needs a finite number of steps; use mode=exact for steps=inf")
    free = list(reversed(rel.free))
    xs = {u: (init[u].clone() if init is not None else torch.zeros_like(rel.forward[u])) for u in free}
    from_out: dict[str, Tensor] = {}
    for name, t in rel.push[rel.out](rel.clamp.unsqueeze(0)).items():
        accumulate(from_out, name, t)
    for _ in range(int(steps)):
        acc = dict(from_out)
        if schedule == "synchronous":
            for u in free:
                for name, t in rel.push[u](xs[u].unsqueeze(0)).items():
                    accumulate(acc, name, t)
            for u in free:
                a = acc.get(u)
                xs[u] = xs[u] + eta * (-xs[u] + (a[0] if a is not None else 0.0))
        else:
            for u in free:  # reverse topological: every child already updated and pushed
                a = acc.get(u)
                xs[u] = xs[u] + eta * (-xs[u] + (a[0] if a is not None else 0.0))
                for name, t in rel.push[u](xs[u].unsqueeze(0)).items():
                    accumulate(acc, name, t)
    xs[rel.out] = rel.clamp
    return xs
