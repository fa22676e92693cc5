"""Oracles for node-perturbation feedback learning (Lansdell, Prakash & Kording, ICLR 2020)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from creditlab.algorithms import build_algorithm
from creditlab.algorithms._feedback_learning import np_estimate, ridge_update
from creditlab.diagnostics.node_perturbation import feedback_report, relative_error
from creditlab.errors import ConfigError
from creditlab.losses import build_loss
from creditlab.models import MLP, build_named_model
from tests.threads import one_thread

DT = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny tensors: intra-op threads only add overhead (and contend on a shared machine)
    with one_thread():
        yield


def mlp(sizes: str, act: str = "sigmoid", out_act: str = "sigmoid", seed: int = 0, init: str = "xavier_normal") -> MLP:
    torch.manual_seed(seed)
    return MLP(sizes, act=act, out_act=out_act, init=init).to(DT)


def optimizer_for(model, algo, lr: float, momentum: float = 0.0):
    groups = [{"params": list(model.parameters())}] + algo.param_groups(lr)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum)


def train_steps(model, algo, batches, lr: float, momentum: float = 0.0):
    opt = optimizer_for(model, algo, lr, momentum)
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        algo.step(x, y)
        opt.step()


def autograd_hidden_grads(model: MLP, loss, x, y):
    tr = model.trace(x)
    value = loss(tr.xs[-1], y)
    return torch.autograd.grad(value, tr.xs[1:-1])


# ---- the estimator -----------------------------------------------------------------------------

def test_np_estimate_is_unbiased_to_first_order_within_sampling_tolerance():
    model = mlp("5-6-4-3", act="tanh", out_act="sigmoid")
    loss = build_loss("mse")
    algo = build_algorithm("np:sigma=1e-3", model, loss)
    torch.manual_seed(1)
    x1, y1 = torch.randn(1, 5, dtype=DT), torch.rand(1, 3, dtype=DT)
    K = 20000
    x, y = x1.expand(K, -1).contiguous(), y1.expand(K, -1).contiguous()
    clean = algo.clean_pass(x, y)
    lam_hat = algo.targets(x, y, clean)
    true = autograd_hidden_grads(model, loss, x1, y1)
    for est, ref in zip(lam_hat, true):
        mean = est.mean(0)
        se = est.std(0) / math.sqrt(K)  # standard error of the mean, per hidden unit
        z = ((mean - ref[0]).abs() / se).max()
        assert z < 4.5, f"mean estimate off by {float(z):.1f} standard errors"
        # the tolerance is tight: it is a few percent of the gradient itself
        assert float(4.5 * se.max()) < 0.1 * float(ref.abs().max())


def test_np_estimate_scales_loss_difference_by_noise_over_variance():
    d = torch.tensor([2.0, -1.0], dtype=DT)
    n = torch.tensor([[0.1, 0.2], [0.3, -0.1]], dtype=DT)
    (lam,) = np_estimate(d, [n], sigma=0.5)
    assert torch.allclose(lam, d[:, None] * n / 0.25)


def test_ridge_update_equals_batch_ridge_solution():
    torch.manual_seed(0)
    X, Y = torch.randn(50, 4, dtype=DT), torch.randn(50, 3, dtype=DT)
    gamma = 0.1
    V, S = gamma * torch.eye(4, dtype=DT), torch.zeros(4, 3, dtype=DT)
    for chunk in range(5):
        B = ridge_update(V, S, X[10 * chunk:10 * chunk + 10], Y[10 * chunk:10 * chunk + 10])
    exact = torch.linalg.solve(X.T @ X + gamma * torch.eye(4, dtype=DT), X.T @ Y)
    assert torch.allclose(B, exact, atol=1e-12)


# ---- Theorem 2: ridge-fitted B converges to W in a deep linear net ---------------------------

def _fixed_w_ridge_errors(arch: str, act: str, sigma: float, steps: int, batch: int, seed: int = 0,
                          form: str = "fa") -> list[float]:
    """Relative error |W - B|/|W| per layer after ``steps`` batches of ridge-fitted NP with W
    frozen (warm-up longer than the run); also checks that W did not move."""
    model = mlp(arch, act=act, out_act=act, seed=seed, init="orthogonal")
    w_before = [p.detach().clone() for p in model.parameters()]
    algo = build_algorithm(f"np:sigma={sigma},form={form},fit=ridge,gamma=0.1,warmup=1000000", model, build_loss("mse"))
    gen = torch.Generator().manual_seed(seed + 1)
    n_in, n_out = model.sizes[0], model.sizes[-1]
    batches = [(torch.randn(batch, n_in, dtype=DT, generator=gen), torch.rand(batch, n_out, dtype=DT, generator=gen))
               for _ in range(steps)]
    torch.manual_seed(seed + 2)
    train_steps(model, algo, batches, lr=0.1)
    assert all(torch.equal(a, b) for a, b in zip(w_before, model.parameters()))
    return [relative_error(w, b) for _, w, b in algo.feedback_pairs()]


def test_ridge_fitted_feedback_converges_to_forward_weights_in_deep_linear_net():
    # Theorem 2: every layer's B -> W as samples grow (hidden widths <= output width, so the
    # regressors e~ are full rank: assumption A3).
    few = _fixed_w_ridge_errors("6-4-4-4", "linear", sigma=1e-2, steps=5, batch=256)
    many = _fixed_w_ridge_errors("6-4-4-4", "linear", sigma=1e-2, steps=200, batch=256)
    tiny_noise = _fixed_w_ridge_errors("6-4-4-4", "linear", sigma=1e-5, steps=200, batch=256)
    assert all(m < f / 4 for m, f in zip(many, few)), (few, many)
    assert max(many) < 0.1 and max(tiny_noise) < 0.1, (many, tiny_noise)


def test_ridge_fitted_direct_feedback_converges_to_product_of_forward_weights_in_linear_net():
    # Corollary 1: in the DFA form B^{i+1} -> W^{N+1} ... W^{i+1}.
    few = _fixed_w_ridge_errors("6-4-4-4", "linear", sigma=1e-2, steps=3, batch=256, form="dfa")
    many = _fixed_w_ridge_errors("6-4-4-4", "linear", sigma=1e-2, steps=150, batch=256, form="dfa")
    assert all(m < f / 4 for m, f in zip(many, few)) and max(many) < 0.1, (few, many)


def test_ridge_fitted_feedback_bias_shrinks_with_noise_in_shallow_sigmoid_net():
    # Theorem 1: in a nonlinear net the estimate is biased by O(sigma); it vanishes as sigma -> 0.
    large = _fixed_w_ridge_errors("6-5-4", "sigmoid", sigma=1.0, steps=100, batch=256)
    small = _fixed_w_ridge_errors("6-5-4", "sigmoid", sigma=1e-2, steps=100, batch=256)
    assert small[0] < 0.05 and large[0] > 3 * small[0], (small, large)


# ---- equivalences ------------------------------------------------------------------------------

def hand_fa_grads(model: MLP, Bs, loss, x, y):
    """Feedback alignment on an MLP by hand: delta_l = (delta_{l+1} B_{l+1}) * f'(a_l)."""
    with torch.no_grad():
        tr = model.trace(x)
        delta = loss.grad(tr.xs[-1], y) * model.acts[-1].df(tr.pre[-1])
        grads = {}
        for l in reversed(range(len(model.layers))):
            grads[l] = (delta.T @ tr.xs[l], delta.sum(0))
            if l > 0:
                delta = (delta @ Bs[l - 1]) * model.acts[l - 1].df(tr.pre[l - 1])
    return grads


