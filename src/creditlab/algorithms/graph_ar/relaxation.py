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

PushFn = Callable[[Tensor], dict[str, Tensor]]
# a unit's push and its parameters' updates from the same vector (the fixed point): one call
FusedFn = Callable[[Tensor], tuple[dict[str, Tensor], list[tuple[Tensor, Tensor]]]]


def no_push(s: Tensor) -> dict[str, Tensor]:
    """The push of a unit with no relaxing parent (e.g. the first layer)."""
    return {}


@dataclass
class GraphRelaxation:
    """The relaxation problem of one batch: units in topological order (relaxed only), their
    edge pushes (stacked vectors (K, *state) -> contributions to each relaxed parent, whose
    names ``parents`` lists), the forward states, and the output unit clamped to ``clamp``.
    ``rows`` counts, per unit, the vectors its pushes carried in the last solution (the cost
    model: one VJP of the unit's operation per vector, batched into one call per unit)."""

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

    def pushed(self, u: str, s: Tensor, updates: bool = False) -> dict[str, Tensor]:
        """``push[u](s)``, counted in ``rows``; ``updates``: with ``fused[u]`` where there is one,
        its parameters' updates at the same vector kept in ``grads[u]``."""
        if self.push[u] is no_push:
            return {}
        self.rows[u] = self.rows.get(u, 0) + s.shape[0]
        if updates and u in self.fused:
            out, self.grads[u] = self.fused[u](s)
            return out
        return self.push[u](s)


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


def _span(idx: list[int]) -> slice | Tensor:
    """``idx`` (increasing) as a slice where it is a run, else as an index tensor."""
    if idx[-1] - idx[0] == len(idx) - 1:
        return slice(idx[0], idx[-1] + 1)
    return torch.tensor(idx)


class _Stacks:
    """Per-unit stacks being accumulated from the children's pushes: a stack received whole
    is kept as is (no copy) and added to out of place; a partial one goes into a zero buffer
    the relaxation owns and adds into in place."""

    def __init__(self, rows: dict[str, int]):
        self.rows = rows  # unit -> rows of its stack
        self.acc: dict[str, Tensor] = {}
        self.owned: set[str] = set()

    def add(self, name: str, t: Tensor, src: list[int], dst: list[int]) -> None:
        """acc[name][dst] += t[src] (``src``, ``dst`` increasing row indices)."""
        if not src:
            return
        n = self.rows[name]
        whole = len(src) == t.shape[0] == n and src == dst == list(range(n))
        a = self.acc.get(name)
        if whole and a is None:
            self.acc[name] = t  # borrowed: never written into
            return
        if whole and name not in self.owned:
            self.acc[name] = a + t  # type: ignore[operator]
            self.owned.add(name)
            return
        if a is None:
            a = t.new_zeros(n, *t.shape[1:])
        elif name not in self.owned:
            a = a.clone()
        self.acc[name] = a
        self.owned.add(name)
        ts = t if len(src) == t.shape[0] else t[_span(src)]
        d = _span(dst)
        if isinstance(d, slice):
            a[d] += ts
        else:
            a.index_add_(0, d.to(a.device), ts)

    def pop(self, name: str) -> Tensor | None:
        self.owned.discard(name)
        return self.acc.pop(name, None)


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
    if math.isinf(steps):
        acc: dict[str, Tensor] = {}
        for name, t in rel.pushed(rel.out, rel.clamp.unsqueeze(0), updates).items():
            accumulate(acc, name, t)
        for u in free:
            a = acc.pop(u, None)
            x = a[0] if a is not None else torch.zeros_like(rel.forward[u])
            if keep is None or u in keep:
                states[u] = x
            if rel.push[u] is not no_push:
                for name, t in rel.pushed(u, x.unsqueeze(0), updates).items():
                    accumulate(acc, name, t)
        return states
    T = int(steps)
    tol = default_tolerance(rel.clamp.dtype) if tol is None else float(tol)
    dt, dev = rel.clamp.dtype, rel.clamp.device
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
    kept: dict[str, list[int]] = {}
    for u in free:
        labs = sorted(incoming.pop(u, ()))
        top = tail[labs[0]] if labs else 0.0
        kept[u] = [m for m in labs if tail[m] > tol * top]
        for p in rel.parents[u]:
            incoming.setdefault(p, set()).update(m + 1 for m in kept[u])
    where = {u: {m: i for i, m in enumerate(lab)} for u, lab in kept.items()}
    stacks = _Stacks({u: len(lab) for u, lab in kept.items()})

    def deliver(u_labels: list[int], contrib: dict[str, Tensor]) -> None:
        for p, t in contrib.items():
            pos = where[p]
            src = [i for i, m in enumerate(u_labels) if m + 1 in pos]
            stacks.add(p, t, src, [pos[u_labels[i] + 1] for i in src])

    deliver([-1], rel.pushed(rel.out, rel.clamp.unsqueeze(0)))
    for u in free:
        lab = kept[u]
        g = stacks.pop(u)
        if not lab or g is None:  # no path reaches u within T steps (or every weight is zero)
            states[u] = torch.zeros_like(rel.forward[u])
            continue
        coef = torch.tensor([tail[m] for m in lab], dtype=dt, device=dev)
        states[u] = torch.tensordot(coef, g, dims=1)
        if rel.push[u] is no_push:
            continue
        need = [i for i, m in enumerate(lab) if any(m + 1 in where[p] for p in rel.parents[u])]
        if need:
            sent = [lab[i] for i in need]
            deliver(sent, rel.pushed(u, g if len(need) == len(lab) else g[_span(need)]))
    return states


