"""``report.html``: one self-contained page per ``compare``, ``collect`` and ``search`` run
directory, to look at (and trust) a result at a glance.

The page is a single file: CSS inline, figures drawn here with matplotlib and inlined as base64
PNG data URIs, no JavaScript, nothing fetched; it opens offline in any browser. Everything is
read back from the run directory (``config.yaml``, ``summary.json``, ``plan.json`` or
``search.json``, and each run's ``summary.json``, ``metrics.jsonl`` / ``metrics.csv``,
``diverged.json``), so the page can be rebuilt at any time::

    python -m creditlab.report runs/quickstart          # kind read from the directory

A comparison's page holds: the summary table (mean +/- sample std over the seeds, the number
of seeds and of diverged seeds, test accuracy at the epoch the validation split selects, epoch
times, the mean angle to backprop over the layers where the algorithm differs from it, and
the published figure with its kind of source where the config's ``published:`` block has one
for the algorithm); paired statistics against the first algorithm (every algorithm sees the
same initial weights and batches for a seed, so the per-seed differences, their mean and a 95 %
t interval over seeds, :mod:`creditlab.stats`); curves with seed bands; per-layer angles to
backprop; feedback alignment (angle, norm ratio, sign congruence) and every other per-layer
trace the step records carry (relaxation, energies, reconstruction errors, ...); and the
provenance: versions, git commit, device, threads, dtype, data checksums (from the runs'
``summary.json`` ``environment`` block when present, else computed when the page is written and
labelled so) and the full resolved config.

A search's page holds the trials' scores, each hyper-parameter's effect (score against value),
the trials' validation curves, and the same provenance.

Fields are read defensively: a value that an older run directory lacks is shown as ``-``.
"""

from __future__ import annotations

import base64
import csv
import datetime
import html
import io
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from creditlab import stats

REPORT = "report.html"
#: a layer whose mean angle to backprop (over the logged steps) is at most this many degrees
#: updates as backprop does (the runs' ``angle_tolerance_deg`` when they record it)
EXACT_DEG = 0.01
#: step-record keys that are feedback alignment (the key's last part before ``/<layer>``)
FEEDBACK_METRICS = {
    "feedback_angle_deg": "angle between B and W (deg)",
    "feedback_norm_ratio": "norm ratio |B| / |W|",
    "sign_congruence_pct": "sign congruence (%)",
    "grad_angle_deg": "angle, synthetic vs true gradient (deg)",
    "rel_error": "relative error |B - W| / |W|",
    "sign_pct": "sign agreement (%)",
}
_STEP_FIELDS = {"kind", "epoch", "step", "loss", "angles", "mean_angle_deg"}
_PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
            "#bcbd22", "#17becf"]


# ---------------------------------------------------------------------------------------------
# reading run directories
# ---------------------------------------------------------------------------------------------
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_jsonl(path: Path) -> list[dict]:
    out: list[dict] = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut by a kill
        if isinstance(rec, dict):
            out.append(rec)
    return out


def _read_csv(path: Path) -> list[dict]:
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError:
        return []
    out = []
    for r in rows:
        rec: dict[str, Any] = {"kind": "epoch"}
        for k, v in r.items():
            try:
                rec[k] = float(v) if v not in ("", None) else None
            except ValueError:
                rec[k] = v
        if rec.get("epoch") is not None:
            rec["epoch"] = int(rec["epoch"])
        out.append(rec)
    return out


def _read_config(path: Path) -> tuple[dict, str]:
    """(mapping, text) of a config.yaml; ({}, "") when there is none."""
    try:
        text = path.read_text()
    except OSError:
        return {}, ""
    try:
        from creditlab import config as config_mod

        return config_mod.read(path), text
    except Exception:  # noqa: BLE001  (an unreadable config still gets its text shown)
        return {}, text


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


@dataclass
class RunData:
    """One run of a comparison (an algorithm x seed) as read from its directory."""

    algo: str
    seed: int
    dir: Path
    status: str = "missing"  # ok | diverged | unfinished | missing
    summary: dict = field(default_factory=dict)
    epochs: list[dict] = field(default_factory=list)
    steps: list[dict] = field(default_factory=list)
    message: str = ""

    def get(self, key: str) -> float | None:
        return _num(self.summary.get(key))

    def epoch_seconds(self) -> list[float]:
        return [s for s in (_num(e.get("seconds")) for e in self.epochs) if s is not None]


def read_run(algo: str, seed: int, run_dir: Path) -> RunData:
    run = RunData(algo, seed, run_dir)
    records = _read_jsonl(run_dir / "metrics.jsonl")
    run.epochs = [r for r in records if r.get("kind") == "epoch"] or _read_csv(run_dir / "metrics.csv")
    run.steps = [r for r in records if r.get("kind") == "step"]
    summary = _read_json(run_dir / "summary.json")
    run.summary = summary if isinstance(summary, dict) else {}
    diverged = _read_json(run_dir / "diverged.json")
    if (run_dir / "diverged.json").is_file():
        run.status = "diverged"
        run.message = str(diverged.get("message", "")) if isinstance(diverged, dict) else ""
    elif not run.summary:
        run.status = "missing" if not (run_dir / "summary.json").is_file() else "unfinished"
    else:
        run.status = "ok" if run.summary.get("finished") else "unfinished"
    return run


def _slug(spec: str) -> str:  # compare.slug, repeated so that a report never imports the training stack
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", spec.replace(":", "__").replace(",", "_"))


def comparison_runs(out: Path, cfg: dict) -> list[RunData]:
    """The comparison's runs: ``plan.json``'s (collect) or every algorithm x seed of the config
    in ``out/<slug>/seed<N>`` (compare), in plan order."""
    plan = _read_json(out / "plan.json")
    if isinstance(plan, dict) and isinstance(plan.get("runs"), list):
        pairs = [(str(r.get("algo")), int(r.get("seed", 0)), out / str(r.get("dir"))) for r in plan["runs"]]
    else:
        algos = cfg.get("algos") or ([cfg["algo"]] if cfg.get("algo") else [])
        pairs = [(a, int(s), out / _slug(a) / f"seed{s}") for a in algos for s in (cfg.get("seeds") or [0])]
    return [read_run(a, s, d) for a, s, d in pairs]


