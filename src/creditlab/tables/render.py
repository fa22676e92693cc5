"""A table's Markdown: metric rows (mean ± sample std over seeds, diverged runs named), the
published column with its sources, per-layer tables, and the regeneration recipe."""

from __future__ import annotations

import re
import statistics
from pathlib import Path

from creditlab import config as config_mod
from creditlab.errors import ConfigError
from creditlab.published import lookup
from creditlab.tables.data import _epoch_rows, _logged, _steps, read_results
from creditlab.tables.markdown import esc as _esc
from creditlab.tables.markdown import fixed as _fixed
from creditlab.tables.markdown import header, label
from creditlab.tables.spec import COLUMNS, Column, Table


def _value(col: Column, run: dict) -> tuple[float | None, str]:
    """A run's value for a metric column and how it is shown (acc | err | num)."""
    if col.name == "logged":
        return _logged(_steps(run), col.metric, col.at), "num"
    if col.name == "min_over_epochs":
        _, key, how, _, _ = COLUMNS[col.metric]
        texts = [r.get(key) for r in _epoch_rows(run)]
        if not texts or any(t in (None, "") for t in texts):
            return None, how  # an epoch without the value: no minimum over all epochs
        vals = [float(t) for t in texts]
        return (max(vals) if how == "err" else min(vals)), how  # the smallest error is the largest accuracy
    if col.name == "at_epoch":
        _, key, how, _, _ = COLUMNS[col.metric]
        row = next((r for r in _epoch_rows(run) if str(r.get("epoch")) == str(col.epoch)), None)
        text = row.get(key) if row else None
        return (float(text) if text not in (None, "") else None), how
    _, key, how, _, _ = COLUMNS[col.name]
    return run.get(key), how


def _diverged_text(runs: list[dict]) -> str:
    steps = sorted({r["_diverged"].get("step") for r in runs if r["_diverged"].get("step") is not None})
    return "diverged" + (f" at step {'/'.join(map(str, steps))}" if steps else "")


def _cell(col: Column, runs: list[dict]) -> str:
    finished = [r for r in runs if "_diverged" not in r]
    if not finished:
        return _diverged_text(runs) if runs else "-"
    pairs = [_value(col, r) for r in finished]
    vals = [v for v, _ in pairs]
    how = pairs[0][1]
    if any(v is None for v in vals):
        return "-"
    m = statistics.fmean(vals)  # as compare's summary.md: the mean of the fractions, then in %
    mean = _fixed(100 * m if how == "acc" else 100 * (1 - m) if how == "err" else col.scale * m, col.digits)
    if col.std and len(vals) > 1:
        return f"{mean} ± {_fixed(statistics.stdev(vals) * (abs(col.scale) if how == 'num' else 100), col.digits)}"
    return mean


def _published(table: Table, rows: list[dict], root: Path) -> tuple[list[str], list[str]]:
    """The published cell of each row and the sources footer."""
    if not any(c.name == "published" for c in table.columns):
        return [""] * len(rows), []
    found: list[tuple | None] = []
    for r in rows:
        if r.get("published") is None:
            found.append(None)
            continue
        exp = r.get("experiment") or table.experiment
        block = config_mod.read(root / exp).get("published") or {}
        try:
            p = lookup(block, str(r["published"]))
        except ConfigError as e:
            raise ConfigError(f"{exp}: table {table.name} row `{r['algo']}`: {e}") from None
        found.append((p.value, p.kind, p.source, p.note, block.get("protocol"), exp))
    sources = list(dict.fromkeys(f[1:] for f in found if f is not None))
    cells = []
    for f in found:
        if f is None:
            cells.append("-")
            continue
        i = sources.index(f[1:]) + 1
        cells.append(_esc(f"{f[0]} ({f[1]}{f', source {i}' if len(sources) > 1 else ''})"))
    exps = sorted({src[4] for src in sources})
    one = len(exps) == 1

    def note(kind, source, note, protocol, exp):
        text = f"{kind}: {source}{f' ({note})' if note else ''}"
        return text if one else text + f"; from `{exp}`" + (f", protocol: {protocol}" if protocol else "")

    protocols = sorted({src[3] for src in sources if src[3]})
    head = f"from `{exps[0]}`" + (f"; protocol: {protocols[0]}" if protocols else "") if one else ""
    if not sources:
        return cells, ["Published: no value for these rows."]
    if len(sources) == 1:
        return cells, [f"Published ({note(*sources[0])}{'; ' + head if head else ''})."]
    return cells, [f"Published, by source{f' ({head})' if head else ''}:", ""] + \
        [f"{i}. {note(*src)}" for i, src in enumerate(sources, 1)]


def _add_line(command: str, dirs: list[str], diverged: bool = False) -> str:
    """The ``results add`` step of the regeneration recipe (exact for one ``results/P/E`` folder)."""
    parts = Path(dirs[0]).parts if len(dirs) == 1 else ()
    flags = "--overwrite" + (" --diverged-ok" if diverged else "")
    if len(parts) != 3:
        return f"`creditlab results add RUN_DIR --paper P --experiment E {flags}` for each comparison"
    out = re.search(r"--out[ =](\S+)", command)
    return (f"`creditlab results add {out.group(1) if out else 'RUN_DIR'} --paper {parts[1]} --experiment {parts[2]} "
            f"{flags}`")


