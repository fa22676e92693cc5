"""A run directory keeps the run that was started: a resume with another config is refused
naming every differing key, nothing is overwritten without --overwrite, one writer at a time
(an OS lock the kernel drops on kill -9), SIGTERM saves and resumes bit-identically, a full
disk or a damaged checkpoint is one line and loses nothing."""

import errno
import json
import os
import signal

import pytest
import torch
import yaml

from creditlab import config as config_mod
from creditlab.compare import compare
from creditlab.errors import ConfigError, CreditlabError
from creditlab.rundir import LOCK, RunLock, resume_differences
from creditlab.train import _resumable, train
from tests.run_helpers import creditlab_process as _cli
from tests.run_helpers import logged_lines, metric_rows, wait_until

SMALL = {"dataset": "fake:n=240,classes=3,shape=1x4x4,test=30", "val_size": 40, "model": {"arch": "16-8-3", "act": "tanh"},
         "loss": "cross_entropy", "optimizer": {"name": "sgd", "lr": 0.1}, "epochs": 2, "batch_size": 20,
         "log_every": 3, "threads": 1, "algo": "bp"}


# ---- resume continues the run that was started -----------------------------------------
@pytest.mark.parametrize("change,key", [
    ({"optimizer": {"name": "sgd", "lr": 0.01}}, "optimizer.lr: 0.1 (run) vs 0.01 (given)"),
    ({"algo": "ar"}, "algo: 'bp' (run) vs 'ar' (given)"),
    ({"algo": "fa"}, "algo: 'bp' (run) vs 'fa' (given)"),
    ({"dataset": "fake:n=300,classes=3,shape=1x4x4,test=30"}, "dataset: 'fake:n=240"),
    ({"batch_size": 10}, "batch_size: 20 (run) vs 10 (given)"),
    ({"seed": 3}, "seed: 0 (run) vs 3 (given)"),
])
def test_resume_with_a_config_that_computes_something_else_is_refused_naming_the_key(tmp_path, change, key):
    train(dict(SMALL, epochs=1), tmp_path, progress=False)
    before = (tmp_path / "metrics.jsonl").read_text(), (tmp_path / "config.yaml").read_text()
    with pytest.raises(ConfigError, match="was trained with another config") as e:
        train(dict(SMALL, epochs=2, **change), tmp_path, resume=True, extend=True, progress=False)
    assert key in str(e.value) and "\n" not in str(e.value)
    assert ((tmp_path / "metrics.jsonl").read_text(), (tmp_path / "config.yaml").read_text()) == before


def test_every_differing_key_is_listed_with_both_values():
    stored = {"optimizer": {"lr": 0.1, "name": "sgd"}, "algo": "bp", "epochs": 3, "name": "a", "threads": 2}
    given = {"optimizer": {"lr": 0.01, "name": "sgd"}, "algo": "ar", "epochs": 5, "name": "b", "threads": 1}
    assert resume_differences(stored, given) == [("algo", "bp", "ar"), ("optimizer.lr", 0.1, 0.01)]


def test_a_resume_whose_epochs_differ_without_saying_so_is_refused_with_how_to_extend(tmp_path):
    train(dict(SMALL, epochs=1), tmp_path, progress=False)
    with pytest.raises(ConfigError, match=r"a run of 1 epochs but the config says 3; to extend .* --epochs 3"):
        train(dict(SMALL, epochs=3), tmp_path, resume=True, progress=False)
    train(dict(SMALL, epochs=2), tmp_path / "two", progress=False)
    with pytest.raises(ConfigError, match="a run of 2 epochs; a run can only be extended"):
        train(dict(SMALL, epochs=1), tmp_path / "two", resume=True, extend=True, progress=False)


def test_extending_a_finished_run_equals_training_it_longer(tmp_path):
    train(dict(SMALL, epochs=3), tmp_path / "ref", progress=False)
    train(dict(SMALL, epochs=1), tmp_path / "run", progress=False)
    s = train(dict(SMALL, epochs=3), tmp_path / "run", resume=True, extend=True, progress=False)
    assert metric_rows(tmp_path / "run") == metric_rows(tmp_path / "ref") and s["finished"] and s["epochs"] == 3
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["epochs"] == 3


def test_resuming_a_finished_run_unchanged_trains_nothing_and_says_so(tmp_path, capsys):
    first = train(dict(SMALL, epochs=1), tmp_path, progress=False)
    before = (tmp_path / "metrics.jsonl").read_text()
    again = train(dict(SMALL, epochs=1), tmp_path, resume=True, progress=False)
    assert "finished run of 1 epochs; nothing to train" in capsys.readouterr().err
    assert (tmp_path / "metrics.jsonl").read_text() == before
    same = [k for k in first if "second" not in k and k != "environment"]  # environment: the checkout's commit
    assert {k: again.get(k) for k in same} == {k: first[k] for k in same} and set(again) == set(first)


