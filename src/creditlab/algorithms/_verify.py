"""The first-step guard of Activation Relaxation (``verify=first``), shared by the MLP ``ar``
and graph AR.

On the first step the algorithm checks, against autograd of the same loss on the same batch,
(a) that the forward it relaxes around reproduces ``model(x)`` and (b) that its *equilibrium*
updates (steps = inf, transpose feedback, derivatives on: the machinery every variant is built
from) equal the gradients. A gap in the handling of an operation becomes a ConfigError naming
what differs instead of a silently wrong update. The check consumes no training randomness (the
RNG state is restored around it, and the reference forward draws from the state the step's own
forward started from, so dropout masks agree) and leaves buffers (running statistics) as one
forward pass left them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from creditlab.errors import ConfigError

VERIFY_CHOICES = ("first", "off")


def tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of the guard: 1e-8 in float64, 1e-4 in float32, 1e-2 below."""
    if dtype == torch.float64:
        return 1e-8
    if dtype == torch.float32:
        return 1e-4
    return 1e-2


# ----------------------------------------------------------------------------------------
# random state and buffers
# ----------------------------------------------------------------------------------------
@dataclass
class ForwardState:
    """The RNG states (CPU and the batch's device) and the model's buffers at one moment."""

    rng: list[tuple[str, Any]]
    buffers: list[Tensor]


def snapshot(model: nn.Module, device: torch.device) -> ForwardState:
    rng: list[tuple[str, Any]] = [("cpu", torch.get_rng_state())]
    mod = getattr(torch, device.type, None) if device.type != "cpu" else None
    if mod is not None and hasattr(mod, "get_rng_state"):
        kw = {"device": device} if device.type in ("cuda", "xpu") else {}
        rng.append((device.type, (mod.get_rng_state(**kw), kw)))
    return ForwardState(rng, [b.detach().clone() for b in model.buffers()])


def restore(model: nn.Module, state: ForwardState) -> None:
    for kind, s in state.rng:
        if kind == "cpu":
            torch.set_rng_state(s)
        else:
            getattr(torch, kind).set_rng_state(s[0], **s[1])
    with torch.no_grad():
        for b, v in zip(model.buffers(), state.buffers):
            b.copy_(v)


# ----------------------------------------------------------------------------------------
# comparisons
# ----------------------------------------------------------------------------------------
def relative_difference(a: Tensor, b: Tensor, floor: float = 0.0) -> float:
    """||a - b|| / max(||b||, floor), in float64 (0 when both are zero)."""
    a, b = a.detach().double(), b.detach().double()
    den = max(float(b.norm()), floor)
    num = float((a - b).norm())
    return 0.0 if num == 0.0 else (num / den if den > 0 else math.inf)


def autograd_gradients(algo: str, model: nn.Module, value: Tensor) -> dict[str, Tensor]:
    """d value / d p for every trainable parameter by name (zeros where unused); a model that
    autograd cannot differentiate is refused (the guard has no reference then)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    try:
        grads = torch.autograd.grad(value, [p for _, p in named], allow_unused=True)
    except RuntimeError as err:
        raise ConfigError(f"{algo} verify=first: autograd cannot differentiate model(x) on this batch "
                          f"({str(err).splitlines()[0]}), so neither bp nor the guard has a reference; "
                          "remove the in-place operation or other cause it names") from None
    return {n: (torch.zeros_like(p) if g is None else g.detach()) for (n, p), g in zip(named, grads)}


def _finite(ts) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in ts)


def guard_first_step(algo: str, model: nn.Module, loss, x: Tensor, y: Tensor, before: ForwardState,
                     traced_out: Tensor, updates: Callable[[], dict[str, Tensor | None]],
                     locate: Callable[[], str] | None = None,
                     consumer: Callable[[str], str] | None = None) -> bool:
    """The guard, called after the step's own forward pass, relaxation and updates.

    ``before`` is the state the step's forward started from; ``traced_out`` that forward's model
    output; ``updates()`` the equilibrium updates (transpose feedback, derivatives) by parameter
    name (None: no update); ``locate()`` names the first node where the traced forward departs
    from ``model(x)``; ``consumer(name)`` names the node using a parameter. Returns False (check
    still pending) when the reference has non-finite values (a divergence, reported by the
    training loop), True when it passed; raises ConfigError otherwise."""
    after = snapshot(model, x.device)
    try:
        restore(model, before)
        with torch.enable_grad():
            eager = model(x)
            value = loss(eager, y)
        eager_out = eager.detach()
        if not _finite([eager_out, value.detach()]):
            return False
        tol = tolerance(traced_out.dtype)
        for (name, b), v in zip(model.named_buffers(), after.buffers):
            if b.is_floating_point() and relative_difference(b, v, 1e-3) > tol or not b.is_floating_point() \
                    and not torch.equal(b, v):
                raise ConfigError(
                    f"{algo} verify=first: buffer {name!r} after model(x) differs from after the forward pass the "
                    "relaxation runs: an update of it is not recorded in the traced graph; keep state in torch.nn "
                    "modules (BatchNorm) or outside forward; verify=off skips this check")
        if tuple(eager_out.shape) != tuple(traced_out.shape) or relative_difference(traced_out, eager_out) > tol:
            err = (relative_difference(traced_out, eager_out) if eager_out.shape == traced_out.shape else math.inf)
            where = ""
            if locate is not None:
                restore(model, before)
                where = locate()
            raise ConfigError(
                f"{algo} verify=first: the forward pass the relaxation runs differs from model(x) (relative "
                f"difference {err:.2e} > {tol:.0e}){where}; rewrite that operation (out of place, without "
                "Python-level state), or train this model with bp; verify=off skips this check")
        ref = autograd_gradients(algo, model, value)
        if not _finite(ref.values()):
            return False
        got = updates()
        norms = [float(r.double().norm()) for r in ref.values()]
        floor = 1e-3 * math.sqrt(sum(n * n for n in norms))
        for name, r in ref.items():
            g = got.get(name)
            if g is not None and not _finite([g]):
                return False
            err = relative_difference(torch.zeros_like(r) if g is None else g, r, floor)
            if err > tol:
                used = consumer(name) if consumer is not None else ""
                raise ConfigError(
                    f"{algo} verify=first: the equilibrium update of parameter {name!r}{used} differs from autograd's "
                    f"gradient of the same loss on this batch (relative error {err:.2e} > {tol:.0e} for "
                    f"{str(r.dtype).replace('torch.', '')}): an operation is not handled exactly; replace it, or train "
                    "this model with bp; verify=off skips this check")
        return True
    finally:
        restore(model, after)
