"""The operation tables of graph AR, the random state of a node (recorded and replayed), and
the derivative of an elementwise activation."""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from creditlab.models.activations import Activation, ReLU, Sigmoid, Tanh

DERIVATIVE_CHOICES = (True, False, "no_conv", "no_fc")

ACT_MODULES = (Activation, nn.Tanh, nn.ReLU, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU,
               nn.Softplus, nn.Identity, nn.Hardtanh, nn.ReLU6)
ACT_FUNCTIONS = {torch.tanh, torch.relu, torch.sigmoid, F.relu, F.tanh, F.sigmoid, F.leaky_relu,
                 F.elu, F.gelu, F.silu, F.softplus, F.hardtanh, F.relu6}
ACT_METHODS = {"tanh", "relu", "sigmoid"}
RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape}
RESHAPE_METHODS = {"view", "reshape", "flatten", "clone", "contiguous"}

# Operations known to draw no random numbers: every other node's forward RNG state is recorded
# and replayed whenever its operation is evaluated again (a dropout mask is forward state).
DETERMINISTIC_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Flatten, nn.Unflatten, nn.MaxPool2d,
                         nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.LayerNorm, nn.GroupNorm, nn.Embedding,
                         nn.modules.batchnorm._BatchNorm) + ACT_MODULES
DETERMINISTIC_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.neg,
                           operator.getitem, getattr, torch.cat, torch.stack, torch.matmul, torch.add, torch.sub,
                           torch.mul} | RESHAPE_FUNCTIONS | ACT_FUNCTIONS
DETERMINISTIC_METHODS = {"size", "dim", "view", "reshape", "flatten", "unsqueeze", "squeeze", "permute",
                         "transpose", "contiguous", "clone", "expand", "mean", "sum", "chunk", "split",
                         "softmax", "exp", "max", "matmul"} | ACT_METHODS

# Nodes whose output may share memory with an input (an in-place operation on it cannot be
# rewritten out of place without alias analysis): refused there.
VIEW_METHODS = {"view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "transpose", "permute", "t",
                "squeeze", "unsqueeze", "expand", "expand_as", "narrow", "select", "unfold", "as_strided",
                "detach", "diagonal", "contiguous", "chunk", "split", "unbind", "movedim", "swapaxes", "to",
                "type_as", "float", "double", "half", "real", "imag", "T", "mT", "data"}
VIEW_FUNCTIONS = {operator.getitem, getattr, torch.flatten, torch.reshape, torch.transpose, torch.permute,
                  torch.squeeze, torch.unsqueeze, torch.narrow, torch.select, torch.chunk, torch.split,
                  torch.unbind, torch.t, torch.movedim, torch.detach, torch.diagonal}
VIEW_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.modules.dropout._DropoutNd)


# ----------------------------------------------------------------------------------------
# the random state of a node, recorded in the forward pass and replayed
# ----------------------------------------------------------------------------------------
def _device_generator(device: torch.device) -> tuple[Any, dict[str, Any]] | None:
    """The module holding ``device``'s generator (torch.cuda, torch.xpu, torch.mps, ...) and the
    keyword naming the device, or None for the CPU."""
    if device.type == "cpu":
        return None
    mod = getattr(torch, device.type, None)
    if mod is None or not hasattr(mod, "get_rng_state"):
        return None
    return mod, ({"device": device} if device.type in ("cuda", "xpu") else {})


def rng_state(x: Tensor) -> tuple[Tensor, Tensor | None, torch.device]:
    """The generators' states now: the CPU one and that of ``x``'s device (if not the CPU)."""
    gen = _device_generator(x.device)
    dev = gen[0].get_rng_state(**gen[1]) if gen is not None else None
    return torch.get_rng_state(), dev, x.device


