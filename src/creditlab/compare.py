"""``creditlab compare``: every algorithm x seed on identical batch streams and identical
initial weights (the seed fixes both), then one summary table and comparison plots.

The runs go one after another in this process (``jobs=1``), in ``jobs`` parallel local
processes (the same numbers at equal torch threads), or on a cluster: :func:`plan` writes each
run's resolved config and one ``creditlab train`` command line per run, and :func:`collect`
turns the finished run directories into the same summary. Serial, parallel and collected
comparisons share one aggregation, :func:`write_comparison`.

The comparison's ``summary.json`` (what ``summary.md``, the plots, ``creditlab tables`` and the
report read):

* ``name``, ``dataset``; ``diverged`` (one entry per diverged run: algo, seed, message, dir,
  line of commands.txt, rerun flag); ``incomplete`` (missing or unfinished runs, if any);
* ``angle_tolerance_deg``: the tolerance below which a layer's mean angle to backprop counts
  as equal to backprop (:data:`creditlab.diagnostics.angles.EXACT_DEG`);
* ``environment``: the first finished run's ``environment`` block (code version and git
  commit, torch, device, threads, dtype, data files' md5s: see
  :func:`creditlab.provenance.environment`); ``environment_varies``: the keys of that block
  whose values differ among the finished runs (e.g. ``hostname`` when collected from a
  cluster), ``[]`` when every run had the same;
* ``algorithms``: one row per algorithm, in the config's order:

  - ``algo`` (the spec), ``label`` (its short name in the plots' legends: the spec if at
    most 20 characters, else ``NAME #i``, i its 1-based position), ``seeds`` (the finished
    seeds, in order), ``diverged_seeds``, ``missing_seeds`` (only if any), ``epochs``;
  - ``KEY_mean`` and ``KEY_std`` over the finished seeds (std: sample standard deviation,
    0.0 for one seed) for each KEY of :data:`AGGREGATED` that the runs report:
    ``test_accuracy``, ``val_accuracy``, ``train_accuracy`` (last epoch),
    ``test_accuracy_at_best_val``, ``best_test_accuracy_over_training``, ``test_loss``,
    ``val_loss``, ``seconds_per_epoch`` (mean over all epochs, warm-up included),
    ``epoch_seconds_median`` (each run's median epoch time over epochs 2.., None with one
    epoch), ``first_epoch_seconds`` (epoch 1 alone), ``mean_angle_deg`` (every layer);
  - ``layer_angles_deg_mean`` / ``layer_angles_deg_std``: layer -> the mean / std over seeds
    of each run's mean angle to backprop over its logged steps;
  - ``differing_layers``: the layers whose ``layer_angles_deg_mean`` exceeds
    ``angle_tolerance_deg``, where the algorithm's update differs from backprop's (e.g. every
    hidden layer for FA; none for backprop);
  - ``mean_angle_differing_deg_mean`` / ``_std``: over seeds, of each run's mean of its
    per-layer angles over the row's ``differing_layers`` (over every layer when none
    differs); the angle column of ``summary.md``;
  - ``seed_values``: KEY -> the per-seed values behind each ``KEY_mean``, in ``seeds`` order
    (``mean_angle_differing_deg`` included): for paired comparisons across algorithms, which
    share initial weights and batches seed by seed.
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
from creditlab.diagnostics.angles import EXACT_DEG, differing_layers, mean_over
from creditlab.loggers import check_loggers
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


#: the per-run summary keys a comparison row aggregates over seeds (``KEY_mean``, ``KEY_std``)
AGGREGATED = ("test_accuracy", "val_accuracy", "train_accuracy", "test_accuracy_at_best_val",
              "best_test_accuracy_over_training", "test_loss", "val_loss", "seconds_per_epoch",
              "epoch_seconds_median", "first_epoch_seconds", "mean_angle_deg")


def aggregate(algo: str, seeds: list[int], summaries: list[dict], label: str | None = None) -> dict[str, Any]:
    """One row of the comparison's ``summary.json`` from the finished seeds' summaries (in
    ``seeds`` order); see the module docstring for its fields."""
    row: dict[str, Any] = {"algo": algo, "label": label or algo, "seeds": seeds}
    values: dict[str, list] = {}
    for key in AGGREGATED:
        vals = [s.get(key) for s in summaries]
        if any(v is not None for v in vals):
            row[f"{key}_mean"] = _mean(vals)
            row[f"{key}_std"] = _std(vals)
            values[key] = vals
    per_layer = [s.get("layer_angles_deg") for s in summaries]
    if summaries and all(isinstance(m, dict) for m in per_layer):
        layers: list[str] = []
        for m in per_layer:
            layers += [n for n in m if n not in layers]  # type: ignore[union-attr]
        means = {n: _mean([m.get(n) for m in per_layer]) for n in layers}  # type: ignore[union-attr]
        row["layer_angles_deg_mean"] = means
        row["layer_angles_deg_std"] = {n: _std([m.get(n) for m in per_layer if m.get(n) is not None])  # type: ignore[union-attr]
                                       for n in layers}
        row["differing_layers"] = differing_layers(means)
        vals = [mean_over(m, row["differing_layers"]) for m in per_layer]  # type: ignore[arg-type]
        if any(v is not None for v in vals):
            row["mean_angle_differing_deg_mean"] = _mean(vals)
            row["mean_angle_differing_deg_std"] = _std(vals)
            values["mean_angle_differing_deg"] = vals
    row["seed_values"] = values
    row["epochs"] = summaries[0].get("epochs") if summaries else 0
    return row


def _pm(m: float | None, s: float | None, n: int, scale: float = 1.0, digits: int = 2) -> str:
    """``m ± s`` (scaled), the value alone for one seed, ``-`` when there is none."""
    if m is None:
        return "-"
    if n <= 1 or s is None:
        return f"{scale * m:.{digits}f}"
    return f"{scale * m:.{digits}f} ± {scale * s:.{digits}f}"


def _angle_note(rows: list[dict]) -> str:
    parts = []
    for r in rows:
        if not r["seeds"] or "differing_layers" not in r:
            continue
        layers = r["differing_layers"]
        parts.append(f"`{r['label']}`: " + (", ".join(layers) if layers else
                                             "none (equals backprop on every layer; the mean over all layers is shown)"))
    return "; ".join(parts)


def _layer_table(rows: list[dict]) -> list[str]:
    with_layers = [r for r in rows if r["seeds"] and r.get("layer_angles_deg_mean")]
    if not with_layers:
        return []
    layers: list[str] = []
    for r in with_layers:
        layers += [n for n in r["layer_angles_deg_mean"] if n not in layers]
    lines = ["", "Angle to backprop per layer (deg; mean over the logged steps, ± std over seeds; **bold**: the "
             "layers where the algorithm differs from backprop):", "",
             "| algorithm | " + " | ".join(f"`{n}`" for n in layers) + " |", "|" + "---|" * (len(layers) + 1)]
    for r in with_layers:
        cells = []
        for n in layers:
            cell = _pm(r["layer_angles_deg_mean"].get(n), r.get("layer_angles_deg_std", {}).get(n), len(r["seeds"]))
            cells.append(f"**{cell}**" if n in r.get("differing_layers", []) else cell)
        lines.append(f"| `{r['label']}` | " + " | ".join(cells) + " |")
    return lines


def markdown_table(rows: list[dict], cfg: dict, incomplete: list[dict] | None = None) -> str:
    """``summary.md``: the comparison's table (mean ± std over seeds; one seed: the value
    alone), its notes, and the per-layer angles to backprop."""
    cls = cfg["task"] == "classify"
    times = "s / epoch (median, excl. 1st epoch) | 1st epoch (s)"
    angle = "angle to BP (deg), differing layers"
    head = (f"| algorithm | seeds | test acc. (%) | val acc. (%) | test acc. at best val (%) | {times} | {angle} |"
            if cls else f"| algorithm | seeds | test loss | val loss | {times} | {angle} |")
    lines = [f"# {cfg['name']}: {cfg['dataset']}, {max((r['epochs'] for r in rows), default=0)} epochs", "", head,
             "|" + "---|" * (head.count("|") - 1)]

    def cell(r, k, scale=1.0, digits=2):
        return _pm(r.get(f"{k}_mean"), r.get(f"{k}_std"), len(r["seeds"]), scale, digits)

    for r in rows:
        lost = [(what, r[f"{what}_seeds"]) for what in ("diverged", "missing") if r.get(f"{what}_seeds")]
        name = f"`{r['algo']}`" + (f" ({r['label']})" if r.get("label", r["algo"]) != r["algo"] else "")
        if not r["seeds"]:
            lines.append(f"| {name} | 0 | " + "; ".join(f"{w} (seeds {s})" for w, s in lost) + " |")
            continue
        common = f"| {name} | {len(r['seeds'])}{''.join(f' (+{len(s)} {w})' for w, s in lost)} | "
        angle_key = "mean_angle_differing_deg" if "mean_angle_differing_deg_mean" in r else "mean_angle_deg"
        tail = (f"{cell(r, 'epoch_seconds_median', digits=3)} | {cell(r, 'first_epoch_seconds', digits=3)} | "
                f"{cell(r, angle_key)} |")
        if cls:
            lines.append(common + f"{cell(r, 'test_accuracy', 100)} | {cell(r, 'val_accuracy', 100)} | "
                         f"{cell(r, 'test_accuracy_at_best_val', 100)} | " + tail)
        else:
            lines.append(common + f"{cell(r, 'test_loss', digits=3)} | {cell(r, 'val_loss', digits=3)} | " + tail)
    lines += ["", "± is the standard deviation over seeds (one seed: the value alone). s / epoch: each run's median "
              "training time per epoch over epochs 2 and later (the first epoch, with its warm-up, is the next "
              "column; none with one epoch), averaged over seeds; angle logging is not counted."]
    note = _angle_note(rows)
    if note:
        lines += ["", f"Angle to BP: mean over the logged steps and over the layers where the algorithm's update "
                      f"differs from backprop's (mean angle above {EXACT_DEG} deg): {note}."]
    lines += _layer_table(rows)
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


def _environment(summaries: list[dict]) -> tuple[dict | None, list[str]]:
    """The first finished run's ``environment`` and the keys whose values differ among the
    finished runs (e.g. ``hostname`` for runs collected from a cluster)."""
    envs = [s["environment"] for s in summaries if isinstance(s.get("environment"), dict)]
    if not envs:
        return None, []
    keys = sorted({k for e in envs for k in e})
    return envs[0], [k for k in keys if any(e.get(k) != envs[0].get(k) for e in envs[1:])]


def write_comparison(cfg: dict, out: Path, outcomes: list[Outcome]) -> dict:
    """The one aggregation of serial, parallel and collected comparisons: ``summary.json``,
    ``summary.md`` and the plots in ``out`` from the runs' outcomes (in plan order). Diverged
    runs are listed under ``diverged``; missing or unfinished ones, if any, under ``incomplete``.
    Plots: ``test_curves.png`` (test accuracy or loss per epoch), ``angles.png`` (angle to
    backprop per logged step over the differing layers) and ``angles_per_layer.png``; each
    algorithm's mean over its finished seeds with a band of one std, the seeds faint."""
    rows, curves, angle_curves, layer_bars = [], {}, {}, {}
    diverged = [{"algo": o.run.algo, "seed": o.run.seed, "message": o.message, "dir": str(o.run.dir),
                 "line": i + 1, "rerun": "--overwrite"} for i, o in enumerate(outcomes) if o.status == "diverged"]
    incomplete = [{"algo": o.run.algo, "seed": o.run.seed, "status": o.status, "dir": str(o.run.dir),
                   "line": i + 1, "message": o.message,  # line: its line of a plan's commands.txt
                   "rerun": rerun_flag(o.run.dir)}  # what its command line needs to continue it
                  for i, o in enumerate(outcomes) if o.status in ("missing", "unfinished")]
    from creditlab.plots import label_note, short_labels

    labels = dict(zip(cfg["algos"], short_labels(list(cfg["algos"]))))
    finished: list[dict] = []
    for algo in cfg["algos"]:
        mine = [o for o in outcomes if o.run.algo == algo]
        ok = [o for o in mine if o.status == "ok"]
        row = aggregate(algo, [o.run.seed for o in ok], [o.summary for o in ok], labels[algo])
        row["diverged_seeds"] = [o.run.seed for o in mine if o.status == "diverged"]
        lost = [o.run.seed for o in mine if o.status in ("missing", "unfinished")]
        if lost:
            row["missing_seeds"] = lost
        rows.append(row)
        finished += [o.summary for o in ok if o.summary]
        label = labels[algo]
        if ok:
            curves[label] = [read_metrics(o.run.dir / "metrics.jsonl", "epoch") for o in ok]
            angle_curves[label] = [angles_from(o.run.dir / "metrics.jsonl") for o in ok]
        if row.get("layer_angles_deg_mean"):
            layer_bars[label] = (row["layer_angles_deg_mean"], row["layer_angles_deg_std"])
    env, varies = _environment(finished)
    summary: dict[str, Any] = {"name": cfg["name"], "dataset": cfg["dataset"], "algorithms": rows, "diverged": diverged,
                               "angle_tolerance_deg": EXACT_DEG, "environment": env, "environment_varies": varies}
    if incomplete:
        summary["incomplete"] = incomplete
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(markdown_table(rows, cfg, incomplete))
    from creditlab.plots import plot_compare_angles, plot_layer_angles, plot_seed_curves

    metric = "test_accuracy" if cfg["task"] == "classify" else "test_loss"
    title = f"{cfg['name']}: {cfg['dataset']}"
    note = label_note(list(cfg["algos"]), [labels[a] for a in cfg["algos"]])
    if curves:
        plot_seed_curves(out / "test_curves.png", curves, metric, title, note)
    if any(any(seeds) for seeds in angle_curves.values()):
        differing = {labels[r["algo"]]: r.get("differing_layers") or [] for r in rows}
        plot_compare_angles(out / "angles.png", angle_curves, differing, title, note)
    if layer_bars:
        plot_layer_angles(out / "angles_per_layer.png", layer_bars, title, note)
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
    check_loggers(cfg)  # before any run starts
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
    ``creditlab train`` line per run (line i is run i of ``plan.json``) and ``plan.json``
    (algorithm, seed, directory of every run) for :func:`collect`. The command lines name the
    paths as ``plan_dir`` is given: absolute for an absolute one, else relative to the working
    directory, so a plan committed inside a repository (``experiments/plans/``) runs from the
    root of any clone of it."""
    cfg = config_mod.resolve(cfg)
    out = Path(plan_dir)
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
