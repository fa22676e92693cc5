"""Matplotlib figures for run directories (headless: the Agg backend).

Conventions: every figure has a title (a run's: algorithm, seed, dataset; a comparison's: its
name and dataset); epoch and step axes have integer ticks only; accuracies are in percent, as
in the tables; a comparison with several seeds draws each algorithm's mean over the seeds with a
band of one standard deviation (labelled in the legend's title) and every seed as a faint line;
legends show short labels (:func:`short_labels`) with the full specs in a note below the axes;
symbols are matplotlib mathtext (``$x^{1}$``, ``$\\eta$``).
"""

from __future__ import annotations

import math
import statistics
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

#: a spec longer than this is shown in legends as its algorithm name and its position (``ar #3``)
LABEL_WIDTH = 20


def short_labels(specs: list[str], width: int = LABEL_WIDTH) -> list[str]:
    """Legend labels for algorithm specs: a spec of at most ``width`` characters as it is,
    a longer one as its name and its 1-based position among ``specs`` (``ar #3``), so labels
    are unique and point to the table's rows."""
    out = []
    for i, spec in enumerate(specs):
        out.append(spec if len(spec) <= width else f"{spec.split(':', 1)[0]} #{i + 1}")
    return out


def label_note(specs: list[str], labels: list[str]) -> str:
    """The note that spells out every shortened label (empty when none is)."""
    return "; ".join(f"{lab} = {spec}" for spec, lab in zip(specs, labels) if lab != spec)


def _wrap(text: str, width: int = 95) -> str:
    return "\n".join(textwrap.wrap(text, width)) if text else ""


