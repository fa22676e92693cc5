"""``creditlab tables``: the results tables in docs/, generated from the committed results/.

Every generated table sits in its doc between two marker lines::

    <!-- creditlab-table: NAME -->
    ... generated: do not edit by hand ...
    <!-- /creditlab-table -->

and is specified once, in ``docs/tables.yaml`` (paths relative to the repository root)::

    tables:
      NAME:
        doc: docs/activation-relaxation.md    # the doc holding the markers
        results: results/activation-relaxation/ar-mnist   # a comparison in results/ (results add)
        experiment: experiments/ar-mnist.yaml # its published: block gives the published column
        command: creditlab compare --config experiments/ar-mnist.yaml --seeds 0,1 --epochs 5
        columns: [algorithm, n, test_accuracy, mean_angle, {name: published, header: "paper (deg)"}]
        rows:                                 # in this order (default: the comparison's order)
          - {algo: bp, label: "`bp`"}
          - {algo: "ar:schedule=sweep", label: "`ar`", published: angle.ar}   # published.values.angle.ar
        omit: []                              # algorithms of the comparison left out on purpose

A column is a name from :data:`COLUMNS` (or ``algorithm``, ``n``, ``epochs``, ``published``), or a
mapping ``{name, header, digits, std}``. Metric cells are the mean over the row's seeds, with
``± sample std`` when there are two or more; accuracies and errors in %. Each run's own
``summary.json`` is the data; the comparison's ``summary.json`` gives the rows' seeds and must
agree with them. ``creditlab tables --check`` regenerates every section and lists, per doc, table
and row, every line that differs (exit 1).
"""

from __future__ import annotations

import difflib
import json
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from creditlab import config as config_mod
from creditlab.compare import slug
from creditlab.errors import ConfigError
from creditlab.published import lookup

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
    "seconds_per_epoch": ("s / epoch", "seconds_per_epoch", "num", 1, False),
}
_SPECIAL = {"algorithm": "algorithm", "n": "n", "epochs": "epochs", "published": "published"}
_TABLE_KEYS = {"doc", "results", "experiment", "command", "columns", "rows", "omit"}
_ROW_KEYS = {"algo", "label", "published", "results", "experiment"}
_COLUMN_KEYS = {"name", "header", "digits", "std"}
#: the keys the comparison's summary.json aggregates (compare.aggregate) and that are cross-checked
_AGGREGATED = ("test_accuracy", "val_accuracy", "train_accuracy", "test_accuracy_at_best_val",
               "best_test_accuracy_over_training", "test_loss", "val_loss", "seconds_per_epoch", "mean_angle_deg")


@dataclass(frozen=True)
class Column:
    name: str
    header: str
    digits: int = 2
    std: bool = True


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


# ---- the spec ---------------------------------------------------------------------------
def _column(entry: Any, where: str) -> Column:
    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, dict) or "name" not in entry:
        raise ConfigError(f"{where}: a column is a name or {{name: NAME, header: TEXT, digits: N, std: BOOL}}")
    extra = sorted(set(entry) - _COLUMN_KEYS)
    if extra:
        raise ConfigError(f"{where}: unknown key {extra[0]!r}; valid: {', '.join(sorted(_COLUMN_KEYS))}")
    name = entry["name"]
    if name in _SPECIAL:
        return Column(name, entry.get("header", _SPECIAL[name]))
    if name not in COLUMNS:
        raise ConfigError(f"{where}: unknown column {name!r}; valid: {', '.join([*_SPECIAL, *COLUMNS])}")
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
        missing = [k for k in ("doc", "results", "command", "columns") if not t.get(k) and not (k == "results" and per_row)]
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
        tables.append(Table(name, t["doc"], t.get("results"), " ".join(str(t["command"]).split()),
                            [_column(c, f"{where}, column {i + 1}") for i, c in enumerate(t["columns"])],
                            rows, t.get("experiment"), tuple(t.get("omit") or ())))
    return tables


# ---- the data ---------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: missing") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


