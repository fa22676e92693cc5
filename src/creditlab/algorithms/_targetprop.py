"""Shared machinery of the target-propagation family (Bartunov et al. 2018, §2.1.2, Algorithm 1;
Lee et al. 2015): ``tp``, ``dtp``, ``sdtp`` and ``aosdtp``.

Network: h_0 = x, h_{l+1} = f_l(h_l) = sigma_l(layer_l(h_l)) for l = 0..L-1 (code indices; the
paper's layer l+1); the output activity h_L is softmax(logits) for a cross-entropy loss, the
model output otherwise. Layer l >= 1 has a learned inverse

    g_l(h_{l+1}) = sigma_{l-1}(V_l^T h_{l+1} + c_l)  ~  f_l^{-1}(h_{l+1}),

"parameterised like the forward layer": V_l has W_l's shape and is applied as a transpose of
layer_l (a matrix transpose for Linear, a transposed convolution for Conv2d, and for a
LocallyConnected2d the adjoint LC map with the sparsity of W^T, the paper's §5.4). Layer 0 has
no inverse.

Targets (computed without gradients, except DTP's penultimate one):
  * tp:     h^_l = g_{l+1}(h^_{l+1}),                       h^_L = argmin loss (the label)
  * dtp:    h^_l = g_{l+1}(h^_{l+1}) + h_l - g_{l+1}(h_{l+1}),  h^_{L-1} = h_{L-1} - alpha dL/dh_{L-1}
            (L summed over the batch, ``alpha_loss=sum``, or averaged, ``alpha_loss=mean``)
  * sdtp:   difference correction down from h^_L = argmin loss (no gradient anywhere)
  * aosdtp: h_L = [o, z] with z = tanh(A h_{L-1}) fixed random features; h^_{L-1} = h_{L-1} -
            g(o, z) + g(o^, z), then difference correction.
Forward loss of layer l < L-1: ||f_l(h_l) - h^_{l+1}||^2 (sum over units, mean over the batch),
gradient stopped at h_l; the output layer minimises the task loss with its input detached.
Inverse loss of layer l: ||h~ - g_l(f_l(h~))||^2 (``noise-preserving``, DTP) or
||h - g_l(f_l(h~))||^2 (``denoise``, SDTP), h~ = h + N(0, sigma^2), forward parameters fixed.
A step does not build these sums: their gradients with respect to the activities they compare,
2 (f_l(h_l) - h^_{l+1}) / B and 2 (g_l(f_l(h~)) - target) / B, are formed in closed form and
sent, with the task loss, into one ``torch.autograd.backward`` call from the activities (the
same numbers autograd gives for the sums, without their graph).

Schedules: ``parallel`` (both losses on every batch) or ``alternating``: every epoch is one full
pass of the data training one loss, then one full pass training the other (``first`` says which
comes first; the inverses by default), as in Lee et al.'s DTP code and Meulemans et al.'s
``train_separate``, so ``epochs`` counts forward epochs for both schedules. The loop asks
:meth:`TargetPropagation.epoch_batches` for the epoch's batches, which an alternating run
returns twice (the first pass, then the second); the algorithm counts its steps within the epoch
(kept in its state, so a run resumed mid-epoch continues in the right pass).
Forward parameters use the loop's optimizer settings; the inverses get their own Adam
hyper-parameters through :meth:`param_groups` (``inv_lr``, ``inv_beta1``, ``inv_beta2``,
``inv_eps``).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from creditlab.algorithms import Algorithm, StepResult
from creditlab.algorithms._feedback import layer_fans, layer_forward, transpose_apply
from creditlab.distributed import batch_total, noise_like
from creditlab.errors import ConfigError
from creditlab.losses import CrossEntropyLoss, Loss, as_targets
from creditlab.models.activations import Activation, make_activation
from creditlab.models.init import init_weight_
from creditlab.models.locally_connected import LocallyConnected2d
from creditlab.spec import choice

TP_LAYER_TYPES = (nn.Linear, nn.Conv2d, LocallyConnected2d)


def layer_input(layer: nn.Module, h: Tensor) -> Tensor:
    """A Linear layer flattens a spatial input (as MLP and LayerStack do)."""
    return h.flatten(1) if isinstance(layer, nn.Linear) and h.dim() > 2 else h


def require_chain(model: nn.Module, algo: str) -> tuple[list[nn.Module], list[Activation]]:
    """The model's ``layers`` and ``acts`` (an MLP or a Bartunov LayerStack)."""
    layers = getattr(model, "layers", None)
    acts = getattr(model, "acts", None)
    if layers is None or acts is None or len(layers) != len(acts):
        raise ConfigError(
            f"algorithm {algo!r} needs a layer chain with .layers and .acts (an MLP from --arch, or a Bartunov model "
            f"such as mnist-fc, mnist-lc, cifar-lc), got {type(model).__name__}"
        )
    for i, layer in enumerate(layers):
        if not isinstance(layer, TP_LAYER_TYPES):
            raise ConfigError(f"algorithm {algo!r}: layer {i} is {type(layer).__name__}; supported: Linear, Conv2d, "
                              "LocallyConnected2d")
    if len(layers) < 2:
        raise ConfigError(f"algorithm {algo!r} needs at least two layers (one hidden layer)")
    return list(layers), list(acts)  # type: ignore[arg-type]


