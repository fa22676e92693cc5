"""The plan of graph AR's closed form after T Euler steps (:func:`.relaxation.relax_graph_exact`):
which vectors each unit computes, which of them it pushes through its VJP, and how its parents
combine what they receive. Fixed by the graph's shape, T, eta, the schedule, the tolerance, the
initialisation and the states asked for; made once per such key (cached).

A unit carries its vectors in one of two forms (docs/graph_ar.md, "Cost"):

* ``basis``, its graded parts. init=forward: S = x*_u and E_u[i] = (N^i e)_u (e = x(0) - x*,
  E_u[0] = x(0)_u - S) for the orders i <= K that reach it, K the last order kept
  (:func:`.relaxation.kept_orders`); init=zero: G_u[m], the part of x*_u that arrives over the
  paths of length m + 1 from the output, for the lengths m kept at u. x(T)_u, and whatever a
  unit below needs, is a weighted sum of them.
* ``shifts``, only the combinations the units below need. Every state is x(T)_q = o(basis of q)
  with coefficients o that do not depend on q, and a state q that is j units below u receives
  from u's children exactly s^j o (basis of u): tail_{j-1} S + sum_i w_{j+i} E_u[i] (init=forward,
  tail_{-1} = 1), sum_m tail_{j+m} G_u[m] (init=zero), with tail_m = 1 - sum_{k<=m} w_k. u makes
  it from its children's s^{j+1} o (plus w_j x(0)_u for init=forward), so it carries one
  vector per distance j to the asked-for states below it (for init=forward, the j > K ones are
  multiples of S: one vector), instead of one per order or path length above it.

A unit carries shifts where they are fewer than the basis vectors its children would push for it
and no parent needs its basis (a parent that carries its basis needs its children's basis):
the units next to the output carry their basis (few orders reach them), those towards the
input their shifts (few states lie below them). Both are the same closed form, summed in
another order; the shifts include the few terms that a basis unit below them would have dropped
as negligible (init=zero), so they are never less precise."""

from __future__ import annotations

import functools
from collections.abc import Hashable
from dataclasses import dataclass

from creditlab.algorithms._relaxation_weights import tail_weights, weights

Key = Hashable  # a vector's name at its unit: "S", i (E_i or G_i), ("o", j), "c" (the clamp)
Terms = tuple[tuple[Key, float], ...]


@dataclass(frozen=True)
class UnitPlan:
    """What one unit does in the closed form. ``keys``: the vectors it computes, in order;
    ``local``: the coefficient of x(0)_u added to a vector (init=forward shifts); ``e0``: E[0] =
    x(0)_u - S is one of them (init=forward basis); ``push``: the vectors it pushes; ``route``:
    per parent, per pushed vector, the (parent's key, coefficient) it is added into;
    ``state``: x(T)_u as a weighted sum of its vectors (None: not asked for; (): zero)."""

    mode: str
    keys: tuple[Key, ...]
    local: tuple[tuple[Key, float], ...]
    e0: bool
    push: tuple[Key, ...]
    route: tuple[tuple[str, tuple[Terms, ...]], ...]
    state: Terms | None


@dataclass(frozen=True)
class ClosedFormPlan:
    units: dict[str, UnitPlan]
    kmax: int  # init=forward: the last order kept (-1 for init=zero)


