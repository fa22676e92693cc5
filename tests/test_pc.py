"""Predictive coding (``pc``) against its oracles: with the fixed-prediction assumption the
converged update is autograd's gradient (MLPs, the graph test nets, every built-in model at
tiny width) and the finite-T update is Activation Relaxation's closed form from a zero state;
the standard relaxation is gradient descent on an independently written energy, its update is
that energy's parameter gradient, and it approaches backprop as the output error shrinks;
frozen parameters, buffers, random masks, data-parallel runs and bad options behave as
documented."""

from __future__ import annotations

import json
import math
from itertools import pairwise

import pytest
import torch
from torch import Tensor, nn

from creditlab.algorithms import build_algorithm
from creditlab.algorithms.predictive_coding import PredictiveCoding, relax_standard
from creditlab.algorithms.predictive_coding.predictions import UnitPredictor
from creditlab.errors import ConfigError
from creditlab.losses import as_targets, build_loss
from creditlab.models import MLP, build_named_model
from creditlab.train import train
from tests.test_distributed import ROOT, assert_same_run, torchrun
from tests.tiny_models import TINY_IDS, TINY_MODELS

DT = torch.float64
TOL = 1e-9
GRAPHS = [("resmlp", (6,)), ("branch-add", (6,)), ("branch-concat", (6,)), ("fanout3", (6,)), ("conv-pool", (2, 6, 6))]


def _data(shape, n: int = 5, classes: int = 3, seed: int = 0, dtype=DT) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=dtype), torch.randint(0, classes, (n,), generator=g)


