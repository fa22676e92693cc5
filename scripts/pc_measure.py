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
"""

from __future__ import annotations

import argparse
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


def _compare(spec: str, model: MLP, loss, x, target, ref: torch.Tensor) -> str:
    algo = build_algorithm(spec, model, loss)
    model.zero_grad(set_to_none=True)
    algo.step(x, target)
    u = _flat(model)
    rel = float((u - ref).norm() / ref.norm())
    cos = float(u @ ref / (u.norm() * ref.norm()))
    ang = math.degrees(math.acos(max(-1.0, min(1.0, cos))))
    d = algo.diagnostics()
    rises = (f" (rises at {int(d['pc_energy_rises'])} steps, at most {d['pc_energy_max_rise']:.1e} of F)"
             if d.get("pc_energy_rises") else "")
    return (f"| `{spec}` | {rel:.3e} | {ang:.3f} | {d['pc_energy_first']:.4g} | {d['pc_energy_last']:.4g}{rises} |")


def gap(loss_spec: str) -> None:
    dt = torch.float64
    model, loss = _model(dt), build_loss(loss_spec)
    x, y = _batch(64, dt)
    head = "| spec | rel. error to bp | angle (deg) | F/N first | F/N last |\n|---|---|---|---|---|"

    def ref_for(target) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        loss(model(x), target).backward()
        return _flat(model).clone()

    ref = ref_for(y)
    print(f"loss {loss.spec()}, batch {x.shape[0]} ({'MNIST' if os.environ.get('CREDITLAB_DATA') else 'random'})\n")
    print("standard variant, T steps:\n" + head)
    for spec in ("pc:steps=20", "pc:steps=100", "pc:steps=500"):
        print(_compare(spec, model, loss, x, y, ref))
    print("\nstandard variant, output precision gamma (T = 500):\n" + head)
    for gamma in (1.0, 0.1, 0.01, 0.001):
        print(_compare(f"pc:steps=500,output_precision={gamma}", model, loss, x, y, ref))
    print("\nstandard variant, target moved toward the output, t = p + beta (onehot - p) (T = 500; "
          "bp on the same target):\n" + head)
    with torch.no_grad():
        out = model(x)
        p = torch.softmax(out, 1) if loss.name == "cross_entropy" else out
        onehot = as_targets(y, out)
    for beta in (1.0, 0.1, 0.01, 0.001):
        t = p + beta * (onehot - p)
        print(_compare("pc:steps=500", model, loss, x, t, ref_for(t)).replace("|", f"| beta={beta}", 1))
    print("\nfixed-prediction variant:\n" + head)
    for spec in ("pc:fixed_prediction=true,steps=20", "pc:fixed_prediction=true,steps=100",
                 "pc:fixed_prediction=true,steps=inf"):
        print(_compare(spec, model, loss, x, y, ref))


def cost(specs: list[str], repeats: int, warmup: int, model_name: str | None = None) -> None:
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
    print(f"{model_name or 'the AR MLP'}, one thread, float32, batch 64, mse, median of {repeats} interleaved steps\n")
    print("| spec | wall ms | wall / bp | CPU ms | CPU / bp | CPU / (T bp) |\n|---|---|---|---|---|---|")
    for s, ws in wall.items():
        mw, mc = statistics.median(ws), statistics.median(cpu[s])
        steps = runs[list(wall).index(s)][1].options.get("steps") if s != "bp" else None
        per = f"{mc / bc / steps:.3f}" if steps and math.isfinite(steps) else ""
        print(f"| `{s}` | {mw * 1e3:.2f} | {mw / bw:.2f} | {mc * 1e3:.2f} | {mc / bc:.2f} | {per} |")


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
    a = ap.parse_args()
    global ACT
    ACT = a.act
    if a.gap:
        gap(a.loss)
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
        cost([s for s in specs if s != "bp"], a.repeats, a.warmup, a.model)


if __name__ == "__main__":
    main()
