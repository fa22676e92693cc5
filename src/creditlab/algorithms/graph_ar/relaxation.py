"""The relaxation of one batch on a graph: the problem (units in topological order, their
edge pushes, the clamp) and its solution after T Euler steps, in closed form (``exact``) or
step by step (``simulate``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from creditlab.algorithms._relaxation_weights import weights
from creditlab.algorithms._verify import tolerance
from creditlab.algorithms.graph_ar.closed_form import cheapest_plan, closed_form_plan, plan_key
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
    # per unit, the estimated cost of its push per vector, in elementwise passes over as many
    # elements (what the closed form's plan weighs against the sums; default the state's size)
    cost: dict[str, float] = field(default_factory=dict)

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
    """Vectors being summed from the children's contributions, by (unit, key), with
    coefficients: a first contribution with coefficient 1 is kept as it is (never written into:
    it may be another unit's vector too); a sum or a scaled vector made here is owned and added
    into in place."""

    def __init__(self) -> None:
        self.acc: dict[str, dict[Hashable, list]] = {}

    def add(self, name: str, key: Hashable, t: Tensor, coef: float = 1.0) -> None:
        d = self.acc.setdefault(name, {})
        cur = d.get(key)
        if cur is None:
            d[key] = [t, False] if coef == 1.0 else [t * coef, True]
        elif cur[1]:
            cur[0].add_(t, alpha=coef)
        else:
            d[key] = [torch.add(cur[0], t, alpha=coef), True]

    def pop(self, name: str) -> dict[Hashable, Tensor]:
        return {k: v[0] for k, v in self.acc.pop(name, {}).items()}

    def pop_owned(self, name: str) -> dict[Hashable, list]:
        """The unit's sums as [tensor, owned] (an owned one may be added into in place)."""
        return self.acc.pop(name, {})


def weighted_sum(coef: list[float], rows: Rows) -> Tensor:
    """sum_i coef[i] rows[i] (one pass over each vector)."""
    out = rows[0] * coef[0]
    for c, r in zip(coef[1:], rows[1:]):
        out.add_(r, alpha=c)
    return out


def _combine(terms: tuple[tuple[Hashable, float], ...], vecs: dict[Hashable, Tensor], like: Tensor) -> Tensor:
    """sum of coef * vecs[key] over ``terms`` (a single term of coefficient 1: the vector itself;
    none: zero)."""
    if not terms:
        return torch.zeros_like(like)
    if len(terms) == 1 and terms[0][1] == 1.0:
        return vecs[terms[0][0]]
    return weighted_sum([c for _, c in terms], [vecs[k] for k, _ in terms])


def default_tolerance(dtype: torch.dtype) -> float:
    """The relative weight at or below which terms of the closed form are dropped: the dtype's
    machine epsilon (2.2e-16 float64, 1.2e-7 float32)."""
    return float(torch.finfo(dtype).eps)


def kept_orders(w: tuple[float, ...] | list[float], tol: float) -> int:
    """The last order K whose terms w_k N^k e the closed form (init=forward) keeps: the smallest K
    at or past the largest |w_k| whose dropped weights sum to at most ``tol`` times it,
    sum_{K<k<len(w)} |w_k| <= tol * max_k |w_k| (``w`` lists every order the graph has; the orders
    up to the peak are always kept: their vectors feed the higher orders of the units below)."""
    a = [abs(v) for v in w]
    peak = max(range(len(a)), key=lambda k: a[k])
    dropped = 0.0
    for k in range(len(a) - 1, peak, -1):  # dropped = sum_{j >= k} a_j
        dropped += a[k]
        if dropped > tol * a[peak]:
            return k
    return peak


def truncation_tolerance(eta: float, tol: float) -> float:
    """The tolerance the closed form applies: ``tol`` for 0 < eta <= 1, 0 (only exact zeros are
    dropped) for 1 < eta < 2, where the weights alternate in sign and the tail weights are not
    log-concave, so the bound on what is dropped (docs/graph_ar.md) does not hold."""
    return tol if eta <= 1.0 else 0.0


def _check_rounding(u: str, terms: tuple[tuple[Hashable, float], ...], vecs: dict[Hashable, Tensor], state: Tensor,
                    eta: float) -> None:
    """Refuse a state that rounding would swamp. For 0 < eta <= 1 the closed form's coefficients
    are probabilities (the weights sum to 1, the tails are at most 1); for 1 < eta < 2 the
    synchronous weights alternate in sign and reach (2 eta - 1)^T, and a state can be a sum of
    terms much larger than itself: its rounding error is about eps * sum_k |c_k| ||v_k||, which
    must stay below the guard's tolerance times ||x(T)|| (the step-by-step simulation does not
    form these sums)."""
    bound = math.fsum(abs(c) * float(vecs[k].norm()) for k, c in terms)
    size = float(state.norm())
    if bound * default_tolerance(state.dtype) > tolerance(state.dtype) * size or (bound > 0 and not size > 0):
        raise ConfigError(
            f"ar: mode=exact with eta={eta:g} forms state {u!r} as a sum of terms {bound / max(size, 1e-300):.1e} "
            f"times larger than it (for eta > 1 the relaxation weights alternate in sign), which "
            f"{str(state.dtype).replace('torch.', '')} cannot resolve; use mode=simulate, fewer steps or eta <= 1")


def relax_graph_exact(rel: GraphRelaxation, init: dict[str, Tensor] | None, steps: float, eta: float,
                      schedule: str, tol: float | None = None, updates: bool = False,
                      keep: set[str] | None = None, shifts: bool = True) -> dict[str, Tensor]:
    """Closed-form states after ``steps`` Euler steps (``init`` None: zero states). Includes
    the clamped output unit. Terms whose weight is negligible are not computed: init=forward, the
    orders past K, whose weights sum to at most ``tol`` (default: the dtype's machine epsilon,
    :func:`default_tolerance`) times the largest (:func:`kept_orders`); init=zero, at each unit the
    path lengths whose weight is at most ``tol`` times the largest at the unit (``tol=0``: every
    term; exact zeros, e.g. k > T synchronous, are dropped either way). ``keep``: return only
    these units' states (and the output's); for steps = inf the others are freed as soon as they
    are pushed, for finite steps they are not computed where no state asked for needs them.
    ``shifts``: where a unit's states below need fewer combinations of its vectors than it has
    vectors, it may carry those combinations instead (:mod:`.closed_form`: the plan of least
    estimated cost, from ``rel.cost``; False: every unit carries its graded vectors, the
    reference). ``updates`` (steps = inf only): the units with a
    fused rule also compute their parameters' updates in their push's call (``rel.grads``)."""
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
    tol = truncation_tolerance(float(eta), default_tolerance(rel.clamp.dtype) if tol is None else float(tol))
    forward = init is not None
    w = weights(T, float(eta), schedule, len(rel.order) + 1)
    kmax = kept_orders(w, tol) if forward else -1
    check = eta > 1.0  # coefficients of alternating sign: each state's rounding is checked
    if check:
        shifts = False  # every coefficient then enters at the state it weighs
    graph, need = plan_key(rel.order, rel.parents), None if keep is None else frozenset(keep)
    if shifts:
        costs = tuple((u, float(rel.forward[u].numel()), float(rel.cost.get(u, rel.forward[u].numel())))
                      for u in rel.order if u in rel.forward)
        plan = cheapest_plan(graph, rel.out, T, float(eta), schedule, kmax, tol, forward, need, costs).units
    else:
        plan = closed_form_plan(graph, rel.out, T, float(eta), schedule, kmax, tol, forward, need, 0.0).units
    for u in [rel.out] + free:
        p = plan.get(u)
        if u == rel.out:
            vecs: dict[Hashable, Tensor] = {"c": rel.clamp}
        else:
            if p is None:  # nothing asked for needs this unit
                if keep is None:
                    states[u] = torch.zeros_like(rel.forward[u])
                continue
            got = sums.pop_owned(u)
            vecs = {}
            local = dict(p.local)
            for k in p.keys:
                g = got.get(k)
                t = None if g is None else g[0]
                if p.e0 and k == 0:
                    t = init[u] - vecs["S"]  # type: ignore[index]
                elif k in local:
                    x0 = init[u]  # type: ignore[index]
                    t = x0 * local[k] if t is None else t.add_(x0, alpha=local[k]) if g[1] else \
                        torch.add(t, x0, alpha=local[k])
                vecs[k] = t if t is not None else torch.zeros_like(rel.forward[u])
            if p.state is not None:
                states[u] = _combine(p.state, vecs, rel.forward[u])
                if check:
                    _check_rounding(u, p.state, vecs, states[u], float(eta))
        if p is None or not p.push:
            continue
        contrib = rel.pushed(u, [vecs[k] for k in p.push])
        for parent, per in p.route:
            ts = contrib.get(parent)
            if ts is None:
                continue
            for t, targets in zip(ts, per):
                for pk, coef in targets:
                    sums.add(parent, pk, t, coef)
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
