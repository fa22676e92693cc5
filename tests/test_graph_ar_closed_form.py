"""Graph AR's closed form after T steps (issue 20): the shifts (each unit carries only the
combinations its states below need) equal the graded closed form (every unit carries its
vectors by order or path length) in float64; what the truncation drops is bounded as stated
(docs/graph_ar.md, "Cost"); the tail weights for 1 < eta < 2 are those of exact arithmetic, and
a closed form that rounding would swamp is refused."""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

import pytest
import torch
from torch import Tensor

from creditlab.algorithms._relaxation_weights import relaxation_weights, tail_weights
from creditlab.algorithms.graph_ar import GraphActivationRelaxation, GraphRelaxation, relax_graph_exact, relax_graph_simulate
from creditlab.algorithms.graph_ar.closed_form import RATIOS, closed_form_plan, plan_cost, plan_key
from creditlab.algorithms.graph_ar.relaxation import kept_orders
from creditlab.errors import ConfigError
from creditlab.losses import build_loss
from creditlab.models import build_named_model
from tests.tiny_models import TINY_IDS, TINY_MODELS

DT = torch.float64
GRAPHS = [("resmlp", (6,), {}), ("branch-add", (6,), {}), ("branch-concat", (6,), {}), ("fanout3", (6,), {}),
          ("conv-pool", (2, 6, 6), {}), ("lenet5", (1, 28, 28), {})] + TINY_MODELS
IDS = ["resmlp", "branch-add", "branch-concat", "fanout3", "conv-pool", "lenet5"] + TINY_IDS


def _problem(name, shape, options, dtype=DT):
    torch.manual_seed(0)
    model = build_named_model(name, shape, 3, **options).to(dtype).train()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(3, *shape, generator=g, dtype=dtype), torch.randint(0, 3, (3,), generator=g)
    loss = build_loss("cross_entropy")
    algo = GraphActivationRelaxation(model, loss, verify="off")
    with torch.no_grad():
        env = algo.forward_values(x)
        rel, _ = algo.build(env, loss.grad(env[algo.out_node.name], y))
    return algo, env, rel


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm()) if b.norm() > 0 else float(a.norm())


@pytest.mark.parametrize("name,shape,options", GRAPHS, ids=IDS)
def test_shifts_equal_the_graded_closed_form(name, shape, options):
    """Every state, and the states a training step asks for (the units with parameters), for
    both inits, both schedules, T in {1, 7, 100}: the two orders of summation agree to 1e-12
    (with nothing dropped: where terms are dropped, the shifts keep some that the graded form
    drops, so the two differ by the truncation, which the tests against simulate bound)."""
    algo, env, rel = _problem(name, shape, options)
    params = {u for u in rel.order if algo._plan.params[u]}
    for init in ("forward", "zero"):
        x0 = {u: env[u] for u in rel.free} if init == "forward" else None
        for schedule in ("synchronous", "sweep"):
            for T in (1, 7, 100):
                with torch.no_grad():
                    ref = relax_graph_exact(rel, x0, T, 0.1, schedule, tol=0.0, shifts=False)
                    full = relax_graph_exact(rel, x0, T, 0.1, schedule, tol=0.0)
                    part = relax_graph_exact(rel, x0, T, 0.1, schedule, tol=0.0, keep=params)
                assert set(full) == set(ref) == set(rel.order)
                assert set(part) == params | {rel.out}
                for u in rel.order:
                    assert _rel(full[u], ref[u]) < 1e-12, (init, schedule, T, u)
                    if u in part:
                        assert _rel(part[u], ref[u]) < 1e-12, (init, schedule, T, u)


