"""GAIT-prop against its oracles: backprop by autograd (output layer exactly, lower layers as
gamma -> 0 with orthogonal weights), the normalized perturbation size, the orthogonality
regularizer's gradient by autograd, and the local-loss scaling of the authors' code."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from creditlab.algorithms import build_algorithm
from creditlab.algorithms.gait import gait_targets, gram, layer_gamma, ortho_grad, ortho_penalty
from creditlab.diagnostics.angles import backprop_grads, layer_angles
from creditlab.errors import ConfigError
from creditlab.losses import build_loss
from creditlab.models import MLP
from creditlab.models.invertible import InvertibleNet, invertible_convnet, invertible_from_arch

D64 = torch.float64


def _orthogonalize(net: InvertibleNet) -> InvertibleNet:
    """Exactly (float64) orthogonal square layers; random biases so the kinks are exercised."""
    with torch.no_grad():
        for layer in net.layers:
            if layer.invertible:
                w = torch.empty(layer.square_matrix().shape, dtype=D64)
                nn.init.orthogonal_(w)
                layer.weight.copy_(w.reshape(layer.weight.shape))
            layer.bias.normal_(0.0, 0.1)
    return net


def _fc(act: str = "leaky_relu(0.1)") -> InvertibleNet:
    return _orthogonalize(invertible_from_arch("20-16-16-12-5", act).to(D64))


def _conv() -> InvertibleNet:
    return _orthogonalize(invertible_convnet((3, 12, 12), 5, convs=[(3, 2, 4), (3, 1, 6), (2, 2, 8), (3, 1, 8)]).to(D64))


def _batch(net: InvertibleNet, n: int = 6):
    shape = (n, 20) if net.layers[0].__class__.__name__ == "InvertibleDense" else (n, 3, 12, 12)
    return torch.randn(shape, dtype=D64), torch.randint(0, 5, (n,))


def _angles(spec: str, net: InvertibleNet, loss_spec: str = "cross_entropy:reduction=sum", seed: int = 0):
    torch.manual_seed(seed)
    x, y = _batch(net)
    loss = build_loss(loss_spec)
    algo = build_algorithm(spec, net, loss)
    algo.step(x, y)
    rows = layer_angles(net, algo.task_updates, backprop_grads(net, loss, x, y))
    return rows, algo


@pytest.mark.parametrize("spec", ["gait", "gait:normalize=false", "gait:norm=squared,eta=1e-6", "gait:scale_local=false"])
@pytest.mark.parametrize("loss_spec", ["cross_entropy:reduction=sum", "cross_entropy", "mse"])
def test_output_layer_update_equals_backprop_exactly(spec, loss_spec):
    torch.manual_seed(1)
    net = invertible_from_arch("20-16-16-12-5").to(D64)
    rows, _ = _angles(spec, net, loss_spec)
    assert rows[-1]["name"] == "layers.3.linear"
    assert rows[-1]["rel_error"] < 1e-13


@pytest.mark.parametrize("make", [_fc, _conv], ids=["fc", "conv"])
def test_normalized_gait_aligns_with_backprop_as_gamma_shrinks(make):
    torch.manual_seed(2)
    net = make()
    # relative error |u - g| / |g| (the angle's arccos saturates near 1e-6 degrees in float64);
    # difference-form targets, so that float64 cancellation does not floor the measurement
    worst = []
    for gamma in (3e-1, 1e-1, 1e-2, 1e-3, 1e-5):
        rows, _ = _angles(f"gait:gamma={gamma},ortho=0,targets=delta", net)
        worst.append(max(r["rel_error"] for r in rows))
    assert worst[0] > 1e-2  # finite gamma: a measurable, not an exact, match (leaky-ReLU kinks crossed)
    assert all(b <= a * 1.01 + 1e-13 for a, b in zip(worst, worst[1:])), worst
    assert worst[-1] < 1e-12, worst


def test_vanilla_gait_aligns_with_backprop_at_small_gamma_on_a_shallow_net():
    torch.manual_seed(3)
    rows, _ = _angles("gait:normalize=false,gamma=1e-3,ortho=0", _fc())
    assert max(r["angle_deg"] for r in rows) < 1e-3


def test_vanilla_gait_loses_precision_when_gamma_products_vanish():
    """Dalm et al. §2.2.1: fixed gamma shrinks the target distance geometrically down the
    layers until float64 cannot resolve it; normalized targets do not (same gamma)."""
    torch.manual_seed(4)
    net = _fc()
    vanilla, _ = _angles("gait:normalize=false,gamma=1e-7,ortho=0", net)
    normalized, _ = _angles("gait:gamma=1e-7,ortho=0", net)
    assert vanilla[0]["angle_deg"] > 10.0
    assert normalized[0]["angle_deg"] < 1e-4


def _target_dists(spec_gamma: float, act: str):
    torch.manual_seed(5)
    net = _fc(act)
    x, y = _batch(net)
    loss = build_loss("cross_entropy:reduction=sum")
    with torch.no_grad():
        tr = net.trace(x)
        g = loss.grad(tr.outs[-1][:, :5], y)
        diffs, _, _ = gait_targets(net, tr, g, True, spec_gamma)
    dist = [diffs[l].norm(dim=1) for l in range(len(net.layers))]
    widths = [layer.width for layer in net.layers]
    return dist, widths


@pytest.mark.parametrize("make", [_fc, _conv], ids=["fc", "conv"])
@pytest.mark.parametrize("spec", ["gait:gamma=1e-3", "gait:gamma=1e-4,scale_local=false"])
def test_difference_form_targets_equal_the_full_inverse_in_float64(make, spec):
    torch.manual_seed(11)
    net = make()
    ups = {}
    for form in ("inverse", "delta"):
        _, algo = _angles(f"{spec},ortho=0,targets={form}", net, seed=11)
        ups[form] = algo.task_updates
    for k in ups["inverse"]:
        torch.testing.assert_close(ups["delta"][k], ups["inverse"][k], rtol=1e-6, atol=1e-9)


def test_float32_difference_form_keeps_the_float64_alignment():
    """The full inverse in float32 loses the O(gamma) target signal to cancellation; the
    default (targets=auto) uses the difference form there."""
    torch.manual_seed(12)
    net = _fc()
    x, y = _batch(net)
    loss = build_loss("cross_entropy:reduction=sum")
    ref = backprop_grads(net, loss, x, y)
    net32 = net.float()
    algo = build_algorithm("gait:gamma=1e-6,ortho=0", net32, loss)
    algo.step(x.float(), y)
    assert algo.uses_delta(torch.float32)
    rows = layer_angles(net32, algo.task_updates, {k: v.float() for k, v in ref.items()})
    assert max(r["angle_deg"] for r in rows) < 0.05
    inv = build_algorithm("gait:gamma=1e-6,ortho=0,targets=inverse", net32, loss)
    inv.step(x.float(), y)
    rows = layer_angles(net32, inv.task_updates, {k: v.float() for k, v in ref.items()})
    assert max(r["angle_deg"] for r in rows) > 10.0


def test_normalized_targets_put_the_perturbation_at_exactly_the_set_size_with_slope_one():
    gamma = 1e-3
    dist, widths = _target_dists(gamma, "leaky_relu(1.0)")
    for l in range(len(widths) - 1):  # target of layer l comes from layer l+1's perturbation
        expected = torch.full_like(dist[l], gamma * math.sqrt(widths[l + 1]))
        torch.testing.assert_close(dist[l], expected, rtol=1e-9, atol=0)


def test_normalized_target_distance_with_slope_point_one_lies_within_the_derivative_bound():
    gamma = 1e-6
    dist, widths = _target_dists(gamma, "leaky_relu(0.1)")
    for l in range(len(widths) - 1):
        size = gamma * math.sqrt(widths[l + 1])
        assert torch.all(dist[l] <= size * (1 + 1e-9)) and torch.all(dist[l] >= 0.1 * size * (1 - 1e-9))
        if l < len(widths) - 2:  # layer l+1 is leaky (the output layer is linear): D < 1 somewhere
            assert torch.any(dist[l] < 0.99 * size)


def test_printed_eq5_gamma_is_eta_over_the_squared_distance():
    diff = torch.tensor([[3.0, 4.0], [0.0, 0.5]], dtype=D64)
    torch.testing.assert_close(layer_gamma(diff, True, 1.0, "squared", 2.0), torch.tensor([2 / 25, 8.0], dtype=D64))
    torch.testing.assert_close(layer_gamma(diff, True, 1e-3, "l2", 0.0), 1e-3 * math.sqrt(2) / torch.tensor([5.0, 0.5], dtype=D64))
    torch.testing.assert_close(layer_gamma(diff, False, 1e-3, "l2", 0.0), torch.full((2,), 1e-3, dtype=D64))


@pytest.mark.parametrize("n,leaf", [(7, 256), (7, 2), (11, 3), (16, 4)])
def test_orthogonality_gradient_equals_autograd(n, leaf):
    # leaf < n: W^T W is assembled from blocks (cross blocks once, mirrored), recursively
    torch.manual_seed(6)
    w = torch.randn(n, n, dtype=D64, requires_grad=True)
    (auto,) = torch.autograd.grad(ortho_penalty(w), w)
    torch.testing.assert_close(ortho_grad(w.detach(), leaf), auto, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gram(w.detach(), leaf), w.detach().mT @ w.detach(), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("make", [_fc, _conv], ids=["fc", "conv"])
def test_regularizer_is_added_to_square_weights_only_after_the_task_update(make):
    torch.manual_seed(7)
    net = make()
    with torch.no_grad():
        for layer in net.layers:
            layer.weight.add_(0.05 * torch.randn_like(layer.weight))
    lam = 3.0
    x, y = _batch(net)
    algo = build_algorithm(f"gait:ortho={lam}", net, build_loss("cross_entropy"))
    algo.step(x, y)
    for i, layer in enumerate(net.layers):
        extra = layer.weight.grad - algo.task_updates[f"layers.{i}.{'linear' if hasattr(layer, 'linear') else 'conv'}.weight"]
        if not layer.invertible:
            assert extra.abs().max() == 0
            continue
        w = layer.square_matrix().detach().clone().requires_grad_(True)
        (auto,) = torch.autograd.grad(lam * ortho_penalty(w), w)
        torch.testing.assert_close(extra, auto.reshape(layer.weight.shape), rtol=1e-10, atol=1e-12)
        assert torch.equal(layer.bias.grad, algo.task_updates[f"layers.{i}.{'linear' if hasattr(layer, 'linear') else 'conv'}.bias"])


def test_scale_local_false_is_the_scaled_update_times_the_gamma_product():
    """Vanilla, fixed gamma: without the code's 1/gamma multipliers, layer l's update is the
    scaled one times gamma^(L-1-l) (Algorithm 1 as printed)."""
    torch.manual_seed(8)
    net = _fc()
    x, y = _batch(net)
    loss = build_loss("cross_entropy:reduction=sum")
    ups = {}
    for flag in (True, False):
        algo = build_algorithm(f"gait:normalize=false,gamma=1e-2,ortho=0,scale_local={str(flag).lower()}", net, loss)
        algo.step(x, y)
        ups[flag] = algo.task_updates
    L = len(net.layers)
    for l in range(L):
        key = f"layers.{l}.linear.weight"
        torch.testing.assert_close(ups[False][key], ups[True][key] * 1e-2 ** (L - 1 - l), rtol=1e-12, atol=0)


def test_zero_error_sample_gives_zero_update_without_nan():
    torch.manual_seed(9)
    net = _fc()
    x, _ = _batch(net, 3)
    with torch.no_grad():
        y = net(x).clone()
    y[0] += 0.5  # only sample 0 has an error
    loss = build_loss("mse")
    algo = build_algorithm("gait:ortho=0,gamma=1e-3", net, loss)
    algo.step(x, y)
    x0 = x[:1]
    algo0 = build_algorithm("gait:ortho=0,gamma=1e-3", net, loss)
    grads_all = dict(algo.task_updates)
    algo0.step(x0, y[:1])
    for k, v in grads_all.items():
        assert torch.isfinite(v).all()
        torch.testing.assert_close(v, algo0.task_updates[k], rtol=1e-10, atol=1e-14)


def test_gait_lowers_the_training_loss_float32():
    torch.manual_seed(10)
    net = invertible_from_arch("20-16-16-12-3")
    x = torch.randn(64, 20)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    loss = build_loss("cross_entropy")
    algo = build_algorithm("gait:ortho=1", net, loss)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        opt.zero_grad(set_to_none=True)
        res = algo.step(x, y)
        first = float(res.loss) if first is None else first
        opt.step()
    with torch.no_grad():
        assert float(loss(net(x), y)) < 0.5 * first
    assert all(math.isfinite(v) for v in algo.diagnostics().values())


def test_gait_refuses_non_invertible_models_and_bad_options():
    loss = build_loss("cross_entropy")
    with pytest.raises(ConfigError, match="invertible network"):
        build_algorithm("gait", MLP("20-16-5", act="leaky_relu"), loss)
    net = invertible_from_arch("20-16-5")
    for spec, pattern in [("gait:gamma=0", "gamma"), ("gait:eta=1e-3", "eta"), ("gait:norm=l1", "norm"),
                          ("gait:ortho=-1", "ortho"), ("gait:normalize=maybe", "normalize")]:
        with pytest.raises(ConfigError, match=pattern):
            build_algorithm(spec, net, loss)


def test_model_from_arch_builds_the_invertible_net_for_check():
    from creditlab.check import run_check

    res = run_check("gait:gamma=1e-6", arch="40-40-30-5", act="leaky_relu", loss="cross_entropy:reduction=sum",
                    dtype="float64", batch=16)
    angles = [r["angle_deg"] for r in res["layers"]]
    assert len(angles) == 3 and max(angles) < 1e-2 and angles[-1] < 1e-6


def _orthogonal_64(act: str) -> InvertibleNet:
    """The issue's net: 64 wide, exactly orthogonal square layers (float64), small biases."""
    torch.manual_seed(21)
    return _orthogonalize(invertible_from_arch("64-64-64-64-10", act).to(D64))


