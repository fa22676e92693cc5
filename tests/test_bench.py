"""creditlab bench: the memory it reports (each algorithm in a fresh process), its JSON, the
LocallyConnected2d-against-Conv2d layer mode, and one line for every bad input. No timed
assertions: only the fields and the memory that must be resident are checked."""

import json

import pytest

from creditlab.bench import measure_memory, run_bench, table3_layers
from creditlab.cli import main
from creditlab.errors import CreditlabError
from creditlab.models import build_named_model
from creditlab.models.bartunov import TABLE3
from creditlab.models.locally_connected import LocallyConnected2d

MEMORY_FIELDS = {"measure", "setup_bytes", "peak_bytes", "step_bytes", "steps"}


def run(args, capsys):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(code, err):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("creditlab: "), err
    return lines[0]


def test_bench_json_carries_each_algorithms_memory(capsys):
    code, out, _ = run(["bench", "--algos", "bp,fa", "--arch", "20-16-4", "--repeats", "1", "--warmup", "0",
                        "--memory-steps", "2", "--json"], capsys)
    assert code == 0
    res = json.loads(out)
    assert [r["algo"] for r in res["results"]] == ["bp", "fa"] and res["memory_steps"] == 2
    for r in res["results"]:
        m = r["memory"]
        assert set(m) >= MEMORY_FIELDS and m["steps"] == 2
        assert all(isinstance(m[k], int) for k in ("setup_bytes", "peak_bytes", "step_bytes"))
        assert 0 < m["setup_bytes"] <= m["peak_bytes"] and m["step_bytes"] == m["peak_bytes"] - m["setup_bytes"]


def test_bench_without_memory_reports_times_only(capsys):
    code, out, _ = run(["bench", "--algos", "bp", "--arch", "20-16-4", "--repeats", "1", "--warmup", "0",
                        "--no-memory", "--json"], capsys)
    res = json.loads(out)
    assert code == 0 and res["memory_steps"] is None and "memory" not in res["results"][0]


def test_bench_text_output_shows_peak_and_step_memory(capsys):
    code, out, _ = run(["bench", "--algos", "bp", "--arch", "20-16-4", "--repeats", "1", "--warmup", "0"], capsys)
    assert code == 0
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("bp "))
    assert "peak" in line and line.count("MiB") == 2


def test_a_wider_model_reports_at_least_its_extra_parameters_and_gradients_in_memory():
    """bp on 784-2048-2048-2048-10 against 784-64-64-64-10: the model's parameters are resident
    from the setup on and bp writes a gradient for each, so the peak grows by at least twice the
    extra parameter bytes and the step's memory by at least the extra gradient bytes."""
    def params(w):
        return 784 * w + 2 * w * w + w * 10

    mem = {w: run_bench(["bp"], arch=f"784-{w}-{w}-{w}-10", repeats=1, warmup=0, threads=1)["results"][0]["memory"]
           for w in (64, 2048)}
    extra = (params(2048) - params(64)) * 4  # float32
    assert mem[2048]["peak_bytes"] - mem[64]["peak_bytes"] >= 2 * extra
    assert mem[2048]["step_bytes"] - mem[64]["step_bytes"] >= extra
    assert mem[2048]["setup_bytes"] - mem[64]["setup_bytes"] >= 0.9 * extra  # resident, up to the page rounding


def test_adam_adds_its_two_moments_per_parameter_to_the_step_memory():
    arch, params = "784-2048-2048-10", 784 * 2048 + 2048 * 2048 + 2048 * 10
    mem = {opt: run_bench(["bp"], arch=arch, repeats=1, warmup=0, threads=1, optimizer=opt)["results"][0]["memory"]
           for opt in ("sgd", "adam")}
    assert mem["adam"]["step_bytes"] - mem["sgd"]["step_bytes"] >= 2 * params * 4


def test_a_memory_measurement_that_fails_in_its_process_is_one_error_naming_the_algorithm():
    job = {"problem": {"arch": "6-4-3", "model": None, "act": "relu", "out_act": "linear", "bias": False,
                       "init": "normal(0.05)", "batch": 2, "loss": "mse", "lr": 1e-3, "seed": 0, "in_shape": None,
                       "classes": 3, "specs": ["bp"]}, "device": "cpu", "dtype": "float32", "steps": 1, "threads": 1}
    with pytest.raises(CreditlabError, match=r"measuring the memory of 'no-such-algo' in a fresh process failed: "
                                             r".*no-such-algo.*; rerun with --no-memory"):
        measure_memory("no-such-algo", job)


def test_lc_layers_are_the_table3_layers_of_the_lc_models(capsys):
    """The rows of bench --lc-layers have the shapes of the LC layers of mnist-lc and cifar-lc."""
    code, out, _ = run(["bench", "--lc-layers", "mnist,cifar", "--batch", "2", "--repeats", "1", "--warmup", "0",
                        "--json"], capsys)
    assert code == 0
    rows = json.loads(out)["layers"]
    want = []
    for name, shape in (("mnist-lc", (1, 28, 28)), ("cifar-lc", (3, 32, 32))):
        net = build_named_model(name, shape, 10)
        want += [([m.in_channels, *m.in_size], [m.out_channels, *m.out_size], m.kernel_size[0], m.stride[0],
                  sum(p.numel() for p in m.parameters()))
                 for m in net.modules() if isinstance(m, LocallyConnected2d)]
    got = [(r["in_shape"], r["out_shape"], r["kernel"], r["stride"], r["lc_params"]) for r in rows]
    assert got == want
    assert [r["layer"] for r in rows] == ["mnist-1", "mnist-2", "cifar-1", "cifar-2", "cifar-3"]
    assert all(r["conv_ms"] > 0 and r["lc_ms"] > 0 and r["ratio"] == pytest.approx(r["lc_ms"] / r["conv_ms"])
               for r in rows)


def test_table3_layers_cover_every_lc_layer_of_table3():
    rows = table3_layers(["mnist", "cifar", "imagenet"])
    assert len(rows) == sum(len(TABLE3[t][0]) for t in ("mnist", "cifar", "imagenet")) == 12
    assert rows[-1] == {"layer": "imagenet-7", "in_shape": [192, 7, 7], "kernel": 3, "channels": 384, "stride": 1}


@pytest.mark.parametrize("args,message", [
    (["--memory-steps", "0"], "argument --memory-steps: 0 must be >= 1"),
    (["--threads", "0"], "argument --threads: 0 must be >= 1"),
    (["--clock", "sundial"], "--clock 'sundial'; valid: wall, cpu"),
    (["--optimizer", "lbfgs"], "--optimizer 'lbfgs'; valid: sgd, adam"),
    (["--dtype", "float16"], "--dtype 'float16'; valid: float32, float64"),
    (["--lc-layers", "mnist,svhn"], "--lc-layers mnist,svhn: give Table 3 networks among mnist, cifar, imagenet"),
    (["--lc-layers", "--algos", "bp,fa"], "bench --lc-layers times single layers, not algorithms; drop --algos"),
    (["--lc-layers", "mnist", "--model", "mnist-lc"], "drop --model"),
])
def test_bench_bad_input_is_one_line(args, message, capsys):
    code, _, err = run(["bench", "--arch", "6-4-3", "--repeats", "1", "--warmup", "0", "--no-memory", *args], capsys)
    assert message in one_line_error(code, err)
