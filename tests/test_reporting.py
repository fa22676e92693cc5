"""What a comparison shows at a glance (issue 21, §1) and the provenance of every run (§5):
seed bands, epoch times without the warm-up, no "± 0.00" for one seed, per-layer angles and
the mean over the layers that differ from backprop, titled plots with integer epoch ticks and
short legends, mathtext symbols, no progress bars in log files, and summary.json's
``environment`` block."""

import io
import json
import math
import re

import pytest

from creditlab import plots
from creditlab.cli import main
from creditlab.compare import aggregate, compare, markdown_table
from creditlab.diagnostics.angles import EXACT_DEG, differing_layers, layer_means, mean_over
from creditlab.metrics import progress_bar
from creditlab.provenance import environment, git_state
from creditlab.train import _summary, train

LONG = "ar:schedule=sweep,feedback=learned,derivative=false"
CFG = {"name": "glance", "dataset": "fake:n=256,classes=3,shape=1x4x4", "model": {"arch": "16-8-3", "act": "tanh"},
       "algos": ["bp", "fa", LONG], "seeds": [0, 1], "optimizer": {"name": "sgd", "lr": 0.05}, "epochs": 3,
       "batch_size": 32, "log_every": 3, "threads": 1}


@pytest.fixture
def figures(monkeypatch):
    """Every figure the plots module saves, inspected just before it is written: file name ->
    the axes' lines, filled bands, legend, ticks, title and the figure's notes."""
    seen: dict[str, dict] = {}
    original = plots._finish

    def spy(fig, ax, path, *args, **kw):
        original(fig, ax, path, *args, **kw)  # sets labels, ticks, legend, note; then saves and closes
        legend = ax.get_legend()
        lo, hi = ax.get_xlim()
        seen[str(path)] = {
            "lines": [(ln.get_label(), ln.get_alpha()) for ln in ax.get_lines()],
            "bands": len(ax.collections),
            "legend_title": legend.get_title().get_text() if legend else None,
            "legend": [t.get_text() for t in legend.get_texts()] if legend else [],
            "xticks": [t for t in ax.get_xticks() if lo <= t <= hi],
            "title": ax.get_title(), "xlabel": ax.get_xlabel(), "notes": [t.get_text() for t in fig.texts]}

    monkeypatch.setattr(plots, "_finish", spy)
    return seen


def _fig(figs: dict, tail: str) -> dict:
    """The one figure whose path ends with ``tail`` (e.g. ``cmp/test_curves.png``)."""
    (hit,) = [v for k, v in figs.items() if k.endswith("/" + tail)]
    return hit


@pytest.fixture
def comparison(tmp_path, figures):
    summary = compare(CFG, tmp_path / "cmp", progress=False)
    return tmp_path / "cmp", summary, figures


# ---- (a) seed bands ------------------------------------------------------------------------
def test_comparison_curves_draw_every_seed_faintly_and_the_mean_with_a_labelled_std_band(comparison):
    out, _, figs = comparison
    curves = _fig(figs, "cmp/test_curves.png")
    faint = [lab for lab, alpha in curves["lines"] if alpha is not None and alpha < 1]
    means = [lab for lab, alpha in curves["lines"] if alpha is None]
    assert len(faint) == 3 * 2  # every seed of every algorithm
    assert means == ["bp (n=2)", "fa (n=2)", "ar #3 (n=2)"]
    assert curves["bands"] == 3 and "std" in curves["legend_title"]
    angles = _fig(figs, "cmp/angles.png")
    assert angles["bands"] == 3 and len([a for _, a in angles["lines"] if a is not None]) == 6
    assert (out / "angles_per_layer.png").is_file()


def test_one_seed_draws_the_run_without_a_band(tmp_path, figures):
    compare(dict(CFG, algos=["bp"], seeds=[0]), tmp_path / "one", progress=False)
    curves = _fig(figures, "one/test_curves.png")
    assert curves["lines"] == [("bp (n=1)", None)] and curves["bands"] == 0 and not curves["legend_title"]


