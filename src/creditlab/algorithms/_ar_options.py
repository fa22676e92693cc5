"""The options of Activation Relaxation, shared by the MLP ``ar`` and graph AR: their defaults
and their validation (one place, so both accept and refuse the same values)."""

from __future__ import annotations

import math
from typing import Any

from creditlab.algorithms._verify import VERIFY_CHOICES
from creditlab.errors import ConfigError
from creditlab.spec import choice

AR_DEFAULTS: dict[str, Any] = {
    "mode": "exact",
    "steps": 100,
    "eta": 0.1,
    "init": "forward",
    "schedule": "synchronous",
    "feedback": "transpose",
    "derivative": True,
    "update_derivative": True,
    "feedback_lr": None,
    "feedback_decay": 0.0,
    "feedback_init": None,
    "verify": "first",
}
DIVERGENCE_HINT = "lower eta (relaxation step) or the learning rate, or use mode=exact with steps=inf"


def check_relaxation_options(o: dict[str, Any]) -> None:
    """Validate the options shared by ``ar`` on MLPs and on graphs (not ``derivative``)."""
    choice("ar", "mode", o["mode"], ("exact", "simulate"))
    choice("ar", "init", o["init"], ("forward", "zero"))
    choice("ar", "schedule", o["schedule"], ("synchronous", "sweep"))
    choice("ar", "feedback", o["feedback"], ("transpose", "random", "learned"))
    if o["verify"] is False:  # the spec parser reads "off" as false
        o["verify"] = "off"
    choice("ar", "verify", o["verify"], VERIFY_CHOICES)
    steps = o["steps"]
    if not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 0) and not (
            isinstance(steps, float) and math.isinf(steps)):
        raise ConfigError(f"ar option steps={steps!r} must be a non-negative integer or inf")
    eta = o["eta"]
    if not (isinstance(eta, (int, float)) and not isinstance(eta, bool) and 0 < eta < 2):
        raise ConfigError(f"ar option eta={eta!r} must be a number with 0 < eta < 2: the relaxation's iteration "
                          "has eigenvalues 1 - eta, so it diverges for eta >= 2 and does not move for eta <= 0 "
                          "(the paper uses eta = 0.1; steps=inf gives the fixed point directly)")
    if math.isinf(steps) and o["mode"] == "simulate":
        raise ConfigError("ar: mode=simulate needs finite steps; use mode=exact with steps=inf")
    if o["feedback_lr"] is not None and not o["feedback_lr"] > 0:
        raise ConfigError(f"ar option feedback_lr={o['feedback_lr']!r} must be positive")