@pytest.mark.parametrize("name,shape,options,forward_rows,zero_rows", [
    ("lenet5", (1, 28, 28), {}, (12, 28), (7, 7)),  # a chain: LeNet's conv2 pushes 1 vector, not 6
    ("resnet20", (3, 8, 8), {"width": 2}, (720, 1255), (340, 422)),
])
def test_shifts_carry_fewer_vectors(name, shape, options, forward_rows, zero_rows):
    """The vectors pushed by a training step's relaxation (T = 100, eta = 0.1, float32, the
    states of the units with parameters asked for) with shifts wherever they are fewer than the
    basis vectors, and with every unit carrying its basis (docs/graph_ar.md, "Cost"); the step
    uses the plan of least estimated cost among those of ``RATIOS``."""
    algo, env, rel = _problem(name, shape, options, torch.float32)
    params = frozenset(u for u in rel.order if algo._plan.params[u])
    eps = float(torch.finfo(torch.float32).eps)
    K = kept_orders(relaxation_weights(100, 0.1, "synchronous", len(rel.order) + 1), eps)
    graph = plan_key(rel.order, rel.parents)
    size = {u: float(rel.forward[u].numel()) for u in rel.order}
    for init, expected in (("forward", forward_rows), ("zero", zero_rows)):
        fw = init == "forward"
        plans = {r: closed_form_plan(graph, rel.out, 100, 0.1, "synchronous", K if fw else -1, eps, fw, params, r)
                 for r in RATIOS}
        pushes = {r: sum(len(p.push) for p in plan.units.values()) for r, plan in plans.items()}
        assert (pushes[1.0], pushes[0.0]) == expected, init
        x0 = {u: env[u] for u in rel.free} if fw else None
        with torch.no_grad():
            relax_graph_exact(rel, x0, 100, 0.1, "synchronous", keep=set(params))
        cheapest = min(RATIOS, key=lambda r: plan_cost(plans[r], size, rel.cost))
        assert sum(rel.rows.values()) == pushes[cheapest], init