def _mlp(act: str = "tanh", bias: bool = True, sizes=(6, 7, 5, 3), seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP(list(sizes), act, "linear", bias=bias, init="xavier").to(DT)


def _graph(name: str, shape, seed: int = 1, **options) -> nn.Module:
    torch.manual_seed(seed)
    return build_named_model(name, shape, 3, **options).to(DT)


def _autograd(model: nn.Module, loss, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    gs = torch.autograd.grad(loss(model(x), y), [p for _, p in named])
    return {k: g for (k, _), g in zip(named, gs)}


def _step(spec: str, model: nn.Module, loss, x: Tensor, y: Tensor):
    algo = build_algorithm(spec, model, loss)
    model.zero_grad(set_to_none=True)
    algo.step(x, y)
    return algo, {k: p.grad for k, p in model.named_parameters()}


def _rel(a: Tensor, b: Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm()) if b.norm() > 0 else float(a.norm())


def _flat(grads: dict[str, Tensor]) -> Tensor:
    return torch.cat([g.reshape(-1) for g in grads.values()])


# ----------------------------------------------------------------------------------------
# the fixed-prediction assumption: backprop at convergence, AR's closed form before it
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("act,bias", [("tanh", True), ("relu", False), ("sigmoid", True)])
@pytest.mark.parametrize("loss_spec", ["mse", "cross_entropy", "mse:reduction=mean"])
@pytest.mark.parametrize("steps", ["inf", "400,eta=0.5"])
def test_fixed_prediction_at_convergence_equals_autograd_on_mlps(act, bias, loss_spec, steps):
    model, loss = _mlp(act, bias), build_loss(loss_spec)
    x, y = _data((6,))
    ref = _autograd(model, loss, x, y)
    _, got = _step(f"pc:fixed_prediction=true,steps={steps}", model, loss, x, y)
    for k in ref:
        assert _rel(got[k], ref[k]) < TOL, k


@pytest.mark.parametrize("name,shape", GRAPHS)
@pytest.mark.parametrize("loss_spec", ["mse", "cross_entropy"])
@pytest.mark.parametrize("steps", ["inf", "300,eta=0.5"])
def test_fixed_prediction_at_convergence_equals_autograd_on_graph_nets(name, shape, loss_spec, steps):
    model, loss = _graph(name, shape), build_loss(loss_spec)
    x, y = _data(shape)
    ref = _autograd(model, loss, x, y)
    _, got = _step(f"pc:fixed_prediction=true,steps={steps}", model, loss, x, y)
    for k in ref:
        assert _rel(got[k], ref[k]) < TOL, k


@pytest.mark.parametrize("name,shape,options", TINY_MODELS, ids=TINY_IDS)
def test_fixed_prediction_equilibrium_equals_autograd_on_every_built_in_model(name, shape, options):
    model, loss = _graph(name, shape, seed=0, **options), build_loss("cross_entropy")
    model.train()
    x, y = _data(shape, n=3)
    buffers = [b.clone() for b in model.buffers()]
    rng = torch.get_rng_state()
    _, got = _step("pc:fixed_prediction=true,steps=inf", model, loss, x, y)
    after = [b.clone() for b in model.buffers()]
    with torch.no_grad():  # autograd from the same buffers and random state
        for b, v in zip(model.buffers(), buffers):
            b.copy_(v)
    torch.set_rng_state(rng)
    ref = _autograd(model, loss, x, y)
    assert all(torch.equal(a, b) for a, b in zip(after, model.buffers())), "buffers updated other than once"
    for k in ref:
        assert float(ref[k].norm()) > 0, k
        assert _rel(got[k], ref[k]) < TOL, k


@pytest.mark.parametrize("name,shape", [("mlp", (6,))] + GRAPHS)
@pytest.mark.parametrize("steps", [1, 7, 30])
def test_fixed_prediction_equals_activation_relaxation_from_a_zero_state(name, shape, steps):
    # in s = -r eps the fixed-prediction iteration is AR's; init=forward is s(0) = 0 (ar:init=zero),
    # init=zero is s(0) = r mu = the forward values for a summed loss (ar:init=forward)
    loss = build_loss("mse")
    x, y = _data(shape)
    for pc_init, ar_init in (("forward", "zero"), ("zero", "forward")):
        model = _mlp() if name == "mlp" else _graph(name, shape)
        # energy_trace=true: pc's own step-by-step iteration against AR's closed form
        _, got = _step(f"pc:fixed_prediction=true,steps={steps},eta=0.3,init={pc_init},energy_trace=true",
                       model, loss, x, y)
        _, ref = _step(f"ar:mode=exact,steps={steps},eta=0.3,init={ar_init}", model, loss, x, y)
        for k in ref:
            assert _rel(got[k], ref[k]) < 1e-12, (pc_init, k)
    assert _rel(_flat(got), _flat(_autograd(model, loss, x, y))) > 1e-6 or steps == 30  # not yet converged


# ----------------------------------------------------------------------------------------
# the standard relaxation: gradient descent on F, its update dF/dtheta, toward backprop
# ----------------------------------------------------------------------------------------
def _mlp_energy(model: MLP, loss, x: Tensor, t: Tensor, values: list[Tensor]) -> Tensor:
    """F = sum_l 1/2 ||x_l - f_l(W_l x_{l-1} + b_l)||^2 + sum_n l(mu_L, t), written out for an MLP."""
    h = torch.flatten(x, 1)
    total = torch.zeros((), dtype=x.dtype)
    for layer, act, v in zip(model.layers[:-1], model.acts[:-1], values):
        total = total + 0.5 * ((v - act(layer(h))) ** 2).sum()
        h = v
    return total + loss.per_sample(model.acts[-1](model.layers[-1](h)), t).sum()


def _relax_mlp(algo: PredictiveCoding, x: Tensor, y: Tensor, x0: list[Tensor], steps: int, eta: float):
    g = algo.graph
    with torch.no_grad():
        env = g.forward_values(x)
        from creditlab.algorithms.graph_ar.units import make_plan

        g._plan = g._plan or make_plan(g.gm, g.units, g.owner, g.out_node, env)
        plan = g._plan
        free = [u for u in plan.relaxed if u != plan.out]
        t = as_targets(y, env[plan.out])
        preds = {u: UnitPredictor(g, u, env) for u in plan.relaxed}
        res = relax_standard(plan.relaxed, plan.out, preds, dict(zip(free, x0)), steps, eta,
                             lambda mu: (algo.loss.per_sample(mu, t).sum(), algo.loss.sample_grad(mu, t)))
    return [res.x[u] for u in free], res


@pytest.mark.parametrize("loss_spec", ["mse", "cross_entropy"])
def test_standard_relaxation_step_is_minus_eta_times_the_energy_gradient(loss_spec):
    model, loss = _mlp("tanh"), build_loss(loss_spec)
    x, y = _data((6,))
    algo = PredictiveCoding(model, loss)
    g = torch.Generator().manual_seed(3)
    x0 = [torch.randn(5, n, generator=g, dtype=DT) for n in (7, 5)]  # away from the forward values
    (x1a, x1b), res = _relax_mlp(algo, x, y, x0, 1, 0.05)
    vs = [v.clone().requires_grad_(True) for v in x0]
    e = _mlp_energy(model, loss, x, as_targets(y, model(x)), vs)
    ga, gb = torch.autograd.grad(e, vs)
    assert float(res.energy[0]) == pytest.approx(float(e.detach()), rel=1e-13)
    assert _rel(x1a, x0[0] - 0.05 * ga) < 1e-13 and _rel(x1b, x0[1] - 0.05 * gb) < 1e-13


@pytest.mark.parametrize("loss_spec", ["mse", "cross_entropy:reduction=mean", "cross_entropy:reduction=sum"])
def test_standard_update_is_the_energy_gradient_at_the_relaxed_values_times_the_loss_reduction(loss_spec):
    model, loss = _mlp("tanh"), build_loss(loss_spec)
    x, y = _data((6,))
    algo, got = _step("pc:steps=12,eta=0.2", model, loss, x, y)
    with torch.no_grad():
        h1 = model.acts[0](model.layers[0](x))
        h2 = model.acts[1](model.layers[1](h1))
    (xa, xb), _ = _relax_mlp(algo, x, y, [h1, h2], 12, 0.2)
    e = _mlp_energy(model, loss, x, as_targets(y, model(x)), [xa, xb])
    named = list(model.named_parameters())
    ref = torch.autograd.grad(e, [p for _, p in named])
    r = 1.0 if loss.reduction == "sum" else 1.0 / x.shape[0]
    for (k, _), gr in zip(named, ref):
        assert _rel(got[k], r * gr) < 1e-12, k


@pytest.mark.parametrize("name,shape", [("mlp", (6,))] + GRAPHS)
@pytest.mark.parametrize("loss_spec", ["mse", "cross_entropy"])
def test_standard_energy_does_not_increase_over_the_relaxation_for_small_eta(name, shape, loss_spec):
    model = _mlp() if name == "mlp" else _graph(name, shape)
    loss = build_loss(loss_spec)
    x, y = _data(shape)
    algo, _ = _step("pc:steps=40,eta=0.05,energy_trace=true", model, loss, x, y)
    e = algo.energy_trace()
    assert len(e) == 41
    assert all(b <= a * (1 + 1e-12) for a, b in pairwise(e)), e
    assert e[-1] < e[0]
    d = algo.diagnostics()
    assert d["pc_energy_rises"] == 0 and d["pc_energy_max_rise"] == 0.0
    assert d["pc_energy_first"] == e[0] and d["pc_energy/40"] == e[-1] and d["pc_energy_max"] == e[0]


def test_a_relaxation_step_beyond_the_stability_limit_is_reported_as_an_energy_rise():
    # eta = 1.9 < 2 is accepted, but F's curvature here exceeds 2 / 1.9: the energy climbs
    model, loss = _mlp("tanh", sizes=(6, 7, 5, 3)), build_loss("mse")
    with torch.no_grad():
        for layer in model.layers:
            layer.weight.mul_(3.0)
    x, y = _data((6,))
    algo, _ = _step("pc:steps=10,eta=1.9", model, loss, x, y)
    d = algo.diagnostics()
    assert d["pc_energy_rises"] >= 1 and d["pc_energy_max_rise"] > 0.5 and d["pc_energy_max"] > d["pc_energy_first"]


@pytest.mark.parametrize("name,shape", [("mlp", (6,)), ("branch-concat", (6,)), ("conv-pool", (2, 6, 6))])
@pytest.mark.parametrize("loss_spec", ["mse", "cross_entropy"])
def test_standard_pc_approaches_backprop_as_the_output_error_shrinks(name, shape, loss_spec):
    # the output term gamma l makes every prediction error O(gamma): the relaxed values stay within
    # O(gamma) of the forward pass and the update (divided by gamma) within O(gamma) of backprop's
    model = _mlp() if name == "mlp" else _graph(name, shape)
    loss = build_loss(loss_spec)
    x, y = _data(shape)
    ref = _flat(_autograd(model, loss, x, y))
    errs = []
    for gamma in (1.0, 0.1, 0.01, 0.001):
        _, got = _step(f"pc:steps=600,eta=0.2,output_precision={gamma}", model, loss, x, y)
        errs.append(_rel(_flat(got), ref))
    assert errs[0] > 0.3, errs  # far from backprop with the plain loss
    assert all(b < a for a, b in pairwise(errs)), errs
    assert errs[-1] < 0.2 * errs[-2] and errs[-1] < 0.02, errs  # linear in gamma as gamma -> 0


@pytest.mark.parametrize("steps", ["inf", "200,eta=0.5"])
def test_fixed_prediction_update_does_not_depend_on_the_output_precision(steps):
    model, loss = _mlp(), build_loss("cross_entropy")
    x, y = _data((6,))
    ref = _autograd(model, loss, x, y)
    for gamma in (1.0, 0.01, 30.0):
        _, got = _step(f"pc:fixed_prediction=true,steps={steps},output_precision={gamma}", model, loss, x, y)
        for k in ref:
            assert _rel(got[k], ref[k]) < TOL, (gamma, k)


def test_standard_and_fixed_prediction_agree_with_no_relaxation_on_the_output_layer():
    # T = 0 from the forward values: every hidden error is zero, so only the output layer learns,
    # with backprop's gradient, in both variants
    model, loss = _mlp(), build_loss("cross_entropy")
    x, y = _data((6,))
    ref = _autograd(model, loss, x, y)
    for spec in ("pc:steps=0", "pc:fixed_prediction=true,steps=0"):
        _, got = _step(spec, model, loss, x, y)
        assert _rel(got["layers.2.weight"], ref["layers.2.weight"]) < 1e-13
        assert float(got["layers.0.weight"].norm()) == 0.0 and float(got["layers.1.bias"].norm()) == 0.0


# ----------------------------------------------------------------------------------------
# one implementation for MLPs and graphs; state, frozen parameters, random masks
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["pc:steps=9", "pc:fixed_prediction=true,steps=9"])
def test_mlp_and_the_same_network_as_a_sequential_module_get_the_same_updates(spec):
    model, loss = _mlp("tanh"), build_loss("cross_entropy")
    seq = nn.Sequential(nn.Flatten(), model.layers[0], nn.Tanh(), model.layers[1], nn.Tanh(), model.layers[2])
    x, y = _data((6,))
    _, a = _step(spec, model, loss, x, y)
    _, b = _step(spec, seq, loss, x, y)
    names = {"layers.0": "1", "layers.1": "3", "layers.2": "5"}
    for k, v in a.items():
        layer, kind = k.rsplit(".", 1)
        assert _rel(b[f"{names[layer]}.{kind}"], v) < 1e-13, k


@pytest.mark.parametrize("spec", ["pc:steps=6", "pc:fixed_prediction=true,steps=inf", "pc:fixed_prediction=true,steps=5"])
def test_frozen_parameters_keep_grad_none(spec):
    for model, shape in ((_mlp(), (6,)), (_graph("conv-pool", (2, 6, 6)), (2, 6, 6))):
        frozen = [p for p in model.parameters()][:2]
        for p in frozen:
            p.requires_grad_(False)
        x, y = _data(shape)
        _step(spec, model, build_loss("cross_entropy"), x, y)
        assert all(p.grad is None for p in frozen)
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("spec", ["pc:steps=5", "pc:fixed_prediction=true,steps=5"])
def test_dropout_masks_are_held_fixed_and_buffers_updated_once_per_step(spec):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 8, bias=False), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.5),
                          nn.Linear(8, 3)).to(DT).train()
    loss = build_loss("cross_entropy")
    x, y = _data((6,), n=6)
    bn = model[2]
    torch.manual_seed(7)
    algo, a = _step(spec, model, loss, x, y)
    assert int(bn.num_batches_tracked) == 1
    with torch.no_grad():  # the same step again from the same state: the same masks, the same updates
        bn.reset_running_stats()
    torch.manual_seed(7)
    model.zero_grad(set_to_none=True)
    algo.step(x, y)
    assert int(bn.num_batches_tracked) == 1
    for k, p in model.named_parameters():
        assert torch.equal(p.grad, a[k]), k
    torch.manual_seed(7)
    with torch.no_grad():
        bn.reset_running_stats()
    model.zero_grad(set_to_none=True)
    build_algorithm("pc:fixed_prediction=true,steps=inf", model, loss).step(x, y)
    eq = {k: p.grad.clone() for k, p in model.named_parameters()}
    torch.manual_seed(7)
    with torch.no_grad():
        bn.reset_running_stats()
    ref = _autograd(model, loss, x, y)  # the same dropout mask as the forward pass each step drew
    for k in ref:
        assert _rel(eq[k], ref[k]) < TOL, k