def test_np_with_zero_feedback_learning_rate_equals_feedback_alignment():
    model = mlp("10-8-6-4")
    loss = build_loss("mse")
    algo = build_algorithm("np:sigma=0.05,b_lr=0", model, loss)
    B0 = [b.clone() for b in algo.B]
    ref = copy.deepcopy(model)
    torch.manual_seed(3)
    batches = [(torch.randn(16, 10, dtype=DT), torch.randint(0, 4, (16,))) for _ in range(6)]
    opt = optimizer_for(model, algo, lr=0.5, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5, momentum=0.9)
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        algo.step(x, y)
        opt.step()
        ref_opt.zero_grad(set_to_none=True)
        for l, (gw, gb) in hand_fa_grads(ref, B0, loss, x, y).items():
            ref.layers[l].weight.grad, ref.layers[l].bias.grad = gw, gb
        ref_opt.step()
    assert all(torch.equal(a, b) for a, b in zip(algo.B, B0)), "B moved with b_lr=0"
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(p, q, atol=1e-12, rtol=0)
    assert not torch.allclose(model.layers[0].weight, mlp("10-8-6-4").layers[0].weight)


@pytest.mark.parametrize("form", ["fa", "dfa"])
def test_sg_with_exact_fit_reproduces_backprop_update_in_linear_net(form):
    # hidden widths <= output width: the regressors are full rank, so the exact least-squares
    # B is unique (with wider layers the update still equals backprop's, B only on a subspace)
    model = mlp("6-3-3-3", act="linear", out_act="linear")
    loss = build_loss("mse")
    algo = build_algorithm(f"sg:form={form},fit=ridge,gamma=1e-12,order=sequential", model, loss)
    torch.manual_seed(4)
    x, y = torch.randn(32, 6, dtype=DT), torch.randn(32, 3, dtype=DT)
    algo.step(x, y)
    ref = torch.autograd.grad(loss(model(x), y), list(model.parameters()))
    for p, g in zip(model.parameters(), ref):
        assert torch.allclose(p.grad, g, atol=1e-8, rtol=1e-8)
    # and the fitted B is W (fa) or the product of the matrices above (dfa)
    assert max(relative_error(w, b) for _, w, b in algo.feedback_pairs()) < 1e-8


