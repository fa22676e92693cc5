"""Graph Activation Relaxation (AR paper, Appendix A) against its oracles: autograd gradients
at equilibrium, the closed form against step-by-step simulation, the MLP ``ar`` on a chain,
and feedback / no-derivative variants against autograd with modified backward functions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from creditlab.algorithms import build_algorithm
from creditlab.algorithms.ar import ActivationRelaxation, relaxation_weights
from creditlab.algorithms.graph_ar import (
    GraphActivationRelaxation,
    relax_graph_exact,
    relax_graph_simulate,
    tail_weights,
)
from creditlab.errors import ConfigError
from creditlab.losses import build_loss
from creditlab.models import MLP, build_named_model

DT = torch.float64
GRAPHS = [
    ("resmlp", (6,)),
    ("branch-add", (6,)),
    ("branch-concat", (6,)),
    ("fanout3", (6,)),
    ("conv-pool", (2, 6, 6)),
]


def _data(shape: tuple[int, ...], n: int = 5, classes: int = 3, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=DT), torch.randint(0, classes, (n,), generator=g)


def _autograd(model: nn.Module, loss, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    model.zero_grad(set_to_none=True)
    loss(model(x), y).backward()
    out = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


def _step_grads(algo, model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    model.zero_grad(set_to_none=True)
    algo.step(x, y)
    return {k: p.grad.clone() for k, p in model.named_parameters()}


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _model(name: str, shape: tuple[int, ...], seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return build_named_model(name, shape, 3).to(DT)


@pytest.mark.parametrize("name,shape", GRAPHS)
@pytest.mark.parametrize("loss_spec", ["mse", "cross_entropy"])
def test_graph_ar_equilibrium_equals_autograd_gradients(name, shape, loss_spec):
    model, loss = _model(name, shape), build_loss(loss_spec)
    x, y = _data(shape)
    ref = _autograd(model, loss, x, y)
    algo = build_algorithm("ar:steps=inf", model, loss)  # ar on a non-MLP dispatches to graph AR
    assert isinstance(algo, GraphActivationRelaxation)
    got = _step_grads(algo, model, x, y)
    for k in ref:
        assert _rel(got[k], ref[k]) < 1e-12, k


@pytest.mark.parametrize("name,shape", GRAPHS)
@pytest.mark.parametrize("schedule", ["synchronous", "sweep"])
@pytest.mark.parametrize("init", ["forward", "zero"])
def test_exact_relaxation_equals_step_by_step_simulation(name, shape, schedule, init):
    model, loss = _model(name, shape), build_loss("mse")
    x, y = _data(shape)
    algo = GraphActivationRelaxation(model, loss)
    with torch.no_grad():
        env = algo.forward_values(x)
        out = env[algo.out_node.name]
        rel, _ = algo.build(env, loss.grad(out, y))
        x0 = {u: env[u] for u in rel.free} if init == "forward" else None
        for T in (1, 7, 100):
            exact = relax_graph_exact(rel, x0, T, 0.1, schedule)
            sim = relax_graph_simulate(rel, x0, T, 0.1, schedule)
            assert set(exact) == set(sim) == set(rel.order)
            for u in rel.order:
                assert _rel(exact[u], sim[u]) < 1e-11, (T, u)


@pytest.mark.parametrize("schedule", ["synchronous", "sweep"])
def test_exact_and_simulate_modes_give_the_same_updates(schedule):
    model, loss = _model("resmlp", (6,)), build_loss("mse")
    x, y = _data((6,))
    e = _step_grads(GraphActivationRelaxation(model, loss, mode="exact", steps=7, schedule=schedule), model, x, y)
    s = _step_grads(GraphActivationRelaxation(model, loss, mode="simulate", steps=7, schedule=schedule), model, x, y)
    ref = _autograd(model, loss, x, y)
    for k in e:
        assert _rel(e[k], s[k]) < 1e-12, k
    assert any(_rel(e[k], ref[k]) > 1e-3 for k in e)  # 7 steps are not yet at equilibrium


def test_long_relaxation_converges_to_the_fixed_point():
    model, loss = _model("fanout3", (6,)), build_loss("mse")
    x, y = _data((6,))
    ref = _autograd(model, loss, x, y)
    got = _step_grads(GraphActivationRelaxation(model, loss, steps=3000, eta=0.1), model, x, y)
    for k in ref:
        assert _rel(got[k], ref[k]) < 1e-10, k


def test_tail_weights_match_one_minus_partial_sums():
    for sched in ("synchronous", "sweep"):
        for T in (1, 7, 100):
            w = relaxation_weights(T, 0.1, sched, 12)
            tail = tail_weights(T, 0.1, sched, 12)
            for m in range(13):
                assert abs(tail[m] - (1.0 - sum(w[: m + 1]))) < 1e-14


# ---------------------------------------------------------------------------------------
# the chain graph is the MLP
# ---------------------------------------------------------------------------------------
CHAIN_OPTIONS = [
    "steps=inf",
    "steps=1", "steps=7", "steps=100",
    "steps=1,schedule=sweep", "steps=7,schedule=sweep", "steps=100,schedule=sweep",
    "steps=100,init=zero", "steps=100,init=zero,schedule=sweep",
    "steps=7,mode=simulate", "steps=7,mode=simulate,schedule=sweep,init=zero",
    "steps=7,derivative=false", "steps=7,update_derivative=false",
    "steps=7,feedback=learned", "steps=7,feedback=random,schedule=sweep",
]


@pytest.mark.parametrize("opts", CHAIN_OPTIONS)
def test_chain_graph_reproduces_mlp_ar(opts):
    torch.manual_seed(3)
    mlp = MLP("6-5-4-4-3", act="tanh", out_act="linear").to(DT)
    loss = build_loss("mse")
    x, y = _data((6,))
    mlp_ar = build_algorithm(f"ar:{opts}", mlp, loss)
    assert isinstance(mlp_ar, ActivationRelaxation)
    graph = build_algorithm(f"graph_ar:{opts}", mlp, loss)
    if mlp_ar.feedback is not None:  # same backward weights in both
        assert len(graph.feedback) == len(mlp_ar.feedback)
        with torch.no_grad():
            for l, key in enumerate(f"layers_{i}" for i in range(1, len(mlp.layers))):
                graph.feedback[key].copy_(mlp_ar.feedback[l])
    a = _step_grads(mlp_ar, mlp, x, y)
    fa = [p.grad.clone() for p in mlp_ar.feedback] if "learned" in opts else []
    b = _step_grads(graph, mlp, x, y)
    for k in a:
        assert _rel(b[k], a[k]) < 1e-12, k
    if "learned" in opts:
        for l, key in enumerate(f"layers_{i}" for i in range(1, len(mlp.layers))):
            assert _rel(graph.feedback[key].grad, fa[l]) < 1e-12


# ---------------------------------------------------------------------------------------
# variants against autograd with modified backward functions
# ---------------------------------------------------------------------------------------
class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1, stride=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(4 * 3 * 3, 5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.conv1(x))
        h = self.pool(torch.tanh(self.conv2(h)))
        return self.fc2(torch.tanh(self.fc1(torch.flatten(h, 1))))


class _FBLinear(torch.autograd.Function):
    """Linear whose input gradient goes through B instead of W (weight gradient unchanged)."""

    @staticmethod
    def forward(ctx, x, w, b, back):
        ctx.save_for_backward(x, back)
        return F.linear(x, w, b)

    @staticmethod
    def backward(ctx, g):
        x, back = ctx.saved_tensors
        return g @ back, g.t() @ x, g.sum(0), None


class _FBConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, back):
        ctx.save_for_backward(x, w, back)
        return F.conv2d(x, w, b, padding=1)

    @staticmethod
    def backward(ctx, g):
        x, w, back = ctx.saved_tensors
        gx = torch.nn.grad.conv2d_input(x.shape, back, g, padding=1)
        gw = torch.nn.grad.conv2d_weight(x, w.shape, g, padding=1)
        return gx, gw, g.sum((0, 2, 3)), None


class _StraightTanh(torch.autograd.Function):
    """tanh forward, identity backward: dropping f' (Eqs. 7-8)."""

    @staticmethod
    def forward(ctx, a):
        return torch.tanh(a)

    @staticmethod
    def backward(ctx, g):
        return g


