"""The first-step guard (``verify=first``) of graph AR and the MLP ``ar``: a traced forward
that departs from ``model(x)`` is refused naming the node, equilibrium updates that depart
from autograd are refused naming the parameter, whatever the run's variant; the guard runs
once, consumes no training randomness, leaves buffers as one forward pass left them, and
raises no false alarm in float32."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from creditlab.algorithms import _verify, build_algorithm
from creditlab.algorithms.graph_ar import GraphActivationRelaxation
from creditlab.errors import ConfigError
from creditlab.losses import build_loss
from creditlab.models import MLP, build_named_model

DT = torch.float64


def _data(shape, n=5, classes=3, seed=0, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=dtype), torch.randint(0, classes, (n,), generator=g)


class PythonState(nn.Module):
    """Python-level state: torch.fx bakes ``self.calls`` (1 at tracing) into the graph."""

    def __init__(self, inplace: bool = False):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.calls = 0
        self.inplace = inplace

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        h = self.fc(x)
        if self.inplace:
            h = h.relu_()  # functionalized for the trace; eager runs it in place
        return h * self.calls


@pytest.mark.parametrize("spec", ["ar:steps=inf", "ar:steps=7,feedback=random"])
def test_traced_forward_that_differs_from_the_module_is_refused_naming_the_node(spec):
    torch.manual_seed(0)
    model = PythonState().to(DT)
    x, y = _data((4,))
    algo = build_algorithm(spec, model, build_loss("mse"))
    with pytest.raises(ConfigError, match=r"differs from model\(x\).*first at node 'mul'") as err:
        algo.step(x, y)
    assert "verify=off" in str(err.value)
    assert all(p.grad is None for p in model.parameters())  # refused updates are not left behind


def test_divergence_message_lists_the_inplace_operations_model_runs():
    torch.manual_seed(0)
    model = PythonState(inplace=True).to(DT)
    with pytest.raises(ConfigError, match=r"first at node 'mul'.*in-place operations \(relu_\)"):
        build_algorithm("ar", model, build_loss("mse")).step(*_data((4,)))


def _break_vjp_of(monkeypatch, unit_name: str) -> None:
    """Simulate an operation the relaxation does not handle: its pushes are dropped."""
    real = GraphActivationRelaxation._make_push

    def broken(self, u, *args, **kwargs):
        push = real(self, u, *args, **kwargs)
        return (lambda rows: {k: [0 * t for t in v] for k, v in push(rows).items()}) if u.name == unit_name else push

    monkeypatch.setattr(GraphActivationRelaxation, "_make_push", broken)


@pytest.mark.parametrize("spec", ["ar:steps=inf", "ar:steps=7", "ar:feedback=random,derivative=false",
                                  "ar:feedback=learned,init=zero,schedule=sweep", "ar:mode=simulate,steps=3"])
def test_equilibrium_that_differs_from_autograd_is_refused_naming_the_parameter(monkeypatch, spec):
    torch.manual_seed(1)
    model = build_named_model("resmlp", (6,), 3).to(DT)
    x, y = _data((6,))
    algo = build_algorithm(spec, model, build_loss("mse"))
    with torch.no_grad():
        env = algo.forward_values(x)
        rel, _ = algo.build(env, algo.loss.grad(env[algo.out_node.name], y))
    _break_vjp_of(monkeypatch, rel.order[1])  # the unit above the first layer
    with pytest.raises(ConfigError, match=r"equilibrium update of parameter '[\w.]+' \(used by node '\w+'\) differs "
                                          r"from autograd's gradient.*relative error [0-9.]+e[-+][0-9]+ > 1e-08 for float64"):
        algo.step(x, y)


def test_verify_off_skips_the_guard(monkeypatch):
    torch.manual_seed(1)
    model = build_named_model("resmlp", (6,), 3).to(DT)
    x, y = _data((6,))
    algo = build_algorithm("ar:steps=inf,verify=off", model, build_loss("mse"))
    assert algo.options["verify"] == "off"
    _break_vjp_of(monkeypatch, "fc")
    algo.step(x, y)  # the broken update goes through unchecked
    with pytest.raises(ConfigError, match="option verify=.always. is not valid; choose one of: first, off"):
        build_algorithm("ar:verify=always", model, build_loss("mse"))


@pytest.mark.parametrize("model_spec", ["mlp", "resmlp"])
def test_guard_runs_once(monkeypatch, model_spec):
    torch.manual_seed(1)
    model = (MLP("6-5-4-3", act="tanh") if model_spec == "mlp" else build_named_model("resmlp", (6,), 3)).to(DT)
    calls = []
    real = _verify.autograd_gradients
    monkeypatch.setattr(_verify, "autograd_gradients", lambda *a: calls.append(1) or real(*a))
    algo = build_algorithm("ar", model, build_loss("mse"))
    for seed in range(3):
        algo.step(*_data((6,), seed=seed))
    assert len(calls) == 1


class Stateful(nn.Module):
    """Running statistics updated by the forward pass (BatchNorm), and randomness the relaxation
    holds fixed (dropout)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 5), nn.Linear(5, 3)
        self.norm, self.drop = nn.BatchNorm1d(5), nn.Dropout(0.3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(torch.tanh(self.norm(self.fc1(x)))))


