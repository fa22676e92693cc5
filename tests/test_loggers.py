"""Where the numbers go (issue 21, §3): TensorBoard event files read back with TensorBoard's own
reader, the missing extra as one line, a user's logger in one file, resume with and without
TensorBoard, and the --tensorboard flag."""

import sys
import time

import pytest
import torch

from creditlab.cli import main
from creditlab.errors import ConfigError
from creditlab.loggers import TENSORBOARD_HINT, LoggerGroup, TensorBoardLogger, epoch_tag, hparams_of
from creditlab.train import train

pytest.importorskip("tensorboard", reason="the tensorboard extra (pip install -e '.[tensorboard]')")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.plugins.hparams import plugin_data_pb2  # noqa: E402

DATA = "fake:n=256,classes=3,shape=1x4x4"  # 205 training images: 7 batches of 32 per epoch
CFG = {"dataset": DATA, "model": {"arch": "16-8-3", "act": "tanh"}, "algo": "fa",
       "optimizer": {"name": "sgd", "lr": 0.05}, "epochs": 2, "batch_size": 32, "log_every": 2, "threads": 1,
       "logging": {"tensorboard": True}}
STEPS = [0, 2, 4, 6, 8, 10, 12]  # the logged steps of 2 epochs x 7 batches, every 2nd
EPOCH_ENDS = [6, 13]  # an epoch's scalars at the step of its last batch


def events(run) -> EventAccumulator:
    ea = EventAccumulator(str(run))
    ea.Reload()
    return ea


def steps(ea: EventAccumulator, tag: str) -> list[int]:
    return [e.step for e in ea.Scalars(tag)]


def test_tensorboard_holds_losses_accuracies_angles_feedback_alignment_times_and_the_config(tmp_path):
    train(CFG, tmp_path / "r", progress=False)
    assert list((tmp_path / "r").glob("events.out.tfevents.*"))
    ea = events(tmp_path / "r")
    tags = set(ea.Tags()["scalars"])
    per_step = {"loss/step", "angle_to_bp/layers.0", "angle_to_bp/layers.1", "angle_to_bp/mean"}
    per_epoch = {f"{m}/{s}" for m in ("loss", "accuracy") for s in ("train", "val", "test")} | \
        {"time/epoch_seconds", "epoch"}
    assert per_step | per_epoch <= tags
    feedback = {t for t in tags if t.split("/")[0] in ("feedback_angle_deg", "feedback_norm_ratio",
                                                        "sign_congruence_pct")}
    assert {t.split("/")[0] for t in feedback} == {"feedback_angle_deg", "feedback_norm_ratio", "sign_congruence_pct"}
    for tag in per_step | feedback:
        assert steps(ea, tag) == STEPS, tag
    for tag in per_epoch:
        assert steps(ea, tag) == EPOCH_ENDS, tag
    assert [e.value for e in ea.Scalars("epoch")] == [1, 2]
    import json

    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    test_acc = [r["test_accuracy"] for r in rows if r["kind"] == "epoch"]
    assert [e.value for e in ea.Scalars("accuracy/test")] == pytest.approx(test_acc)  # the same numbers
    # the config: hyper-parameters for the HParams dashboard, and the YAML as text
    content = ea.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["optimizer.lr"].number_value == 0.05 and start.hparams["algo"].string_value == "fa"
    assert "config/text_summary" in ea.Tags()["tensors"]


def test_every_number_of_a_step_record_becomes_a_tag_under_its_own_name(tmp_path):
    lg = TensorBoardLogger(tmp_path)
    lg.log_step({"kind": "step", "epoch": 0, "step": 3, "loss": 1.0, "angles": {"fc": 12.0}, "mean_angle_deg": 12.0,
                 "relax_residual/fc": 0.5, "converged": True, "note": "text"})
    lg.log_epoch({"kind": "epoch", "epoch": 1, "step": 10, "seconds": 0.5, "train_loss": 0.9, "test_accuracy": 0.7})
    lg.close()
    ea = events(tmp_path)
    assert set(ea.Tags()["scalars"]) == {"loss/step", "angle_to_bp/fc", "angle_to_bp/mean", "relax_residual/fc",
                                         "epoch", "time/epoch_seconds", "loss/train", "accuracy/test"}
    assert steps(ea, "relax_residual/fc") == [3] and steps(ea, "loss/train") == [9]
    assert epoch_tag("val_loss") == "loss/val" and epoch_tag("custom") == "custom"
    assert hparams_of({"a": {"b": 1, "c": [1, 2]}, "d": None, "e": True}) == {"a.b": 1, "a.c": "[1, 2]", "d": "None",
                                                                              "e": True}


def test_a_resumed_run_drops_what_the_interrupted_process_logged_past_its_checkpoint(tmp_path):
    run = tmp_path / "r"
    train(dict(CFG, epochs=1), run, progress=False)
    from torch.utils.tensorboard import SummaryWriter

    stale = SummaryWriter(str(run))  # as if a killed process had logged step 8 after the checkpoint at 7
    stale.add_scalar("loss/step", 999.0, 8)
    stale.close()
    time.sleep(1.1)  # event files are read in name (creation time) order
    train(CFG, run, progress=False, resume=True, extend=True)
    ea = events(run)
    assert steps(ea, "loss/step") == STEPS and 999.0 not in [e.value for e in ea.Scalars("loss/step")]
    assert steps(ea, "accuracy/test") == EPOCH_ENDS


