"""Target propagation family (tp, dtp, sdtp, aosdtp) against exact inverses and instrumentation."""

import pytest
import torch
from torch import nn

from creditlab.algorithms import build_algorithm
from creditlab.errors import ConfigError
from creditlab.losses import CrossEntropyLoss, build_loss
from creditlab.models import MLP, build_named_model
from creditlab.train import train

ALGOS = ["tp", "dtp", "sdtp", "aosdtp:aux=16"]




def _forward(algo, x):
    hs = [x]
    with torch.no_grad():
        for i in range(len(algo.layers)):
            hs.append(algo.f(i, hs[-1]))
    return hs


def test_dtp_with_exact_inverses_targets_are_exact_preimages():
    torch.manual_seed(0)
    model = MLP("5-6-6-6-3", act="linear", out_act="softmax").double()  # invertible hidden layers
    algo = build_algorithm("dtp:alpha=0.3", model, build_loss("cross_entropy"))
    with torch.no_grad():
        for i in (1, 2):  # g_i = f_i^{-1}: g(h) = h @ V + c with V = (W^-1)^T, c = -W^-1 b
            w_inv = torch.linalg.inv(model.layers[i].weight)
            algo.inverse(i).weight.copy_(w_inv.t())
            algo.inverse(i).bias.copy_(-(w_inv @ model.layers[i].bias))
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.randint(0, 3, (7,))
    hs = _forward(algo, x)
    t = algo.targets(hs, y)
    for i in (1, 2):  # h^_i = f_i^{-1}(h^_{i+1}) exactly
        assert torch.allclose(algo.f(i, t[i]), t[i + 1], atol=1e-10)
    h = t[1]
    for i in (1, 2):  # propagating the lowest target forward reaches the penultimate target
        h = algo.f(i, h)
    assert torch.allclose(h, t[3], atol=1e-10)
    assert not torch.allclose(t[3], hs[3])  # the penultimate target moved (alpha * dL/dh)


def test_dtp_penultimate_target_is_a_gradient_step():
    torch.manual_seed(0)
    model = MLP("5-6-4-3", act="tanh", out_act="softmax").double()
    loss = build_loss("cross_entropy")
    algo = build_algorithm("dtp:alpha=0.2", model, loss)
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    hs = _forward(algo, x)
    h = hs[2].clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss.per_sample(model.layers[2](h), y).sum(), h)
    assert torch.allclose(algo.targets(hs, y)[2], hs[2] - 0.2 * g, atol=1e-12)


class SpyLoss(CrossEntropyLoss):
    """Records every tensor the task loss returns, so the graphs it heads can be inspected."""

    def __init__(self):
        super().__init__("mean")
        self.values = []

    def per_sample(self, out, target):
        v = super().per_sample(out, target)
        self.values.append(v)
        return v


