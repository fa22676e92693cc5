"""``creditlab compare``: every algorithm x seed on identical batch streams and identical
initial weights (the seed fixes both), then one summary table and comparison plots.

The runs go one after another in this process (``jobs=1``), in ``jobs`` parallel local
processes (the same numbers at equal torch threads), or on a cluster: :func:`plan` writes each
run's resolved config and one ``creditlab train`` command line per run, and :func:`collect`
turns the finished run directories into the same summary. Serial, parallel and collected
comparisons share one aggregation, :func:`write_comparison`.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import statistics
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from creditlab import config as config_mod
from creditlab.build import build_data
from creditlab.data import Dataset
from creditlab.errors import ConfigError, DivergenceError
from creditlab.parallel import split_cores
from creditlab.rundir import CHECKPOINT, RunLock, check_out_dir, holds_run, prepare, writing
from creditlab.metrics import angles_from, read_metrics
from creditlab.train import DIVERGED, train

PLAN = "plan.json"
COMMANDS = "commands.txt"

#: The quick-start default: the AR paper's MLP set-up on the bundled MNIST subset.
QUICKSTART: dict[str, Any] = {
    "name": "quickstart",
    "dataset": "mnist-mini",
    "model": {"arch": "784-300-300-100-10", "act": "relu", "out_act": "linear", "bias": False, "init": "normal(0.05)"},
    "loss": "mse",
    "algos": ["bp", "ar:schedule=sweep", "ar:schedule=sweep,feedback=learned,derivative=false"],
    "optimizer": {"name": "sgd", "lr": 0.0005},
    "epochs": 5,
    "batch_size": 64,
    "seeds": [0],
    "log_every": 25,
}


def slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", spec.replace(":", "__").replace(",", "_"))


def _mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return statistics.fmean(xs) if xs else None


def _std(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.stdev(xs) if len(xs) > 1 else (0.0 if xs else None)


def aggregate(algo: str, seeds: list[int], summaries: list[dict]) -> dict[str, Any]:
    row: dict[str, Any] = {"algo": algo, "seeds": seeds}
    keys = ("test_accuracy", "val_accuracy", "train_accuracy", "test_accuracy_at_best_val",
            "best_test_accuracy_over_training", "test_loss", "val_loss", "seconds_per_epoch", "mean_angle_deg")
    for key in keys:
        vals = [s.get(key) for s in summaries]
        if any(v is not None for v in vals):
            row[f"{key}_mean"] = _mean(vals)
            if key in ("test_accuracy", "val_accuracy", "test_loss", "test_accuracy_at_best_val"):
                row[f"{key}_std"] = _std(vals)
    row["epochs"] = summaries[0].get("epochs") if summaries else 0
    return row


def markdown_table(rows: list[dict], cfg: dict, incomplete: list[dict] | None = None) -> str:
    cls = cfg["task"] == "classify"
    head = ("| algorithm | seeds | test acc. (%) | val acc. (%) | test acc. at best val (%) | s / epoch | mean angle to BP (deg) |"
            if cls else "| algorithm | seeds | test loss | val loss | s / epoch | mean angle to BP (deg) |")
    lines = [f"# {cfg['name']}: {cfg['dataset']}, {max((r['epochs'] for r in rows), default=0)} epochs", "", head,
             "|" + "---|" * (head.count("|") - 1)]

    def pct(r, k):
        m, s = r.get(f"{k}_mean"), r.get(f"{k}_std")
        return "-" if m is None else f"{100 * m:.2f} ± {100 * (s or 0):.2f}"

    def num(v, fmt="{:.2f}"):
        return "-" if v is None else fmt.format(v)

    for r in rows:
        lost = [(what, r[f"{what}_seeds"]) for what in ("diverged", "missing") if r.get(f"{what}_seeds")]
        if not r["seeds"]:
            lines.append(f"| `{r['algo']}` | 0 | " + "; ".join(f"{w} (seeds {s})" for w, s in lost) + " |")
            continue
        common = f"| `{r['algo']}` | {len(r['seeds'])}{''.join(f' (+{len(s)} {w})' for w, s in lost)} | "
        tail = f"{num(r.get('seconds_per_epoch_mean'))} | {num(r.get('mean_angle_deg_mean'))} |"
        if cls:
            lines.append(common + f"{pct(r, 'test_accuracy')} | {pct(r, 'val_accuracy')} | "
                         f"{pct(r, 'test_accuracy_at_best_val')} | " + tail)
        else:
            lines.append(common + f"{num(r.get('test_loss_mean'), '{:.3f}')} | {num(r.get('val_loss_mean'), '{:.3f}')} | " + tail)
    if incomplete:
        lines += ["", "Missing or unfinished runs (not in the table):", ""]
        lines += [f"- `{o['algo']}` seed {o['seed']}: {o['status']} ({o['dir']})" for o in incomplete]
    if cfg.get("published"):
        lines += ["", "Published (from the paper, for comparison):", "", "```", json.dumps(cfg["published"], indent=2), "```"]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Run:
    """One algorithm x seed of a comparison and its run directory."""

    algo: str
    seed: int
    dir: Path


@dataclass
class Outcome:
    """How a run ended: ``ok`` (finished), ``diverged`` (NaN/inf), ``missing`` (no
    ``summary.json``) or ``unfinished`` (a ``summary.json`` that says finished=false)."""

    run: Run
    status: str
    summary: dict | None = None
    message: str = ""


def planned_runs(cfg: dict, out: Path) -> list[Run]:
    """Every algorithm x seed, algorithm-major, in ``out/<slug(algo)>/seed<S>``."""
    return [Run(algo, seed, out / slug(algo) / f"seed{seed}") for algo in cfg["algos"] for seed in cfg["seeds"]]


def run_config(cfg: dict, run: Run) -> dict:
    return dict(cfg, algo=run.algo, seed=run.seed)


def read_outcome(run: Run) -> Outcome:
    """A run's outcome from its directory alone (what :func:`collect` sees)."""
    marker = run.dir / DIVERGED
    if marker.is_file():
        return Outcome(run, "diverged", message=json.loads(marker.read_text()).get("message", ""))
    path = run.dir / "summary.json"
    if not path.is_file():
        return Outcome(run, "missing", message="no summary.json")
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError:
        return Outcome(run, "unfinished", message="summary.json is unreadable (the job was killed while writing it?)")
    if not summary.get("finished"):
        return Outcome(run, "unfinished", summary, f"{summary.get('epochs', 0)} epoch(s) of the planned run done")
    return Outcome(run, "ok", summary)


