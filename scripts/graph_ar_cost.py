"""The cost model of graph AR on CIFAR ResNets (He et al. 2016, 6n + 2 layers) beside measured
step times: docs/graph_ar.md, "Cost".

For each depth it counts, on the traced graph, the states, the longest path and the vectors
the relaxation's vector-Jacobian products carry in one training step (each unit's VJP applied
to each vector it pushes; the states of the units with parameters asked for, as the step asks),
for ``steps=inf``, ``init=zero`` and ``init=forward`` (T = 100, eta = 0.1, synchronous): as the
closed form makes them (each unit carries the shifts its states below need, or its graded
vectors, whichever are fewer; terms below the dtype's precision dropped), with every unit
carrying its graded vectors (``basis``, the form before the shifts) and with nothing dropped
(``tol=0``, basis); and the same weighted by each Conv2d/Linear unit's multiply-adds, in
backward passes (``steps=inf`` = 1). The counts depend on the graph and, through the
choice of plan (which weighs VJPs against sums by their sizes), on the widths and the input
size, not on the batch or the data: they are taken at full width (16/32/64) on 32x32 inputs,
batch 2 (``--lenet``: also LeNet-5 on 1x28x28). Then
it times whole training steps (forward, credit assignment, SGD step) of bp and the three AR
variants at full width, CIFAR 32x32, batch 64, interleaved, one thread, and reports medians of
wall and of thread CPU time (on a shared machine the CPU time is the steadier of the two).

    OMP_NUM_THREADS=1 python scripts/graph_ar_cost.py --measure 20,32 --repeats 5 > cost.md

``--json`` prints one JSON object instead of the Markdown tables (for ``creditlab results
record``): ``{"batch", "repeats", "warmup", "results": [...]}`` with, per counted model,
``{"kind": "count", "depth": 20 | "lenet5", "states", "longest_path", "float32": {VARIANT:
{"vjps", "passes"}}, "float64": {...}}`` (VARIANT: ``steps_inf``, ``init_zero``,
``init_zero_graded``, ``init_zero_tol0``, ``init_forward``, ``init_forward_graded``,
``init_forward_tol0``), then per timed depth and algorithm ``{"kind": "time", "depth", "algo",
"wall_ms", "cpu_ms", "wall_ratio_vs_bp", "cpu_ratio_vs_bp"}``. An empty ``--depths`` counts no
ResNet (``--depths "" --measure 20,32``: only the timings).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from creditlab.algorithms import build_algorithm  # noqa: E402
from creditlab.algorithms.graph_ar import GraphActivationRelaxation, relax_graph_exact  # noqa: E402
from creditlab.losses import build_loss  # noqa: E402
from creditlab.models.resnet import CifarResNet, _init  # noqa: E402

VARIANTS = {"steps=inf": (math.inf, None), "init=zero": (100, "zero"), "init=forward": (100, "forward")}


def resnet(depth: int, width: int, in_hw: int = 32) -> nn.Module:
    n = (depth - 2) // 6
    return _init(CifarResNet(3, 10, [width, 2 * width, 4 * width], [n, n, n], "A"), "he")


def macs(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Multiply-adds of every Conv2d / Linear module (by qualified name) at input ``x``."""
    out: dict[str, int] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            def hook(mod, inp, res, name=name):
                per = mod.weight[0].numel() if isinstance(mod, nn.Conv2d) else mod.in_features
                out[name] = int(res.numel() // res.shape[0]) * per
            hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return out


def count(depth: int, dtype: torch.dtype, model: nn.Module | None = None, shape: tuple[int, ...] = (3, 32, 32)
          ) -> dict[str, float]:
    """The VJPs of one step of each variant as the training step makes them (the states of the
    units with parameters asked for), with the shifts (the default), with every unit carrying its
    graded vectors (``basis``) and with nothing dropped (``tol=0``, basis)."""
    torch.manual_seed(0)
    model = (resnet(depth, 16) if model is None else model).to(dtype).train()
    x = torch.randn(2, *shape, dtype=dtype)
    y = torch.randint(0, 10, (2,))
    loss = build_loss("mse")
    algo = GraphActivationRelaxation(model, loss, verify="off")
    mac = macs(model, x)
    with torch.no_grad():
        env = algo.forward_values(x)
        rel, _ = algo.build(env, loss.grad(env[algo.out_node.name], y))
    need = {u for u in rel.order if algo._plan.params[u]}
    longest: dict[str, int] = {rel.out: 0}
    for u in reversed(rel.order):
        for p in rel.parents[u]:
            longest[p] = max(longest.get(p, 0), longest[u] + 1)
    row: dict[str, float] = {"depth": depth, "states": len(rel.order), "longest": max(longest.values())}
    for name, (steps, init) in VARIANTS.items():
        opts = [("", {})] if math.isinf(steps) else [("", {}), (",basis", {"shifts": False}),
                                                     (",tol=0", {"shifts": False, "tol": 0.0})]
        for suffix, kw in opts:
            x0 = {u: env[u] for u in rel.free} if init == "forward" else None
            with torch.no_grad():
                relax_graph_exact(rel, x0, steps, 0.1, "synchronous", keep=need, **kw)
            key = name + suffix
            row[key] = sum(rel.rows.values())
            weighted = [(rel.rows.get(u, 0), mac[algo.unit_label(u)]) for u in rel.order
                        if algo.unit_label(u) in mac and rel.push[u].__name__ != "no_push"]
            row[key + ":passes"] = sum(r * m for r, m in weighted) / sum(m for _, m in weighted)
    return row


def measure(depth: int, repeats: int, warmup: int, batch: int) -> dict[str, tuple[float, float]]:
    """Median (wall ms, thread-CPU ms) of a training step per algorithm, interleaved."""
    specs = ["bp", "ar:steps=inf", "ar:init=zero", "ar"]
    x = torch.rand(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    runs = []
    for spec in specs:
        torch.manual_seed(0)
        net = resnet(depth, 16)
        algo = build_algorithm(spec, net, build_loss("mse"))
        runs.append((spec, algo, torch.optim.SGD(net.parameters(), lr=5e-4)))
    times: dict[str, list[tuple[float, float]]] = {s: [] for s in specs}
    for i in range(warmup + repeats):
        for spec, algo, opt in runs:
            w, c = time.perf_counter(), time.thread_time()
            opt.zero_grad(set_to_none=True)
            algo.step(x, y)
            opt.step()
            if i >= warmup:
                times[spec].append((time.perf_counter() - w, time.thread_time() - c))
    return {s: (statistics.median(t[0] for t in ts) * 1e3, statistics.median(t[1] for t in ts) * 1e3)
            for s, ts in times.items()}


#: the JSON names of count()'s keys (a dotted path cannot hold "=" and "," readably)
_JSON_KEYS = {"steps=inf": "steps_inf", "init=zero": "init_zero", "init=zero,basis": "init_zero_graded",
              "init=zero,tol=0": "init_zero_tol0", "init=forward": "init_forward",
              "init=forward,basis": "init_forward_graded", "init=forward,tol=0": "init_forward_tol0"}


def _count_entry(d: int | str, r: dict[str, float], r64: dict[str, float]) -> dict:
    def variants(row: dict[str, float]) -> dict:
        return {name: {"vjps": int(row[key]), "passes": row[key + ":passes"]} for key, name in _JSON_KEYS.items()}
    return {"kind": "count", "depth": d, "states": int(r["states"]), "longest_path": int(r["longest"]),
            "float32": variants(r), "float64": variants(r64)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", default="20,32,44,56,110", help="depths to count (comma-separated; empty: none)")
    ap.add_argument("--measure", default="20", help="depths to time (comma-separated; empty: none)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lenet", action="store_true", help="also count lenet5 (1x28x28)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of Markdown tables")
    args = ap.parse_args()
    torch.set_num_threads(1)
    depths = [int(d) for d in args.depths.split(",") if d]
    entries: list[dict] = []
    rows32 = {d: count(d, torch.float32) for d in depths}
    rows64 = {d: count(d, torch.float64) for d in depths}
    if args.lenet:
        from creditlab.models import build_named_model
        torch.manual_seed(0)
        rows32["lenet5"] = count(0, torch.float32, build_named_model("lenet5", (1, 28, 28), 10), (1, 28, 28))
        rows64["lenet5"] = count(0, torch.float64, build_named_model("lenet5", (1, 28, 28), 10), (1, 28, 28))
    if rows32 and not args.json:
        print("| depth | states | longest path | `steps=inf` | `init=zero` float32 (basis; tol=0) | float64 "
              "| `init=forward` float32 (basis; tol=0) | float64 |")
        print("|---|---|---|---|---|---|---|---|")
    for d in rows32:
        r, r64 = rows32[d], rows64[d]
        entries.append(_count_entry(d, r, r64))
        if args.json:
            continue

        def cell(key: str, r=r) -> str:
            return f"{r[key]:.0f} / {r[key + ':passes']:.1f}"
        print(f"| {d} | {r['states']:.0f} | {r['longest']:.0f} | {cell('steps=inf')} "
              f"| {cell('init=zero')} ({cell('init=zero,basis')}; {cell('init=zero,tol=0')}) | {cell('init=zero', r64)} "
              f"| {cell('init=forward')} ({cell('init=forward,basis')}; {cell('init=forward,tol=0')}) "
              f"| {cell('init=forward', r64)} |")
    measured = [int(d) for d in args.measure.split(",") if d]
    if measured and not args.json:
        print()
        print(f"| depth | bp ms (wall / CPU) | `ar:steps=inf` | `ar:init=zero` | `ar` (init=forward) |  "
              f"(ratio to bp: wall / CPU; batch {args.batch}, float32, median of {args.repeats})")
        print("|---|---|---|---|---|")
    for d in measured:
        t = measure(d, args.repeats, args.warmup, args.batch)
        bw, bc = t["bp"]
        entries += [{"kind": "time", "depth": d, "algo": s, "wall_ms": w, "cpu_ms": c, "wall_ratio_vs_bp": w / bw,
                     "cpu_ratio_vs_bp": c / bc} for s, (w, c) in t.items()]
        if not args.json:
            cells = [f"{t[s][0] / bw:.2f}x / {t[s][1] / bc:.2f}x" for s in ("ar:steps=inf", "ar:init=zero", "ar")]
            print(f"| {d} | {bw:.0f} / {bc:.0f} | " + " | ".join(cells) + " |", flush=True)
    if args.json:
        print(json.dumps({"batch": args.batch, "repeats": args.repeats, "warmup": args.warmup, "results": entries},
                         indent=2))


if __name__ == "__main__":
    main()
