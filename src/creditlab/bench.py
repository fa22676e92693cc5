"""``creditlab bench``: the cost of one full training step (forward, credit assignment,
optimizer step) of each algorithm against bp. A benchmark, not a test: targets are read off
its output, never asserted.

Time: every algorithm in one process, interleaved (bp, a, b, bp, a, b, ...), reported as the
median over repeats and as a ratio to bp's median.

Memory: every algorithm in a fresh process of its own (``python -m creditlab.bench`` reading its
job on stdin), which builds the model and the batch exactly as the timing does, then the
algorithm and its optimizer, and runs a few steps. On a CPU it reads the process's resident set
from ``/proc/self/status``: ``setup_bytes`` is VmRSS once the model and the batch exist (Python,
torch's libraries, the model's parameters, the batch), ``peak_bytes`` the high-water mark VmHWM,
reset to the current RSS at that point (``/proc/self/clear_refs``), over building the algorithm
and the optimizer and the steps, and ``step_bytes`` their difference: what training adds to the
model and data (gradients, the algorithm's own state such as feedback matrices or inverses,
optimizer state, a step's transient tensors). ``getrusage``'s ``ru_maxrss`` is not used on
Linux: a child inherits its parent's high-water mark across ``exec``. On CUDA the same three
numbers come from the caching allocator (``memory_allocated`` after the setup,
``max_memory_allocated`` after ``reset_peak_memory_stats``), which counts tensors only, not the
CUDA context; ``reserved_peak_bytes`` is the allocator's peak reservation.

LC layers (``creditlab bench --lc-layers``): forward + backward of ``LocallyConnected2d``
against ``nn.Conv2d`` of the same shape, for every layer of Bartunov et al.'s Table 3,
interleaved in one process.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from creditlab.algorithms import build_algorithm
from creditlab.build import DTYPES, default_dtype
from creditlab.check import make_model
from creditlab.devices import resolve_device
from creditlab.errors import ConfigError, CreditlabError
from creditlab.losses import build_loss
from creditlab.models import parse_arch

#: the input shape of each Table 3 network (ImageNet: resized to 224 x 224, Bartunov et al. §3.3)
TABLE3_INPUTS = {"mnist": (1, 28, 28), "cifar": (3, 32, 32), "imagenet": (3, 224, 224)}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[dtype]


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _clock(clock: str, dev: torch.device):
    """``wall``: elapsed time; ``cpu``: this process's CPU time (all its threads), which on a shared
    machine leaves out the time other processes held the cores (with one thread, the step's own work)."""
    if clock not in CLOCKS:
        raise ConfigError(f"--clock {clock!r}; valid: {', '.join(CLOCKS)}")
    if clock == "cpu" and dev.type != "cpu":
        raise ConfigError(f"--clock cpu times CPU work, not {dev.type} kernels; use --clock wall on {dev}")
    return CLOCKS[clock]


def _threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"--threads {threads}: give 1 or more")
        torch.set_num_threads(threads)


def _problem(p: dict[str, Any], dev: torch.device, dt: torch.dtype):
    """(model, inputs, labels) of a bench problem ``p`` (the keyword arguments of run_bench), seeded."""
    in_shape, classes, arch = p["in_shape"], p["classes"], p["arch"]
    if in_shape is None:
        in_shape = (parse_arch(arch)[0],) if arch else (1, 28, 28)
    if arch:
        classes = parse_arch(arch)[-1]
    torch.manual_seed(p["seed"])
    x = torch.rand((p["batch"], *in_shape), device=dev, dtype=dt)
    y = torch.randint(0, classes, (p["batch"],), device=dev)
    torch.manual_seed(p["seed"])
    with default_dtype(dt):  # initialised in the checked dtype, not drawn in float32 and cast
        net = make_model(arch, p["model"], p["act"], p["out_act"], p["bias"], p["init"], tuple(in_shape), classes,
                         algo=p["specs"])
    return net.to(device=dev, dtype=dt), x, y


#: the optimizers a bench step may use (plain SGD keeps no state; Adam two moments per parameter)
OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}


def _trainer(spec: str, net: nn.Module, p: dict[str, Any]):
    lossf = build_loss(p["loss"])
    algo = build_algorithm(spec, net, lossf)
    groups = [{"params": list(net.parameters())}] + algo.param_groups(p["lr"])
    return algo, OPTIMIZERS[p.get("optimizer", "sgd")](groups, lr=p["lr"])


