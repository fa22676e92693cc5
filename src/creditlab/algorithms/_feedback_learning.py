"""Shared machinery for algorithms that *learn* feedback weights: ``np`` (node perturbation),
``sg`` (synthetic gradients fitted to the true gradient) and ``matched``.

Lansdell, Prakash & Kording (ICLR 2020), §2. A network is seen as a chain of *blocks*: block
``i`` maps its input h^{i-1} to a pre-activation a^i = W^i h^{i-1} (+ b^i) with one parametric
layer (``nn.Linear`` or ``nn.Conv2d``), followed by parameter-free modules (nonlinearity,
pooling, flatten, dropout) giving h^i. For an ``MLP`` block ``i`` is ``layers[i]`` followed by
``acts[i]``; an ``nn.Sequential`` is split before every parametric layer.

The hidden-unit gradient lambda^i = dL/dh^i is replaced by a synthetic one

* ``form=fa``  (§4.1):  g^i = (B^{i+1})^T e~^{i+1}, B^{i+1} in W^{i+1}'s shape,
* ``form=dfa`` (§4.3):  g^i = (B^{i+1})^T e~^{N+1}, B^{i+1} of shape (n_out, numel(h^i)),

and e~^i = dL/da^i with g^i injected at h^i and carried back through block ``i``'s
parameter-free modules only (g^i o sigma'(a^i) for an MLP). The output block gets its true
local delta e^{N+1} = dL/da^{N+1}. Weight updates are dL/dW^i := e~^i (h^{i-1})^T, written into
``.grad``.

In code a feedback matrix is stored as ``B`` with ``g = e @ B`` on a batch (rows = samples),
so ``B`` has shape (p, q) = (regressor width, hidden width): exactly W^{i+1}'s (out, in) shape
for the FA form. The least-squares fit of B to a target lambda (eq. 3) is either

* ``fit=sgd``: one gradient step per minibatch on 1/2 sum_n |g_n - lambda_n|^2, i.e.
  ``B.grad = e^T (e B - lambda)`` summed over the batch (the authors' code), applied by the
  optimizer with the algorithm's own learning rate (a parameter group); ``b_optimizer=sgd``
  makes that step plain SGD (B -= b_lr B.grad) whatever the run's optimizer, as the authors'
  CIFAR code does while W uses Adam;
* ``fit=ridge``: the exact recursive ridge solution over all samples seen so far (Appendix
  C.3): V = gamma I + sum e^T e, S = sum e^T lambda, B = V^{-1} S. gamma is added once and is
  *not* scaled with the sample count (as in the authors' code), so its weight fades as 1/T.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from creditlab.algorithms import Algorithm, StepResult
from creditlab.distributed import all_reduce_, batch_total
from creditlab.errors import ConfigError
from creditlab.models import MLP, Activation
from creditlab.models.init import init_weight_
from creditlab.spec import choice

PARAMETRIC = (nn.Linear, nn.Conv2d)


@dataclass
class Block:
    """One parametric layer followed by parameter-free modules: h = post(layer(h_prev))."""

    name: str
    layer: nn.Module
    post: Callable[[Tensor], Tensor]

    def __call__(self, h: Tensor) -> Tensor:
        return self.post(self.layer(h))


class _Chain(nn.Module):
    def __init__(self, mods: list[nn.Module]):
        super().__init__()
        self.mods = mods  # plain list: not registered, the model owns them

    def forward(self, h: Tensor) -> Tensor:
        for m in self.mods:
            h = m(h)
        return h


@dataclass
class BlockNet:
    """A model as ``prepare`` (input reshaping) followed by a chain of blocks."""

    prepare: Callable[[Tensor], Tensor]
    blocks: list[Block]

    def forward(self, x: Tensor, noise: list[Tensor] | None = None) -> Tensor:
        """Full forward pass; ``noise[i]`` is added to the output of hidden block ``i``."""
        h = self.prepare(x)
        for i, blk in enumerate(self.blocks):
            h = blk(h)
            if noise is not None and i < len(self.blocks) - 1:
                h = h + noise[i]
        return h

    def hidden_outputs(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        """Forward pass keeping the full graph: (h^1..h^N, output)."""
        h = self.prepare(x)
        hs = []
        for blk in self.blocks:
            h = blk(h)
            hs.append(h)
        return hs[:-1], hs[-1]

    def all_linear(self) -> bool:
        return all(isinstance(b.layer, nn.Linear) for b in self.blocks)


def split_blocks(model: nn.Module, algo: str) -> BlockNet:
    """Decompose an ``MLP`` or an ``nn.Sequential`` into blocks (see the module docstring)."""
    if isinstance(model, MLP):
        blocks = [Block(f"layers.{i}", layer, act) for i, (layer, act) in enumerate(zip(model.layers, model.acts))]
        return BlockNet(model.flatten_input, blocks)
    if isinstance(model, nn.Sequential):
        pre_mods: list[nn.Module] = []
        pending: list[tuple[str, nn.Module, list[nn.Module]]] = []
        for name, mod in model.named_children():
            has_params = any(True for _ in mod.parameters())
            if has_params:
                if not isinstance(mod, PARAMETRIC):
                    raise ConfigError(
                        f"algorithm {algo!r}: layer {name!r} ({type(mod).__name__}) has parameters but is not "
                        "nn.Linear or nn.Conv2d; feedback learning supports chains of Linear/Conv2d layers with "
                        "parameter-free modules (activations, pooling, flatten, dropout) between them"
                    )
                pending.append((name, mod, []))
            elif pending:
                pending[-1][2].append(mod)
            else:
                pre_mods.append(mod)
        if not pending:
            raise ConfigError(f"algorithm {algo!r}: the model has no nn.Linear or nn.Conv2d layer")
        blocks = [Block(n, m, _Chain(post)) for n, m, post in pending]
        return BlockNet(_Chain(pre_mods), blocks)
    raise ConfigError(
        f"algorithm {algo!r} needs an MLP (model.arch) or an nn.Sequential of Linear/Conv2d layers, "
        f"got {type(model).__name__}"
    )


def infer_in_shape(model: nn.Module, net: BlockNet) -> tuple[int, ...]:
    """Per-sample input shape: ``model.in_shape`` if set, else from the first Linear layer."""
    shape = getattr(model, "in_shape", None)
    if shape is not None:
        return tuple(int(s) for s in shape)
    first = net.blocks[0].layer
    if isinstance(first, nn.Linear):
        return (first.in_features,)
    raise ConfigError(
        f"cannot infer the input shape of {type(model).__name__}: give the model an `in_shape` attribute "
        "(the named models in creditlab.models.lansdell do)"
    )


@torch.no_grad()
def hidden_shapes(model: nn.Module, net: BlockNet, factory: dict[str, Any]) -> tuple[list[tuple[int, ...]], tuple[int, ...]]:
    """Per-sample shapes of h^1..h^N and of the output pre-activation a^{N+1} (dry run, eval mode)."""
    was_training = model.training
    model.eval()
    try:
        h = net.prepare(torch.zeros((2,) + infer_in_shape(model, net), **factory))
        shapes = []
        for blk in net.blocks[:-1]:
            h = blk(h)
            shapes.append(tuple(h.shape[1:]))
        out_pre = net.blocks[-1].layer(h)
    finally:
        model.train(was_training)
    return shapes, tuple(out_pre.shape[1:])


# ---- node perturbation: pure functions -------------------------------------------------------

def loss_scale(loss: Any, batch: int) -> float:
    """Weight of one sample's loss in the reduced batch loss (1 for sum, 1/batch for mean)."""
    return 1.0 if getattr(loss, "reduction", "sum") == "sum" else 1.0 / batch_total(batch)