def read_results(directory: Path) -> tuple[list[str], dict[str, list[dict]], list[str]]:
    """The comparison in ``directory``: its algorithms in order, each one's per-seed summaries,
    and the disagreements between the comparison's summary.json and those (one line each)."""
    comp = _read_json(directory / "summary.json")
    order, seeds, problems = [], {}, []
    for row in comp.get("algorithms", []):
        algo = row["algo"]
        order.append(algo)
        seeds[algo] = [_read_json(directory / slug(algo) / f"seed{s}" / "summary.json") for s in row["seeds"]]
        for s, summary in zip(row["seeds"], seeds[algo]):
            if not summary.get("finished") or summary.get("algo") != algo or summary.get("seed") != s:
                problems.append(f"{directory}/{slug(algo)}/seed{s}/summary.json: row `{algo}`: not the finished run "
                                f"of {algo} seed {s}")
        for key in _AGGREGATED:
            if f"{key}_mean" not in row:
                continue
            vals = [x.get(key) for x in seeds[algo] if x.get(key) is not None]
            mean = statistics.fmean(vals) if vals else None
            stated = row[f"{key}_mean"]
            if (mean is None) != (stated is None) or (mean is not None and abs(mean - stated) > 1e-9 * max(1, abs(mean))):
                problems.append(f"{directory}/summary.json: row `{algo}`: {key}_mean is {stated}, its {len(vals)} "
                                f"seed(s)' summary.json give {mean}")
    return order, seeds, problems


# ---- rendering --------------------------------------------------------------------------
def _fixed(x: float, digits: int) -> str:
    text = f"{x:.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def _cell(col: Column, runs: list[dict]) -> str:
    _, key, how, _, _ = COLUMNS[col.name]
    vals = [r.get(key) for r in runs]
    if not vals or any(v is None for v in vals):
        return "-"
    m = statistics.fmean(vals)  # as compare's summary.md: the mean of the fractions, then in %
    mean = _fixed(100 * m if how == "acc" else 100 * (1 - m) if how == "err" else m, col.digits)
    if col.std and len(vals) > 1:
        return f"{mean} ± {_fixed(statistics.stdev(vals) * (1 if how == 'num' else 100), col.digits)}"
    return mean


def _esc(text: str) -> str:
    return text.replace("|", "\\|")


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


def _add_line(command: str, dirs: list[str]) -> str:
    """The ``results add`` step of the regeneration recipe (exact for one ``results/P/E`` folder)."""
    parts = Path(dirs[0]).parts if len(dirs) == 1 else ()
    if len(parts) != 3:
        return "`creditlab results add RUN_DIR --paper P --experiment E --overwrite` for each comparison"
    out = re.search(r"--out[ =](\S+)", command)
    return (f"`creditlab results add {out.group(1) if out else 'RUN_DIR'} --paper {parts[1]} --experiment {parts[2]} "
            f"--overwrite`")


def render(table: Table, root: Path) -> tuple[list[str], list[str]]:
    """The lines between the markers of ``table`` and the data problems found on the way."""
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
    published, footer = _published(table, rows, root)
    lines = ["", "| " + " | ".join(_esc(c.header) for c in table.columns) + " |",
             "|" + "---|" * len(table.columns)]
    for (rel, algo), r, pub in zip(used, rows, published):
        runs = data[rel][1][algo]
        cells = []
        for c in table.columns:
            if c.name == "algorithm":
                cells.append(_esc(str(r.get("label") or f"`{algo}`")))
            elif c.name == "n":
                cells.append(str(len(runs)))
            elif c.name == "epochs":
                eps = sorted({x.get("epochs") for x in runs})
                cells.append("-".join(map(str, (eps[0], eps[-1]) if len(eps) > 1 else eps)))
            elif c.name == "published":
                cells.append(pub)
            else:
                cells.append(_cell(c, runs))
        lines.append("| " + " | ".join(cells) + " |")
    lines += [""] + ([*footer, ""] if footer else [])
    dirs = list(dict.fromkeys(rel for rel, _ in used))
    lines += [f"Generated by `creditlab tables` from {', '.join(f'`{d}`' for d in dirs)} (spec: `docs/tables.yaml`); "
              f"to regenerate: `{table.command}`, then {_add_line(table.command, dirs)}, then `creditlab tables`.", ""]
    return lines, problems


