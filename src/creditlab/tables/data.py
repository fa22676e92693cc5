"""The data behind a table: a committed comparison's per-seed summaries (finished and
diverged runs) and the metric files of each run (metrics.csv per epoch, metrics.jsonl per
logged step)."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import yaml

from creditlab.compare import slug
from creditlab.errors import ConfigError
from creditlab.tables.spec import _AGGREGATED
from creditlab.train import DIVERGED


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: missing") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


def _asked(run_dir: Path) -> str | None:
    """The algorithm spec the run's config.yaml asked for (``ar`` on a graph model runs as
    ``graph_ar``, and its summary names the latter)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    cfg = yaml.safe_load(path.read_text()) or {}
    return cfg.get("algo") if isinstance(cfg, dict) else None


def read_results(directory: Path) -> tuple[list[str], dict[str, list[dict]], list[str]]:
    """The comparison in ``directory``: its algorithms in order, each one's per-seed summaries
    (each with its run directory under ``"_dir"``; a diverged seed's is its ``diverged.json``
    under ``"_diverged"``, after the finished ones), and the disagreements between the
    comparison's summary.json and those (one line each)."""
    comp = _read_json(directory / "summary.json")
    order, seeds, problems = [], {}, []
    for row in comp.get("algorithms", []):
        algo = row["algo"]
        order.append(algo)
        seeds[algo] = [dict(_read_json(directory / slug(algo) / f"seed{s}" / "summary.json"),
                            _dir=directory / slug(algo) / f"seed{s}") for s in row["seeds"]]
        for s in row.get("diverged_seeds") or []:
            run_dir = directory / slug(algo) / f"seed{s}"
            seeds[algo].append({"seed": s, "_dir": run_dir, "_diverged": _read_json(run_dir / DIVERGED)})
        for s, summary in zip(row["seeds"], seeds[algo]):
            if not summary.get("finished") or summary.get("seed") != s or algo not in (summary.get("algo"),
                                                                                       _asked(summary["_dir"])):
                problems.append(f"{directory}/{slug(algo)}/seed{s}/summary.json: row `{algo}`: not the finished run "
                                f"of {algo} seed {s}")
        for key in _AGGREGATED:
            if f"{key}_mean" not in row:
                continue
            vals = [x.get(key) for x in seeds[algo] if x.get(key) is not None and "_diverged" not in x]
            mean = statistics.fmean(vals) if vals else None
            stated = row[f"{key}_mean"]
            if (mean is None) != (stated is None) or (mean is not None and abs(mean - stated) > 1e-9 * max(1, abs(mean))):
                problems.append(f"{directory}/summary.json: row `{algo}`: {key}_mean is {stated}, its {len(vals)} "
                                f"seed(s)' summary.json give {mean}")
    return order, seeds, problems


def _epoch_rows(run: dict) -> list[dict]:
    if "_epochs" not in run:
        path = run["_dir"] / "metrics.csv"
        if not path.is_file():
            raise ConfigError(f"{path}: missing (an at_epoch column reads it; results add commits it)")
        with path.open(newline="") as f:
            run["_epochs"] = list(csv.DictReader(f))
    return run["_epochs"]


def _steps(run: dict) -> list[dict]:
    if "_steps" not in run:
        path = run["_dir"] / "metrics.jsonl"
        if not path.is_file():
            raise ConfigError(f"{path}: missing (a logged or per-layer residual column reads it; results add commits "
                              f"it when it is at most 256 KiB)")
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        run["_steps"] = [r for r in rows if r.get("kind") == "step"]
    return run["_steps"]


def _logged(steps: list[dict], key: str, at: str) -> float | None:
    vals = [r[key] for r in steps if isinstance(r.get(key), (int, float))]
    if not vals:
        return None
    return statistics.fmean(vals) if at == "mean" else vals[0] if at == "first" else vals[-1]