def _oracle(m: SmallCNN, x: Tensor, backs: dict[str, Tensor], drop: set[str]) -> Tensor:
    act = {k: (_StraightTanh.apply if k in drop else torch.tanh) for k in ("conv", "fc")}
    h = act["conv"](F.conv2d(x, m.conv1.weight, m.conv1.bias, padding=1))
    h = m.pool(act["conv"](_FBConv.apply(h, m.conv2.weight, m.conv2.bias, backs["conv2"])))
    h = act["fc"](_FBLinear.apply(torch.flatten(h, 1), m.fc1.weight, m.fc1.bias, backs["fc1"]))
    return _FBLinear.apply(h, m.fc2.weight, m.fc2.bias, backs["fc2"])


@pytest.mark.parametrize("feedback", ["transpose", "random", "learned"])
@pytest.mark.parametrize("derivative", [True, False, "no_conv", "no_fc"])
def test_feedback_and_no_derivative_variants_equal_autograd_with_modified_backward(feedback, derivative):
    torch.manual_seed(5)
    model, loss = SmallCNN().to(DT), build_loss("mse")
    x, y = _data((2, 6, 6), n=4)
    algo = GraphActivationRelaxation(model, loss, steps=math.inf, feedback=feedback,
                                     derivative=derivative, update_derivative=derivative)
    assert sorted(algo.feedback.keys()) == ([] if feedback == "transpose" else ["conv2", "fc1", "fc2"])
    backs = {k: algo.backward_weight(k).detach() for k in ("conv2", "fc1", "fc2")}
    # backward weights: W itself (transpose) or psi with W's transposed shape
    for k in backs:
        w = getattr(model, k).weight
        if feedback == "transpose":
            assert backs[k] is not None and torch.equal(backs[k], w.detach())
        else:
            assert algo.feedback[k].shape == w.transpose(0, 1).shape and not torch.equal(backs[k], w.detach())
    drop = {True: set(), False: {"conv", "fc"}, "no_conv": {"conv"}, "no_fc": {"fc"}}[derivative]
    model.zero_grad(set_to_none=True)
    loss(_oracle(model, x, backs, drop), y).backward()
    ref = {k: p.grad.clone() for k, p in model.named_parameters()}
    got = _step_grads(algo, model, x, y)
    for k in ref:
        assert _rel(got[k], ref[k]) < 1e-12, k
    if feedback == "learned":  # psi gets the weight update transposed (Eq. 6)
        for k in backs:
            assert torch.equal(algo.feedback[k].grad, getattr(model, k).weight.grad.transpose(0, 1))
        assert algo.param_groups(0.1)[0]["params"] == list(algo.feedback.values())
    else:
        assert algo.param_groups(0.1) == []
        assert all(p.grad is None for p in algo.feedback.values())