def np_estimate(delta_loss: Tensor, noise: list[Tensor], sigma: float) -> list[Tensor]:
    """Node-perturbation gradient estimate (§2.3, eq. 2), per sample and hidden layer:

    lambda_hat^i = (L~ - L) xi^i / sigma^2,   xi^i ~ N(0, sigma^2 I) the noise added to h^i,

    which equals eq. 2's (L~ - L) xi/c_h with unit-variance noise. ``delta_loss`` (batch,) is
    each sample's contribution to the reduced loss, noisy minus clean."""
    out = []
    for n in noise:
        d = delta_loss.reshape((-1,) + (1,) * (n.dim() - 1))
        out.append(d * n / (sigma * sigma))
    return out


def ridge_update(V: Tensor, S: Tensor, X: Tensor, Y: Tensor) -> Tensor:
    """Recursive ridge regression (Appendix C.3): V += X^T X, S += X^T Y (in place); returns
    B = V^{-1} S, the minimiser of sum |X B - Y|^2 + gamma |B|_F^2 over all rows seen so far
    (V starts at gamma I, S at 0)."""
    V.add_(all_reduce_(X.T @ X))  # summed over the ranks of a data-parallel run
    S.add_(all_reduce_(X.T @ Y))
    return torch.linalg.solve(V, S)


