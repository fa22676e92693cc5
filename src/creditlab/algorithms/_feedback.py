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

Parameters outside those layers get autograd's gradient of the feedback error that reaches
them: BatchNorm / LayerNorm affine parameters, class tokens, position embeddings, embedding
tables. Their own gradient is local (the error at the parameter's use times what it multiplies;
no weight matrix is transported), which is FA's rule applied to them. Modules whose weight
matrices the routing cannot reach and whose autograd backward would carry the error through W^T,
i.e. backprop inside them (``nn.RNNBase``, ``nn.RNNCellBase``, ``nn.MultiheadAttention``, the
convolutions other than ``nn.Conv2d``, ``nn.Bilinear``), are refused by name while they have
trainable parameters, unless the algorithm's option ``unrouted=autograd`` accepts that they are
trained by autograd from the feedback error that reaches them (:func:`feedback_layers`). A routed
layer whose ``forward`` never runs while its weight is in the loss's graph (its parent uses the
weight directly) is refused by name in the step (:meth:`Router.check_forwards`).

The per-layer-type operations (forward, W^T g, dL/dW, dL/db, fans, and the backward that gives
all three at once) are ``singledispatch`` functions keyed on the module type, so a new layer type
is one registration here; each route resolves them once, at construction. Per step the routing
costs one Python ``forward`` wrapper and one custom-Function node per layer call: the wrappers
are built once per algorithm (:class:`Router`) and only installed and removed around the step;
a Conv2d's backward is one ``convolution_backward`` call (input gradient with B and weight
gradient together), as backprop's is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import singledispatch
from typing import Callable

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
from creditlab.spec import choice

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