def _step(algo, opt, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    algo.step(x, y)
    opt.step()


def run_bench(algos: list[str], arch: str | None = "784-300-300-100-10", model: str | None = None,
              act: str = "relu", out_act: str = "linear", bias: bool = False, init: str = "normal(0.05)",
              batch: int = 64, loss: str = "mse", dtype: str = "float32", device: str = "cpu",
              repeats: int = 50, warmup: int = 5, lr: float = 5e-4, seed: int = 0,
              in_shape: tuple[int, ...] | None = None, classes: int = 10, memory: bool = True,
              memory_steps: int = 3, threads: int | None = None, clock: str = "wall",
              optimizer: str = "sgd") -> dict[str, Any]:
    """Time every algorithm of ``algos`` (bp first) in this process and, with ``memory``, measure
    each one's memory in a fresh process (module docstring)."""
    dev, dt = resolve_device(device), _dtype(dtype)
    now = _clock(clock, dev)
    if memory_steps < 1:
        raise ConfigError(f"memory_steps={memory_steps}: give 1 or more")
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"--optimizer {optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
    _threads(threads)
    specs = ["bp"] + [a for a in algos if a != "bp"]
    p = {"arch": arch, "model": model, "act": act, "out_act": out_act, "bias": bias, "init": init, "batch": batch,
         "loss": loss, "lr": lr, "seed": seed, "in_shape": None if in_shape is None else list(in_shape),
         "classes": classes, "specs": specs, "optimizer": optimizer}
    runs = []
    for spec in specs:
        net, x, y = _problem(p, dev, dt)
        runs.append((spec, *_trainer(spec, net, p)))

    def one(run) -> float:
        _, algo, opt = run
        _sync(dev)
        t0 = now()
        _step(algo, opt, x, y)
        _sync(dev)
        return now() - t0

    for _ in range(warmup):
        for run in runs:
            one(run)
    times: dict[str, list[float]] = {spec: [] for spec, *_ in runs}
    for _ in range(repeats):
        for run in runs:
            times[run[0]].append(one(run))
    del runs
    bp_ms = statistics.median(times["bp"]) * 1e3
    results = [{"algo": spec, "ms_per_step": statistics.median(ts) * 1e3,
                "ratio_vs_bp": statistics.median(ts) * 1e3 / bp_ms} for spec, ts in times.items()]
    if memory:
        job = {"problem": p, "device": str(dev), "dtype": dtype, "steps": memory_steps,
               "threads": torch.get_num_threads()}
        for r in results:
            r["memory"] = measure_memory(r["algo"], job)
    return {"device": _device_name(dev), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "dtype": dtype, "batch": batch, "arch": arch, "model": model, "optimizer": optimizer, "lr": lr,
            "repeats": repeats, "clock": clock,
            "memory_steps": memory_steps if memory else None, "results": results}


def _device_name(dev: torch.device) -> str:
    return str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev)


# ---- memory: one fresh process per algorithm ---------------------------------------------------
def measure_memory(spec: str, job: dict[str, Any]) -> dict[str, Any]:
    """Setup, peak and per-step bytes of ``spec`` on ``job``'s problem, in a fresh Python process."""
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-m", "creditlab.bench", "--memory-child"],
                          input=json.dumps(job | {"spec": spec}), capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        why = (f"killed by signal {-proc.returncode}{' (out of memory?)' if proc.returncode == -9 else ''}"
               if proc.returncode < 0 else (proc.stderr.strip().splitlines() or ["no message"])[-1])
        raise CreditlabError(f"bench: measuring the memory of {spec!r} in a fresh process failed: {why}; "
                             "rerun with --no-memory to time only")
    return json.loads(proc.stdout.strip().splitlines()[-1])


_STATUS = Path("/proc/self/status")


def _status_kib(field: str) -> int:
    m = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    if m is None:
        raise RuntimeError(f"no {field} in {_STATUS}")
    return int(m.group(1))


def _reset_rss_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM := VmRSS
    except OSError:
        return False
    return True


def _warm(dev: torch.device, dt: torch.dtype) -> None:
    """What a process does once, on first use, whatever it trains: an optimizer's first construction
    imports torch's compiler stack (about 70 MB here), the first backward pass starts autograd's
    machinery. Done before the baseline, so that it does not count as the algorithm's memory."""
    q = nn.Parameter(torch.ones(4, 4, device=dev, dtype=dt))
    opt = torch.optim.SGD([q], lr=0.1)
    (q @ q).sum().backward()
    opt.step()


