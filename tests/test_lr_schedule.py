"""``lr_schedule``: a step schedule applied per epoch to every optimizer group, visible in the
metrics, checkpointed with the optimizer, part of what a resumed run must keep."""

import csv
import os
import signal

import pytest
import torch
import yaml

from creditlab import config as config_mod
from creditlab import train as train_mod
from creditlab.errors import ConfigError
from creditlab.rundir import LABELS
from creditlab.train import train
from tests.run_helpers import metric_rows

SMALL = {"dataset": "fake:n=240,classes=3,shape=1x4x4,test=30", "val_size": 40, "model": {"arch": "16-8-3", "act": "tanh"},
         "loss": "cross_entropy", "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9}, "epochs": 5,
         "batch_size": 20, "log_every": 3, "threads": 1, "algo": "bp"}
STEP = {"name": "multistep", "milestones": [2, 4], "gamma": 0.5}


def _csv_lr(run):
    with open(run / "metrics.csv") as f:
        return {int(r["epoch"]): float(r["lr"]) for r in csv.DictReader(f)}


@pytest.mark.parametrize("gamma", [0.5, 0.1])
def test_each_epochs_lr_is_lr0_times_gamma_to_the_milestones_passed(tmp_path, gamma):
    train(dict(SMALL, lr_schedule=dict(STEP, gamma=gamma)), tmp_path, progress=False)
    lrs = _csv_lr(tmp_path)
    assert sorted(lrs) == [1, 2, 3, 4, 5]
    for epoch, lr in lrs.items():  # milestone m: the epochs after the m-th train at lr * gamma
        passed = sum(m < epoch for m in STEP["milestones"])
        assert lr == pytest.approx(0.1 * gamma ** passed, rel=1e-15, abs=0), epoch
    assert [lrs[e] for e in (1, 3, 5)] == pytest.approx([0.1, 0.1 * gamma, 0.1 * gamma ** 2], rel=1e-15)


def test_without_a_schedule_every_epoch_records_the_constant_lr(tmp_path):
    train(dict(SMALL, epochs=2), tmp_path, progress=False)
    assert _csv_lr(tmp_path) == {1: 0.1, 2: 0.1}


def test_every_optimizer_group_is_scaled_alike_the_algorithms_own_included(tmp_path):
    cfg = dict(SMALL, algo="ar:feedback=learned,feedback_lr=0.005", model={"arch": "16-8-3", "act": "tanh", "bias": False},
               loss="mse", optimizer={"name": "sgd", "lr": 0.02}, lr_schedule=STEP)
    train(cfg, tmp_path, progress=False)
    groups = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["optimizer"]["param_groups"]
    assert len(groups) >= 2 and {g["initial_lr"] for g in groups} == {0.02, 0.005}
    for g in groups:  # after 5 epochs both milestones are passed
        assert g["lr"] == pytest.approx(g["initial_lr"] * 0.25, rel=1e-15)


def test_extending_a_finished_run_continues_the_schedule_by_epoch(tmp_path):
    cfg = dict(SMALL, lr_schedule=STEP)
    train(cfg, tmp_path / "ref", progress=False)
    train(dict(cfg, epochs=3), tmp_path / "run", progress=False)
    train(cfg, tmp_path / "run", resume=True, extend=True, progress=False)
    assert metric_rows(tmp_path / "run") == metric_rows(tmp_path / "ref")