def render(table: Table, root: Path) -> tuple[list[str], list[str]]:
    """The lines between the markers of ``table`` and the data problems found on the way."""
    if table.record or any(r.get("record") for r in table.rows or []):
        from creditlab.tables.records import render_record

        return render_record(table, root)
    if table.rows is None and table.results is None:
        raise ConfigError(f"table {table.name}: no results: and no rows")
    data: dict[str, tuple[list[str], dict[str, list[dict]]]] = {}
    problems: list[str] = []

    def results_of(rel: str):
        if rel not in data:
            order, seeds, found = read_results(root / rel)
            data[rel] = (order, seeds)
            problems.extend(found)
        return data[rel]

    rows = table.rows
    if rows is None:
        rows = [{"algo": a} for a in results_of(table.results)[0] if a not in table.omit]
    used = []
    for r in rows:
        rel = r.get("results") or table.results
        order, seeds = results_of(rel)
        if r["algo"] not in seeds:
            raise ConfigError(f"table {table.name}: {rel} has no algorithm {r['algo']!r} (it has: {', '.join(order)})")
        used.append((rel, r["algo"]))
    for rel, (order, _) in data.items():
        unlisted = [a for a in order if (rel, a) not in used and a not in table.omit]
        if unlisted:
            problems.append(f"table {table.name}: {rel} also has {', '.join(unlisted)}, in no row: add a row or "
                            f"list it under omit")
    if table.per_layer is not None:
        lines, footer = _per_layer(table, [(r, data[rel][1][algo]) for (rel, algo), r in zip(used, rows)]), []
    else:
        lines, footer = _metric_rows(table, used, rows, data, root)
    lines += [""] + ([*footer, ""] if footer else [])
    dirs = list(dict.fromkeys(rel for rel, _ in used))
    diverged = any("_diverged" in run for rel in dirs for runs in data[rel][1].values() for run in runs)
    lines += [(f"Generated by `creditlab tables` from {', '.join(f'`{d}`' for d in dirs)} (spec: `docs/tables.yaml`); "
               f"to regenerate: `{table.command}`, then {_add_line(table.command, dirs, diverged)}, then "
               f"`creditlab tables`."), ""]
    return lines, problems


def _at_step(run: dict, step: int) -> dict:
    """The run's metrics.jsonl record of logged step ``step``."""
    steps = _steps(run)
    found = next((r for r in steps if r.get("step") == step), None)
    if found is None:
        logged = ", ".join(str(r.get("step")) for r in steps) or "none"
        raise ConfigError(f"{run['_dir']}/metrics.jsonl: step {step} was not logged (logged steps: {logged})")
    return found


def _layer_values(quantity: str, run: dict, step: int | None = None) -> dict[str, float]:
    if step is not None:  # one logged step's per-layer values, from metrics.jsonl
        rec = _at_step(run, step)
        if quantity == "angle":
            return {k: v for k, v in (rec.get("angles") or {}).items() if isinstance(v, (int, float))}
        return {k.split("/", 1)[1]: v for k, v in rec.items()
                if k.startswith("relax_residual/") and isinstance(v, (int, float))}
    if quantity == "angle":
        return {k: v for k, v in (run.get("layer_angles_deg") or {}).items() if isinstance(v, (int, float))}
    names: dict[str, None] = {}
    for r in _steps(run):
        names.update((k, None) for k in r if k.startswith("relax_residual/"))
    out = {}
    for k in names:
        v = _logged(_steps(run), k, "mean")
        if v is not None:
            out[k.split("/", 1)[1]] = v
    return out


def _per_layer(table: Table, cols: list[tuple[dict, list[dict]]]) -> list[str]:
    """One row per layer, one column per algorithm (see the module docstring)."""
    spec = table.per_layer or {}
    quantity, pattern = spec["quantity"], re.compile(str(spec.get("layers", "")))
    digits = int(spec.get("digits", 2 if quantity == "angle" else 3))
    values = [[_layer_values(quantity, run, r.get("step")) for run in runs if "_diverged" not in run]
              for r, runs in cols]
    layers: dict[str, None] = {}
    for per_seed in values:
        for v in per_seed:
            layers.update((k, None) for k in v if pattern.search(k))

    def show(x: float) -> str:
        return _fixed(x, digits) if quantity == "angle" else f"{x:.{digits}g}"

    what = "angle to BP (deg)" if quantity == "angle" else "relaxation residual"
    lines = header([f"layer: {what}"] + [label(r) for r, _ in cols])
    for name in layers:
        cells = []
        for (_, runs), per_seed in zip(cols, values):
            if not per_seed:
                cells.append(_diverged_text(runs) if runs else "-")
                continue
            vals = [v.get(name) for v in per_seed]
            if any(v is None for v in vals):
                cells.append("-")
                continue
            m = statistics.fmean(vals)
            cells.append(show(m) + (f" ± {show(statistics.stdev(vals))}" if len(vals) > 1 else ""))
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return lines


def _metric_rows(table: Table, used: list[tuple[str, str]], rows: list[dict], data: dict, root: Path
                 ) -> tuple[list[str], list[str]]:
    published, footer = _published(table, rows, root)
    lines = header([c.header for c in table.columns])
    for (rel, algo), r, pub in zip(used, rows, published):
        runs = data[rel][1][algo]
        cells = []
        for c in table.columns:
            if c.name == "algorithm":
                cells.append(_esc(label(r, algo)))
            elif c.name == "n":
                lost = [x for x in runs if "_diverged" in x]
                cells.append(f"{len(runs) - len(lost)}" + (f" (+{len(lost)} diverged)" if lost else ""))
            elif c.name == "epochs":
                eps = sorted({x.get("epochs") for x in runs if "_diverged" not in x})
                cells.append("-".join(map(str, (eps[0], eps[-1]) if len(eps) > 1 else eps)) or "-")
            elif c.name == "published":
                cells.append(pub)
            else:
                cells.append(_cell(c, runs))
        lines.append("| " + " | ".join(cells) + " |")
    return lines, footer
