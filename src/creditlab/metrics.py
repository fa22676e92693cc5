"""A run's metrics on disk: ``metrics.jsonl`` (one JSON object per logged step and per
epoch, appended as the run goes, truncated on resume to what the checkpoint had seen),
``metrics.csv`` (the epoch rows), the per-run plots, and the terminal progress output.

:class:`MetricsWriter` is the always-on :class:`creditlab.loggers.Logger`; TensorBoard and
user loggers sit beside it (:func:`creditlab.loggers.open_loggers`)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path


class MetricsWriter:
    """Appends JSON lines; on resume truncates to what the checkpoint had seen. A
    :class:`creditlab.loggers.Logger`: step and epoch records are lines of ``metrics.jsonl``
    (the config is ``config.yaml``, written by the loop)."""

    def __init__(self, path: Path, keep_lines: int | None):
        self.path = path
        if keep_lines is None:
            path.write_text("")
            self.lines = 0
        else:
            kept = path.read_text().splitlines()[:keep_lines] if path.exists() else []
            path.write_text("".join(line + "\n" for line in kept))
            self.lines = len(kept)
        self.f = open(path, "a")

    def write(self, record: dict) -> None:
        self.f.write(json.dumps(record, allow_nan=True) + "\n")
        self.f.flush()
        self.lines += 1

    def log_config(self, cfg: dict) -> None:
        pass

    def log_step(self, record: dict) -> None:
        self.write(record)

    def log_epoch(self, record: dict) -> None:
        self.write(record)

    def close(self) -> None:
        self.f.close()


class NullWriter:
    """The metrics writer of ranks other than 0 (rank 0 alone writes)."""

    lines = 0

    def write(self, record: dict) -> None:
        pass

    def log_config(self, cfg: dict) -> None:
        pass

    def log_step(self, record: dict) -> None:
        pass

    def log_epoch(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def read_metrics(path: Path, kind: str) -> list[dict]:
    """The ``kind`` records ("step" or "epoch") of a run's metrics.jsonl."""
    if not path.exists():
        return []
    records = (json.loads(line) for line in path.read_text().splitlines())
    return [r for r in records if r.get("kind") == kind]


def angles_from(path: Path) -> list[dict]:
    """The logged steps that carry per-layer angles."""
    return [r for r in read_metrics(path, "step") if r.get("angles")]


def progress_bar(it, enabled: bool, desc: str):
    """A tqdm bar over ``it`` on a terminal; ``it`` itself when disabled or when stderr is not
    a terminal (a log file, a batch job): there the epoch report line, one per epoch, is the
    progress, not hundreds of carriage-return updates."""
    if not enabled or not _is_terminal(sys.stderr):
        return it
    from tqdm import tqdm

    return tqdm(it, desc=desc, leave=False, dynamic_ncols=True)


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def report_epoch(record: dict) -> None:
    parts = [f"epoch {record['epoch']}"] + [f"{k} {v:.4f}" for k, v in record.items()
                                            if k.endswith(("accuracy", "loss")) and isinstance(v, float)]
    print("  " + "  ".join(parts) + f"  ({record['seconds']:.1f}s)", flush=True)


def write_csv(path: Path, history: list[dict]) -> None:
    keys = sorted({k for h in history for k in h if k != "kind"})
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for h in history:
            w.writerow({k: h.get(k, "") for k in keys})


def write_plots(out: Path, history: list[dict], step_rows: list[dict], title: str = "") -> None:
    """The per-run plots: ``accuracy.png`` (train/val/test per epoch; loss for autoencoders)
    and ``angles.png`` (per-layer angle to backprop per logged step), titled ``title``
    (algorithm, seed, dataset)."""
    from creditlab.plots import plot_angles, plot_curves

    plot_curves(out / "accuracy.png", {"": history}, title=title)
    if step_rows:
        plot_angles(out / "angles.png", step_rows, title=title)
