"""Angle between an algorithm's update and backprop's, per layer, on the same batch.

The angle is arccos(<g, g*> / (|g| |g*|)) in degrees on the flattened updates of one layer
(weight and bias together), following Lillicrap et al. (2016) as the AR paper does (§2).
The backprop reference is a *shadow* autograd pass: it reads the parameters and never writes
``.grad``.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import Tensor, nn

from creditlab.losses import Loss


def layer_groups(model: nn.Module) -> "OrderedDict[str, list[str]]":
    """Module name -> names of its own trainable parameters, for modules that have some."""
    groups: "OrderedDict[str, list[str]]" = OrderedDict()
    for mod_name, mod in model.named_modules():
        own = [n for n, p in mod.named_parameters(recurse=False) if p.requires_grad]
        if own:
            groups[mod_name or "model"] = [f"{mod_name}.{n}" if mod_name else n for n in own]
    return groups


def backprop_grads(model: nn.Module, loss: Loss, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """dL/dtheta by autograd for every trainable parameter, without touching ``.grad`` or the
    model's buffers: a reference pass must not update BatchNorm's running statistics (or any
    other state a forward pass in training mode changes) a second time."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    buffers = [(b, b.clone()) for b in model.buffers()]
    try:
        with torch.enable_grad():
            out = model(x)
            value = loss(out, y)
            grads = torch.autograd.grad(value, [p for _, p in named], allow_unused=True)
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
    return {n: (g if g is not None else torch.zeros_like(p)) for (n, p), g in zip(named, grads)}


def angle_deg(a: Tensor, b: Tensor) -> float:
    """Angle in degrees between two tensors, flattened; nan if either is zero."""
    a = a.reshape(-1).double()
    b = b.reshape(-1).double()
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return math.nan
    c = float((a @ b) / (na * nb))
    return math.degrees(math.acos(max(-1.0, min(1.0, c))))


def rel_error(a: Tensor, b: Tensor) -> float:
    """|a - b| / |b| on the flattened tensors."""
    nb = b.double().norm()
    d = (a.double() - b.double()).norm()
    return float(d / nb) if nb > 0 else float(d)


def _cat(grads: dict[str, Tensor], names: list[str]) -> Tensor:
    return torch.cat([grads[n].reshape(-1) for n in names])


def layer_angles(model: nn.Module, updates: dict[str, Tensor], reference: dict[str, Tensor]) -> list[dict]:
    """Per layer: ``{"name", "angle_deg", "rel_error"}`` of ``updates`` against ``reference``."""
    rows = []
    for name, params in layer_groups(model).items():
        if not all(n in updates and n in reference for n in params):
            continue
        u, r = _cat(updates, params), _cat(reference, params)
        rows.append({"name": name, "angle_deg": angle_deg(u, r), "rel_error": rel_error(u, r)})
    return rows


def current_updates(model: nn.Module) -> dict[str, Tensor]:
    """The ``.grad`` an algorithm wrote, by parameter name (zeros where it wrote none)."""
    return {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in model.named_parameters() if p.requires_grad}


def mean_angle(rows: list[dict]) -> float:
    vals = [r["angle_deg"] for r in rows if not math.isnan(r["angle_deg"])]
    return sum(vals) / len(vals) if vals else math.nan


# ---- summaries over a run's logged steps --------------------------------------------------
#: a layer whose angle to backprop, averaged over the logged steps, is at most this many degrees
#: is taken to receive backprop's own update (e.g. the output layer under FA, DFA, KP and AR,
#: where the error is the exact output gradient). Rounding alone leaves ~1e-6 deg in float64 and
#: ~1e-4 deg in float32; an algorithm that truly differs is far above it.
EXACT_DEG = 0.01


def layer_means(step_angles: list[dict[str, float]]) -> dict[str, float | None]:
    """Per layer, in the order logged: the mean of its angle (degrees) over the logged steps
    (``step_angles``: one ``{layer: angle}`` per step), NaN angles (a zero update) skipped;
    None where a layer never had a finite angle."""
    sums: dict[str, list[float]] = {}
    for row in step_angles:
        for name, a in row.items():
            vals = sums.setdefault(name, [])
            if a is not None and not math.isnan(a):
                vals.append(float(a))
    return {name: (sum(v) / len(v) if v else None) for name, v in sums.items()}


def differing_layers(means: dict[str, float | None], tol: float = EXACT_DEG) -> list[str]:
    """The layers whose mean angle to backprop exceeds ``tol`` degrees: where the algorithm's
    update differs from backprop's (see :data:`EXACT_DEG`)."""
    return [name for name, m in means.items() if m is not None and m > tol]


def mean_over(means: dict[str, float | None], layers: list[str]) -> float | None:
    """Mean of ``means`` over ``layers``; over every layer with a value when ``layers`` is
    empty (an algorithm that equals backprop everywhere: the mean is then below the tolerance)."""
    vals = [means[n] for n in (layers or list(means)) if means.get(n) is not None]
    return sum(vals) / len(vals) if vals else None  # type: ignore[arg-type]