def write_comparison(cfg: dict, out: Path, outcomes: list[Outcome]) -> dict:
    """The one aggregation of serial, parallel and collected comparisons: ``summary.json``,
    ``summary.md`` and the plots in ``out`` from the runs' outcomes (in plan order). Diverged
    runs are listed under ``diverged``; missing or unfinished ones, if any, under ``incomplete``."""
    rows, curves, angle_curves = [], {}, {}
    diverged = [{"algo": o.run.algo, "seed": o.run.seed, "message": o.message, "dir": str(o.run.dir),
                 "line": i + 1, "rerun": "--overwrite"} for i, o in enumerate(outcomes) if o.status == "diverged"]
    incomplete = [{"algo": o.run.algo, "seed": o.run.seed, "status": o.status, "dir": str(o.run.dir),
                   "line": i + 1, "message": o.message,  # line: its line of a plan's commands.txt
                   "rerun": rerun_flag(o.run.dir)}  # what its command line needs to continue it
                  for i, o in enumerate(outcomes) if o.status in ("missing", "unfinished")]
    for algo in cfg["algos"]:
        mine = [o for o in outcomes if o.run.algo == algo]
        ok = [o for o in mine if o.status == "ok"]
        row = aggregate(algo, [o.run.seed for o in ok], [o.summary for o in ok])
        row["diverged_seeds"] = [o.run.seed for o in mine if o.status == "diverged"]
        lost = [o.run.seed for o in mine if o.status in ("missing", "unfinished")]
        if lost:
            row["missing_seeds"] = lost
        rows.append(row)
        if ok:
            curves[algo] = read_metrics(ok[0].run.dir / "metrics.jsonl", "epoch")
        angle_curves[algo] = angles_from(mine[0].run.dir / "metrics.jsonl") if mine else []
    summary: dict[str, Any] = {"name": cfg["name"], "dataset": cfg["dataset"], "algorithms": rows, "diverged": diverged}
    if incomplete:
        summary["incomplete"] = incomplete
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(markdown_table(rows, cfg, incomplete))
    from creditlab.plots import plot_compare_angles, plot_curves

    metric = "test_accuracy" if cfg["task"] == "classify" else "test_loss"
    if curves:
        plot_curves(out / "test_curves.png", curves, metric=metric)
    if any(angle_curves.values()):
        plot_compare_angles(out / "angles.png", angle_curves)
    try:  # report.html (creditlab.report); a failure there never loses the summary written above
        from creditlab.report import write_report
        write_report(out, kind="collect" if (out / PLAN).is_file() else "compare")
    except Exception as e:  # noqa: BLE001
        print(f"creditlab: report.html not written: {type(e).__name__}: {e}", flush=True)
    return summary


