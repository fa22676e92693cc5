"""Sign symmetry (signsym: usf, brsf, frsf), Kolen-Pollack (kp) and weight mirrors (wm) against
autograd and the closed forms their definitions give (float64)."""

import io
import json
import math

import pytest
import torch
from torch import nn

from creditlab.algorithms import build_algorithm
from creditlab.algorithms._feedback import sending_layers, transpose_apply
from creditlab.diagnostics import backprop_grads, layer_groups
from creditlab.diagnostics.angles import current_updates
from creditlab.errors import ConfigError
from creditlab.losses import build_loss
from creditlab.models import MLP
from creditlab.models.locally_connected import LocallyConnected2d

FAMILIES = ["signsym", "signsym:variant=brsf", "signsym:variant=frsf", "kp", "kp:decay=0.1", "wm",
            "wm:mirror_steps=2"]


class ConvNet(nn.Module):
    """Convs (zero padding), max-pool, locally connected and linear layers."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.lc = LocallyConnected2d(3, 4, 3, 2, in_size=4)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        h = self.pool(torch.tanh(self.conv2(torch.tanh(self.conv(x)))))
        return self.fc(torch.tanh(self.lc(h)).flatten(1))


def _mlp():
    return MLP("6-5-4-3", act="tanh").double()


def _batch(model, n=8):
    x = torch.randn(n, 2, 8, 8, dtype=torch.float64) if isinstance(model, ConvNet) else torch.randn(n, 6, dtype=torch.float64)
    return x, torch.arange(n) % (5 if isinstance(model, ConvNet) else 3)


def angle(a, b):
    """Angle in degrees, accurate near 0 (2 asin(|a/|a| - b/|b|| / 2), not acos of a cosine)."""
    a, b = a.reshape(-1).double(), b.reshape(-1).double()
    return math.degrees(2 * math.asin(min(1.0, float((a / a.norm() - b / b.norm()).norm()) / 2)))


def layer_update_angles(model, updates, reference):
    out = {}
    for name, params in layer_groups(model).items():
        u = torch.cat([updates[p].reshape(-1) for p in params])
        r = torch.cat([reference[p].reshape(-1) for p in params])
        out[name] = angle(u, r)
    return out


def sgd(model, algo, lr):
    return torch.optim.SGD([{"params": list(model.parameters())}] + algo.param_groups(lr), lr=lr)


# ---- sign symmetry -------------------------------------------------------------------------
@pytest.mark.parametrize("make", [_mlp, lambda: ConvNet().double()])
def test_usf_with_equal_weight_magnitudes_follows_backprop_direction(make):
    torch.manual_seed(0)
    model = make()
    loss = build_loss("cross_entropy")
    x, y = _batch(model)
    algo = build_algorithm("signsym", model, loss)
    with torch.no_grad():  # |W| = c_l in every layer: sign(W) s_l = (s_l / c_l) W, a positive multiple
        for i, (_, layer) in enumerate(algo.layers):
            layer.weight.copy_(torch.sign(torch.randn_like(layer.weight)) * (0.3 + 0.2 * i))
    ref = backprop_grads(model, loss, x, y)
    algo.step(x, y)
    angles = layer_update_angles(model, current_updates(model), ref)
    assert all(a < 1e-6 for a in angles.values()), angles
    # the scale differs from backprop's (s_l / c_l != 1), only the direction is kept
    assert not torch.allclose(next(iter(model.parameters())).grad, next(iter(ref.values())), rtol=1e-3)
    # with unequal magnitudes the layers below the output are off backprop's direction
    with torch.no_grad():
        for _, layer in algo.layers:
            layer.weight.mul_(torch.rand_like(layer.weight) + 0.5)
    ref = backprop_grads(model, loss, x, y)
    algo.step(x, y)
    angles = layer_update_angles(model, current_updates(model), ref)
    assert max(angles.values()) > 0.1, angles


def test_usf_feedback_is_the_current_sign_times_the_init_scale():
    torch.manual_seed(0)
    model = MLP("300-200-10", act="tanh", init="xavier").double()
    x, y = torch.randn(4, 300, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    loss = build_loss("cross_entropy")
    xavier = build_algorithm("signsym:init=xavier", model, loss)
    like = build_algorithm("signsym", model, loss)
    with torch.no_grad():
        model.layers[1].weight.neg_()  # the feedback follows W's sign as it is at the step
    for algo in (xavier, like):
        algo.step(x, y)
    w = model.layers[1].weight.detach()
    # BioTorch's xavier factor sqrt(2 / (fan_in + fan_out)); `like` measures W's std at construction
    assert torch.equal(xavier.B["layers.1"], torch.sign(w) * math.sqrt(2 / (200 + 10)))
    assert abs(like.B["layers.1"].abs().mean() / math.sqrt(2 / 210) - 1) < 0.05
    assert set(xavier.B) == {"layers.1"}  # the first layer sends nothing below: no feedback formed


def test_brsf_draws_new_magnitudes_every_step_and_frsf_never():
    loss = build_loss("cross_entropy")
    torch.manual_seed(0)
    model = _mlp()
    x, y = _batch(model)
    seen = {}
    for variant in ("brsf", "frsf", "usf"):
        algo = build_algorithm(f"signsym:variant={variant}", model, loss)
        algo.step(x, y)
        first = {k: v.clone() for k, v in algo.B.items()}
        with torch.no_grad():
            for _, layer in algo.layers:  # change W and flip some of its signs between the steps
                layer.weight.mul_(torch.where(torch.rand_like(layer.weight) < 0.3, -2.0, 1.5))
        algo.step(x, y)
        for name, layer in sending_layers(algo.layers, algo.state):
            b = algo.B[name]
            assert torch.equal(torch.sign(b), torch.sign(layer.weight.detach())), (variant, name)
            same = torch.equal(b.abs(), first[name].abs())
            seen[variant, name] = same
            assert same == (variant != "brsf"), (variant, name)
    assert len(seen) == 6


# ---- Kolen-Pollack -------------------------------------------------------------------------
def _linear_problem():
    torch.manual_seed(0)
    x = torch.randn(32, 6, dtype=torch.float64)
    return x, x @ torch.randn(6, 3, dtype=torch.float64) / math.sqrt(6)


def _train_kp(spec, steps, lr=0.05):
    x, t = _linear_problem()
    torch.manual_seed(1)
    model = MLP("6-5-4-3", act="linear").double()
    algo = build_algorithm(spec, model, build_loss("mse:reduction=mean"))
    opt = sgd(model, algo, lr)
    w0 = {n: m.weight.detach().clone() for n, m in algo.layers}
    d0 = {n: (m.weight.detach() - algo.B[n]).clone() for n, m in algo.layers}
    before = {n: angle(algo.B[n], m.weight.detach()) for n, m in algo.layers}
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        algo.step(x, t)
        opt.step()
    return algo, w0, d0, before


def test_kp_with_decay_aligns_feedback_with_the_forward_weights():
    algo, _, _, before = _train_kp("kp:decay=0.5", 300)
    sending = sending_layers(algo.layers, algo.state)
    assert [n for n, _ in sending] == ["layers.1", "layers.2"]
    for name, layer in sending:
        assert before[name] > 30
        assert angle(algo.B[name], layer.weight.detach()) < 1.0, name
        diag = algo.diagnostics()
        assert diag[f"feedback_angle_deg/{name}"] < 1.0 and diag[f"sign_congruence_pct/{name}"] == 100.0


def test_kp_without_decay_keeps_w_minus_b_constant():
    algo, w0, d0, _ = _train_kp("kp:decay=0", 300)
    for name, layer in sending_layers(algo.layers, algo.state):
        w = layer.weight.detach()
        assert (w - w0[name]).norm() > 0.1 * w0[name].norm()  # W moved
        assert ((w - algo.B[name]) - d0[name]).norm() <= 1e-12 * d0[name].norm(), name


def test_kp_decays_a_weight_that_two_layers_share_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))

    torch.manual_seed(0)
    model = Tied().double()
    x, t = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    loss = build_loss("mse")
    plain = build_algorithm("kp:decay=0", model, loss)
    plain.step(x, t)  # the local products alone
    g = {n: m.weight.grad.clone() for n, m in plain.layers}
    algo = build_algorithm("kp:decay=0.5", model, loss)
    algo.B = plain.B  # the same feedback, so the same products
    algo.step(x, t)
    w = model.a.weight.detach()
    assert torch.allclose(model.a.weight.grad, g["a"] + 0.5 * w, rtol=1e-12, atol=0)
    for name in ("b", "c"):  # the layers that send an error below: B's update is W's plus B's decay
        assert torch.allclose(algo.B[name].grad, g[name] + 0.5 * algo.B[name], rtol=1e-12, atol=0), name


def test_kp_reports_the_update_without_its_decay():
    torch.manual_seed(0)
    model = _mlp()
    x, y = _batch(model)
    loss = build_loss("cross_entropy")
    algo = build_algorithm("kp:decay=0.3", model, loss)
    ref = backprop_grads(model, loss, x, y)
    algo.step(x, y)
    out = model.layers[2]  # the output layer's local product is backprop's gradient
    assert torch.allclose(algo.reported_updates()["layers.2.weight"], ref["layers.2.weight"], atol=1e-14)
    assert torch.allclose(out.weight.grad, ref["layers.2.weight"] + 0.3 * out.weight.detach(), atol=1e-14)
    b = algo.B["layers.2"]
    assert torch.allclose(b.grad, ref["layers.2.weight"] + 0.3 * b, atol=1e-14)
    assert algo.B["layers.0"].grad is None  # the first layer's B is never used, so never trained


# ---- weight mirrors ------------------------------------------------------------------------
def test_wm_mirror_recovers_the_forward_weights_from_noise_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 10), nn.Tanh(), nn.Linear(10, 5)).double()
    algo = build_algorithm("wm", model, build_loss("mse"))  # defaults: B -> 0.01 * 1 / 0.01 W = W
    before = {n: angle(algo.B[n], m.weight.detach()) for n, m in algo.layers}
    algo.mirror(steps=1000, batch=64)  # no data: noise only
    for name, layer in algo.layers:
        w = layer.weight.detach()
        assert before[name] > 45
        assert angle(algo.B[name], w) < 5.0, name
        assert abs(float(algo.B[name].norm() / w.norm()) - 1) < 0.1, name


@pytest.mark.parametrize("shape", [(16, 5), (4, 7, 5)], ids=["samples", "samples-by-positions"])
def test_wm_mirror_step_is_the_decayed_feedback_plus_the_mean_noise_correlation(shape):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    algo = build_algorithm("wm:sigma=0.5,mirror_lr=0.03,mirror_decay=0.2", model, build_loss("mse"))
    layer, b0 = model[2], algo.B["2"].clone()
    torch.manual_seed(1)
    algo._mirror_layer("2", layer, torch.Size(shape))
    torch.manual_seed(1)  # the same noise: N(0, sigma^2), drawn as the layer's input
    x = 0.5 * torch.randn(shape, dtype=torch.float64)
    y = x @ layer.weight.detach().t()  # linear, no bias
    corr = torch.einsum("...o,...i->oi", y, x)  # summed over the samples (and positions)
    meets = x.numel() // x.shape[-1]  # a weight meets one input per sample and position
    expected = (1 - 0.2) * b0 + 0.03 * corr / meets
    assert torch.allclose(algo.B["2"], expected, rtol=1e-12, atol=1e-15)
    assert not torch.allclose(algo.B["2"], (1 - 0.2) * b0, rtol=1e-3)


def test_wm_mirror_on_conv_and_locally_connected_layers():
    torch.manual_seed(0)
    model = ConvNet().double()
    x, y = _batch(model)
    algo = build_algorithm("wm:mirror_lr=0.002,mirror_decay=0.002", model, build_loss("cross_entropy"))
    algo.step(x, y)  # records each layer's input shape; the mirror runs inside the step
    algo.mirror(steps=2000)
    sending = sending_layers(algo.layers, algo.state)
    assert [n for n, _ in sending] == ["conv2", "lc", "fc"]
    for name, layer in sending:
        # what B is for: the error it sends to the layer's input, compared with W^T's. (Weights
        # that only ever meet zero padding get no correlation and decay, but send nothing either.)
        shape = algo.state.inputs[name]
        g = torch.randn_like(layer(torch.zeros(shape, dtype=torch.float64)))
        sent = transpose_apply(layer, g, algo.B[name], shape)
        assert angle(sent, transpose_apply(layer, g, layer.weight.detach(), shape)) < 6.0, name
    # a border tap meets fewer inputs; counted per tap, the conv's B is W itself, not a distortion
    assert angle(algo.B["conv2"], model.conv2.weight.detach()) < 3.0
    assert {k.split("/")[1] for k in algo.diagnostics()} == {"conv2", "lc", "fc"}


def test_wm_mirror_runs_inside_the_step_before_the_backward_pass():
    torch.manual_seed(0)
    model = _mlp()
    x, y = _batch(model)
    loss = build_loss("cross_entropy")
    algo = build_algorithm("wm:mirror_steps=3", model, loss)
    b0 = {k: v.clone() for k, v in algo.B.items()}
    algo.step(x, y)
    assert torch.equal(algo.B["layers.0"], b0["layers.0"])  # first layer: nothing to send, not mirrored
    assert not torch.equal(algo.B["layers.1"], b0["layers.1"])
    used = {k: v.clone() for k, v in algo.B.items()}
    g = model.layers[0].weight.grad.clone()
    fa = build_algorithm("fa", model, loss)  # FA with the mirrored B gives the same updates
    fa.B = used
    fa.step(x, y)
    assert torch.allclose(model.layers[0].weight.grad, g, atol=1e-14)


# ---- checkpoints, options, the training loop -----------------------------------------------
@pytest.mark.parametrize("spec", FAMILIES)
def test_state_dict_round_trip_gives_the_same_next_step(spec):
    torch.manual_seed(0)
    model = _mlp()
    x, y = _batch(model)
    loss = build_loss("cross_entropy")
    algo = build_algorithm(spec, model, loss)
    opt = sgd(model, algo, 0.1)
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        algo.step(x, y)
        opt.step()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "algo": algo.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    torch.manual_seed(5)  # a fresh algorithm draws other random feedback
    fresh_model = _mlp()
    fresh_model.load_state_dict(saved["model"])
    fresh = build_algorithm(spec, fresh_model, loss)
    fresh.load_state_dict(saved["algo"])
    results = []
    for m, a in ((model, algo), (fresh_model, fresh)):
        torch.manual_seed(7)  # brsf draws its magnitudes from the generator
        for p in list(m.parameters()) + [p for g in a.param_groups(1.0) for p in g["params"]]:
            p.grad = None
        a.step(x, y)
        results.append([p.grad.clone() for p in m.parameters()]
                       + [p.grad.clone() for g in a.param_groups(1.0) for p in g["params"] if p.grad is not None])
    assert len(results[0]) == len(results[1])
    assert all(torch.equal(u, v) for u, v in zip(*results))


def test_bad_options_are_refused():
    model = MLP("3-2-2")
    loss = build_loss("mse")
    for spec, match in [("signsym:variant=sf", "variant"), ("signsym:init=bogus", "unknown init"),
                        ("kp:decay=-1", "decay"), ("wm:sigma=0", "sigma"), ("wm:mirror_steps=1.5", "mirror_steps"),
                        ("wm:mirror_decay=2", "mirror_decay"), ("kp:noise=0.1", "unknown option")]:
        with pytest.raises(ConfigError, match=match):
            build_algorithm(spec, model, loss)


@pytest.mark.parametrize("model", [{"arch": "16-10-8-3", "act": "tanh"}, {"name": "conv-pool", "options": {"channels": 3}}],
                         ids=["mlp", "conv"])
@pytest.mark.parametrize("spec", ["signsym", "signsym:variant=brsf", "signsym:variant=frsf", "kp", "wm"])
def test_each_family_trains_through_the_training_loop(spec, model, tmp_path):
    from creditlab.train import train

    cfg = {"dataset": "fake:n=60,classes=3,shape=1x4x4,test=20", "val_size": 12, "batch_size": 15, "epochs": 1,
           "model": model, "algo": spec, "optimizer": {"name": "sgd", "lr": 0.05}, "log_every": 1, "threads": 1}
    s = train(cfg, tmp_path, progress=False)
    assert s["finished"] and math.isfinite(s["train_loss"])
    assert s["mean_angle_deg"] is not None and 0 <= s["mean_angle_deg"] < 90
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r.get("kind") == "step"]
    assert steps and all(any(k.startswith("feedback_angle_deg/") for k in r) for r in steps)
    assert all(any(k.startswith("sign_congruence_pct/") for k in r) and r["angles"] for r in steps)


class _Attn(nn.Module):
    """Linear embedding, nn.MultiheadAttention (in_proj_weight bare, out_proj never called), Linear head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 4)
        self.mha = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.embed(x)
        return self.head(self.mha(h, h, h, need_weights=False)[0].mean(1))


@pytest.mark.parametrize("spec", ["signsym", "signsym:variant=brsf", "signsym:variant=frsf", "kp", "wm"])
def test_each_family_refuses_attention_by_name_and_with_unrouted_autograd_gives_it_no_feedback(spec):
    torch.manual_seed(0)
    model = _Attn().double()
    loss = build_loss("cross_entropy")
    name = spec.split(":")[0]
    with pytest.raises(ConfigError, match=rf"module 'mha' .*{name}:unrouted=autograd"):
        build_algorithm(spec, model, loss)
    sep = "," if ":" in spec else ":"
    algo = build_algorithm(f"{spec}{sep}unrouted=autograd", model, loss)
    assert [n for n, _ in algo.layers] == ["embed", "head"]
    x, y = torch.randn(5, 6, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 1, 0])
    opt = sgd(model, algo, 0.05)
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        algo.step(x, y)
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
    assert not any("mha" in k for k in algo.B) and not any("mha" in k for k in algo.diagnostics())
    fb = {id(p) for g in algo.param_groups(0.05) for p in g["params"]}
    assert fb == ({id(algo.B[n]) for n in ("embed", "head")} if name == "kp" else set())
