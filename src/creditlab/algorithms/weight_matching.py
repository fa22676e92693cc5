"""``matched``: feedback weights that receive the same update as the forward weights, plus
weight decay on both (the "matching" rule; Lansdell, Prakash & Kording, ICLR 2020, §4.2 and
Appendix C.5; Rombouts et al. 2015, Martinolli et al. 2018, Akrout et al. 2019).

Forward weights learn as in feedback alignment through B (``form=fa`` only: B in W's shape).
Updates, gradient-like (the optimizer subtracts them, both at the model's learning rate):

    dW^i = e~^i (h^{i-1})^T + decay W^i,      dB^i = e~^i (h^{i-1})^T + decay B^i,

so W^i - B^i shrinks by the factor (1 - lr decay) every step and B converges to W. The paper
does not publish the decay coefficient and the authors' code (``NPModel4_Matched``,
``AENPModel5_Matched``) uses none; ``decay=0`` reproduces that code, the default 0.1 is our
choice (docs/node_perturbation.md). The output layer's W also gets the decay; its B is unused.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from creditlab.algorithms import register_algorithm
from creditlab.algorithms._feedback_learning import CleanPass, FeedbackLearner
from creditlab.distributed import constant_share
from creditlab.errors import ConfigError


@register_algorithm
class Matched(FeedbackLearner):
    """``matched:decay=0.1``."""

    name = "matched"
    forms = ("fa",)
    fits = ("sgd",)
    defaults: dict[str, Any] = {"decay": 0.1, "warmup": 0, "b_init": "xavier"}

    def __init__(self, model: nn.Module, loss: Any, **options: Any):
        super().__init__(model, loss, **options)
        self.decay = float(self.options["decay"])
        if self.decay < 0:
            raise ConfigError(f"algorithm 'matched': decay={self.decay} must be >= 0")

    def targets(self, x: Tensor, y: Tensor, clean: CleanPass) -> None:
        return None

    def after_updates(self, clean: CleanPass, es: list[Tensor | None]) -> None:
        if self.steps < self.warmup:
            return
        decay = self.decay * constant_share()  # batch-independent: counted once across ranks
        for i in range(len(self.B)):
            w = self.net.blocks[i + 1].layer.weight
            self.B[i].grad = w.grad.detach().clone() + decay * self.B[i]
        self._reported = {n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None}
        for blk in self.net.blocks:
            w = blk.layer.weight
            if w.grad is not None:
                w.grad = w.grad + decay * w.detach()

    def reported_updates(self) -> dict[str, Tensor] | None:
        """The feedback-alignment update before the weight decay (for the angle to backprop)."""
        return getattr(self, "_reported", None)

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        return [{"params": list(self.B), "lr": lr, "weight_decay": 0.0}]