def test_resume_with_another_number_of_processes_is_refused(tmp_path):
    train(dict(SMALL, epochs=1), tmp_path, progress=False)
    with pytest.raises(CreditlabError, match=r"trained with 1 process\(es\), this is 2; resume with --nproc 1"):
        _resumable(tmp_path, config_mod.resolve(dict(SMALL, epochs=1)), False, 2)


def test_the_readme_resume_example_on_a_finished_run_names_the_extension(tmp_path, capsys):
    from creditlab.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(dict(SMALL, epochs=10)))
    run = str(tmp_path / "run")
    assert main(["train", "--config", str(cfg), "--epochs", "1", "--out", run, "--quiet"]) == 0
    capsys.readouterr()
    assert main(["train", "--config", str(cfg), "--out", run, "--resume", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "a run of 1 epochs but the config says 10" in err and "--epochs 10" in err and "Traceback" not in err
    assert main(["train", "--config", str(cfg), "--out", run, "--resume", "--epochs", "2", "--quiet"]) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["epochs"] == 2


# ---- never overwritten -----------------------------------------------------------------
def test_a_new_run_into_a_directory_holding_a_run_is_refused_and_the_run_kept(tmp_path):
    train(dict(SMALL, epochs=1), tmp_path, progress=False)
    before = metric_rows(tmp_path)
    with pytest.raises(ConfigError, match="already holds a run; continue it with --resume, replace it with --overwrite"):
        train(dict(SMALL, epochs=1, seed=1), tmp_path, progress=False)
    assert metric_rows(tmp_path) == before


def test_overwrite_replaces_a_comparison_and_leaves_no_stale_run_beside_it(tmp_path):
    cfg = dict(SMALL, epochs=1, algos=["bp", "fa"], log_every=0)
    compare(cfg, tmp_path, progress=False)
    assert (tmp_path / "fa" / "seed0" / "summary.json").exists()
    with pytest.raises(ConfigError, match="already holds a comparison"):
        compare(dict(cfg, algos=["bp"]), tmp_path, progress=False)
    s = compare(dict(cfg, algos=["bp"]), tmp_path, progress=False, overwrite=True)
    assert [r["algo"] for r in s["algorithms"]] == ["bp"] and not (tmp_path / "fa").exists()


def test_overwrite_never_deletes_files_creditlab_did_not_write(tmp_path):
    train(dict(SMALL, epochs=1), tmp_path, progress=False)
    (tmp_path / "notes.txt").write_text("my notes")
    with pytest.raises(ConfigError, match=r"holds files creditlab did not write \(notes.txt\); nothing was removed"):
        train(dict(SMALL, epochs=1), tmp_path, overwrite=True, progress=False)
    assert (tmp_path / "notes.txt").read_text() == "my notes" and (tmp_path / "checkpoint.pt").exists()


def test_resume_and_overwrite_together_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="give one of them"):
        train(dict(SMALL, epochs=1), tmp_path, resume=True, overwrite=True, progress=False)


def test_resuming_a_comparison_continues_its_runs_and_restarts_one_without_a_checkpoint(tmp_path):
    cfg = dict(SMALL, epochs=2, algos=["bp", "fa"], log_every=0)
    ref = compare(cfg, tmp_path / "ref", progress=False)
    compare(dict(cfg, epochs=1), tmp_path / "run", progress=False)
    (tmp_path / "run" / "fa" / "seed0" / "checkpoint.pt").unlink()  # as if killed before its first checkpoint
    got = compare(cfg, tmp_path / "run", progress=False, resume=True, extend=True)
    for algo in ("bp", "fa"):
        assert metric_rows(tmp_path / "run" / algo / "seed0") == metric_rows(tmp_path / "ref" / algo / "seed0")
    assert [r["test_accuracy_mean"] for r in got["algorithms"]] == [r["test_accuracy_mean"] for r in ref["algorithms"]]


def test_an_out_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(ConfigError, match="is an existing file, not a run directory"):
        train(SMALL, f, progress=False)
    with pytest.raises(CreditlabError, match=f"cannot write {f}"):
        train(SMALL, f / "sub", progress=False)


# ---- one writer at a time --------------------------------------------------------------
def test_a_second_writer_is_refused_naming_the_holder_and_kill_9_leaves_no_stale_lock(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(dict(SMALL, epochs=200, dataset="fake:n=2000,classes=3,shape=1x4x4,test=30")))
    run = tmp_path / "run"
    first = _cli(["train", "--config", str(cfg), "--out", str(run), "--quiet"])
    wait_until(first, (run / "metrics.jsonl").exists)
    assert first.poll() is None, first.communicate()
    second = _cli(["train", "--config", str(cfg), "--out", str(run), "--resume", "--quiet"])
    _, err = second.communicate(timeout=120)
    assert second.returncode == 2 and f"in use by another creditlab process (pid {first.pid})" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    first.send_signal(signal.SIGKILL)
    first.wait()
    RunLock(run).acquire().release()  # the kernel dropped the killed writer's lock
    assert (run / LOCK).exists()


def test_the_lock_is_held_for_the_run_and_released_after_it(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(ConfigError, match=f"pid {os.getpid()}"):
            train(SMALL, tmp_path, progress=False)
    train(dict(SMALL, epochs=1), tmp_path, progress=False)
    RunLock(tmp_path).acquire().release()


# ---- Ctrl-C and SIGTERM ---------------------------------------------------------------
@pytest.mark.parametrize("signum,code,name", [(signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")])
def test_a_stop_signal_saves_mid_epoch_and_resume_is_bit_identical(tmp_path, signum, code, name):
    """What SLURM sends before a kill (SIGTERM) is handled like Ctrl-C: the checkpoint is saved at
    the end of the step under way, the exit code is 128 + the signal, and --resume continues."""
    cfg = dict(SMALL, algo="ar:mode=simulate,steps=60", epochs=2, dataset="fake:n=3000,classes=3,shape=1x4x4,test=30",
               log_every=3)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    train(cfg, tmp_path / "ref", progress=False)
    run = tmp_path / "stopped"
    proc = _cli(["train", "--config", str(tmp_path / "c.yaml"), "--out", str(run), "--quiet"])
    wait_until(proc, lambda: logged_lines(run) >= 4)  # some logged steps, then the signal
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert f"{name}: interrupted in epoch 1" in err and "checkpoint saved" in err and "--resume" in err
    assert "Traceback" not in err
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ck["step_in_epoch"] > 0 and ck["epoch"] == 0  # saved in the middle of the first epoch
    done = _cli(["train", "--out", str(run), "--resume", "--quiet"])  # the directory alone resumes it
    _, err = done.communicate(timeout=300)
    assert done.returncode == 0, err
    assert metric_rows(run) == metric_rows(tmp_path / "ref")


# ---- full disk, damaged checkpoints ----------------------------------------------------
def test_a_full_disk_is_one_line_naming_the_path_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    from creditlab import rundir
    from creditlab.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(dict(SMALL, epochs=3)))
    saves = {"n": 0}
    real_save = torch.save

    def save(obj, f, *a, **k):
        saves["n"] += 1
        if saves["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(rundir.torch, "save", save)
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and str(run / "checkpoint.pt") in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 1  # the previous one survived
    assert not (run / "checkpoint.tmp").exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "foreign", "pickled"])
def test_a_damaged_or_foreign_checkpoint_is_refused_in_one_line(tmp_path, damage, capsys):
    from creditlab.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(dict(SMALL, epochs=2)))
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(run), "--epochs", "1", "--quiet"]) == 0
    ck = run / "checkpoint.pt"
    if damage == "truncated":
        ck.write_bytes(ck.read_bytes()[:1000])
    elif damage == "garbage":
        ck.write_bytes(os.urandom(5000))
    elif damage == "foreign":
        torch.save({"state_dict": {"w": torch.zeros(3)}}, ck)
    else:  # a pickle of a class weights_only loading refuses (torch would advise weights_only=False)
        import argparse

        torch.save(argparse.Namespace(epoch=1), ck)
    capsys.readouterr()
    assert main(["train", "--config", str(cfg), "--out", str(run), "--resume", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{ck} is not a creditlab checkpoint (or is damaged); delete it or start without --resume" in err
    assert "weights_only" not in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_an_unreadable_file_outside_the_run_directory_is_not_reported_as_a_write_error(tmp_path, monkeypatch):
    """Only errors about the run directory's own files are "cannot write"; a file elsewhere keeps
    its own error (the command line names it as unreadable)."""
    from creditlab import train as train_mod

    def unreadable(cfg):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(tmp_path / "data" / "x.gz"))

    monkeypatch.setattr(train_mod, "build_data", unreadable)
    with pytest.raises(FileNotFoundError):
        train(dict(SMALL, epochs=1), tmp_path / "run", progress=False)


# ---- no validation split (val_size: 0, as the GAIT experiment files train) ----------------
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_a_run_without_validation_split_finishes_with_test_metrics_and_no_selected_epoch(tmp_path, loss):
    cfg = dict(SMALL, val_size=0, loss=loss, optimizer={"name": "sgd", "lr": 0.01})
    summary = train(cfg, tmp_path / "run", progress=False)
    assert summary["finished"] and summary["epochs"] == 2 and "test_loss" in summary
    assert "val_loss" not in summary and "val_accuracy" not in summary
    assert not {"best_val_epoch", "best_val_accuracy", "best_val_loss", "test_accuracy_at_best_val",
                "test_loss_at_best_val"} & set(summary)
    both = compare(dict(cfg, algos=["bp", "fa"]), tmp_path / "cmp", progress=False)
    assert [a["algo"] for a in both["algorithms"]] == ["bp", "fa"]
    assert all(a["test_loss_mean"] is not None for a in both["algorithms"])
