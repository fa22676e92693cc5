"""The relaxation residual of Activation Relaxation's last step, shared by the MLP ``ar`` and
graph AR: for every relaxing state i, ||x_i(T) - x_i*|| / ||x_i*|| (0/0 reads 0), x(T) the
states the updates used and x* the equilibrium of the same Jacobians (0 by construction for
steps = inf). Computing x* is one more backward pass, made on the first call after a step (the
training loop asks for ``diagnostics()`` on logged steps only, before the optimizer step), and
only while the parameters are those of the step (their version counters): a stale value is
never reported."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


def relative_residual(state: Tensor, equilibrium: Tensor) -> float:
    """||x(T) - x*|| / ||x*|| of one relaxed state (in float64): how far the relaxation left it
    from its equilibrium; 0 where both are 0, inf where only the equilibrium is."""
    xs, xt = equilibrium.double(), state.double()
    den, num = float(xs.norm()), float((xt - xs).norm())
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


class RelaxationResidual:
    """Mixin of the two ARs: :meth:`_remember_relaxation` after a step, :meth:`relaxation_residuals`
    and :meth:`residual_diagnostics` after it; the class names what the version check watches
    (:meth:`_watched`)."""

    _probe: dict[str, Any] | None = None  # the last step's relaxation, for its residual
    _residual: dict[str, float] | None = None

    def _watched(self) -> list[Tensor]:
        raise NotImplementedError

    def _forget_relaxation(self) -> None:
        """Release the last step's relaxation (before the next one allocates)."""
        self._probe, self._residual = None, None

    def _remember_relaxation(self, labels: dict[str, Any], rel: Any = None, states: Any = None) -> None:
        """Keep what the residual needs until the next step: ``labels`` maps each state's name in
        the log to its key in ``states`` and in ``rel.fixed_point()``; ``rel`` None (steps = inf)
        keeps only the names (the residual is 0)."""
        self._probe = {"labels": labels} if rel is None else {
            "labels": labels, "rel": rel, "states": states, "versions": [p._version for p in self._watched()]}
        self._residual = None

    @torch.no_grad()
    def relaxation_residuals(self) -> dict[str, float] | None:
        """The last step's residual per state (see the module docstring), or None when there is
        no step to report or its parameters have changed since."""
        if self._residual is not None:
            return self._residual
        probe = self._probe
        if probe is None:
            return None
        if "rel" not in probe:  # steps = inf
            res = {label: 0.0 for label in probe["labels"]}
        elif [p._version for p in self._watched()] != probe["versions"]:
            return None
        else:
            star = probe["rel"].fixed_point()
            res = {label: relative_residual(probe["states"][k], star[k]) for label, k in probe["labels"].items()}
        self._residual, self._probe = res, None
        return res

    def residual_diagnostics(self) -> dict[str, float]:
        """``relax_residual/NAME`` per state and ``relax_residual_max``, ``_mean`` (empty when
        :meth:`relaxation_residuals` has nothing to report)."""
        res = self.relaxation_residuals()
        if not res:
            return {}
        return {**{f"relax_residual/{k}": v for k, v in res.items()},
                "relax_residual_max": max(res.values()), "relax_residual_mean": sum(res.values()) / len(res)}
