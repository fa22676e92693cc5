"""GAIT-prop, vanilla and normalized (Dalm, Ahmad, Ambrogioni, van Gerven; ``../shared/papers``
file 002, §2.1-2.2, Algorithm 1; Ahmad et al. 2020). Runs on the invertible networks of
:mod:`creditlab.models.invertible`; the authors' code is artcogsys/GAIT_prop_scaling.

Index convention (one throughout): layer l maps x_l to a_l = W_l x_l + b_l, h_l = f(a_l);
D_l = diag f'(a_l); G_l is the exact inverse of layer l (h_l -> x_l). l = L-1 is the output.

Backward pass (Algorithm 1 re-indexed), every target from the weights before this batch's update:

* output target t_{L-1} = h_{L-1} - 1/2 dL/dh_{L-1} on the logits; auxiliary output units
  target their own value (the authors' code; L the configured loss, e.g. cross-entropy);
* for l = L-1 .. 1:  eps_l = gamma_l D_l^2  (per sample, per unit)
      t_{l-1}[:keep] = G_l((1 - eps_l) h_l + eps_l t_l),  t_{l-1}[keep:] = h_{l-1}[keep:]
  (the auxiliary units of layer l-1 target their own value);
* update of layer l: the gradient of its local loss  sum_n m_{l,n} ||t_{l,n} - f(W_l x_{l,n} + b_l)||^2,
  i.e.  dW_l = sum_n m_{l,n} 2 D_l (h_l - t_l) x_l^T,  db_l = sum_n m_{l,n} 2 D_l (h_l - t_l).

With exact inverses of orthogonal W and gamma -> 0 this is backprop's gradient of L: the output
layer's update equals it exactly (t = h - g/2, factor 2, D = I for the linear output), lower
layers to first order in gamma. With a piecewise-linear activation (leaky ReLU) the lower layers'
updates are backprop's exactly, at any gamma, unless a nudged output h_l + dh_l crosses a unit's
kink: the exact inverse then gives f^{-1}(h + dh) - a for that unit instead of the linearised
dh / f'(a), and the layers below l get backprop's update with that entry of dL/da_l scaled by
the ratio of the two (docs/gait.md, "Deep net, float64, first 20 steps"; scripts/gait_kinks.py).
That is GAIT-prop's own update at finite gamma, in both target forms, not an approximation made here.

gamma_l:
* vanilla (``normalize=false``): gamma_l = gamma (1e-3 in the authors' configs);
* normalized, ``norm=l2`` (default; the authors' code, and the paper's text "divide by the L2
  norm"): gamma_l = gamma sqrt(N_l) / ||t_l - h_l|| per sample, N_l the layer's full width
  (gamma = 1e-7 in the authors' configs), so ||gamma_l (t_l - h_l)|| = gamma sqrt(N_l);
* normalized, ``norm=squared``: Eq. 5 and Algorithm 1 as printed, gamma_l = eta / ||h_l - t_l||^2.
gamma_l is never clamped to 1 (the paper allows gamma > 1). A sample whose target equals its
output (zero error) gets gamma_l = 0 and local-loss weight 0 below (its update is zero).

``scale_local=true`` (default; the authors' code): m_{L-1} = 1 and m_{l-1} = m_l / gamma_l, the
per-sample running product of 1/gamma down the layers, so updates keep backprop's scale.
Algorithm 1 as printed has no such factor (``scale_local=false``: m = 1 everywhere).

Orthogonality regularizer (§2.3; Ahmad et al. 2020): ``ortho`` * d/dW ||W W^T - I||_F^2 =
4 ``ortho`` (W W^T - I) W is added to the weight (not bias) gradient of every square layer (conv
kernels as their square matrix), after the task update; the pre-regularizer task update, the one
the angle diagnostics should compare with backprop (as the authors do), is kept in
:attr:`Gait.task_updates` (parameter name -> tensor, the task .grad tensors by reference, valid
until the next step) and returned by ``reported_updates()``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from creditlab.algorithms import Algorithm, StepResult, register_algorithm
from creditlab.distributed import constant_share
from creditlab.errors import ConfigError
from creditlab.models.invertible import InvertibleNet, InvTrace, invertible_from_arch, require_invertible
from creditlab.spec import choice

# The authors' configs: vanilla gamma 1e-3, normalized gamma 1e-7.
DEFAULT_GAMMA = {False: 1e-3, True: 1e-7}


# ----------------------------------------------------------------------------------------
# pure functions
# ----------------------------------------------------------------------------------------
def _per_sample_norm(v: Tensor) -> Tensor:
    return v.reshape(v.shape[0], -1).norm(dim=1)


def layer_gamma(diff: Tensor, normalize: bool, gamma: float, norm: str, eta: float) -> Tensor:
    """gamma_l per sample (shape (B,)) from diff = t_l - h_l (see the module docstring)."""
    b = diff.shape[0]
    if not normalize:
        return diff.new_full((b,), gamma)
    d = _per_sample_norm(diff)
    if norm == "l2":
        n = diff[0].numel()
        g = gamma * math.sqrt(n) / d
    else:
        g = eta / (d * d)
    return torch.where(d > 0, g, torch.zeros_like(g))


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    return v.reshape((-1,) + (1,) * (like.dim() - 1))


def output_target(out_full: Tensor, grad_logits: Tensor) -> Tensor:
    """t = h - 1/2 dL/dh on the logits (first C units); auxiliary units target themselves."""
    t = out_full.clone()
    c = grad_logits.shape[1]
    t[:, :c] = t[:, :c] - 0.5 * grad_logits
    return t


def _act_inverse_diff(act, a: Tensor, dh: Tensor) -> Tensor:
    """f^{-1}(f(a) + dh) - a in the activation's non-cancelling difference form
    (:meth:`creditlab.models.activations.Activation.inverse_diff`; refused by name for an
    activation that has none)."""
    return act.inverse_diff(a, dh)


def gait_targets(
    net: InvertibleNet,
    tr: InvTrace,
    grad_logits: Tensor,
    normalize: bool,
    gamma: float,
    norm: str = "l2",
    eta: float = 0.0,
    scale_local: bool = True,
    factors: list[Any] | None = None,
    delta: bool = False,
    fprimes: list[Tensor] | None = None,
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Target-minus-output differences d_l = t_l - h_l (full width), local-loss weights m_l (B,)
    and gamma_l (B,) for every layer (gamma of layer 0 is unused and reported as zeros).

    ``delta=false`` (the authors' code): t_{l-1} = G_l(nudged) by the full inverse, and
    d_{l-1} = t_{l-1} - h_{l-1}; in float32 this difference of two O(1) numbers loses the
    O(gamma) signal. ``delta=true``: the same quantity in difference form,
    d_{l-1} = G_l'(f^{-1}(h_l + eps_l d_l) - a_l) with G_l' the linear part of the inverse
    (W^{-1}, or the transposed convolution with M^{-T}: the overlap correction cancels exactly)
    and f^{-1}(h + dh) - a in the activation's own difference form (``act.inverse_diff``:
    exact for linear and leaky ReLU, atanh / log1p identities for tanh / sigmoid), so no step
    subtracts two O(1) numbers.
    """
    L = len(net.layers)
    if factors is None:
        factors = [None] + [layer.factorize() for layer in net.layers[1:]]
    diffs: list[Tensor] = [torch.empty(0)] * L
    mults: list[Tensor] = [torch.empty(0)] * L
    gammas: list[Tensor] = [torch.empty(0)] * L
    h_out = tr.outs[-1]
    d = output_target(h_out, grad_logits) - h_out if not delta else _output_diff(h_out, grad_logits)
    m = d.new_ones(d.shape[0])
    diffs[-1], mults[-1] = d, m
    for l in range(L - 1, 0, -1):
        layer = net.layers[l]
        h = tr.outs[l]
        g = layer_gamma(d, normalize, gamma, norm, eta)
        gammas[l] = g
        fp = layer.act.df(tr.pre[l]) if fprimes is None else fprimes[l]
        step = _bcast(g, h) * (fp * fp) * d
        x_in = tr.inputs[l]
        if delta:
            dpre = _act_inverse_diff(layer.act, tr.pre[l], step)
            dx = layer.inverse_linear(dpre, factors[l], x_in).reshape(x_in.shape)
        else:
            dx = net.invert_layer(l, h + step, x_in, factors[l]) - x_in
        if dx.shape == tr.outs[l - 1].shape:  # layer l-1 forwards all its units
            d = dx
        else:
            d = tr.outs[l - 1].new_zeros(tr.outs[l - 1].shape)
            d[:, : dx.shape[1]] = dx  # auxiliary units of layer l-1 target their own value
        if scale_local:
            safe = torch.where(g > 0, g, torch.ones_like(g))
            m = torch.where(g > 0, m / safe, torch.zeros_like(m))
        diffs[l - 1], mults[l - 1] = d, m
    gammas[0] = d.new_zeros(d.shape[0])
    return diffs, mults, gammas