@pytest.mark.parametrize("act", ["tanh", "sigmoid", "leaky_relu(0.1)"])
def test_float32_difference_form_targets_do_not_cancel_for_every_invertible_activation(act):
    """gamma = 1e-7 (normalized): the float32 update of every layer lies within 0.5 degrees of
    the float64 one (the full inverse's f^-1(h + dh) - a cancels to 24-90 degrees here)."""
    net = _orthogonal_64(act)
    torch.manual_seed(22)
    x, y = torch.randn(32, 64, dtype=D64), torch.randint(0, 10, (32,))
    loss = build_loss("cross_entropy")
    ref = build_algorithm("gait:ortho=0", net, loss)
    ref.step(x, y)
    ref_updates = {k: v.clone() for k, v in ref.task_updates.items()}
    net32 = net.float()
    algo = build_algorithm("gait:ortho=0", net32, loss)
    algo.step(x.float(), y)
    rows = layer_angles(net32, algo.task_updates, {k: v.float() for k, v in ref_updates.items()})
    assert max(r["angle_deg"] for r in rows) < 0.5, [(r["name"], r["angle_deg"]) for r in rows]


@pytest.mark.parametrize("act", ["tanh", "sigmoid", "leaky_relu(0.3)", "linear"])
def test_activation_difference_form_equals_the_float64_direct_difference(act):
    from creditlab.models.activations import make_activation

    f = make_activation(act)
    torch.manual_seed(23)
    a = torch.randn(2000, dtype=D64)
    dh = torch.randn(2000, dtype=D64) * 1e-3 * f.df(a)
    direct = f.inverse(f(a) + dh) - a  # float64, |a| moderate: cancellation costs ~1e-13 here
    torch.testing.assert_close(f.inverse_diff(a, dh), direct, rtol=1e-9, atol=1e-15)
    # float32, saturated units included: the difference form keeps float32 precision
    a32 = (torch.randn(2000, dtype=D64) * 3).float()
    dh32 = (torch.randn(2000, dtype=D64) * 1e-6 * f.df(a32.double())).float()
    exact = f.inverse_diff(a32.double(), dh32.double())
    torch.testing.assert_close(f.inverse_diff(a32, dh32).double(), exact, rtol=2e-5, atol=1e-30)
    if act != "linear":  # while the direct difference in float32 does not
        direct32 = (f.inverse(f(a32) + dh32) - a32).double()
        assert (direct32 - exact).abs().max() > 1e-3 * exact.abs().max()


