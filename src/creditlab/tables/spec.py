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
_TABLE_KEYS = {"doc", "results", "record", "experiment", "command", "columns", "rows", "omit", "per_layer",
               "entries"}
_PER_LAYER_KEYS = {"quantity", "layers", "digits"}
_ROW_KEYS = {"algo", "label", "published", "results", "experiment", "step"}
_RECORD_ROW_KEYS = {"algo", "label", "record", "where"}
_COLUMN_KEYS = {"name", "header", "digits", "std", "metric", "epoch", "key", "at", "scale", "path", "suffix", "sig"}
#: the columns of a record table (results record): a value at a dotted path of the row's entry, a
#: per-layer list of them, a per-row text of the spec; with the algorithm label
RECORD_COLUMNS = ("field", "list", "text")
_RECORD_ONLY = {"path", "suffix", "sig"}
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
    path: str = ""  # field, list: the dotted path into the row's record entry
    suffix: str = ""  # field: text after each value, e.g. "x"
    sig: bool = False  # field, list: digits are significant digits (else digits after the point)


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
    record: str | None = None  # a results record folder (results record), for the rows without their own
    entries: str | None = None  # a record table: the dotted path of the result's list rows select from


def _column(entry: Any, where: str) -> Column:
    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, dict) or "name" not in entry:
        raise ConfigError(f"{where}: a column is a name or {{name: NAME, header: TEXT, digits: N, std: BOOL}}")
    extra = sorted(set(entry) - _COLUMN_KEYS)
    if extra:
        raise ConfigError(f"{where}: unknown key {extra[0]!r}; valid: {', '.join(sorted(_COLUMN_KEYS))}")
    if entry["name"] in RECORD_COLUMNS:
        return _record_column(entry, where)
    if set(entry) & _RECORD_ONLY:
        raise ConfigError(f"{where}: {sorted(set(entry) & _RECORD_ONLY)[0]} belongs to a record table's field or list "
                          f"column")
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


def _record_column(entry: dict, where: str) -> Column:
    """``{name: field, path: P, digits, sig, scale, suffix}``, ``{name: list, path: P, key: K, digits,
    sig, scale}`` (the K of each element of the list at P, joined with ", "), ``{name: text, key: K}``
    (the row's K in the spec)."""
    name, path, key = entry["name"], entry.get("path"), entry.get("key")
    usage = {"field": "{name: field, path: DOTTED.PATH, header: TEXT, digits: N, sig: BOOL, scale: X, suffix: TEXT}",
             "list": "{name: list, path: DOTTED.PATH, key: KEY, header: TEXT, digits: N, sig: BOOL, scale: X}",
             "text": "{name: text, key: ROW_KEY, header: TEXT}"}[name]
    allowed = {"field": {"path", "header", "digits", "sig", "scale", "suffix"},
               "list": {"path", "key", "header", "digits", "sig", "scale"}, "text": {"key", "header"}}[name]
    bad = sorted(set(entry) - allowed - {"name"})
    needs_path = name != "text"
    needs_key = name != "field"
    if (bad or (needs_path and (not isinstance(path, str) or not path))
            or (needs_key and (not isinstance(key, str) or not key))):
        raise ConfigError(f"{where}: a {name} column is {usage}" + (f" ({bad[0]!r} does not apply)" if bad else ""))
    scale = entry.get("scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale == 0:
        raise ConfigError(f"{where}: scale is a non-zero number")
    digits = entry.get("digits", 3 if entry.get("sig") else 2)
    if isinstance(digits, bool) or not isinstance(digits, int) or digits < (1 if entry.get("sig") else 0):
        raise ConfigError(f"{where}: digits is a whole number (>= 1 with sig)")
    return Column(name, str(entry.get("header", key if name == "text" else path)), digits, False,
                  key or "", scale=float(scale), path=path or "", suffix=str(entry.get("suffix", "")),
                  sig=bool(entry.get("sig", False)))


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
                          f"min_over_epochs, logged (and in a record table: {', '.join(RECORD_COLUMNS)})")
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
        if not extra and (t.get("record") or (rows and all(isinstance(r, dict) and r.get("record") for r in rows))):
            tables.append(_record_table(name, t, where))
            continue
        if t.get("entries") is not None:
            raise ConfigError(f"{where}: entries (the list a row selects from) belongs to a record table (record:)")
        per_row = bool(rows) and all(isinstance(r, dict) and r.get("results") for r in rows)
        needed = ("doc", "results", "command") + (("columns",) if not t.get("per_layer") else ("rows",))
        missing = [k for k in needed if not t.get(k) and not (k == "results" and per_row)]
        if extra or missing:
            raise ConfigError(f"{where}: " + (f"unknown key {extra[0]!r}" if extra else f"no {missing[0]}")
                              + f"; keys: {', '.join(sorted(_TABLE_KEYS))}")
        for i, r in enumerate(rows or []):
            if not isinstance(r, dict) or "algo" not in r or set(r) - _ROW_KEYS:
                raise ConfigError(f"{where}: row {i + 1} must be {{algo: SPEC, label: TEXT, published: PATH}} (and "
                                  f"optionally its own results: and experiment:, and in a per_layer table step:)")
            step = r.get("step")
            if step is not None and (not t.get("per_layer") or isinstance(step, bool) or not isinstance(step, int)
                                     or step < 0):
                raise ConfigError(f"{where}: row {i + 1}: step (a logged training step, >= 0) belongs to a per_layer "
                                  f"table's row")
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