def sgd_fit_grad(B: Tensor, X: Tensor, Y: Tensor) -> Tensor:
    """Gradient of 1/2 sum_n |X_n B - Y_n|^2 in B (summed over the batch): X^T (X B - Y)."""
    return X.T @ (X @ B - Y)


# ---- the shared algorithm --------------------------------------------------------------------

@dataclass
class CleanPass:
    """The clean forward pass with block inputs detached (every block its own graph)."""

    pre: list[Tensor]
    out: list[Tensor]
    per_sample: Tensor
    loss: Tensor
    e_out: Tensor


class FeedbackLearner(Algorithm):
    """Base for ``np``, ``sg`` and ``matched``: feedback matrices B (one per hidden block)
    carry the output error down (FA or DFA form); subclasses say how B is fitted."""

    forms: tuple[str, ...] = ("fa", "dfa")
    fits: tuple[str, ...] = ("sgd", "ridge")

    def __init__(self, model: nn.Module, loss: Any, **options: Any):
        super().__init__(model, loss, **options)
        o = self.options
        self.form = choice(f"algorithm {self.name}", "form", o.get("form", "fa"), self.forms)
        self.fit = choice(f"algorithm {self.name}", "fit", o.get("fit", "sgd"), self.fits)
        self.order = choice(f"algorithm {self.name}", "order", o.get("order", "simultaneous"), ("simultaneous", "sequential"))
        if self.order == "sequential" and self.fit != "ridge":
            raise ConfigError(f"algorithm {self.name!r}: order=sequential needs fit=ridge (an SGD step on B is applied by the optimizer, after the step)")
        self.gamma = float(o.get("gamma", 0.1))
        if self.gamma < 0:
            raise ConfigError(f"algorithm {self.name!r}: gamma={self.gamma} must be >= 0")
        self.warmup = int(o.get("warmup", 0))
        if self.warmup < 0:
            raise ConfigError(f"algorithm {self.name!r}: warmup={self.warmup} must be >= 0 (steps)")
        b_lr = o.get("b_lr", None)
        self.b_lr = None if b_lr is None else float(b_lr)
        if self.b_lr is not None and self.b_lr < 0:
            raise ConfigError(f"algorithm {self.name!r}: b_lr={self.b_lr} must be >= 0")
        # run: B is a group of the run's optimizer; sgd: plain SGD at b_lr whatever the run's
        # optimizer (the authors' CIFAR code: B <- B - beta grad_B while W uses Adam)
        self.b_optimizer = choice(f"algorithm {self.name}", "b_optimizer", o.get("b_optimizer", "run"), ("run", "sgd"))
        if self.b_optimizer == "sgd" and self.fit != "sgd":
            raise ConfigError(f"algorithm {self.name!r}: b_optimizer=sgd needs fit=sgd (fit=ridge solves for B exactly)")
        self.net = split_blocks(model, self.name)
        if len(self.net.blocks) < 2:
            raise ConfigError(f"algorithm {self.name!r} needs at least one hidden layer")
        if self.form == "fa" and not self.net.all_linear():
            raise ConfigError(
                f"algorithm {self.name!r}: form=fa needs nn.Linear layers only (B in W's shape); "
                "use form=dfa for convolutional models"
            )
        fk = self.factory_kwargs()
        self.h_shapes, self.out_pre_shape = hidden_shapes(model, self.net, fk)
        n_out = int(torch.Size(self.out_pre_shape).numel())
        self.B_shapes: list[tuple[int, int]] = []
        for i, hs in enumerate(self.h_shapes):
            q = int(torch.Size(hs).numel())
            if self.form == "fa":
                w = self.net.blocks[i + 1].layer.weight
                self.B_shapes.append((int(w.shape[0]), int(w.shape[1])))
            else:
                self.B_shapes.append((n_out, q))
        self.steps = 0
        self.B: list[Tensor] = []
        self.V: list[Tensor] = []
        self.S: list[Tensor] = []
        init = str(o.get("b_init", "xavier"))
        for p, q in self.B_shapes:
            if self.fit == "ridge":
                self.V.append(self.gamma * torch.eye(p, **fk))
                self.S.append(torch.zeros(p, q, **fk))
                self.B.append(torch.zeros(p, q, **fk))
            else:
                b = torch.empty(p, q, **fk)
                init_weight_(b, init, fan_in=p, fan_out=q)
                self.B.append(b)
        self._last: tuple[Tensor, Tensor] | None = None
        self._params = self.model_params()
        self._block_params = [p for blk in self.net.blocks for p in blk.layer.parameters() if p.requires_grad]

    # ---- subclass hooks ------------------------------------------------------------------
    def targets(self, x: Tensor, y: Tensor, clean: CleanPass) -> list[Tensor] | None:
        """Per-sample regression targets for every B (shape of h^i), or None (no fit)."""
        raise NotImplementedError

    # ---- helpers -------------------------------------------------------------------------
    def layer_names(self) -> list[str]:
        """Name of the forward layer each B stands in for (W^{i+1}'s module)."""
        return [self.net.blocks[i + 1].name for i in range(len(self.B))]

    def model_params(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def clean_pass(self, x: Tensor, y: Tensor) -> CleanPass:
        pre, out = [], []
        with torch.enable_grad():
            h = self.net.prepare(x)
            for blk in self.net.blocks:
                a = blk.layer(h.detach())
                h = blk.post(a)
                pre.append(a)
                out.append(h)
            per = self.loss.per_sample(out[-1], y)
            value = self.loss.reduce(per)  # = self.loss(out, y)
            (e_out,) = torch.autograd.grad(value, pre[-1], retain_graph=True)
        return CleanPass(pre, out, per.detach(), value.detach(), e_out.detach())

    def feedback(self, i: int, e: Tensor) -> Tensor:
        """g^i = e @ B_i reshaped to h^i (e: the regressor, batch x p)."""
        return (e.reshape(e.shape[0], -1) @ self.B[i]).reshape((e.shape[0],) + self.h_shapes[i])

    def through_post(self, i: int, g: Tensor, clean: CleanPass) -> Tensor:
        """e~^i: g^i carried back through block i's parameter-free modules (g o f'(a^i) for
        an MLP activation, autograd through pooling/flatten/dropout otherwise)."""
        post = self.net.blocks[i].post
        if isinstance(post, Activation):
            return g * post.df(clean.pre[i].detach())
        (e,) = torch.autograd.grad(clean.out[i], clean.pre[i], grad_outputs=g, retain_graph=True)
        return e

    def regressor(self, i: int, es: list[Tensor | None], e_out: Tensor) -> Tensor:
        e = es[i + 1] if self.form == "fa" else e_out
        assert e is not None
        return e.reshape(e.shape[0], -1)

    def fit_b(self, i: int, X: Tensor, Y: Tensor) -> None:
        Y = Y.reshape(Y.shape[0], -1)
        if self.fit == "ridge":
            self.B[i] = ridge_update(self.V[i], self.S[i], X, Y)
        else:
            self.B[i].grad = sgd_fit_grad(self.B[i], X, Y)

    # ---- the interface -------------------------------------------------------------------
    def step(self, x: Tensor, y: Tensor) -> StepResult:
        for p in self._params:
            p.grad = None
        clean = self.clean_pass(x, y)
        tg = self.targets(x, y, clean)
        L = len(self.net.blocks)
        es: list[Tensor | None] = [None] * L
        es[L - 1] = clean.e_out
        regs: list[Tensor] = [clean.e_out] * (L - 1)
        for i in reversed(range(L - 1)):
            X = self.regressor(i, es, clean.e_out)
            regs[i] = X
            if self.order == "sequential" and tg is not None:
                self.fit_b(i, X, tg[i])
            es[i] = self.through_post(i, self.feedback(i, X), clean)
        if self.steps >= self.warmup:
            self.write_updates(clean, es)
        if self.order == "simultaneous" and tg is not None:
            for i in range(L - 1):
                self.fit_b(i, regs[i], tg[i])
        self.after_updates(clean, es)
        self.steps += 1
        self._last = (x.detach(), y.detach())
        return StepResult(clean.loss, clean.out[-1].detach(), {})

    def write_updates(self, clean: CleanPass, es: list[Tensor | None]) -> None:
        """.grad of every block's parameters = dL/dtheta with e~^i injected at a^i (one
        autograd call: each a^i depends only on its own block's parameters)."""
        ps = self._block_params
        grads = torch.autograd.grad(clean.pre, ps, grad_outputs=es, retain_graph=True)
        for p, g in zip(ps, grads):
            p.grad = g.detach()

    def after_updates(self, clean: CleanPass, es: list[Tensor | None]) -> None:
        """Hook run after the W updates are written (``matched`` uses it)."""

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        if self.fit == "ridge":
            return []
        group: dict[str, Any] = {"params": list(self.B), "lr": lr if self.b_lr is None else self.b_lr, "weight_decay": 0.0}
        if self.b_optimizer == "sgd":
            group["plain_sgd"] = True  # creditlab.build.build_optimizer steps it by p -= lr * grad
        return [group]

    def feedback_pairs(self) -> list[tuple[str, Tensor | None, Tensor]]:
        """(layer name, the matrix B should converge to or None, B in that matrix's shape)."""
        from creditlab.diagnostics.node_perturbation import target_matrices

        return list(zip(self.layer_names(), target_matrices(self.net, self.form), self.B))

    def diagnostics(self) -> dict[str, float]:
        from creditlab.diagnostics.node_perturbation import feedback_report

        if self._last is None:
            return {}
        x, y = self._last
        return feedback_report(self, x, y)

    def state_dict(self) -> dict[str, Any]:
        return {"B": [b.detach().clone() for b in self.B], "V": [v.clone() for v in self.V],
                "S": [s.clone() for s in self.S], "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for i, b in enumerate(state["B"]):
            if self.fit == "ridge":
                self.B[i] = b.to(self.B[i]).clone()
            else:
                self.B[i].data.copy_(b)  # keep the tensor the optimizer holds
        for i, v in enumerate(state.get("V", [])):
            self.V[i].copy_(v)
        for i, s in enumerate(state.get("S", [])):
            self.S[i].copy_(s)
        self.steps = int(state["steps"])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "FeedbackLearner":
        for lst in (self.B, self.V, self.S):
            for t in lst:
                t.data = t.data.to(device=device, dtype=dtype)  # in place: optimizer groups keep B
        return self