def test_resume_does_not_care_whether_or_how_the_run_was_logged(tmp_path):
    run = tmp_path / "r"
    plain = dict(CFG, epochs=1, logging={"tensorboard": False})
    train(plain, run, progress=False)
    assert not list(run.glob("events.out.tfevents.*"))
    train(CFG, run, progress=False, resume=True, extend=True)  # TensorBoard from the resume on
    ea = events(run)
    assert steps(ea, "loss/step") == [8, 10, 12] and steps(ea, "accuracy/test") == [13]
    # a checkpoint from before the logging key existed resumes too
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    ck["config"] = "\n".join(line for line in ck["config"].splitlines()
                             if not line.startswith(("logging:", "  tensorboard:", "  loggers:")))
    assert "logging" not in ck["config"]
    torch.save(ck, run / "checkpoint.pt")
    s = train(dict(CFG, epochs=3), run, progress=False, resume=True, extend=True)
    assert s["epochs"] == 3 and s["finished"]


def test_tensorboard_without_the_extra_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(ConfigError, match="install the extra") as e:
        train(CFG, tmp_path / "r", progress=False)
    assert TENSORBOARD_HINT in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "r").exists()  # refused before anything was written
    code = main(["train", "--algo", "bp", "--dataset", DATA, "--arch", "16-8-3", "--epochs", "1", "--quiet",
                 "--out", str(tmp_path / "c"), "--tensorboard"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and 'pip install -e ".[tensorboard]"' in err
    code = main(["compare", "--algos", "bp", "--dataset", DATA, "--arch", "16-8-3", "--epochs", "1", "--quiet",
                 "--out", str(tmp_path / "d"), "--tensorboard"])
    assert code == 2 and not (tmp_path / "d").exists()


def test_the_flag_sets_the_config_key_on_train_and_compare(tmp_path, capsys):
    from creditlab.cli.args import _load_cfg
    from creditlab.cli.parser import parse_args

    for cmd in ("train", "compare"):
        cfg, _, _ = _load_cfg(parse_args([cmd, "--tensorboard"]))
        assert cfg["logging"]["tensorboard"] is True
        assert _load_cfg(parse_args([cmd]))[0]["logging"]["tensorboard"] is False
    args = ["compare", "--algos", "bp", "--seeds", "0", "--dataset", DATA, "--arch", "16-8-3", "--epochs", "1",
            "--quiet", "--out", str(tmp_path / "d"), "--tensorboard", "threads=1"]
    assert main(args) == 0
    assert list((tmp_path / "d" / "bp" / "seed0").glob("events.out.tfevents.*"))
    assert main(args + ["--overwrite"]) == 0  # event files are creditlab's: --overwrite removes them


def test_a_users_logger_is_one_file(tmp_path, monkeypatch):
    (tmp_path / "recorder_logger.py").write_text(
        "CALLS = []\n"
        "class Recorder:\n"
        "    def __init__(self, cfg, out, resume_step):\n"
        "        CALLS.append(('open', resume_step))\n"
        "    def log_config(self, cfg):\n"
        "        CALLS.append(('config', cfg['algo']))\n"
        "    def log_step(self, record):\n"
        "        CALLS.append(('step', record['step']))\n"
        "    def log_epoch(self, record):\n"
        "        CALLS.append(('epoch', record['epoch']))\n"
        "    def close(self):\n"
        "        CALLS.append(('close',))\n"
        "class Half:\n"
        "    def __init__(self, cfg, out, resume_step):\n"
        "        pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = dict(CFG, logging={"tensorboard": False, "loggers": ["recorder_logger:Recorder"]})
    train(cfg, tmp_path / "r", progress=False)
    import recorder_logger

    assert recorder_logger.CALLS == [("open", None), ("config", "fa"), *[("step", s) for s in STEPS[:4]], ("epoch", 1),
                                     *[("step", s) for s in STEPS[4:]], ("epoch", 2), ("close",)]
    with pytest.raises(ConfigError, match="no_such_module"):
        train(dict(cfg, logging={"loggers": ["no_such_module:Logger"]}), tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()
    with pytest.raises(ConfigError, match="lacks log_config, log_step, log_epoch, close"):
        train(dict(cfg, logging={"loggers": ["recorder_logger:Half"]}), tmp_path / "y", progress=False)
    with pytest.raises(ConfigError, match="package.module:factory"):
        train(dict(cfg, logging={"loggers": ["recorder_logger"]}), tmp_path / "z", progress=False)


def test_a_logger_group_closes_every_logger_even_when_one_fails():
    closed = []

    class Ok:
        def close(self):
            closed.append("ok")

    class Bad:
        def close(self):
            closed.append("bad")
            raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError, match="disk gone"):
        LoggerGroup([Bad(), Ok()]).close()
    assert closed == ["bad", "ok"]
