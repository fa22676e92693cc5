"""The relaxation residual (issue 18, §5): after the relaxation, per state, ||x_i(T) - x_i*|| /
||x_i*|| from its equilibrium, reported by ``diagnostics()`` of graph AR and of the MLP ``ar``
and logged by the training loop. On a chain with init=zero a state with d states between it
and the clamped output reaches 1 - sum_{k<=d} w_k of its equilibrium, so its residual is
sum_{k<=d} w_k = P(Binomial(T, eta) <= d) (synchronous; the negative-binomial sum for sweep); 0
for steps=inf; never a value computed with parameters other than the step's."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import Tensor, nn

from creditlab.algorithms import build_algorithm
from creditlab.algorithms.graph_ar import GraphActivationRelaxation, relax_graph_simulate
from creditlab.losses import build_loss
from creditlab.models import MLP, build_named_model

DT = torch.float64


def _chain() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 7), nn.Tanh(), nn.Linear(7, 9), nn.Tanh(),
                         nn.Linear(9, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)


def _mlp() -> MLP:
    torch.manual_seed(0)
    return MLP([6, 8, 7, 9, 5, 3], "tanh", "linear", bias=True, init="xavier").to(DT)


def _data(n_in: int = 6, n: int = 5) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, n_in, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


def _cdf(T: int, eta: float, schedule: str, d: int) -> float:
    """sum_{k<=d} w_k, computed here from the binomial / negative-binomial pmf."""
    if schedule == "synchronous":
        return sum(math.comb(T, k) * (1 - eta) ** (T - k) * eta**k for k in range(d + 1))
    return sum((1 - eta) ** T * math.comb(T + k - 1, k) * eta**k for k in range(d + 1))


# the chain's hidden states by the layer producing them, with d (states between it and the output)
CHAINS = {"graph": (_chain, {"0": 3, "2": 2, "4": 1, "6": 0}),
          "mlp": (_mlp, {"layers.0": 3, "layers.1": 2, "layers.2": 1, "layers.3": 0})}


@pytest.mark.parametrize("kind", ["graph", "mlp"])
@pytest.mark.parametrize("schedule", ["synchronous", "sweep"])
@pytest.mark.parametrize("T,eta", [(7, 0.1), (100, 0.1), (20, 0.3)])
def test_residual_on_a_chain_from_zero_is_the_binomial_cdf(kind, schedule, T, eta):
    make, dist = CHAINS[kind]
    model, loss = make(), build_loss("mse")
    x, y = _data()
    algo = build_algorithm(f"ar:steps={T},eta={eta},init=zero,schedule={schedule}", model, loss)
    assert isinstance(algo, GraphActivationRelaxation) == (kind == "graph")
    algo.step(x, y)
    diag = algo.diagnostics()
    got = {k.split("/", 1)[1]: v for k, v in diag.items() if k.startswith("relax_residual/")}
    assert set(got) == set(dist)
    for name, d in dist.items():
        want = _cdf(T, eta, schedule, d)
        assert abs(got[name] - want) <= 1e-9 * want, (name, got[name], want)
    assert diag["relax_residual_max"] == max(got.values())


@pytest.mark.parametrize("kind", ["graph", "mlp"])
def test_residual_at_the_fixed_point_is_zero(kind):
    model, loss = CHAINS[kind][0](), build_loss("mse")
    x, y = _data()
    algo = build_algorithm("ar:steps=inf", model, loss)
    algo.step(x, y)
    res = algo.relaxation_residuals()
    assert res and set(res) == set(CHAINS[kind][1]) and all(v == 0.0 for v in res.values())


def test_residual_is_zero_for_steps_inf_on_a_resnet():
    model = build_named_model("resnet20", (3, 8, 8), 3, width=2).to(DT)
    x = torch.randn(3, 3, 8, 8, dtype=DT)
    algo = build_algorithm("ar:steps=inf", model, build_loss("cross_entropy"))
    algo.step(x, torch.tensor([0, 1, 2]))
    res = algo.relaxation_residuals()
    assert len(res) == len(algo._plan.relaxed) - 1 and all(v == 0.0 for v in res.values())
    assert "stages.0.0.conv1" in res and "stages.0.0.bn1" in res  # units by their module names


@pytest.mark.parametrize("schedule", ["synchronous", "sweep"])
def test_residual_from_the_forward_state_against_autograd_and_simulation(schedule):
    """init=forward: x(T) from the step-by-step simulation, x* = dL/dx_i by autograd (retained
    gradients of the intermediate outputs), the residual of the exact-mode step equal to theirs."""
    model, loss = _chain(), build_loss("mse")
    x, y = _data()
    T = 30
    algo = GraphActivationRelaxation(model, loss, steps=T, schedule=schedule)
    algo.step(x, y)
    got = algo.relaxation_residuals()
    outs: dict[str, Tensor] = {}
    h = x
    for i, m in enumerate(model):
        h = m(h)
        if isinstance(m, nn.Tanh):
            h.retain_grad()
            outs[str(i - 1)] = h  # the state of the unit (Linear i - 1, Tanh i)
    loss(h, y).backward()
    with torch.no_grad():
        env = algo.forward_values(x)
        rel, _ = algo.build(env, loss.grad(env[algo.out_node.name], y))
        sim = relax_graph_simulate(rel, {u: env[u] for u in rel.free}, T, 0.1, schedule)
    for u in rel.free:
        name = algo.unit_label(u)
        star = outs[name].grad
        want = float((sim[u] - star).norm() / star.norm())
        assert abs(got[name] - want) <= 1e-9 * want, (name, got[name], want)
    assert 0 < min(got.values())


@pytest.mark.parametrize("init", ["forward", "zero"])
def test_exact_and_simulate_report_the_same_residual_on_a_resnet(init):
    x = torch.randn(3, 3, 8, 8, dtype=DT, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 2])
    res = {}
    for mode in ("exact", "simulate"):
        torch.manual_seed(0)
        model = build_named_model("resnet20", (3, 8, 8), 3, width=2).to(DT)
        algo = build_algorithm(f"ar:mode={mode},steps=25,init={init}", model, build_loss("cross_entropy"))
        algo.step(x, y)
        res[mode] = algo.relaxation_residuals()
    assert set(res["exact"]) == set(res["simulate"])
    for k, v in res["exact"].items():
        assert abs(v - res["simulate"][k]) <= 1e-9 * max(v, 1e-300), k
    assert max(res["exact"].values()) > 1e-3  # T = 25 does not reach the deep states


@pytest.mark.parametrize("kind", ["graph", "mlp"])
def test_residual_is_never_computed_with_updated_parameters(kind):
    model, loss = CHAINS[kind][0](), build_loss("mse")
    x, y = _data()
    algo = build_algorithm("ar:steps=5", model, loss)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    algo.step(x, y)
    opt.step()  # the weights moved: the step's Jacobians are gone
    assert algo.relaxation_residuals() is None
    assert not any(k.startswith("relax_residual") for k in algo.diagnostics())
    algo.step(x, y)  # as the training loop does on a logged step: diagnostics(), then the update
    assert algo.reported_updates() is None
    before = dict(algo.relaxation_residuals())
    opt.step()
    diag = algo.diagnostics()
    assert {k.split("/", 1)[1]: v for k, v in diag.items() if k.startswith("relax_residual/")} == before


def test_the_training_loop_logs_the_residual(tmp_path):
    from creditlab.train import train

    cfg = {"dataset": "fake:n=16,classes=10,shape=3x8x8,test=8", "model": {"name": "resnet20", "options": {"width": 2}},
           "algo": "ar:init=zero", "optimizer": {"name": "sgd", "lr": 0.01}, "epochs": 1, "batch_size": 8,
           "log_every": 1, "threads": 1}
    train(cfg, tmp_path, progress=False)
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r.get("kind") == "step"]
    assert len(steps) == 2
    for r in steps:
        res = {k.split("/", 1)[1]: v for k, v in r.items() if k.startswith("relax_residual/")}
        assert len(res) > 50 and r["relax_residual_max"] == max(res.values()) > 0
        assert "fc" not in res  # the clamped output
        # the pooling below it, d = 0 (float32: 1 - 0.9**100 holds 0.9**100 to about 6e-8 / 2.7e-5)
        assert res["mean"] == pytest.approx(0.9**100, rel=5e-3)

