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


# ---- the routing's backward: one convolution_backward call per Conv2d ---------------------------
CONV_SHAPES = [  # (in, out, kernel, stride, padding, dilation, groups, bias, input size)
    (3, 4, 3, 1, 1, 1, 1, True, 8),
    (4, 6, 3, 2, 1, 1, 2, True, 9),
    (4, 4, 3, 1, 2, 2, 4, False, 10),
    (2, 5, (3, 2), (2, 1), (0, 1), (1, 2), 1, True, 7),
    (3, 8, 1, 1, 0, 1, 1, False, 5),
]


@pytest.mark.parametrize("shape", CONV_SHAPES, ids=[f"conv{i}" for i in range(len(CONV_SHAPES))])
def test_conv2d_backward_is_one_convolution_backward_call_bitwise_equal_to_two(shape):
    from torch.utils._python_dispatch import TorchDispatchMode

    from creditlab.algorithms._feedback import Route, _Routed

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += func is torch.ops.aten.convolution_backward.default
            return func(*args, **(kwargs or {}))

    cin, cout, k, s, p, d, groups, bias, hw = shape
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, stride=s, padding=p, dilation=d, groups=groups, bias=bias).double()
    B = torch.randn_like(conv.weight)
    x = torch.randn(3, cin, hw, hw, dtype=torch.float64, requires_grad=True)
    out = _Routed.apply(x, conv.weight, conv.bias, Route("conv", conv, feedback=lambda: B))
    g = torch.randn_like(out)
    with Count() as count:
        out.backward(g)
    assert count.n == 1  # as backprop's ConvolutionBackward0; two (input, weight) before
    # the two-call oracle: conv2d_input with B in W's place, conv2d_weight, the bias sum
    gx = torch.nn.grad.conv2d_input(x.shape, B, g, conv.stride, conv.padding, conv.dilation, groups)
    gw = torch.nn.grad.conv2d_weight(x.detach(), conv.weight.shape, g, conv.stride, conv.padding, conv.dilation, groups)
    assert float((x.grad - gx).abs().max()) == 0.0
    assert float((conv.weight.grad - gw).abs().max()) == 0.0
    if bias:
        assert float((conv.bias.grad - g.sum((0, 2, 3))).abs().max()) == 0.0
    # a first layer (input without gradient): the weight gradient alone, still bit-identical
    conv.weight.grad = None
    out = _Routed.apply(x.detach(), conv.weight, None, Route("conv", conv, feedback=lambda: B))
    out.backward(g)
    assert float((conv.weight.grad - gw).abs().max()) == 0.0


def test_routing_builds_its_forward_wrappers_once_and_removes_them_after_each_step():
    model = MLP("6-5-4-3", act="tanh")
    seen = []
    model.layers[1].register_forward_pre_hook(lambda m, inp: seen.append(m.__dict__["forward"]))
    algo = build_algorithm("fa", model, build_loss("cross_entropy"))
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 1])
    for _ in range(3):
        algo.step(x, y)
        assert all("forward" not in layer.__dict__ for _, layer in algo.layers)
    assert len(seen) == 3 and all(f is seen[0] for f in seen)  # not a closure re-created per step


# ---- what the routing cannot reach: refused by name, or trained by autograd on request ---------
FAMILY = ["fa", "dfa", "signsym", "kp", "wm"]


class LSTMNet(nn.Module):
    def __init__(self, cell=nn.LSTM):
        super().__init__()
        self.lstm = cell(3, 4, batch_first=True)
        self.head = nn.Linear(4, 3)

    def hidden(self, x):
        return self.lstm(x)[0][:, -1]

    def forward(self, x):
        return self.head(self.hidden(x))


class AttnNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 4)
        self.mha = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 3)

    def hidden(self, x):
        h = self.embed(x)
        return self.mha(h, h, h, need_weights=False)[0].mean(1)

    def forward(self, x):
        return self.head(self.hidden(x))


@pytest.mark.parametrize("spec", FAMILY)
@pytest.mark.parametrize("make,name", [(LSTMNet, "lstm"), (lambda: LSTMNet(nn.GRU), "lstm"), (AttnNet, "mha")],
                         ids=["lstm", "gru", "mha"])