# ---- (e) titles, ticks, legends, mathtext --------------------------------------------------
def test_plots_have_titles_integer_epoch_ticks_and_short_legend_labels(comparison):
    out, summary, figs = comparison
    curves = _fig(figs, "cmp/test_curves.png")
    assert curves["title"] == f"glance: {CFG['dataset']}"
    assert curves["xticks"] and all(float(t).is_integer() for t in curves["xticks"])
    assert not any(LONG in lab for lab in curves["legend"])
    assert any(f"ar #3 = {LONG}" in n for n in curves["notes"])  # the note spells the label out
    assert [r["label"] for r in summary["algorithms"]] == ["bp", "fa", "ar #3"]
    run = _fig(figs, "fa/seed1/accuracy.png")
    assert run["title"].replace("\n", " ") == f"fa, seed 1, {CFG['dataset']}"
    assert all(float(t).is_integer() for t in run["xticks"])
    titles = {k: v["title"].replace("\n", " ") for k, v in figs.items() if k.endswith("accuracy.png")}
    assert len(titles) == 6 and all(CFG["dataset"] in t and ", seed " in t for t in titles.values())


def test_short_labels_keep_short_specs_and_number_long_ones():
    specs = ["bp", "ar:schedule=sweep", LONG, "fa"]
    labels = plots.short_labels(specs)
    assert labels == ["bp", "ar:schedule=sweep", "ar #3", "fa"]
    assert plots.label_note(specs, labels) == f"ar #3 = {LONG}"


def test_relax_plots_label_the_states_in_mathtext(tmp_path, monkeypatch):
    calls = []
    real = plots.plot_relaxation
    monkeypatch.setattr(plots, "plot_relaxation", lambda path, traces, title="": (calls.append((traces, title)),
                                                                                  real(path, traces, title)))
    assert main(["relax", "--arch", "12-8-6-3", "--steps", "5", "--etas", "0.1,0.2", "--out", str(tmp_path)]) == 0
    (layers, title), (etas, _) = calls
    assert list(layers) == ["$x^{1}$", "$x^{2}$"] and title.startswith(r"$\eta$ = 0.1")
    assert list(etas) == [r"$\eta$ = 0.1", r"$\eta$ = 0.2"]
    assert (tmp_path / "relax_layers.png").stat().st_size > 0  # mathtext renders


# ---- (b) epoch times -----------------------------------------------------------------------
class _Algo:
    spec = "bp"


def _history(seconds):
    return [{"epoch": i + 1, "seconds": s, "test_accuracy": 0.5, "val_accuracy": 0.5} for i, s in enumerate(seconds)]


def test_epoch_time_is_the_median_without_the_first_epoch_which_is_reported_apart():
    cfg = {"dataset": "fake", "seed": 0}
    s = _summary(cfg, _Algo(), _history([1.46, 0.16, 0.19, 0.18, 0.17]), [], True)
    assert s["epoch_seconds_median"] == pytest.approx(0.175) and s["first_epoch_seconds"] == 1.46
    assert s["seconds_per_epoch"] == pytest.approx(sum([1.46, 0.16, 0.19, 0.18, 0.17]) / 5)  # kept, warm-up included
    one = _summary(cfg, _Algo(), _history([1.46]), [], True)
    assert one["epoch_seconds_median"] is None and one["first_epoch_seconds"] == 1.46
    row = aggregate("bp", [0, 1], [s, dict(s, epoch_seconds_median=0.185, first_epoch_seconds=1.0)])
    assert row["epoch_seconds_median_mean"] == pytest.approx(0.18) and row["first_epoch_seconds_mean"] == pytest.approx(1.23)
    md = markdown_table([dict(row, diverged_seeds=[])], {"name": "t", "dataset": "fake", "task": "classify"})
    head = md.splitlines()[2]
    assert "s / epoch (median, excl. 1st epoch)" in head and "1st epoch (s)" in head
    assert "0.180 ± 0.007" in md and "1.230 ± 0.325" in md


