"""The relaxation of one batch on a graph: the problem (units in topological order, their
edge pushes, the clamp) and its solution after T Euler steps, in closed form (``exact``) or
step by step (``simulate``)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from creditlab.algorithms._relaxation_weights import tail_weights, weights
from creditlab.errors import ConfigError

# a unit's push: the vectors it carries (its state, or several graded parts of it), one tensor
# each, to the contributions they make to each relaxing parent (one list per parent, aligned)
Rows = list[Tensor]
PushFn = Callable[[Rows], dict[str, Rows]]
# a unit's push and its parameters' updates from the same vector (the fixed point): one call
FusedFn = Callable[[Rows], tuple[dict[str, Rows], list[tuple[Tensor, Tensor]]]]


def no_push(rows: Rows) -> dict[str, Rows]:
    """The push of a unit with no relaxing parent (e.g. the first layer)."""
    return {}


@dataclass
class GraphRelaxation:
    """The relaxation problem of one batch: units in topological order (relaxed only), their
    edge pushes (vectors -> contributions to each relaxed parent, whose names ``parents``
    lists), the forward states, and the output unit clamped to ``clamp``. ``rows`` counts, per
    unit, the vectors its pushes carried in the last solution (the cost model: one VJP of the
    unit's operation per vector, in one call per unit where the operation allows)."""

    order: list[str]
    push: dict[str, PushFn]
    forward: dict[str, Tensor]
    out: str
    clamp: Tensor
    parents: dict[str, list[str]]
    rows: dict[str, int] = field(default_factory=dict)
    fused: dict[str, FusedFn] = field(default_factory=dict)
    grads: dict[str, list[tuple[Tensor, Tensor]]] = field(default_factory=dict)

    @property
    def free(self) -> list[str]:
        return [u for u in self.order if u != self.out]

    def fixed_point(self) -> dict[str, Tensor]:
        return relax_graph_exact(self, None, math.inf, 1.0, "synchronous")

    def pushed(self, u: str, rows: Rows, updates: bool = False) -> dict[str, Rows]:
        """``push[u](rows)``, counted in ``rows``; ``updates``: with ``fused[u]`` where there is
        one, its parameters' updates at the same vector kept in ``grads[u]``."""
        if self.push[u] is no_push or not rows:
            return {}
        self.rows[u] = self.rows.get(u, 0) + len(rows)
        if updates and u in self.fused:
            out, self.grads[u] = self.fused[u](rows)
            return out
        return self.push[u](rows)


class _Sums:
    """Vectors being summed from the children's contributions, by (unit, key): the first
    contribution is kept as it is (never written into: it may be another unit's vector too), a
    later one makes a new sum."""

    def __init__(self) -> None:
        self.acc: dict[str, dict[int, Tensor]] = {}

    def add(self, name: str, key: int, t: Tensor) -> None:
        d = self.acc.setdefault(name, {})
        d[key] = d[key] + t if key in d else t

    def pop(self, name: str) -> dict[int, Tensor]:
        return self.acc.pop(name, {})


def weighted_sum(coef: list[float], rows: Rows) -> Tensor:
    """sum_i coef[i] rows[i] (one pass over each vector)."""
    out = rows[0] * coef[0]
    for c, r in zip(coef[1:], rows[1:]):
        out.add_(r, alpha=c)
    return out


def default_tolerance(dtype: torch.dtype) -> float:
    """The relative weight at or below which a term of the closed form is dropped: the dtype's
    machine epsilon (2.2e-16 float64, 1.2e-7 float32)."""
    return float(torch.finfo(dtype).eps)


def kept_orders(w: tuple[float, ...] | list[float], tol: float) -> int:
    """The largest k whose terms w_k N^k e the closed form keeps. The weights are unimodal in k
    (binomial / negative-binomial), so every k up to the largest weight's is kept (their vectors
    feed the larger k of the units below); past it, the first k with w_k <= tol * max w ends
    the stack (every later weight is smaller)."""
    peak = max(range(len(w)), key=lambda k: w[k])
    for k in range(peak + 1, len(w)):
        if w[k] <= tol * w[peak]:
            return k - 1
    return len(w) - 1


def relax_graph_exact(rel: GraphRelaxation, init: dict[str, Tensor] | None, steps: float, eta: float,
                      schedule: str, tol: float | None = None, updates: bool = False,
                      keep: set[str] | None = None) -> dict[str, Tensor]:
    """Closed-form states after ``steps`` Euler steps (``init`` None: zero states). Includes
    the clamped output unit. Terms whose relaxation weight is at most ``tol`` (default: the
    dtype's machine epsilon, :func:`default_tolerance`) times the largest weight at their unit
    are not computed (``tol=0``: every term; exact zeros, e.g. k > T synchronous, are dropped
    either way). ``updates`` (steps = inf only): the units with a fused rule also compute their
    parameters' updates in their push's call (``rel.grads``); ``keep`` (steps = inf only): return
    only these units' states, freeing the others as soon as they are pushed (less memory in
    use at once, which on the CPU also means fewer freshly mapped pages per step)."""
    rel.rows, rel.grads = {}, {}
    states: dict[str, Tensor] = {rel.out: rel.clamp}
    free = list(reversed(rel.free))
    sums = _Sums()
    if math.isinf(steps):
        for name, t in rel.pushed(rel.out, [rel.clamp], updates).items():
            sums.add(name, 0, t[0])
        for u in free:
            x = sums.pop(u).get(0)
            if x is None:
                x = torch.zeros_like(rel.forward[u])
            if keep is None or u in keep:
                states[u] = x
            for name, t in rel.pushed(u, [x], updates).items():
                sums.add(name, 0, t[0])
        return states
    T = int(steps)
    tol = default_tolerance(rel.clamp.dtype) if tol is None else float(tol)
    if init is not None:
        return _exact_from_forward(rel, init, T, eta, schedule, tol, states, free)
    # init=zero: graded parts G_u[m], m + 1 the length of the paths from the output they
    # arrived by: x(T)_u = sum_m tail[m] G_u[m]. First the labels each unit keeps (a label is
    # dropped where its tail weight is <= tol times the largest at the unit, its shortest
    # path's), then which of them each unit must push (those a parent keeps).
    tail = tail_weights(T, float(eta), schedule, max(len(rel.order), 1))
    incoming: dict[str, set[int]] = {}
    for p in rel.parents[rel.out]:
        incoming.setdefault(p, set()).add(0)
    kept: dict[str, set[int]] = {}
    for u in free:
        labs = sorted(incoming.pop(u, ()))
        top = tail[labs[0]] if labs else 0.0
        kept[u] = {m for m in labs if tail[m] > tol * top}
        for p in rel.parents[u]:
            incoming.setdefault(p, set()).update(m + 1 for m in kept[u])

    def deliver(labels: list[int], contrib: dict[str, Rows]) -> None:
        for p, ts in contrib.items():
            for m, t in zip(labels, ts):
                if m + 1 in kept[p]:
                    sums.add(p, m + 1, t)

    deliver([-1], rel.pushed(rel.out, [rel.clamp]))
    for u in free:
        g = sums.pop(u)
        lab = sorted(m for m in g if m in kept[u])
        if not lab:  # no path reaches u within T steps (or every weight is zero)
            states[u] = torch.zeros_like(rel.forward[u])
            continue
        states[u] = weighted_sum([tail[m] for m in lab], [g[m] for m in lab])
        sent = [m for m in lab if any(m + 1 in kept[p] for p in rel.parents[u])]
        deliver(sent, rel.pushed(u, [g[m] for m in sent]))
    return states


def _exact_from_forward(rel: GraphRelaxation, init: dict[str, Tensor], T: int, eta: float, schedule: str,
                        tol: float, states: dict[str, Tensor], free: list[str]) -> dict[str, Tensor]:
    """init=forward: each unit holds x*_u and E_u[k] = (N^k e)_u, e = x(0) - x*, E_u[0] = e_u,
    for the kept k <= kmax; x(T)_u = x*_u + sum_k w_k E_u[k]; the unit pushes [x*_u, E_u[0],
    ..., E_u[min(n_u, kmax - 1)]], which its parents receive as x* and E[1], E[2], ..."""
    w = weights(T, float(eta), schedule, len(rel.order) + 1)
    kmax = kept_orders(w, tol)
    sums = _Sums()  # key -1: x*, key k >= 1: E[k]

    def deliver(contrib: dict[str, Rows]) -> None:
        for p, ts in contrib.items():
            for j, t in enumerate(ts):  # [x*, E[0], E[1], ...] -> x*, E[1], E[2], ...
                sums.add(p, -1 if j == 0 else j, t)

    deliver(rel.pushed(rel.out, [rel.clamp]))
    for u in free:
        g = sums.pop(u)
        star = g.pop(-1, None)
        if star is None:  # no child pushes to u
            star = torch.zeros_like(rel.forward[u])
        E = [init[u] - star] + [g[k] for k in range(1, kmax + 1) if k in g]
        states[u] = star + weighted_sum(w[: len(E)], E)
        deliver(rel.pushed(u, [star] + E[:kmax]))
    return states


def relax_graph_simulate(rel: GraphRelaxation, init: dict[str, Tensor] | None, steps: int, eta: float,
                         schedule: str) -> dict[str, Tensor]:
    """Euler steps one by one (synchronous, or a sweep in reverse topological order)."""
    if math.isinf(steps):
        raise ConfigError("ar: mode=simulate needs a finite number of steps; use mode=exact for steps=inf")
    free = list(reversed(rel.free))
    xs = {u: (init[u].clone() if init is not None else torch.zeros_like(rel.forward[u])) for u in free}
    rel.rows = {}
    from_out = {name: t[0] for name, t in rel.pushed(rel.out, [rel.clamp]).items()}

    def add(acc: dict[str, Tensor], contrib: dict[str, Rows]) -> None:
        for name, t in contrib.items():
            acc[name] = acc[name] + t[0] if name in acc else t[0]

    for _ in range(int(steps)):
        acc = dict(from_out)
        if schedule == "synchronous":
            for u in free:
                add(acc, rel.pushed(u, [xs[u]]))
            for u in free:
                a = acc.get(u)
                xs[u] = xs[u] + eta * (-xs[u] + (a if a is not None else 0.0))
        else:
            for u in free:  # reverse topological: every child already updated and pushed
                a = acc.get(u)
                xs[u] = xs[u] + eta * (-xs[u] + (a if a is not None else 0.0))
                add(acc, rel.pushed(u, [xs[u]]))
    xs[rel.out] = rel.clamp
    return xs