def rerun_flag(run_dir: Path) -> str:
    """The flag a run's planned command line needs to finish it: ``--resume`` where it has a
    checkpoint, ``--overwrite`` where it stopped before its first one (nothing to continue),
    else none."""
    if (run_dir / CHECKPOINT).exists():
        return "--resume"
    return "--overwrite" if holds_run(run_dir) else ""


def _train_run(run_cfg: dict, run: Run, resume: bool, progress: bool = False, data: Dataset | None = None,
               extend: bool = False) -> Outcome:
    """One run, here or in a worker process: ``ok`` with its summary, or ``diverged`` (one
    diverged run does not stop the comparison). Resuming a comparison continues each run from
    its checkpoint (a finished one returns its summary) and starts again a run that stopped
    before its first checkpoint."""
    flag = rerun_flag(run.dir) if resume else ""
    if flag == "--overwrite":
        print(f"[{run.algo}] seed {run.seed}: no checkpoint in {run.dir}; starting this run again", flush=True)
    try:
        return Outcome(run, "ok", train(run_cfg, run.dir, progress=progress, data=data, resume=flag == "--resume",
                                        overwrite=flag == "--overwrite", extend=extend))
    except DivergenceError as e:
        return Outcome(run, "diverged", message=str(e))


def _announce(outcome: Outcome) -> Outcome:
    if outcome.status == "diverged":
        print(f"[{outcome.run.algo}] seed {outcome.run.seed}: {outcome.message}", flush=True)
    return outcome


def _run_serial(cfg: dict, runs: list[Run], progress: bool, resume: bool, extend: bool) -> list[Outcome]:
    """One run after another in this process, on one copy of the data."""
    data = build_data(cfg)
    outcomes = []
    for run in runs:
        if progress:
            print(f"[{run.algo}] seed {run.seed} -> {run.dir}", flush=True)
        outcomes.append(_announce(_train_run(run_config(cfg, run), run, resume, progress, data, extend)))
    return outcomes


