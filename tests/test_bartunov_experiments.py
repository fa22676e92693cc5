"""The shipped Bartunov et al. experiment files: valid, faithful to Table 1/5, and runnable on a slice."""

from pathlib import Path

import pytest
import torch

from creditlab import config
from creditlab.algorithms import build_algorithm
from creditlab.build import build_model
from creditlab.losses import build_loss
from creditlab.models import build_named_model
from creditlab.train import train

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
FILES = sorted(EXPERIMENTS.glob("bartunov-*.yaml"))




def test_every_table1_row_has_an_experiment_file_that_validates():
    names = {f.stem for f in FILES}
    rows = ["bp", "fa", "dfa"] + [f"{a}-{s}" for a in ("dtp", "sdtp", "aosdtp") for s in ("parallel", "alternating")]
    for net in ("mnist-fc", "mnist-lc", "cifar-fc", "cifar-lc"):
        for row in rows + (["bp-convnet"] if net.endswith("lc") else []):
            assert f"bartunov-{net}-{row}" in names
    for f in FILES:
        cfg = config.load(f)
        assert cfg["optimizer"]["name"] == "adam" and cfg["epochs"] == 500


def test_experiment_files_carry_table5_values():
    cfg = config.load(EXPERIMENTS / "bartunov-mnist-fc-dtp-parallel.yaml")
    assert cfg["optimizer"]["lr"] == 0.000757 and cfg["optimizer"]["betas"] == [0.99, 0.95]
    assert "alpha=0.15008" in cfg["algo"] and "sigma=0.36133" in cfg["algo"] and "inv_lr=0.000768" in cfg["algo"]
    assert cfg["published"]["values"]["test_error_pct"] == 2.86 and cfg["published"]["kind"] == "paper"
    cfg = config.load(EXPERIMENTS / "bartunov-cifar-lc-bp-convnet.yaml")
    assert cfg["model"]["name"] == "cifar-conv" and cfg["augment"] == {"crop_pad": 4, "flip": "vertical"}
    assert cfg["published"]["values"]["test_error_pct"] == 31.87


@pytest.mark.parametrize("row", ["fa", "dfa", "dtp-alternating", "aosdtp-parallel", "bp-convnet"])
def test_mnist_lc_rows_run_on_a_small_slice(row, tmp_path):
    cfg = config.load(EXPERIMENTS / f"bartunov-mnist-lc-{row}.yaml")
    cfg.update(dataset="fake:n=40,shape=1x28x28,test=8", epochs=2, batch_size=8, log_every=2, threads=1)
    s = train(cfg, tmp_path, progress=False)
    assert s["finished"] and s["epochs"] == 2


@pytest.mark.parametrize("row", ["fa", "sdtp-parallel"])
def test_cifar_lc_rows_take_a_step(row):
    cfg = config.load(EXPERIMENTS / f"bartunov-cifar-lc-{row}.yaml")
    torch.manual_seed(0)
    model = build_model(cfg, (3, 32, 32), 10)
    algo = build_algorithm(cfg["algo"], model, build_loss(cfg["loss"]))
    res = algo.step(torch.rand(2, 3, 32, 32), torch.tensor([1, 7]))
    assert torch.isfinite(res.loss) and all(p.grad is not None for p in model.parameters())


def test_imagenet_lc_runs_on_small_inputs():
    model = build_named_model("imagenet-lc", (3, 48, 48), 5)
    algo = build_algorithm("dtp", model, build_loss("cross_entropy"))
    res = algo.step(torch.rand(2, 3, 48, 48), torch.tensor([0, 4]))
    assert res.output.shape == (2, 5) and len(algo.inverses) == len(model.layers) - 1


@pytest.mark.parametrize("path", [f for f in FILES if config.load(f)["algo"].startswith("dtp")], ids=lambda f: f.stem)
def test_dtp_files_take_the_published_alpha_step_on_the_batch_mean_loss(path):
    """Table 5's alpha is a step on the batch-mean task loss (Lee et al.'s and Meulemans et al.'s
    code): h^_{L-1} = h_{L-1} - alpha d(mean_n L_n)/dh_{L-1}, whatever the batch size."""
    from creditlab.models import MLP
    from creditlab.spec import parse_spec

    cfg = config.load(path)
    alpha = float(parse_spec(cfg["algo"])[1]["alpha"])
    torch.manual_seed(0)
    model = MLP("6-8-8-3", act="tanh", out_act="softmax").double()
    loss = build_loss("cross_entropy")
    algo = build_algorithm(cfg["algo"], model, loss)
    for b in (4, 32):
        x, y = torch.randn(b, 6, dtype=torch.float64), torch.randint(0, 3, (b,))
        with torch.no_grad():
            hs = [x]
            for i in range(3):
                hs.append(algo.f(i, hs[-1]))
        h = hs[2].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(torch.nn.functional.cross_entropy(model.layers[2](h), y), h)
        torch.testing.assert_close(algo.targets(hs, y)[2], hs[2] - alpha * g, rtol=1e-12, atol=1e-14)


def _generator():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bartunov_generate", EXPERIMENTS / "bartunov_generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_experiment_files_are_what_the_generator_writes(tmp_path, monkeypatch):
    """The committed bartunov-*.yaml are byte-for-byte experiments/bartunov_generate.py's output."""
    gen = _generator()
    monkeypatch.setattr(gen, "__file__", str(tmp_path / "bartunov_generate.py"))
    gen.main()
    written = sorted(tmp_path.glob("bartunov-*.yaml"))
    assert [f.name for f in written] == [f.name for f in FILES]
    for f in written:
        assert f.read_text() == (EXPERIMENTS / f.name).read_text(), f.name


def test_every_table1_file_carries_its_published_cell_with_kind_and_source():
    from creditlab.published import lookup

    gen = _generator()
    for f in FILES:
        cfg = config.load(f)
        name = f.stem.removeprefix("bartunov-")
        if "autoencoder" in name:
            assert cfg["published"]["kind"] == "paper" and "Fig. 6" in cfg["published"]["source"]
            assert cfg["published"]["claim"] and "values" not in cfg["published"]
            continue
        data, arch, row = name.split("-", 2)
        pub = lookup(cfg["published"], "test_error_pct")
        assert pub.kind == "paper" and pub.source.startswith("Bartunov et al. 2018 (NeurIPS), Table 1")
        assert f"{'MNIST' if data == 'mnist' else 'CIFAR-10'} {arch.upper()} test column" in pub.source
        assert pub.value == gen.PUBLISHED[data][row][0 if arch == "fc" else 1]