class Inverse(nn.Module):
    """g(h) = sigma(V^T h + c) with V of the forward weight's shape (for AO-SDTP's top layer:
    [W; aux] rows) and c per input feature (Linear), per channel (Conv2d) or per position and
    channel (LocallyConnected2d). ``forward(h, shape)`` returns a tensor of ``shape``, the shape of
    the activity it reconstructs."""

    def __init__(self, layer: nn.Module, act: Activation, weight_shape: torch.Size, init: str, **fk: Any):
        super().__init__()
        self.layer = [layer]  # a list, not a submodule: the forward layer's parameters are not ours
        self.act = act
        self.weight = nn.Parameter(torch.empty(weight_shape, **fk))
        if isinstance(layer, nn.Linear):
            bias_shape: tuple[int, ...] = (layer.in_features,)
        elif isinstance(layer, nn.Conv2d):
            bias_shape = (layer.in_channels, 1, 1)
        else:
            bias_shape = (layer.in_channels, *layer.in_size)
        self.bias = nn.Parameter(torch.zeros(bias_shape, **fk))
        if tuple(weight_shape) == tuple(layer.weight.shape):
            fan_in, fan_out = layer_fans(layer)
        else:
            fan_in, fan_out = int(weight_shape[1]), int(weight_shape[0])
        with torch.no_grad():  # the inverse maps outputs to inputs: the forward fans swapped
            init_weight_(self.weight, init, fan_in=fan_out, fan_out=fan_in)

    def forward(self, h: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
        n = h.shape[0]
        layer = self.layer[0]
        if isinstance(layer, nn.Linear):
            pre = (h.reshape(n, -1) @ self.weight + self.bias).reshape(shape)
        else:
            pre = transpose_apply(layer, h, self.weight, torch.Size(shape)) + self.bias
        return self.act(pre)


class TargetPropagation(Algorithm):
    """Base of tp, dtp, sdtp, aosdtp; subclasses set ``name``, ``penultimate``, ``correction``
    and the defaults."""

    penultimate: ClassVar[str] = "inverse"  # inverse | gradient | aux
    correction: ClassVar[bool] = True
    base_defaults: ClassVar[dict[str, Any]] = {
        "schedule": "parallel", "first": "inverse", "sigma": 0.1, "inverse_loss": "denoise",
        "inv_lr": None, "inv_beta1": None, "inv_beta2": None, "inv_eps": None, "inv_init": "xavier",
    }
    divergence_hint = "lower the forward learning rate or the inverse learning rate (inv_lr), or the noise sigma"

    def __init__(self, model: nn.Module, loss: Loss, **options: Any):
        super().__init__(model, loss, **options)
        o = self.options
        self.schedule = choice(f"algorithm {self.name}", "schedule", o["schedule"], ("parallel", "alternating"))
        self.first = choice(f"algorithm {self.name}", "first", o["first"], ("inverse", "forward"))
        self.inverse_loss = choice(f"algorithm {self.name}", "inverse_loss", o["inverse_loss"],
                                   ("denoise", "preserve"))
        self.sigma = float(o["sigma"])
        if self.sigma < 0:
            raise ConfigError(f"algorithm {self.name}: sigma={self.sigma} must be >= 0 (noise standard deviation)")
        self.alpha = float(o.get("alpha", 0.0))
        self.alpha_loss = choice(f"algorithm {self.name}", "alpha_loss", o.get("alpha_loss", "sum"), ("sum", "mean"))
        self.layers, self.acts = require_chain(model, self.name)
        self.phase = "both" if self.schedule == "parallel" else self.first
        # alternating: the epoch the step count belongs to, steps done in it, one pass's length
        self._epoch: int | None = None
        self._done = 0
        self._pass_len: int | None = None
        self.aux_act = make_activation(str(o.get("aux_act", "tanh")))
        self.n_aux = int(o.get("aux", 0))
        self._last_hs: list[Tensor] | None = None
        self._build()

    # ---- building ------------------------------------------------------------------------
    def _build(self) -> None:
        fk = self.factory_kwargs()
        L = len(self.layers)
        inv = []
        for i in range(1, L):
            layer = self.layers[i]
            wshape = layer.weight.shape
            if i == L - 1 and self.penultimate == "aux":
                if not isinstance(layer, nn.Linear):
                    raise ConfigError(f"algorithm {self.name}: the output layer must be Linear for auxiliary outputs")
                if self.n_aux < 1:
                    raise ConfigError(f"algorithm {self.name}: aux={self.n_aux} must be >= 1 auxiliary units")
                wshape = torch.Size((wshape[0] + self.n_aux, wshape[1]))
            inv.append(Inverse(layer, self.acts[i - 1], wshape, str(self.options["inv_init"]), **fk))
        self.inverses = nn.ModuleList(inv)
        self.aux: Tensor | None = None
        if self.penultimate == "aux":
            n_in = self.layers[L - 1].in_features
            self.aux = init_weight_(torch.empty(self.n_aux, n_in, **fk), "xavier")

    def inverse(self, i: int) -> Inverse:
        """g_i, the inverse of layer i (i = 1..L-1)."""
        return self.inverses[i - 1]  # type: ignore[return-value]

    # ---- the network's pieces -------------------------------------------------------------
    def f(self, i: int, h: Tensor, detach_params: bool = False) -> Tensor:
        """f_i(h) = sigma_i(layer_i(h)), optionally with the layer's parameters detached."""
        layer = self.layers[i]
        x = layer_input(layer, h)
        if detach_params:
            b = layer.bias.detach() if layer.bias is not None else None
            return self.acts[i](layer_forward(layer, x, layer.weight.detach(), b))
        return self.acts[i](layer(x))

    def output_activity(self, out: Tensor) -> Tensor:
        """h_L: the softmax of the logits for cross-entropy, the output itself otherwise."""
        return torch.softmax(out, dim=1) if isinstance(self.loss, CrossEntropyLoss) else out

    def output_target(self, out: Tensor, y: Tensor) -> Tensor:
        """h^_L = argmin over h_L of the loss: the one-hot label (or the dense target)."""
        return as_targets(y, out)

    def aux_features(self, h: Tensor) -> Tensor:
        assert self.aux is not None
        return self.aux_act(h.reshape(h.shape[0], -1) @ self.aux.t())

    def top_input(self, h_pen: Tensor, out_activity: Tensor, z: Tensor | None = None) -> Tensor:
        """What the last inverse reads: h_L, or [o, z] for AO-SDTP (``z`` = the auxiliary
        features of ``h_pen``, computed here unless given)."""
        if self.penultimate == "aux":
            return torch.cat([out_activity, self.aux_features(h_pen) if z is None else z], dim=1)
        return out_activity

    def penultimate_gradient(self, h_pen: Tensor, y: Tensor) -> Tensor:
        """dL/dh_{L-1} through the output layer only. ``alpha_loss=sum`` (default): L summed over
        the batch, i.e. each sample's own gradient (alpha independent of the batch size);
        ``alpha_loss=mean``: L averaged over the (global) batch, as in Lee et al.'s and Meulemans
        et al.'s code, i.e. the per-sample gradient divided by the batch size B (so alpha_mean =
        B x alpha_sum for the same step)."""
        leaf = h_pen.detach().requires_grad_(True)
        with torch.enable_grad():
            value = self.loss.per_sample(self.f(len(self.layers) - 1, leaf, detach_params=True), y).sum()
            (g,) = torch.autograd.grad(value, leaf)
        if self.alpha_loss == "mean":
            g = g / batch_total(h_pen.shape[0])
        return g

    @torch.no_grad()
    def targets(self, hs: list[Tensor], y: Tensor) -> list[Tensor | None]:
        """[None, h^_1, ..., h^_{L-1}, h^_L] from the detached forward activities ``hs``."""
        L = len(self.layers)
        t: list[Tensor | None] = [None] * (L + 1)
        t[L] = self.output_target(hs[L], y)
        if self.penultimate == "gradient":
            t[L - 1] = hs[L - 1] - self.alpha * self.penultimate_gradient(hs[L - 1], y)
        elif self.penultimate == "aux":
            # h_{L-1} - g(o, z) + g(o^, z): both terms share the auxiliary part z V_z + c of the
            # inverse's pre-activation, computed once
            g = self.inverse(L - 1)
            n_out = t[L].shape[1]
            shared = self.aux_features(hs[L - 1]) @ g.weight[n_out:] + g.bias
            g_hat = g.act(t[L] @ g.weight[:n_out] + shared)
            if self.correction:
                g_out = g.act(self.output_activity(hs[L]) @ g.weight[:n_out] + shared)
                t[L - 1] = hs[L - 1] - g_out + g_hat
            else:
                t[L - 1] = g_hat
        else:
            g, shape = self.inverse(L - 1), hs[L - 1].shape
            if self.correction:
                t[L - 1] = hs[L - 1] - g(self.output_activity(hs[L]), shape) + g(t[L], shape)
            else:
                t[L - 1] = g(t[L], shape)
        for i in range(L - 2, 0, -1):
            g, shape = self.inverse(i), hs[i].shape
            t_up = t[i + 1]
            assert t_up is not None
            if self.correction:
                t[i] = g(t_up, shape) + hs[i] - g(hs[i + 1], shape)
            else:
                t[i] = g(t_up, shape)
        return t

    # ---- losses -------------------------------------------------------------------------
    @staticmethod
    def _loss_scale(h: Tensor) -> Tensor:
        """2 / B in ``h``'s dtype as autograd forms it for ``||.||^2 / B`` (1 / B rounded in the
        dtype, then doubled), so the closed-form gradients equal autograd's of the sums."""
        return 2.0 * (torch.ones((), device=h.device, dtype=h.dtype) / batch_total(h.shape[0]))

    def forward_deltas(self, hs_graph: list[Tensor], hs: list[Tensor],
                       t: list[Tensor | None]) -> tuple[list[Tensor], list[Tensor]]:
        """The hidden layers' forward losses sum_l ||f_l(h_l) - h^_{l+1}||^2 / B as (activities,
        gradients) for ``torch.autograd.backward``: ``hs_graph[l+1]`` = f_l(h_l.detach()) with
        its graph, gradient 2 (h_{l+1} - h^_{l+1}) / B."""
        L = len(self.layers)
        scale = self._loss_scale(hs[0])
        outs, grads = [], []
        for i in range(L - 1):
            target = t[i + 1]
            assert target is not None
            h = hs[i + 1]
            outs.append(hs_graph[i + 1])
            grads.append((h - target.reshape(h.shape)).mul_(scale))
        return outs, grads

    def inverse_deltas(self, hs: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """The inverse losses sum over l = 1..L-1 of ||target - g_l(f_l(h~_l))||^2 / B (forward
        parameters fixed) as (reconstructions with their graph, gradients 2 (rec - target) / B)."""
        L = len(self.layers)
        scale = self._loss_scale(hs[0])
        outs, grads = [], []
        for i in range(1, L):
            h = hs[i]
            ht = noise_like(h).mul_(self.sigma).add_(h) if self.sigma > 0 else h
            with torch.no_grad():
                fh = self.f(i, ht)
                if i == L - 1:
                    fh = self.top_input(ht, self.output_activity(fh))
            with torch.enable_grad():
                rec = self.inverse(i)(fh, h.shape)
            target = ht if self.inverse_loss == "preserve" else h
            outs.append(rec)
            grads.append((rec.detach() - target).mul_(scale))
        return outs, grads

    @torch.no_grad()
    def reconstruction_errors(self, hs: list[Tensor]) -> dict[str, float]:
        """||h_l - g_l(f_l(h_l))||^2 / ||h_l||^2 for every inverse, on the clean activities."""
        L = len(self.layers)
        out = {}
        for i in range(1, L):
            top = self.top_input(hs[i], self.output_activity(hs[i + 1])) if i == L - 1 else hs[i + 1]
            rec = self.inverse(i)(top, hs[i].shape)
            h = hs[i]
            denom = float((h ** 2).sum())
            out[f"recon_err/layer{i}"] = float(((rec - h) ** 2).sum()) / denom if denom > 0 else math.nan
        return out

    # ---- the interface --------------------------------------------------------------------
    def step(self, x: Tensor, y: Tensor) -> StepResult:
        if self.schedule == "alternating":
            self.phase = self._pass_phase(self._done)
        for p in self.params():
            p.grad = None
        for p in self.inverses.parameters():
            p.grad = None
        L = len(self.layers)
        train_fwd = self.phase in ("both", "forward")
        train_inv = self.phase in ("both", "inverse")
        with torch.set_grad_enabled(train_fwd):  # the forward graph only when the forward weights learn
            hs_graph = [x]
            for i in range(L):
                hs_graph.append(self.f(i, hs_graph[i].detach()))
        hs = [h.detach() for h in hs_graph]
        outs: list[Tensor] = []
        grads: list[Tensor | None] = []
        task = None
        if train_fwd:
            t = self.targets(hs, y)
            with torch.enable_grad():
                task = self.loss(hs_graph[L], y)  # the output layer learns the task loss itself
            outs.append(task)
            grads.append(None)
            o, g = self.forward_deltas(hs_graph, hs, t)
            outs += o
            grads += g
        if train_inv:
            o, g = self.inverse_deltas(hs)
            outs += o
            grads += g
        if outs:
            torch.autograd.backward(outs, grads)  # one call: each activity reaches only its own layer
        if task is None:
            with torch.no_grad():
                task = self.loss(hs[L], y)
        self._last_hs = hs
        if self.schedule == "alternating":
            self._done += 1  # counted once the step is complete (an interrupted step is redone)
        return StepResult(task.detach(), hs[L])

    def _pass_phase(self, k: int) -> str:
        """The loss trained by step ``k`` of an alternating epoch: ``first`` during the first pass
        (all of it while the pass length is unknown, i.e. without :meth:`epoch_batches`)."""
        if self._pass_len is None or k < self._pass_len:
            return self.first
        return "forward" if self.first == "inverse" else "inverse"

    def on_epoch_start(self, epoch: int) -> None:
        """Alternating: a new epoch starts counting its steps from 0 (the epoch a resumed
        checkpoint stopped in keeps its count)."""
        if self.schedule == "alternating" and epoch != self._epoch:
            self._epoch, self._done = epoch, 0
            self.phase = self.first

    def epoch_batches(self, epoch: int, batches: list[Tensor]) -> list[Tensor]:
        """The batches the loop runs in ``epoch``: an alternating epoch is two passes over the same
        batches (the ``first`` loss, then the other); a parallel one is one pass."""
        if self.schedule != "alternating":
            return batches
        self._pass_len = len(batches)
        return list(batches) + list(batches)

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """One group for the inverses with their own Adam hyper-parameters (inv_lr, inv_beta1,
        inv_beta2, inv_eps; unset ones follow the optimizer's). With only one of inv_beta1 /
        inv_beta2 set, the other entry of ``betas`` is None: :func:`creditlab.build.build_optimizer`
        fills it with the forward optimizer's value (never a hard-coded one)."""
        o = self.options
        group: dict[str, Any] = {"name": "inverses", "params": list(self.inverses.parameters()), "lr": float(o["inv_lr"] if o["inv_lr"] is not None else lr)}
        if o["inv_beta1"] is not None or o["inv_beta2"] is not None:
            group["betas"] = (None if o["inv_beta1"] is None else float(o["inv_beta1"]),
                              None if o["inv_beta2"] is None else float(o["inv_beta2"]))
        if o["inv_eps"] is not None:
            group["eps"] = float(o["inv_eps"])
        return [group]

    def diagnostics(self) -> dict[str, float]:
        """Reconstruction error of every inverse on the last batch (computed on demand: the loop
        asks only at its logging steps, so training steps do not pay for it)."""
        return self.reconstruction_errors(self._last_hs) if self._last_hs is not None else {}

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"phase": self.phase, "epoch": self._epoch, "steps_in_epoch": self._done,
                                 "inverses": {k: v.detach().clone() for k, v in self.inverses.state_dict().items()}}
        if self.aux is not None:
            state["aux"] = self.aux.clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.phase = str(state.get("phase", self.phase))
        self._epoch = state.get("epoch", self._epoch)
        self._done = int(state.get("steps_in_epoch", self._done))
        self.inverses.load_state_dict(state["inverses"])
        if self.aux is not None:
            if "aux" not in state:
                raise ConfigError(f"algorithm {self.name}: checkpoint lacks the auxiliary weights")
            self.aux = state["aux"].to(self.aux)

    def to(self, device=None, dtype=None) -> "TargetPropagation":
        self.inverses.to(device=device, dtype=dtype)
        if self.aux is not None:
            self.aux = self.aux.to(device=device, dtype=dtype)
        return self

