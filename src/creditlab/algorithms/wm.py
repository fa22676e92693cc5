"""Weight mirrors (Akrout et al. 2019, "Deep learning without weight transport", §3): feedback
alignment whose feedback matrix B_l is learned in a *mirror phase* that needs no data. Each
layer's input is driven by noise x ~ N(0, sigma^2 I), the layer answers with y = W_l x, and B_l
learns from the correlation of the two, decayed:

    B_l <- (1 - lambda) B_l + eta * mean_n(y x^T)      (in W_l's shape; Akrout et al.: x y^T for B_l^T)

Since E[y x^T] = sigma^2 W_l, B_l settles at (eta sigma^2 / lambda) W_l, W_l's direction and, with
the defaults (sigma = 1, eta = lambda = 0.01), its scale; the estimate averages over about
1 / lambda mirror steps. The training backward pass is then FA's with the mirrored B_l.

Each :meth:`step` runs the forward pass, then ``mirror_steps`` mirror steps (fresh noise each, as
many noise samples as the batch has rows), then the backward pass, so the mirror phase's cost
is part of the step time. Running it after the forward pass keeps any dropout masks where
backprop's shadow pass (which replays the step's random state) expects them.

Details and where they differ from the sources:

* y is the layer's linear output without its bias (the bias term b x^T has mean zero and only
  adds variance). Akrout et al.'s numpy code (``makrout/Deep-Learning-without-Weight-Transport``,
  ``fcnn/FCNN_WM.py``) adds the bias and passes y through the sigmoid, draws uniform noise of
  amplitude 0.1, sums (not averages) over a mirror batch, uses mirror learning rate 0.01 without
  decay, and mirrors once per training step after the update (plus one epoch's worth before
  training). Here the noise is Gaussian with standard deviation ``sigma``, the correlation is a
  mean over the noise samples, so ``mirror_lr`` does not depend on the batch size, and the decay
  is the paper's.
* For a convolution or a LocallyConnected2d, y x^T is the layer's weight gradient of (x, y)
  (the same local product, summed over positions), divided weight by weight by the number of
  inputs that weight multiplies per sample (zero padding excluded: a convolution's border taps
  meet fewer), so that E[update] = sigma^2 W_l for every layer type. Weights of a
  LocallyConnected2d that only ever meet zero padding get no correlation and decay to zero; what
  they would send goes into the padding and is discarded, but they count in the flat angle
  between B and W that ``diagnostics()`` reports.
* Only layers that send an error to their input use B (not the first layer, whose input is the
  data); only they are mirrored, and ``diagnostics()`` reports them.
* The noise is drawn with :func:`creditlab.distributed.noise_like` (per noise sample, for the
  global batch) and the ranks' correlation sums are added before B moves (for nn.Linear, whose
  update is one GEMM into B, each rank's B holds its sum, rank 0's also the decayed B, and B is
  all-reduced; for the other layers the sums are all-reduced), so a data-parallel run equals one
  process with the same global batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from creditlab.algorithms import register_algorithm
from creditlab.algorithms._feedback import layer_forward, sending_layers, weight_grad
from creditlab.algorithms.fa import FeedbackAlignment
from creditlab.distributed import all_reduce_, batch_total, constant_share, noise_like
from creditlab.errors import ConfigError
from creditlab.losses import Loss


@register_algorithm
class WeightMirror(FeedbackAlignment):
    """``wm``: options ``mirror_steps`` (mirror steps per training step), ``sigma`` (standard
    deviation of the mirror noise), ``mirror_lr`` (eta) and ``mirror_decay`` (lambda, the
    fraction of B lost per mirror step), ``init`` (B before any mirroring, as for ``fa``) and
    ``unrouted`` (as for ``fa``: ``refuse``, the default, refuses by name modules the routing
    cannot reach, e.g. nn.LSTM or nn.MultiheadAttention; ``autograd`` lets autograd train them
    from the feedback error that reaches them, unmirrored)."""

    name = "wm"
    defaults: dict[str, Any] = {"mirror_steps": 1, "sigma": 1.0, "mirror_lr": 0.01, "mirror_decay": 0.01,
                                "init": "like", "unrouted": "refuse"}
    divergence_hint = "lower the learning rate, or lower wm's mirror_lr / sigma (B settles at mirror_lr sigma^2 / mirror_decay W)"

    def __init__(self, model: nn.Module, loss: Loss, **options: Any):
        super().__init__(model, loss, **options)
        o = self.options
        self.mirror_steps = o["mirror_steps"]
        if not isinstance(self.mirror_steps, int) or isinstance(self.mirror_steps, bool) or self.mirror_steps < 0:
            raise ConfigError(f"wm option mirror_steps={self.mirror_steps!r} must be an integer >= 0")
        self.sigma, self.eta, self.lam = float(o["sigma"]), float(o["mirror_lr"]), float(o["mirror_decay"])
        if not self.sigma > 0:
            raise ConfigError(f"wm option sigma={o['sigma']} must be > 0 (a standard deviation)")
        if not self.eta >= 0:
            raise ConfigError(f"wm option mirror_lr={o['mirror_lr']} must be >= 0")
        if not 0 <= self.lam <= 1:
            raise ConfigError(f"wm option mirror_decay={o['mirror_decay']} must be in [0, 1] (a fraction per step)")
        self._meet_cache: dict[str, tuple[tuple[int, ...], float | Tensor]] = {}

    def _before_backward(self) -> None:
        self.mirror()

    @torch.no_grad()
    def mirror(self, steps: int | None = None, batch: int = 64) -> None:
        """Run ``steps`` mirror steps (default ``mirror_steps``) on every layer that sends an error
        below, with noise shaped like its input in the last forward pass. Before any forward pass
        (no data needed): on every nn.Linear, with ``batch`` noise samples."""
        steps = self.mirror_steps if steps is None else int(steps)
        if self.state.inputs:
            todo = [(n, m, self.state.inputs[n]) for n, m in sending_layers(self.layers, self.state)]
        else:
            todo = [(n, m, torch.Size((batch, m.in_features))) for n, m in self.layers if isinstance(m, nn.Linear)]
        for _ in range(steps):
            for name, layer, shape in todo:
                self._mirror_layer(name, layer, shape)

    def _mirror_layer(self, name: str, layer: nn.Module, shape: torch.Size) -> None:
        w = layer.weight.detach()
        x = noise_like(torch.empty(shape, device=w.device, dtype=w.dtype))
        if self.sigma != 1.0:
            x.mul_(self.sigma)
        b = self.B[name]
        if isinstance(layer, nn.Linear) and x.dim() == 2:
            # each weight meets one input per sample: B <- (1 - lambda) B + eta / N y^T x in one
            # GEMM; the decayed B is counted once across ranks and the ranks' sums are added after
            y = x.mm(w.t())
            beta = (1.0 - self.lam) * constant_share()
            all_reduce_(b.addmm_(y.t(), x, beta=beta, alpha=self.eta / batch_total(shape[0])))
            return
        y = layer_forward(layer, x, w, None)
        corr = all_reduce_(weight_grad(layer, y, x))  # sum over the (global) noise samples and positions
        meets = self._meets(name, layer, x, y)
        if isinstance(meets, Tensor):
            corr.div_(meets)
            meets = 1.0
        b.mul_(1.0 - self.lam).add_(corr, alpha=self.eta / (batch_total(shape[0]) * meets))

    def _meets(self, name: str, layer: nn.Module, x: Tensor, y: Tensor) -> float | Tensor:
        """How many (non-padding) inputs each weight multiplies per sample: the local product of
        all-ones input and output (a number if the same for every weight, e.g. for nn.Linear);
        computed once per input shape."""
        key = tuple(x.shape[1:])
        cached = self._meet_cache.get(name)
        if cached is None or cached[0] != key:
            ones = weight_grad(layer, y.new_ones((1, *y.shape[1:])), x.new_ones((1, *x.shape[1:]))).clamp_(min=1)
            lo, hi = float(ones.min()), float(ones.max())
            cached = (key, lo if lo == hi else ones)
            self._meet_cache[name] = cached
        return cached[1]

    def feedback_pairs(self) -> list[tuple[str, Tensor, Tensor]]:
        return [(n, m.weight.detach(), self.B[n]) for n, m in sending_layers(self.layers, self.state)]

    def to(self, device=None, dtype=None) -> WeightMirror:
        self._meet_cache.clear()
        return super().to(device=device, dtype=dtype)