def _record_table(name: str, t: dict, where: str) -> Table:
    """A table of measurements (``record:``, see the package docstring), checked."""
    if t.get("results") or t.get("per_layer") or t.get("experiment"):
        key = next(k for k in ("results", "per_layer", "experiment") if t.get(k))
        raise ConfigError(f"{where}: a record table takes no {key}: (it reads results/P/E/record.json)")
    missing = [k for k in ("doc", "columns", "rows") if not t.get(k)]
    if missing:
        raise ConfigError(f"{where}: no {missing[0]}; a record table has doc, record (or each row's), columns, rows")
    entries = t.get("entries")
    if entries is not None and (not isinstance(entries, str) or not entries):
        raise ConfigError(f"{where}: entries is the dotted path of the list in the record's result that rows select "
                          f"from (default results), e.g. entries: layers")
    columns = [_column(c, f"{where}, column {i + 1}") for i, c in enumerate(t["columns"])]
    wrong = [c.name for c in columns if c.name not in (*RECORD_COLUMNS, "algorithm")]
    if wrong:
        raise ConfigError(f"{where}: column {wrong[0]} reads a comparison; a record table's columns are algorithm, "
                          f"{', '.join(RECORD_COLUMNS)}")
    texts = {c.metric for c in columns if c.name == "text"}
    for i, r in enumerate(t["rows"]):
        bad = sorted(set(r) - _RECORD_ROW_KEYS - texts) if isinstance(r, dict) else ["?"]
        if bad or not (r.get("record") or t.get("record")):
            raise ConfigError(f"{where}: row {i + 1} must be {{algo: SPEC, label: TEXT, record: results/P/E, where: "
                              f"{{KEY: VALUE}}}} (and the keys of its text columns: {', '.join(sorted(texts)) or 'none'})"
                              + (f"; {bad[0]!r} is none of these" if bad and bad != ["?"] else ""))
        if r.get("where") is not None and not isinstance(r["where"], dict):
            raise ConfigError(f"{where}: row {i + 1}: where is a mapping {{KEY: VALUE}} the entry must match")
    return Table(name, t["doc"], None, " ".join(str(t.get("command") or "").split()), columns, t["rows"], None,
                 tuple(t.get("omit") or ()), None, t.get("record"), entries)
