"""Alignment of feedback weights with the forward weights they stand in for.

For each layer: the angle between B and W (flattened; B given in W's shape, e.g. psi^T), the
norm ratio |B| / |W|, and sign congruence, the percentage of entries where sign(B) = sign(W)
(Lillicrap et al. 2016; Liao, Leibo & Poggio 2016).
"""

from __future__ import annotations

import torch
from torch import Tensor

from creditlab.diagnostics.angles import angle_deg


def sign_congruence(w: Tensor, b: Tensor) -> float:
    """Percentage of entries with equal sign."""
    return float((torch.sign(w) == torch.sign(b)).double().mean() * 100.0)


def feedback_alignment(pairs: list[tuple[str, Tensor, Tensor]]) -> dict[str, float]:
    """``pairs`` = (layer name, forward W, feedback B in W's shape) -> flat dict of scalars."""
    out: dict[str, float] = {}
    for name, w, b in pairs:
        out[f"feedback_angle_deg/{name}"] = angle_deg(b, w)
        wn = float(w.double().norm())
        out[f"feedback_norm_ratio/{name}"] = float(b.double().norm()) / wn if wn > 0 else float("nan")
        out[f"sign_congruence_pct/{name}"] = sign_congruence(w, b)
    return out
