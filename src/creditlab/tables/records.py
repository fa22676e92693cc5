"""A record table's Markdown: rows of measurements read from ``results/P/E/record.json``
(``creditlab results record``), each with the command that measured it and the load it ran under."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from creditlab.errors import ConfigError
from creditlab.results import RECORD
from creditlab.tables.data import _read_json
from creditlab.tables.markdown import esc, fixed, header, label
from creditlab.tables.spec import Column, Table


def read_record(directory: Path) -> dict:
    """A record.json, checked for its three parts."""
    rec = _read_json(directory / RECORD)
    missing = [k for k in ("command", "result", "environment") if k not in rec] if isinstance(rec, dict) else ["all"]
    if missing:
        raise ConfigError(f"{directory / RECORD}: not a record (no {missing[0]}); creditlab results record writes it")
    return rec


def _entries(table: Table, rel: str, rec: dict) -> list[Any] | None:
    """The list of entries a row selects from (``result.results``, or the table's ``entries:``
    path, which must lead to a list), or None: the row's entry is the whole result."""
    res = rec["result"]
    if table.entries is None:
        return res["results"] if isinstance(res, dict) and isinstance(res.get("results"), list) else None
    found = _at(res, table.entries, f"table {table.name}: {rel} (entries: {table.entries})")
    if not isinstance(found, list):
        raise ConfigError(f"table {table.name}: {rel}: entries {table.entries} is {type(found).__name__}, not a list")
    return found


def _name(entry: Any) -> str:
    """An entry as a message names it: its algo, else its first text item as KEY=VALUE."""
    if not isinstance(entry, dict):
        return repr(entry)
    if entry.get("algo") is not None:
        return str(entry["algo"])
    return next((f"{k}={v}" for k, v in entry.items() if isinstance(v, str)), "an entry without algo")


def _select(table: Table, rel: str, rec: dict, row: dict) -> tuple[int | None, Any]:
    """The row's entry of the record (its index in ``result.results``, or None for the whole result)."""
    entries = _entries(table, rel, rec)
    where = row.get("where") or {}
    if entries is None:
        res = rec["result"]
        if where or (row.get("algo") is not None and isinstance(res, dict) and "algo" in res
                     and res["algo"] != row["algo"]):
            raise ConfigError(f"table {table.name}: row {label(row)}: {rel} is one measurement of "
                              f"{res.get('algo') if isinstance(res, dict) else 'no algorithm'}, not of "
                              f"{row.get('algo')}" + (f" where {where}" if where else ""))
        return None, res
    found = [i for i, e in enumerate(entries) if isinstance(e, dict)
             and (row.get("algo") is None or e.get("algo") == row["algo"])
             and all(e.get(k) == v for k, v in where.items())]
    if len(found) != 1:
        has = ", ".join(_name(e) for e in entries if isinstance(e, dict))
        what = f"algo {row.get('algo')}" + (f" where {where}" if where else "")
        raise ConfigError(f"table {table.name}: row {label(row)}: {rel} has "
                          + (f"no entry of {what} (it has: {has})" if not found else
                             f"{len(found)} entries of {what}; tell them apart with where: {{KEY: VALUE}}"))
    return found[0], entries[found[0]]


def _at(entry: Any, path: str, where: str) -> Any:
    value = entry
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            keys = ", ".join(map(str, value)) if isinstance(value, dict) else type(value).__name__
            raise ConfigError(f"{where}: no {path!r} in the record's entry (at {part!r}: {keys})")
    return value


def _number(col: Column, x: Any, where: str) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ConfigError(f"{where}: {col.path} is {x!r}, not a number")
    v = col.scale * x
    if v == 0:
        return "0"  # exactly zero, at any digits
    if col.sig:
        text = f"{v:#.{col.digits}g}"
        mantissa, e, exp = text.partition("e")
        text = mantissa.rstrip(".") + (f"e{int(exp)}" if e else "")
        return text[1:] if text.startswith("-") and float(text) == 0 else text
    return fixed(v, col.digits)


def _cell(col: Column, row: dict, entry: Any, where: str) -> str:
    if col.name == "algorithm":
        return label(row)
    if col.name == "text":
        return str(row.get(col.metric, ""))
    value = _at(entry, col.path, where)
    if col.name == "list":
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {col.path} is not a list")
        return ", ".join(_number(col, _at(x, col.metric, where), where) for x in value)
    return _number(col, value, where) + (col.suffix if value is not None else "")


def _provenance(rec: dict) -> str:
    env = rec["environment"]
    commit = str(env.get("git_commit") or "unknown")[:7] + (" + uncommitted changes" if env.get("git_dirty") else "")
    load = [", ".join(f"{x:.2f}" for x in env[k]) if env.get(k) else "unknown" for k in ("load_before", "load_after")]
    return (f"commit {commit}, {str(env.get('date') or 'undated')[:10]}, {env.get('cpu_model') or 'unknown CPU'}, "
            f"load average (1, 5, 15 min) {load[0]} before and {load[1]} after")


def _recipe(rel: str, rec: dict) -> str:
    parts = Path(rel).parts
    paper, exp = (parts[-2], parts[-1]) if len(parts) >= 2 else ("P", "E")
    return f"`creditlab results record --paper {paper} --experiment {exp} --overwrite -- {rec['command']}`"


def render_record(table: Table, root: Path) -> tuple[list[str], list[str]]:
    """The lines between the markers of a record table and the data problems found on the way."""
    records: dict[str, dict] = {}
    used: dict[str, set[int]] = {}
    picked = []
    for row in table.rows or []:
        rel = str(row.get("record") or table.record).rstrip("/")
        if rel not in records:
            records[rel] = read_record(root / rel)
            used[rel] = set()
        i, entry = _select(table, rel, records[rel], row)
        if i is not None:
            used[rel].add(i)
        picked.append((row, entry))
    problems = []
    for rel, rec in records.items():
        entries = _entries(table, rel, rec)
        left = [_name(e) for i, e in enumerate(entries or []) if i not in used[rel]
                and not (isinstance(e, dict) and e.get("algo") in table.omit)]
        if left:
            problems.append(f"table {table.name}: {rel} also has {', '.join(left)}, in no row: add a row or list it "
                            f"under omit")
    lines = header([c.header for c in table.columns])
    for row, entry in picked:
        where = f"table {table.name}, row {label(row)}"
        lines.append("| " + " | ".join(esc(_cell(c, row, entry, where)) for c in table.columns) + " |")
    lines.append("")
    if len(records) == 1:
        rel, rec = next(iter(records.items()))
        lines += [f"Generated by `creditlab tables` from `{rel}/{RECORD}` (spec: `docs/tables.yaml`), measured by "
                  f"`{rec['command']}` ({_provenance(rec)}); to regenerate: {_recipe(rel, rec)}, then "
                  f"`creditlab tables`.", ""]
    else:
        lines += ["Generated by `creditlab tables` (spec: `docs/tables.yaml`) from these records, each measured by "
                  "its command; to regenerate one: `creditlab results record --paper P --experiment E --overwrite "
                  "-- COMMAND`, then `creditlab tables`:", ""]
        lines += [f"- `{rel}`: `{rec['command']}` ({_provenance(rec)})" for rel, rec in records.items()]
        lines.append("")
    return lines, problems