def test_invertible_activation_without_a_difference_form_is_refused_by_name_in_float32():
    from creditlab.models.activations import Activation

    class Cube(Activation):
        name = "cube"
        invertible = True

        def forward(self, a):
            return a ** 3 + a

        def df(self, a):
            return 3 * a ** 2 + 1

    net = invertible_from_arch("8-8-8-4", "tanh")
    net.layers[1].act = Cube()
    with pytest.raises(ConfigError, match="'cube'"):
        build_algorithm("gait", net, build_loss("cross_entropy"))
    build_algorithm("gait", net.to(D64), build_loss("cross_entropy"))  # float64: the full inverse


@pytest.mark.parametrize("model", [{"arch": "64-64-64-10", "act": "tanh"}, {"name": "gait-conv", "options": {"convs": [[3, 2, 4], [3, 1, 6]]}}])
def test_float64_models_are_initialised_orthogonal_in_float64(model):
    """build_model draws the initialisation in the run's dtype: W W^T = I to 1e-12 in float64
    (drawn in float32 and cast, it was 1e-7 off per entry)."""
    from creditlab.build import build_model
    from creditlab.config import resolve

    cfg = resolve({"dataset": "fake:n=8,shape=1x8x8,test=4", "algo": "gait", "dtype": "float64", "model": model,
                   "epochs": 1, "batch_size": 4, "log_every": 0, "threads": 1})
    torch.manual_seed(0)
    shape = (64,) if "arch" in model else (3, 8, 8)
    net = build_model(cfg, shape, 10)
    assert torch.get_default_dtype() == torch.float32  # restored
    square = [layer for layer in net.layers if layer.invertible]
    assert square
    for layer in square:
        w = layer.square_matrix(layer.weight.detach())
        assert w.dtype == D64
        err = (w @ w.T - torch.eye(w.shape[0], dtype=D64)).abs().max()
        assert err < 1e-12, float(err)


