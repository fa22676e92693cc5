"""The operation tables of graph AR and the derivative of an elementwise activation."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from creditlab.models.activations import Activation, ReLU, Sigmoid, Tanh

DERIVATIVE_CHOICES = (True, False, "no_conv", "no_fc")

ACT_MODULES = (Activation, nn.Tanh, nn.ReLU, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU,
                nn.Softplus, nn.Identity, nn.Hardtanh, nn.ReLU6)
ACT_FUNCTIONS = {torch.tanh, torch.relu, torch.sigmoid, F.relu, F.tanh, F.sigmoid, F.leaky_relu,
                  F.elu, F.gelu, F.silu, F.softplus, F.hardtanh, F.relu6}
ACT_METHODS = {"tanh", "relu", "sigmoid"}
RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape}
UNSUPPORTED_MODULES = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm, nn.RReLU)
UNSUPPORTED_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.batch_norm,
                          F.rrelu, torch.rand_like, torch.randn_like, torch.bernoulli}
RESHAPE_METHODS = {"view", "reshape", "flatten"}


def get_attr(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def act_name(gm: fx.GraphModule, act: fx.Node) -> str | None:
    if act.op == "call_module":
        m = gm.get_submodule(str(act.target))
        for name, types in (("tanh", (Tanh, nn.Tanh)), ("sigmoid", (Sigmoid, nn.Sigmoid)), ("relu", (ReLU, nn.ReLU))):
            if type(m) in types:
                return name
        return None
    if act.op == "call_method":
        return str(act.target) if act.target in ("tanh", "sigmoid", "relu") else None
    return {torch.tanh: "tanh", F.tanh: "tanh", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid",
            torch.relu: "relu"}.get(act.target)  # type: ignore[arg-type]


def act_derivative(gm: fx.GraphModule, act: fx.Node, a: Tensor, h: Tensor) -> Tensor:
    """f'(a) elementwise (h = f(a) is the forward output): tanh, sigmoid and relu from h (the
    same arithmetic as their ``Activation.df``), other creditlab activations by ``df``, any
    other function by autograd."""
    name = act_name(gm, act)
    if name == "tanh":
        return 1.0 - h**2
    if name == "sigmoid":
        return h * (1.0 - h)
    if name == "relu":
        return (h > 0).to(h.dtype)
    if act.op == "call_module":
        m = gm.get_submodule(str(act.target))
        if isinstance(m, Activation):
            return m.df(a)
        f: Callable[[Tensor], Tensor] = m
    elif act.op == "call_method":
        f = lambda t: getattr(t, str(act.target))()  # noqa: E731
    else:
        extra_args = act.args[1:]
        kw = dict(act.kwargs)
        f = lambda t: act.target(t, *extra_args, **kw)  # type: ignore[operator]  # noqa: E731
    with torch.enable_grad():
        t = a.detach().requires_grad_(True)
        y = f(t)
        (g,) = torch.autograd.grad(y, t, torch.ones_like(y))
    return g.detach()