def _graph_leaves(t):
    """Every leaf tensor the autograd graph of ``t`` reaches."""
    seen, stack, leaves = set(), [t.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            leaves.append(node.variable)
        stack.extend(n for n, _ in node.next_functions)
    return leaves


def _task_loss_leaves(spec):
    torch.manual_seed(0)
    model = MLP("5-6-4-3", act="tanh", out_act="softmax")
    spy = SpyLoss()
    algo = build_algorithm(spec, model, spy)
    calls = []
    real_grad = torch.autograd.grad

    def counting_grad(*a, **k):
        calls.append(1)
        return real_grad(*a, **k)

    torch.autograd.grad = counting_grad
    try:
        algo.step(torch.randn(4, 5), torch.randint(0, 3, (4,)))
    finally:
        torch.autograd.grad = real_grad
    leaves = [leaf for v in spy.values if v.grad_fn is not None for leaf in _graph_leaves(v)]
    out_params = {id(model.layers[-1].weight), id(model.layers[-1].bias)}
    return leaves, out_params, calls


@pytest.mark.parametrize("spec", ["sdtp", "aosdtp:aux=8", "tp"])
def test_sdtp_never_differentiates_the_task_loss_below_the_output_layer(spec):
    leaves, out_params, calls = _task_loss_leaves(spec)
    assert leaves, "the task loss must train the output layer"
    assert all(id(leaf) in out_params for leaf in leaves)
    assert not calls  # no torch.autograd.grad anywhere


def test_dtp_does_differentiate_the_task_loss_below_the_output_layer():
    # the control for the instrumentation above: DTP's penultimate target is a gradient step
    leaves, out_params, calls = _task_loss_leaves("dtp")
    assert any(id(leaf) not in out_params for leaf in leaves) and calls


@pytest.mark.parametrize("spec", ["sdtp", "dtp", "aosdtp:aux=32"])
def test_inverse_training_reduces_reconstruction_error_on_a_fixed_net(spec):
    torch.manual_seed(0)
    model = MLP("10-20-20-5", act="tanh", out_act="softmax")
    algo = build_algorithm(spec + (",sigma=0.05" if ":" in spec else ":sigma=0.05"), model, build_loss("cross_entropy"))
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.Adam(algo.param_groups(3e-2))  # inverses only: the net stays fixed
    x, y = torch.randn(64, 10), torch.randint(0, 5, (64,))
    algo.step(x, y)
    first = algo.diagnostics()
    for _ in range(60):
        opt.zero_grad(set_to_none=True)
        algo.step(x, y)
        opt.step()
    algo.step(x, y)
    last = algo.diagnostics()
    for k in first:
        assert last[k] < 0.8 * first[k], (k, first[k], last[k])
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def _changed(before, params):
    return any(not torch.equal(a, b) for a, b in zip(before, params))


def _alternating_epochs(algo, model, opt, x, y, epochs, n_batches=3, start=0, upto=None):
    """Drive ``algo`` as the training loop does (on_epoch_start, epoch_batches, step, opt.step);
    returns, per step, which of (forward, inverse) parameters changed."""
    log = []
    for epoch in range(start, start + epochs):
        algo.on_epoch_start(epoch)
        batches = algo.epoch_batches(epoch, [torch.arange(len(x))] * n_batches)
        for i, idx in enumerate(batches):
            if upto is not None and (epoch, i) == upto:
                return log
            fwd0 = [p.detach().clone() for p in model.parameters()]
            inv0 = [p.detach().clone() for p in algo.inverses.parameters()]
            opt.zero_grad(set_to_none=True)
            algo.step(x[idx], y[idx])
            opt.step()
            log.append((epoch, _changed(fwd0, model.parameters()), _changed(inv0, algo.inverses.parameters())))
    return log


@pytest.mark.parametrize("first", ["inverse", "forward"])
def test_an_alternating_epoch_is_a_pass_of_one_loss_then_a_pass_of_the_other(first):
    """Lee et al.'s and Meulemans et al.'s schedule: every epoch trains the inverses over the whole
    data and the forward weights over the whole data, so `epochs` counts forward epochs."""
    torch.manual_seed(0)
    model = MLP("6-8-8-3", act="tanh", out_act="softmax")
    algo = build_algorithm(f"dtp:schedule=alternating,first={first}", model, build_loss("cross_entropy"))
    opt = torch.optim.Adam([{"params": list(model.parameters())}, *algo.param_groups(1e-2)], lr=1e-2)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    log = _alternating_epochs(algo, model, opt, x, y, epochs=3)
    assert len(log) == 3 * 6  # two passes of 3 batches per epoch
    for epoch in range(3):
        steps = [(f, i) for e, f, i in log if e == epoch]
        one, two = steps[:3], steps[3:]
        fwd_first = first == "forward"
        assert one == [(fwd_first, not fwd_first)] * 3 and two == [(not fwd_first, fwd_first)] * 3, (epoch, steps)


def test_an_alternating_run_resumed_mid_epoch_continues_in_the_same_pass():
    torch.manual_seed(0)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))

    def fresh():
        torch.manual_seed(1)
        model = MLP("6-8-8-3", act="tanh", out_act="softmax")
        algo = build_algorithm("sdtp:schedule=alternating", model, build_loss("cross_entropy"))
        opt = torch.optim.SGD([{"params": list(model.parameters())}, *algo.param_groups(1e-2)], lr=1e-2)
        return model, algo, opt

    model, algo, opt = fresh()
    full = _alternating_epochs(algo, model, opt, x, y, epochs=2)
    model, algo, opt = fresh()
    part = _alternating_epochs(algo, model, opt, x, y, epochs=2, upto=(1, 2))  # stop inside epoch 1
    state = algo.state_dict()
    model2, algo2, opt2 = fresh()
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(opt.state_dict())
    algo2.load_state_dict(state)
    algo2.on_epoch_start(1)  # as the loop does on resume; then the remaining steps of epoch 1
    batches = algo2.epoch_batches(1, [torch.arange(16)] * 3)
    rest = []
    for idx in batches[2:]:
        fwd0 = [p.detach().clone() for p in model2.parameters()]
        inv0 = [p.detach().clone() for p in algo2.inverses.parameters()]
        opt2.zero_grad(set_to_none=True)
        algo2.step(x[idx], y[idx])
        opt2.step()
        rest.append((1, _changed(fwd0, model2.parameters()), _changed(inv0, algo2.inverses.parameters())))
    assert part + rest == full


