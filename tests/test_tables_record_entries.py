"""A record table's ``entries: PATH``: rows select from another list of the result than
``results`` (``creditlab bench --lc-layers --json`` has ``layers``), by ``where:``; a path that
is missing or holds no list is refused by name, and so is ``entries`` on a comparison table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from creditlab.errors import ConfigError
from creditlab.tables import run

LAYERS = {"command": "creditlab bench --lc-layers --json", "result": {"batch": 128, "layers": [
    {"name": "mnist-1", "conv_ms": 6.25, "lc_ms": 6.5, "ratio": 1.04, "lc_params": 62720},
    {"name": "mnist-2", "conv_ms": 7.75, "lc_ms": 19.875, "ratio": 2.5645, "lc_params": 906304},
    {"name": "cifar-1", "conv_ms": 19.0, "lc_ms": 23.0, "ratio": 1.2105, "lc_params": 1245184}]},
    "environment": {"git_commit": "0123456789abcdef", "git_dirty": False, "cpu_model": "Some CPU",
                    "load_before": [1.0, 2.0, 3.0], "load_after": [1.5, 2.25, 3.0], "date": "2026-12-01T19:00:00Z"}}
SPEC = """\
tables:
  lc:
    doc: docs/m.md
    record: results/p/lc
    entries: layers
    columns: [{name: algorithm, header: layer}, {name: field, path: lc_params, digits: 0, header: LC weights},
              {name: field, path: conv_ms, digits: 1}, {name: field, path: ratio, digits: 2, suffix: x}]
    rows:
      - {label: mnist-2, where: {name: mnist-2}}
      - {label: mnist-1, where: {name: mnist-1}}
      - {label: cifar-1, where: {name: cifar-1}}
"""


@pytest.fixture
def root(tmp_path) -> Path:
    (tmp_path / "results/p/lc").mkdir(parents=True)
    (tmp_path / "results/p/lc/record.json").write_text(json.dumps(LAYERS))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs/tables.yaml").write_text(SPEC)
    (tmp_path / "docs/m.md").write_text("# M\n\n<!-- creditlab-table: lc -->\n<!-- /creditlab-table -->\n")
    return tmp_path


def test_rows_select_from_the_entries_list_by_where_in_the_rows_order(root):
    assert run(root) == (["docs/m.md: lc"], [])
    text = (root / "docs/m.md").read_text()
    assert ("| layer | LC weights | conv_ms | ratio |\n|---|---|---|---|\n"
            "| mnist-2 | 906304 | 7.8 | 2.56x |\n| mnist-1 | 62720 | 6.2 | 1.04x |\n"
            "| cifar-1 | 1245184 | 19.0 | 1.21x |\n") in text


def test_an_entry_of_the_entries_list_in_no_row_is_a_problem_naming_it_by_its_first_text(root):
    (root / "docs/tables.yaml").write_text(SPEC.replace("      - {label: cifar-1, where: {name: cifar-1}}\n", ""))
    assert run(root)[1] == ["table lc: results/p/lc also has name=cifar-1, in no row: add a row or list it under omit"]


def test_without_entries_the_rows_cannot_select_a_layer(root):
    """The default list is results; this result has none, so a where: is refused, not ignored."""
    (root / "docs/tables.yaml").write_text(SPEC.replace("    entries: layers\n", ""))
    with pytest.raises(ConfigError, match="results/p/lc is one measurement of .* where \\{'name': 'mnist-2'\\}"):
        run(root)


@pytest.mark.parametrize("entries, message", [
    ("layer", "no 'layer' in the record's entry \\(at 'layer': batch, layers\\)"),
    ("batch", "entries batch is int, not a list"),
    ("''", "entries is the dotted path of the list"),
])
def test_an_entries_path_without_a_list_is_refused_by_name(root, entries, message):
    (root / "docs/tables.yaml").write_text(SPEC.replace("entries: layers", f"entries: {entries}"))
    with pytest.raises(ConfigError, match=message):
        run(root)


def test_entries_on_a_comparison_table_is_refused(root):
    (root / "docs/tables.yaml").write_text("tables:\n  c:\n    doc: docs/m.md\n    results: results/p/cmp\n"
                                           "    command: creditlab compare\n    entries: layers\n"
                                           "    columns: [algorithm]\n")
    with pytest.raises(ConfigError, match="entries \\(the list a row selects from\\) belongs to a record table"):
        run(root)
