"""``creditlab compare``: every algorithm x seed on identical batch streams and identical
initial weights (the seed fixes both), then one summary table and comparison plots."""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path
from typing import Any

from creditlab import config as config_mod
from creditlab.build import build_data
from creditlab.errors import DivergenceError
from creditlab.train import angles_from, read_metrics, train

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


def markdown_table(rows: list[dict], cfg: dict) -> str:
    cls = cfg["task"] == "classify"
    head = ("| algorithm | seeds | test acc. (%) | val acc. (%) | test acc. at best val (%) | s / epoch | mean angle to BP (deg) |"
            if cls else "| algorithm | seeds | test loss | val loss | s / epoch | mean angle to BP (deg) |")
    lines = [f"# {cfg['name']}: {cfg['dataset']}, {rows[0]['epochs'] if rows else 0} epochs", "", head,
             "|" + "---|" * (head.count("|") - 1)]

    def pct(r, k):
        m, s = r.get(f"{k}_mean"), r.get(f"{k}_std")
        return "-" if m is None else f"{100 * m:.2f} ± {100 * (s or 0):.2f}"

    def num(v, fmt="{:.2f}"):
        return "-" if v is None else fmt.format(v)

    for r in rows:
        if not r["seeds"]:
            lines.append(f"| `{r['algo']}` | 0 | diverged (seeds {r['diverged_seeds']}) |")
            continue
        common = f"| `{r['algo']}` | {len(r['seeds'])}{' (+' + str(len(r['diverged_seeds'])) + ' diverged)' if r.get('diverged_seeds') else ''} | "
        tail = f"{num(r.get('seconds_per_epoch_mean'))} | {num(r.get('mean_angle_deg_mean'))} |"
        if cls:
            lines.append(common + f"{pct(r, 'test_accuracy')} | {pct(r, 'val_accuracy')} | "
                         f"{pct(r, 'test_accuracy_at_best_val')} | " + tail)
        else:
            lines.append(common + f"{num(r.get('test_loss_mean'), '{:.3f}')} | {num(r.get('val_loss_mean'), '{:.3f}')} | " + tail)
    if cfg.get("published"):
        lines += ["", "Published (from the paper, for comparison):", "", "```", json.dumps(cfg["published"], indent=2), "```"]
    return "\n".join(lines) + "\n"


def compare(cfg: dict, out_dir: str | Path, progress: bool = True, resume: bool = False) -> dict:
    cfg = config_mod.resolve(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(config_mod.dump(cfg))
    data = build_data(cfg)
    rows, curves, angle_curves = [], {}, {}
    diverged: list[dict] = []
    for algo in cfg["algos"]:
        summaries, histories = [], []
        for seed in cfg["seeds"]:
            run_dir = out / slug(algo) / f"seed{seed}"
            if progress:
                print(f"[{algo}] seed {seed} -> {run_dir}", flush=True)
            run_cfg = dict(cfg, algo=algo, seed=seed)
            try:
                summaries.append(train(run_cfg, run_dir, progress=progress, data=data,
                                       resume=resume and (run_dir / "checkpoint.pt").exists()))
            except DivergenceError as e:  # one diverged run does not stop the comparison
                print(f"[{algo}] seed {seed}: {e}", flush=True)
                diverged.append({"algo": algo, "seed": seed, "message": str(e)})
                continue
            histories.append(read_metrics(run_dir / "metrics.jsonl", "epoch"))
        ok_seeds = [sd for sd in cfg["seeds"] if not any(d["algo"] == algo and d["seed"] == sd for d in diverged)]
        row = aggregate(algo, ok_seeds, summaries)
        row["diverged_seeds"] = [d["seed"] for d in diverged if d["algo"] == algo]
        rows.append(row)
        if histories:
            curves[algo] = histories[0]
        angle_curves[algo] = angles_from(out / slug(algo) / f"seed{cfg['seeds'][0]}" / "metrics.jsonl")
    summary = {"name": cfg["name"], "dataset": cfg["dataset"], "algorithms": rows, "diverged": diverged}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(markdown_table(rows, cfg))
    from creditlab.plots import plot_compare_angles, plot_curves

    metric = "test_accuracy" if cfg["task"] == "classify" else "test_loss"
    if curves:
        plot_curves(out / "test_curves.png", curves, metric=metric)
    if any(angle_curves.values()):
        plot_compare_angles(out / "angles.png", angle_curves)
    return summary