def test_parallel_schedule_trains_both_losses_every_step():
    torch.manual_seed(0)
    model = MLP("6-8-8-3", act="tanh", out_act="softmax")
    algo = build_algorithm("sdtp", model, build_loss("cross_entropy"))
    algo.on_epoch_start(1)
    algo.step(torch.randn(4, 6), torch.randint(0, 3, (4,)))
    assert all(p.grad is not None for p in model.parameters())
    assert all(p.grad is not None for p in algo.inverses.parameters())


def test_inverse_param_group_carries_its_own_adam_hyperparameters():
    model = MLP("6-8-8-3", act="tanh", out_act="softmax")
    algo = build_algorithm("dtp:inv_lr=0.004,inv_beta1=0.99,inv_beta2=0.95,inv_eps=1e-4", model, build_loss("cross_entropy"))
    (g,) = algo.param_groups(1e-3)
    assert g["lr"] == 0.004 and g["betas"] == (0.99, 0.95) and g["eps"] == 1e-4
    assert {id(p) for p in g["params"]}.isdisjoint({id(p) for p in model.parameters()})
    (g,) = build_algorithm("dtp", model, build_loss("cross_entropy")).param_groups(1e-3)
    assert g["lr"] == 1e-3 and "betas" not in g


def test_local_losses_stop_gradients_at_the_layer_input():
    # each hidden layer's update equals the gradient of its own local loss alone
    torch.manual_seed(0)
    model = MLP("5-6-4-3", act="tanh", out_act="softmax").double()
    algo = build_algorithm("sdtp", model, build_loss("cross_entropy"))
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    algo.step(x, y)
    hs = _forward(algo, x)
    t = algo.targets(hs, y)
    w = model.layers[0].weight
    (g,) = torch.autograd.grad(((algo.f(0, hs[0]) - t[1]) ** 2).sum() / 4, w)
    assert torch.allclose(w.grad, g, atol=1e-12)


@pytest.mark.parametrize("spec,net", [("dtp", "mnist-lc"), ("sdtp", "mnist-lc"), ("aosdtp:aux=32", "mnist-lc"),
                                      ("tp", "mnist-lc"), ("sdtp", "mnist-conv")])
def test_target_prop_runs_on_locally_connected_and_conv_nets(spec, net):
    torch.manual_seed(0)
    model = build_named_model(net, (1, 12, 12), 10)
    algo = build_algorithm(spec, model, build_loss("cross_entropy"))
    algo.step(torch.rand(3, 1, 12, 12), torch.randint(0, 10, (3,)))
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert set(algo.diagnostics()) == {"recon_err/layer1", "recon_err/layer2", "recon_err/layer3"}


def test_target_prop_state_dict_round_trip():
    model = MLP("6-8-8-3", act="tanh", out_act="softmax")
    a = build_algorithm("aosdtp:aux=4", model, build_loss("cross_entropy"))
    b = build_algorithm("aosdtp:aux=4", model, build_loss("cross_entropy"))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.aux, b.aux)
    assert all(torch.equal(p, q) for p, q in zip(a.inverses.parameters(), b.inverses.parameters()))


def test_target_prop_rejects_models_without_a_layer_chain():
    with pytest.raises(ConfigError, match="layer chain"):
        build_algorithm("dtp", nn.Sequential(nn.Linear(3, 2)), build_loss("mse"))
    with pytest.raises(ConfigError, match="schedule"):
        build_algorithm("sdtp:schedule=sometimes", MLP("3-4-2"), build_loss("mse"))