def test_feedback_state_dict_round_trip_and_alignment_diagnostics():
    torch.manual_seed(0)
    model, loss = SmallCNN().to(DT), build_loss("mse")
    a = GraphActivationRelaxation(model, loss, feedback="random")
    b = GraphActivationRelaxation(model, loss, feedback="random")
    assert not torch.equal(a.feedback["fc1"], b.feedback["fc1"])
    b.load_state_dict(a.state_dict())
    for k in a.feedback:
        assert torch.equal(a.feedback[k], b.feedback[k])
    diag = a.diagnostics()
    assert set(diag) >= {"feedback_angle_deg/conv2", "feedback_angle_deg/fc1", "feedback_angle_deg/fc2"}
    assert 0.0 < diag["feedback_angle_deg/fc1"] < 180.0


def test_max_pool_routes_the_state_to_the_argmax():
    model, loss = _model("conv-pool", (2, 6, 6)), build_loss("mse")
    x, y = _data((2, 6, 6))
    algo = GraphActivationRelaxation(model, loss, steps=math.inf)
    with torch.no_grad():
        env = algo.forward_values(x)
        rel, _ = algo.build(env, loss.grad(env[algo.out_node.name], y))
        states = relax_graph_exact(rel, None, math.inf, 0.1, "synchronous")
    conv_state = states["f"]  # fused conv + tanh unit, the pool's input
    windows = F.unfold(conv_state, 2, stride=2)  # (B, C*4, n_windows)
    per_window = (windows.reshape(5, 4, 4, -1) != 0).sum(2)
    assert per_window.max() == 1 and per_window.sum() > 0
    _, idx = F.max_pool2d(env["f"], 2, return_indices=True)
    flat = conv_state.flatten(2)
    assert torch.equal((flat != 0), torch.zeros_like(flat, dtype=torch.bool).scatter(2, idx.flatten(2), True))