def _exact_from_forward(rel: GraphRelaxation, init: dict[str, Tensor], T: int, eta: float, schedule: str,
                        tol: float, states: dict[str, Tensor], free: list[str]) -> dict[str, Tensor]:
    """init=forward: each unit's stack S_u = [x*_u, E_u[0], E_u[1], ..., E_u[n_u]] with
    E[k] = (N^k e), e = x(0) - x*, E_u[0] = e_u; x(T)_u = x*_u + sum_k w_k E_u[k] over the kept
    k <= kmax; the unit pushes [x*_u, E_u[0], ..., E_u[min(n_u, kmax - 1)]], which its parents
    receive as [x*, E[1], ...]."""
    w = weights(T, float(eta), schedule, len(rel.order) + 1)
    kmax = kept_orders(w, tol)
    wall = torch.tensor(w[: kmax + 1], dtype=rel.clamp.dtype, device=rel.clamp.device)
    sent = lambda n: 1 + (min(n, kmax - 1) + 1 if kmax > 0 else 0)  # noqa: E731 rows pushed with n E-rows
    n_of: dict[str, int] = {}
    for p in rel.parents[rel.out]:
        n_of[p] = 0
    for u in free:
        n_of.setdefault(u, 0)
        for p in rel.parents[u]:
            n_of[p] = max(n_of.get(p, 0), sent(n_of[u]) - 1)
    stacks = _Stacks({u: n + 2 for u, n in n_of.items()})

    def deliver(contrib: dict[str, Tensor]) -> None:
        for p, t in contrib.items():  # rows [x*, E[1], ..., E[k-1]] into S_p rows 0, 2, ..., k
            k = t.shape[0]
            stacks.add(p, t[:1], [0], [0])
            stacks.add(p, t[1:], list(range(k - 1)), list(range(2, k + 1)))

    deliver(rel.pushed(rel.out, rel.clamp.unsqueeze(0)))
    for u in free:
        n = n_of[u]
        S = stacks.pop(u)  # a buffer of n + 2 rows the relaxation owns (row 1 is never delivered)
        if S is None:  # no child pushes to u
            S = rel.forward[u].new_zeros(n + 2, *rel.forward[u].shape)
        star = S[0]
        S[1] = init[u] - star
        states[u] = star + torch.tensordot(wall[: n + 1], S[1: n + 2], dims=1)
        if rel.push[u] is not no_push:
            deliver(rel.pushed(u, S[: sent(n)]))
    return states


def relax_graph_simulate(rel: GraphRelaxation, init: dict[str, Tensor] | None, steps: int, eta: float,
                         schedule: str) -> dict[str, Tensor]:
    """Euler steps one by one (synchronous, or a sweep in reverse topological order)."""
    if math.isinf(steps):
        raise ConfigError("ar: mode=simulate needs a finite number of steps; use mode=exact for steps=inf")
    free = list(reversed(rel.free))
    xs = {u: (init[u].clone() if init is not None else torch.zeros_like(rel.forward[u])) for u in free}
    from_out: dict[str, Tensor] = {}
    rel.rows = {}
    for name, t in rel.pushed(rel.out, rel.clamp.unsqueeze(0)).items():
        accumulate(from_out, name, t)
    for _ in range(int(steps)):
        acc = dict(from_out)
        if schedule == "synchronous":
            for u in free:
                for name, t in rel.pushed(u, xs[u].unsqueeze(0)).items():
                    accumulate(acc, name, t)
            for u in free:
                a = acc.get(u)
                xs[u] = xs[u] + eta * (-xs[u] + (a[0] if a is not None else 0.0))
        else:
            for u in free:  # reverse topological: every child already updated and pushed
                a = acc.get(u)
                xs[u] = xs[u] + eta * (-xs[u] + (a[0] if a is not None else 0.0))
                for name, t in rel.pushed(u, xs[u].unsqueeze(0)).items():
                    accumulate(acc, name, t)
    xs[rel.out] = rel.clamp
    return xs