@pytest.mark.parametrize("spec,epochs", [("tp", 1), ("dtp", 1), ("sdtp", 1), ("aosdtp:aux=64", 1),
                                         ("dtp:schedule=alternating", 1)])
def test_target_prop_trains_mnist_mini_above_chance(spec, epochs, tmp_path):
    cfg = {"dataset": "mnist-mini", "model": {"arch": "784-64-64-10", "act": "tanh", "out_act": "softmax"},
           "algo": spec, "optimizer": {"name": "adam", "lr": 1e-3}, "epochs": epochs, "batch_size": 64,
           "log_every": 0, "threads": 1}
    s = train(cfg, tmp_path, progress=False)
    assert s["val_accuracy"] > 0.3  # chance is 0.1; bp reaches ~0.85 in this budget, tp ~0.4


def test_sdtp_and_aosdtp_targets_follow_the_difference_correction_formulas():
    torch.manual_seed(0)
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    onehot = nn.functional.one_hot(y, 3).double()
    for spec in ("sdtp", "aosdtp:aux=7"):
        model = MLP("5-6-4-3", act="tanh", out_act="softmax").double()
        algo = build_algorithm(spec, model, build_loss("cross_entropy"))
        hs = _forward(algo, x)
        t = algo.targets(hs, y)
        g2, g1 = algo.inverse(2), algo.inverse(1)
        o = torch.softmax(hs[3], 1)
        if spec == "sdtp":
            top, top_hat = o, onehot
        else:
            z = torch.tanh(hs[2] @ algo.aux.t())  # fixed random features of h_{L-1}
            top, top_hat = torch.cat([o, z], 1), torch.cat([onehot, z], 1)
        assert torch.allclose(g2(top, hs[2].shape), torch.tanh(top @ g2.weight + g2.bias))  # g = tanh(V^T h + c)
        expected2 = hs[2] - g2(top, hs[2].shape) + g2(top_hat, hs[2].shape)
        assert torch.allclose(t[2], expected2, atol=1e-12)
        expected1 = g1(t[2], hs[1].shape) + hs[1] - g1(hs[2], hs[1].shape)
        assert torch.allclose(t[1], expected1, atol=1e-12)
        assert torch.equal(t[3], onehot)


def test_locally_connected_inverse_is_the_transpose_of_the_forward_layer():
    from creditlab.algorithms._targetprop import Inverse
    from creditlab.models import make_activation
    from creditlab.models.locally_connected import LocallyConnected2d

    torch.manual_seed(0)
    lc = LocallyConnected2d(2, 3, 3, 2, in_size=7).double()
    g = Inverse(lc, make_activation("linear"), lc.weight.shape, "xavier", dtype=torch.float64)
    with torch.no_grad():
        g.weight.copy_(lc.weight)  # V = W: g(h) = W^T h + c, the sparsity of W^T
        g.bias.normal_()
    x = torch.randn(4, 2, 7, 7, dtype=torch.float64, requires_grad=True)
    h = torch.randn(4, 3, *lc.out_size, dtype=torch.float64)
    (vjp,) = torch.autograd.grad(lc(x), x, h)
    assert torch.allclose(g(h, x.shape), vjp + g.bias, atol=1e-12)


@pytest.mark.parametrize("given,expected", [("inv_beta1=0.5", (0.5, 0.95)), ("inv_beta2=0.9", (0.8, 0.9)),
                                            ("inv_beta1=0.5,inv_beta2=0.9", (0.5, 0.9))])
def test_one_inverse_beta_set_takes_the_other_from_the_forward_optimizer(given, expected):
    from creditlab.build import build_optimizer
    from creditlab.config import resolve

    cfg = resolve({"dataset": "fake:n=8,shape=6,classes=3,test=4", "model": {"arch": "6-8-8-3", "act": "tanh"},
                   "algo": f"dtp:{given}", "optimizer": {"name": "adam", "lr": 1e-3, "betas": [0.8, 0.95]},
                   "epochs": 1, "log_every": 0})
    model = MLP("6-8-8-3", act="tanh", out_act="softmax")
    algo = build_algorithm(cfg["algo"], model, build_loss("cross_entropy"))
    opt = build_optimizer(cfg, model, algo)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["model"]["betas"] == (0.8, 0.95)
    assert tuple(groups["inverses"]["betas"]) == expected