def test_the_comparison_reports_both_times_per_run_and_per_algorithm(comparison):
    out, summary, _ = comparison
    run = json.loads((out / "fa" / "seed0" / "summary.json").read_text())
    assert run["epoch_seconds_median"] > 0 and run["first_epoch_seconds"] > 0
    for r in summary["algorithms"]:
        assert r["epoch_seconds_median_mean"] > 0 and r["first_epoch_seconds_mean"] > 0
        assert len(r["seed_values"]["first_epoch_seconds"]) == 2


# ---- (c) one seed --------------------------------------------------------------------------
def test_one_seed_prints_the_value_alone_and_several_print_plus_minus_std():
    base = {"algo": "bp", "label": "bp", "epochs": 3, "diverged_seeds": [], "test_accuracy_mean": 0.8135,
            "test_accuracy_std": 0.0, "val_accuracy_mean": 0.8, "val_accuracy_std": 0.0}
    cfg = {"name": "t", "dataset": "fake", "task": "classify"}
    one = markdown_table([dict(base, seeds=[0])], cfg).splitlines()[4]
    assert "81.35 |" in one and "±" not in one
    two = markdown_table([dict(base, seeds=[0, 1], test_accuracy_std=0.046)], cfg).splitlines()[4]
    assert "81.35 ± 4.60" in two


# ---- (d) per-layer angles ------------------------------------------------------------------
def test_layer_means_skip_nan_and_the_differing_layers_exclude_the_exact_ones():
    means = layer_means([{"l0": 80.0, "l1": math.nan, "out": 1e-6}, {"l0": 70.0, "l1": 60.0, "out": 2e-6}])
    assert means == {"l0": 75.0, "l1": 60.0, "out": pytest.approx(1.5e-6)}
    assert differing_layers(means) == ["l0", "l1"] and mean_over(means, ["l0", "l1"]) == 67.5
    exact = {"l0": 2e-6, "out": 0.0}
    assert differing_layers(exact) == [] and mean_over(exact, []) == pytest.approx(1e-6)
    assert layer_means([{"l0": math.nan}]) == {"l0": None}


def test_rows_carry_per_layer_angles_and_the_mean_over_the_differing_layers():
    runs = [{"layer_angles_deg": {"l0": 80.0, "l1": 70.0, "out": 1e-6}, "mean_angle_deg": 50.0},
            {"layer_angles_deg": {"l0": 90.0, "l1": 60.0, "out": 2e-6}, "mean_angle_deg": 50.0}]
    row = aggregate("fa", [0, 1], runs)
    assert row["differing_layers"] == ["l0", "l1"]
    assert row["layer_angles_deg_mean"] == {"l0": 85.0, "l1": 65.0, "out": pytest.approx(1.5e-6)}
    assert row["mean_angle_differing_deg_mean"] == 75.0 and row["seed_values"]["mean_angle_differing_deg"] == [75.0, 75.0]
    md = markdown_table([dict(row, diverged_seeds=[])], {"name": "t", "dataset": "fake", "task": "classify"})
    assert "angle to BP (deg), differing layers" in md.splitlines()[2]
    assert "| 75.00 ± 0.00 |" in md  # the differing layers' mean, not the 50 over every layer
    assert f"above {EXACT_DEG} deg): `fa`: l0, l1." in md
    assert "| `fa` | **85.00 ± 7.07** | **65.00 ± 7.07** | 0.00 ± 0.00 |" in md


def test_a_comparison_names_where_each_algorithm_differs_from_backprop(comparison):
    out, summary, _ = comparison
    rows = {r["algo"]: r for r in summary["algorithms"]}
    assert rows["bp"]["differing_layers"] == []  # equals backprop everywhere
    assert rows["bp"]["mean_angle_differing_deg_mean"] < EXACT_DEG
    assert rows["fa"]["differing_layers"] == ["layers.0"]  # the output layer gets the exact error
    assert rows["fa"]["layer_angles_deg_mean"]["layers.1"] < EXACT_DEG
    assert rows["fa"]["mean_angle_differing_deg_mean"] == pytest.approx(rows["fa"]["layer_angles_deg_mean"]["layers.0"])
    assert rows["fa"]["mean_angle_differing_deg_mean"] > rows["fa"]["mean_angle_deg_mean"]
    run = json.loads((out / "fa" / "seed0" / "summary.json").read_text())
    assert run["differing_layers"] == ["layers.0"] and set(run["layer_angles_deg"]) == {"layers.0", "layers.1"}
    assert run["angle_tolerance_deg"] == EXACT_DEG == summary["angle_tolerance_deg"]
    md = (out / "summary.md").read_text()
    assert "`bp`: none" in md and "`fa`: layers.0" in md and "| algorithm | `layers.0` | `layers.1` |" in md


