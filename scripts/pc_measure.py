"""Measurements of predictive coding (``pc``) for docs/predictive_coding.md.

``--gap``: on the AR paper's MLP (784-300-300-100-10, ReLU (``--act``), xavier, no biases) and one MNIST
training batch of 64 (float64), the relative error ||u - g|| / ||g|| and the angle between the
whole update u and autograd's gradient g, with the energy F/N before and after the relaxation:
the standard variant at several T, the standard variant as the output precision gamma shrinks
(the limit in which it equals backprop), the standard variant with the target moved toward the
output instead (which is not that limit), and the fixed-prediction variant at several T.

``--cost``: whole training steps (forward, credit assignment, SGD step) of bp and the pc
variants on the same MLP in float32, batch 64, interleaved, one thread; medians of wall time and
of thread CPU time (on a shared machine the CPU time is the steadier of the two).

    CREDITLAB_DATA=/work/shared/data python scripts/pc_measure.py --gap --loss cross_entropy
    python scripts/pc_measure.py --cost --repeats 20
    python scripts/pc_measure.py --cost --model lenet5 --repeats 10 --algos pc:steps=20,pc:fixed_prediction=true,steps=20

``--json`` prints the numbers as one JSON object instead of the Markdown tables: ``--gap`` gives
``{..., "results": [{algo, case, group, rel_error, angle_deg, energy_first, energy_last, ...}]}``,
``--cost`` ``{..., "results": [{algo, wall_ms, wall_ratio_vs_bp, cpu_ms, cpu_ratio_vs_bp,
cpu_per_step_vs_bp}]}``, both ``{"gap": ..., "cost": ...}`` (for ``creditlab results record``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

from creditlab.algorithms import build_algorithm
from creditlab.losses import as_targets, build_loss
from creditlab.models import MLP

ARCH = [784, 300, 300, 100, 10]


ACT = "relu"


def _model(dtype: torch.dtype, seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP(ARCH, ACT, "linear", bias=False, init="xavier").to(dtype)


def _batch(n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    if os.environ.get("CREDITLAB_DATA"):
        from creditlab.data import load_dataset

        d = load_dataset("mnist")
        return d.x_train[:n].reshape(n, -1).to(dtype), d.y_train[:n]
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, ARCH[0], generator=g, dtype=dtype), torch.randint(0, ARCH[-1], (n,), generator=g)


def _flat(model: MLP) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _compare(spec: str, model: MLP, loss, x, target, ref: torch.Tensor) -> dict:
    algo = build_algorithm(spec, model, loss)
    model.zero_grad(set_to_none=True)
    algo.step(x, target)
    u = _flat(model)
    rel = float((u - ref).norm() / ref.norm())
    cos = float(u @ ref / (u.norm() * ref.norm()))
    ang = math.degrees(math.acos(max(-1.0, min(1.0, cos))))
    d = algo.diagnostics()
    return {"algo": spec, "rel_error": rel, "angle_deg": ang, "energy_first": d["pc_energy_first"],
            "energy_last": d["pc_energy_last"], "energy_rises": int(d.get("pc_energy_rises") or 0),
            "energy_max_rise": d.get("pc_energy_max_rise")}


def _line(r: dict) -> str:
    rises = (f" (rises at {r['energy_rises']} steps, at most {r['energy_max_rise']:.1e} of F)"
             if r["energy_rises"] else "")
    case = f" {r['case']}" if r["case"] != "target" else ""
    return (f"| `{r['algo']}`{case} | {r['rel_error']:.3e} | {r['angle_deg']:.3f} | {r['energy_first']:.4g} | "
            f"{r['energy_last']:.4g}{rises} |")


def gap(loss_spec: str) -> dict:
    dt = torch.float64
    model, loss = _model(dt), build_loss(loss_spec)
    x, y = _batch(64, dt)

    def ref_for(target) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        loss(model(x), target).backward()
        return _flat(model).clone()

    ref = ref_for(y)
    groups: list[tuple[str, list[dict]]] = []
    rows = [_compare(spec, model, loss, x, y, ref) for spec in ("pc:steps=20", "pc:steps=100", "pc:steps=500")]
    groups.append(("standard variant, T steps", rows))
    rows = [_compare(f"pc:steps=500,output_precision={gamma}", model, loss, x, y, ref) for gamma in (1.0, 0.1, 0.01, 0.001)]
    groups.append(("standard variant, output precision gamma (T = 500)", rows))
    with torch.no_grad():
        out = model(x)
        p = torch.softmax(out, 1) if loss.name == "cross_entropy" else out
        onehot = as_targets(y, out)
    rows = []
    for beta in (1.0, 0.1, 0.01, 0.001):
        t = p + beta * (onehot - p)
        rows.append(dict(_compare("pc:steps=500", model, loss, x, t, ref_for(t)), case=f"beta={beta}"))
    groups.append(("standard variant, target moved toward the output, t = p + beta (onehot - p) (T = 500; "
                   "bp on the same target)", rows))
    rows = [_compare(spec, model, loss, x, y, ref) for spec in ("pc:fixed_prediction=true,steps=20",
                                                                "pc:fixed_prediction=true,steps=100",
                                                                "pc:fixed_prediction=true,steps=inf")]
    groups.append(("fixed-prediction variant", rows))
    for _, rows in groups:
        for r in rows:
            r.setdefault("case", "target")
    return {"loss": loss.spec(), "batch": x.shape[0], "data": "MNIST" if os.environ.get("CREDITLAB_DATA") else "random",
            "groups": [g for g, _ in groups], "results": [dict(r, group=g) for g, rows in groups for r in rows]}


def print_gap(res: dict) -> None:
    head = "| spec | rel. error to bp | angle (deg) | F/N first | F/N last |\n|---|---|---|---|---|"
    print(f"loss {res['loss']}, batch {res['batch']} ({res['data']})")
    for g in res["groups"]:
        print(f"\n{g}:\n{head}")
        for r in res["results"]:
            if r["group"] == g:
                print(_line(r))


def cost(specs: list[str], repeats: int, warmup: int, model_name: str | None = None) -> dict:
    torch.set_num_threads(1)
    dt = torch.float32
    x, y = _batch(64, dt)
    make = _model
    if model_name:  # a built-in model on MNIST-shaped input, e.g. lenet5
        from creditlab.models import build_named_model

        x = x.reshape(64, 1, 28, 28)

        def make(dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
            torch.manual_seed(seed)
            return build_named_model(model_name, (1, 28, 28), ARCH[-1]).to(dtype)
    runs = []
    for spec in ["bp"] + specs:
        model = make(dt)
        algo = build_algorithm(spec, model, build_loss("mse"))
        runs.append((spec, algo, torch.optim.SGD(model.parameters(), lr=5e-4)))

    def one(run) -> tuple[float, float]:
        _, algo, opt = run
        w, c = time.perf_counter(), time.thread_time()
        opt.zero_grad(set_to_none=True)
        algo.step(x, y)
        opt.step()
        return time.perf_counter() - w, time.thread_time() - c

    for _ in range(warmup):
        for run in runs:
            one(run)
    wall: dict[str, list[float]] = {s: [] for s, *_ in runs}
    cpu: dict[str, list[float]] = {s: [] for s, *_ in runs}
    for _ in range(repeats):
        for run in runs:
            w, c = one(run)
            wall[run[0]].append(w)
            cpu[run[0]].append(c)
    bw, bc = statistics.median(wall["bp"]), statistics.median(cpu["bp"])
    results = []
    for s, ws in wall.items():
        mw, mc = statistics.median(ws), statistics.median(cpu[s])
        steps = runs[list(wall).index(s)][1].options.get("steps") if s != "bp" else None
        results.append({"algo": s, "wall_ms": mw * 1e3, "wall_ratio_vs_bp": mw / bw, "cpu_ms": mc * 1e3,
                        "cpu_ratio_vs_bp": mc / bc,
                        "cpu_per_step_vs_bp": mc / bc / steps if steps and math.isfinite(steps) else None})
    return {"model": model_name or "the AR MLP", "threads": 1, "dtype": "float32", "batch": 64, "loss": "mse",
            "repeats": repeats, "warmup": warmup, "results": results}


def print_cost(res: dict) -> None:
    print(f"{res['model']}, one thread, float32, batch 64, mse, median of {res['repeats']} interleaved steps\n")
    print("| spec | wall ms | wall / bp | CPU ms | CPU / bp | CPU / (T bp) |\n|---|---|---|---|---|---|")
    for r in res["results"]:
        per = f"{r['cpu_per_step_vs_bp']:.3f}" if r["cpu_per_step_vs_bp"] is not None else ""
        print(f"| `{r['algo']}` | {r['wall_ms']:.2f} | {r['wall_ratio_vs_bp']:.2f} | {r['cpu_ms']:.2f} | "
              f"{r['cpu_ratio_vs_bp']:.2f} | {per} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gap", action="store_true")
    ap.add_argument("--cost", action="store_true")
    ap.add_argument("--loss", default="cross_entropy")
    ap.add_argument("--act", default="relu", help="hidden activation of the MLP (default relu)")
    ap.add_argument("--algos", default="pc,pc:steps=20,pc:fixed_prediction=true,pc:fixed_prediction=true,steps=20",
                    help="pc specs for --cost, separated by ';' or ','-joined specs starting with pc")
    ap.add_argument("--model", help="--cost on this built-in model (MNIST-shaped input) instead of the AR MLP")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of Markdown tables")
    a = ap.parse_args()
    out: dict = {}
    global ACT
    ACT = a.act
    if a.gap:
        out["gap"] = gap(a.loss)
        if not a.json:
            print_gap(out["gap"])
    if a.cost:
        specs, cur = [], ""
        for part in a.algos.split(","):  # "pc:a=1,b=2,pc" -> ["pc:a=1,b=2", "pc"]
            if part.startswith(("pc", "ar", "bp")) and not part.startswith("pc_"):
                if cur:
                    specs.append(cur)
                cur = part
            else:
                cur += "," + part
        specs.append(cur)
        out["cost"] = cost([s for s in specs if s != "bp"], a.repeats, a.warmup, a.model)
        if not a.json:
            print("\n" if a.gap else "", end="")
            print_cost(out["cost"])
    if a.json:  # one mode: its object; both: {"gap": ..., "cost": ...}
        print(json.dumps(out if len(out) > 1 else next(iter(out.values()), {}), indent=2))


if __name__ == "__main__":
    main()