def _memory_child(job: dict[str, Any]) -> dict[str, Any]:
    """The measurement itself, run in the fresh process."""
    dev, dt = torch.device(job["device"]), DTYPES[job["dtype"]]
    torch.set_num_threads(job["threads"])
    p = job["problem"]
    cuda = dev.type == "cuda"
    _warm(dev, dt)
    net, x, y = _problem(p, dev, dt)
    if cuda:
        torch.cuda.synchronize(dev)
        setup = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    elif _STATUS.exists():
        setup = _status_kib("VmRSS") * 1024
        reset = _reset_rss_peak()
    else:  # no /proc (macOS): getrusage's peak, in bytes there
        import resource

        setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    algo, opt = _trainer(job["spec"], net, p)
    for _ in range(job["steps"]):
        _step(algo, opt, x, y)
    if cuda:
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)
        return {"measure": "cuda allocator (max_memory_allocated)", "setup_bytes": setup, "peak_bytes": peak,
                "step_bytes": peak - setup, "reserved_peak_bytes": torch.cuda.max_memory_reserved(dev),
                "steps": job["steps"]}
    if _STATUS.exists():
        peak = _status_kib("VmHWM") * 1024
        what = "resident set (VmRSS, VmHWM)" if reset else "resident set (VmRSS, VmHWM not reset: includes the setup's peak)"
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        what = "resident set (ru_maxrss)"
    return {"measure": what, "setup_bytes": setup, "peak_bytes": peak, "step_bytes": peak - setup,
            "steps": job["steps"]}


# ---- LocallyConnected2d against Conv2d ---------------------------------------------------------
def table3_layers(tables: list[str]) -> list[dict[str, Any]]:
    """Every LC layer of the Table 3 networks ``tables``: name, input (C, H, W), kernel, channels, stride."""
    from creditlab.models.bartunov import TABLE3

    unknown = [t for t in tables if t not in TABLE3_INPUTS]
    if unknown or not tables:
        raise ConfigError(f"--lc-layers {','.join(tables)}: give Table 3 networks among {', '.join(TABLE3_INPUTS)}")
    layers = []
    for t in tables:
        c, h, w = TABLE3_INPUTS[t]
        for i, (k, o, s) in enumerate(TABLE3[t][0], 1):
            layers.append({"layer": f"{t}-{i}", "in_shape": [c, h, w], "kernel": k, "channels": o, "stride": s})
            c, h, w = o, (h + 2 * (k // 2) - k) // s + 1, (w + 2 * (k // 2) - k) // s + 1
    return layers


def run_lc_layers(tables: list[str], batch: int = 128, dtype: str = "float32", device: str = "cpu",
                  repeats: int = 10, warmup: int = 2, seed: int = 0, threads: int | None = None,
                  clock: str = "wall") -> dict[str, Any]:
    """Forward + backward (input, weight and bias gradients) of LocallyConnected2d and of
    nn.Conv2d with the same channels, kernel, stride and zero padding kernel//2, interleaved
    (conv, LC, conv, LC, ...) per layer; medians and the LC/conv ratio."""
    from creditlab.models.locally_connected import LocallyConnected2d

    dev, dt = resolve_device(device), _dtype(dtype)
    now = _clock(clock, dev)
    _threads(threads)
    layers = table3_layers(tables)
    fk = {"device": dev, "dtype": dt}
    for row in layers:
        (c, h, w), k, o, s = row["in_shape"], row["kernel"], row["channels"], row["stride"]
        torch.manual_seed(seed)
        lc = LocallyConnected2d(c, o, k, s, in_size=(h, w), **fk)
        conv = nn.Conv2d(c, o, k, s, padding=k // 2, **fk)
        x = torch.randn(batch, c, h, w, **fk).requires_grad_(True)
        g = torch.randn(batch, o, *lc.out_size, **fk)

        def one(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> float:
            x.grad = None
            layer.zero_grad(set_to_none=True)
            _sync(dev)
            t0 = now()
            layer(x).backward(g)
            _sync(dev)
            return now() - t0

        for _ in range(warmup):
            one(conv, x, g), one(lc, x, g)
        tc, tl = [], []
        for _ in range(repeats):
            tc.append(one(conv, x, g))
            tl.append(one(lc, x, g))
        conv_ms, lc_ms = statistics.median(tc) * 1e3, statistics.median(tl) * 1e3
        row.update(out_shape=[o, *lc.out_size], lc_params=sum(q.numel() for q in lc.parameters()),
                   conv_ms=conv_ms, lc_ms=lc_ms, ratio=lc_ms / conv_ms)
        del lc, conv, x, g
    return {"device": _device_name(dev), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "dtype": dtype, "batch": batch, "repeats": repeats, "clock": clock, "layers": layers}


if __name__ == "__main__" and sys.argv[1:] == ["--memory-child"]:
    print(json.dumps(_memory_child(json.loads(sys.stdin.read()))))
