"""The table spec (``docs/tables.yaml``): its columns and tables, read and checked."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from creditlab import config as config_mod
from creditlab.errors import ConfigError

SPEC = "docs/tables.yaml"
BEGIN = re.compile(r"^<!-- creditlab-table: ([A-Za-z0-9._-]+) -->$")
END = "<!-- /creditlab-table -->"

#: metric columns: name -> (header, summary.json key, how shown: acc | err | num, digits, std shown)
COLUMNS: dict[str, tuple[str, str, str, int, bool]] = {
    "test_accuracy": ("test acc. (%)", "test_accuracy", "acc", 2, True),
    "val_accuracy": ("val acc. (%)", "val_accuracy", "acc", 2, True),
    "train_accuracy": ("train acc. (%)", "train_accuracy", "acc", 2, True),
    "test_accuracy_at_best_val": ("test acc. at best val (%)", "test_accuracy_at_best_val", "acc", 2, True),
    "best_test_accuracy_over_training": ("best test acc. over training (%)", "best_test_accuracy_over_training",
                                         "acc", 2, True),
    "test_error": ("test error (%)", "test_accuracy", "err", 2, True),
    "val_error": ("val error (%)", "val_accuracy", "err", 2, True),
    "test_error_at_best_val": ("test error at best val (%)", "test_accuracy_at_best_val", "err", 2, True),
    "best_test_error_over_training": ("best test error over training (%)", "best_test_accuracy_over_training",
                                      "err", 2, True),
    "test_loss": ("test loss", "test_loss", "num", 3, True),
    "val_loss": ("val loss", "val_loss", "num", 3, True),
    "test_loss_at_best_val": ("test loss at best val", "test_loss_at_best_val", "num", 3, True),
    "mean_angle": ("mean angle to BP (deg)", "mean_angle_deg", "num", 2, True),
    "mean_angle_differing": ("mean angle to BP over differing layers (deg)", "mean_angle_differing_deg", "num", 2,
                             True),
    "seconds_per_epoch": ("s / epoch", "seconds_per_epoch", "num", 1, False),
    "epoch_seconds_median": ("s / epoch (median, epochs 2..)", "epoch_seconds_median", "num", 1, False),
}
#: the metrics of COLUMNS that metrics.csv has per epoch (for at_epoch columns)
_PER_EPOCH = {"test_accuracy", "val_accuracy", "train_accuracy", "test_error", "val_error", "test_loss", "val_loss"}
_LOGGED_AT = ("mean", "first", "last")
_SPECIAL = {"algorithm": "algorithm", "n": "n", "epochs": "epochs", "published": "published"}
_TABLE_KEYS = {"doc", "results", "experiment", "command", "columns", "rows", "omit", "per_layer"}
_PER_LAYER_KEYS = {"quantity", "layers", "digits"}
_ROW_KEYS = {"algo", "label", "published", "results", "experiment"}
_COLUMN_KEYS = {"name", "header", "digits", "std", "metric", "epoch", "key", "at", "scale"}
#: the keys the comparison's summary.json aggregates (compare.aggregate) and that are cross-checked
_AGGREGATED = ("test_accuracy", "val_accuracy", "train_accuracy", "test_accuracy_at_best_val",
               "best_test_accuracy_over_training", "test_loss", "val_loss", "seconds_per_epoch", "mean_angle_deg")


@dataclass(frozen=True)
class Column:
    name: str
    header: str
    digits: int = 2
    std: bool = True
    metric: str = ""  # at_epoch, min_over_epochs: the COLUMNS metric; logged: the metrics.jsonl key
    epoch: int = 0  # at_epoch
    at: str = "mean"  # logged
    scale: float = 1.0  # a number column's values (and std) are shown times this


@dataclass
class Table:
    name: str
    doc: str
    results: str | None
    command: str
    columns: list[Column]
    rows: list[dict] | None
    experiment: str | None = None
    omit: tuple[str, ...] = ()
    per_layer: dict | None = None


def _column(entry: Any, where: str) -> Column:
    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, dict) or "name" not in entry:
        raise ConfigError(f"{where}: a column is a name or {{name: NAME, header: TEXT, digits: N, std: BOOL}}")
    extra = sorted(set(entry) - _COLUMN_KEYS)
    if extra:
        raise ConfigError(f"{where}: unknown key {extra[0]!r}; valid: {', '.join(sorted(_COLUMN_KEYS))}")
    col = _column_of(entry, where)
    if "scale" in entry:
        scale = entry["scale"]
        shown = "num" if col.name == "logged" else COLUMNS[col.metric or col.name][2] if (
            col.metric or col.name) in COLUMNS else ""
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale == 0 or shown != "num":
            raise ConfigError(f"{where}: scale (a non-zero number) applies to a number column (a loss, an angle, a "
                              f"logged value), not to {col.name}" + (" in %" if shown in ("acc", "err") else ""))
        col = replace(col, scale=float(scale))
    return col


def _column_of(entry: dict, where: str) -> Column:
    name = entry["name"]
    if name == "at_epoch":
        metric, epoch = entry.get("metric"), entry.get("epoch")
        if metric not in _PER_EPOCH or not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 1:
            raise ConfigError(f"{where}: an at_epoch column is {{name: at_epoch, metric: M, epoch: N}} with N >= 1 "
                              f"and M one of {', '.join(sorted(_PER_EPOCH))}")
        header, _, _, digits, std = COLUMNS[metric]
        return Column(name, entry.get("header", f"{header.replace(' (%)', '')}, epoch {epoch}"
                                               f"{' (%)' if '(%)' in header else ''}"),
                      int(entry.get("digits", digits)), bool(entry.get("std", std)), metric, epoch)
    if name == "min_over_epochs":
        metric = entry.get("metric")
        if metric not in _PER_EPOCH:
            raise ConfigError(f"{where}: a min_over_epochs column is {{name: min_over_epochs, metric: M}} with M one "
                              f"of {', '.join(sorted(_PER_EPOCH))}")
        header, _, _, digits, std = COLUMNS[metric]
        return Column(name, entry.get("header", f"min over epochs of {header}"), int(entry.get("digits", digits)),
                      bool(entry.get("std", std)), metric)
    if name == "logged":
        key, at = entry.get("key"), entry.get("at", "mean")
        if not isinstance(key, str) or not key or at not in _LOGGED_AT:
            raise ConfigError(f"{where}: a logged column is {{name: logged, key: KEY, at: {' | '.join(_LOGGED_AT)}}} "
                              f"(KEY: a scalar of metrics.jsonl's step records, e.g. relax_residual_mean)")
        return Column(name, entry.get("header", f"{key} ({at} over logged steps)"), int(entry.get("digits", 3)),
                      bool(entry.get("std", True)), key, at=at)
    if name in _SPECIAL:
        return Column(name, entry.get("header", _SPECIAL[name]))
    if name not in COLUMNS:
        raise ConfigError(f"{where}: unknown column {name!r}; valid: {', '.join([*_SPECIAL, *COLUMNS])}, at_epoch, "
                          f"min_over_epochs, logged")
    header, _, _, digits, std = COLUMNS[name]
    return Column(name, entry.get("header", header), int(entry.get("digits", digits)), bool(entry.get("std", std)))


def load_spec(path: Path) -> list[Table]:
    """The tables of a spec file, checked (a mistake is a ConfigError naming table and key)."""
    if not path.is_file():
        raise ConfigError(f"{path}: no table spec here (give --spec FILE or --root DIR)")
    raw = yaml.load(path.read_text(), Loader=config_mod.Loader) or {}  # noqa: S506 (a safe loader)
    if not isinstance(raw, dict) or not isinstance(raw.get("tables"), dict):
        raise ConfigError(f"{path}: the top level must be tables: {{NAME: {{doc, results, command, columns, rows}}}}")
    tables = []
    for name, t in raw["tables"].items():
        where = f"{path}: table {name}"
        if not BEGIN.match(f"<!-- creditlab-table: {name} -->"):
            raise ConfigError(f"{where}: a table name is letters, digits, '.', '_' and '-'")
        if not isinstance(t, dict):
            raise ConfigError(f"{where} must be a mapping")
        extra = sorted(set(t) - _TABLE_KEYS)
        rows = t.get("rows")
        per_row = bool(rows) and all(isinstance(r, dict) and r.get("results") for r in rows)
        needed = ("doc", "results", "command") + (("columns",) if not t.get("per_layer") else ("rows",))
        missing = [k for k in needed if not t.get(k) and not (k == "results" and per_row)]
        if extra or missing:
            raise ConfigError(f"{where}: " + (f"unknown key {extra[0]!r}" if extra else f"no {missing[0]}")
                              + f"; keys: {', '.join(sorted(_TABLE_KEYS))}")
        for i, r in enumerate(rows or []):
            if not isinstance(r, dict) or "algo" not in r or set(r) - _ROW_KEYS:
                raise ConfigError(f"{where}: row {i + 1} must be {{algo: SPEC, label: TEXT, published: PATH}} (and "
                                  f"optionally its own results: and experiment:)")
            if r.get("published") is not None and not (r.get("experiment") or t.get("experiment")):
                raise ConfigError(f"{where}: row {i + 1} has a published value but no experiment: (the YAML whose "
                                  f"published: block holds it), in the row or the table")
        per_layer = t.get("per_layer")
        if per_layer is not None:
            if (not isinstance(per_layer, dict) or set(per_layer) - _PER_LAYER_KEYS
                    or per_layer.get("quantity") not in ("angle", "residual")):
                raise ConfigError(f"{where}: per_layer is {{quantity: angle | residual, layers: REGEX, digits: N}}")
            try:
                re.compile(str(per_layer.get("layers", "")))
            except re.error as e:
                raise ConfigError(f"{where}: per_layer.layers {per_layer.get('layers')!r} is not a regular expression "
                                  f"({e})") from None
            if t.get("columns"):
                raise ConfigError(f"{where}: a per_layer table takes its columns from rows (one per algorithm); "
                                  f"remove columns:")
        tables.append(Table(name, t["doc"], t.get("results"), " ".join(str(t["command"]).split()),
                            [_column(c, f"{where}, column {i + 1}") for i, c in enumerate(t.get("columns") or [])],
                            rows, t.get("experiment"), tuple(t.get("omit") or ()), per_layer))
    return tables
