"""Credit-assignment algorithms behind one interface.

An algorithm is built from the model and the loss, and on every batch :meth:`Algorithm.step`
writes each model parameter's update into ``.grad`` (the *gradient-like* direction: the
optimizer subtracts it) and the updates of its own trainable state (e.g. learned feedback
weights) into theirs; a standard ``torch.optim`` optimizer then applies all of them. The
training loop, the optimizer, checkpointing and logging never branch on the algorithm.

Algorithms are named by compact specs, ``ar`` or ``ar:steps=100,eta=0.1``; each module in
this package registers its classes with :func:`register_algorithm`, so adding an algorithm is
one file.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from creditlab.errors import ConfigError
from creditlab.losses import Loss
from creditlab.spec import check_options, format_spec, parse_spec


@dataclass
class StepResult:
    """What one :meth:`Algorithm.step` reports: the batch loss (forward pass, before the
    update), the model output, and optional scalars for logging."""

    loss: Tensor
    output: Tensor
    extras: dict[str, float] = field(default_factory=dict)


class Algorithm:
    """Base class. Subclasses set ``name``, ``defaults`` (every option with its default) and
    implement :meth:`step`."""

    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    divergence_hint: ClassVar[str] = "lower the learning rate"

    def __init__(self, model: nn.Module, loss: Loss, **options: Any):
        self.model = model
        self.loss = loss
        self.options = check_options("algorithm", self.name, options, self.defaults)
        self.given = dict(options)

    # ---- the interface -------------------------------------------------------------
    def step(self, x: Tensor, y: Tensor) -> StepResult:
        """Compute every parameter's update into ``.grad`` for the batch (x, y)."""
        raise NotImplementedError

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Extra optimizer parameter groups for the algorithm's own trainable state."""
        return []

    def on_epoch_start(self, epoch: int) -> None:
        """Called by the loop before each epoch (0-based); e.g. alternating schedules."""

    def diagnostics(self) -> dict[str, float]:
        """Scalars about the algorithm's own state (feedback alignment, relaxation residuals, ...)
        for the log; the loop asks for them on logged steps only, after :meth:`reported_updates`
        and before the optimizer applies the step."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values needed to resume (buffers, fixed feedback, counters)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def reported_updates(self) -> dict[str, Tensor] | None:
        """Updates to compare with backprop, by parameter name, if they differ from ``.grad``
        (e.g. before a regularizer is added); None means ``.grad`` is the update."""
        return None

    @classmethod
    def model_from_arch(cls, sizes: list[int], act: str | list[str], out_act: str, bias: bool,
                        init: str) -> nn.Module | None:
        """The model this algorithm trains for an MLP layer spec, if not the plain :class:`MLP`
        (e.g. GAIT-prop's invertible version); None means the plain MLP."""
        return None

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Algorithm":
        return self

    # ---- helpers -------------------------------------------------------------------
    @property
    def spec(self) -> str:
        return format_spec(self.name, self.given)

    def params(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def factory_kwargs(self) -> dict[str, Any]:
        p = next(self.model.parameters())
        return {"device": p.device, "dtype": p.dtype}


_ALGORITHMS: dict[str, type[Algorithm]] = {}
_DISCOVERED = False


def register_algorithm(cls: type[Algorithm]) -> type[Algorithm]:
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    _ALGORITHMS[cls.name] = cls
    return cls


def _discover() -> None:
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def algorithm_names() -> list[str]:
    _discover()
    return sorted(_ALGORITHMS)


def algorithm_class(name: str) -> type[Algorithm]:
    _discover()
    if name not in _ALGORITHMS:
        raise ConfigError(f"unknown algorithm {name!r}; valid: {', '.join(sorted(_ALGORITHMS))}")
    return _ALGORITHMS[name]


def validate_spec(spec: str) -> str:
    """Check a spec's name and option names without building anything; returns the spec."""
    name, opts = parse_spec(spec)
    cls = algorithm_class(name)
    check_options("algorithm", name, opts, cls.defaults)
    return spec


def build_algorithm(spec: str, model: nn.Module, loss: Loss) -> Algorithm:
    name, opts = parse_spec(spec)
    return algorithm_class(name)(model, loss, **opts)


__all__ = [
    "Algorithm", "StepResult", "register_algorithm", "algorithm_names", "algorithm_class",
    "build_algorithm", "validate_spec",
]
