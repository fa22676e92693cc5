"""Activation Relaxation against its oracles: autograd gradients at equilibrium, the
step-by-step simulation for the closed form, transpose feedback for learned feedback."""

import itertools
import math

import pytest
import torch

from creditlab.algorithms import build_algorithm
from creditlab.algorithms.ar import relaxation_weights
from creditlab.diagnostics.angles import backprop_grads, current_updates
from creditlab.losses import build_loss
from creditlab.models import MLP

D = torch.float64


def net(depth: int, act: str, seed: int = 0, dtype=D, bias=True) -> MLP:
    torch.manual_seed(seed)
    sizes = [12] + [9, 11, 8, 10, 7][: depth - 1] + [5]
    return MLP(sizes, act, "linear", bias=bias, init="xavier").to(dtype)


def batch(n_in=12, n_out=5, b=7, dtype=D, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n_in, generator=g, dtype=dtype), torch.randint(0, n_out, (b,), generator=g)


def max_rel_err(model, algo_spec, loss, x, y):
    ref = backprop_grads(model, loss, x, y)
    algo = build_algorithm(algo_spec, model, loss)
    algo.step(x, y)
    got = current_updates(model)
    return max(float((got[k] - ref[k]).norm() / ref[k].norm()) for k in ref)


@pytest.mark.parametrize("depth", [2, 3, 4, 5])
@pytest.mark.parametrize("act", ["relu", "tanh", "sigmoid", "leaky_relu(0.2)"])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy", "mse:reduction=mean"])
def test_ar_equilibrium_equals_autograd_gradients(depth, act, loss):
    model = net(depth, act)
    x, y = batch()
    assert max_rel_err(model, "ar:steps=inf", build_loss(loss), x, y) < 1e-12


@pytest.mark.parametrize("depth", [2, 3, 4, 5])
@pytest.mark.parametrize("schedule", ["synchronous", "sweep"])
@pytest.mark.parametrize("init", ["forward", "zero"])
def test_ar_after_300_steps_matches_autograd_gradients(depth, schedule, init):
    model = net(depth, "tanh")
    x, y = batch()
    err = max_rel_err(model, f"ar:steps=300,eta=0.1,schedule={schedule},init={init}", build_loss("mse"), x, y)
    assert err < 1e-6


def test_ar_after_few_steps_does_not_match_autograd():
    """The test above can fail: far from equilibrium the updates differ."""
    model = net(4, "tanh")
    x, y = batch()
    assert max_rel_err(model, "ar:steps=3,eta=0.1", build_loss("mse"), x, y) > 1e-2


OPTIONS = list(itertools.product(["synchronous", "sweep"], ["forward", "zero"], ["transpose", "random", "learned"],
                                 [True, False], [True, False]))