def _run_parallel(cfg: dict, runs: list[Run], jobs: int, progress: bool, resume: bool, extend: bool) -> list[Outcome]:
    """The runs in ``jobs`` spawned processes, each with its share of the cores as torch threads
    (the config's ``threads`` if set); every run loads its own data and equals its serial twin
    at equal threads."""
    jobs, threads = split_cores(jobs, cfg["threads"])
    if progress:
        print(f"{len(runs)} runs in {jobs} processes x {threads} torch thread(s)", flush=True)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        futures = []
        for run in runs:
            if progress:
                print(f"[{run.algo}] seed {run.seed} -> {run.dir}", flush=True)
            futures.append(pool.submit(_train_run, dict(run_config(cfg, run), threads=threads), run, resume,
                                       extend=extend))
        return [_announce(f.result()) for f in futures]


def compare(cfg: dict, out_dir: str | Path, progress: bool = True, resume: bool = False, jobs: int = 1,
            overwrite: bool = False, extend: bool = False) -> dict:
    """Every algorithm x seed of ``cfg`` into ``out_dir``, one after another (``jobs=1``) or in
    ``jobs`` local processes, then the comparison's summary and plots (returned: the summary).

    ``out_dir`` is locked for the comparison; one that already holds a comparison or run is
    refused unless ``resume`` (continue every run; each must match its stored config, see
    :func:`creditlab.train.train`, ``extend`` as there) or ``overwrite`` (remove it first)."""
    cfg = config_mod.resolve(cfg)
    out = Path(out_dir)
    check_out_dir(out)
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
    with RunLock(out):
        prepare(out, resume, overwrite, what="comparison")
        with writing(out):
            (out / "config.yaml").write_text(config_mod.dump(cfg))
            runs = planned_runs(cfg, out)
            if jobs == 1:
                outcomes = _run_serial(cfg, runs, progress, resume, extend)
            else:
                outcomes = _run_parallel(cfg, runs, jobs, progress, resume, extend)
            return write_comparison(cfg, out, outcomes)


def plan(cfg: dict, plan_dir: str | Path, program: str = "creditlab") -> list[Run]:
    """A comparison for a cluster scheduler: ``plan_dir/config.yaml`` (the comparison),
    each run's resolved ``config.yaml`` in its run directory, ``commands.txt`` with one
    ``creditlab train`` line per run (absolute paths; line i is run i of ``plan.json``) and
    ``plan.json`` (algorithm, seed, directory of every run) for :func:`collect`."""
    cfg = config_mod.resolve(cfg)
    out = Path(plan_dir).resolve()
    if (out / PLAN).exists():
        raise ConfigError(f"{out} already holds a plan ({PLAN}); plan into a new directory, or run its "
                          f"{COMMANDS} and then creditlab collect {out}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(config_mod.dump(cfg))
    runs = planned_runs(cfg, out)
    lines = []
    for run in runs:
        run.dir.mkdir(parents=True, exist_ok=True)
        path = run.dir / "config.yaml"
        path.write_text(config_mod.dump(config_mod.resolve(run_config(cfg, run))))
        lines.append(f"{program} train --config {shlex.quote(str(path))} --out {shlex.quote(str(run.dir))} --quiet")
    (out / COMMANDS).write_text("\n".join(lines) + "\n")
    (out / PLAN).write_text(json.dumps({"name": cfg["name"], "commands": COMMANDS, "runs": [
        {"algo": r.algo, "seed": r.seed, "dir": str(r.dir.relative_to(out))} for r in runs]}, indent=2))
    return runs


def collect(plan_dir: str | Path) -> dict:
    """The summary, table and plots of a planned comparison from its run directories, as
    :func:`compare` writes them; missing and unfinished runs are listed under ``incomplete``."""
    out = Path(plan_dir)
    if not (out / PLAN).is_file():
        raise ConfigError(f"{out}: no {PLAN} here; write a plan first with "
                          f"creditlab compare --config FILE --plan {out}")
    cfg = config_mod.load(out / "config.yaml")
    runs = [Run(r["algo"], int(r["seed"]), out / r["dir"]) for r in json.loads((out / PLAN).read_text())["runs"]]
    with RunLock(out), writing(out):
        return write_comparison(cfg, out, [read_outcome(run) for run in runs])