def test_float32_model_gets_float32_updates_and_energy():
    model = _mlp().float()
    x, y = _data((6,), dtype=torch.float32)
    for spec in ("pc:steps=5", "pc:fixed_prediction=true,steps=5"):
        algo, got = _step(spec, model, build_loss("cross_entropy"), x, y)
        assert all(g.dtype == torch.float32 for g in got.values())
        d = algo.diagnostics()
        assert math.isfinite(d["pc_energy_last"]) and d["pc_energy_first"] > 0


# ----------------------------------------------------------------------------------------
# diagnostics
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_spec", ["mse", "cross_entropy"])
def test_energy_at_the_forward_pass_is_the_mean_per_sample_loss(loss_spec):
    model, loss = _mlp(), build_loss(loss_spec)
    x, y = _data((6,))
    with torch.no_grad():
        per_sample = float(loss.per_sample(model(x), y).mean())
    for spec in ("pc:steps=4", "pc:fixed_prediction=true,steps=4"):
        algo, _ = _step(spec, model, loss, x, y)
        d = algo.diagnostics()
        assert d["pc_energy_first"] == pytest.approx(per_sample, rel=1e-13)
        assert {k for k in d if k.startswith("pc_error/")} == {"pc_error/layers.0", "pc_error/layers.1",
                                                                  "pc_error/layers.2"}
        # the output's error is dl/dmu at the (fixed or relaxed) output prediction
        if "fixed" in spec:
            with torch.no_grad():
                g = loss.sample_grad(model(x), as_targets(y, model(x)))
            assert d["pc_error/layers.2"] == pytest.approx(float((g.norm() ** 2 / 5).sqrt()), rel=1e-12)


