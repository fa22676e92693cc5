"""Shared machinery of feedback alignment (``fa``) and direct feedback alignment (``dfa``).

BioTorch's pattern: during :meth:`Algorithm.step` every ``nn.Linear``, ``nn.Conv2d`` and
:class:`LocallyConnected2d` of *any* model is temporarily routed through one custom
``autograd.Function`` whose backward computes the weight and bias gradients from the error that
actually reaches the layer's output, but replaces the error sent to the layer's input, W^T delta,
by a different signal:

* FA (Lillicrap et al. 2016): B^T delta with a fixed random B of W's shape;
* DFA (Nokland 2016): B e, the model's output error e = dL/d(output) projected by a fixed random
  matrix to the shape of the layer's input, i.e. of the hidden activity below it.

Everything between the parameterised layers (activations, pooling, dropout, reshapes) is left
to autograd, so for an MLP with x^{l+1} = f(a_l) DFA gives delta a_l = (B_{l+1} e) * f'(a_l),
Nokland's rule, and FA gives delta a_l = (B_{l+1}^T delta a_{l+1}) * f'(a_l).

The per-layer-type operations (forward, W^T g, dL/dW, dL/db, fans) are ``singledispatch``
functions keyed on the module type, so a new layer type is one registration here.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from functools import singledispatch
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from creditlab.distributed import noise_like
from creditlab.errors import ConfigError
from creditlab.models.init import check_init, init_weight_
from creditlab.models.locally_connected import (
    LocallyConnected2d,
    locally_connected2d,
    locally_connected2d_transpose,
    locally_connected2d_weight_grad,
)

FEEDBACK_LAYER_TYPES = (nn.Linear, nn.Conv2d, LocallyConnected2d)


# ---- per-layer-type operations ---------------------------------------------------------------
@singledispatch
def layer_forward(layer: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    raise ConfigError(f"no feedback routing for layer type {type(layer).__name__}")


@layer_forward.register
def _(layer: nn.Linear, x, weight, bias):
    return F.linear(x, weight, bias)


@layer_forward.register
def _(layer: nn.Conv2d, x, weight, bias):
    return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)


@layer_forward.register
def _(layer: LocallyConnected2d, x, weight, bias):
    return locally_connected2d(x, weight, bias, layer.kernel_size, layer.stride, layer.padding, layer.out_size)


@singledispatch
def transpose_apply(layer: nn.Module, g: Tensor, weight: Tensor, x_shape: torch.Size) -> Tensor:
    """``weight^T g`` in the layer input's shape: the input gradient with ``weight`` in W's place."""
    raise ConfigError(f"no transpose for layer type {type(layer).__name__}")


@transpose_apply.register
def _(layer: nn.Linear, g, weight, x_shape):
    return (g @ weight).reshape(x_shape)


@transpose_apply.register
def _(layer: nn.Conv2d, g, weight, x_shape):
    return torch.nn.grad.conv2d_input(x_shape, weight, g, layer.stride, layer.padding, layer.dilation, layer.groups)


@transpose_apply.register
def _(layer: LocallyConnected2d, g, weight, x_shape):
    return locally_connected2d_transpose(g, weight, layer.kernel_size, layer.stride, layer.padding, layer.in_size)


@singledispatch
def weight_grad(layer: nn.Module, g: Tensor, x: Tensor) -> Tensor:
    raise ConfigError(f"no weight gradient for layer type {type(layer).__name__}")


@weight_grad.register
def _(layer: nn.Linear, g, x):
    return g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1])


@weight_grad.register
def _(layer: nn.Conv2d, g, x):
    return torch.nn.grad.conv2d_weight(x, layer.weight.shape, g, layer.stride, layer.padding, layer.dilation,
                                       layer.groups)


@weight_grad.register
def _(layer: LocallyConnected2d, g, x):
    return locally_connected2d_weight_grad(g, x, layer.kernel_size, layer.stride, layer.padding)


def bias_grad(layer: nn.Module, g: Tensor) -> Tensor:
    if isinstance(layer, nn.Linear):
        return g.reshape(-1, g.shape[-1]).sum(0)
    if isinstance(layer, nn.Conv2d):
        return g.sum((0, 2, 3))
    return g.sum(0)  # LocallyConnected2d: bias (O, oh, ow)


def layer_fans(layer: nn.Module) -> tuple[int, int]:
    if isinstance(layer, LocallyConnected2d):
        return layer.fans()
    return nn.init._calculate_fan_in_and_fan_out(layer.weight)


def check_layer(name: str, layer: nn.Module) -> None:
    if isinstance(layer, nn.Conv2d) and (isinstance(layer.padding, str) or layer.padding_mode != "zeros"):
        raise ConfigError(
            f"layer {name!r}: feedback alignment supports Conv2d with numeric zero padding only "
            f"(got padding={layer.padding!r}, padding_mode={layer.padding_mode!r}); give padding as an int"
        )


def feedback_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every Linear / Conv2d / LocallyConnected2d with a trainable weight."""
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, FEEDBACK_LAYER_TYPES) and mod.weight.requires_grad:
            check_layer(name, mod)
            out.append((name or "model", mod))
    if not out:
        raise ConfigError(
            f"model {type(model).__name__} has no nn.Linear, nn.Conv2d or LocallyConnected2d layer with a trainable "
            "weight: feedback alignment has nothing to route"
        )
    return out


