"""Committed results: the small outputs of finished comparisons, kept in the repository as data
for the tables in docs/ (``creditlab tables``).

Layout (``ROOT`` is ``results/`` at the repository root)::

    ROOT/<paper>/<experiment>/summary.json            the comparison's summary (compare / collect)
    ROOT/<paper>/<experiment>/config.yaml             the comparison's resolved config
    ROOT/<paper>/<experiment>/<algo>/seed<N>/config.yaml    each run's resolved config
    ROOT/<paper>/<experiment>/<algo>/seed<N>/summary.json   each run's summary
    ROOT/<paper>/<experiment>/<algo>/seed<N>/metrics.csv    each run's epoch rows
    ROOT/<paper>/<experiment>/<algo>/seed<N>/metrics.jsonl  only when small (<= JSONL_LIMIT)

``<algo>`` is the directory name ``compare`` gives the algorithm spec
(:func:`creditlab.compare.slug`). No checkpoints, no plots. :func:`add` copies a finished
comparison there; it refuses one with an unfinished or missing run (naming each), one with a
diverged run unless ``diverged_ok`` (a diverged run is then committed as its outcome: its
``config.yaml``, ``diverged.json`` (message and step) and whatever metrics it wrote; the tables
show it as diverged), and an existing result unless ``overwrite``.

A measurement (``creditlab bench/check ... --json`` or ``python scripts/X.py ... --json``) is
committed by :func:`record` as one file, ``ROOT/<paper>/<experiment>/record.json``: the command
as typed, its JSON output and the environment it ran in (see :func:`record`).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from creditlab import config as config_mod
from creditlab.compare import PLAN, Run, planned_runs, read_outcome, slug
from creditlab.errors import ConfigError
from creditlab.train import DIVERGED

#: the files of a comparison and of each run that are committed
TOP_FILES = ("summary.json", "config.yaml")
RUN_FILES = ("config.yaml", "summary.json", "metrics.csv")
#: metrics.jsonl is committed only up to this size (bytes)
JSONL_LIMIT = 256 * 1024
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_OURS = set(TOP_FILES) | set(RUN_FILES) | {"metrics.jsonl", DIVERGED}
#: the file of a recorded measurement
RECORD = "record.json"
_ENV_WORD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def _name(value: str, flag: str) -> str:
    if not _NAME.match(value or ""):
        raise ConfigError(f"{flag} {value!r}: a name of letters, digits, '.', '_' and '-' (no '/'), e.g. "
                          f"{'activation-relaxation' if flag == '--paper' else 'ar-mnist'}")
    return value


def comparison_runs(run_dir: Path) -> list[Run]:
    """The runs of a ``compare`` output directory (its config.yaml) or of a plan (plan.json)."""
    if (run_dir / PLAN).is_file():
        plan = json.loads((run_dir / PLAN).read_text())
        return [Run(r["algo"], int(r["seed"]), run_dir / r["dir"]) for r in plan["runs"]]
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir}: no config.yaml or {PLAN}; results add takes the directory of a "
                          f"creditlab compare (its --out) or of a plan (compare --plan DIR, then collect DIR)")
    return planned_runs(config_mod.load(run_dir / "config.yaml"), run_dir)


def check_finished(run_dir: Path, diverged_ok: bool = False) -> tuple[dict, list[Run], set[Run]]:
    """The comparison's summary, its runs and the diverged ones among them, if every run
    finished (or diverged, with ``diverged_ok``); else ConfigError naming each diverged,
    unfinished or missing run."""
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: not a directory")
    path = run_dir / "summary.json"
    summary = json.loads(path.read_text()) if path.is_file() else None
    single = any((run_dir / f).exists() for f in ("checkpoint.pt", "metrics.jsonl", "diverged.json"))
    if single or (summary is not None and "algorithms" not in summary):
        raise ConfigError(f"{run_dir} holds a single run (creditlab train), not a comparison; results add takes "
                          f"the directory of a creditlab compare or collect")
    runs = comparison_runs(run_dir)
    bad, diverged, some_diverged = [], set(), False
    for run in runs:
        o = read_outcome(run)
        if o.status == "diverged" and diverged_ok:
            diverged.add(run)
        elif o.status != "ok":
            some_diverged |= o.status == "diverged"
            bad.append(f"{run.algo} seed {run.seed} {o.status} ({o.message}; {run.dir})")
    if bad:
        raise ConfigError(f"{run_dir}: not a finished comparison, {len(bad)} run(s) not finished: " + "; ".join(bad)
                          + ". Resume or rerun them (creditlab compare --resume --out DIR, or the plan's rerun lines "
                            "and creditlab collect DIR), then add the result"
                          + ("; a divergence that is the result itself is committed with --diverged-ok"
                             if some_diverged else ""))
    if summary is None:
        raise ConfigError(f"{run_dir}: no summary.json (the comparison was stopped before it wrote it); "
                          f"creditlab compare --resume --out {run_dir} (or creditlab collect) writes it")
    for key in ("diverged", "incomplete"):
        listed = {(o["algo"], o["seed"]) for o in summary.get(key) or []}
        if key == "diverged" and listed == {(r.algo, r.seed) for r in diverged}:
            continue
        if listed:
            names = ", ".join(f"{a} seed {s}" for a, s in sorted(listed))
            raise ConfigError(f"{path} lists {key} runs ({names}) that the run directories do not show as such; "
                              f"rerun the comparison's summary first (creditlab compare --resume --out {run_dir}, or "
                              f"creditlab collect)")
    if {(r.algo, r.seed) for r in diverged} - {(o["algo"], o["seed"]) for o in summary.get("diverged") or []}:
        raise ConfigError(f"{path} does not list every diverged run; rewrite it first (creditlab compare --resume "
                          f"--out {run_dir}, or creditlab collect)")
    return summary, runs, diverged


def _check_removable(dest: Path) -> None:
    for p in dest.rglob("*"):
        if p.is_file() and p.name not in _OURS:
            raise ConfigError(f"{dest}: --overwrite would delete {p}, which results add did not write; "
                              f"move it away first")


def add(run_dir: str | Path, paper: str, experiment: str, root: str | Path = "results",
        overwrite: bool = False, diverged_ok: bool = False) -> Path:
    """Copy the finished comparison in ``run_dir`` to ``root/paper/experiment`` (see the module
    docstring); returns that directory."""
    run_dir = Path(run_dir)
    dest = Path(root) / _name(paper, "--paper") / _name(experiment, "--experiment")
    summary, runs, diverged = check_finished(run_dir, diverged_ok)
    if dest.exists() and any(dest.iterdir()):
        if not overwrite:
            raise ConfigError(f"{dest} already holds a result; give --overwrite to replace it (its files are removed "
                              f"first)")
        _check_removable(dest)
    tmp = dest.with_name(f".{dest.name}.adding")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        for name in TOP_FILES:
            if (run_dir / name).is_file():
                shutil.copyfile(run_dir / name, tmp / name)
        for run in runs:
            out = tmp / slug(run.algo) / f"seed{run.seed}"
            out.mkdir(parents=True, exist_ok=True)
            if run in diverged:  # its outcome: what it wrote before it stopped
                names = [n for n in (*RUN_FILES, DIVERGED) if (run.dir / n).is_file()]
            else:
                missing = [n for n in RUN_FILES if not (run.dir / n).is_file()]
                if missing:
                    raise ConfigError(f"{run.dir}: no {missing[0]} (a finished run writes it); rerun {run.algo} seed "
                                      f"{run.seed}")
                names = list(RUN_FILES)
            for name in names:
                shutil.copyfile(run.dir / name, out / name)
            jsonl = run.dir / "metrics.jsonl"
            if jsonl.is_file() and jsonl.stat().st_size <= JSONL_LIMIT:
                shutil.copyfile(jsonl, out / "metrics.jsonl")
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return dest


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _threads(omp: str | None) -> int:
    """The threads a child command gets by default: OMP_NUM_THREADS, else torch's default here
    (a command's own --threads, stated in its command line, overrides both)."""
    import torch

    return int(omp) if omp and omp.isdigit() else torch.get_num_threads()


def _argv(command: list[str]) -> tuple[dict[str, str], list[str]]:
    """The environment assignments leading ``command`` and the argv that runs the rest:
    ``creditlab`` as this interpreter's ``-m creditlab``, ``python``/``python3`` as this
    interpreter; anything else is refused."""
    env, i = {}, 0
    while i < len(command) and _ENV_WORD.match(command[i]):
        key, value = command[i].split("=", 1)
        env[key] = value
        i += 1
    rest = command[i:]
    if not rest or rest[0] not in ("creditlab", "python", "python3"):
        raise ConfigError(f"results record runs a creditlab or python command (e.g. -- creditlab bench ... --json, "
                          f"-- python scripts/pc_measure.py --cost --json), not {shlex.join(rest) or 'nothing'}")
    head = [sys.executable, "-m", "creditlab"] if rest[0] == "creditlab" else [sys.executable]
    return env, head + rest[1:]


def record(command: list[str], paper: str, experiment: str, root: str | Path = "results",
           overwrite: bool = False) -> Path:
    """Run ``command`` (the words a user types, e.g. ``["creditlab", "bench", ..., "--json"]``,
    optionally led by ``NAME=VALUE`` environment assignments) and write ``root/paper/experiment/
    record.json``::

        {"command": the command line as typed (creditlab spelled creditlab),
         "result": the JSON the command printed on stdout,
         "environment": {git_commit, git_dirty, torch_version, python_version, cpu_model,
                         cpu_count, threads (OMP_NUM_THREADS / torch's default of this process),
                         load_before, load_after (os.getloadavg), seconds, date (UTC)}}

    Refused (ConfigError, nothing written): bad names, an existing record without ``overwrite``,
    a folder holding a comparison, a command that fails or whose stdout is not JSON. Returns the
    file's path."""
    import torch

    from creditlab.provenance import cpu_model, git_state

    dest = Path(root) / _name(paper, "--paper") / _name(experiment, "--experiment")
    path = dest / RECORD
    if not command:
        raise ConfigError("results record: no command; give it after --, e.g. creditlab results record --paper P "
                          "--experiment E -- creditlab bench --json")
    line = shlex.join(command)
    if dest.exists() and any(p.name != RECORD for p in dest.iterdir()):
        raise ConfigError(f"{dest} holds a comparison (results add), not a record; give the record another "
                          f"--experiment")
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} already holds a record; give --overwrite to replace it")
    env, argv = _argv(command)
    commit, dirty = git_state()
    before, start = _load(), datetime.datetime.now(datetime.timezone.utc)
    try:
        done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **env})
    except OSError as e:
        raise ConfigError(f"results record: cannot run {line}: {e}") from None
    seconds = (datetime.datetime.now(datetime.timezone.utc) - start).total_seconds()
    after = _load()
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise ConfigError(f"results record: {line} failed (exit {done.returncode}: {tail}); nothing recorded")
    try:
        result = json.loads(done.stdout)
    except json.JSONDecodeError:
        raise ConfigError(f"results record: {line} printed no JSON on stdout (give the command --json); nothing "
                          f"recorded") from None
    if not isinstance(result, (dict, list)):
        raise ConfigError(f"results record: {line} printed {type(result).__name__} JSON, not an object or list; "
                          f"nothing recorded")
    out = {
        "command": line,
        "result": result,
        "environment": {
            "git_commit": commit, "git_dirty": dirty, "torch_version": torch.__version__,
            "python_version": platform.python_version(), "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
            "threads": _threads(env.get("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS"))),
            "load_before": before, "load_after": after, "seconds": round(seconds, 1),
            "date": start.strftime("%Y-%m-%dT%H:%M:%SZ"),
        },
    }
    dest.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{RECORD}.writing")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    tmp.replace(path)
    return path