def test_fixed_prediction_reports_the_relaxation_residual_to_the_backprop_equilibrium():
    model, loss = _mlp(), build_loss("mse")
    x, y = _data((6,))
    algo, _ = _step("pc:fixed_prediction=true,steps=3", model, loss, x, y)
    d = algo.diagnostics()
    assert d["relax_residual/layers.0"] > 1e-3 and d["relax_residual/layers.1"] > 1e-3
    algo, _ = _step("pc:fixed_prediction=true,steps=inf", model, loss, x, y)
    assert algo.diagnostics()["relax_residual_max"] == 0.0


# ----------------------------------------------------------------------------------------
# refusals
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec,match", [
    ("pc:steps=inf", r"steps=inf needs fixed_prediction=true"),
    ("pc:eta=2", r"eta=2 must be a number with 0 < eta < 2"),
    ("pc:eta=0", r"eta=0 must be"),
    ("pc:eta=-0.1,fixed_prediction=true", r"eta=-0.1 must be"),
    ("pc:steps=-1", r"steps=-1 must be a non-negative integer"),
    ("pc:steps=2.5", r"steps=2.5 must be"),
    ("pc:init=random", r"init='random' is not valid; choose one of: forward, zero"),
    ("pc:fixed_prediction=maybe", r"fixed_prediction='maybe' must be true or false"),
    ("pc:energy_trace=2", r"energy_trace=2 must be true or false"),
    ("pc:verify=always", r"verify='always' is not valid"),
    ("pc:output_precision=0", r"output_precision=0 must be a positive number"),
    ("pc:output_precision=inf", r"output_precision=inf must be a positive number"),
    ("pc:schedule=sweep", r"schedule"),
])
def test_bad_options_are_refused_with_one_line_errors(spec, match):
    with pytest.raises(ConfigError, match=match) as err:
        build_algorithm(spec, _mlp(), build_loss("mse"))
    assert "\n" not in str(err.value)


