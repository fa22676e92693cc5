"""What a user types on the command line: overrides, the flags the README promises, and one
line (exit 2, no traceback) for every bad input."""

import argparse
import errno
import json
import re
import shlex
import subprocess
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

import creditlab
from creditlab import cli, config
from creditlab.cli import build_parser, main
from creditlab.errors import CreditlabError

TINY = {"dataset": "fake:n=60,classes=3,shape=1x4x4,test=20", "model": {"arch": "16-8-3", "act": "tanh"},
        "optimizer": {"name": "adam", "lr": 0.01}, "epochs": 1, "log_every": 0, "threads": 1}
README = Path(__file__).resolve().parents[1] / "README.md"


def run(args, capsys):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(code, err, expected_code=2):
    assert code == expected_code, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("creditlab: "), err
    return lines[0]


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


@pytest.fixture
def calls(monkeypatch):
    """train, compare and run_search replaced by recorders of their arguments."""
    seen = []

    def fake_train(cfg, out, **kw):
        seen.append(("train", cfg, Path(out), kw))
        return {"algo": cfg["algo"]}

    def fake_compare(cfg, out, **kw):
        seen.append(("compare", cfg, Path(out), kw))
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "summary.md").write_text("table\n")
        return {"diverged": []}

    def fake_search(cfg, trials, out, **kw):
        seen.append(("search", cfg, Path(out), kw))
        return {"best": {}, "diverged": 0}

    monkeypatch.setattr("creditlab.train.train", fake_train)
    monkeypatch.setattr("creditlab.compare.compare", fake_compare)
    monkeypatch.setattr("creditlab.search.run_search", fake_search)
    return seen


# ---- overrides and the README's flags ---------------------------------------------------
def test_train_applies_dotted_overrides_on_top_of_the_yaml(tmp_path, tiny, capsys):
    out = tmp_path / "run"
    code, _, err = run(["train", "--config", tiny, "--algo", "bp", "optimizer.lr=1e-3", "--out", out,
                        "model.arch=16-4-3", "--quiet", "epochs=1"], capsys)
    assert code == 0, err
    stored = config.read(out / "config.yaml")
    assert stored["optimizer"]["lr"] == 1e-3 and stored["optimizer"]["name"] == "adam"
    assert stored["model"]["arch"] == "16-4-3" and stored["model"]["act"] == "tanh"


@pytest.mark.parametrize("command", ["train", "compare", "search"])
def test_model_and_arch_flags_set_the_model_on_train_compare_and_search(tiny, calls, capsys, command):
    extra = ["--algo", "bp"] if command != "compare" else []
    code, _, err = run([command, "--config", tiny, *extra, "--model", "mnist-fc", "--quiet"], capsys)
    assert code == 0, err
    assert calls[-1][1]["model"]["name"] == "mnist-fc"
    named = {**TINY, "model": {"name": "mnist-fc", "act": "tanh"}}
    tiny.write_text(yaml.safe_dump(named))
    code, _, err = run([command, "--config", tiny, *extra, "--arch", "16-5-3", "--quiet"], capsys)
    assert code == 0, err
    model = calls[-1][1]["model"]
    assert model["arch"] == "16-5-3" and model["name"] is None and model["act"] == "tanh"


def test_model_and_arch_together_are_refused(tiny, capsys):
    code, _, err = run(["train", "--config", tiny, "--model", "mnist-fc", "--arch", "16-8-3"], capsys)
    assert "--model mnist-fc --arch 16-8-3: give one" in one_line_error(code, err)


def test_a_flag_and_an_override_of_the_same_key_must_agree(tiny, capsys):
    code, _, err = run(["train", "--config", tiny, "--epochs", "2", "epochs=3"], capsys)
    assert "epochs is given twice, by --epochs 2 and by epochs=3" in one_line_error(code, err)