def test_recurrent_and_attention_modules_are_refused_by_name(spec, make, name):
    model = make()
    with pytest.raises(ConfigError, match=rf"module '{name}' .*cannot reach.*{spec}:unrouted=autograd"):
        build_algorithm(spec, model, build_loss("cross_entropy"))
    build_algorithm(f"{spec}:unrouted=autograd", model, build_loss("cross_entropy"))


@pytest.mark.parametrize("module", [nn.RNNCell(3, 4), nn.LSTMCell(3, 4), nn.Conv1d(3, 4, 3), nn.Conv3d(1, 2, 2),
                                    nn.ConvTranspose2d(3, 2, 3), nn.Bilinear(3, 3, 4)],
                         ids=["rnncell", "lstmcell", "conv1d", "conv3d", "convtranspose2d", "bilinear"])
def test_other_modules_whose_weights_the_routing_cannot_reach_are_refused_by_name(module):
    model = nn.ModuleDict({"odd": module, "fc": nn.Linear(4, 3)})
    with pytest.raises(ConfigError, match=r"module 'odd' .*fa:unrouted=autograd"):
        build_algorithm("fa", model, build_loss("cross_entropy"))


def test_frozen_unroutable_modules_are_accepted_and_the_option_is_validated():
    model = LSTMNet()
    model.lstm.requires_grad_(False)  # nothing of it is trained: nothing is wrong
    algo = build_algorithm("fa", model, build_loss("cross_entropy"))
    assert [n for n, _ in algo.layers] == ["head"]
    attn = AttnNet()
    attn.mha.in_proj_weight.requires_grad_(False)
    attn.mha.in_proj_bias.requires_grad_(False)  # out_proj alone is still trained through the bare weight
    with pytest.raises(ConfigError, match="module 'mha'"):
        build_algorithm("fa", attn, build_loss("cross_entropy"))
    with pytest.raises(ConfigError, match="unrouted"):
        build_algorithm("fa:unrouted=bogus", MLP("3-2"), build_loss("mse"))


@pytest.mark.parametrize("spec", ["fa", "dfa"])
@pytest.mark.parametrize("make", [LSTMNet, AttnNet], ids=["lstm", "mha"])
def test_unrouted_autograd_trains_them_by_autograd_from_the_feedback_error_that_reaches_them(spec, make):
    torch.manual_seed(0)
    model = make().double()
    x, y = torch.randn(5, 6, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 1, 0])
    loss = build_loss("cross_entropy")
    algo = build_algorithm(f"{spec}:unrouted=autograd", model, loss)
    routed = [n for n, _ in algo.layers]
    assert routed == (["head"] if make is LSTMNet else ["embed", "head"])  # not mha.out_proj
    ref = backprop_grads(model, loss, x, y)
    algo.step(x, y)
    # oracle: the error the head's feedback sends to its input (FA: B^T delta; DFA: B e, here the
    # same layer), carried by autograd through the module; the head's own gradient is delta h^T
    h = model.hidden(x)
    out = model.head(h)
    delta = torch.autograd.grad(loss(out, y), out)[0]
    sent = delta @ algo.B["head"] if spec == "fa" else delta @ algo.B["head"].t()
    inner = [(n, p) for n, p in model.named_parameters() if not n.startswith(("head", "embed"))]
    want = torch.autograd.grad(h, [p for _, p in inner], sent)
    for (n, p), w in zip(inner, want):
        assert torch.allclose(p.grad, w, atol=1e-13, rtol=1e-10), n
        assert not torch.allclose(p.grad, ref[n], atol=1e-6), n  # not backprop's
    assert torch.allclose(model.head.weight.grad, delta.t() @ h.detach(), atol=1e-13)
    if spec == "fa":
        assert not any("out_proj" in k for k in algo.diagnostics())


class DirectUse(nn.Module):
    """fc2's weight used by the parent directly (F.linear), as MultiheadAttention uses out_proj's."""

    def __init__(self, also_called=False):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 5), nn.Linear(5, 4), nn.Linear(4, 3)
        self.unused = nn.Linear(3, 3)
        self.also_called = also_called

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        if self.also_called:  # the layer runs, and its weight is also used outside it
            return self.fc3(torch.tanh(self.fc2(h))) + (self.fc2.weight ** 2).sum()
        return self.fc3(torch.tanh(nn.functional.linear(h, self.fc2.weight, self.fc2.bias)))