# ---------------------------------------------------------------------------------------------
# numbers
# ---------------------------------------------------------------------------------------------
def _fmt(v: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if v is None else f"{scale * v:.{digits}f}"


def mean_pm_std(values: Iterable[float | None], scale: float = 1.0, digits: int = 2) -> str:
    """``m ± s`` over the values; the value alone for one; ``-`` for none."""
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    m, s = stats.mean(vals), stats.std(vals)
    if len(vals) == 1 or s is None:
        return _fmt(m, scale, digits)
    return f"{_fmt(m, scale, digits)} ± {_fmt(s, scale, digits)}"


def layer_angles(steps: list[dict]) -> dict[str, list[float]]:
    """Per layer, the angle to backprop at each logged step (NaN skipped)."""
    out: dict[str, list[float]] = {}
    for r in steps:
        angles = r.get("angles")
        if isinstance(angles, dict):
            for layer, a in angles.items():
                v = _num(a)
                if v is not None:
                    out.setdefault(str(layer), []).append(v)
    return out


def layer_means(run: RunData) -> dict[str, float]:
    """Per layer, the run's mean angle to backprop over its logged steps: the summary's
    ``layer_angles_deg`` when it has it, else computed from the step records."""
    rec = run.summary.get("layer_angles_deg")
    if isinstance(rec, dict) and rec:
        return {str(k): v for k, v in ((k, _num(v)) for k, v in rec.items()) if v is not None}
    return {layer: m for layer, vals in layer_angles(run.steps).items() if (m := stats.mean(vals)) is not None}


def tolerance(runs: list[RunData]) -> float:
    for run in runs:
        tol = _num(run.summary.get("angle_tolerance_deg"))
        if tol is not None:
            return tol
    return EXACT_DEG


def differing_layers(runs: list[RunData], tol: float) -> list[str]:
    """The layers whose angle to backprop, averaged over the logged steps and then over the
    seeds, exceeds ``tol``: where the algorithm's update is not backprop's (as ``compare``'s
    summary decides it)."""
    per_seed = [layer_means(r) for r in runs]
    layers = list(dict.fromkeys(layer for d in per_seed for layer in d))
    return [layer for layer in layers if (stats.mean(d.get(layer) for d in per_seed) or 0.0) > tol]


def mean_differing_angle(run: RunData, layers: list[str]) -> float | None:
    """The run's mean angle over ``layers`` (over every layer when ``layers`` is empty)."""
    per = layer_means(run)
    return stats.mean(per.get(layer) for layer in (layers or list(per)))


def epoch_times(run: RunData) -> tuple[float | None, float | None]:
    """(median epoch time excluding the first epoch, first-epoch time) in seconds: the
    summary's ``epoch_seconds_median`` and ``first_epoch_seconds`` when it has them, else
    computed from the epoch records."""
    if "first_epoch_seconds" in run.summary:
        return _num(run.summary.get("epoch_seconds_median")), _num(run.summary.get("first_epoch_seconds"))
    secs = run.epoch_seconds()
    if not secs:
        return None, None
    return (stats.median(secs[1:]) if len(secs) > 1 else None), secs[0]


def _published_leaves(block: Any) -> list[dict]:
    """Every published value as {path, value, kind, source, note} (the schema of
    :mod:`creditlab.published`; legacy free-form keys too, with kind ``-``)."""
    if not isinstance(block, dict):
        return []
    out: list[dict] = []
    kind0, source0 = block.get("kind"), block.get("source")

    def walk(node: Any, path: list[str], kind: Any, source: Any, note: str) -> None:
        if isinstance(node, dict) and "value" in node:
            walk(node["value"], path, node.get("kind", kind), node.get("source", source), str(node.get("note", "")))
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(v, path + [str(k)], kind, source, note)
        else:
            out.append({"path": ".".join(path), "value": node, "kind": kind, "source": source, "note": note})

    if isinstance(block.get("values"), dict):
        walk(block["values"], [], kind0, source0, "")
    for k, v in block.items():
        if k in ("values", "kind", "source", "protocol", "claim", "notes"):
            continue
        walk(v, [str(k)], kind0, source0, "")
    return out


def _published_for(algo: str, algos: list[str], leaves: list[dict]) -> list[dict]:
    """The published values named for ``algo``: a leaf (or a list's parent) whose last key is
    the algorithm's spec, its slug, or its bare name when no other algorithm of the comparison
    has that name."""
    name = algo.split(":", 1)[0]
    unique = sum(a.split(":", 1)[0] == name for a in algos) == 1
    keys = {algo, _slug(algo)} | ({name} if unique else set())
    found = []
    for leaf in leaves:
        parts = leaf["path"].split(".") if leaf["path"] else []
        if parts and parts[-1] in keys:
            found.append(leaf)
    return found


def _show_value(v: Any) -> str:
    if isinstance(v, list):
        return " / ".join(map(str, v))
    return str(v)


# ---------------------------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    plt = _plt()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _grid(n: int, width: float = 4.2, height: float = 3.0, cols: int = 3):
    plt = _plt()
    cols = max(1, min(cols, n))
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _int_ticks(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _band(ax, xs_by_seed: list[tuple[list[float], list[float]]], color: str, label: str) -> None:
    """Seeds faint, their mean as a line, mean +/- 1 std as a band (x values aligned by value)."""
    if not xs_by_seed:
        return
    by_x: dict[float, list[float]] = {}
    for xs, ys in xs_by_seed:
        if len(xs_by_seed) > 1:
            ax.plot(xs, ys, color=color, alpha=0.25, lw=0.8)
        for x, y in zip(xs, ys):
            by_x.setdefault(x, []).append(y)
    xs = sorted(by_x)
    m = [stats.mean(by_x[x]) for x in xs]
    n = len(xs_by_seed)
    ax.plot(xs, m, color=color, lw=1.8, marker="o" if len(xs) < 30 else None, ms=3,
            label=f"{label} (mean of {n} seeds)" if n > 1 else label)
    if n > 1:
        s = [stats.std(by_x[x]) or 0.0 for x in xs]
        ax.fill_between(xs, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], color=color, alpha=0.18,
                        lw=0)


def _series(records: list[dict], x: str, key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        xv, yv = _num(r.get(x)), _num(r.get(key))
        if xv is not None and yv is not None:
            xs.append(xv)
            ys.append(yv)
    return xs, ys


def _color(i: int) -> str:
    return _PALETTE[i % len(_PALETTE)]


def figure_curves(groups: dict[str, list[RunData]], metrics: list[tuple[str, str]]) -> str | None:
    """Per metric, every algorithm's curve over epochs: mean line, std band, faint seeds."""
    panels = [(key, label) for key, label in metrics
              if any(_series(r.epochs, "epoch", key)[0] for runs in groups.values() for r in runs)]
    if not panels:
        return None
    fig, axes = _grid(len(panels), 3.9, 3.1, cols=4)
    for ax, (key, label) in zip(axes, panels):
        for i, (algo, runs) in enumerate(groups.items()):
            _band(ax, [s for s in (_series(r.epochs, "epoch", key) for r in runs) if s[0]], _color(i), algo)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_title(label)
        _int_ticks(ax)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("band: mean ± 1 std over seeds; thin lines: single seeds", fontsize=8, y=1.0)
    return _png(fig)


def _layer_figure(groups: dict[str, list[RunData]], extract, ylabel: str, skip_flat: float | None = None) -> str | None:
    """One panel per algorithm, one line (seed mean, std band) per layer, x = logged step."""
    panels = []
    for algo, runs in groups.items():
        per_seed = [extract(r) for r in runs]
        layers = sorted({layer for d in per_seed for layer in d})
        if not layers:
            continue
        if skip_flat is not None and all(max(ys, default=0.0) <= skip_flat for d in per_seed for _, ys in d.values()):
            continue
        panels.append((algo, per_seed, layers))
    if not panels:
        return None
    fig, axes = _grid(len(panels), 4.6, 3.3)
    for ax, (algo, per_seed, layers) in zip(axes, panels):
        for j, layer in enumerate(layers):
            _band(ax, [d[layer] for d in per_seed if layer in d and d[layer][0]], _color(j), layer)
        ax.set_title(algo, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ys = [y for d in per_seed for _, vals in d.values() for y in vals]
        if ys and min(ys) > 0 and max(ys) / min(ys) > 1e3:  # residuals, errors: orders of magnitude apart
            ax.set_yscale("log")
        _int_ticks(ax)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    return _png(fig)


def _metric_figure(runs: list[RunData], metrics: list[str], label) -> str | None:
    """One algorithm's runs: one panel per per-layer metric, one line per layer."""
    panels = [(m, [_keyed_series(r, m) for r in runs]) for m in metrics]
    panels = [(m, d) for m, d in panels if any(d)]
    if not panels:
        return None
    fig, axes = _grid(len(panels), 4.6, 3.3)
    for ax, (metric, per_seed) in zip(axes, panels):
        layers = sorted({layer for d in per_seed for layer in d})
        for j, layer in enumerate(layers):
            _band(ax, [d[layer] for d in per_seed if layer in d and d[layer][0]], _color(j), layer)
        ax.set_title(label(metric), fontsize=9)
        ax.set_xlabel("step")
        _int_ticks(ax)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    return _png(fig)


def _angle_series(run: RunData) -> dict[str, tuple[list[float], list[float]]]:
    out: dict[str, tuple[list[float], list[float]]] = {}
    for r in run.steps:
        angles, step = r.get("angles"), _num(r.get("step"))
        if not isinstance(angles, dict) or step is None:
            continue
        for layer, a in angles.items():
            v = _num(a)
            if v is not None:
                xs, ys = out.setdefault(str(layer), ([], []))
                xs.append(step)
                ys.append(v)
    return out


def _keyed_series(run: RunData, metric: str) -> dict[str, tuple[list[float], list[float]]]:
    """``{layer: (steps, values)}`` of the step keys ``<metric>/<layer>``."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    prefix = metric + "/"
    for r in run.steps:
        step = _num(r.get("step"))
        if step is None:
            continue
        for k, v in r.items():
            if k.startswith(prefix):
                y = _num(v)
                if y is not None:
                    xs, ys = out.setdefault(k[len(prefix):], ([], []))
                    xs.append(step)
                    ys.append(y)
    return out


def _scalar_series(run: RunData, keys: list[str]) -> dict[str, tuple[list[float], list[float]]]:
    out = {}
    for k in keys:
        xs, ys = _series(run.steps, "step", k)
        if xs:
            out[k] = (xs, ys)
    return out


def step_metrics(runs: list[RunData]) -> tuple[list[str], list[str], list[str]]:
    """(feedback-alignment metrics, other per-layer metrics, other scalar keys) that the step
    records of ``runs`` carry; a per-layer metric is a key ``<metric>/<layer>``."""
    layered: set[str] = set()
    scalars: set[str] = set()
    for run in runs:
        for r in run.steps:
            for k, v in r.items():
                if k in _STEP_FIELDS or _num(v) is None and not (isinstance(v, float) and math.isnan(v)):
                    continue
                if "/" in k:
                    layered.add(k.rsplit("/", 1)[0])
                else:
                    scalars.add(k)
    fb = sorted(m for m in layered if m.rsplit("/", 1)[-1] in FEEDBACK_METRICS)
    return fb, sorted(layered - set(fb)), sorted(scalars)


# ---------------------------------------------------------------------------------------------
# provenance
# ---------------------------------------------------------------------------------------------
def _flatten(d: Any, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    else:
        out[prefix.rstrip(".")] = "-" if d is None else d if isinstance(d, str) else json.dumps(d, default=str)
    return out


def expected_checksums(dataset: str) -> dict[str, str]:
    """The md5 of each file the dataset is read from, as creditlab verifies it before reading
    (the published checksums; for ``fake:`` there is no file)."""
    name = str(dataset).split(":", 1)[0]
    try:
        from creditlab.data import MNIST_MINI_MD5, files
    except Exception:  # noqa: BLE001
        return {}
    specs = {"mnist": files.MNIST_FILES, "fashion-mnist": files.FASHION_FILES,
             "cifar10": (files.CIFAR10_TARBALL,), "cifar100": (files.CIFAR100_TARBALL,)}
    if name == "mnist-mini":
        return {"mnist_mini.npz (shipped)": MNIST_MINI_MD5}
    if name == "fake":
        return {"(none)": f"generated in memory from the spec {dataset}"}
    out = {f"{name}/{s.name}": s.md5 for s in specs.get(name, ())}
    if name == "cifar10":
        out["note"] = "an extracted cifar-10-batches-py/ or cifar10.npz is read without an md5 check"
    return out


def environment_now(cfg: dict) -> dict[str, Any]:
    """The provenance as it is when the report is written (for runs without an ``environment``
    block): :func:`creditlab.provenance.environment` of this process, with the md5s the data
    loader checks (:func:`expected_checksums`) in place of the files read."""
    import platform

    try:
        from creditlab.provenance import environment

        env = dict(environment(cfg))
    except Exception:  # noqa: BLE001  (an older creditlab without it, or a broken git: the basics)
        import numpy
        import torch

        import creditlab

        env = {"creditlab_version": creditlab.__version__, "torch_version": torch.__version__,
               "numpy_version": numpy.__version__, "python_version": platform.python_version(),
               "platform": platform.platform(), "device": cfg.get("device"), "threads": torch.get_num_threads(),
               "dtype": cfg.get("dtype"), "dataset": cfg.get("dataset")}
    if cfg.get("threads") is None:
        env["threads"] = f"config: null (torch's default; {env.get('threads')} in the process writing this report)"
    if not env.get("data_files"):
        env["data_files"] = {k: f"{v} (expected md5, checked by the loader before reading)" if k != "(none)" else v
                             for k, v in expected_checksums(cfg.get("dataset", "-")).items()}
    return env


def provenance(summaries: list[dict], cfg: dict) -> tuple[str, dict[str, list[str]]]:
    """(label, key -> distinct values) of the runs' ``environment`` blocks, or of
    :func:`environment_now` when no run has one."""
    envs = [s["environment"] for s in summaries if isinstance(s, dict) and isinstance(s.get("environment"), dict)]
    if envs:
        label = (f"from the runs' summary.json environment block ({len(envs)} of {len(summaries)} runs have one)"
                 if len(envs) < len(summaries) else "from the runs' summary.json environment block")
    else:
        envs = [environment_now(cfg)]
        label = ("computed when this report was written (the runs' summary.json have no environment block): "
                 "the code and machine now, which may not be those that produced the runs")
    merged: dict[str, list[str]] = {}
    for env in envs:
        for k, v in _flatten(env).items():
            vals = merged.setdefault(k, [])
            if v not in vals:
                vals.append(v)
    return label, merged


# ---------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------
CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 1.5em auto; max-width: 1400px;
       padding: 0 1em; color: #222; line-height: 1.4; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; }
h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ccc; }
h3 { font-size: 1.0em; margin-top: 1.2em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.88em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.55em; text-align: right; vertical-align: top; }
th { background: #f2f2f2; } td.l, th.l { text-align: left; }
tr.best td { background: #eef7ee; }
code, pre { font-family: Menlo, Consolas, monospace; font-size: 0.9em; }
pre { background: #f7f7f7; border: 1px solid #ddd; padding: 0.6em; overflow-x: auto; }
.note { color: #555; font-size: 0.88em; } .warn { color: #a40; } .yes { color: #060; font-weight: bold; }
figure { margin: 0.8em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.85em; }
nav a { margin-right: 1em; }
"""


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _table(head: list[str], rows: list[list[str]], cls: str = "", left: int = 1,
           row_classes: list[str] | None = None) -> str:
    """An HTML table; cells are HTML already (escape with :func:`_e`); the first ``left``
    columns are left-aligned."""
    out = [f'<table class="{cls}">' if cls else "<table>", "<tr>"]
    out += [f'<th class="{"l" if i < left else ""}">{h}</th>' for i, h in enumerate(head)]
    out.append("</tr>")
    for j, row in enumerate(rows):
        rc = row_classes[j] if row_classes and row_classes[j] else ""
        out.append(f'<tr class="{rc}">' if rc else "<tr>")
        out += [f'<td class="{"l" if i < left else ""}">{c}</td>' for i, c in enumerate(row)]
        out.append("</tr>")
    out.append("</table>")
    return "\n".join(out)


def _figure(b64: str | None, name: str, caption: str) -> str:
    if b64 is None:
        return ""
    return (f'<figure id="fig-{_e(name)}"><img class="figure" alt="{_e(caption)}" '
            f'src="data:image/png;base64,{b64}"><figcaption>{_e(caption)}</figcaption></figure>')


def _page(title: str, body: list[str]) -> str:
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body>\n"
            + "\n".join(body)
            + f"\n<p class=\"note\">Written by creditlab.report on {_e(when)}. One self-contained file: no "
              "scripts, nothing loaded from the network.</p>\n</body></html>\n")


def _provenance_section(summaries: list[dict], cfg: dict, config_text: str, config_label: str) -> list[str]:
    label, env = provenance(summaries, cfg)
    rows = []
    for k, vals in env.items():
        if len(vals) == 1:
            rows.append([f"<code>{_e(k)}</code>", _e(vals[0])])
        else:
            rows.append([f"<code>{_e(k)}</code>",
                         '<span class="warn">differs between runs:</span> ' + "; ".join(_e(v) for v in vals)])
    out = ['<h2 id="provenance">Provenance</h2>', f'<p class="note">Environment {_e(label)}.</p>',
           _table(["key", "value"], rows, left=2)]
    out.append(f"<h3>Resolved config ({_e(config_label)})</h3>")
    out.append(f"<pre>{_e(config_text) if config_text else '-'}</pre>")
    return out


def _what(task: str) -> dict[str, Any]:
    if task == "autoencode":
        return {"scale": 1.0, "digits": 4, "unit": "", "final": "test_loss", "val": "val_loss",
                "selected": "test_loss_at_best_val", "label": "loss", "better": "lower",
                "curves": [("test_loss", "test loss"), ("val_loss", "validation loss"), ("train_loss", "train loss")]}
    return {"scale": 100.0, "digits": 2, "unit": " (%)", "final": "test_accuracy", "val": "val_accuracy",
            "selected": "test_accuracy_at_best_val", "label": "accuracy", "better": "higher",
            "curves": [("test_accuracy", "test accuracy"), ("val_accuracy", "validation accuracy"),
                       ("train_accuracy", "train accuracy"), ("train_loss", "train loss")]}


def comparison_page(out: Path, kind: str) -> str:
    cfg, config_text = _read_config(out / "config.yaml")
    comp = _read_json(out / "summary.json")
    comp = comp if isinstance(comp, dict) else {}
    runs = comparison_runs(out, cfg)
    algos = list(dict.fromkeys(r.algo for r in runs))
    groups = {a: [r for r in runs if r.algo == a] for a in algos}
    ok_groups = {a: [r for r in rs if r.status in ("ok", "unfinished") and r.epochs] for a, rs in groups.items()}
    task = cfg.get("task", "classify")
    w = _what(task)
    name = cfg.get("name") or comp.get("name") or out.name
    dataset = cfg.get("dataset") or comp.get("dataset") or "-"
    epochs = max((len(r.epochs) for r in runs), default=0)
    seeds = sorted({r.seed for r in runs})
    title = f"{name}: {dataset}"
    body = [f"<h1>{_e(title)}</h1>",
            f'<p class="note">{_e(kind)} directory <code>{_e(out.resolve())}</code>; {len(algos)} algorithm(s) x '
            f"{len(seeds)} seed(s) ({_e(', '.join(map(str, seeds)))}); up to {epochs} epoch(s); task {_e(task)}.</p>",
            '<nav><a href="#summary">summary</a><a href="#paired">paired statistics</a><a href="#curves">curves</a>'
            '<a href="#angles">angles to backprop</a><a href="#feedback">feedback alignment</a>'
            '<a href="#traces">other traces</a><a href="#provenance">provenance</a></nav>']

    # ---- summary table
    pub_block = cfg.get("published") if isinstance(cfg.get("published"), dict) else {}
    leaves = _published_leaves(pub_block)
    tol = tolerance(runs)
    diff_layers = {a: differing_layers([r for r in rs if r.status == "ok"], tol) for a, rs in groups.items()}
    head = ["algorithm", "n seeds", "diverged", f"test {w['label']}{w['unit']} (last epoch)",
            f"val {w['label']}{w['unit']}", f"test {w['label']}{w['unit']} at the validation-selected epoch",
            "selected epoch", "s / epoch (median, excl. the first epoch)", "first epoch (s)",
            "mean angle to BP over the layers that differ (deg)", "published (kind)"]
    rows = []
    for algo in algos:
        rs = groups[algo]
        ok = [r for r in rs if r.status == "ok"]
        lost = [r for r in rs if r.status in ("missing", "unfinished")]
        div = [r for r in rs if r.status == "diverged"]
        times = [epoch_times(r) for r in ok]
        layers = diff_layers[algo]
        has_angles = any(layer_means(r) for r in ok)
        angle = "-" if not has_angles else mean_pm_std([mean_differing_angle(r, layers) for r in ok]) + (
            f'<br><span class="note">over {_e(", ".join(layers))}</span>' if layers else
            '<br><span class="note">no layer differs: mean over all</span>')
        pubs = _published_for(algo, algos, leaves)
        pub = "<br>".join(f"{_e(_show_value(p['value']))} ({_e(p['kind'] or '-')}; <code>{_e(p['path'])}</code>)"
                          for p in pubs) or "-"
        n_text = str(len(ok)) + (f' <span class="warn">(+{len(lost)} missing or unfinished: seeds '
                                 f'{_e(", ".join(str(r.seed) for r in lost))})</span>' if lost else "")
        rows.append([f"<code>{_e(algo)}</code>", n_text,
                     f'<span class="warn">{len(div)}: seeds {_e(", ".join(str(r.seed) for r in div))}</span>'
                     if div else "0",
                     mean_pm_std([r.get(w["final"]) for r in ok], w["scale"], w["digits"]),
                     mean_pm_std([r.get(w["val"]) for r in ok], w["scale"], w["digits"]),
                     mean_pm_std([r.get(w["selected"]) for r in ok], w["scale"], w["digits"]),
                     _e(", ".join(str(int(v)) for v in (r.get("best_val_epoch") for r in ok) if v is not None) or "-"),
                     mean_pm_std([t[0] for t in times], 1.0, 3), mean_pm_std([t[1] for t in times], 1.0, 3),
                     angle, pub])
    body += ['<h2 id="summary">Summary</h2>',
             f'<p class="note">Mean ± sample standard deviation over the finished seeds (one seed: the value '
             f"alone). The validation split selects the epoch ({w['better']} validation {w['label']} is better); "
             "the test set is never used to select anything. Epoch times: the median over epochs 2 and later "
             "(the first includes warm-up), and the first epoch alone. A layer \"differs\" from backprop when its "
             f"angle, averaged over the logged steps and the seeds, exceeds {tol:g} deg.</p>",
             _table(head, rows, cls="summary")]
    div_msgs = [r for r in runs if r.status == "diverged" and r.message]
    if div_msgs:
        body.append("<p class=\"warn\">Diverged:</p><ul>" + "".join(
            f"<li><code>{_e(r.algo)}</code> seed {r.seed}: {_e(r.message)}</li>" for r in div_msgs) + "</ul>")
    if pub_block:
        body.append("<h3>Published</h3>")
        facts = [f"<b>{_e(k)}</b>: {_e(pub_block[k])}" for k in ("kind", "source", "protocol", "claim", "notes")
                 if pub_block.get(k)]
        if facts:
            body.append("<p>" + "<br>".join(facts) + "</p>")
        if leaves:
            body.append(_table(["value path", "value", "kind", "source"],
                               [[f"<code>{_e(p['path'])}</code>", _e(_show_value(p["value"])), _e(p["kind"] or "-"),
                                 _e((p["source"] or "-") + (f" ({p['note']})" if p["note"] else ""))]
                                for p in leaves], left=4))

    # ---- paired statistics
    body.append('<h2 id="paired">Paired statistics against the first algorithm</h2>')
    if len(algos) < 2:
        body.append('<p class="note">One algorithm: nothing to pair.</p>')
    else:
        ref = algos[0]
        by_seed = {a: {r.seed: r for r in groups[a] if r.status == "ok"} for a in algos}
        body.append(f'<p class="note">Every algorithm sees the same initial weights and batches for a seed, so '
                    f"each is compared with <code>{_e(ref)}</code> seed by seed: the differences "
                    f"(algorithm − <code>{_e(ref)}</code>, in {'percentage points' if w['scale'] == 100 else 'loss'}), "
                    "their mean and a 95 % confidence interval from Student's t over the seeds both finished. "
                    "<span class=\"yes\">excludes 0</span> marks an interval that lies on one side of 0.</p>")
        prow = []
        for algo in algos[1:]:
            for key, label in ((w["selected"], f"test {w['label']} at the validation-selected epoch"),
                               (w["final"], f"test {w['label']}, last epoch")):
                a = {s: r.get(key) for s, r in by_seed[algo].items()}
                b = {s: r.get(key) for s, r in by_seed[ref].items()}
                p = stats.paired(a, b)
                sc = w["scale"]
                if p.n == 0:
                    prow.append([f"<code>{_e(algo)}</code>", _e(label), "-", "-", "-", "no seed finished by both"])
                    continue
                diffs = ", ".join(f"{s}: {sc * d:+.{w['digits']}f}" for s, d in zip(p.seeds, p.diffs))
                if p.low is None:
                    ci, flag = "-", "n=1: no interval"
                else:
                    ci = f"[{sc * p.low:+.{w['digits']}f}, {sc * p.high:+.{w['digits']}f}]"
                    if p.excludes_zero:
                        side = "above" if p.low > 0 else "below"
                        flag = f'<span class="yes">excludes 0</span> ({side} <code>{_e(ref)}</code>)'
                    else:
                        flag = "contains 0"
                prow.append([f"<code>{_e(algo)}</code>", _e(label), _e(diffs), f"{sc * p.mean:+.{w['digits']}f}",
                             _e(ci), flag])
        body.append(_table(["algorithm", "metric", "per-seed difference (seed: value)", "mean difference",
                            "95 % CI (t, over seeds)", "interval"], prow, cls="paired", left=3))

    # ---- curves
    body.append('<h2 id="curves">Curves</h2>')
    fig = figure_curves({a: rs for a, rs in ok_groups.items() if rs}, w["curves"])
    body.append(_figure(fig, "curves", "Per epoch, for every algorithm: the mean over seeds (line), ± 1 sample std "
                                       "(band) and each seed (thin lines).") or '<p class="note">No epoch records.</p>')

    # ---- angles
    body.append('<h2 id="angles">Angle to backprop, per layer</h2>')
    all_layers = list(dict.fromkeys(layer for rs in groups.values() for r in rs for layer in layer_means(r)))
    if all_layers:
        arows = []
        for algo in algos:
            per_seed = [layer_means(r) for r in groups[algo] if r.status == "ok"]
            cells = [("<b>{}</b>" if layer in diff_layers[algo] else "{}").format(
                mean_pm_std([d.get(layer) for d in per_seed])) for layer in all_layers]
            arows.append([f"<code>{_e(algo)}</code>"] + cells)
        body.append('<p class="note">Angle (deg) between each layer\'s update and backprop\'s on the same batch, '
                    "averaged over the logged steps, then mean ± std over the finished seeds; bold: the layers "
                    "that differ from backprop.</p>")
        body.append(_table(["algorithm"] + [f"<code>{_e(layer)}</code>" for layer in all_layers], arows,
                           cls="angles"))
        fig = _layer_figure(groups, _angle_series, "angle to backprop (deg)", skip_flat=tol)
        body.append(_figure(fig, "angles", "Per-layer angle to backprop over training (algorithms whose update is "
                                           "backprop's at every layer are left out)."))
    else:
        body.append('<p class="note">No step record carries angles (set log_every to log them).</p>')

    # ---- feedback alignment and other traces
    all_runs = [r for rs in groups.values() for r in rs]
    fb, layered, scalars = step_metrics(all_runs)
    body.append('<h2 id="feedback">Feedback alignment</h2>')
    drawn = False
    for algo, rs in groups.items():
        mine = step_metrics(rs)[0]
        if not mine:
            continue
        fig = _metric_figure(rs, mine, lambda m: FEEDBACK_METRICS.get(m.rsplit("/", 1)[-1], m))
        drawn = drawn or fig is not None
        body.append(_figure(fig, f"feedback-{_slug(algo)}",
                            f"{algo}: feedback weights B against the forward weights W they stand in for, per "
                            "layer, at the logged steps (mean over seeds, ± 1 std band, thin lines: seeds)."))
    if not drawn:
        body.append('<p class="note">No algorithm here logs feedback alignment (fa, dfa, signsym, kp, wm, np, '
                    "ar with learned feedback do).</p>")
    body.append('<h2 id="traces">Relaxation, energy and other recorded traces</h2>')
    if layered or scalars:
        for metric in layered:
            fig = _layer_figure(groups, lambda r, m=metric: _keyed_series(r, m), metric)
            body.append(_figure(fig, f"trace-{metric}", f"{metric}, per layer, at the logged steps."))
        if scalars:
            fig = _layer_figure(groups, lambda r: _scalar_series(r, scalars), "value")
            body.append(_figure(fig, "trace-scalars", f"Other scalars of the step records: {', '.join(scalars)}."))
    else:
        body.append('<p class="note">The step records carry no other traces.</p>')

    # ---- runs and provenance
    body.append('<h2 id="runs">Runs</h2>')
    body.append(_table(["algorithm", "seed", "status", "epochs", "directory"],
                       [[f"<code>{_e(r.algo)}</code>", str(r.seed), _e(r.status), str(len(r.epochs)),
                         f"<code>{_e(r.dir)}</code>"] for r in runs], left=5))
    body += _provenance_section([r.summary for r in runs if r.summary], cfg, config_text,
                                "config.yaml of this directory")
    return _page(title, body)


# ---------------------------------------------------------------------------------------------
# search
# ---------------------------------------------------------------------------------------------
def _trial_dir(out: Path, trial: dict) -> Path:
    d = Path(str(trial.get("dir") or f"trial-{int(trial.get('trial', 0)):05d}"))
    return d if d.is_dir() else out / d.name


def search_page(out: Path, config: dict | None = None) -> str:
    res = _read_json(out / "search.json")
    res = res if isinstance(res, dict) else {}
    trials = [t for t in res.get("trials") or [] if isinstance(t, dict)]
    best = res.get("best") if isinstance(res.get("best"), dict) else None
    runs = {int(t.get("trial", i)): read_run(str(t.get("algo", "-")), int(t.get("trial", i)), _trial_dir(out, t))
            for i, t in enumerate(trials)}
    if config is not None:
        from creditlab import config as config_mod

        cfg, config_text, config_label = config, config_mod.dump(config), "the search's resolved config"
    else:
        cfg, config_text = _read_config(out / "config.yaml")
        config_label = "config.yaml of this directory"
        if not config_text:
            first = next((r for r in runs.values() if (r.dir / "config.yaml").is_file()), None)
            if first is not None:
                cfg, config_text = _read_config(first.dir / "config.yaml")
                config_label = (f"trial {first.seed}'s config.yaml, with that trial's values of the varied keys "
                                "(the search's own config was not given to the report)")
    by_acc = any("best_val_accuracy" in (t.get("summary") or {}) for t in trials)
    score_label = "score (best validation accuracy)" if by_acc else "score (− best validation loss)"
    name = res.get("study") or cfg.get("name") or out.name
    title = f"search {name}: {cfg.get('dataset', '-')}"
    body = [f"<h1>{_e(title)}</h1>",
            f'<p class="note">search directory <code>{_e(out.resolve())}</code>. Trials are ranked on the '
            f"{_e(res.get('selected_on', 'validation'))} split only; test figures are read at the epoch it "
            "selects and never enter the ranking.</p>",
            '<nav><a href="#search">search</a><a href="#trials">trials</a><a href="#effects">hyper-parameters</a>'
            '<a href="#provenance">provenance</a></nav>', '<h2 id="search">Search</h2>']
    facts = [("study", res.get("study")), ("sampler", res.get("sampler")), ("seed", res.get("seed")),
             ("trials requested", res.get("trials_requested")), ("finished", res.get("finished")),
             ("diverged", res.get("diverged")), ("workers", res.get("workers")),
             ("trials whose worker died", ", ".join(map(str, res.get("worker_died") or [])) or "none"),
             ("space source", res.get("space_source")), ("varied", ", ".join(res.get("varied") or []) or None),
             ("space", json.dumps(res.get("space")) if res.get("space") else None),
             ("config values replaced", json.dumps(res.get("replaced_config_values"))
              if res.get("replaced_config_values") else None),
             ("storage", res.get("storage")),
             ("best trial", best.get("trial") if best else None),
             ("best score", _fmt(_num(best.get("score")), 1.0, 4) if best else None),
             ("best: test at the selected epoch", _fmt(_num(res.get("best_test_at_selected_epoch")), 1.0, 4)),
             ("best: best test over training", _fmt(_num(res.get("best_test_over_training")), 1.0, 4))]
    body.append(_table(["", "value"], [[_e(k), _e("-" if v is None else v)] for k, v in facts], cls="summary", left=2))

    params = sorted({p for t in trials for p in (t.get("params") or {})})
    body.append('<h2 id="trials">Trials</h2>')
    trows, rclasses = [], []
    for t in sorted(trials, key=lambda t: int(t.get("trial", 0))):
        s = t.get("summary") if isinstance(t.get("summary"), dict) else {}
        sel = s.get("test_accuracy_at_best_val", s.get("test_loss_at_best_val"))
        note = "diverged" if t.get("diverged") else _e(t.get("error", "")) if t.get("error") else (
            "surplus" if t.get("surplus") else "")
        trows.append([str(t.get("trial", "-")), _e(t.get("state", "-")), _fmt(_num(t.get("score")), 1.0, 4)]
                     + [_e(_show_param((t.get("params") or {}).get(p))) for p in params]
                     + [_fmt(_num(sel), 1.0, 4), _e(s.get("best_val_epoch", "-")), note])
        rclasses.append("best" if best and t.get("trial") == best.get("trial") else "")
    body.append(_table(["trial", "state", _e(score_label)] + [f"<code>{_e(p)}</code>" for p in params]
                       + ["test at the selected epoch", "selected epoch", "note"], trows, cls="trials", left=2,
                       row_classes=rclasses))
    fig = _search_scores(trials, score_label)
    body.append(_figure(fig, "scores", "Each trial's score by trial number (diverged trials: red x at the "
                                       "bottom), and the best score so far."))
    body.append('<h2 id="effects">Hyper-parameters</h2>')
    fig = _search_effects(trials, params, res.get("space") or {}, score_label)
    body.append(_figure(fig, "effects", "Score against each hyper-parameter's value, one point per trial "
                                        "(log axis for log-uniform parameters; diverged trials: red x).")
                or '<p class="note">No parameters varied.</p>')
    val_key = "val_accuracy" if by_acc else "val_loss"
    curves = {f"trial {n}": [r] for n, r in runs.items() if r.epochs}
    if curves:
        fig = _trial_curves(runs, val_key, best.get("trial") if best else None)
        body.append(_figure(fig, "trial-curves", f"Every trial's {val_key.replace('_', ' ')} per epoch; the best "
                                                 "trial in bold."))
    body += _provenance_section([r.summary for r in runs.values() if r.summary], cfg, config_text, config_label)
    return _page(title, body)


def _show_param(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _search_scores(trials: list[dict], score_label: str) -> str | None:
    pts = [(int(t.get("trial", 0)), _num(t.get("score")), bool(t.get("diverged"))) for t in trials]
    good = sorted((n, s) for n, s, _ in pts if s is not None)
    bad = [n for n, s, d in pts if s is None and d]
    if not good and not bad:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    if good:
        ax.plot([n for n, _ in good], [s for _, s in good], "o", color=_color(0), label="trial")
        run_best, xs, ys = -math.inf, [], []
        for n, s in good:
            run_best = max(run_best, s)
            xs.append(n)
            ys.append(run_best)
        ax.step(xs, ys, where="post", color=_color(2), label="best so far")
    if bad:
        low = min((s for _, s in good), default=0.0)
        ax.plot(bad, [low] * len(bad), "x", color="red", label="diverged")
    ax.set_xlabel("trial")
    ax.set_ylabel(score_label)
    _int_ticks(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


def _search_effects(trials: list[dict], params: list[str], space: dict, score_label: str) -> str | None:
    if not params:
        return None
    fig, axes = _grid(len(params), 4.2, 3.1)
    scores = [_num(t.get("score")) for t in trials]
    low = min((s for s in scores if s is not None), default=0.0)
    for ax, p in zip(axes, params):
        vals = [(t.get("params") or {}).get(p) for t in trials]
        dist = space.get(p) if isinstance(space, dict) else None
        categorical = any(isinstance(v, str) for v in vals if v is not None) or (
            isinstance(dist, list) and dist and dist[0] == "choice")
        if categorical:
            cats = sorted({str(v) for v in vals if v is not None})
            pos = {c: i for i, c in enumerate(cats)}
            xs = [pos.get(str(v)) if v is not None else None for v in vals]
            ax.set_xticks(range(len(cats)))
            ax.set_xticklabels(cats, fontsize=7)
        else:
            xs = [_num(v) for v in vals]
            if isinstance(dist, list) and dist and dist[0] == "loguniform" and all(
                    x is None or x > 0 for x in xs):
                ax.set_xscale("log")
                from matplotlib.ticker import NullFormatter

                ax.xaxis.set_minor_formatter(NullFormatter())
        ok = [(x, s) for x, s in zip(xs, scores) if x is not None and s is not None]
        bad = [x for x, s, t in zip(xs, scores, trials) if x is not None and s is None and t.get("diverged")]
        if ok:
            ax.plot([x for x, _ in ok], [s for _, s in ok], "o", color=_color(0), alpha=0.8)
        if bad:
            ax.plot(bad, [low] * len(bad), "x", color="red")
        ax.set_xlabel(p)
        ax.set_ylabel("score")
        ax.set_title(p, fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle(score_label, fontsize=8, y=1.0)
    return _png(fig)


def _trial_curves(runs: dict[int, RunData], key: str, best: Any) -> str | None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    drawn = False
    for n, r in sorted(runs.items()):
        xs, ys = _series(r.epochs, "epoch", key)
        if not xs:
            continue
        drawn = True
        if n == best:
            ax.plot(xs, ys, color=_color(1), lw=2.2, marker="o", ms=3, label=f"trial {n} (best)", zorder=3)
        else:
            ax.plot(xs, ys, color=_color(0), lw=0.9, alpha=0.4)
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("epoch")
    ax.set_ylabel(key.replace("_", " "))
    _int_ticks(ax)
    ax.grid(alpha=0.3)
    if best is not None:
        ax.legend(fontsize=7)
    return _png(fig)


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------
KINDS = ("compare", "collect", "search")


def detect_kind(out: Path) -> str:
    if (out / "search.json").is_file():
        return "search"
    return "collect" if (out / "plan.json").is_file() else "compare"


def write_report(out_dir: str | Path, kind: str | None = None, config: dict | None = None) -> Path:
    """Write ``out_dir/report.html`` for a ``compare``, ``collect`` or ``search`` directory
    (``kind``; None: read from the directory) and return its path. ``config``: the search's
    resolved config (a search directory keeps none of its own)."""
    out = Path(out_dir)
    kind = kind or detect_kind(out)
    if kind not in KINDS:
        raise ValueError(f"report kind {kind!r}; valid: {', '.join(KINDS)}")
    text = search_page(out, config) if kind == "search" else comparison_page(out, kind)
    path = out / REPORT
    tmp = path.with_name(REPORT + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m creditlab.report RUN_DIR   (a compare, collect or search directory)", file=sys.stderr)
        return 2
    print(write_report(args[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