def test_readme_command_lines_parse(monkeypatch):
    text = README.read_text()
    block = text[text.index("## Command line"):]
    block = block[block.index("```bash") + 7:]
    block = block[:block.index("```")]
    lines = [ln.split("  #")[0].strip() for ln in block.splitlines() if ln.strip().startswith("creditlab")]
    assert len(lines) >= 10
    for line in lines:
        argv = shlex.split(line)[1:]
        if argv in (["--version"],):
            continue
        args = cli.parse_args(argv)  # a flag the CLI lacks raises here
        if hasattr(args, "overrides"):
            [config.parse_override(o) for o in args.overrides]


# ---- --version, help, list --------------------------------------------------------------
def test_version_is_the_installed_package_version(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--version"])
    assert e.value.code == 0
    capsys.readouterr()
    assert creditlab.__version__ == version("creditlab")
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"creditlab {creditlab.__version__}"


def test_every_option_of_every_command_has_a_help_text():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    parsers = {"creditlab": parser, **{f"creditlab {n}": p for n, p in sub.choices.items()}}
    missing = [f"{name} {a.option_strings or a.dest}" for name, p in parsers.items() for a in p._actions
               if not (a.help or "").strip() or a.help == argparse.SUPPRESS]
    assert not missing, missing
    assert {"train", "compare", "collect", "check", "relax", "bench", "search", "list"} <= set(sub.choices)


def test_list_shows_algorithms_with_option_defaults_models_and_datasets(capsys):
    from creditlab.algorithms import algorithm_class, algorithm_names
    from creditlab.data import DATASETS
    from creditlab.models import model_names

    code, out, _ = run(["list"], capsys)
    assert code == 0
    flat = " ".join(out.split())
    for name in algorithm_names():
        assert re.search(rf"^  {re.escape(name)} ", out, re.M), name
        for key in algorithm_class(name).defaults:
            assert f"{key}=" in flat, (name, key)
    assert "steps=100 eta=0.1" in flat and "noise=0.0 input_noise=0.0" in flat
    for name in [*model_names(), *DATASETS]:
        assert re.search(rf"^  {re.escape(name)}\b", out, re.M), name
    code, out, _ = run(["list", "--json"], capsys)
    res = json.loads(out)
    assert res["algorithms"]["bp"]["options"] == {"noise": 0.0, "input_noise": 0.0}
    assert set(res["models"]) == set(model_names()) and list(res["datasets"]) == list(DATASETS)


# ---- train with a comparison's config, resume, overwrite ---------------------------------
def test_train_on_a_config_listing_several_algos_asks_for_algo(tiny, capsys):
    tiny.write_text(yaml.safe_dump({**TINY, "algos": ["bp", "ar:steps=10,eta=0.1"]}))
    code, _, err = run(["train", "--config", tiny, "--quiet"], capsys)
    line = one_line_error(code, err)
    assert "lists 2 algorithms under algos: (bp; ar:steps=10,eta=0.1)" in line and "--algo" in line


def test_train_on_a_config_listing_one_algo_trains_it_and_says_so(tiny, calls, capsys):
    tiny.write_text(yaml.safe_dump({**TINY, "algos": ["fa"]}))
    code, out, err = run(["train", "--config", tiny, "--quiet"], capsys)
    assert code == 0, err
    assert calls[-1][1]["algo"] == "fa" and "training it: fa" in out


def test_compare_on_a_config_naming_one_algo_compares_that_algorithm_not_the_default(tiny, calls, capsys):
    tiny.write_text(yaml.safe_dump({**TINY, "algo": "dfa"}))
    code, out, err = run(["compare", "--config", tiny, "--quiet", "--out", tiny.parent / "c"], capsys)
    assert code == 0, err
    assert calls[-1][1]["algos"] == ["dfa"] and "comparing it alone: dfa" in out
    code, out, err = run(["compare", "--config", tiny, "--quiet", "--algos", "bp,fa", "--out", tiny.parent / "d"], capsys)
    assert code == 0 and calls[-1][1]["algos"] == ["bp", "fa"] and "alone" not in out


def test_resume_needs_only_the_run_directory(tmp_path, calls, capsys):
    out = tmp_path / "run"
    out.mkdir()
    stored = config.resolve({**TINY, "algo": "fa", "seed": 3, "epochs": 2})
    (out / "config.yaml").write_text(config.dump(stored))
    code, _, err = run(["train", "--resume", "--out", out, "--quiet"], capsys)
    assert code == 0, err
    _, cfg, where, kw = calls[-1]
    assert cfg == stored and where == out
    assert kw["resume"] is True and kw["extend"] is False and kw["overwrite"] is False
    code, _, err = run(["train", "--resume", "--out", out, "--quiet", "--epochs", "5"], capsys)
    assert code == 0, err
    assert calls[-1][1]["epochs"] == 5 and calls[-1][3]["extend"] is True
    code, _, err = run(["train", "--resume", "--out", out, "--quiet", "epochs=6"], capsys)
    assert calls[-1][1]["epochs"] == 6 and calls[-1][3]["extend"] is True


def test_resume_from_the_run_directory_continues_the_stored_run(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run(["train", *[f"{k}={json.dumps(v)}" for k, v in TINY.items()],
                        "--algo", "fa", "--seed", "3", "--out", out, "--quiet"], capsys)
    assert code == 0, err
    code, stdout, err = run(["train", "--resume", "--out", out, "--epochs", "2", "--quiet"], capsys)
    assert code == 0, err
    summary = json.loads(stdout[stdout.index("{"):])
    assert summary["algo"] == "fa" and summary["epochs"] == 2
    assert config.read(out / "config.yaml")["seed"] == 3


def test_compare_resume_needs_only_the_comparison_directory(tmp_path, calls, capsys):
    out = tmp_path / "cmp"
    out.mkdir()
    stored = config.resolve({**TINY, "algos": ["fa", "bp"], "seeds": [3, 4]})
    (out / "config.yaml").write_text(config.dump(stored))
    code, _, err = run(["compare", "--resume", "--out", out, "--quiet"], capsys)
    assert code == 0, err
    assert calls[-1][1] == stored and calls[-1][3]["resume"] is True and calls[-1][3]["extend"] is False


@pytest.mark.parametrize("command", ["train", "compare"])
def test_overwrite_is_passed_on_and_refused_with_resume(tiny, calls, capsys, command):
    algo = ["--algo", "bp"] if command == "train" else []
    code, _, err = run([command, "--config", tiny, *algo, "--overwrite", "--quiet"], capsys)
    assert code == 0, err
    assert calls[-1][3]["overwrite"] is True and calls[-1][3]["extend"] is False
    code, _, err = run([command, "--config", tiny, *algo, "--resume", "--epochs", "4", "--quiet"], capsys)
    assert code == 0 and calls[-1][3]["extend"] is True and calls[-1][3]["overwrite"] is False
    code, _, err = run([command, "--config", tiny, *algo, "--overwrite", "--resume"], capsys)
    assert "--resume and --overwrite: give one" in one_line_error(code, err)


# ---- one line, exit 2 --------------------------------------------------------------------
@pytest.mark.parametrize("args,msg", [
    (["compare", "--seeds", "abc"], "--seeds abc: give comma-separated integers"),
    (["compare", "--seeds", "0,0"], "--seeds 0,0: seeds=[0, 0] lists seed 0 more than once"),
    (["compare", "seeds=[1,1]"], "seeds=[1,1]: seeds=[1, 1] lists seed 1 more than once"),
    (["train", "--threads", "-1"], "--threads -1: threads=-1 must be >= 1"),
    (["train", "--threads", "0"], "--threads 0: threads=0 must be >= 1"),
    (["compare", "--threads", "0"], "--threads 0: threads=0 must be >= 1"),
    (["relax", "--etas", "abc"], "--etas abc: give comma-separated positive numbers"),
    (["relax", "--etas", "0.1,-1"], "--etas 0.1,-1: give comma-separated positive numbers"),
    (["train", "--algo", "fq"], "--algo fq: unknown algorithm 'fq'; valid:"),
    (["compare", "--algos", "bp,fq"], "--algos bp,fq: unknown algorithm 'fq'; valid:"),
    (["train", "optimizer.lr=fast"], "optimizer.lr=fast: config key optimizer.lr = 'fast' has type str"),
    (["train", "optimizer.lrr=1"], "optimizer.lrr=1: unknown config key optimizer.'lrr'; valid keys:"),
    (["train", "bp"], "'bp' is not a KEY=VALUE override"),
    (["train", "--epochs", "abc"], "train: argument --epochs: invalid int value: 'abc'"),
    (["train", "--colour", "red"], "train: unrecognized arguments: --colour"),
    (["bench", "--repeats", "0"], "argument --repeats: 0 must be >= 1"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_bad_input_is_one_line_and_exit_2(tiny, args, msg, capsys):
    code, _, err = run(args, capsys)
    assert msg in one_line_error(code, err)


def test_an_unknown_algorithm_in_the_yaml_names_the_file_and_one_from_a_flag_names_the_flag(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**TINY, "algo": "fq"}))
    code, _, err = run(["train", "--config", path], capsys)
    assert one_line_error(code, err).startswith(f"creditlab: {path}: unknown algorithm 'fq'")
    path.write_text(yaml.safe_dump(TINY))
    code, _, err = run(["train", "--config", path, "--algo", "fq"], capsys)
    assert one_line_error(code, err).startswith("creditlab: --algo fq: unknown algorithm 'fq'")


def test_cuda_with_nproc_on_a_machine_without_cuda_is_one_error_before_any_launch(tiny, monkeypatch, capsys):
    launched = []
    monkeypatch.setattr(cli, "launch_nproc", lambda *a: launched.append(a) or 1)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    code, out, err = run(["train", "--config", tiny, "--algo", "bp", "--device", "cuda", "--nproc", "2"], capsys)
    line = one_line_error(code, err)
    assert "--device cuda: device='cuda' requested but CUDA is not available" in line
    assert not launched and "launching" not in out


def test_exit_code_is_the_errors_own(monkeypatch, tiny, capsys):
    class Stopped(CreditlabError):
        pass

    def stopped(*a, **k):
        e = Stopped("stopped by SIGTERM; --resume continues")
        e.exit_code = 143
        raise e

    monkeypatch.setattr("creditlab.train.train", stopped)
    code, _, err = run(["train", "--config", tiny, "--algo", "bp", "--quiet"], capsys)
    assert "stopped by SIGTERM" in one_line_error(code, err, expected_code=143)


def test_a_full_disk_is_one_line_naming_the_path(monkeypatch, tmp_path, tiny, capsys):
    path = tmp_path / "run" / "checkpoint.pt"

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr("creditlab.train.train", full)
    code, _, err = run(["train", "--config", tiny, "--algo", "bp", "--quiet"], capsys)
    assert one_line_error(code, err) == f"creditlab: cannot write {path}: No space left on device"


def test_collect_prints_a_rerun_line_that_resumes_an_unfinished_run(monkeypatch, tmp_path, capsys):
    plan = tmp_path / "a plan"
    plan.mkdir()
    (plan / "commands.txt").write_text("echo first\necho 'second run'\n")
    (plan / "summary.md").write_text("table\n")
    incomplete = [{"status": "unfinished", "algo": "bp", "seed": 0, "dir": "bp/seed0", "message": "epoch 1 of 3",
                   "line": 2, "rerun": "--resume"},
                  {"status": "missing", "algo": "fa", "seed": 0, "dir": "fa/seed0", "message": "no run", "line": 1,
                   "rerun": ""}]
    monkeypatch.setattr("creditlab.compare.collect", lambda d: {"incomplete": incomplete, "diverged": []})
    code, _, err = run(["collect", plan], capsys)
    assert code == 4
    reruns = [ln.split("rerun: ", 1)[1] for ln in err.splitlines() if "rerun: " in ln]
    assert len(reruns) == 2
    outputs = [subprocess.run(["bash", "-c", r], capture_output=True, text=True).stdout for r in reruns]
    assert outputs == ["second run --resume\n", "first\n"]