@contextmanager
def replaying(state: tuple[Tensor, Tensor | None, torch.device] | None) -> Iterator[None]:
    """Run with the generators set to ``state`` (so an operation draws what it drew in the
    forward pass), then put them back as they were."""
    if state is None:
        yield
        return
    cpu, dev, device = state
    gen = _device_generator(device) if dev is not None else None
    saved_cpu = torch.get_rng_state()
    saved_dev = gen[0].get_rng_state(**gen[1]) if gen is not None else None
    torch.set_rng_state(cpu)
    if gen is not None:
        gen[0].set_rng_state(dev, **gen[1])
    try:
        yield
    finally:
        torch.set_rng_state(saved_cpu)
        if gen is not None:
            gen[0].set_rng_state(saved_dev, **gen[1])


def get_attr(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def act_name(gm: fx.GraphModule, act: fx.Node) -> str | None:
    """The activation's name where its derivative has a closed form (tanh, sigmoid, relu,
    identity), else None; kept in the node's meta (a traced node's operation does not change)."""
    if "ar_act_name" not in act.meta:
        act.meta["ar_act_name"] = _act_name(gm, act)
    return act.meta["ar_act_name"]


def _act_name(gm: fx.GraphModule, act: fx.Node) -> str | None:
    if act.op == "call_module":
        m = gm.get_submodule(str(act.target))
        for name, types in (("tanh", (Tanh, nn.Tanh)), ("sigmoid", (Sigmoid, nn.Sigmoid)), ("relu", (ReLU, nn.ReLU)),
                            ("identity", (nn.Identity,))):
            if type(m) in types:
                return name
        return None
    if act.op == "call_method":
        return str(act.target) if act.target in ("tanh", "sigmoid", "relu") else None
    return {torch.tanh: "tanh", F.tanh: "tanh", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid",
            torch.relu: "relu", F.relu: "relu"}.get(act.target)  # type: ignore[arg-type]


class ReluDerivative:
    """relu'(a) held as the forward output h: ``times_derivative(v, d)`` is autograd's
    ``threshold_backward(v, h, 0)`` (v where h > 0, else 0), one pass without a 0/1 mask."""

    def __init__(self, h: Tensor):
        self.h = h

    def apply(self, v: Tensor) -> Tensor:
        h = self.h if v.shape == self.h.shape else self.h.expand(v.shape)
        return torch.ops.aten.threshold_backward(v, h, 0)


Derivative = Tensor | ReluDerivative


def times_derivative(v: Tensor, d: Derivative | None) -> Tensor:
    """v * f'(a) elementwise (v may carry a leading stack dimension); ``d`` None: v."""
    if d is None:
        return v
    if isinstance(d, ReluDerivative):
        return d.apply(v)
    return v * d


def act_derivative(gm: fx.GraphModule, act: fx.Node, a: Tensor, h: Tensor) -> Derivative | None:
    """f'(a) elementwise (h = f(a) is the forward output): tanh, sigmoid and relu from h (the
    same arithmetic as their ``Activation.df``), None for ``nn.Identity`` (f' = 1: nothing to
    multiply), other creditlab activations by ``df``, any other function by autograd."""
    name = act_name(gm, act)
    if name == "identity":
        return None
    if name == "tanh":
        return 1.0 - h**2
    if name == "sigmoid":
        return h * (1.0 - h)
    if name == "relu":
        return ReluDerivative(h)
    if act.op == "call_module":
        m = gm.get_submodule(str(act.target))
        if isinstance(m, Activation):
            return m.df(a)
        f: Callable[[Tensor], Tensor] = m
    elif act.op == "call_method":
        f = lambda t: getattr(t, str(act.target))()
    else:
        extra_args = act.args[1:]
        kw = dict(act.kwargs)
        f = lambda t: act.target(t, *extra_args, **kw)  # type: ignore[operator]
    with torch.enable_grad():
        t = a.detach().requires_grad_(True)
        y = f(t.clone())  # an in-place activation module must not write into the leaf
        (g,) = torch.autograd.grad(y, t, torch.ones_like(y))
    return g.detach()