@singledispatch
def layer_backward(layer: nn.Module, g: Tensor, x: Tensor, feedback: Tensor | None, need_weight: bool,
                   need_bias: bool) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(input gradient with ``feedback`` in W's place, or None if ``feedback`` is None; dL/dW if
    ``need_weight``; dL/db if ``need_bias``) of the error ``g`` at the layer's output, ``x`` its
    input. The generic form is the three per-type operations above; a type registers a fused one."""
    gx = transpose_apply(layer, g, feedback, x.shape) if feedback is not None else None
    gw = weight_grad(layer, g, x) if need_weight else None
    gb = bias_grad(layer, g) if need_bias else None
    return gx, gw, gb


@layer_backward.register
def _(layer: nn.Linear, g, x, feedback, need_weight, need_bias):
    if g.dim() != 2:  # (batch, ..., features): the generic reshapes
        return layer_backward.dispatch(nn.Module)(layer, g, x, feedback, need_weight, need_bias)
    # the same mm calls as transpose_apply / weight_grad / bias_grad make for 2-D g, without their reshapes
    return (g.mm(feedback) if feedback is not None else None, g.t().mm(x) if need_weight else None,
            g.sum(0) if need_bias else None)


@layer_backward.register
def _(layer: nn.Conv2d, g, x, feedback, need_weight, need_bias):
    # one convolution_backward call, as backprop's: the input gradient with B in W's place and the
    # weight gradient (which does not read the weight argument) at once; each output is computed
    # exactly as conv2d_input / conv2d_weight compute it alone. The bias gradient stays g.sum((0, 2, 3)).
    gx = gw = None
    if feedback is not None or need_weight:
        gx, gw, _ = torch.ops.aten.convolution_backward(
            g, x, feedback if feedback is not None else layer.weight, None, layer.stride, layer.padding,
            layer.dilation, False, [0, 0], layer.groups, [feedback is not None, need_weight, False])
    return gx, gw, (g.sum((0, 2, 3)) if need_bias else None)


def layer_fans(layer: nn.Module) -> tuple[int, int]:
    if isinstance(layer, LocallyConnected2d):
        return layer.fans()
    return nn.init._calculate_fan_in_and_fan_out(layer.weight)


_BASE_FORWARD = {nn.Linear: nn.Linear.forward, nn.Conv2d: nn.Conv2d.forward,
                 LocallyConnected2d: LocallyConnected2d.forward}


def check_layer(name: str, layer: nn.Module) -> None:
    if isinstance(layer, nn.Conv2d) and (isinstance(layer.padding, str) or layer.padding_mode != "zeros"):
        raise ConfigError(
            f"layer {name!r}: feedback alignment supports Conv2d with numeric zero padding only "
            f"(got padding={layer.padding!r}, padding_mode={layer.padding_mode!r}); give padding as an int"
        )
    for base, fwd in _BASE_FORWARD.items():
        if isinstance(layer, base) and type(layer).forward is not fwd:
            raise ConfigError(
                f"layer {name!r}: {type(layer).__name__} overrides {base.__name__}.forward, which feedback routing "
                f"replaces by {base.__name__}'s own operation; make it a module that calls a plain {base.__name__}"
            )


UNROUTED = ("refuse", "autograd")


def unrouted_reason(module: nn.Module) -> str | None:
    """Why the routing cannot reach ``module``'s weights while autograd's backward would carry the
    error through them (backprop inside it), or None for a module that is not of such a type."""
    if isinstance(module, nn.RNNBase):
        return "its weight_ih_l*/weight_hh_l* are raw parameters of one fused recurrent operation"
    if isinstance(module, nn.RNNCellBase):
        return "its weight_ih/weight_hh are raw parameters of one fused cell operation"
    if isinstance(module, nn.MultiheadAttention):
        return ("its in_proj_weight is a bare parameter and its out_proj's forward is never called "
                "(the attention uses out_proj.weight directly)")
    if isinstance(module, nn.modules.conv._ConvNd) and not isinstance(module, nn.Conv2d):
        return f"the routing covers nn.Conv2d, not {type(module).__name__}"
    if isinstance(module, nn.Bilinear):
        return "the routing covers nn.Linear, not nn.Bilinear"
    return None


def feedback_layers(model: nn.Module, unrouted: str = "refuse", algo: str = "fa") -> list[tuple[str, nn.Module]]:
    """(name, module) of every Linear / Conv2d / LocallyConnected2d with a trainable weight.

    A module of a type the routing cannot reach (:func:`unrouted_reason`: nn.LSTM and every
    nn.RNNBase, RNN cells, nn.MultiheadAttention, other convolutions, nn.Bilinear) that has
    trainable parameters is refused by name (``unrouted="refuse"``, the default), or, with
    ``unrouted="autograd"``, left to autograd with every layer it owns (MultiheadAttention's
    ``out_proj``): it is trained by autograd from the feedback error that reaches it."""
    unrouted = choice(f"algorithm {algo}", "unrouted", str(unrouted).strip().lower(), UNROUTED)
    owned: list[str] = []  # names of the unrouted modules: their own layers are not routed
    out = []
    for name, mod in model.named_modules():
        if any(name.startswith(p + ".") or not p for p in owned):
            continue
        reason = unrouted_reason(mod)
        if reason is not None:
            if unrouted == "refuse" and any(p.requires_grad for p in mod.parameters()):
                raise ConfigError(
                    f"{algo}: module {name or 'model'!r} ({type(mod).__name__}) has trainable parameters that feedback "
                    f"routing cannot reach: {reason}, so autograd would train it by backprop from the feedback error "
                    f"that reaches it; pass {algo}:unrouted=autograd to accept that, or freeze it (requires_grad_(False))"
                )
            owned.append(name)
            continue
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
    """Shared by the routes of one step: the output error (DFA), the noise level, call order, and
    of every routed layer whose forward ran in the current (or last) pass, its input's shape and
    whether its input carried a gradient."""

    noise: float = 0.0
    e: Tensor | None = None
    calls: int = 0
    training: bool = True
    inputs: dict[str, torch.Size] = field(default_factory=dict)
    grad_inputs: dict[str, bool] = field(default_factory=dict)


class Route:
    """One routed layer: how its backward sends the error to its input. Either ``feedback`` (FA and
    its families: a callable giving this pass's B, of W's shape, sent through the layer's
    transpose) or ``input_grad`` (DFA: a callable ``(g, x_shape) -> Tensor``, the error for the
    input). The layer type's forward and backward operations are resolved once, here."""

    __slots__ = ("name", "layer", "feedback", "input_grad", "forward_op", "backward_op")

    def __init__(self, name: str, layer: nn.Module, input_grad: Callable[[Tensor, torch.Size], Tensor] | None = None,
                 feedback: Callable[[], Tensor] | None = None):
        if (input_grad is None) == (feedback is None):
            raise TypeError("Route needs exactly one of input_grad and feedback")
        self.name, self.layer = name, layer
        self.feedback, self.input_grad = feedback, input_grad
        self.forward_op = layer_forward.dispatch(type(layer))
        self.backward_op = layer_backward.dispatch(type(layer))