def test_alternating_runs_count_forward_epochs(tmp_path):
    """One epoch of an alternating run is an inverse pass and then a forward pass over the whole
    data: twice the batches in steps, the forward weights updated (a finite angle to backprop)
    in every step of the second pass and in none of the first."""
    import json
    import math

    cfg = {"dataset": "fake:n=96,classes=3,shape=1x4x4,test=24", "val_size": 24,
           "model": {"arch": "16-12-12-3", "act": "tanh", "out_act": "softmax"},
           "algo": "sdtp:schedule=alternating", "optimizer": {"name": "adam", "lr": 3e-3}, "epochs": 1,
           "batch_size": 8, "log_every": 1, "threads": 1}
    s = train(cfg, tmp_path / "run", progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r.get("kind") == "step"]
    n = 72 // 8
    assert s["epochs"] == 1 and len(steps) == 2 * n
    forward = [r["mean_angle_deg"] is not None and math.isfinite(r["mean_angle_deg"]) for r in steps]
    assert forward == [False] * n + [True] * n


def test_dtp_alpha_on_the_batch_mean_loss_is_alpha_over_batch_size_on_the_summed_loss():
    torch.manual_seed(0)
    model = MLP("6-8-8-3", act="tanh", out_act="softmax").double()
    x, y = torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 3, (10,))
    mean = build_algorithm("dtp:alpha=0.2,alpha_loss=mean", model, build_loss("cross_entropy"))
    summed = build_algorithm("dtp:alpha=0.02", model, build_loss("cross_entropy"))
    hs = _forward(mean, x)
    torch.testing.assert_close(mean.targets(hs, y)[2], summed.targets(hs, y)[2], rtol=1e-13, atol=1e-15)
    with pytest.raises(ConfigError, match="alpha_loss"):
        build_algorithm("dtp:alpha_loss=median", model, build_loss("cross_entropy"))


@pytest.mark.parametrize("spec", ["tp", "dtp:inverse_loss=denoise", "dtp", "sdtp", "sdtp:inverse_loss=preserve",
                                  "aosdtp:aux=7"])
def test_a_step_fills_the_gradients_of_the_task_local_and_inverse_losses(spec):
    """The step forms the losses' gradients in closed form; they equal autograd's gradients of
    the documented sums: the task loss of the output layer (input detached), sum_l ||f_l(h_l) -
    h^_{l+1}||^2 / B and sum_l ||target - g_l(f_l(h~_l))||^2 / B, with the same noise h~."""
    torch.manual_seed(0)
    model = MLP("5-6-6-4-3", act="tanh", out_act="softmax", bias=True).double()
    loss = build_loss("cross_entropy")
    algo = build_algorithm(spec + (",sigma=0.3" if ":" in spec else ":sigma=0.3"), model, loss)
    x, y = torch.randn(9, 5, dtype=torch.float64), torch.randint(0, 3, (9,))
    hs = _forward(algo, x)
    t = algo.targets(hs, y)
    L, n = len(algo.layers), x.shape[0]
    torch.manual_seed(5)  # the inverse losses' noise, drawn layer by layer from the bottom
    total = loss(algo.f(L - 1, hs[L - 1]), y)
    for i in range(L - 1):
        total = total + ((algo.f(i, hs[i]) - t[i + 1]) ** 2).sum() / n
    for i in range(1, L):
        ht = hs[i] + 0.3 * torch.randn_like(hs[i])
        with torch.no_grad():
            fh = algo.f(i, ht)
            if i == L - 1:
                fh = torch.softmax(fh, 1)
                if spec.startswith("aosdtp"):
                    fh = torch.cat([fh, torch.tanh(ht @ algo.aux.t())], 1)
        target = ht if "preserve" in spec or spec == "dtp" else hs[i]
        total = total + ((algo.inverse(i)(fh, hs[i].shape) - target) ** 2).sum() / n
    params = list(model.parameters()) + list(algo.inverses.parameters())
    expected = torch.autograd.grad(total, params)
    torch.manual_seed(5)
    algo.step(x, y)
    for p, g in zip(params, expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14)
