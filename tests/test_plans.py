"""The committed GPU plans (experiments/plans/) are what their experiment files give today, and
a plan that drifts from its file is named."""

import importlib.util
import shutil
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _make():
    spec = importlib.util.spec_from_file_location("plans_make", REPO / "experiments" / "plans" / "make.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MAKE = _make()
ENTRIES = yaml.safe_load((REPO / "experiments" / "plans" / "plans.yaml").read_text())["plans"]


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["dir"] for e in ENTRIES])
def test_every_committed_plan_equals_a_fresh_plan_of_its_experiment_file(entry, monkeypatch):
    monkeypatch.chdir(REPO)
    assert MAKE.differing(entry) == []
    commands = (REPO / "experiments" / "plans" / entry["dir"] / "commands.txt").read_text()
    assert str(REPO) not in commands and commands.startswith("creditlab train --config experiments/plans/")


def test_a_plan_whose_experiment_file_changed_is_named_with_its_files(tmp_path, monkeypatch):
    (tmp_path / "experiments" / "plans").mkdir(parents=True)
    shutil.copy(REPO / "experiments" / "gait-cifar-shallow.yaml", tmp_path / "experiments")
    entry = {"dir": "g", "config": "experiments/gait-cifar-shallow.yaml"}
    monkeypatch.chdir(tmp_path)
    MAKE.write(entry)
    assert MAKE.differing(entry) == []
    path = tmp_path / "experiments" / "gait-cifar-shallow.yaml"
    path.write_text(path.read_text().replace("epochs: 200", "epochs: 100"))
    changed = MAKE.differing(entry)
    assert "config.yaml" in changed and "bp/seed1/config.yaml" in changed
    assert "commands.txt" not in changed and "plan.json" not in changed