def test_np_fa_form_with_feedback_equal_to_forward_weights_gives_backprop_update():
    model = mlp("7-6-5-3")
    loss = build_loss("mse")
    algo = build_algorithm("np", model, loss)
    for i, blk in enumerate(algo.net.blocks[1:]):
        algo.B[i].copy_(blk.layer.weight.detach())
    torch.manual_seed(5)
    x, y = torch.randn(8, 7, dtype=DT), torch.randint(0, 3, (8,))
    algo.step(x, y)
    ref = torch.autograd.grad(loss(model(x), y), list(model.parameters()))
    for p, g in zip(model.parameters(), ref):
        assert torch.allclose(p.grad, g, atol=1e-12)
    rep = feedback_report(algo, x, y)
    assert all(v < 1e-5 for k, v in rep.items() if "grad_angle" in k or "rel_error" in k)
    assert all(v == 100.0 for k, v in rep.items() if "sign_pct" in k)


def test_np_output_layer_gets_true_local_delta():
    model = mlp("7-6-5-3")
    loss = build_loss("mse")
    algo = build_algorithm("np:form=dfa", model, loss)
    x, y = torch.randn(8, 7, dtype=DT), torch.randint(0, 3, (8,))
    algo.step(x, y)
    last = model.layers[-1]
    gw, gb = torch.autograd.grad(loss(model(x), y), [last.weight, last.bias])
    assert torch.allclose(last.weight.grad, gw, atol=1e-12) and torch.allclose(last.bias.grad, gb, atol=1e-12)


def test_warmup_freezes_forward_weights_bitwise_while_feedback_learns():
    model = mlp("10-8-6-4")
    algo = build_algorithm("np:sigma=0.05,b_lr=0.1,warmup=3", model, build_loss("mse"))
    w0 = [p.detach().clone() for p in model.parameters()]
    b0 = [b.clone() for b in algo.B]
    torch.manual_seed(6)
    batches = [(torch.randn(16, 10, dtype=DT), torch.randint(0, 4, (16,))) for _ in range(4)]
    opt = optimizer_for(model, algo, lr=0.5, momentum=0.9)
    for k, (x, y) in enumerate(batches):
        opt.zero_grad(set_to_none=True)
        algo.step(x, y)
        opt.step()
        frozen = all(torch.equal(a, b) for a, b in zip(w0, model.parameters()))
        assert frozen == (k < 3), f"step {k}: frozen={frozen}"
    assert not any(torch.equal(a, b) for a, b in zip(b0, algo.B))


def test_matched_shrinks_w_minus_b_by_one_minus_lr_times_decay():
    model = mlp("10-8-6-4")
    algo = build_algorithm("matched:decay=0.3", model, build_loss("mse"))
    lr = 0.2
    gap0 = [blk.layer.weight.detach() - b for blk, b in zip(algo.net.blocks[1:], algo.B)]
    train_steps(model, algo, [(torch.randn(16, 10, dtype=DT), torch.randint(0, 4, (16,)))], lr=lr)
    gap1 = [blk.layer.weight.detach() - b for blk, b in zip(algo.net.blocks[1:], algo.B)]
    for a, b in zip(gap0, gap1):
        assert torch.allclose(b, (1 - lr * 0.3) * a, atol=1e-12)


# ---- plumbing, models, options -----------------------------------------------------------------