def _output_diff(out_full: Tensor, grad_logits: Tensor) -> Tensor:
    d = torch.zeros_like(out_full)
    d[:, : grad_logits.shape[1]] = -0.5 * grad_logits
    return d


def ortho_penalty(w: Tensor) -> Tensor:
    """||W W^T - I||_F^2 of a square matrix."""
    eye = torch.eye(w.shape[0], device=w.device, dtype=w.dtype)
    return ((w @ w.transpose(0, 1) - eye) ** 2).sum()


def gram(w: Tensor, leaf: int = 256) -> Tensor:
    """W^T W from the upper triangle of its blocks: the cross block of the two
    column halves once (its transpose fills the lower one), each half's own Gram recursively
    down to ``leaf`` columns. For 1024 columns and the default leaf that is 5/8 of the
    multiplications of one full product."""
    k = w.shape[1]
    if k <= leaf:
        return w.mT @ w
    h = k // 2
    a, b = w[:, :h], w[:, h:]
    out = w.new_empty((k, k))
    out[:h, :h] = gram(a, leaf)
    out[h:, h:] = gram(b, leaf)
    cross = a.mT @ b
    out[:h, h:] = cross
    out[h:, :h] = cross.mT
    return out


def ortho_residual(w: Tensor, leaf: int = 256) -> Tensor:
    """(W W^T - I) W = W (W^T W) - W of a square W (a quarter of the regularizer's gradient)."""
    return w @ gram(w, leaf) - w


