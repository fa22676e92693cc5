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
mapping ``{name, header, digits, std, scale}``, or one of three metrics read from the runs' metric
files:

* ``{name: at_epoch, metric: test_accuracy, epoch: N}``: an epoch's value from ``metrics.csv``
  (``metric``: a per-epoch metric of :data:`COLUMNS`, e.g. ``val_error`` or ``test_loss``);
* ``{name: min_over_epochs, metric: test_loss}``: each run's smallest value of that per-epoch
  metric over all the epochs of its ``metrics.csv`` (for ``test_error``/``val_error`` the smallest
  error; ``-`` if an epoch lacks the value), e.g. a paper's "mean over runs of the minimum test loss";
* ``{name: logged, key: KEY, at: mean | first | last}``: a scalar that the training loop logs at
  its logged steps in ``metrics.jsonl`` (e.g. ``relax_residual_mean``), over those steps.

``scale: X`` shows a number column's values (and their std) times X, e.g. a loss in another unit
(refused for the columns shown in %).

Metric cells are the mean over the row's seeds, with ``± sample std`` when there are two or
more; accuracies and errors in %. Each run's own ``summary.json`` is the data; the comparison's
``summary.json`` gives the rows' seeds and must agree with them. A diverged run (committed by
``results add --diverged-ok``) is shown as such: a row whose every seed diverged reads
``diverged at step N`` in its metric cells, and ``n`` counts the finished seeds with the
diverged ones beside them.

A table with ``per_layer: {quantity: angle | residual, layers: REGEX, digits: N}`` is turned
around: one row per layer (in the model's order; ``layers`` keeps those whose name matches),
one column per row of ``rows`` (an algorithm), each cell the run's per-layer mean over its
logged steps: the angle to backprop (``layer_angles_deg`` of summary.json) or the relaxation
residual (``relax_residual/LAYER`` of metrics.jsonl). A row with ``step: N`` reads instead the
values logged at training step N (``angles`` or ``relax_residual/LAYER`` of that step's
metrics.jsonl record; a step that was not logged is refused, naming the logged ones), so the
rows ``{algo: A, step: 0}, {algo: A, step: 10}`` give a layer's angle at steps 0 and 10.

A table of measurements names ``record: results/P/E`` (in the table or per row) instead of
``results:``: the ``record.json`` that ``creditlab results record --paper P --experiment E --
COMMAND`` wrote (the command, its JSON output, the environment). A row's entry is the element
of the result's ``results`` list whose ``algo`` is the row's ``algo`` (and whose keys match the
row's ``where: {KEY: VALUE}``; ``creditlab bench --json``), or, for a result without that list,
the whole result (one ``creditlab check --json`` per row). ``entries: PATH`` (a dotted path of
the result, which must hold a list) names the list rows select from instead of ``results``, e.g.
``entries: layers`` for ``creditlab bench --lc-layers --json``, whose rows select a layer by
``where: {layer: cifar-1}``. Its columns are ``algorithm`` and:

* ``{name: field, path: ms_per_step, digits: N, sig: BOOL, scale: X, suffix: "x"}``: the number at a
  dotted path of the entry (``memory.step_bytes`` with ``scale: 9.5367431640625e-07``: MiB),
  times ``scale``, with N digits after the point (``sig: true``: N significant digits); null is
  ``-``, exactly zero ``0``;
* ``{name: list, path: layers, key: angle_deg, digits: N, sig: BOOL}``: the ``key`` of every
  element of the list at ``path`` (each layer's angle), joined with ", ";
* ``{name: text, key: target}``: the row's own ``target:`` text from the spec.

Entries of a record in no row are a problem unless their ``algo`` is listed under ``omit``.
Under the table: each record's command, commit, date, CPU and the load average before and after
it ran, and how to rerun it.

``creditlab tables --check`` regenerates every section and lists, per doc, table and row, every
line that differs (exit 1).
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path

from creditlab.errors import ConfigError
from creditlab.tables.render import render
from creditlab.tables.spec import BEGIN, COLUMNS, END, SPEC, Column, Table, load_spec

__all__ = ["BEGIN", "COLUMNS", "END", "SPEC", "Column", "Table", "load_spec", "render", "run", "sections"]


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