@pytest.mark.parametrize("stop_at", [5, 30, 40, 47])  # epoch 1; 3 (after milestone 2); end of 4; 5
def test_resume_after_sigint_mid_epoch_is_bit_identical_across_a_milestone(tmp_path, monkeypatch, stop_at):
    cfg = dict(SMALL, lr_schedule=STEP)  # 10 steps per epoch (200 training images, batch 20)
    train(cfg, tmp_path / "ref", progress=False)
    real, calls = train_mod.check_finite, [0]

    def sigint_at_step(*args, **kwargs):
        real(*args, **kwargs)
        calls[0] += 1
        if calls[0] == stop_at:
            os.kill(os.getpid(), signal.SIGINT)  # the run's own handler: it stops at the end of this step

    monkeypatch.setattr(train_mod, "check_finite", sigint_at_step)
    with pytest.raises(train_mod.Interrupted, match="interrupted"):
        train(cfg, tmp_path / "run", progress=False)
    monkeypatch.setattr(train_mod, "check_finite", real)
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ck["global_step"] == stop_at and ck["lr_scheduler"]["last_epoch"] == ck["epoch"]
    train(cfg, tmp_path / "run", resume=True, progress=False)
    assert metric_rows(tmp_path / "run") == metric_rows(tmp_path / "ref")
    a = torch.load(tmp_path / "ref" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert a["lr_scheduler"] == b["lr_scheduler"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.parametrize("given,shown", [
    (dict(STEP, milestones=[3, 4]), "lr_schedule.milestones: [2, 4] (run) vs [3, 4] (given)"),
    (dict(STEP, gamma=0.1), "lr_schedule.gamma: 0.5 (run) vs 0.1 (given)"),
    (None, "lr_schedule.name: 'multistep' (run) vs None (given)"),
])
def test_resume_with_another_schedule_is_refused_naming_the_key(tmp_path, given, shown):
    train(dict(SMALL, epochs=1, lr_schedule=STEP), tmp_path, progress=False)
    with pytest.raises(ConfigError, match="was trained with another config") as e:
        train(dict(SMALL, epochs=2, lr_schedule=given), tmp_path, resume=True, extend=True, progress=False)
    assert shown in str(e.value) and "\n" not in str(e.value)


def test_adding_a_schedule_to_a_run_trained_without_one_is_refused(tmp_path):
    train(dict(SMALL, epochs=1), tmp_path, progress=False)
    with pytest.raises(ConfigError, match=r"lr_schedule\.milestones: None \(run\) vs \[2, 4\] \(given\)"):
        train(dict(SMALL, epochs=2, lr_schedule=STEP), tmp_path, resume=True, extend=True, progress=False)


def test_the_schedule_is_not_a_label():
    assert not any(lab == "lr_schedule" or lab.startswith("lr_schedule.") for lab in LABELS)


@pytest.mark.parametrize("value,message", [
    ({"name": "cosine"}, "lr_schedule.name='cosine'; valid: multistep"),
    ({"milestones": [2]}, "lr_schedule has no name; valid: multistep"),
    ({"name": "multistep"}, "lr_schedule.milestones is required for multistep"),
    ({"name": "multistep", "milestones": [2], "eta_min": 0}, "unknown config key lr_schedule.'eta_min'"),
    ({"name": "multistep", "milestones": [4, 2]}, "lr_schedule.milestones=[4, 2] must be positive epoch numbers in increasing"),
    ({"name": "multistep", "milestones": [2, 2]}, "lr_schedule.milestones=[2, 2] must be positive"),
    ({"name": "multistep", "milestones": [0, 2]}, "lr_schedule.milestones=[0, 2] must be positive"),
    ({"name": "multistep", "milestones": []}, "lr_schedule.milestones=[] must be positive"),
    ({"name": "multistep", "milestones": [1.5]}, "lr_schedule.milestones=[1.5] must be positive"),
    ({"name": "multistep", "milestones": 2}, "config key lr_schedule.milestones = 2 has type int; expected list"),
    ({"name": "multistep", "milestones": [2], "gamma": 0}, "lr_schedule.gamma=0 must be a positive number"),
    ({"name": "multistep", "milestones": [2], "gamma": -0.1}, "lr_schedule.gamma=-0.1 must be a positive number"),
    ("multistep", "config key lr_schedule = 'multistep' has type str; expected dict or NoneType"),
])
def test_a_bad_schedule_is_one_line_naming_the_key(value, message):
    with pytest.raises(ConfigError) as e:
        config_mod.resolve({"lr_schedule": value})
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_bad_schedule_in_a_file_is_one_line_on_the_command_line(tmp_path, capsys):
    from creditlab.cli import main

    (tmp_path / "c.yaml").write_text(yaml.safe_dump(dict(SMALL, lr_schedule={"name": "multistep", "milestones": [3, 1]})))
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "lr_schedule.milestones=[3, 1] must be positive" in err and str(tmp_path / "c.yaml") in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_dotted_override_sets_one_key_of_the_schedule(tmp_path):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"lr_schedule": STEP}))
    cfg = config_mod.load(tmp_path / "c.yaml", ["lr_schedule.milestones=[1,3]"])
    assert cfg["lr_schedule"] == {"name": "multistep", "milestones": [1, 3], "gamma": 0.5}
    cfg = config_mod.resolve({}, ["lr_schedule.name=multistep", "lr_schedule.milestones=[2,4]"])
    assert cfg["lr_schedule"] == {"name": "multistep", "milestones": [2, 4], "gamma": 0.1}
    with pytest.raises(ConfigError, match=r"^lr_schedule\.milestones=\[4,2\]: lr_schedule\.milestones=\[4, 2\] must"):
        config_mod.load(tmp_path / "c.yaml", ["lr_schedule.milestones=[4,2]"])
    assert config_mod.resolve({})["lr_schedule"] is None  # the default: a constant lr


def test_the_resolved_schedule_reads_back_the_same():
    cfg = config_mod.resolve({"lr_schedule": STEP})
    assert config_mod.resolve(yaml.safe_load(config_mod.dump(cfg))) == cfg