# ---- feedback initialisation ----------------------------------------------------------------
def check_feedback_init(spec: str) -> str:
    text = str(spec).strip().lower()
    return text if text == "like" else check_init(text)


def like_std(like: Tensor, fan_in: int) -> float:
    """The standard deviation of the forward weight ``like`` (1/sqrt(fan_in) if it is all zeros):
    the scale the ``like`` feedback init copies."""
    std = float(like.detach().double().std()) if like.numel() > 1 else float(like.detach().abs().mean())
    return std if std > 0 else 1.0 / math.sqrt(max(fan_in, 1))


@torch.no_grad()
def init_feedback_(b: Tensor, spec: str, like: Tensor, fan_in: int, fan_out: int) -> Tensor:
    """``like``: uniform with the standard deviation of the forward weight ``like`` (as it is at
    construction: the forward init's scale); otherwise any ``models.init`` spec with the given fans."""
    if spec == "like":
        bound = like_std(like, fan_in) * math.sqrt(3.0)
        return b.uniform_(-bound, bound)
    return init_weight_(b, spec, fan_in=fan_in, fan_out=fan_out)


def sending_layers(layers: list[tuple[str, nn.Module]], state: RouteState) -> list[tuple[str, nn.Module]]:
    """The routed layers that sent an error to their input in the last pass (their input carried a
    gradient: every layer but the first of an MLP); all of them before any pass. Only these use B."""
    if not state.grad_inputs:
        return list(layers)
    return [(n, m) for n, m in layers if state.grad_inputs.get(n, False)]


# ---- routing ---------------------------------------------------------------------------------
@dataclass
class RouteState:
    """Shared by the routes of one step: the output error (DFA), the noise level, call order."""

    noise: float = 0.0
    e: Tensor | None = None
    calls: int = 0
    inputs: dict[str, torch.Size] = field(default_factory=dict)
    grad_inputs: dict[str, bool] = field(default_factory=dict)


@dataclass
class Route:
    name: str
    layer: nn.Module
    input_grad: Callable[[Tensor, torch.Size], Tensor]


class _Routed(torch.autograd.Function):
    """Forward of the layer; backward: true dL/dW, dL/db from the incoming error, and the
    route's signal (B^T delta or B e) in place of W^T delta towards the input."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, route: Route) -> Tensor:  # type: ignore[override]
        ctx.route = route
        ctx.save_for_backward(x)
        return layer_forward(route.layer, x, weight, bias)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        route: Route = ctx.route
        gx = route.input_grad(g, x.shape) if ctx.needs_input_grad[0] else None
        gw = weight_grad(route.layer, g, x) if ctx.needs_input_grad[1] else None
        gb = bias_grad(route.layer, g) if ctx.needs_input_grad[2] else None
        return gx, gw, gb, None


@contextlib.contextmanager
def routed(routes: list[Route], state: RouteState, training: bool = True) -> Iterator[None]:
    """Route each layer's ``forward`` through :class:`_Routed` while the block runs.

    With ``state.noise = sigma > 0`` and ``training``, N(0, sigma^2) is added to the input of
    every routed layer but the first one called in the pass, i.e. to every hidden layer's
    output after its nonlinearity (and pooling); the data and the model output are not perturbed.
    """
    installed = []
    try:
        for r in routes:
            if "forward" in r.layer.__dict__:
                raise ConfigError(f"layer {r.name!r} already has its forward replaced; cannot route it twice")

            def fwd(x: Tensor, _r: Route = r) -> Tensor:
                if state.noise > 0 and training and state.calls > 0:
                    x = x + state.noise * noise_like(x)
                state.calls += 1
                state.inputs[_r.name] = x.shape
                state.grad_inputs[_r.name] = x.requires_grad
                return _Routed.apply(x, _r.layer.weight, _r.layer.bias, _r)

            r.layer.forward = fwd  # type: ignore[method-assign]
            installed.append(r.layer)
        yield
    finally:
        for layer in installed:
            del layer.forward
        state.calls = 0
