"""Leaky-ReLU kinks crossed by GAIT-prop's nudges at initialisation: docs/gait.md, "Deep net,
float64, first 20 steps".

With orthogonal weights and a piecewise-linear activation, normalized GP's update equals
backprop's unless a nudge h_l + dh_l (dh_l = gamma_l f'(a_l)^2 (t_l - h_l)) crosses a kink of
some unit j of sample n in hidden layer l: the exact inverse then gives f^{-1}(h + dh) - a for
that unit instead of the linearised dh / f'(a), so every layer below l receives backprop's
update with dL/da_l[n, j] multiplied by r = (f^{-1}(h + dh) - a) f'(a) / dh.

For every batch of a config's first epoch (its seed, split and shuffle, as ``creditlab train``
draws them), at the initial weights (no optimizer step is taken), this prints: the kink
crossings (layer, sample, unit, a, dh, r) and the range of gamma_l; the per-layer angle (deg) of GP's update to
backprop's; the angle to backprop with the crossing entries scaled by their r (for layer k,
the crossings in the layers above k); and, for a batch with crossings, GP's angle to backprop
on the same batch without the crossing samples.

    CREDITLAB_DATA=/work/shared/data python scripts/gait_kinks.py \\
        --config experiments/gait-cifar-deep-short.yaml --algo gait:normalize=true,gamma=1e-7,ortho=100

``--batches N`` looks at the first N batches only; ``--seed`` overrides the config's first seed.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import Tensor

from creditlab import config as config_mod
from creditlab.build import DTYPES, build_all, build_data
from creditlab.data import batch_indices
from creditlab.diagnostics.angles import backprop_grads, layer_angles
from creditlab.models.activations import LeakyReLU
from creditlab.models.invertible import InvertibleNet, InvTrace
from creditlab.train import prepare_batch


def crossings(net: InvertibleNet, algo, x: Tensor, y: Tensor, loss):
    """(layer, sample, unit, a, dh, r) for every hidden unit whose GP nudge crosses its kink,
    and the smallest and largest per-sample gamma_l of the hidden square layers."""
    from creditlab.algorithms.gait import gait_targets

    with torch.no_grad():
        tr = net.trace(x)
        det = InvTrace(tr.inputs, [a.detach() for a in tr.pre], [h.detach() for h in tr.outs])
        g = loss.grad(det.outs[-1][:, : net.num_classes], y)
        diffs, _, gammas = gait_targets(net, det, g, algo.normalize, algo.gamma, algo.norm, algo.eta,
                                        algo.scale_local)
    out = []
    for l in range(1, len(net.layers) - 1):
        act = net.layers[l].act
        if not isinstance(act, LeakyReLU):
            sys.exit(f"layer {l}'s activation {act.name} is not leaky ReLU; this script counts leaky-ReLU kinks")
        a, h = det.pre[l], det.outs[l]
        fp = act.df(a)
        dh = gammas[l].reshape(-1, 1) * fp * fp * diffs[l].reshape(a.shape)
        for n, j in (((h + dh) > 0) != (a > 0)).nonzero().tolist():
            an, dn = float(a[n, j]), float(dh[n, j])
            r = (float(act.inverse(h[n, j] + dh[n, j])) - an) * float(fp[n, j]) / dn
            out.append((l, n, j, an, dn, r))
    hidden = torch.stack(gammas[1:-1])
    return out, (float(hidden.min()), float(hidden.max()))


def scaled_backprop(net: InvertibleNet, loss, x: Tensor, y: Tensor, scales: dict[int, Tensor]) -> dict[str, Tensor]:
    """Backprop's parameter gradients with dL/da_l multiplied elementwise by ``scales[l]``."""
    params = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    with torch.enable_grad():
        h = x
        for l, layer in enumerate(net.layers):
            a, out = layer.full(h)
            if l in scales:
                a.register_hook(lambda grad, s=scales[l]: grad * s)
            h = out[:, : layer.keep]
        grads = torch.autograd.grad(loss(h, y), [p for _, p in params])
    return {n: g for (n, _), g in zip(params, grads)}


def gp_angles(model, algo, loss, x, y) -> list[float]:
    algo.step(x, y)
    rep = {k: v.clone() for k, v in algo.reported_updates().items()}
    return [r["angle_deg"] for r in layer_angles(model, rep, backprop_grads(model, loss, x, y))], rep


def fmt(values: list[float]) -> str:
    return ", ".join(f"{v:.3g}" for v in values)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="experiments/gait-cifar-deep-short.yaml")
    ap.add_argument("--algo", default="gait:normalize=true,gamma=1e-7,ortho=100")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--batches", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    raw = config_mod.load(args.config)
    seed = args.seed if args.seed is not None else (raw["seeds"] or [raw["seed"]])[0]
    cfg = config_mod.load(args.config, [f"algo={args.algo}", f"seed={seed}"])
    device, dtype = torch.device("cpu"), DTYPES[cfg["dtype"]]
    data = build_data(cfg)
    data.to(device, dtype)
    model, loss, algo, _ = build_all(cfg, data)
    net = algo.net
    batches = batch_indices(len(data.x_train), cfg["batch_size"], cfg["seed"], 0, device=device)
    batches = batches[: args.batches] if args.batches else batches
    params = {n: p.detach() for n, p in model.named_parameters()}
    names = [r["name"] for r in layer_angles(model, params, params)]
    print(f"{args.config}, {args.algo}, seed {seed}, {cfg['dtype']}, initial weights, "
          f"{len(batches)} batches of {cfg['batch_size']}; angles (deg) per layer: {', '.join(names)}")
    total = 0
    for i, idx in enumerate(batches):
        x, y = prepare_batch(cfg, data.x_train[idx], data.y_train[idx], dtype, device)
        ang, rep = gp_angles(model, algo, loss, x, y)
        cross, (gmin, gmax) = crossings(net, algo, x, y, loss)
        total += len(cross)
        print(f"batch {i}: {len(cross)} kink crossing(s); GP vs BP: {fmt(ang)}")
        if not cross:
            continue
        print(f"  gamma_l of the hidden square layers: {gmin:.3g} to {gmax:.3g}")
        for l, n, j, a, dh, r in cross:
            print(f"  layer {l}, sample {n}, unit {j}: a = {a:.3e}, dh = {dh:.3e}, r = {r:.4g}")
        kink = []
        for k, row in enumerate(layer_angles(model, rep, backprop_grads(model, loss, x, y))):
            scales: dict[int, Tensor] = {}
            for l, n, j, _, _, r in cross:
                if l > k:
                    scales.setdefault(l, x.new_ones(len(x), net.layers[l].width))[n, j] = r
            ref = scaled_backprop(net, loss, x, y, scales)
            kink.append(layer_angles(model, rep, ref)[k]["angle_deg"])
        print(f"  GP vs BP with the crossing entries of dL/da scaled by r: {fmt(kink)}")
        keep = torch.ones(len(x), dtype=torch.bool)
        keep[[n for _, n, _, _, _, _ in cross]] = False
        print(f"  GP vs BP without the crossing sample(s): {fmt(gp_angles(model, algo, loss, x[keep], y[keep])[0])}")
        print(f"  GP vs BP on the crossing sample(s) alone: {fmt(gp_angles(model, algo, loss, x[~keep], y[~keep])[0])}")
    print(f"{total} kink crossing(s) in {len(batches)} batches")


if __name__ == "__main__":
    main()
