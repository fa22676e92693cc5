"""The first-step guard of graph AR (``verify=first``; the shared part, with the criterion, is
:mod:`creditlab.algorithms._verify`): the traced forward must be ``model(x)`` (else the first
differing node is named) and the equilibrium updates must be autograd's gradients."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.overrides import TorchFunctionMode

from creditlab.algorithms._verify import guard_first_step, tolerance
from creditlab.algorithms.graph_ar.relaxation import relax_graph_exact


class _Recorder(TorchFunctionMode):
    """Records, in order, every floating tensor a torch function or method returns (copies),
    and the in-place operations run (name ends with ``_`` or is an augmented assignment)."""

    def __init__(self) -> None:
        super().__init__()
        self.values: list[Tensor] = []
        self.inplace: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        if (name.endswith("_") and not name.endswith("__")) or (name.startswith("__i") and name != "__init__"):
            self.inplace.append(name)
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, Tensor) and t.is_floating_point():
                self.values.append(t.detach().clone())
        return out


def locate_divergence(gm: fx.GraphModule, env: dict[str, Any], model: nn.Module, x: Tensor) -> str:
    """``: first at node NAME (...)``: the first node of the traced graph whose value ``model(x)``
    (run again eagerly, every torch function's result recorded in order) does not compute after
    the values matched to the nodes before it; and the in-place operations ``model(x)`` runs."""
    rec = _Recorder()
    with torch.no_grad(), rec:
        model(x)
    tol = tolerance(x.dtype)
    pos = -1
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "get_attr", "output") or n.name not in env:
            continue
        v = env[n.name]
        if not (isinstance(v, Tensor) and v.is_floating_point()):
            continue
        vd = v.detach().double()
        scale = float(vd.norm())
        hit = next((i for i in range(pos + 1, len(rec.values)) if rec.values[i].shape == v.shape
                    and float((rec.values[i].double() - vd).norm()) <= tol * scale), None)
        if hit is not None:
            pos = hit
            continue
        target = getattr(n.target, "__name__", str(n.target))
        inplace = ""
        if rec.inplace:
            inplace = (f"; model(x) runs in-place operations ({', '.join(sorted(set(rec.inplace)))}), which torch.fx "
                       "may trace with other semantics (`h += f(h)` is traced out of place)")
        return f": first at node {n.name!r} ({n.op} {target}), whose value model(x) does not compute{inplace}"
    return ""


class GuardRules:
    """The guard's part of :class:`GraphActivationRelaxation` (a mixin)."""

    def _is_backprop(self) -> bool:
        o = self.options
        return (math.isinf(o["steps"]) and o["feedback"] == "transpose" and o["derivative"] is True
                and o["update_derivative"] is True)

    @torch.no_grad()
    def equilibrium_updates(self, env: dict[str, Any], clamp: Tensor) -> dict[int, tuple[Tensor, Tensor]]:
        """The updates at the fixed point with transpose feedback and every f' (= backprop's
        gradients when every operation is handled exactly), by id of the parameter."""
        rel, derivs = self.build(env, clamp, exact=True)
        states = relax_graph_exact(rel, None, math.inf, 1.0, "synchronous")
        return self.updates(env, rel, states, derivs, True, exact=True)[0]

    def _verify(self, x: Tensor, y: Tensor, env: dict[str, Any], clamp: Tensor,
                grads: dict[int, tuple[Tensor, Tensor]], before) -> bool:
        names = {id(p): n for n, p in self.model.named_parameters()}

        def updates() -> dict[str, Tensor | None]:
            eq = grads if self._is_backprop() else self.equilibrium_updates(env, clamp)
            return {names[i]: g for i, (_, g) in eq.items() if i in names}

        def consumer(pname: str) -> str:
            p = dict(self.model.named_parameters())[pname]
            users = [u for u, ps in self._plan.params.items() if any(q is p for _, q in ps)]
            return f" (used by node {users[0]!r})" if users else " (no unit of the traced graph uses it)"

        return guard_first_step(self.name, self.model, self.loss, x, y, before, env[self.out_node.name], updates,
                                lambda: locate_divergence(self.gm, env, self.model, x), consumer)