@pytest.mark.parametrize("spec", ["ar:steps=inf", "ar:steps=5,feedback=random"])
def test_guard_consumes_no_randomness_and_updates_buffers_once(spec):
    x, y = _data((6,))
    states = []
    for verify in ("first", "off"):
        torch.manual_seed(2)
        model = Stateful().to(DT)
        algo = build_algorithm(f"{spec},verify={verify}", model, build_loss("mse"))
        algo.step(x, y)
        states.append((torch.get_rng_state(), [b.clone() for b in model.buffers()],
                       [p.grad.clone() for p in model.parameters()]))
    (rng_a, bufs_a, grads_a), (rng_b, bufs_b, grads_b) = states
    assert torch.equal(rng_a, rng_b)
    assert int(bufs_a[-1]) == 1 and all(torch.equal(a, b) for a, b in zip(bufs_a, bufs_b))  # one batch tracked
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))


class UntracedBufferUpdate(nn.Module):
    """``self.count.add_(1)`` runs on the real buffer while tracing and is not in the graph."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)
        self.register_buffer("count", torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        self.count.add_(1.0)
        return self.fc(x)


def test_a_buffer_update_torch_fx_does_not_record_is_refused_naming_the_buffer():
    model = UntracedBufferUpdate().to(DT)
    with pytest.raises(ConfigError, match=r"modifies 'count' with an operation torch.fx does not record"):
        build_algorithm("ar", model, build_loss("mse"))
    assert float(model.count) == 0.0  # tracing left the buffer as it was


@pytest.mark.parametrize("name,shape", [("resmlp", (6,)), ("fanout3", (6,)), ("conv-pool", (2, 6, 6)),
                                        ("lenet5", (1, 28, 28))])
@pytest.mark.parametrize("spec", ["ar", "ar:steps=inf", "ar:init=zero,schedule=sweep"])
def test_no_false_alarm_in_float32(name, shape, spec):
    torch.manual_seed(3)
    model = build_named_model(name, shape, 10)
    x, y = _data(shape, n=16, classes=10, dtype=torch.float32)
    for loss in ("mse", "cross_entropy"):
        algo = build_algorithm(spec, model, build_loss(loss))
        algo.step(x, y)
        assert algo._verified


def test_mlp_ar_guard_refuses_a_wrong_derivative_naming_the_parameter():
    torch.manual_seed(4)
    mlp = MLP("6-5-4-3", act="tanh").to(DT)
    x, y = _data((6,))
    algo = build_algorithm("ar:steps=20,feedback=random", mlp, build_loss("mse"))
    algo.step(x, y)  # a correct MLP passes, whatever the variant
    assert algo._verified
    wrong = build_algorithm("ar:steps=20,feedback=random", mlp, build_loss("mse"))
    act = mlp.activations[1]
    object.__setattr__(act, "df", lambda a: torch.ones_like(a))  # an activation whose df is not f'
    with pytest.raises(ConfigError, match=r"parameter 'layers\.[01]\.weight' differs from autograd's"):
        wrong.step(x, y)


def test_guard_tolerances_follow_the_dtype():
    assert _verify.tolerance(torch.float64) == 1e-8 and _verify.tolerance(torch.float32) == 1e-4
    # a parameter whose gradient is tiny against the others is judged against the total norm
    big, tiny = torch.ones(100), torch.full((3,), 1e-9)
    assert _verify.relative_difference(tiny * 1.5, tiny, 1e-3 * float(big.norm())) < 1e-4
