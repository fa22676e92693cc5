"""Devices: a device that is not there is a clear error on every command (never a silent fall
back to the CPU); the data set is moved and converted once; --deterministic is honoured."""

import pytest
import torch
import yaml

from creditlab.devices import resolve_device
from creditlab.cli import main
from creditlab.data import batch_indices, load_dataset
from creditlab.errors import ConfigError
from creditlab.train import train

SMALL = {"dataset": "fake:n=120,shape=1x4x4,classes=3,test=30", "model": {"arch": "16-8-3", "act": "tanh"},
         "epochs": 1, "batch_size": 16, "log_every": 0, "threads": 1}
NO_CUDA = not torch.cuda.is_available()


@pytest.mark.skipif(not NO_CUDA, reason="this machine has a GPU: asking for one is not an error here")
@pytest.mark.parametrize("command", [
    ["train", "--algo", "bp", "--epochs", "1"],
    ["compare", "--algos", "bp", "--epochs", "1"],
    ["check", "--algo", "ar", "--arch", "6-4-3"],
    ["relax", "--arch", "6-4-3", "--steps", "2"],
    ["bench", "--algos", "ar", "--arch", "6-4-3", "--repeats", "1", "--warmup", "0"],
    ["search", "--trials", "1", "--epochs", "1"],
])
def test_every_command_refuses_a_missing_gpu_by_name(command, tmp_path, capsys):
    code = main(command + ["--device", "cuda", *(["--out", str(tmp_path / "o")] if command[0] in
                                                  ("train", "compare", "relax", "search") else [])])
    err = capsys.readouterr().err
    assert code == 2 and "'cuda'" in err and "not available" in err
    assert not (tmp_path / "o" / "checkpoint.pt").exists()


def test_device_names_are_checked():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="not a device name"):
        resolve_device("gpu0")


def test_the_data_set_is_moved_and_converted_once_before_training(tmp_path):
    data = load_dataset(SMALL["dataset"])
    assert data.x_train.dtype == torch.float32
    train(dict(SMALL, dtype="float64"), tmp_path, progress=False, data=data)
    assert data.x_train.dtype == torch.float64 and data.y_train.dtype == torch.int64  # converted in place, once
    assert data.x_test.dtype == torch.float64


def test_batch_order_is_the_same_on_every_device():
    a = batch_indices(50, 16, seed=3, epoch=2)
    b = batch_indices(50, 16, seed=3, epoch=2, device="cpu")
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and sorted(torch.cat(a).tolist()) == list(range(50))


def test_deterministic_mode_is_switched_on_for_the_run_and_gives_the_same_numbers(tmp_path):
    try:
        plain = train(SMALL, tmp_path / "a", progress=False)
        det = train(dict(SMALL, deterministic=True), tmp_path / "b", progress=False)
        assert torch.are_deterministic_algorithms_enabled()
        assert det["test_accuracy"] == plain["test_accuracy"] and det["train_loss"] == plain["train_loss"]
        train(SMALL, tmp_path / "c", progress=False)
        assert not torch.are_deterministic_algorithms_enabled()  # a later run without it switches it off
    finally:
        torch.use_deterministic_algorithms(False)


def test_cli_deterministic_flag_reaches_the_config(tmp_path, capsys):
    try:
        cfg = tmp_path / "c.yaml"
        cfg.write_text(yaml.safe_dump(SMALL))
        code = main(["train", "--config", str(cfg), "--out", str(tmp_path / "o"), "--quiet", "--deterministic"])
        assert code == 0 and "deterministic: true" in (tmp_path / "o" / "config.yaml").read_text()
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("command", ["check", "bench"])
def test_check_and_bench_build_the_model_in_the_requested_dtype(command):
    """An initialisation is drawn in the dtype asked for (float64 orthogonal weights are exactly
    orthogonal), not drawn in float32 and cast."""
    from creditlab.bench import run_bench
    from creditlab.check import run_check
    from tests import dtype_probe

    dtype_probe.BUILT_UNDER.clear()
    if command == "check":
        run_check("bp", model="tests.dtype_probe:make", in_shape=(1, 2, 2), classes=3, batch=4, dtype="float64")
    else:
        run_bench(["bp"], arch=None, model="tests.dtype_probe:make", in_shape=(1, 2, 2), classes=3, batch=4, dtype="float64",
                  repeats=1, warmup=0)
    assert dtype_probe.BUILT_UNDER and set(dtype_probe.BUILT_UNDER) == {torch.float64}
    assert torch.get_default_dtype() == torch.float32
