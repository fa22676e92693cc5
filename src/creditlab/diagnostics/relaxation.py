"""AR convergence traces (AR paper §2, Fig. 1): per-layer mean squared error between the
relaxing state x^l(t) and the exact backprop gradient dL/dx^l, t = 0..T, for one batch; and
the mean over layers for a sweep of relaxation step sizes eta."""

from __future__ import annotations

from typing import Any

import torch

from creditlab.algorithms.ar import ActivationRelaxation
from creditlab.losses import Loss
from creditlab.models import MLP


def relaxation_traces(model: MLP, loss: Loss, x: torch.Tensor, y: torch.Tensor, etas: list[float], steps: int,
                      schedule: str = "synchronous", init: str = "forward") -> dict[str, Any]:
    """``{"layers": {eta: [[mse per layer] per t]}, "mean": {eta: [mean mse per t]}}``."""
    out: dict[str, Any] = {"steps": steps, "schedule": schedule, "init": init, "etas": etas, "layers": {}, "mean": {}}
    trace = model.trace(x)
    for eta in etas:
        ar = ActivationRelaxation(model, loss, mode="simulate", steps=steps, eta=eta, schedule=schedule, init=init)
        ar.relax(trace, y, record=True)
        tr = ar.last_trace or []
        out["layers"][str(eta)] = tr
        out["mean"][str(eta)] = [sum(row) / len(row) for row in tr]
    return out
