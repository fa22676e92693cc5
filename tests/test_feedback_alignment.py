"""Feedback alignment and direct feedback alignment against autograd and closed forms."""

import pytest
import torch
from torch import nn

from creditlab.algorithms import build_algorithm
from creditlab.diagnostics import backprop_grads
from creditlab.errors import ConfigError
from creditlab.losses import build_loss
from creditlab.models import MLP
from creditlab.models.locally_connected import LocallyConnected2d




class SmallNet(nn.Module):
    """Conv, max-pool, dropout, locally connected and linear layers, to show FA is generic."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.lc = LocallyConnected2d(3, 4, 3, 2, in_size=4)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        h = self.pool(torch.tanh(self.conv(x)))
        h = self.drop(torch.tanh(self.lc(h)))
        return self.fc(h.flatten(1))


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("make", [lambda: MLP("6-5-4-3", act="tanh"), SmallNet])
def test_fa_with_transposed_feedback_equals_backprop(make):
    torch.manual_seed(0)
    model = make().double()
    x = torch.randn(4, 2, 8, 8, dtype=torch.float64) if isinstance(model, SmallNet) else torch.randn(4, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1])
    loss = build_loss("cross_entropy")
    algo = build_algorithm("fa", model, loss)
    for name, layer in algo.layers:
        algo.B[name] = layer.weight.detach().clone()  # B = W: feedback B^T delta = W^T delta
    torch.manual_seed(1)
    ref = backprop_grads(model, loss, x, y)
    torch.manual_seed(1)
    algo.step(x, y)
    got = _grads(model)
    for n in ref:
        assert torch.allclose(got[n], ref[n], atol=1e-12, rtol=1e-10), n


def test_fa_with_random_feedback_differs_from_backprop_below_the_output():
    torch.manual_seed(0)
    model = MLP("6-5-4-3", act="tanh").double()
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
    loss = build_loss("cross_entropy")
    ref = backprop_grads(model, loss, x, y)
    build_algorithm("fa", model, loss).step(x, y)
    assert torch.allclose(model.layers[2].weight.grad, ref["layers.2.weight"], atol=1e-12)
    assert not torch.allclose(model.layers[0].weight.grad, ref["layers.0.weight"], atol=1e-6)


def test_fa_feedback_init_is_scaled_like_the_forward_weight():
    torch.manual_seed(0)
    model = MLP("300-200-10", act="tanh", init="xavier")
    algo = build_algorithm("fa", model, build_loss("cross_entropy"))
    for name, layer in algo.layers:
        assert abs(algo.B[name].std() / layer.weight.std() - 1) < 0.05
    algo = build_algorithm("fa:init=orthogonal", model, build_loss("cross_entropy"))
    b = algo.B["layers.1"]  # 10 x 200, orthonormal rows
    assert torch.allclose(b @ b.t(), torch.eye(10), atol=1e-5)


def test_dfa_one_hidden_layer_matches_closed_form():
    torch.manual_seed(0)
    model = MLP("6-5-3", act="tanh").double()
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
    loss = build_loss("cross_entropy")
    algo = build_algorithm("dfa", model, loss)
    algo.step(x, y)
    B = algo.B["layers.1"]  # (5 hidden, 3 outputs)
    W1, b1 = model.layers[0].weight, model.layers[0].bias
    W2, b2 = model.layers[1].weight, model.layers[1].bias
    a1 = x @ W1.t() + b1
    h1 = torch.tanh(a1)
    out = h1 @ W2.t() + b2
    e = (torch.softmax(out, 1) - nn.functional.one_hot(y, 3).double()) / x.shape[0]
    d1 = (e @ B.t()) * (1 - h1 ** 2)
    expected = {"layers.1.weight": e.t() @ h1, "layers.1.bias": e.sum(0),
                "layers.0.weight": d1.t() @ x, "layers.0.bias": d1.sum(0)}
    got = _grads(model)
    for n, v in expected.items():
        assert torch.allclose(got[n], v.detach(), atol=1e-12), n


def test_dfa_sends_the_output_error_directly_to_every_hidden_layer():
    torch.manual_seed(0)
    model = MLP("6-5-4-3", act="tanh").double()
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
    loss = build_loss("cross_entropy")
    algo = build_algorithm("dfa", model, loss)
    algo.step(x, y)
    e = loss.grad(model(x), y).detach()
    h1 = torch.tanh(model.layers[0](x))
    d1 = (e @ algo.B["layers.1"].t()) * (1 - h1 ** 2)  # B of the layer fed by h1, independent of W2, W3
    assert torch.allclose(model.layers[0].weight.grad, (d1.t() @ x).detach(), atol=1e-12)
    assert set(algo.B) == {"layers.1", "layers.2"}


def test_dfa_runs_on_conv_pool_and_locally_connected_layers():
    torch.manual_seed(0)
    model = SmallNet()
    algo = build_algorithm("dfa", model, build_loss("cross_entropy"))
    algo.step(torch.randn(4, 2, 8, 8), torch.tensor([0, 1, 2, 1]))
    assert algo.B["lc"].shape == (3 * 4 * 4, 5) and algo.B["fc"].shape == (16, 5)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert "forward" not in model.conv.__dict__  # routing removed after the step


def test_noise_perturbs_hidden_outputs_but_not_the_data():
    torch.manual_seed(0)
    loss = build_loss("cross_entropy")
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 1])
    single = nn.Sequential(nn.Linear(6, 3))
    ref = backprop_grads(single, loss, x, y)
    build_algorithm("fa:noise=0.5", single, loss).step(x, y)
    assert torch.allclose(single[0].weight.grad, ref["0.weight"])  # only layer: its input is the data
    deep = MLP("6-5-3", act="tanh")
    algo = build_algorithm("fa:noise=0.5", deep, loss)
    algo.B = {k: v.clone() for k, v in algo.B.items()}
    algo.step(x, y)
    g_noisy = deep.layers[1].weight.grad.clone()
    build_algorithm("fa:noise=0", deep, loss).step(x, y)
    assert not torch.allclose(g_noisy, deep.layers[1].weight.grad)


def test_fa_rejects_models_without_routable_layers_and_bad_options():
    with pytest.raises(ConfigError, match="nothing to route"):
        build_algorithm("fa", nn.Sequential(nn.Tanh(), nn.Flatten()), build_loss("mse"))
    with pytest.raises(ConfigError, match="unknown init"):
        build_algorithm("fa:init=bogus", MLP("3-2"), build_loss("mse"))
    with pytest.raises(ConfigError, match="noise"):
        build_algorithm("dfa:noise=-1", MLP("3-2"), build_loss("mse"))


def test_fa_state_dict_round_trip_restores_feedback():
    model = MLP("4-3-2")
    a = build_algorithm("fa", model, build_loss("mse"))
    b = build_algorithm("fa", model, build_loss("mse"))
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(a.B[k], b.B[k]) for k in a.B)


@pytest.mark.parametrize("spec", ["fa", "dfa"])
def test_feedback_alignment_trains_mnist_mini_above_chance(spec, tmp_path):
    from creditlab.train import train

    cfg = {"dataset": "mnist-mini", "model": {"arch": "784-64-64-10", "act": "tanh", "out_act": "softmax"},
           "algo": spec, "optimizer": {"name": "adam", "lr": 1e-3}, "epochs": 1, "batch_size": 64,
           "log_every": 50, "threads": 1}
    s = train(cfg, tmp_path, progress=False)
    assert s["val_accuracy"] > 0.5  # chance is 0.1
    assert s["mean_angle_deg"] < 90  # updates align with backprop's