def test_mlp_traced_as_graph_has_exactly_the_mlp_states():
    mlp = MLP("6-5-4-3", act="tanh").to(DT)
    algo = GraphActivationRelaxation(mlp, build_loss("mse"))
    x, y = _data((6,))
    with torch.no_grad():
        env = algo.forward_values(x)
        rel, _ = algo.build(env, algo.loss.grad(env[algo.out_node.name], y))
        trace = mlp.trace(x)
    assert len(rel.order) == len(mlp.layers)
    for name, xl in zip(rel.order, trace.xs[1:]):
        assert torch.equal(rel.forward[name], xl)


class GenericOps(nn.Module):
    """Operations without a fast path (autograd VJPs): functional max-pool and avg-pool,
    LayerNorm (module parameters through the generic parameter VJP), a bare parameter used
    by a product (get_attr), broadcasting add of a bias row, mean over a dimension."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.norm = nn.LayerNorm(12)
        self.scale = nn.Parameter(torch.randn(12))
        self.row = nn.Parameter(torch.randn(1, 12))
        self.fc = nn.Linear(12, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = F.max_pool2d(torch.sigmoid(self.conv(x)), 2, stride=1)  # (B, 3, 5, 5)
        h = F.avg_pool2d(h, 2, stride=1)  # (B, 3, 4, 4)
        h = h.mean(dim=3).reshape(x.shape[0], 12)
        h = torch.tanh(self.norm(h)) * self.scale + self.row
        return self.fc(F.gelu(h)) + h.sum(1, keepdim=True)


@pytest.mark.parametrize("schedule", ["synchronous", "sweep"])
def test_generic_operations_relax_to_autograd_gradients(schedule):
    torch.manual_seed(2)
    model, loss = GenericOps().to(DT), build_loss("cross_entropy")
    x, y = _data((2, 6, 6))
    ref = _autograd(model, loss, x, y)
    got = _step_grads(build_algorithm("ar:steps=inf", model, loss), model, x, y)
    assert set(got) == set(ref)
    for k in ref:
        assert _rel(got[k], ref[k]) < 1e-12, k
    algo = GraphActivationRelaxation(model, loss, schedule=schedule, init="zero")
    e = _step_grads(algo, model, x, y)
    s = _step_grads(GraphActivationRelaxation(model, loss, schedule=schedule, init="zero", mode="simulate"), model, x, y)
    for k in e:
        assert _rel(e[k], s[k]) < 1e-11, k


# ---------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------
class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


def test_untraceable_module_is_refused_naming_the_offending_operation():
    with pytest.raises(ConfigError) as err:
        build_algorithm("ar", DataDependent(), build_loss("mse"))
    msg = str(err.value)
    assert "if x.sum() > 0" in msg and "DataDependent" in msg and "torch.where" in msg


def test_bad_options_are_refused():
    model, loss = _model("resmlp", (6,)), build_loss("mse")
    with pytest.raises(ConfigError, match="derivative"):
        GraphActivationRelaxation(model, loss, derivative="sometimes")
    with pytest.raises(ConfigError, match="simulate"):
        GraphActivationRelaxation(model, loss, mode="simulate", steps=math.inf)
    with pytest.raises(ConfigError, match="unknown option"):
        build_algorithm("ar:derivative_layers=conv", model, loss)


def test_ar_on_an_mlp_keeps_the_mlp_implementation():
    algo = build_algorithm("ar", MLP("6-4-3"), build_loss("mse"))
    assert type(algo) is ActivationRelaxation


def test_cnn_models_accept_mnist_and_cifar_shapes():
    for name in ("ar-cnn", "lenet5"):
        for shape in ((1, 28, 28), (3, 32, 32)):
            model = build_named_model(name, shape, 10)
            assert model(torch.zeros(2, *shape)).shape == (2, 10)
    cnn = build_named_model("ar-cnn", (3, 32, 32), 10)
    linears = [m for m in cnn.modules() if isinstance(m, nn.Linear)]
    convs = [m for m in cnn.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64] and [c.kernel_size for c in convs] == [(5, 5)] * 2
    assert [(l.in_features, l.out_features) for l in linears] == [(4096, 64), (64, 120), (120, 10)]
    with pytest.raises(ConfigError, match="image"):
        build_named_model("lenet5", (784,), 10)


def test_check_command_path_reports_zero_error_for_graph_models_and_user_factories():
    from creditlab.check import run_check

    for model, shape in (("resmlp", (6,)), ("creditlab.models.ar_nets:lenet5", (1, 28, 28))):
        res = run_check("ar:steps=inf", model=model, dtype="float64", batch=4, in_shape=shape, classes=3)
        assert res["algo"].startswith("graph_ar") and len(res["layers"]) >= 3
        assert all(r["rel_error"] < 1e-12 for r in res["layers"]), res["layers"]


@pytest.mark.parametrize("spec", ["ar:steps=inf", "ar:steps=7,feedback=learned", "ar:init=zero,schedule=sweep"])
def test_frozen_parameters_keep_grad_none(spec):
    torch.manual_seed(5)
    model, loss = SmallCNN().to(DT), build_loss("mse")
    for p in (model.conv2.weight, model.fc1.bias, model.fc2.weight):
        p.requires_grad_(False)
    x, y = _data((2, 6, 6), n=4)
    ref = _autograd_trainable(model, loss, x, y)
    model.zero_grad(set_to_none=True)
    build_algorithm(spec, model, loss).step(x, y)
    frozen = {k for k, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"conv2.weight", "fc1.bias", "fc2.weight"}
    for k, p in model.named_parameters():
        assert (p.grad is None) == (k in frozen), k
        if spec == "ar:steps=inf" and k not in frozen:
            assert _rel(p.grad, ref[k]) < 1e-12, k


def _autograd_trainable(model: nn.Module, loss, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    gs = torch.autograd.grad(loss(model(x), y), [p for _, p in named])
    return {k: g for (k, _), g in zip(named, gs)}


def test_graph_ar_package_does_not_import_ar_and_the_registry_finds_both():
    import subprocess
    import sys

    code = ("import sys\nimport creditlab.algorithms.graph_ar\n"
            "assert 'creditlab.algorithms.ar' not in sys.modules, 'graph_ar imports ar'\n"
            "from creditlab.algorithms import algorithm_class\n"
            "from creditlab.algorithms.graph_ar import GraphActivationRelaxation\n"
            "assert algorithm_class('graph_ar') is GraphActivationRelaxation\n"
            "assert algorithm_class('ar').__module__ == 'creditlab.algorithms.ar'\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