# ---- the docs ---------------------------------------------------------------------------
def sections(text: str, doc: str) -> dict[str, tuple[int, int]]:
    """``{NAME: (first, last)}``: the line indices of each table's begin and end markers."""
    found: dict[str, tuple[int, int]] = {}
    lines = text.split("\n")
    open_at: tuple[str, int] | None = None
    for i, line in enumerate(lines):
        m = BEGIN.match(line.strip())
        if m:
            if open_at:
                raise ConfigError(f"{doc}:{i + 1}: table {m.group(1)} begins inside table {open_at[0]} (line "
                                  f"{open_at[1] + 1}); close it with {END}")
            if m.group(1) in found:
                raise ConfigError(f"{doc}:{i + 1}: table {m.group(1)} is marked twice")
            open_at = (m.group(1), i)
        elif line.strip() == END:
            if not open_at:
                raise ConfigError(f"{doc}:{i + 1}: {END} without a table begin marker")
            found[open_at[0]] = (open_at[1], i)
            open_at = None
    if open_at:
        raise ConfigError(f"{doc}:{open_at[1] + 1}: table {open_at[0]} has no {END}")
    return found


def _row_of(line: str | None) -> str:
    if not line or not line.startswith("|") or set(line) <= set("|- "):
        return ""
    return re.split(r"(?<!\\)\|", line.strip()[1:])[0].strip()


def _differences(doc: str, name: str, old: list[str], new: list[str], first: int) -> list[str]:
    """One line per differing line of a section: ``DOC:LINE: table NAME, row LABEL: ...``
    (``first``: the doc's line number of the begin marker)."""
    header = _row_of(new[1]) if len(new) > 1 else ""
    out = []
    for op, a0, a1, b0, b1 in difflib.SequenceMatcher(None, old, new, autojunk=False).get_opcodes():
        if op == "equal":
            continue
        olds, news = old[a0:a1], new[b0:b1]
        for k in range(max(len(olds), len(news))):
            o = olds[k] if k < len(olds) else None
            n = news[k] if k < len(news) else None
            row = _row_of(n) or _row_of(o)
            where = ("the header" if row == header else f"row {row}") if row else "text"
            out.append(f"{doc}:{first + 1 + a0 + min(k, len(olds))}: table {name}, {where}: the doc has " + (f"'{o}'" if o is not None else "no line")
                       + ", results/ give " + (f"'{n}'" if n is not None else "no line"))
    return out


def run(root: str | Path = ".", spec: str | Path | None = None, check: bool = False) -> tuple[list[str], list[str]]:
    """Regenerate every table of the spec and write the docs (``check=False``; nothing is written
    if a problem is found) or only compare them (``check=True``). Returns (the tables that
    changed or differ, the problems: one line each, naming doc, table and row; empty = all agree)."""
    root = Path(root)
    tables = load_spec(Path(spec) if spec else root / SPEC)
    by_doc: dict[str, list[Table]] = {}
    for t in tables:
        by_doc.setdefault(t.doc, []).append(t)
    problems, changed, texts = [], [], {}
    docs = {str(p.relative_to(root)) for p in (root / "docs").rglob("*.md")} if (root / "docs").is_dir() else set()
    for doc in sorted(docs | set(by_doc)):
        path = root / doc
        if not path.is_file():
            raise ConfigError(f"{doc}: no such doc (named by table {by_doc[doc][0].name} in the spec)")
        text = path.read_text()
        marks = sections(text, doc)
        specified = {t.name for t in by_doc.get(doc, [])}
        for name in sorted(set(marks) - specified):
            problems.append(f"{doc}: table {name} is marked but not in the spec; add it to {SPEC} or remove the markers")
        lines = text.split("\n")
        for t in sorted(by_doc.get(doc, []), key=lambda t: marks.get(t.name, (-1, -1))[0], reverse=True):
            if t.name not in marks:
                problems.append(f"{doc}: table {t.name} has no markers; put <!-- creditlab-table: {t.name} --> and "
                                f"{END} where it goes")
                continue
            new, data_problems = render(t, root)
            problems += data_problems
            first, last = marks[t.name]
            old = lines[first + 1:last]
            if old != new:
                changed.append(f"{doc}: {t.name}")
                if check:
                    problems += _differences(doc, t.name, old, new, first + 1)
                lines[first + 1:last] = new
        texts[path] = (text, "\n".join(lines))
    if not check and not problems:
        for path, (before, after) in texts.items():
            if after != before:
                path.write_text(after)
    return sorted(changed), problems