def _nudges(net: InvertibleNet, x, y, loss, gamma: float, slope: float = 0.1):
    """The forward trace and GP's nudge dh_l = gamma_l f'(a_l)^2 (t_l - h_l) of every layer."""
    with torch.no_grad():
        tr = net.trace(x)
        diffs, _, gammas = gait_targets(net, tr, loss.grad(tr.outs[-1][:, :5], y), True, gamma)
    dh = [gammas[l][:, None] * torch.where(tr.pre[l] > 0, 1.0, slope) ** 2 * diffs[l] for l in range(len(diffs))]
    return tr, dh


def _kink_setup(cross: bool, seed: int = 21):
    """An orthogonal leaky-ReLU net and batch in which unit j of hidden layer l = 2 of sample n
    sits a quarter of its GP nudge dh from the kink, on the side the nudge crosses (``cross``)
    or on the side it moves away from. Returns the net, batch, loss, (l, n, j), gamma, the
    kink ratio r = (f^{-1}(h + dh) - a) f'(a) / dh from the piecewise-linear inverse written
    out here (1 when the kink is not crossed), and every (layer, sample, unit) whose nudge
    crosses a kink."""
    torch.manual_seed(seed)
    net = _fc()
    x, y = _batch(net)
    loss = build_loss("cross_entropy:reduction=sum")
    l, n, j, gamma, slope = 2, 0, 3, 1e-4, 0.1

    def place(a_target: float):
        with torch.no_grad():
            net.layers[l].bias[j] += a_target - net.trace(x).pre[l][n, j]

    place(1e-12)  # at the kink, to read the nudge's sign and size there
    s = float(torch.sign(_nudges(net, x, y, loss, gamma)[1][l][n, j]))
    place((-s if cross else s) * abs(float(_nudges(net, x, y, loss, gamma)[1][l][n, j])) / 4)
    tr, dh = _nudges(net, x, y, loss, gamma)
    a, d = float(tr.pre[l][n, j]), float(dh[l][n, j])
    h = a if a > 0 else slope * a
    finv = h + d if h + d > 0 else (h + d) / slope
    r = (finv - a) * (1.0 if a > 0 else slope) / d
    crossed = [(k, *t) for k in range(1, len(net.layers) - 1)
               for t in (((tr.outs[k] + dh[k]) > 0) != (tr.pre[k] > 0)).nonzero().tolist()]
    return net, x, y, loss, (l, n, j), gamma, r, crossed


