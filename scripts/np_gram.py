"""How well conditioned the node-perturbation fit of the lower feedback matrix is, on the fixed-W
set-up of experiments/np-mnist-fixedw.yaml (docs/node_perturbation.md, "Conditioning of the fit").

The 784-50-20-10 sigmoid net's B^2 stands in for W^2 (``layers.1``, 20 x 50); its regressors
are e~^2 = ((B^3)^T e^3) o f'(a^2), with e^3 = dL/d(output) of creditlab's ``mse`` (sum of
squares). With B^3 at its limit W^3, this prints, over the 50,000 training images, in float64:

* rank and eigenvalues of sum_n g_n^T g_n for g = (W^3)^T e^3 alone (a linear net's
  regressors: rank <= 10) and of sum_n e~_n^T e~_n (the sigmoid net's: full rank, ill-conditioned);
* the relative error |B - W^2|_F / |W^2|_F of the ridge fit with exact regressors and exact
  targets lambda^1 = delta^2 W^2 after c passes of the data, B - W^2 = -gamma (gamma I + c G)^-1 W^2,
  and how many passes it needs to reach 0.8 %.

W is the run's (fixed: the warm-up outlasts the run), read from a checkpoint, e.g.

    creditlab train --config experiments/np-mnist-fixedw.yaml "algo=sg:fit=ridge,warmup=100000000" \\
        --epochs 2 --seed 0 --threads 1 --out runs/np-fixedw-sg
    python scripts/np_gram.py runs/np-fixedw-sg/checkpoint.pt
"""

from __future__ import annotations

import argparse
import os

import torch

from creditlab.data import load_dataset


def regressors(weights: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(W^3)^T e^3 and e~^2 = that o f'(a^2), one row per image."""
    h1 = torch.sigmoid(x @ weights["layers.0.weight"].T + weights["layers.0.bias"])
    h2 = torch.sigmoid(h1 @ weights["layers.1.weight"].T + weights["layers.1.bias"])
    out = h2 @ weights["layers.2.weight"].T + weights["layers.2.bias"]
    err = 2.0 * (out - torch.nn.functional.one_hot(y.long(), out.shape[1]).to(out.dtype))
    top = err @ weights["layers.2.weight"]
    return top, top * h2 * (1.0 - h2)


def ridge_error(gram: torch.Tensor, w: torch.Tensor, gamma: float, passes: float) -> float:
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    diff = gamma * torch.linalg.solve(gamma * eye + passes * gram, w)
    return float(diff.norm() / w.norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="checkpoint.pt of a fixed-W lansdell_mnist run")
    ap.add_argument("--gamma", type=float, default=0.1, help="ridge regulariser (the YAML's 0.1)")
    ap.add_argument("--data-dir", default=os.environ.get("CREDITLAB_DATA"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)["model"]
    weights = {k: v.double() for k, v in state.items()}
    x, y = load_dataset("mnist", data_dir=args.data_dir).split("train")
    x = x.reshape(len(x), -1).double()
    top, reg = regressors(weights, x, y)
    for label, r in (("(W^3)^T e^3 (linear net)", top), ("e~^2 = (W^3)^T e^3 o f'(a^2) (sigmoid net)", reg)):
        gram = r.T @ r
        ev = torch.linalg.eigvalsh(gram).flip(0)
        print(f"{label}: rank {int(torch.linalg.matrix_rank(gram))} of {gram.shape[0]} over {len(r)} images")
        print("  eigenvalues: " + " ".join(f"{v:.3g}" for v in ev.tolist()))
    gram = reg.T @ reg
    ev = torch.linalg.eigvalsh(gram)
    half = gram.shape[0] // 2
    print(f"condition number {float(ev[-1] / ev[0]):.3g}; share of the regressors' energy in the {half} "
          f"weakest directions {float(ev[:half].sum() / ev.sum()):.2g}")
    w2 = weights["layers.1.weight"]
    for c in (1, 2, 10, 20, 100):
        print(f"ridge fit, exact regressors and targets, gamma {args.gamma}, {c} passes: "
              f"relative error {100 * ridge_error(gram, w2, args.gamma, c):.2f} %")
    lo, hi = 1.0, 1e4
    for _ in range(60):
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if ridge_error(gram, w2, args.gamma, mid) > 0.008 else (lo, mid)
    print(f"0.8 % after {hi:.1f} passes ({hi * len(x) / 32:.0f} steps of batch 32)")


if __name__ == "__main__":
    main()
