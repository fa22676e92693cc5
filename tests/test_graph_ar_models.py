"""Graph AR on every built-in model of issue 18 (§4), at tiny widths in float64, in train mode
(BatchNorm with batch statistics): the equilibrium (``ar:steps=inf``) equals
``torch.autograd.grad`` of the same loss on every parameter (rel < 1e-9), and the closed form
(``mode=exact``, with its negligible terms dropped) equals the step-by-step simulation
(``mode=simulate``) for T in {1, 7, 100}, init=forward and init=zero, both schedules (every
state and every update, rel < 1e-9).

Widths: every ResNet has at least 2 channels per stage. With 1 channel, a BatchNorm with batch
statistics after a 1->1 convolution makes the block invariant to the scale of the BatchNorm
before it, so that BatchNorm's weight gradient is exactly zero and the computed values (about
1e-6 of the others, in both AR and autograd) are rounding noise: no relative comparison of
them means anything."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from creditlab.algorithms import build_algorithm
from creditlab.algorithms.graph_ar import GraphActivationRelaxation, relax_graph_exact, relax_graph_simulate
from creditlab.losses import build_loss
from creditlab.models import build_named_model
from tests.tiny_models import TINY_IDS, TINY_MODELS

DT = torch.float64
CLASSES = 3
TOL = 1e-9

MODELS, IDS = TINY_MODELS, TINY_IDS


def _model(name: str, shape, options) -> nn.Module:
    torch.manual_seed(0)
    model = build_named_model(name, shape, CLASSES, **options).to(DT)
    model.train()
    return model


def _data(shape, n: int = 3) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, *shape, generator=g, dtype=DT), torch.randint(0, CLASSES, (n,), generator=g)


def _rel(a: Tensor, b: Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm()) if b.norm() > 0 else float(a.norm())


@pytest.mark.parametrize("name,shape,options", MODELS, ids=IDS)
def test_equilibrium_equals_autograd(name, shape, options):
    model, loss = _model(name, shape, options), build_loss("cross_entropy")
    x, y = _data(shape)
    buffers = [b.clone() for b in model.buffers()]
    rng = torch.get_rng_state()
    algo = build_algorithm("ar:steps=inf", model, loss)
    assert isinstance(algo, GraphActivationRelaxation)
    model.zero_grad(set_to_none=True)
    algo.step(x, y)
    got = {k: p.grad for k, p in model.named_parameters()}
    after = [b.clone() for b in model.buffers()]
    with torch.no_grad():  # autograd of the same loss from the same buffers and RNG state
        for b, v in zip(model.buffers(), buffers):
            b.copy_(v)
    torch.set_rng_state(rng)
    named = list(model.named_parameters())
    ref = torch.autograd.grad(loss(model(x), y), [p for _, p in named])
    assert all(torch.equal(a, b) for a, b in zip(after, model.buffers())), "running statistics updated other than once"
    for (k, _), r in zip(named, ref):
        assert got[k] is not None, k
        assert float(r.norm()) > 0, k  # the comparison below is relative
        assert _rel(got[k], r) < TOL, (k, _rel(got[k], r))


@pytest.mark.parametrize("name,shape,options", MODELS, ids=IDS)
def test_exact_equals_simulate(name, shape, options):
    model, loss = _model(name, shape, options), build_loss("cross_entropy")
    x, y = _data(shape)
    algo = GraphActivationRelaxation(model, loss, verify="off")
    with torch.no_grad():
        env = algo.forward_values(x)
        rel, _ = algo.build(env, loss.grad(env[algo.out_node.name], y))
    for init in ("forward", "zero"):
        x0 = {u: env[u] for u in rel.free} if init == "forward" else None
        for schedule in ("synchronous", "sweep"):
            for T in (1, 7, 100):
                with torch.no_grad():
                    exact = relax_graph_exact(rel, x0, T, 0.1, schedule)
                    sim = relax_graph_simulate(rel, x0, T, 0.1, schedule)
                assert set(exact) == set(sim) == set(rel.order)
                for u in rel.order:
                    assert _rel(exact[u], sim[u]) < TOL, (init, schedule, T, u, _rel(exact[u], sim[u]))


@pytest.mark.parametrize("name,shape,options", MODELS, ids=IDS)
@pytest.mark.parametrize("init", ["forward", "zero"])
def test_exact_and_simulate_modes_give_the_same_updates(name, shape, options, init):
    model, loss = _model(name, shape, options), build_loss("cross_entropy")
    x, y = _data(shape)
    grads = {}
    for mode in ("exact", "simulate"):
        for T in (1, 7, 100):
            algo = GraphActivationRelaxation(model, loss, mode=mode, steps=T, init=init, verify="off")
            model.zero_grad(set_to_none=True)
            algo.step(x, y)
            grads[mode, T] = {k: p.grad.clone() for k, p in model.named_parameters()}
    for T in (1, 7, 100):
        for k, g in grads["exact", T].items():
            assert _rel(g, grads["simulate", T][k]) < TOL, (T, k)


def test_the_closed_form_drops_negligible_terms_and_only_those():
    """resnet56 (depth 168 states): at T = 100 the stacks stop at the terms whose weight is
    below machine epsilon times the largest at the unit; the states equal those of the full
    closed form (tol=0) in float64, and in float32 equal the float64 simulation to float32
    precision."""
    name, shape, options = MODELS[2]
    model, loss = _model(name, shape, options), build_loss("cross_entropy")
    x, y = _data(shape)
    for dt, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        m = model.to(dt)
        algo = GraphActivationRelaxation(m, loss, verify="off")
        with torch.no_grad():
            env = algo.forward_values(x.to(dt))
            rel, _ = algo.build(env, loss.grad(env[algo.out_node.name], y))
        for init in ("forward", "zero"):
            x0 = {u: env[u] for u in rel.free} if init == "forward" else None
            with torch.no_grad():
                full = relax_graph_exact(rel, x0, 100, 0.1, "synchronous", tol=0.0)
                rows_full = sum(rel.rows.values())
                cut = relax_graph_exact(rel, x0, 100, 0.1, "synchronous")
            assert sum(rel.rows.values()) < rows_full, (dt, init)  # something was dropped
            for u in rel.order:
                assert _rel(cut[u], full[u]) < tol, (dt, init, u, _rel(cut[u], full[u]))
    model.to(DT)


def test_learned_feedback_on_a_resnet_starts_like_its_weights():
    """The built-in ResNets record init_spec 'he': psi is drawn as the model draws W."""
    torch.manual_seed(0)
    model = build_named_model("resnet20", (3, 8, 8), CLASSES, width=2)
    algo = build_algorithm("ar:feedback=learned", model, build_loss("cross_entropy"))
    assert len(algo.feedback) == 19  # every conv but the stem, and the linear layer
    for target, key in algo._fb_of.items():
        w, psi = algo.gm.get_submodule(target).weight, algo.feedback[key].transpose(0, 1)
        assert psi.shape == w.shape and 0.5 < float(psi.std() / w.std()) < 2, target
    algo.step(torch.randn(3, 3, 8, 8), torch.tensor([0, 1, 2]))
