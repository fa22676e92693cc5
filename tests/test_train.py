"""The training loop: reproducible reruns, resume after SIGKILL equal to an uninterrupted run
(Ctrl-C and SIGTERM: tests/test_run_integrity.py), divergence stops with a message,
checkpoints refuse other architectures, configs are validated at the edge."""

import json
import signal

import pytest
import torch
import yaml

from creditlab import config as config_mod
from creditlab.errors import ConfigError, CreditlabError, DivergenceError
from creditlab.train import train
from tests.run_helpers import creditlab_process as _cli
from tests.run_helpers import metric_rows, wait_until

SMALL = {"dataset": "fake:n=400,shape=1x6x6", "model": {"arch": "36-16-10", "act": "tanh"}, "loss": "cross_entropy",
         "optimizer": {"name": "sgd", "lr": 0.1}, "epochs": 2, "batch_size": 32, "log_every": 5,
         "threads": 1}


@pytest.mark.parametrize("algo", ["bp", "ar:steps=20", "ar:feedback=learned,derivative=false"])
def test_same_seed_and_config_give_identical_metrics(tmp_path, algo):
    cfg = dict(SMALL, algo=algo)
    train(cfg, tmp_path / "a", progress=False)
    train(cfg, tmp_path / "b", progress=False)
    assert metric_rows(tmp_path / "a") == metric_rows(tmp_path / "b")
    other = train(dict(cfg, seed=1), tmp_path / "c", progress=False)
    assert metric_rows(tmp_path / "c") != metric_rows(tmp_path / "a") and other["epochs"] == 2


def test_run_directory_holds_config_metrics_summary_checkpoint_and_plots(tmp_path):
    s = train(dict(SMALL, algo="ar"), tmp_path, progress=False)
    for f in ("config.yaml", "metrics.jsonl", "metrics.csv", "summary.json", "checkpoint.pt", "accuracy.png", "angles.png"):
        assert (tmp_path / f).is_file(), f
    for k in ("test_accuracy", "val_accuracy", "train_accuracy", "epochs", "seconds_per_epoch", "algo"):
        assert k in s
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["algo"] == "ar"
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == 2


def test_resume_after_sigkill_ends_with_the_same_numbers(tmp_path):
    cfg = dict(SMALL, algo="ar:mode=simulate,steps=40", epochs=4, dataset="fake:n=1200,shape=1x6x6")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    train(cfg, tmp_path / "ref", progress=False)
    run = tmp_path / "killed"
    proc = _cli(["train", "--config", str(tmp_path / "c.yaml"), "--out", str(run), "--quiet"])
    wait_until(proc, (run / "checkpoint.pt").exists)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done = _cli(["train", "--config", str(tmp_path / "c.yaml"), "--out", str(run), "--resume", "--quiet"])
    _, err = done.communicate(timeout=300)
    assert done.returncode == 0, err
    assert metric_rows(run) == metric_rows(tmp_path / "ref")
    ref, got = json.loads((tmp_path / "ref" / "summary.json").read_text()), json.loads((run / "summary.json").read_text())
    # the numbers, not the provenance: environment names the checkout's commit, which moves if the
    # tree is committed to between the two runs
    def numbers(summary):
        return {k: v for k, v in summary.items() if "second" not in k and k != "environment"}
    assert numbers(got) == numbers(ref)


def test_divergence_stops_naming_step_layer_and_algorithm_and_keeps_metrics(tmp_path):
    cfg = dict(SMALL, algo="ar:eta=1.9,steps=500", loss="mse", log_every=1, epochs=3,
               optimizer={"name": "sgd", "lr": 1e4})
    with pytest.raises(DivergenceError, match=r"divergence at step \d+: non-finite values in .*algorithm ar.*hint: lower eta"):
        train(cfg, tmp_path, progress=False)
    assert (tmp_path / "metrics.jsonl").read_text().strip()  # what was logged stays on disk


def test_divergence_exits_non_zero_from_the_command_line(tmp_path):
    cfg = dict(SMALL, algo="bp", loss="mse", optimizer={"name": "sgd", "lr": 1e6}, log_every=1)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    p = _cli(["train", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "r"), "--quiet"])
    _, err = p.communicate(timeout=120)
    assert p.returncode == 3 and "divergence" in err and "Traceback" not in err