def test_state_dict_roundtrip_resumes_identically():
    torch.manual_seed(7)
    batches = [(torch.randn(16, 10, dtype=DT), torch.randint(0, 4, (16,))) for _ in range(4)]
    for spec in ("np:fit=ridge", "np:b_lr=0.1"):
        model = mlp("10-8-6-4")
        algo = build_algorithm(spec, model, build_loss("mse"))
        train_steps(model, algo, batches[:2], lr=0.1)
        state = copy.deepcopy(algo.state_dict())
        model2 = copy.deepcopy(model)
        algo2 = build_algorithm(spec, model2, build_loss("mse"))
        algo2.load_state_dict(state)
        torch.manual_seed(8)
        train_steps(model, algo, batches[2:], lr=0.1)
        torch.manual_seed(8)
        train_steps(model2, algo2, batches[2:], lr=0.1)
        assert all(torch.equal(a, b) for a, b in zip(algo.B, algo2.B))
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


def test_cnn_np_dfa_uses_the_same_dropout_mask_in_clean_and_noisy_pass():
    torch.manual_seed(9)
    model = build_named_model("lansdell_cnn", (3, 32, 32), 10, width=0.0625).to(DT).train()
    loss = build_loss("cross_entropy")
    algo = build_algorithm("np:form=dfa,sigma=1e-7,b_lr=1e-3", model, loss)
    x, y = torch.rand(6, 3, 32, 32, dtype=DT), torch.randint(0, 10, (6,))
    clean = algo.clean_pass(x, y)
    noisy, _ = algo.noisy_loss(x, y, clean)
    # same masks: the loss moves by O(sigma); fresh masks would move it by O(1)
    assert float((noisy - clean.per_sample).abs().max()) < 1e-4
    opt = torch.optim.Adam(list(model.parameters()) + [p for g in algo.param_groups(1e-3) for p in g["params"]], lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        res = algo.step(x, y)
        opt.step()
    assert math.isfinite(float(res.loss))
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_cnn_has_paper_layout_for_cifar100():
    model = build_named_model("lansdell_cnn", (3, 32, 32), 100)
    convs = [m for m in model if isinstance(m, torch.nn.Conv2d)]
    fcs = [m for m in model if isinstance(m, torch.nn.Linear)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(32, (3, 3)), (128, (5, 5)), (256, (5, 5))]
    assert [f.out_features for f in fcs] == [2048, 2048, 100]
    assert sum(isinstance(m, torch.nn.Dropout) and m.p == 0.5 for m in model) == 2
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 100)


def test_bp_noise_options_change_the_update_and_default_is_plain_autograd():
    model = mlp("10-8-6-4")
    loss = build_loss("mse")
    x, y = torch.randn(16, 10, dtype=DT), torch.randint(0, 4, (16,))
    ref = torch.autograd.grad(loss(model(x), y), list(model.parameters()))
    for spec, same in (("bp", True), ("bp:noise=0", True), ("bp:noise=0.1", False), ("bp:input_noise=0.3", False)):
        build_algorithm(spec, model, loss).step(x, y)
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), ref)) == same, spec


def test_autoencoder_model_matches_paper_architecture():
    m = build_named_model("lansdell_autoencoder", (1, 28, 28), 10)
    assert m.sizes == [784, 200, 2, 200, 784]
    assert [a.name for a in m.acts] == ["tanh", "linear", "tanh", "relu"]
    m2 = build_named_model("lansdell_mnist", (1, 28, 28), 10, variant="paper")
    assert m2.sizes == [784, 50, 20, 10] and all(a.name == "sigmoid" for a in m2.acts)
    default = build_named_model("lansdell_mnist", (1, 28, 28), 10)  # the authors' code: a linear output
    assert [a.name for a in default.acts] == ["sigmoid", "sigmoid", "linear"]


@pytest.mark.parametrize("spec", ["np:sigma=0", "np:fit=adam", "np:form=xyz", "np:order=sequential",
                                  "np:warmup=-1", "sg:gamma=-1", "matched:form=dfa", "matched:decay=-1"])
def test_bad_options_raise_config_error(spec):
    with pytest.raises(ConfigError):
        build_algorithm(spec, mlp("10-8-6-4"), build_loss("mse"))