# ---- (f) progress bars ---------------------------------------------------------------------
class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_the_progress_bar_is_off_when_stderr_is_not_a_terminal(monkeypatch):
    items = range(3)
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert progress_bar(items, True, "x") is items
    monkeypatch.setattr("sys.stderr", _Tty())
    bar = progress_bar(items, True, "x")
    assert bar is not items and list(bar) == [0, 1, 2]
    assert progress_bar(items, False, "x") is items


def test_a_run_logged_to_a_file_prints_one_line_per_epoch(tmp_path, capsys):
    assert main(["train", "--algo", "bp", "--dataset", "fake:n=256,classes=3,shape=1x4x4", "--arch", "16-8-3",
                 "--epochs", "3", "--out", str(tmp_path / "r"), "threads=1"]) == 0  # progress on, stderr captured
    out = capsys.readouterr()
    assert "\r" not in out.err and "it/s" not in out.err
    assert len(re.findall(r"^  epoch \d+ ", out.out, flags=re.M)) == 3


# ---- §5 provenance -------------------------------------------------------------------------
def test_every_run_summary_has_an_environment_block(tmp_path):
    s = train(dict(CFG, algo="bp", epochs=1), tmp_path / "r", progress=False)
    env = s["environment"]
    assert env == json.loads((tmp_path / "r" / "summary.json").read_text())["environment"]
    for key in ("creditlab_version", "git_commit", "git_dirty", "torch_version", "python_version", "device",
                "gpu_name", "threads", "dtype", "platform", "hostname", "data_files", "data_verified"):
        assert key in env, key
    import torch

    assert env["torch_version"] == torch.__version__ and env["device"] == "cpu" and env["gpu_name"] is None
    assert env["threads"] == 1 and env["dtype"] == "float32"
    assert env["data_files"] == {"generated": CFG["dataset"]} and env["data_verified"] is None
    assert env["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", env["git_commit"])


def test_the_bundled_data_is_traced_by_its_checksum():
    from creditlab.data import MNIST_MINI_FILE, MNIST_MINI_MD5, load_dataset

    d = load_dataset("mnist-mini")
    env = environment({"dtype": "float32", "dataset": "mnist-mini"}, "cpu", d)
    assert env["data_files"] == {MNIST_MINI_FILE: MNIST_MINI_MD5} and env["data_verified"] is True


def test_idx_files_are_traced_by_their_published_checksums(monkeypatch):
    from creditlab import data as data_mod
    from creditlab.data import files

    monkeypatch.setattr(data_mod, "_load_idx_set", lambda *a, **k: data_mod._load_fake({"n": 50, "test": 10})[:4])
    d = data_mod.load_dataset("mnist", val_size=10)
    assert d.provenance == {s.name: s.md5 for s in files.MNIST_FILES} and d.provenance_verified is True


def test_provenance_never_fails_outside_git_or_without_git(tmp_path, monkeypatch):
    assert git_state(tmp_path) == (None, None)
    import subprocess

    def broken(*a, **k):
        raise OSError("no git here")

    monkeypatch.setattr(subprocess, "run", broken)
    env = environment({"dtype": "float64", "dataset": "fake"})
    assert env["git_commit"] is None and env["git_dirty"] is None and env["dtype"] == "float64"


def test_the_comparison_carries_the_runs_environment_and_what_varies(comparison):
    out, summary, _ = comparison
    first = json.loads((out / "bp" / "seed0" / "summary.json").read_text())["environment"]
    assert summary["environment"] == first and summary["environment_varies"] == []