@pytest.mark.parametrize("schedule,init,feedback,derivative,update_derivative", OPTIONS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_exact_relaxation_equals_simulation(schedule, init, feedback, derivative, update_derivative, dtype, tol):
    model = net(4, "tanh", dtype=dtype)
    x, y = batch(dtype=dtype)
    loss = build_loss("mse")
    opts = (f"steps=37,eta=0.2,schedule={schedule},init={init},feedback={feedback},"
            f"derivative={derivative},update_derivative={update_derivative}")
    grads = []
    for mode in ("exact", "simulate"):
        torch.manual_seed(5)  # same random feedback weights
        algo = build_algorithm(f"ar:mode={mode},{opts}", model, loss)
        algo.step(x, y)
        g = current_updates(model)
        if feedback == "learned":
            g.update({f"psi{i}": p.grad.clone() for i, p in enumerate(algo.feedback)})
        grads.append(g)
    for k in grads[1]:
        a, b = grads[0][k], grads[1][k]
        assert float((a - b).norm() / b.norm()) < tol, k


@pytest.mark.parametrize("steps", [0, 1, 2, 5, 1000])
@pytest.mark.parametrize("eta", [0.1, 0.5, 1.0])
def test_exact_states_equal_simulated_states_for_step_counts(steps, eta):
    model = net(5, "relu")
    x, y = batch()
    for schedule in ("synchronous", "sweep"):
        ex = build_algorithm(f"ar:steps={steps},eta={eta},schedule={schedule}", model, build_loss("mse"))
        si = build_algorithm(f"ar:mode=simulate,steps={steps},eta={eta},schedule={schedule}", model, build_loss("mse"))
        t = model.trace(x)
        a, b = ex.relax(t, y), si.relax(t, y)
        for l in range(1, 5):
            assert torch.allclose(a[l], b[l], rtol=1e-10, atol=1e-12)


def test_relaxation_weights_sum_to_one_for_a_single_layer_chain_limit():
    # synchronous: sum_k C(T,k)(1-eta)^(T-k) eta^k over all k is 1 (binomial theorem)
    w = relaxation_weights(6, 0.3, "synchronous", 6)
    assert math.isclose(sum(w), 1.0, rel_tol=1e-12)
    # sweep with eta = 1 converges in one step: M = 0
    assert relaxation_weights(1, 1.0, "sweep", 4) == (0.0,) * 5


def test_relaxation_trace_converges_to_backprop_gradients():
    model = net(4, "relu")
    x, y = batch()
    algo = build_algorithm("ar:mode=simulate,steps=200,eta=0.1", model, build_loss("mse"))
    algo.relax(model.trace(x), y, record=True)
    tr = algo.last_trace
    assert len(tr) == 201 and len(tr[0]) == 3
    assert all(tr[-1][l] < 1e-12 * max(tr[0][l], 1e-30) + 1e-20 for l in range(3))
    assert tr[0][0] > 1e-6


def test_derivative_false_relaxes_through_the_weights_only():
    """Eq. 7: with f' dropped the equilibrium is W^T-chained output error (no f')."""
    model = net(3, "tanh")
    x, y = batch()
    loss = build_loss("mse")
    algo = build_algorithm("ar:steps=inf,derivative=false", model, loss)
    t = model.trace(x)
    states = algo.relax(t, y)
    c = loss.grad(t.out, y)
    expect2 = c @ model.layers[2].weight
    expect1 = expect2 @ model.layers[1].weight
    assert torch.allclose(states[2], expect2) and torch.allclose(states[1], expect1)


def test_cross_entropy_clamp_is_softmax_minus_target():
    model = net(3, "relu")
    x, y = batch()
    loss = build_loss("cross_entropy:reduction=sum")
    out = model(x).detach().requires_grad_(True)
    (auto,) = torch.autograd.grad(loss(out, y), out)
    onehot = torch.nn.functional.one_hot(y, 5).to(D)
    assert torch.allclose(loss.grad(out.detach(), y), torch.softmax(out.detach(), 1) - onehot)
    assert torch.allclose(loss.grad(out.detach(), y), auto)


def _train_steps(model, spec, opt_name, steps=5, lr=0.05, seed=3):
    loss = build_loss("mse")
    algo = build_algorithm(spec, model, loss)
    groups = [{"params": list(model.parameters())}] + algo.param_groups(lr)
    opt = torch.optim.SGD(groups, lr=lr) if opt_name == "sgd" else torch.optim.Adam(groups, lr=lr)
    for i in range(steps):
        x, y = batch(seed=seed + i)
        opt.zero_grad(set_to_none=True)
        algo.step(x, y)
        opt.step()
    return algo


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_learned_feedback_keeps_psi_minus_w_transpose_invariant(opt):
    model = net(4, "relu", bias=False)
    torch.manual_seed(11)
    algo = build_algorithm("ar:feedback=learned", model, build_loss("mse"))
    before = [p.detach().clone() - model.layers[i + 1].weight.detach().t() for i, p in enumerate(algo.feedback)]
    w0 = [l.weight.detach().clone() for l in model.layers]
    loss = build_loss("mse")
    groups = [{"params": list(model.parameters())}] + algo.param_groups(0.05)
    optim = torch.optim.SGD(groups, lr=0.05) if opt == "sgd" else torch.optim.Adam(groups, lr=0.05)
    for i in range(6):
        x, y = batch(seed=20 + i)
        optim.zero_grad(set_to_none=True)
        algo.step(x, y)
        optim.step()
    assert not torch.allclose(w0[1], model.layers[1].weight)  # the weights did move
    for i, p in enumerate(algo.feedback):
        after = p.detach() - model.layers[i + 1].weight.detach().t()
        assert torch.allclose(after, before[i], atol=1e-12)
    del loss


def test_learned_feedback_with_decay_breaks_the_invariance():
    model = net(3, "relu", bias=False)
    algo = build_algorithm("ar:feedback=learned,feedback_decay=0.1", model, build_loss("mse"))
    before = algo.feedback[0].detach().clone() - model.layers[1].weight.detach().t()
    groups = [{"params": list(model.parameters())}] + algo.param_groups(0.05)
    optim = torch.optim.SGD(groups, lr=0.05)
    x, y = batch()
    optim.zero_grad(set_to_none=True)
    algo.step(x, y)
    optim.step()
    after = algo.feedback[0].detach() - model.layers[1].weight.detach().t()
    assert not torch.allclose(after, before)


def test_learned_feedback_starting_at_transpose_trains_exactly_like_transpose_feedback():
    a, b = net(4, "tanh"), net(4, "tanh")
    learned = build_algorithm("ar:feedback=learned,steps=20", a, build_loss("mse"))
    with torch.no_grad():
        for i, p in enumerate(learned.feedback):
            p.copy_(a.layers[i + 1].weight.t())
    loss = build_loss("mse")
    transpose = build_algorithm("ar:steps=20", b, loss)
    oa = torch.optim.SGD([{"params": list(a.parameters())}] + learned.param_groups(0.05), lr=0.05)
    ob = torch.optim.SGD(b.parameters(), lr=0.05)
    for i in range(5):
        x, y = batch(seed=40 + i)
        for algo, opt in ((learned, oa), (transpose, ob)):
            opt.zero_grad(set_to_none=True)
            algo.step(x, y)
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-12)