def test_fa_form_on_convolutional_model_is_rejected_with_hint():
    model = build_named_model("lansdell_cnn", (3, 32, 32), 10, width=0.0625)
    with pytest.raises(ConfigError, match="form=dfa"):
        build_algorithm("np:form=fa", model, build_loss("cross_entropy"))


def test_training_loop_logs_and_plots_the_three_diagnostics(tmp_path):
    from creditlab.diagnostics.node_perturbation import plot_feedback_diagnostics, read_step_rows
    from creditlab.train import train

    cfg = {"dataset": "fake:n=256,classes=4,shape=1x4x4", "model": {"arch": "16-8-6-4", "act": "sigmoid", "out_act": "sigmoid"},
           "loss": "mse", "algo": "np:sigma=0.01,fit=ridge,warmup=4", "optimizer": {"name": "sgd", "lr": 0.01},
           "epochs": 1, "batch_size": 32, "log_every": 2, "threads": 1}
    train(cfg, tmp_path / "run", progress=False)
    rows = read_step_rows(str(tmp_path / "run" / "metrics.jsonl"))
    for metric in ("rel_error", "grad_angle_deg", "sign_pct"):
        assert all(f"np/{metric}/layers.{i}" in rows[-1] for i in (1, 2))
    plot_feedback_diagnostics(str(tmp_path / "diag.png"), {"np": rows})
    assert (tmp_path / "diag.png").stat().st_size > 0


def test_autoencoder_with_denoising_input_and_np_runs_in_the_training_loop(tmp_path):
    from creditlab.train import train

    for algo in ("bp:input_noise=0.3", "np:sigma=0.02,b_lr=1e-4", "sg", "matched"):
        cfg = {"dataset": "fake:n=128,classes=4,shape=1x4x4", "task": "autoencode",
               "model": {"name": "lansdell_autoencoder", "options": {"hidden": 8}}, "loss": "mse", "algo": algo,
               "optimizer": {"name": "sgd", "lr": 1e-3}, "epochs": 1, "batch_size": 32, "log_every": 2, "threads": 1}
        s = train(cfg, tmp_path / algo.replace(":", "_"), progress=False)
        assert math.isfinite(s["test_loss"])


def test_cnn_output_layer_update_equals_autograd_under_the_same_dropout_mask():
    torch.manual_seed(10)
    model = build_named_model("lansdell_cnn", (3, 32, 32), 10, width=0.0625).to(DT).train()
    loss = build_loss("cross_entropy")
    algo = build_algorithm("np:form=dfa,sigma=0.067", model, loss)
    x, y = torch.rand(6, 3, 32, 32, dtype=DT), torch.randint(0, 10, (6,))
    state = torch.get_rng_state()
    algo.step(x, y)
    last = model[16]
    torch.set_rng_state(state)  # autograd replays the clean pass's dropout masks
    gw, gb = torch.autograd.grad(loss(model(x), y), [last.weight, last.bias])
    assert torch.allclose(last.weight.grad, gw, atol=1e-12) and torch.allclose(last.bias.grad, gb, atol=1e-12)


# ---- the authors' set-ups (benlansdell/synthfeedback, benlansdell/ssdfa) -------------------------

_EXPERIMENTS = __import__("pathlib").Path(__file__).resolve().parents[1] / "experiments"


def _experiment_model(name: str, shape: tuple[int, ...], num_out: int):
    from creditlab import config
    from creditlab.build import build_model

    cfg = config.load(_EXPERIMENTS / name)
    return cfg, build_model(cfg, shape, num_out)


@pytest.mark.parametrize("name", ["np-mnist.yaml", "np-mnist-sigma.yaml", "np-mnist-fixedw.yaml"])
def test_lansdell_mnist_set_ups_follow_the_authors_linear_output_layer(name):
    _, model = _experiment_model(name, (1, 28, 28), 10)
    assert model.sizes == [784, 50, 20, 10]
    assert [a.name for a in model.acts] == ["sigmoid", "sigmoid", "linear"]
    paper = build_named_model("lansdell_mnist", (1, 28, 28), 10, variant="paper")
    assert [a.name for a in paper.acts] == ["sigmoid"] * 3
    with pytest.raises(ConfigError, match="variant"):
        build_named_model("lansdell_mnist", (1, 28, 28), 10, variant="code")


