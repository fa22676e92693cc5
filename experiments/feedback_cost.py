"""Where the feedback families' step time goes beyond fa's, measured inside the step.

    python experiments/feedback_cost.py [--repeats 400]

On the AR paper's MLP (784-300-300-100-10, relu, no biases, batch 64, float32, one thread), the
same model and batch as ``creditlab bench``; every time is the thread's CPU time
(``time.thread_time``, robust to a loaded machine), the median over ``--repeats`` steps, in us:

* ``signsym`` (each variant): time in forming B over the step's backward pass, and for brSF the
  part of it spent drawing the magnitudes;
* ``kp``: its work after fa's backward pass (B's gradient g + lambda B, W's decay), and its
  optimizer step against fa's (the optimizer also updates B);
* ``wm``: the mirror phase inside the step, then its two parts alone on the same shapes: the
  noise draws and the two GEMMs per sending layer.

The hooks wrap the algorithms' own methods for timing; nothing they compute changes.
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch

from creditlab.algorithms import build_algorithm
from creditlab.algorithms._feedback import sending_layers
from creditlab.algorithms.fa import FeedbackAlignment
from creditlab.algorithms.kp import KolenPollack
from creditlab.check import make_model
from creditlab.losses import build_loss


def build(spec: str):
    torch.manual_seed(0)
    net = make_model("784-300-300-100-10", None, "relu", "linear", False, "normal(0.05)", (784,), 10, algo=[spec])
    algo = build_algorithm(spec, net, build_loss("mse"))
    opt = torch.optim.SGD([{"params": list(net.parameters())}] + algo.param_groups(5e-4), lr=5e-4)
    return algo, opt


def timed(acc: dict[str, float], key: str, fn):
    def run(*a, **k):
        t0 = time.thread_time()
        try:
            return fn(*a, **k)
        finally:
            acc[key] += time.thread_time() - t0
    return run


def us(v: list[float]) -> int:
    return round(statistics.median(v) * 1e6)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=400)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, y = torch.rand(64, 784), torch.randint(0, 10, (64,))
    specs = ["fa", "signsym", "signsym:variant=frsf", "signsym:variant=brsf", "kp", "wm"]
    runs = {s: build(s) for s in specs}
    acc = {s: {"feedback": 0.0, "draw": 0.0, "post": 0.0, "mirror": 0.0, "opt": 0.0} for s in specs}
    for s, (algo, _) in runs.items():
        a = acc[s]
        if s.startswith("signsym"):
            algo._draw = timed(a, "draw", algo._draw)
            for r in algo.routes:
                r.feedback = timed(a, "feedback", partial(algo.feedback, r.name, r.layer))
        if s == "wm":
            algo._before_backward = timed(a, "mirror", algo._before_backward)
    inner = {"fa": 0.0}  # time in FeedbackAlignment.step, which kp's step calls first
    FeedbackAlignment.step = timed(inner, "fa", FeedbackAlignment.step)
    kp = runs["kp"][0]

    def kp_step(x, y):
        inner["fa"] = 0.0
        t0 = time.thread_time()
        res = KolenPollack.step(kp, x, y)
        acc["kp"]["post"] += time.thread_time() - t0 - inner["fa"]
        return res

    kp.step = kp_step

    rows: dict[str, dict[str, list[float]]] = {s: {k: [] for k in acc[s]} for s in specs}
    for i in range(args.repeats + 20):
        for s, (algo, opt) in runs.items():
            for k in acc[s]:
                acc[s][k] = 0.0
            opt.zero_grad(set_to_none=True)
            algo.step(x, y)
            t0 = time.thread_time()
            opt.step()
            acc[s]["opt"] = time.thread_time() - t0
            if i >= 20:
                for k, v in acc[s].items():
                    rows[s][k].append(v)
    for s in specs[1:4]:
        line = f"{s:22s} forming B {us(rows[s]['feedback']):5d} us"
        if "brsf" in s:
            line += f", of which drawing magnitudes {us(rows[s]['draw'])} us"
        print(line)
    print(f"{'kp':22s} after fa's backward {us(rows['kp']['post'])} us; optimizer step {us(rows['kp']['opt'])} us "
          f"(fa's {us(rows['fa']['opt'])} us)")
    wm = runs["wm"][0]
    shapes = [(m, wm.state.inputs[n]) for n, m in sending_layers(wm.layers, wm.state)]
    noise, gemms = [], []
    with torch.no_grad():
        for _ in range(args.repeats):
            t0 = time.thread_time()
            xs = [torch.randn(s) for _, s in shapes]
            t1 = time.thread_time()
            for (m, _), n in zip(shapes, xs):
                n.mm(m.weight.t()).t().mm(n)
            t2 = time.thread_time()
            noise.append(t1 - t0)
            gemms.append(t2 - t1)
    print(f"{'wm':22s} mirror phase in the step {us(rows['wm']['mirror'])} us; alone: noise "
          f"({sum(s.numel() for _, s in shapes)} samples) {us(noise)} us, GEMMs {us(gemms)} us")


if __name__ == "__main__":
    main()
