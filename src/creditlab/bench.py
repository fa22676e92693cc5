"""``creditlab bench``: wall time of one full training step (forward, credit assignment,
optimizer step) of each algorithm against bp, in one process, interleaved (bp, a, b, bp, a,
b, ...), reported as the median over repeats and as a ratio to bp's median. A benchmark, not a
test: targets are read off its output, never asserted."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from creditlab.algorithms import build_algorithm
from creditlab.build import DTYPES, default_dtype
from creditlab.devices import resolve_device
from creditlab.check import make_model
from creditlab.losses import build_loss
from creditlab.models import parse_arch


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def run_bench(algos: list[str], arch: str | None = "784-300-300-100-10", model: str | None = None,
              act: str = "relu", out_act: str = "linear", bias: bool = False, init: str = "normal(0.05)",
              batch: int = 64, loss: str = "mse", dtype: str = "float32", device: str = "cpu",
              repeats: int = 50, warmup: int = 5, lr: float = 5e-4, seed: int = 0,
              in_shape: tuple[int, ...] | None = None, classes: int = 10) -> dict[str, Any]:
    dev, dt = resolve_device(device), DTYPES[dtype]
    specs = ["bp"] + [a for a in algos if a != "bp"]
    if in_shape is None:
        in_shape = (parse_arch(arch)[0],) if arch else (1, 28, 28)
    if arch:
        classes = parse_arch(arch)[-1]
    torch.manual_seed(seed)
    x = torch.rand((batch, *in_shape), device=dev, dtype=dt)
    y = torch.randint(0, classes, (batch,), device=dev)
    runs = []
    for spec in specs:
        torch.manual_seed(seed)
        with default_dtype(dt):  # initialised in the checked dtype, not drawn in float32 and cast
            net = make_model(arch, model, act, out_act, bias, init, tuple(in_shape), classes, algo=specs)
        net = net.to(device=dev, dtype=dt)
        lossf = build_loss(loss)
        algo = build_algorithm(spec, net, lossf)
        groups = [{"params": list(net.parameters())}] + algo.param_groups(lr)
        opt = torch.optim.SGD(groups, lr=lr)
        runs.append((spec, net, algo, opt))

    def one(run) -> float:
        _, _, algo, opt = run
        _sync(dev)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        algo.step(x, y)
        opt.step()
        _sync(dev)
        return time.perf_counter() - t0

    for _ in range(warmup):
        for run in runs:
            one(run)
    times: dict[str, list[float]] = {spec: [] for spec, *_ in runs}
    for _ in range(repeats):
        for run in runs:
            times[run[0]].append(one(run))
    bp_ms = statistics.median(times["bp"]) * 1e3
    results = [{"algo": spec, "ms_per_step": statistics.median(ts) * 1e3,
                "ratio_vs_bp": statistics.median(ts) * 1e3 / bp_ms} for spec, ts in times.items()]
    return {"device": str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "dtype": dtype, "batch": batch,
            "arch": arch, "model": model, "repeats": repeats, "results": results}
