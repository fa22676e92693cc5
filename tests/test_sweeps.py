"""Comparisons at scale: ``compare --jobs`` equals serial, ``compare --plan`` + ``collect``
equals ``compare``, and collect names every missing, unfinished or diverged run."""

import json
import shlex
import subprocess

import pytest
import yaml

from creditlab import parallel
from creditlab.cli import main
from creditlab.errors import ConfigError

CFG = {"dataset": "fake:n=256,classes=3,shape=1x4x4", "model": {"arch": "16-8-3", "act": "tanh"},
       "algos": ["bp", "fa"], "seeds": [0, 1], "optimizer": {"name": "sgd", "lr": 0.05}, "epochs": 2,
       "batch_size": 32, "log_every": 5, "threads": 1}
TIMING = ("seconds_per_epoch", "seconds_per_epoch_mean", "seconds_per_epoch_std", "seconds", "epoch_seconds_median",
          "epoch_seconds_median_mean", "epoch_seconds_median_std", "first_epoch_seconds", "first_epoch_seconds_mean",
          "first_epoch_seconds_std",
          # provenance: the machine and code, not the numbers (threads and git state may differ between runs)
          "environment", "environment_varies")


def _config(tmp_path, **over) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(dict(CFG, **over)))
    return str(path)


def _untimed(obj):
    """The object without wall-clock figures and provenance (the only things allowed to differ
    between runs); the per-seed timings under ``seed_values`` too."""
    if isinstance(obj, dict):
        return {k: _untimed(v) for k, v in obj.items() if k not in TIMING}
    if isinstance(obj, list):
        return [_untimed(v) for v in obj]
    return obj


def _read(path):
    return json.loads(path.read_text())


def _metrics(path):
    return [_untimed(json.loads(line)) for line in path.read_text().splitlines()]


def test_split_cores_keeps_processes_times_threads_within_the_cores(monkeypatch, capsys):
    monkeypatch.setattr(parallel, "available_cores", lambda: 4)
    assert parallel.split_cores(1, None) == (1, 4)
    assert parallel.split_cores(2, None) == (2, 2)
    assert parallel.split_cores(8, None) == (4, 1) and "running 4 process(es)" in capsys.readouterr().out
    assert parallel.split_cores(4, 2) == (2, 2) and "exceeds the 4 core(s)" in capsys.readouterr().out
    assert parallel.split_cores(2, 2) == (2, 2) and capsys.readouterr().out == ""
    with pytest.raises(ConfigError, match="--jobs 0"):
        parallel.split_cores(0, None)


def test_compare_with_two_jobs_gives_the_serial_numbers(tmp_path, capsys):
    cfg = _config(tmp_path)
    assert main(["compare", "--config", cfg, "--out", str(tmp_path / "serial"), "--quiet"]) == 0
    assert main(["compare", "--config", cfg, "--out", str(tmp_path / "jobs"), "--quiet", "--jobs", "2"]) == 0
    serial, jobs = _read(tmp_path / "serial" / "summary.json"), _read(tmp_path / "jobs" / "summary.json")
    assert [r["algo"] for r in jobs["algorithms"]] == ["bp", "fa"] and jobs["algorithms"][0]["seeds"] == [0, 1]
    assert all(r["mean_angle_deg_mean"] is not None for r in serial["algorithms"])
    assert _untimed(jobs) == _untimed(serial)
    for run in ("bp/seed0", "bp/seed1", "fa/seed0", "fa/seed1"):  # every logged loss, accuracy and angle
        assert _metrics(tmp_path / "jobs" / run / "metrics.jsonl") == _metrics(tmp_path / "serial" / run / "metrics.jsonl")
    assert (tmp_path / "jobs" / "angles.png").is_file() and (tmp_path / "jobs" / "test_curves.png").is_file()


def test_parallel_compare_records_diverged_runs_and_exits_3(tmp_path, capsys):
    cfg = _config(tmp_path, algos=["bp"], loss="mse", optimizer={"name": "sgd", "lr": 1.0e6}, log_every=0)
    assert main(["compare", "--config", cfg, "--out", str(tmp_path / "o"), "--quiet", "--jobs", "2"]) == 3
    s = _read(tmp_path / "o" / "summary.json")
    assert [(d["algo"], d["seed"]) for d in s["diverged"]] == [("bp", 0), ("bp", 1)]
    assert (tmp_path / "o" / "bp" / "seed0" / "diverged.json").is_file()