@pytest.mark.parametrize("schedule", ["synchronous", "sweep"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_truncation_drops_less_weight_than_the_tolerance_allows(schedule, dtype):
    """init=forward keeps the orders k <= K: the weights it drops sum to at most eps times the
    largest weight, and K is the first order at or past the peak where that holds."""
    eps = float(torch.finfo(dtype).eps)
    for T in (1, 7, 30, 100, 1000):
        for eta in (0.05, 0.1, 0.5, 0.9, 1.0):
            w = relaxation_weights(T, eta, schedule, 3 * T + 200)
            peak = max(range(len(w)), key=lambda k: w[k])
            K = kept_orders(w, eps)
            assert K >= peak
            assert math.fsum(w[K + 1:]) <= eps * w[peak], (T, eta, K)
            if K > peak:
                assert math.fsum(w[K:]) > eps * w[peak], (T, eta, K)


def test_truncated_states_differ_from_the_full_ones_by_at_most_the_dropped_weight():
    """resnet56 (paths of 138 states), T = 100, eta = 0.1, init=forward, float64, with a
    tolerance of 1e-6 (large enough to be seen above rounding): at every state
    ||x_K(T) - x(T)|| <= (sum_{k>K} w_k) max_{k>K} ||(N^k e)_u||, with N^k e from the
    relaxation of e without its clamp at eta = 1 (x <- N x)."""
    _, env, rel = _problem("resnet56", (3, 8, 8), {"width": 2})
    tol, T = 1e-6, 100
    w = relaxation_weights(T, 0.1, "synchronous", len(rel.order) + 1)
    K = kept_orders(w, tol)
    dropped = math.fsum(w[K + 1:])
    assert 0 < dropped <= tol * max(w) and K < 60
    x0 = {u: env[u] for u in rel.free}
    with torch.no_grad():
        cut = relax_graph_exact(rel, x0, T, 0.1, "synchronous", tol=tol)
        full = relax_graph_exact(rel, x0, T, 0.1, "synchronous", tol=0.0)
        star = rel.fixed_point()
        bare = dataclasses.replace(rel, clamp=torch.zeros_like(rel.clamp))
        e = {u: x0[u] - star[u] for u in rel.free}
        biggest = {u: 0.0 for u in rel.free}
        nk = e
        for k in range(1, len(rel.order) + 1):
            nk = relax_graph_simulate(bare, nk, 1, 1.0, "synchronous")  # N^k e
            if k > K:
                for u in rel.free:
                    biggest[u] = max(biggest[u], float(nk[u].norm()))
    differs = 0
    for u in rel.free:
        diff = float((cut[u] - full[u]).norm())
        assert diff <= dropped * biggest[u] * (1 + 1e-6) + 1e-13 * float(full[u].norm()), u
        differs += diff > 1e-12 * float(full[u].norm())
    assert differs > 0  # the test can fail: something was dropped


@pytest.mark.parametrize("schedule", ["synchronous", "sweep"])
def test_tail_weights_are_log_concave(schedule):
    """The premise of the bound for init=zero: with tails log-concave in m, a path length dropped
    at a unit weighs, at every unit below that it would reach, at most tol times the largest
    weight there (docs/graph_ar.md)."""
    for T in (1, 7, 100):
        for eta in (0.05, 0.1, 0.5, 0.9):
            t = tail_weights(T, eta, schedule, 150)
            for m in range(1, 150):
                if t[m + 1] > 1e-280:
                    assert t[m] ** 2 >= t[m - 1] * t[m + 1] * (1 - 1e-12), (T, eta, m)


@pytest.mark.parametrize("eta", [Fraction(3, 2), Fraction(19, 10)])
def test_tail_weights_above_eta_one_are_those_of_exact_arithmetic(eta):
    """For 1 < eta < 2 the synchronous weights alternate in sign and reach 1e40: each tail is 1 -
    the exactly rounded partial sum, off by no more than the rounding of its terms (a few eps
    times sum_{k<=m} |w_k|; a directly summed tail was the rounding of the huge terms past m:
    1.7e28 for 0.42 at T = 100, eta = 1.9, m = 2); past T exactly 0."""
    T = 100
    w = [Fraction(math.comb(T, k)) * (1 - eta) ** (T - k) * eta ** k for k in range(T + 1)]
    got = tail_weights(T, float(eta), "synchronous", 120)
    for m in range(121):
        if m >= T:
            assert got[m] == 0.0
            continue
        want = 1 - sum(w[: m + 1])
        assert abs(got[m] - float(want)) <= 1e-14 * float(sum(abs(v) for v in w[: m + 1])) + 1e-15, m


@pytest.mark.parametrize("name,shape", [("resmlp", (6,)), ("fanout3", (6,)), ("conv-pool", (2, 6, 6))])
def test_exact_equals_simulate_above_eta_one(name, shape):
    """1 < eta < 2 (weights of alternating sign: nothing is dropped but exact zeros)."""
    _, env, rel = _problem(name, shape, {})
    for init in ("forward", "zero"):
        x0 = {u: env[u] for u in rel.free} if init == "forward" else None
        for schedule in ("synchronous", "sweep"):
            for eta in (1.5, 1.9):
                for T in (1, 7, 100):
                    with torch.no_grad():
                        ex = relax_graph_exact(rel, x0, T, eta, schedule)
                        sim = relax_graph_simulate(rel, x0, T, eta, schedule)
                    for u in rel.order:
                        assert _rel(ex[u], sim[u]) < 1e-9, (init, schedule, eta, T, u)


def test_a_closed_form_that_rounding_would_swamp_is_refused():
    """Two paths from the output reach u, of 1 and 3 states, with Jacobians chosen so that at
    eta = 1.9, T = 100 their terms cancel: the state is rounding noise beside them, and is
    refused; at eta = 0.1 the same graph is fine."""
    def problem(c: float) -> GraphRelaxation:
        x = torch.ones(4, dtype=DT)
        push = {"out": lambda r: {"u": list(r), "b1": list(r)}, "b1": lambda r: {"b2": list(r)},
                "b2": lambda r: {"u": [c * v for v in r]}, "u": lambda r: {}}
        return GraphRelaxation(["u", "b2", "b1", "out"], push, {"u": x, "b2": x, "b1": x, "out": x}, "out", x,
                               {"u": [], "b2": ["u"], "b1": ["b2"], "out": ["u", "b1"]})

    tail = tail_weights(100, 1.9, "synchronous", 4)
    rel = problem(-tail[0] / tail[2])
    with pytest.raises(ConfigError, match=r"eta=1.9 .*state 'u'.*mode=simulate"):
        relax_graph_exact(rel, None, 100, 1.9, "synchronous")
    fine = problem(-1.0)
    with torch.no_grad():
        ex, sim = relax_graph_exact(fine, None, 100, 0.1, "synchronous"), relax_graph_simulate(fine, None, 100, 0.1,
                                                                                               "synchronous")
    assert _rel(ex["u"], sim["u"]) < 1e-12