def _backprop_scaling_one_preact_grad(net: InvertibleNet, loss, x, y, l: int, n: int, j: int, r: float):
    """Backprop's parameter gradients with the one entry dL/da_l[n, j] multiplied by r."""
    net.zero_grad(set_to_none=True)
    h = x
    for k, layer in enumerate(net.layers):
        a, out = layer.full(h)
        if k == l:
            scale = torch.ones_like(a)
            scale[n, j] = r
            a.register_hook(lambda g, scale=scale: g * scale)
        h = out[:, : layer.keep]
    loss(h, y).backward()
    return {name: p.grad.detach().clone() for name, p in net.named_parameters()}


def _rel(u: Tensor, g: Tensor) -> float:
    return float((u - g).norm() / g.norm())


@pytest.mark.parametrize("targets", ["inverse", "delta"])
def test_gp_at_orthogonal_init_departs_from_backprop_only_below_a_kink_its_nudge_crosses(targets):
    """With orthogonal weights and leaky ReLU, normalized GP's update is backprop's unless a
    nudge h_l + dh_l crosses a kink: the exact inverse then returns f^{-1}(h + dh) - a, not the
    linearised dh / f'(a), so the layers below l get backprop's update with dL/da_l[n, j] scaled
    by the ratio r of the two (between 1 and 1/slope from the positive side, slope and 1 from the
    negative), while layer l and the layers above keep backprop's; without a crossing GP is
    backprop's in every layer, at any gamma.
    (The step-0 angle of ~2 deg in the deep CIFAR run, docs/gait.md, is one such unit.)"""
    for cross in (True, False):
        net, x, y, loss, (l, n, j), gamma, r, crossed = _kink_setup(cross)
        assert crossed == ([(l, n, j)] if cross else []), crossed
        algo = build_algorithm(f"gait:gamma={gamma},ortho=0,targets={targets}", net, loss)
        algo.step(x, y)
        gp = {k: v.clone() for k, v in algo.task_updates.items()}
        bp = backprop_grads(net, loss, x, y)
        kink_bp = _backprop_scaling_one_preact_grad(net, loss, x, y, l, n, j, r)
        for k in range(len(net.layers)):
            for name in (f"layers.{k}.linear.weight", f"layers.{k}.linear.bias"):
                if k >= l or not cross:
                    assert _rel(gp[name], bp[name]) < 1e-8, (cross, name)
                else:
                    assert _rel(gp[name], kink_bp[name]) < 1e-8, name
                    assert _rel(gp[name], bp[name]) > 1e-2, name
        # crossed here from the positive side at a = |dh| / 4: r = 7.75, far from the linearised 1
        assert abs(r - 1.0) > 1.0 if cross else abs(r - 1.0) < 1e-12, r