def _finish(fig, ax, path: Path, xlabel: str, ylabel: str, title: str = "", legend_size: int = 8,
            legend_title: str | None = None, note: str = "", integer_x: bool = True) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        ax.set_title(_wrap(title, 70), fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[1]:
        leg = ax.legend(fontsize=legend_size, title=legend_title, title_fontsize=legend_size)
        leg.get_frame().set_alpha(0.8)
    bottom = 0.0
    if note:
        wrapped = _wrap(note)
        lines = wrapped.count("\n") + 1
        height = fig.get_figheight()
        fig.set_figheight(height + 0.18 * lines)
        bottom = 0.18 * lines / fig.get_figheight()
        fig.text(0.01, 0.01, wrapped, fontsize=7, va="bottom", ha="left", color="0.3")
    fig.tight_layout(rect=(0, bottom, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _scaled(key: str, v):
    """Accuracies in percent (as the tables), everything else as it is."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return math.nan
    return 100 * v if "accuracy" in key else v


def _ylabel(key: str) -> str:
    return "accuracy (%)" if "accuracy" in key else "loss"


def plot_curves(path: Path, runs: dict[str, list[dict]], metric: str | None = None, title: str = "") -> None:
    """Accuracy (or loss) per epoch: train/val/test for one run, or test for several (one
    history each; see :func:`plot_seed_curves` for seeds)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    single = len(runs) == 1
    key = metric
    for label, history in runs.items():
        if not history:
            continue
        epochs = [h["epoch"] for h in history]
        keys = ("train", "val", "test") if single else ("test",)
        for split in keys:
            key = metric or (f"{split}_accuracy" if f"{split}_accuracy" in history[0] else f"{split}_loss")
            if single:
                key = key.replace("test_", f"{split}_")
            if key in history[0]:
                ax.plot(epochs, [_scaled(key, h.get(key)) for h in history], marker="o",
                        label=f"{label} {split}".strip())
    _finish(fig, ax, path, "epoch", _ylabel(key or metric or "accuracy"), title)


def _mean_std(columns: list[list[float]]) -> tuple[list[float], list[float]]:
    means, stds = [], []
    for col in columns:
        vals = [v for v in col if not math.isnan(v)]
        means.append(statistics.fmean(vals) if vals else math.nan)
        stds.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
    return means, stds


def _seed_band(ax, xs: list, per_seed: list[list[float]], label: str, color, marker: str | None = "o",
               clip: tuple[float, float] | None = None) -> None:
    """Each seed faintly, the mean over seeds bold and, with several seeds, mean +/- std (the
    band cut to ``clip``, e.g. 0..100 % for an accuracy)."""
    if len(per_seed) > 1:
        for ys in per_seed:
            ax.plot(xs[:len(ys)], ys, color=color, alpha=0.3, linewidth=0.8)
    columns = [[ys[i] for ys in per_seed if i < len(ys)] for i in range(len(xs))]
    mean, std = _mean_std(columns)
    ax.plot(xs, mean, color=color, marker=marker, markersize=3, linewidth=1.8,
            label=f"{label} (n={len(per_seed)})")
    if len(per_seed) > 1:
        lo, hi = clip or (-math.inf, math.inf)
        ax.fill_between(xs, [max(m - s, lo) for m, s in zip(mean, std)], [min(m + s, hi) for m, s in zip(mean, std)],
                        color=color, alpha=0.2, linewidth=0)


def _colors(n: int) -> list:
    cmap = plt.get_cmap("tab10")
    return [cmap(i % 10) for i in range(n)]


def plot_seed_curves(path: Path, runs: dict[str, list[list[dict]]], metric: str, title: str = "",
                     note: str = "") -> None:
    """``metric`` (e.g. ``test_accuracy``) per epoch, per algorithm over its seeds: ``runs``
    maps a label to each seed's epoch history."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    several = any(len(seeds) > 1 for seeds in runs.values())
    for (label, seeds), color in zip(runs.items(), _colors(len(runs))):
        seeds = [h for h in seeds if h]
        if not seeds:
            continue
        longest = max(seeds, key=len)
        xs = [h["epoch"] for h in longest]
        _seed_band(ax, xs, [[_scaled(metric, h.get(metric)) for h in hist] for hist in seeds], label, color,
                   clip=(0.0, 100.0) if "accuracy" in metric else None)
    split = metric.split("_", 1)[0]
    _finish(fig, ax, path, "epoch", f"{split} {_ylabel(metric)}", title, legend_size=7,
            legend_title="mean ± std over seeds (band); seeds faint" if several else None, note=note)


def plot_angles(path: Path, rows: list[dict], title: str = "") -> None:
    """Per-layer angle to backprop (degrees) against the training step."""
    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [r["step"] for r in rows]
    for name in rows[0]["angles"]:
        ax.plot(steps, [_scaled("", r["angles"].get(name)) for r in rows], label=name)
    _finish(fig, ax, path, "step", "angle to backprop (deg)", title, legend_title="layer")


def _differing_mean(row: dict, layers: list[str] | None) -> float:
    angles = row.get("angles") or {}
    names = layers or list(angles)
    vals = [angles[n] for n in names if n in angles and angles[n] is not None and not math.isnan(angles[n])]
    if not vals:
        return row.get("mean_angle_deg", math.nan) if not layers else math.nan
    return sum(vals) / len(vals)


def plot_compare_angles(path: Path, runs: dict[str, list], layers: dict[str, list[str]] | None = None,
                        title: str = "", note: str = "") -> None:
    """Angle to backprop per logged step, one line per algorithm: the mean over the layers
    where it differs from backprop (``layers[label]``; all layers where none is given or none
    differs), over its seeds with a band. ``runs`` maps a label to each seed's step rows (or,
    as before, to one seed's rows)."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    several = False
    for (label, seeds), color in zip(runs.items(), _colors(len(runs))):
        if seeds and isinstance(seeds[0], dict):
            seeds = [seeds]
        seeds = [s for s in seeds if s]
        if not seeds:
            continue
        several = several or len(seeds) > 1
        names = (layers or {}).get(label) or None
        longest = max(seeds, key=len)
        xs = [r["step"] for r in longest]
        _seed_band(ax, xs, [[_differing_mean(r, names) for r in rows] for rows in seeds], label, color, marker=None,
                   clip=(0.0, 180.0))
    _finish(fig, ax, path, "step", "angle to backprop (deg),\nmean over the differing layers", title,
            legend_size=7, legend_title="mean ± std over seeds (band); seeds faint" if several else None, note=note)


def plot_layer_angles(path: Path, rows: dict[str, tuple[dict, dict]], title: str = "", note: str = "") -> None:
    """Per-layer angle to backprop (mean over training's logged steps), grouped bars: one
    group per layer, one bar per algorithm (``rows``: label -> (layer -> mean over seeds,
    layer -> std over seeds), drawn as error bars)."""
    layers: list[str] = []
    for means, _ in rows.values():
        layers += [n for n in means if n not in layers]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(layers) + 2), 4.2))
    width = 0.8 / max(len(rows), 1)
    for k, ((label, (means, stds)), color) in enumerate(zip(rows.items(), _colors(len(rows)))):
        xs = [i + (k - (len(rows) - 1) / 2) * width for i in range(len(layers))]
        ys = [means.get(n) if means.get(n) is not None else math.nan for n in layers]
        err = [stds.get(n) or 0.0 for n in layers]
        ax.bar(xs, ys, width, yerr=err, color=color, label=label, capsize=2)
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels(layers, rotation=30 if len(layers) > 6 else 0, fontsize=8)
    _finish(fig, ax, path, "layer", "angle to backprop (deg),\nmean over training", title, legend_size=7,
            legend_title="mean ± std over seeds", note=note, integer_x=False)


def plot_relaxation(path: Path, traces: dict[str, list[list[float]]], title: str = "") -> None:
    """MSE between relaxing states and the backprop gradient per step (AR paper Fig. 1)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, trace in traces.items():
        if trace:
            ax.semilogy(range(len(trace)), [max(v, 1e-300) for v in trace], label=label)
    _finish(fig, ax, path, "relaxation step $t$", "MSE to backprop gradient", title)
