"""``creditlab results record``: a measurement's JSON committed with its command and environment,
and nothing written when the measurement cannot be trusted."""

from __future__ import annotations

import json
import sys

import pytest

from creditlab.cli import main
from creditlab.errors import ConfigError
from creditlab.results import record

PRINTS = "import json; print(json.dumps({'results': [{'algo': 'bp', 'ms_per_step': 1.5}]}))"


def test_record_writes_the_command_as_typed_its_json_and_the_environment(tmp_path, capsys):
    root = tmp_path / "results"
    code = main(["results", "record", "--paper", "p", "--experiment", "e", "--root", str(root), "--",
                 "X_DEMO=1", "python", "-c", PRINTS.replace("'bp'", "__import__('os').environ['X_DEMO']")])
    assert code == 0, capsys.readouterr().err
    rec = json.loads((root / "p/e/record.json").read_text())
    assert rec["command"].startswith("X_DEMO=1 python -c ")  # as typed, not sys.executable
    assert rec["result"] == {"results": [{"algo": "1", "ms_per_step": 1.5}]}  # the assignment reached the command
    env = rec["environment"]
    assert set(env) >= {"git_commit", "git_dirty", "torch_version", "cpu_model", "threads", "load_before",
                        "load_after", "date"}
    assert len(env["load_before"]) == 3 and len(env["load_after"]) == 3


def test_record_runs_creditlab_with_this_interpreter_and_keeps_its_name(tmp_path):
    path = record(["creditlab", "bench", "--arch", "6-4-3", "--algos", "bp", "--repeats", "2", "--warmup", "1",
                   "--no-memory", "--threads", "1", "--json"], "p", "e", root=tmp_path)
    rec = json.loads(path.read_text())
    assert rec["command"].startswith("creditlab bench --arch 6-4-3") and sys.executable not in rec["command"]
    assert [r["algo"] for r in rec["result"]["results"]] == ["bp"]


@pytest.mark.parametrize("command, message", [
    (["python", "-c", "import sys; sys.exit(3)"], "failed \\(exit 3"),
    (["python", "-c", "print('a table, not JSON')"], "printed no JSON"),
    (["python", "-c", "print(7)"], "printed int JSON"),
    (["ls", "-l"], "runs a creditlab or python command"),
    ([], "no command"),
])
def test_record_refuses_a_failing_or_non_json_command_and_writes_nothing(tmp_path, command, message):
    with pytest.raises(ConfigError, match=message):
        record(command, "p", "e", root=tmp_path)
    assert not any(tmp_path.rglob("*.json"))


def test_record_refuses_an_existing_record_and_bad_names_and_writes_nothing(tmp_path):
    path = record(["python", "-c", PRINTS], "p", "e", root=tmp_path)
    before = path.read_text()
    with pytest.raises(ConfigError, match="already holds a record; give --overwrite"):
        record(["python", "-c", PRINTS.replace("1.5", "2.5")], "p", "e", root=tmp_path)
    assert path.read_text() == before
    record(["python", "-c", PRINTS.replace("1.5", "2.5")], "p", "e", root=tmp_path, overwrite=True)
    assert json.loads(path.read_text())["result"]["results"][0]["ms_per_step"] == 2.5
    for paper, experiment in (("a/b", "e"), ("p", "../e"), ("", "e")):
        with pytest.raises(ConfigError, match="a name of letters"):
            record(["python", "-c", PRINTS], paper, experiment, root=tmp_path)
    (tmp_path / "p/cmp").mkdir()
    (tmp_path / "p/cmp/summary.json").write_text("{}")
    with pytest.raises(ConfigError, match="holds a comparison"):
        record(["python", "-c", PRINTS], "p", "cmp", root=tmp_path, overwrite=True)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["record.json", "summary.json"]