class Masked(nn.Module):
    """h * (h > 0): a boolean mask computed from a value node."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.fc1(x))
        return self.fc2(h * (h > 0))


def test_a_tensor_derived_from_a_value_node_is_refused_by_name_without_fixed_prediction():
    torch.manual_seed(0)
    model, loss = Masked().to(DT), build_loss("mse")
    x, y = _data((6,))
    with pytest.raises(ConfigError, match=r"reads 'gt'.*use pc:fixed_prediction=true") as err:
        build_algorithm("pc", model, loss).step(x, y)
    assert "\n" not in str(err.value) and all(p.grad is None for p in model.parameters())
    _, got = _step("pc:fixed_prediction=true,steps=inf", model, loss, x, y)
    ref = _autograd(model, loss, x, y)
    for k in ref:
        assert _rel(got[k], ref[k]) < TOL, k


class PythonState(nn.Module):
    """torch.fx bakes ``self.calls`` (1 at tracing) into the graph, so the trace is not model(x)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.fc(x) * self.calls


@pytest.mark.parametrize("spec", ["pc:steps=3", "pc:fixed_prediction=true,steps=3"])
def test_first_step_guard_refuses_a_trace_that_is_not_the_module(spec):
    torch.manual_seed(0)
    model = PythonState().to(DT)
    with pytest.raises(ConfigError, match=r"pc verify=first: the forward pass .* differs from model\(x\)"):
        build_algorithm(spec, model, build_loss("mse")).step(*_data((4,)))
    assert all(p.grad is None for p in model.parameters())
    model.calls = 0
    build_algorithm(spec + ",verify=off", model, build_loss("mse")).step(*_data((4,)))  # skipped on request