def test_authors_autoencoder_set_up_trains_np_sg_and_matched_on_784_50_2_50_784():
    cfg, model = _experiment_model("np-autoencoder-authors.yaml", (1, 28, 28), 784)
    assert model.sizes == [784, 50, 2, 50, 784]
    assert [a.name for a in model.acts] == ["tanh", "linear", "tanh", "relu"]
    assert sorted(a.split(":")[0] for a in cfg["algos"]) == ["matched", "np", "sg"]
    _, wide = _experiment_model("np-autoencoder.yaml", (1, 28, 28), 784)  # BP, FA, DAE: 200
    assert wide.sizes == [784, 200, 2, 200, 784]


def test_authors_cnn_variant_has_the_5x5x96_tanh_net_with_per_image_standardisation():
    from creditlab.models.lansdell import PerImageStandardization

    cfg, model = _experiment_model("np-cifar10-authors.yaml", (3, 32, 32), 10)
    assert cfg["batch_size"] == 128 and cfg["optimizer"]["name"] == "adam"
    assert all("b_optimizer=sgd" in a for a in cfg["algos"] if a.startswith(("np", "sg")))
    mods = list(model)
    assert isinstance(mods[0], PerImageStandardization)
    convs = [m for m in mods if isinstance(m, torch.nn.Conv2d)]
    assert [(c.kernel_size, c.out_channels) for c in convs] == [((5, 5), 96), ((5, 5), 128), ((5, 5), 256)]
    assert all(a.name == "tanh" for a in mods if hasattr(a, "name") and hasattr(a, "df"))
    assert all(torch.all(m.bias == 0.1) for m in mods if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    paper = list(build_named_model("lansdell_cnn", (3, 32, 32), 10))
    assert isinstance(paper[0], torch.nn.Conv2d) and paper[0].out_channels == 32 and paper[0].kernel_size == (3, 3)
    # TensorFlow's per_image_standardization: (x - mean) / max(std, 1/sqrt(N)) per image
    torch.manual_seed(0)
    x = torch.rand(3, 3, 4, 4, dtype=DT) * 5 + 2
    x[2] = 7.0  # a constant image: std 0, floored at 1/sqrt(48)
    out = PerImageStandardization()(x)
    for n in range(3):
        v = x[n].flatten()
        ref = (v - v.mean()) / max(float(v.std(unbiased=False)), 1 / math.sqrt(48))
        torch.testing.assert_close(out[n].flatten(), ref)
    # the feedback learners take the standardisation as a parameter-free first module
    small = build_named_model("lansdell_cnn", (3, 32, 32), 10, variant="authors", width=0.0625)
    build_algorithm("np:form=dfa,sigma=0.067", small, build_loss("cross_entropy")).step(
        torch.rand(2, 3, 32, 32), torch.tensor([1, 3]))


@pytest.mark.parametrize("spec", ["np:form=dfa,sigma=0.05,b_lr=0.3,b_optimizer=sgd", "sg:form=dfa,b_lr=0.3,b_optimizer=sgd"])
def test_b_optimizer_sgd_steps_the_feedback_weights_by_plain_sgd_while_w_uses_adam(spec):
    from creditlab.build import build_optimizer
    from creditlab.config import resolve

    cfg = resolve({"dataset": "fake:n=8,shape=6,classes=3,test=4", "model": {"arch": "6-5-4-3"}, "algo": spec,
                   "optimizer": {"name": "adam", "lr": 1e-2, "weight_decay": 0.1}, "epochs": 1, "log_every": 0})
    model = mlp("6-5-4-3")
    algo = build_algorithm(spec, model, build_loss("mse"))
    opt = build_optimizer(cfg, model, algo)
    x, y = torch.randn(8, 6, dtype=DT), torch.randint(0, 3, (8,))
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        algo.step(x, y)
        b0 = [b.detach().clone() for b in algo.B]
        w0 = [p.detach().clone() for p in model.parameters()]
        grads = [b.grad.clone() for b in algo.B]
        opt.step()
        for b, before, g in zip(algo.B, b0, grads):  # plain SGD: no moments, no weight decay
            torch.testing.assert_close(b.detach(), before - 0.3 * g, rtol=0, atol=1e-15)
        assert all(not torch.equal(a, p) for a, p in zip(w0, model.parameters()))
    assert all(len(opt.state[b]) == 0 for b in algo.B)  # no Adam moments for B
    assert all(len(opt.state[p]) > 0 for p in model.parameters())
    with pytest.raises(ConfigError, match="b_optimizer"):
        build_algorithm("np:fit=ridge,b_optimizer=sgd", mlp("6-5-4-3"), build_loss("mse"))