def test_random_feedback_is_fixed_and_not_trained():
    model = net(3, "relu")
    algo = build_algorithm("ar:feedback=random", model, build_loss("mse"))
    assert algo.param_groups(0.1) == []
    assert all(not p.requires_grad for p in algo.feedback)
    assert set(algo.diagnostics()) >= {"feedback_angle_deg/layers.1", "sign_congruence_pct/layers.1",
                                       "feedback_norm_ratio/layers.1"}


@pytest.mark.parametrize("spec,msg", [
    ("ar:mode=fast", "mode"), ("ar:steps=-1", "steps"), ("ar:eta=0", "eta"),
    ("ar:mode=simulate,steps=inf", "finite"), ("ar:feedback=magic", "feedback"), ("ar:colour=red", "valid options"),
    ("ar:derivative=no_conv", "true or false"),
])
def test_bad_ar_options_are_refused_with_the_valid_ones(spec, msg):
    from creditlab.errors import ConfigError

    with pytest.raises(ConfigError, match=msg):
        build_algorithm(spec, net(2, "relu"), build_loss("mse"))


@pytest.mark.parametrize("eta", [2, 2.5, 1e9, 0, -0.1])
@pytest.mark.parametrize("model", ["mlp", "graph"])
def test_eta_outside_the_stable_range_is_refused_at_construction(eta, model):
    from creditlab.errors import ConfigError
    from creditlab.models import build_named_model

    m = net(2, "relu") if model == "mlp" else build_named_model("resmlp", (6,), 3)
    with pytest.raises(ConfigError, match=r"0 < eta < 2: the relaxation's iteration has eigenvalues 1 - eta"):
        build_algorithm(f"ar:eta={eta}", m, build_loss("mse"))


@pytest.mark.parametrize("schedule", ["synchronous", "sweep"])
def test_init_zero_tail_weights_are_exact_in_deep_narrow_nets(schedule):
    """The lowest layers of a deep net reach only 1 - sum_{k<=m} w_k (about 1e-12 here) of their
    equilibrium after T steps from zero; the closed form must keep that tiny factor's digits."""
    torch.manual_seed(0)
    model = MLP([3] * 41, "tanh", "linear", init="xavier").to(D)
    x, y = batch(n_in=3, n_out=3)
    grads = []
    for mode in ("exact", "simulate"):
        algo = build_algorithm(f"ar:mode={mode},steps=100,eta=0.1,init=zero,schedule={schedule}", model,
                               build_loss("mse"))
        algo.step(x, y)
        grads.append(current_updates(model))
    exact, sim = grads
    assert float(sim["layers.0.weight"].norm()) > 0
    for k in sim:
        assert float((exact[k] - sim[k]).norm() / sim[k].norm()) < 1e-10, k


@pytest.mark.parametrize("spec", ["ar:steps=inf", "ar:steps=7,feedback=learned", "ar:mode=simulate,steps=5"])
def test_frozen_parameters_keep_grad_none_in_mlp_ar(spec):
    model = net(4, "tanh")
    model.layers[1].weight.requires_grad_(False)
    model.layers[2].bias.requires_grad_(False)
    x, y = batch()
    ref = backprop_grads(model, build_loss("mse"), x, y)
    model.zero_grad(set_to_none=True)
    build_algorithm(spec, model, build_loss("mse")).step(x, y)
    assert model.layers[1].weight.grad is None and model.layers[2].bias.grad is None
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    if spec == "ar:steps=inf":
        for k, p in model.named_parameters():
            if p.requires_grad:
                assert torch.allclose(p.grad, ref[k], rtol=1e-12, atol=0), k