def test_plan_then_collect_equals_compare_and_names_missing_runs(tmp_path, capsys):
    cfg = _config(tmp_path, seeds=[0])
    plan = tmp_path / "plan"
    assert main(["compare", "--config", cfg, "--plan", str(plan)]) == 0
    out = capsys.readouterr().out
    assert "sbatch --array=1-2" in out and f"creditlab collect {plan}" in out
    lines = (plan / "commands.txt").read_text().splitlines()
    assert len(lines) == 2 and [r["dir"] for r in _read(plan / "plan.json")["runs"]] == ["bp/seed0", "fa/seed0"]
    assert main(["collect", str(plan)]) == 4  # nothing has run yet
    assert "missing: bp seed 0" in capsys.readouterr().err
    for line in lines:  # what `sed -n "${SLURM_ARRAY_TASK_ID}p" commands.txt | bash` runs
        args = shlex.split(line)
        assert args[:2] == ["creditlab", "train"]
        assert main(args[1:]) == 0
    assert main(["collect", str(plan)]) == 0
    assert main(["compare", "--config", cfg, "--out", str(tmp_path / "serial"), "--quiet"]) == 0
    collected = _read(plan / "summary.json")
    assert "incomplete" not in collected and collected["algorithms"][1]["test_accuracy_mean"] is not None
    assert _untimed(collected) == _untimed(_read(tmp_path / "serial" / "summary.json"))
    assert (plan / "summary.md").is_file() and (plan / "test_curves.png").is_file() and (plan / "angles.png").is_file()

    (plan / "fa" / "seed0" / "summary.json").unlink()
    assert main(["collect", str(plan)]) == 4
    err = capsys.readouterr().err
    assert f"missing: fa seed 0 in {plan / 'fa' / 'seed0'}" in err and "bp seed 0" not in err
    rerun = f"sed -n '2s/$/ --resume/p' {plan / 'commands.txt'} | bash"  # it has a checkpoint: resume it
    assert f"rerun: {rerun}" in err
    s = _read(plan / "summary.json")
    assert [(o["algo"], o["seed"], o["status"]) for o in s["incomplete"]] == [("fa", 0, "missing")]
    assert s["algorithms"][1]["seeds"] == [] and s["algorithms"][1]["missing_seeds"] == [0]
    assert "missing (seeds [0])" in (plan / "summary.md").read_text()
    ran = subprocess.run(["bash", "-c", rerun], capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr  # the finished run is recognised, its summary written again
    assert main(["collect", str(plan)]) == 0
    capsys.readouterr()

    summary = _read(plan / "bp" / "seed0" / "summary.json")
    (plan / "bp" / "seed0" / "summary.json").write_text(json.dumps(dict(summary, finished=False)))
    assert main(["collect", str(plan)]) == 4
    assert "unfinished: bp seed 0" in capsys.readouterr().err

    assert main(["compare", "--config", cfg, "--plan", str(plan)]) == 2  # never overwrites a plan
    assert "already holds a plan" in capsys.readouterr().err
    assert main(["collect", str(tmp_path)]) == 2
    assert "no plan.json" in capsys.readouterr().err


def test_a_plan_given_relative_runs_from_any_copy_of_its_parent_directory(tmp_path, capsys, monkeypatch):
    """A plan made with a relative DIR (as committed under experiments/plans/) names relative
    paths only, so its commands run in a copy of the tree moved elsewhere (a clone on a cluster)."""
    here = tmp_path / "repo"
    here.mkdir()
    cfg = _config(tmp_path, seeds=[0], algos=["bp"])
    monkeypatch.chdir(here)
    assert main(["compare", "--config", cfg, "--plan", "plans/p"]) == 0
    assert "relative to" in capsys.readouterr().out
    text = (here / "plans" / "p" / "commands.txt").read_text()
    assert str(tmp_path) not in text and str(tmp_path) not in (here / "plans" / "p" / "plan.json").read_text()
    clone = tmp_path / "clone"
    here.rename(clone)
    monkeypatch.chdir(clone)
    (line,) = text.splitlines()
    assert main(shlex.split(line)[1:]) == 0
    assert main(["collect", "plans/p"]) == 0
    assert _read(clone / "plans" / "p" / "summary.json")["algorithms"][0]["test_accuracy_mean"] is not None


def test_collect_names_diverged_runs_and_exits_3(tmp_path, capsys):
    cfg = _config(tmp_path, algos=["bp"], seeds=[0], loss="mse", optimizer={"name": "sgd", "lr": 1.0e6}, log_every=0)
    plan = tmp_path / "plan"
    assert main(["compare", "--config", cfg, "--plan", str(plan)]) == 0
    (line,) = (plan / "commands.txt").read_text().splitlines()
    assert main(shlex.split(line)[1:]) == 3
    assert main(["collect", str(plan)]) == 3
    err = capsys.readouterr().err
    assert "diverged: bp seed 0: divergence at step" in err
    assert f"sed -n '1s/$/ --overwrite/p' {plan / 'commands.txt'} | bash" in err
    assert _read(plan / "summary.json")["diverged"][0]["algo"] == "bp"
    run_cfg = yaml.safe_load((plan / "bp" / "seed0" / "config.yaml").read_text())
    run_cfg["optimizer"]["lr"] = 0.05  # a rerun that does not diverge clears the marker
    (plan / "bp" / "seed0" / "config.yaml").write_text(yaml.safe_dump(run_cfg))
    assert main(shlex.split(line)[1:]) == 2  # the diverged run is not replaced without being told
    assert "--overwrite" in capsys.readouterr().err
    assert main(shlex.split(line)[1:] + ["--overwrite"]) == 0
    assert not (plan / "bp" / "seed0" / "diverged.json").exists()
    assert main(["collect", str(plan)]) == 0