def plan_key(order: list[str], parents: dict[str, list[str]]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    return tuple((u, tuple(parents[u])) for u in order)


@functools.lru_cache(maxsize=64)
def closed_form_plan(graph: tuple[tuple[str, tuple[str, ...]], ...], out: str, steps: int, eta: float,
                     schedule: str, kmax: int, tol: float, forward: bool, need: frozenset[str] | None,
                     ratio: float = 1.0) -> ClosedFormPlan:
    """The plan (module docstring) of a graph given as (unit, its relaxing parents) in topological
    order with output unit ``out``; ``kmax`` the last order kept (init=forward), ``tol`` the
    relative weight at or below which a path length is dropped (init=zero); ``need`` the units
    whose states are asked for (None: all). A unit carries shifts where they are fewer than
    ``ratio`` times its basis vectors (0: every unit carries its basis)."""
    order = [u for u, _ in graph]
    parents = dict(graph)
    n = len(order)
    w = weights(steps, eta, schedule, 2 * n + 2)
    tail = tail_weights(steps, eta, schedule, 2 * n + 2)

    def tl(m: int) -> float:
        return 1.0 if m < 0 else tail[m]

    children: dict[str, list[str]] = {u: [] for u in order}
    for u in order:
        for p in parents[u]:
            if u not in children[p]:
                children[p].append(u)
    free = [u for u in order if u != out]
    # the basis each unit could carry: orders 0..maxe[u] (init=forward), or the path lengths
    # kept[u] (init=zero: dropped where |tail_m| <= tol * the largest |tail| at the unit)
    maxe: dict[str, int] = {}
    kept: dict[str, list[int]] = {}
    for u in reversed(free):
        if forward:
            maxe[u] = min(kmax, max([maxe[c] + 1 for c in children[u] if c in maxe], default=0))
        else:
            labs = sorted({0 for c in children[u] if c == out} | {m + 1 for c in children[u] if c in kept
                                                                    for m in kept[c]})
            top = max((abs(tail[m]) for m in labs), default=0.0)  # eta <= 1: the shortest path's
            kept[u] = [m for m in labs if abs(tail[m]) > tol * top]

    def terms(u: str, mode: str, phi: tuple) -> list[tuple[Key, float]]:
        """Demand ``phi`` (("o", j): s^j o; ("S",); ("E", i); ("G", m): a basis vector) in u's keys."""
        if u == out:
            if phi[0] == "o":
                return [("c", tl(phi[1] - 1))] if tl(phi[1] - 1) != 0 else []
            return [("c", 1.0)] if phi in (("S",), ("G", -1)) else []
        if phi[0] == "S":
            return [("S", 1.0)]
        if phi[0] == "E":
            return [(phi[1], 1.0)] if phi[1] <= maxe[u] else []
        if phi[0] == "G":
            return [(phi[1], 1.0)] if phi[1] in kept[u] else []
        j = phi[1]
        if forward:
            if mode == "shifts" and j <= kmax:
                return [(("o", j), 1.0)]
            out_terms = [("S", tl(j - 1))] if tl(j - 1) != 0 else []
            if mode == "basis":
                out_terms += [(i, w[j + i]) for i in range(maxe[u] + 1) if j + i <= kmax and w[j + i] != 0]
            return out_terms
        lab = kept[u]
        if mode == "shifts":
            return [(("o", j), 1.0)] if any(tail[j + m] != 0 for m in lab) else []
        return [(m, tail[j + m]) for m in lab if tail[j + m] != 0]

    pending: dict[str, list[tuple[str | None, Key, tuple]]] = {u: [] for u in order}
    routes: dict[str, dict[str, dict[Key, list[tuple[Key, float]]]]] = {u: {} for u in order}
    made: dict[str, tuple[str, tuple[Key, ...], tuple[tuple[Key, float], ...], bool, Terms | None]] = {}
    for u in order:
        dem = pending.pop(u)
        if u != out and (need is None or u in need):
            dem.append((None, None, ("o", 0)))
        if not dem:
            continue
        if u == out:
            mode = "basis"
        elif ratio <= 0 or any(phi[0] in ("E", "G") for _, _, phi in dem):
            mode = "basis"
        else:
            ks = {k for _, _, phi in dem for k, _ in terms(u, "shifts", phi)}
            kb = {k for _, _, phi in dem for k, _ in terms(u, "basis", phi)}
            if forward and 0 in kb:  # E[0] is made from x(0) and S: S is pushed for it, E[0] is not
                kb = (kb | {"S"}) - {0}
            mode = "shifts" if len(ks) < ratio * len(kb) else "basis"  # the vectors u's children push for it
        state: Terms | None = None
        keyset: set[Key] = set()
        for p, pk, phi in dem:
            ts = terms(u, mode, phi)
            keyset.update(k for k, _ in ts)
            if p is None:
                state = tuple(ts)
                continue
            for k, coef in ts:
                routes[u].setdefault(p, {}).setdefault(k, []).append((pk, coef))
        if u == out:
            made[u] = ("basis", ("c",), (), False, None)
            continue
        if forward and mode == "basis" and 0 in keyset:
            keyset.add("S")  # E[0] = x(0) - S
        keys = tuple(sorted(keyset, key=_key_order))
        local: list[tuple[Key, float]] = []
        for k in keys:
            if k == "S":
                phi_c: tuple | None = ("S",)
            elif isinstance(k, tuple):  # ("o", j)
                phi_c = ("o", k[1] + 1)
                if forward and w[k[1]] != 0:
                    local.append((k, w[k[1]]))
            elif forward:
                phi_c = ("E", k - 1) if k >= 1 else None  # E[0] is made locally
            else:
                phi_c = ("G", k - 1)
            if phi_c is not None:
                for c in children[u]:
                    pending[c].append((u, k, phi_c))
        made[u] = (mode, keys, tuple(local), forward and mode == "basis" and 0 in keyset, state)
    units: dict[str, UnitPlan] = {}
    for u, (mode, keys, local, e0, state) in made.items():
        push = tuple(k for k in keys if any(k in r for r in routes[u].values()))
        route = tuple((p, tuple(tuple(r.get(k, ())) for k in push)) for p, r in routes[u].items())
        units[u] = UnitPlan(mode, keys, local, e0, push, route, state)
    return ClosedFormPlan(units, kmax if forward else -1)


RATIOS = (1.0, 0.75, 0.5, 0.25, 0.0)


# the fixed cost of one tensor operation (Python, dispatch), in elements of an elementwise pass:
# about a microsecond on the CPU, where a pass streams a few thousand elements per microsecond
OP_OVERHEAD = 4096.0


def plan_cost(plan: ClosedFormPlan, size: dict[str, float], cost: dict[str, float]) -> float:
    """The plan's estimated work: each pushed vector at its unit's VJP cost (``cost``), each
    vector added or scaled into a sum, each term of a state and each multiple of x(0) at one
    elementwise pass over it (``size``: the unit's number of elements), each of them plus the
    fixed cost of an operation (``OP_OVERHEAD``)."""
    total = 0.0
    for u, p in plan.units.items():
        total += len(p.push) * (cost.get(u, size.get(u, 1.0)) + OP_OVERHEAD)
        total += (len(p.state or ()) + len(p.local) + p.e0) * (size.get(u, 1.0) + OP_OVERHEAD)
        for parent, per in p.route:
            total += sum(len(t) for t in per) * (size.get(parent, 1.0) + OP_OVERHEAD)
    return total


@functools.lru_cache(maxsize=64)
def cheapest_plan(graph: tuple[tuple[str, tuple[str, ...]], ...], out: str, steps: int, eta: float, schedule: str,
                  kmax: int, tol: float, forward: bool, need: frozenset[str] | None,
                  costs: tuple[tuple[str, float, float], ...]) -> ClosedFormPlan:
    """Of the plans for the ratios in ``RATIOS`` (where shifts replace the basis), the one of
    least :func:`plan_cost` (``costs``: per unit, its size and VJP cost). Shifts save VJPs, but
    where a unit carrying shifts reads a child carrying its basis it forms each shift as a
    weighted sum of all of the child's vectors (J x L elementwise passes): which ratio is
    cheapest depends on the graph and the cost of its operations."""
    size = {u: s for u, s, _ in costs}
    cost = {u: c for u, _, c in costs}
    plans = [closed_form_plan(graph, out, steps, eta, schedule, kmax, tol, forward, need, r) for r in RATIOS]
    return min(plans, key=lambda p: plan_cost(p, size, cost))


def _key_order(k: Key) -> tuple[int, int]:
    if k == "S":
        return (0, 0)
    if isinstance(k, tuple):
        return (1, k[1])
    return (2, int(k))  # type: ignore[call-overload]
