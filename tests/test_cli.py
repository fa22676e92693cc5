"""The command line end to end on the bundled mnist-mini: the promised files and JSON keys."""

import json
import os
import subprocess
import sys

import pytest

from creditlab.cli import _split_specs, main


def run(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_algorithm_lists_split_on_commas_between_specs_only():
    assert _split_specs("bp,ar:steps=10,eta=0.1,ar:feedback=learned,fa") == \
        ["bp", "ar:steps=10,eta=0.1", "ar:feedback=learned", "fa"]


def test_train_writes_the_run_directory(tmp_path, capsys):
    code, out, _ = run(["train", "--algo", "ar", "--epochs", "1", "--out", str(tmp_path), "--quiet"], capsys)
    assert code == 0
    s = json.loads((tmp_path / "summary.json").read_text())
    assert {"test_accuracy", "val_accuracy", "train_accuracy", "epochs", "seconds_per_epoch", "algo"} <= set(s)
    assert 0 <= s["test_accuracy"] <= 1 and s["algo"] == "ar"
    for f in ("config.yaml", "metrics.jsonl", "checkpoint.pt", "accuracy.png", "angles.png"):
        assert (tmp_path / f).is_file()


def test_compare_runs_every_algorithm_and_seed_and_summarises(tmp_path, capsys):
    code, out, _ = run(["compare", "--algos", "bp,ar:feedback=learned,derivative=false", "--seeds", "0,1",
                        "--epochs", "1", "--out", str(tmp_path), "--quiet"], capsys)
    assert code == 0
    s = json.loads((tmp_path / "summary.json").read_text())
    algos = [r["algo"] for r in s["algorithms"]]
    assert algos == ["bp", "ar:feedback=learned,derivative=false"]
    for r in s["algorithms"]:
        assert r["seeds"] == [0, 1]
        for k in ("test_accuracy_mean", "test_accuracy_std", "val_accuracy_mean", "seconds_per_epoch_mean",
                  "mean_angle_deg_mean"):
            assert k in r, k
        assert 0 <= r["test_accuracy_mean"] <= 1
    table = (tmp_path / "summary.md").read_text().split("\n\n")[1]  # the main table (per-layer angles follow)
    assert table.count("| `") == 2
    assert (tmp_path / "test_curves.png").is_file() and (tmp_path / "angles.png").is_file()
    # identical batch streams and initial weights: bp's seed-0 run equals a lone train run
    code, _, _ = run(["train", "--algo", "bp", "--epochs", "1", "--seed", "0", "--out", str(tmp_path / "lone"),
                      "--quiet", "--config", str(tmp_path / "config.yaml")], capsys)
    lone = json.loads((tmp_path / "lone" / "summary.json").read_text())
    first = json.loads((tmp_path / "bp" / "seed0" / "summary.json").read_text())
    assert lone["test_accuracy"] == first["test_accuracy"]


def test_check_reports_per_layer_angles_and_errors(capsys):
    code, out, _ = run(["check", "--algo", "ar:steps=inf", "--arch", "30-20-15-10", "--dtype", "float64",
                        "--batch", "16", "--json"], capsys)
    assert code == 0
    res = json.loads(out)
    assert {"algo", "layers", "mean_angle_deg"} <= set(res) and len(res["layers"]) == 3
    for layer in res["layers"]:
        assert {"name", "angle_deg", "rel_error"} <= set(layer)
        assert layer["rel_error"] < 1e-12
    code, out, _ = run(["check", "--algo", "ar:steps=2", "--arch", "30-20-15-10", "--dtype", "float64", "--json"], capsys)
    assert max(r["rel_error"] for r in json.loads(out)["layers"]) > 1e-3


def test_check_on_a_dataset_batch(capsys):
    code, out, _ = run(["check", "--algo", "ar", "--arch", "784-32-10", "--dataset", "mnist-mini", "--json"], capsys)
    assert code == 0 and json.loads(out)["batch"] == 64


def test_relax_writes_trace_and_plots(tmp_path, capsys):
    code, out, _ = run(["relax", "--arch", "40-30-20-10", "--etas", "0.2,0.1", "--steps", "50", "--out",
                        str(tmp_path), "--json"], capsys)
    assert code == 0
    res = json.loads(out)
    assert set(res["mean"]) == {"0.2", "0.1"} and len(res["mean"]["0.1"]) == 51
    assert res["mean"]["0.2"][-1] < res["mean"]["0.1"][-1] < res["mean"]["0.1"][0]  # larger eta converges faster
    for f in ("relax.json", "relax_layers.png", "relax_etas.png"):
        assert (tmp_path / f).is_file()


def test_bench_reports_times_and_ratios(capsys):
    code, out, _ = run(["bench", "--algos", "bp,ar,ar:mode=simulate,steps=10", "--arch", "50-20-10", "--repeats", "3",
                        "--warmup", "1", "--json"], capsys)
    assert code == 0
    res = json.loads(out)
    assert {"device", "threads", "results"} <= set(res)
    assert [r["algo"] for r in res["results"]] == ["bp", "ar", "ar:mode=simulate,steps=10"]
    assert res["results"][0]["ratio_vs_bp"] == 1.0 and all(r["ms_per_step"] > 0 for r in res["results"])


@pytest.mark.parametrize("args,msg", [
    (["check", "--algo", "nope", "--arch", "10-5"], "unknown algorithm 'nope'; valid:"),
    (["train", "--algo", "ar:colour=red", "--epochs", "1"], "unknown option(s) colour"),
    (["train", "--dataset", "svhn"], "dataset='svhn'"),
])
def test_bad_input_is_one_clear_message_and_exit_code_2(args, msg, capsys):
    code, _, err = run(args, capsys)
    assert code == 2 and msg in err


def test_console_script_module_entry_point_runs():
    p = subprocess.run([sys.executable, "-m", "creditlab", "--help"], capture_output=True, text=True,
                       env=dict(os.environ))
    assert p.returncode == 0 and "compare" in p.stdout


def test_shipped_experiments_validate_and_quickstart_file_equals_the_default():
    from pathlib import Path

    from creditlab import config
    from creditlab.compare import QUICKSTART

    root = Path(__file__).resolve().parents[1] / "experiments"
    files = sorted(root.glob("*.yaml"))
    assert files
    for f in files:
        config.load(f)
    assert config.load(root / "quickstart.yaml") == config.resolve(QUICKSTART)


def test_search_command_runs_trials_selected_on_validation(tmp_path, capsys):
    import yaml

    cfg = {"dataset": "fake:n=300,shape=1x6x6", "model": {"arch": "36-12-10", "act": "tanh"}, "algo": "dtp",
           "loss": "cross_entropy", "optimizer": {"name": "adam", "lr": 1e-3}, "epochs": 1, "batch_size": 50,
           "log_every": 0, "threads": 1}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    code, out, _ = run(["search", "--config", str(tmp_path / "c.yaml"), "--trials", "2", "--out",
                        str(tmp_path / "s"), "--quiet"], capsys)
    assert code == 0
    res = json.loads(out)
    assert res["best"] is not None and "best_test_at_selected_epoch" in res
    saved = json.loads((tmp_path / "s" / "search.json").read_text())
    assert saved["selected_on"] == "validation" and len(saved["trials"]) == 2


def test_compare_continues_past_a_diverged_run_and_exits_3(tmp_path, capsys):
    import yaml

    cfg = {"dataset": "fake:n=200,shape=1x6x6", "model": {"arch": "36-12-10", "act": "tanh"}, "loss": "mse",
           "algos": ["ar:steps=inf", "bp"], "optimizer": {"name": "sgd", "lr": 1e6}, "epochs": 1, "batch_size": 50,
           "log_every": 0, "threads": 1}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    code, out, err = run(["compare", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "o"), "--quiet"], capsys)
    assert code == 3 and "diverged" in err
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert [r["algo"] for r in s["algorithms"]] == ["ar:steps=inf", "bp"]  # both were attempted
    assert {d["algo"] for d in s["diverged"]} == {"ar:steps=inf", "bp"}
    assert "diverged" in (tmp_path / "o" / "summary.md").read_text()