def ortho_grad(w: Tensor, leaf: int = 256) -> Tensor:
    """d/dW ||W W^T - I||_F^2 = 4 (W W^T - I) W, W square."""
    return 4.0 * ortho_residual(w, leaf)


# ----------------------------------------------------------------------------------------
# the algorithm
# ----------------------------------------------------------------------------------------
@register_algorithm
class Gait(Algorithm):
    """``gait``: GAIT-prop; ``gait:normalize=false`` is vanilla GP (vGP)."""

    name = "gait"
    defaults: dict = {
        "normalize": True,  # normalized GP (Dalm et al.); false = vanilla GP (Ahmad et al. 2020)
        "gamma": None,  # None: 1e-7 normalized, 1e-3 vanilla (the authors' configs)
        "norm": "l2",  # l2: gamma sqrt(N)/||t-h|| (code, paper text); squared: eta/||t-h||^2 (Eq. 5 printed)
        "eta": None,  # norm=squared only; None: gamma's value
        "scale_local": True,  # per-sample running product of 1/gamma on the local losses (code)
        "ortho": 100.0,  # orthogonality regularizer strength (authors: 100 CIFAR, 1 ImageNet)
        "targets": "auto",  # inverse: full inverse G(nudged) (code); delta: same in difference form; auto: inverse in float64
    }
    divergence_hint = "lower the learning rate, raise ortho, or use dtype: float64 (the authors run in float64)"

    def __init__(self, model: nn.Module, loss, **options: Any):
        super().__init__(model, loss, **options)
        self.net = require_invertible(model, self.name)
        o = self.options
        for key in ("normalize", "scale_local"):
            if not isinstance(o[key], bool):
                raise ConfigError(f"gait option {key}={o[key]!r} must be true or false")
        self.normalize: bool = o["normalize"]
        self.norm = choice("gait", "norm", o["norm"], ("l2", "squared"))
        gamma = DEFAULT_GAMMA[self.normalize] if o["gamma"] is None else o["gamma"]
        if not isinstance(gamma, (int, float)) or isinstance(gamma, bool) or not gamma > 0:
            raise ConfigError(f"gait option gamma={gamma!r} must be a positive number (e.g. 1e-7 normalized, 1e-3 vanilla)")
        self.gamma = float(gamma)
        if o["eta"] is not None and not (self.normalize and self.norm == "squared"):
            raise ConfigError("gait option eta is used only with normalize=true,norm=squared (Eq. 5 as printed); "
                              "otherwise set gamma")
        eta = self.gamma if o["eta"] is None else o["eta"]
        if not isinstance(eta, (int, float)) or isinstance(eta, bool) or not eta > 0:
            raise ConfigError(f"gait option eta={eta!r} must be a positive number")
        self.eta = float(eta)
        ortho = o["ortho"]
        if not isinstance(ortho, (int, float)) or isinstance(ortho, bool) or ortho < 0:
            raise ConfigError(f"gait option ortho={ortho!r} must be a number >= 0 (0 switches the regularizer off)")
        self.ortho = float(ortho)
        self.scale_local: bool = o["scale_local"]
        self.targets = choice("gait", "targets", o["targets"], ("auto", "inverse", "delta"))
        p0 = next(iter(self.net.parameters()), None)
        if p0 is not None and self.uses_delta(p0.dtype):
            for l, layer in enumerate(self.net.layers[1:], start=1):
                if not layer.act.has_inverse_diff:
                    raise ConfigError(
                        f"gait: layer {l}'s activation {layer.act.name!r} has no non-cancelling difference form "
                        f"f^-1(h + dh) - a (Activation.inverse_diff), which the difference-form targets need in "
                        f"{str(p0.dtype).replace('torch.', '')}; the full inverse there loses the O(gamma) target "
                        "signal; use leaky_relu, tanh, sigmoid or linear, or dtype: float64"
                    )
        self.task_updates: dict[str, Tensor] = {}
        self._last_targets: tuple[list[Tensor], list[Tensor]] | None = None

    # ---- step ------------------------------------------------------------------------
    def step(self, x: Tensor, y: Tensor) -> StepResult:
        net = self.net
        for p in self.params():
            p.grad = None
        with torch.enable_grad():
            tr = net.trace(x)
        out_full = tr.outs[-1].detach()
        c = net.num_classes
        logits = out_full[:, :c]
        loss = self.loss(logits, y)
        with torch.no_grad():
            g = self.loss.grad(logits, y)
            det = InvTrace([v.detach() for v in tr.inputs], [v.detach() for v in tr.pre], [v.detach() for v in tr.outs])
            fprimes = [layer.act.df(a) for layer, a in zip(net.layers, det.pre)]
            diffs, mults, gammas = gait_targets(
                net, det, g, self.normalize, self.gamma, self.norm, self.eta, self.scale_local,
                delta=self.uses_delta(out_full.dtype), fprimes=fprimes,
            )
            deltas = [(-2.0 * _bcast(m, d)) * fp * d for m, fp, d in zip(mults, fprimes, diffs)]
        # one autograd call: each pre[l] reaches only layer l's parameters (inputs detached)
        torch.autograd.backward(tr.pre, deltas)
        # the task updates are kept by reference; the regularizer makes a new .grad tensor
        self.task_updates = {n: (p.grad if p.grad is not None else torch.zeros_like(p))
                             for n, p in net.named_parameters() if p.requires_grad}
        if self.ortho > 0:
            with torch.no_grad():
                for layer in net.layers:
                    wt = layer.weight
                    if layer.invertible and wt.grad is not None:
                        # ortho * 4 (W W^T - I) W, the factor 4 folded into alpha (exact: a power of two)
                        reg = ortho_residual(layer.square_matrix(wt.detach())).reshape(wt.shape)
                        wt.grad = torch.add(wt.grad, reg, alpha=4.0 * self.ortho * constant_share())
        self._last_targets = (diffs, gammas)  # summarised only when diagnostics are asked for
        return StepResult(loss.detach(), logits)

    @classmethod
    def model_from_arch(cls, sizes: list[int], act: str | list[str], out_act: str, bias: bool,
                        init: str) -> nn.Module | None:
        """The invertible version of a layer spec (:func:`invertible_from_arch`). GAIT-prop needs
        orthogonal initialisation (Dalm et al. §2.3), so the config default ``xavier`` becomes
        ``orthogonal``; any other init is kept as given."""
        return invertible_from_arch(sizes, act, out_act, bias, "orthogonal" if init == "xavier" else init)

    def reported_updates(self) -> dict[str, Tensor] | None:
        """The task updates before the orthogonality regularizer (what the angles compare)."""
        return self.task_updates or None

    def uses_delta(self, dtype: torch.dtype) -> bool:
        """targets=auto: the authors' full inverse in float64, the difference form otherwise."""
        return self.targets == "delta" or (self.targets == "auto" and dtype != torch.float64)

    # ---- diagnostics ---------------------------------------------------------------------
    def diagnostics(self) -> dict[str, float]:
        """Mean target-activation distance and gamma per layer (last step), and the relative
        orthogonality error ||W W^T - I||_F / sqrt(n) of every square layer."""
        out: dict[str, float] = {}
        if self._last_targets is not None:
            diffs, gammas = self._last_targets
            for l in range(len(diffs)):
                out[f"target_dist/{l}"] = float(_per_sample_norm(diffs[l]).mean())
                if l > 0:
                    out[f"gamma/{l}"] = float(gammas[l].mean())
        with torch.no_grad():
            for l, layer in enumerate(self.net.layers):
                if layer.invertible:
                    w = layer.square_matrix(layer.weight.detach())
                    out[f"ortho_err/{l}"] = float(ortho_penalty(w).sqrt() / math.sqrt(w.shape[0]))
        return out
