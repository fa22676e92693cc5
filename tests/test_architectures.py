"""Built-in models of the architectures the field scales to (issue 18, §4): CIFAR ResNets
with BatchNorm (``resnet20``, ``resnet56``, ``resnet18``), a Vision Transformer (``vit-tiny``)
and row-by-row sequential MNIST with an LSTM (``lstm-smnist``), each at tiny widths in float64:
output shapes, a bp step, FA with B = W (feedback B^T delta = W^T delta) equal to backprop on
every parameter, DFA, BatchNorm running statistics updated once per step, fx-traceability
without in-place operations, and end-to-end training and bench runs."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.fx as fx
from torch import Tensor, nn

from creditlab.algorithms import build_algorithm
from creditlab.diagnostics import backprop_grads
from creditlab.errors import ConfigError
from creditlab.losses import build_loss
from creditlab.models import build_named_model, model_names
from tests.tiny_models import TINY_IDS, TINY_MODELS

DT = torch.float64
CLASSES = 3

TINY, IDS = TINY_MODELS, TINY_IDS
BN_MODELS = [t for t in TINY if t[0].startswith("resnet")]
BN_IDS = [i for i, t in zip(IDS, TINY) if t[0].startswith("resnet")]


def _model(name: str, shape, options, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_named_model(name, shape, CLASSES, **options).to(DT)


def _data(shape, n: int = 4, seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=DT), torch.randint(0, CLASSES, (n,), generator=g)


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _fa_spec(spec: str, name: str, options) -> str:
    """lstm-smnist and vit-tiny attention=torch hold modules FA cannot route (nn.LSTM,
    nn.MultiheadAttention): accepted with unrouted=autograd (trained by autograd from the feedback error)."""
    return f"{spec}:unrouted=autograd" if name == "lstm-smnist" or options.get("attention") == "torch" else spec


def _grads(model: nn.Module) -> dict[str, Tensor]:
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no update for {missing}"
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_models_are_registered_with_help():
    names = model_names()
    for name in ("resnet20", "resnet56", "resnet18", "vit-tiny", "lstm-smnist"):
        assert name in names and names[name], name


@pytest.mark.parametrize("name,shape,options", TINY, ids=IDS)
def test_output_shape(name, shape, options):
    model = _model(name, shape, options)
    x, _ = _data(shape, n=5)
    assert model(x).shape == (5, CLASSES)
    model.eval()
    assert model(x[:1]).shape == (1, CLASSES)


def test_real_sizes_match_the_papers():
    counts = {}
    for name, opts in (("resnet20", {}), ("resnet56", {}), ("resnet18", {}), ("resnet20", {"shortcut": "B"})):
        m = build_named_model(name, (3, 32, 32), 10, **opts)
        convs = [c for c in m.modules() if isinstance(c, nn.Conv2d)]
        counts[(name, opts.get("shortcut"))] = (sum(p.numel() for p in m.parameters()), len(convs))
    # He et al. 2016 Table 6: ResNet-20 0.27M, ResNet-56 0.85M parameters; 6n+2 weighted layers (option A)
    assert counts[("resnet20", None)] == (269_722, 19)
    assert counts[("resnet56", None)] == (853_018, 55)
    assert counts[("resnet20", "B")][1] == 19 + 2  # two 1x1 projections where the shape changes
    assert round(counts[("resnet18", None)][0] / 1e6, 2) == 11.17 and counts[("resnet18", None)][1] == 20
    r20 = build_named_model("resnet20", (3, 32, 32), 10)
    assert [s[0].conv1.out_channels for s in r20.stages] == [16, 32, 64]
    assert r20(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    vit = build_named_model("vit-tiny", (1, 28, 28), 10, depth=2)
    assert vit.pos_embed.shape == (1, 7 * 7 + 1, 192) and vit(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    vit = build_named_model("vit-tiny", (3, 32, 32), 10, depth=1)
    assert vit.pos_embed.shape == (1, 8 * 8 + 1, 192) and vit(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    lstm = build_named_model("lstm-smnist", (1, 28, 28), 10)
    assert (lstm.lstm.input_size, lstm.lstm.hidden_size) == (28, 128)


def test_shortcut_a_subsamples_and_appends_zero_channels():
    from creditlab.models.resnet import ShortcutA

    x = torch.randn(2, 3, 6, 6, dtype=DT)
    out = ShortcutA(3, 5, 2)(x)
    assert out.shape == (2, 5, 3, 3)
    assert torch.equal(out[:, :3], x[:, :, ::2, ::2]) and not out[:, 3:].any()
    a = build_named_model("resnet20", (3, 8, 8), 10, width=2)
    b = build_named_model("resnet20", (3, 8, 8), 10, width=2, shortcut="b")
    assert not any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in a.modules())
    assert sum(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in b.modules()) == 2


def test_lstm_reads_rows_and_accepts_flat_input():
    model = _model("lstm-smnist", (1, 28, 28), {"hidden": 4})
    x, _ = _data((1, 28, 28), n=3)
    assert torch.equal(model(x), model(x.flatten(1)))
    seen = []
    model.lstm.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape))
    model(x)
    assert seen == [(3, 28, 28)]  # 28 time steps of 28 features
    rgb = build_named_model("lstm-smnist", (3, 4, 5), 2, hidden=3)  # one row of all channels per step
    assert rgb.lstm.input_size == 15 and rgb(torch.zeros(2, 3, 4, 5)).shape == (2, 2)


@pytest.mark.parametrize("name,shape,options", TINY, ids=IDS)
def test_fx_traces_the_model_without_inplace_operations(name, shape, options):
    model = _model(name, shape, options)
    x, _ = _data(shape)
    gm = fx.symbolic_trace(model)
    assert torch.equal(gm(x), model(x))
    for node in gm.graph.nodes:
        assert not node.kwargs.get("inplace", False), node.format_node()
        if node.op == "call_method":
            assert not (node.target.endswith("_") and not node.target.startswith("_")), node.format_node()
        if node.op == "call_function":
            assert not getattr(node.target, "__name__", "").endswith("_"), node.format_node()
        if node.op == "call_module":
            assert not getattr(gm.get_submodule(node.target), "inplace", False), node.format_node()


@pytest.mark.parametrize("name,shape,options", TINY, ids=IDS)
def test_bp_step_runs_and_its_output_is_the_forward_pass(name, shape, options):
    model, loss = _model(name, shape, options), build_loss("cross_entropy")
    x, y = _data(shape)
    twin = copy.deepcopy(model)
    ref = backprop_grads(twin, loss, x, y)
    expected = copy.deepcopy(model)(x)
    res = build_algorithm("bp", model, loss).step(x, y)
    assert torch.allclose(res.output, expected, rtol=1e-12, atol=1e-12)
    got = _grads(model)
    for k in ref:
        assert _rel(got[k], ref[k]) < 1e-12, k


@pytest.mark.parametrize("name,shape,options", TINY, ids=IDS)
def test_fa_with_transposed_feedback_equals_backprop(name, shape, options):
    model, loss = _model(name, shape, options), build_loss("cross_entropy")
    x, y = _data(shape)
    ref = backprop_grads(copy.deepcopy(model), loss, x, y)
    algo = build_algorithm(_fa_spec("fa", name, options), model, loss)
    for lname, layer in algo.layers:
        algo.B[lname] = layer.weight.detach().clone()  # B = W: feedback B^T delta = W^T delta
    algo.step(x, y)
    got = _grads(model)
    assert set(got) == set(ref)
    for k in ref:
        assert _rel(got[k], ref[k]) < 1e-9, k


@pytest.mark.parametrize("name,shape,options", TINY, ids=IDS)
def test_fa_with_random_feedback_steps_and_differs_from_backprop(name, shape, options):
    model, loss = _model(name, shape, options), build_loss("cross_entropy")
    x, y = _data(shape)
    ref = backprop_grads(copy.deepcopy(model), loss, x, y)
    algo = build_algorithm(_fa_spec("fa", name, options), model, loss)
    algo.step(x, y)
    got = _grads(model)
    assert all(torch.isfinite(g).all() for g in got.values())
    assert any(_rel(got[k], ref[k]) > 1e-3 for k in ref)
    assert all(not math.isnan(v) for v in algo.diagnostics().values())


@pytest.mark.parametrize("name,shape,options", TINY, ids=IDS)
def test_dfa_builds_and_steps(name, shape, options):
    model, loss = _model(name, shape, options), build_loss("cross_entropy")
    x, y = _data(shape)
    algo = build_algorithm(_fa_spec("dfa", name, options), model, loss)
    for _ in range(2):  # the second step reuses the feedback made on the first
        model.zero_grad(set_to_none=True)
        res = algo.step(x, y)
        got = _grads(model)
        assert torch.isfinite(res.loss) and all(torch.isfinite(g).all() for g in got.values())
    assert algo.B and all(b.shape[1] == CLASSES for b in algo.B.values())
    assert all("forward" not in layer.__dict__ for _, layer in algo.layers)  # routing removed


@pytest.mark.parametrize("spec", ["bp", "fa", "dfa"])
@pytest.mark.parametrize("name,shape,options", BN_MODELS, ids=BN_IDS)
def test_batchnorm_running_stats_after_one_step_equal_one_forward_pass(name, shape, options, spec):
    model, loss = _model(name, shape, options), build_loss("cross_entropy")
    x, y = _data(shape, n=6)
    once = copy.deepcopy(model).train()
    with torch.no_grad():
        once(x)
    build_algorithm(spec, model, loss).step(x, y)
    want = dict(once.named_buffers())
    got = dict(model.named_buffers())
    assert set(got) == set(want) and any(k.endswith("running_mean") for k in got)
    for k, b in got.items():
        assert torch.allclose(b, want[k], rtol=1e-12, atol=1e-15), k
    assert all(int(b) == 1 for k, b in got.items() if k.endswith("num_batches_tracked"))


def test_logging_angles_does_not_update_batchnorm_statistics_again(tmp_path):
    from creditlab.train import train

    cfg = {"dataset": "fake:n=40,classes=10,shape=3x8x8,test=8", "model": {"name": "resnet20", "options": {"width": 1}},
           "algo": "bp", "optimizer": {"name": "sgd", "lr": 0.01}, "epochs": 1, "batch_size": 64, "log_every": 1,
           "threads": 1}
    train(cfg, tmp_path, progress=False)  # one step (32 training samples, batch 64)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["model"]
    assert int(state["bn1.num_batches_tracked"]) == 1


@pytest.mark.parametrize("spec", ["bp", "fa"])
def test_resnet20_trains_end_to_end(spec, tmp_path):
    from creditlab.train import train

    cfg = {"dataset": "fake:n=64,classes=10,shape=3x32x32,test=16",
           "model": {"name": "resnet20", "options": {"width": 2}}, "algo": spec,
           "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}, "epochs": 1, "batch_size": 16,
           "log_every": 2, "threads": 1}
    s = train(cfg, tmp_path, progress=False)
    assert s["finished"] and s["epochs"] == 1
    assert math.isfinite(s["train_loss"]) and math.isfinite(s["test_loss"])
    assert s["mean_angle_deg"] is not None and 0 <= s["mean_angle_deg"] < 90 + 1e-6
    if spec == "bp":
        assert s["mean_angle_deg"] < 1e-3


def test_bench_times_a_named_model(capsys):
    from creditlab.cli import main

    rc = main(["bench", "--model", "resnet20", "--in-shape", "3x32x32", "--algos", "bp,fa", "--repeats", "1",
               "--warmup", "0", "--batch", "4", "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["model"] == "resnet20" and [r["algo"] for r in res["results"]] == ["bp", "fa"]
    assert all(r["ms_per_step"] > 0 for r in res["results"])


@pytest.mark.parametrize("name,shape,options,match", [
    ("resnet20", (3, 32, 32), {"shortcut": "C"}, "shortcut"),
    ("resnet20", (3, 32, 32), {"width": 0}, "width"),
    ("resnet56", (784,), {}, "image"),
    ("vit-tiny", (3, 32, 32), {"patch": 7}, "patch"),
    ("vit-tiny", (3, 32, 32), {"dim": 10, "heads": 3}, "heads"),
    ("vit-tiny", (3, 32, 32), {"attention": "flash"}, "attention"),
    ("vit-tiny", (784,), {}, "image"),
    ("lstm-smnist", (700,), {}, "rows"),
    ("lstm-smnist", (1, 28, 28), {"hidden": 0}, "hidden"),
])
def test_bad_options_are_refused(name, shape, options, match):
    with pytest.raises(ConfigError, match=match):
        build_named_model(name, shape, 10, **options)