# ----------------------------------------------------------------------------------------
# data-parallel: two ranks sharing a global batch train exactly as one process
# ----------------------------------------------------------------------------------------
BASE = {
    "dataset": "fake:n=60,classes=3,shape=1x4x4,test=20", "val_size": 12, "batch_size": 15, "epochs": 2,
    "dtype": "float64", "threads": 1, "log_every": 2, "distributed": {"check_every": 1, "timeout_s": 60},
    "loss": "cross_entropy", "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
}
DP_CASES = {
    "pc": {"algo": "pc:steps=10,eta=0.1", "model": {"arch": "16-10-8-3", "act": "tanh"}},
    "pc-fixed": {"algo": "pc:fixed_prediction=true,steps=10,eta=0.2", "loss": "mse",
                 "model": {"arch": "16-10-8-3", "act": "relu", "bias": False}},
    "pc-resmlp": {"algo": "pc:steps=5", "model": {"name": "resmlp", "options": {"hidden": 8}}},
}


def _dp_config(name: str) -> dict:
    return {**json.loads(json.dumps(BASE)), **DP_CASES[name]}


def test_two_ranks_equal_one_process_with_the_same_global_batch(tmp_path):
    out = tmp_path / "dist"
    out.mkdir()
    (out / "configs.json").write_text(json.dumps({n: _dp_config(n) for n in DP_CASES}))
    res = torchrun([str(ROOT / "tests" / "dist_worker.py"), str(out / "configs.json"), str(out)])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for name in DP_CASES:
        single = train(_dp_config(name), tmp_path / f"single-{name}", progress=False)
        assert single["epochs"] == 2
        assert_same_run(out / name, tmp_path / f"single-{name}")
        rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        one = [json.loads(line) for line in (tmp_path / f"single-{name}" / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in rows if r.get("kind") == "step"]
        assert steps and all("pc_energy_last" in r for r in steps)
        for a, b in zip(steps, [r for r in one if r.get("kind") == "step"]):  # the global batch's energy
            assert a["pc_energy_first"] == pytest.approx(b["pc_energy_first"], rel=1e-9)
            assert a["pc_energy_last"] == pytest.approx(b["pc_energy_last"], rel=1e-9)


@pytest.mark.parametrize("name,shape", [("mlp", (6,)), ("fanout3", (6,)), ("conv-pool", (2, 6, 6))])
@pytest.mark.parametrize("init", ["forward", "zero"])
def test_fixed_prediction_closed_form_equals_the_step_by_step_relaxation(name, shape, init):
    # energy_trace=true runs the iteration step by step; without it the updates come from graph
    # AR's closed form, and F at both ends must agree with the trace's ends
    loss = build_loss("cross_entropy")
    x, y = _data(shape)
    model = _mlp() if name == "mlp" else _graph(name, shape)
    for steps in (1, 7, 40):
        a, closed = _step(f"pc:fixed_prediction=true,steps={steps},init={init}", model, loss, x, y)
        b, stepped = _step(f"pc:fixed_prediction=true,steps={steps},init={init},energy_trace=true", model, loss, x, y)
        for k in closed:
            assert _rel(closed[k], stepped[k]) < 1e-12, (steps, k)
        ea, eb = a.energy_trace(), b.energy_trace()
        assert len(ea) == 2 and len(eb) == steps + 1
        assert ea[0] == pytest.approx(eb[0], rel=1e-13) and ea[1] == pytest.approx(eb[-1], rel=1e-11)
        assert ("pc_energy_max" in a.diagnostics()) == (steps == 1) and b.diagnostics()["pc_energy_max"] == max(eb)
