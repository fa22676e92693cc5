"""Matplotlib figures for run directories (headless: the Agg backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _finish(fig, ax, path: Path, xlabel: str, ylabel: str, title: str = "", legend_size: int = 8) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(path: Path, runs: dict[str, list[dict]], metric: str | None = None) -> None:
    """Accuracy (or loss) per epoch: train/val/test for one run, or test for several."""
    fig, ax = plt.subplots(figsize=(6, 4))
    single = len(runs) == 1
    for label, history in runs.items():
        epochs = [h["epoch"] for h in history]
        keys = ("train", "val", "test") if single else ("test",)
        for split in keys:
            key = metric or (f"{split}_accuracy" if f"{split}_accuracy" in history[0] else f"{split}_loss")
            if single:
                key = key.replace("test_", f"{split}_")
            if key in history[0]:
                ax.plot(epochs, [h[key] for h in history], marker="o", label=f"{label} {split}".strip())
    _finish(fig, ax, path, "epoch", "accuracy" if "accuracy" in (metric or "accuracy") else "loss")


def plot_angles(path: Path, rows: list[dict]) -> None:
    """Per-layer angle to backprop (degrees) against the training step."""
    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [r["step"] for r in rows]
    for name in rows[0]["angles"]:
        ax.plot(steps, [r["angles"].get(name) for r in rows], label=name)
    _finish(fig, ax, path, "step", "angle to backprop (deg)")


def plot_compare_angles(path: Path, runs: dict[str, list[dict]]) -> None:
    """Mean angle over layers per logged step, one line per algorithm."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, rows in runs.items():
        if rows:
            ax.plot([r["step"] for r in rows], [r["mean_angle_deg"] for r in rows], label=label)
    _finish(fig, ax, path, "step", "mean angle to backprop (deg)", legend_size=7)


def plot_relaxation(path: Path, traces: dict[str, list[list[float]]], title: str = "") -> None:
    """MSE between relaxing states and the backprop gradient per step (AR paper Fig. 1)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, trace in traces.items():
        if trace:
            ax.semilogy(range(len(trace)), [max(v, 1e-300) for v in trace], label=label)
    _finish(fig, ax, path, "relaxation step t", "MSE to backprop gradient", title)