def test_checkpoint_of_another_architecture_is_refused(tmp_path, monkeypatch):
    """Same config, but the user's factory now builds other shapes: the tensors do not fit."""
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "growing_net.py").write_text(
        "from torch import nn\nWIDTH = {w}\n"
        "def make(in_shape, num_classes):\n    return nn.Sequential(nn.Flatten(), nn.Linear(36, WIDTH), nn.Tanh(), "
        "nn.Linear(WIDTH, num_classes))\n".replace("{w}", "16"))
    cfg = dict(SMALL, algo="bp", epochs=1, model={"name": "growing_net:make"})
    train(cfg, tmp_path / "run", progress=False)
    import growing_net

    monkeypatch.setattr(growing_net, "WIDTH", 20)
    with pytest.raises(ConfigError, match="different architecture"):
        train(dict(cfg, epochs=2), tmp_path / "run", resume=True, progress=False, extend=True)


def test_resume_without_checkpoint_says_so(tmp_path):
    with pytest.raises(CreditlabError, match="no checkpoint"):
        train(dict(SMALL, algo="bp"), tmp_path, resume=True, progress=False)


@pytest.mark.parametrize("raw,msg", [
    ({"epochz": 3}, "unknown config key 'epochz'"),
    ({"epochs": "ten"}, "epochs = 'ten' has type str; expected int"),
    ({"optimizer": {"lr": -0.1}}, "optimizer.lr=-0.1 must be positive"),
    ({"optimizer": {"name": "rmsprop"}}, "optimizer.name='rmsprop'; valid: sgd, adam"),
    ({"model": {"depth": 3}}, "unknown config key model.'depth'"),
    ({"algo": "xx"}, "unknown algorithm 'xx'"),
    ({"loss": "hinge"}, "unknown loss 'hinge'"),
    ({"dataset": "svhn"}, "dataset='svhn'"),
])
def test_invalid_configs_are_refused_naming_the_key(raw, msg):
    with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        config_mod.resolve(raw)


def test_layer_spec_not_matching_the_data_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="starts with 784 inputs but the data has 36 features"):
        train(dict(SMALL, model={"arch": "784-10"}), tmp_path, progress=False)
    with pytest.raises(ConfigError, match="ends with 7 outputs but the data has 10 classes"):
        train(dict(SMALL, model={"arch": "36-7"}), tmp_path, progress=False)


def test_autoencode_task_reports_reconstruction_loss(tmp_path):
    cfg = dict(SMALL, task="autoencode", loss="mse:reduction=mean", model={"arch": "36-8-36", "act": "tanh"},
               algo="ar", epochs=2, optimizer={"name": "sgd", "lr": 0.01})
    s = train(cfg, tmp_path, progress=False)
    assert "test_loss" in s and "test_accuracy" not in s
    rows = [r for r in metric_rows(tmp_path) if r["kind"] == "epoch"]
    assert rows[1]["train_loss"] < rows[0]["train_loss"]


def test_ar_training_learns_mnist_mini_above_chance(tmp_path):
    cfg = {"dataset": "mnist-mini", "model": {"arch": "784-64-10", "act": "relu"}, "loss": "cross_entropy",
           "algo": "ar:feedback=learned,derivative=false", "optimizer": {"name": "sgd", "lr": 0.1},
           "epochs": 1, "batch_size": 64, "log_every": 0}
    s = train(cfg, tmp_path, progress=False)
    assert s["test_accuracy"] > 0.7


def test_train_subset_uses_only_the_first_images(tmp_path):
    s = train(dict(SMALL, algo="bp", epochs=1, train_subset=64, log_every=0), tmp_path, progress=False)
    rows = [r for r in metric_rows(tmp_path) if r["kind"] == "epoch"]
    assert rows[0]["step"] == 2 and s["epochs"] == 1  # 64 images, batch 32
    with pytest.raises(ConfigError, match="train_subset=5000 exceeds"):
        train(dict(SMALL, algo="bp", train_subset=5000), tmp_path / "x", progress=False)


def test_logged_angles_of_backprop_on_a_dropout_model_are_zero(tmp_path):
    """The shadow backprop replays the step's RNG, so dropout masks match the algorithm's."""
    cfg = dict(SMALL, algo="bp", epochs=1, log_every=2,
               model={"name": "tests.dropout_factory:make"})
    train(cfg, tmp_path, progress=False)
    rows = [r for r in metric_rows(tmp_path) if r["kind"] == "step"]
    assert rows and all(r["mean_angle_deg"] < 1e-3 for r in rows)