class _Routed(torch.autograd.Function):
    """Forward of the layer; backward: true dL/dW, dL/db from the incoming error, and the
    route's signal (B^T delta or B e) in place of W^T delta towards the input."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, route: Route) -> Tensor:  # type: ignore[override]
        ctx.route = route
        ctx.save_for_backward(x)
        return route.forward_op(route.layer, x, weight, bias)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        route: Route = ctx.route
        nx, nw, nb = ctx.needs_input_grad[:3]
        if route.feedback is not None:
            gx, gw, gb = route.backward_op(route.layer, g, x, route.feedback() if nx else None, nw, nb)
        else:
            _, gw, gb = route.backward_op(route.layer, g, x, None, nw, nb)
            gx = route.input_grad(g, x.shape) if nx else None
        return gx, gw, gb, None


# Function.apply without its Python wrapper (what it calls outside functorch transforms; under
# them the wrapper is used, and refuses this Function, which has no setup_context).
_apply_c = super(torch.autograd.Function, _Routed).apply


def _apply(x: Tensor, weight: Tensor, bias: Tensor | None, route: Route) -> Tensor:
    if torch._C._are_functorch_transforms_active():
        return _Routed.apply(x, weight, bias, route)
    return _apply_c(x, weight, bias, route)


class Router:
    """Routes each layer's ``forward`` through :class:`_Routed` while a ``with router(training):``
    block runs. The wrappers are built once, here; entering installs them on the layers (instance
    attributes, as ``layer.forward = ...`` would) and clears the per-pass records, leaving removes them.

    With ``state.noise = sigma > 0`` and ``training``, N(0, sigma^2) is added to the input of
    every routed layer but the first one called in the pass, i.e. to every hidden layer's
    output after its nonlinearity (and pooling); the data and the model output are not perturbed.
    """

    def __init__(self, routes: list[Route], state: RouteState):
        self.routes, self.state = routes, state
        self._wrappers = [(r.layer, self._wrapper(r)) for r in routes]
        self._installed: list[nn.Module] = []
        self._checked: frozenset[str] | None = None  # the routed layers that did not run in the last checked pass

    def _wrapper(self, route: Route) -> Callable[[Tensor], Tensor]:
        state, name, layer = self.state, route.name, route.layer
        inputs, grad_inputs = state.inputs, state.grad_inputs

        def forward(x: Tensor) -> Tensor:
            if state.noise > 0 and state.training and state.calls > 0:
                x = x + state.noise * noise_like(x)
            state.calls += 1
            inputs[name] = x.shape
            grad_inputs[name] = x.requires_grad
            return _apply(x, layer.weight, layer.bias, route)

        return forward

    def __call__(self, training: bool = True) -> "Router":
        self.state.training = training
        return self

    def __enter__(self) -> "Router":
        if self._installed:
            raise ConfigError("feedback routing is already active; cannot enter it twice")
        state = self.state
        state.inputs.clear()
        state.grad_inputs.clear()
        state.calls = 0
        try:
            for (layer, fwd), r in zip(self._wrappers, self.routes):
                d = layer.__dict__
                if "forward" in d:
                    raise ConfigError(f"layer {r.name!r} already has its forward replaced; cannot route it twice")
                d["forward"] = fwd
                self._installed.append(layer)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for layer in self._installed:
            layer.__dict__.pop("forward", None)
        self._installed.clear()
        self.state.calls = 0

    def check_forwards(self, root: Tensor, algo: str) -> None:
        """Refuse by name a routed layer whose weight reaches ``root``'s autograd graph other than
        through its routed forward: its forward never ran (its parent uses the weight directly)
        or the weight is also used directly. Autograd would train that use by backprop (W^T) and
        its B would go unused or only partly used. The graph is walked in the first pass and
        whenever the set of routed layers that did not run changes; otherwise this costs nothing."""
        ran = self.state.grad_inputs
        if self._checked is not None and not self._checked and len(ran) >= len(self.routes):
            return  # every routed layer ran, as in the last checked pass
        missing = frozenset(r.name for r in self.routes if r.name not in ran)
        if missing == self._checked:
            return
        weights = {id(r.layer.weight): r.name for r in self.routes}
        direct = _direct_uses(root, weights)
        for r in self.routes:
            if r.name not in direct:
                continue
            if r.name in missing:
                what = "was never called: its parent uses its weight directly"
            else:
                what = "is not the only use of its weight: its weight is also used directly (outside the layer's call)"
            raise ConfigError(
                f"{algo}: the forward of layer {r.name!r} {what}, so autograd would train that use by backprop "
                "and its feedback would go unused there; call the layer as a module instead of using its weight, "
                "or freeze it (requires_grad_(False))"
            )
        self._checked = missing


_ROUTED_NODE = _Routed._backward_cls


def _direct_uses(root: Tensor, weights: dict[int, str]) -> set[str]:
    """The names (values of ``weights``, keyed by the id of a tensor) of the tensors that ``root``'s
    autograd graph accumulates a gradient into from a node other than a routed layer's."""
    found: set[str] = set()
    if root.grad_fn is None:
        return found
    seen = {root.grad_fn}
    stack = [root.grad_fn]
    while stack:
        fn = stack.pop()
        routed_node = isinstance(fn, _ROUTED_NODE)
        for child, _ in fn.next_functions:
            if child is None:
                continue
            if not routed_node:  # an edge into a leaf's AccumulateGrad from anything but a routed layer
                var = getattr(child, "variable", None)
                if var is not None and id(var) in weights:
                    found.add(weights[id(var)])
            if child not in seen:
                seen.add(child)
                stack.append(child)
    return found


def routed(routes: list[Route], state: RouteState, training: bool = True) -> Router:
    """A :class:`Router` for ``routes`` entered once (``with routed(routes, state): ...``); an
    algorithm keeps one Router instead, so that its wrappers are built once."""
    return Router(routes, state)(training)