@pytest.mark.parametrize("spec", FAMILY)
def test_a_routed_layer_whose_parent_uses_its_weight_directly_is_refused_by_name(spec):
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 1])
    model = DirectUse()
    algo = build_algorithm(spec, model, build_loss("cross_entropy"))
    with pytest.raises(ConfigError, match=r"layer 'fc2' was never called: its parent uses its weight directly"):
        algo.step(x, y)
    assert all(p.grad is None for p in model.parameters())  # refused before the backward pass
    with pytest.raises(ConfigError, match=r"layer 'fc2' is not the only use of its weight"):
        build_algorithm(spec, DirectUse(also_called=True), build_loss("cross_entropy")).step(x, y)


def test_a_layer_that_takes_no_part_in_the_forward_is_not_refused():
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 1])

    class Plain(DirectUse):
        def forward(self, x):
            return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))

    model = Plain()
    algo = build_algorithm("fa", model, build_loss("cross_entropy"))
    for _ in range(2):
        algo.step(x, y)
    assert model.unused.weight.grad is None and model.fc1.weight.grad is not None  # as backprop leaves it


def test_a_linear_subclass_with_its_own_forward_is_refused_by_name():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    with pytest.raises(ConfigError, match=r"layer '1': Scaled overrides Linear.forward"):
        build_algorithm("fa", nn.Sequential(nn.Linear(3, 3), Scaled(3, 2)), build_loss("mse"))


# ---- parameters outside the routed layers: the local gradient of the feedback error -------------
class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv2(torch.relu(self.bn(self.conv1(x))))).flatten(1))


@pytest.mark.parametrize("spec", ["fa", "dfa"])
def test_batchnorm_affine_parameters_get_the_local_gradient_of_the_feedback_error(spec):
    torch.manual_seed(0)
    model = BNNet().double()
    with torch.no_grad():
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.uniform_(-0.5, 0.5)
    x, y = torch.randn(6, 2, 4, 4, dtype=torch.float64), torch.arange(6) % 3
    loss = build_loss("cross_entropy")
    ref = backprop_grads(model, loss, x, y)
    seen = {}

    def hook(m, inp, out):
        seen["x"] = inp[0].detach()
        out.register_hook(lambda g: seen.__setitem__("err", g))

    model.bn.register_forward_hook(hook)
    build_algorithm(spec, model, loss).step(x, y)
    xin, err = seen["x"], seen["err"]  # err: the feedback error that reached the BN output
    mean, var = xin.mean((0, 2, 3), keepdim=True), xin.var((0, 2, 3), unbiased=False, keepdim=True)
    xhat = (xin - mean) / torch.sqrt(var + model.bn.eps)
    assert torch.allclose(model.bn.weight.grad, (err * xhat).sum((0, 2, 3)), atol=1e-12)
    assert torch.allclose(model.bn.bias.grad, err.sum((0, 2, 3)), atol=1e-12)
    assert not torch.allclose(model.bn.weight.grad, ref["bn.weight"], atol=1e-6)  # that error is not backprop's


def test_class_token_and_position_embedding_get_the_local_gradient_of_the_feedback_error():
    from creditlab.models import build_named_model

    torch.manual_seed(0)
    model = build_named_model("vit-tiny", (1, 28, 28), 3, dim=8, depth=1, heads=2, patch=7).double()
    x, y = torch.randn(4, 1, 28, 28, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
    seen = {}

    def hook(m, inp):
        inp[0].register_hook(lambda g: seen.__setitem__("err", g))

    model.blocks.register_forward_pre_hook(hook)
    build_algorithm("fa", model, build_loss("cross_entropy")).step(x, y)
    err = seen["err"]  # at cat([cls, patches]) + pos_embed
    assert torch.allclose(model.pos_embed.grad, err.sum(0, keepdim=True), atol=1e-13)
    assert torch.allclose(model.cls_token.grad, err[:, :1].sum(0, keepdim=True), atol=1e-13)
