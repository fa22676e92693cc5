"""The predictions of standard predictive coding, at the value nodes' *current* values.

Every relaxed unit u of graph AR's plan (an operation with its fused activation) predicts its
value from its parents' value nodes: mu_u = f_u(x_parents), the other inputs (the model input,
constants, shapes) at their forward values. One :class:`Prediction` per unit and relaxation
step holds mu_u, the vector-Jacobian product v -> J_u^T v with respect to each relaxed parent,
and the local update (d mu_u / d theta)^T delta of the unit's parameters, all at the parents'
values it was made from. ``nn.Linear`` units have closed forms; every other operation runs its
autograd VJP through graph AR's evaluation of the unit (random draws replayed, buffers as
before the forward pass, multi-output operations evaluated inside the unit).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from creditlab.algorithms.graph_ar.ops import act_derivative, times_derivative
from creditlab.errors import ConfigError
from creditlab.models.activations import Linear as LinearActivation

Grads = list[tuple[nn.Parameter, Tensor]]


@dataclass
class Prediction:
    """mu_u at one set of parent values; ``vjp(v)`` maps a vector of mu_u's shape to the
    contributions J^T v per relaxed parent (by unit name); ``grads(delta)`` gives each trainable
    parameter's (d mu_u / d theta)^T delta."""

    mu: Tensor
    vjp: Callable[[Tensor], dict[str, Tensor]]
    grads: Callable[[Tensor], Grads]


def _no_push(v: Tensor) -> dict[str, Tensor]:
    return {}


def _act_call(gm: fx.GraphModule, act: fx.Node, env: dict[str, Any]) -> Callable[[Tensor], Tensor] | None:
    """h = f(a) of a fused activation node (None where f is the identity)."""
    if act.op == "call_module":
        mod = gm.get_submodule(str(act.target))
        if isinstance(mod, (nn.Identity, LinearActivation)):
            return None
        if act.meta.get("inplace_module"):
            return lambda a: mod(a.clone())
        return mod
    rest = fx.node.map_arg(act.args[1:], lambda n: env[n.name])
    kw = fx.node.map_arg(act.kwargs, lambda n: env[n.name])
    if act.op == "call_method":
        return lambda a: getattr(a, str(act.target))(*rest, **kw)
    return lambda a: act.target(a, *rest, **kw)  # type: ignore[operator]


# an operation's rule at the current parent values: (a, VJP of a w.r.t. the parents, the
# parameters' updates at a cotangent of a); the fused activation is applied after it
OpRule = tuple[Tensor, Callable[[Tensor], dict[str, Tensor]], Callable[[Tensor], Grads]]


class UnitPredictor:
    """How one relaxed unit predicts its value: ``predict(values, params)`` -> :class:`Prediction`
    (``values``: the current value of every free unit by name; ``params``: whether the
    prediction will also give its parameters' updates). Linear, Conv2d, max-pool, reshape, add,
    cat and unfused activation units have closed-form rules (:data:`RULES`); any other operation
    runs autograd through graph AR's evaluation of the unit."""

    def __init__(self, g: Any, name: str, env: dict[str, Any]):
        self.g, self.name = g, name
        self.unit = u = g.unit_by_name[name]
        plan = g._plan
        self.parents: list[fx.Node] = plan.parents[name]
        self.parent_units = [g.owner[a.name] for a in self.parents]
        self.params = plan.params[name]
        self.env = env
        self.act = _act_call(g.gm, u.act, env) if u.act is not None else None
        self.rule = None if plan.inlined[name] else RULES.get(u.kind)
        if self.rule is not None and not self.rule.applies(self):
            self.rule = None
        self.fn = g._function(u, env, self.parents, self.params)

    @property
    def constant(self) -> bool:
        """Whether mu_u reads no relaxing value (e.g. the first layer): the same every step."""
        return not self.parents

    def input(self, values: dict[str, Tensor], i: int = 0) -> Tensor:
        """The current value of the operation's i-th argument (a node)."""
        a = self.unit.op.args[i]
        owner = self.g.owner.get(a.name)  # type: ignore[union-attr]
        return values[owner] if owner in values else self.env[a.name]  # type: ignore[union-attr]

    def predict(self, values: dict[str, Tensor], params: bool = False) -> Prediction:
        if self.rule is None:
            return self._predict_generic(values, params)
        a, op_vjp, op_grads = self.rule.evaluate(self, values)
        h = a if self.act is None else self.act(a)
        d = None if self.act is None else act_derivative(self.g.gm, self.unit.act, a, h)
        vjp = (lambda v: op_vjp(times_derivative(v, d))) if self.parents else _no_push
        return Prediction(h, vjp, lambda delta: op_grads(times_derivative(delta, d)))

    def _predict_generic(self, values: dict[str, Tensor], params: bool) -> Prediction:
        with torch.enable_grad():
            xs = [values[n].detach().requires_grad_(True) for n in self.parent_units]
            ps = [p.detach().requires_grad_(params) for _, p in self.params]
            a = self.fn(*xs, *ps)
            h = a if self.act is None else self.act(a)
        names = self.parent_units

        def vjp(v: Tensor) -> dict[str, Tensor]:
            if not h.requires_grad:
                return {}
            gs = torch.autograd.grad(h, xs, v, retain_graph=True, allow_unused=True)
            return {n: g for n, g in zip(names, gs) if g is not None}

        def grads(delta: Tensor) -> Grads:
            if not params:
                raise RuntimeError("pc: a prediction made without params=True has no parameter updates")
            if not ps or not h.requires_grad:
                return []
            gs = torch.autograd.grad(h, ps, delta, retain_graph=True, allow_unused=True)
            return [(q, torch.zeros_like(q) if g is None else g) for (_, q), g in zip(self.params, gs)]

        return Prediction(h.detach(), vjp if xs else _no_push, grads)


def _single_input(pr: UnitPredictor) -> bool:
    op = pr.unit.op
    return len(op.args) == 1 and not op.kwargs and isinstance(op.args[0], fx.Node) \
        and len(op.all_input_nodes) == 1 and all(a is op.args[0] for a in pr.parents)


def _no_grads(dd: Tensor) -> Grads:
    return []


class _LinearRule:
    @staticmethod
    def applies(pr: UnitPredictor) -> bool:
        return type(pr.unit.module) is nn.Linear and _single_input(pr)

    @staticmethod
    def evaluate(pr: UnitPredictor, values: dict[str, Tensor]) -> OpRule:
        m: nn.Linear = pr.unit.module  # type: ignore[assignment]
        w, b = m.weight, m.bias
        xp = pr.input(values)
        p = pr.parent_units[0] if pr.parents else None

        def grads(dd: Tensor) -> Grads:
            out: Grads = []
            d2 = dd.reshape(-1, dd.shape[-1])
            if w.requires_grad:
                out.append((w, d2.t() @ xp.reshape(-1, xp.shape[-1])))
            if b is not None and b.requires_grad:
                out.append((b, d2.sum(0)))
            return out

        return F.linear(xp, w, b), lambda v: {p: v @ w}, grads  # type: ignore[dict-item]


class _ConvRule:
    @staticmethod
    def applies(pr: UnitPredictor) -> bool:
        return type(pr.unit.module) is nn.Conv2d and _single_input(pr)

    @staticmethod
    def evaluate(pr: UnitPredictor, values: dict[str, Tensor]) -> OpRule:
        m: nn.Conv2d = pr.unit.module  # type: ignore[assignment]
        w, b = m.weight, m.bias
        xp = pr.input(values)
        p = pr.parent_units[0] if pr.parents else None
        a = F.conv2d(xp, w, b, m.stride, m.padding, m.dilation, m.groups)

        def back(v: Tensor, mask: list[bool]):
            return torch.ops.aten.convolution_backward(v, xp, w, [m.out_channels] if b is not None else None, m.stride,
                                                       m.padding, m.dilation, False, [0, 0], m.groups, mask)

        def grads(dd: Tensor) -> Grads:
            wm, bm = w.requires_grad, b is not None and b.requires_grad
            if not (wm or bm):
                return []
            _, gw, gb = back(dd, [False, wm, bm])
            return ([(w, gw)] if wm else []) + ([(b, gb)] if bm else [])  # type: ignore[list-item]

        return a, lambda v: {p: back(v, [True, False, False])[0]}, grads  # type: ignore[dict-item]


class _MaxPoolRule:
    @staticmethod
    def applies(pr: UnitPredictor) -> bool:
        return type(pr.unit.module) is nn.MaxPool2d and _single_input(pr) and bool(pr.parents)

    @staticmethod
    def evaluate(pr: UnitPredictor, values: dict[str, Tensor]) -> OpRule:
        m: nn.MaxPool2d = pr.unit.module  # type: ignore[assignment]
        xp = pr.input(values)
        k, st, pad, dil = (torch.nn.modules.utils._pair(v) for v in (m.kernel_size, m.stride or m.kernel_size,
                                                                        m.padding, m.dilation))
        a, idx = torch.ops.aten.max_pool2d_with_indices(xp, k, st, pad, dil, m.ceil_mode)
        p = pr.parent_units[0]

        def vjp(v: Tensor) -> dict[str, Tensor]:
            return {p: torch.ops.aten.max_pool2d_with_indices_backward(v, xp, k, st, pad, dil, m.ceil_mode, idx)}

        return a, vjp, _no_grads


class _ReshapeRule:
    """Flatten, view, reshape, clone, contiguous: the same elements in another shape."""

    @staticmethod
    def applies(pr: UnitPredictor) -> bool:
        op = pr.unit.op
        return bool(pr.parents) and len(pr.parents) == 1 and len(op.all_input_nodes) == 1 and not pr.params \
            and pr.parents[0] is op.args[0]

    @staticmethod
    def evaluate(pr: UnitPredictor, values: dict[str, Tensor]) -> OpRule:
        xp = pr.input(values)
        p, shape = pr.parent_units[0], xp.shape
        return pr.fn(xp), lambda v: {p: v.reshape(shape)}, _no_grads


class _AddRule:
    """a + b and a - b (either may be a constant or a non-relaxed value; broadcasting summed back)."""

    @staticmethod
    def applies(pr: UnitPredictor) -> bool:
        op = pr.unit.op
        return len(op.args) == 2 and not op.kwargs and not pr.params and bool(pr.parents)

    @staticmethod
    def evaluate(pr: UnitPredictor, values: dict[str, Tensor]) -> OpRule:
        op = pr.unit.op
        args = [pr.input(values, i) if isinstance(v, fx.Node) else v for i, v in enumerate(op.args)]
        sub = op.target in (operator.sub, torch.sub)
        a = args[0] - args[1] if sub else args[0] + args[1]
        terms = [(pr.g.owner[v.name], -1.0 if (sub and i == 1) else 1.0, tuple(args[i].shape))
                 for i, v in enumerate(op.args) if isinstance(v, fx.Node) and v in pr.parents]
        shape = tuple(a.shape)

        def vjp(v: Tensor) -> dict[str, Tensor]:
            out: dict[str, Tensor] = {}
            for name, sign, sh in terms:
                g = v if sh == shape else v.sum_to_size(*sh)
                g = g if sign == 1.0 else -g
                out[name] = out[name] + g if name in out else g
            return out

        return a, vjp, _no_grads


class _ActRule:
    """An elementwise activation that is a unit of its own (its input has other readers)."""

    @staticmethod
    def applies(pr: UnitPredictor) -> bool:
        return _single_input(pr) and bool(pr.parents) and not pr.params

    @staticmethod
    def evaluate(pr: UnitPredictor, values: dict[str, Tensor]) -> OpRule:
        op = pr.unit.op
        xp = pr.input(values)
        f = _act_call(pr.g.gm, op, pr.env)
        h = xp if f is None else f(xp)
        d = None if f is None else act_derivative(pr.g.gm, op, xp, h)
        p = pr.parent_units[0]
        return h, lambda v: {p: times_derivative(v, d)}, _no_grads


class _CatRule:
    """torch.cat of a list (an input concatenated twice gets its pieces summed)."""

    @staticmethod
    def applies(pr: UnitPredictor) -> bool:
        op = pr.unit.op
        return bool(pr.parents) and not pr.params and len(op.args) <= 2 and set(op.kwargs) <= {"dim"} \
            and isinstance(op.args[0], (list, tuple)) and isinstance(op.args[1] if len(op.args) > 1
                                                                      else op.kwargs.get("dim", 0), int)

    @staticmethod
    def evaluate(pr: UnitPredictor, values: dict[str, Tensor]) -> OpRule:
        op = pr.unit.op
        dim = op.args[1] if len(op.args) > 1 else op.kwargs.get("dim", 0)
        items = op.args[0]
        vals = [values.get(pr.g.owner.get(a.name), pr.env[a.name]) if isinstance(a, fx.Node) else a for a in items]
        sizes = [v.shape[dim] for v in vals]
        owners = [pr.g.owner[a.name] if isinstance(a, fx.Node) and a in pr.parents else None for a in items]

        def vjp(v: Tensor) -> dict[str, Tensor]:
            out: dict[str, Tensor] = {}
            for name, g in zip(owners, torch.split(v, sizes, dim=dim)):
                if name is not None:
                    out[name] = out[name] + g if name in out else g
            return out

        return torch.cat(vals, dim), vjp, _no_grads


RULES: dict[str, Any] = {"linear": _LinearRule, "conv": _ConvRule, "maxpool": _MaxPoolRule,
                         "reshape": _ReshapeRule, "add": _AddRule, "act": _ActRule, "cat": _CatRule}


def refuse_derived_inputs(g: Any, env: dict[str, Any]) -> None:
    """Refuse, by name, a graph in which a relaxed unit reads a tensor that is not a float
    value node but is computed from one (e.g. a mask ``h > 0``): standard predictive coding
    would hold it at its forward value while the value node moves, which is not the graph's
    function. Shapes and other Python values do not move with the values and are allowed."""
    plan = g._plan
    rset = plan.rset
    tainted: set[str] = set()
    for n in g.gm.graph.nodes:
        if n.op in ("placeholder", "get_attr", "output"):
            continue
        if g.owner.get(n.name) in rset or any(a.name in tainted for a in n.all_input_nodes):
            tainted.add(n.name)
    for name in plan.relaxed:
        inl = plan.inlined[name]
        for n in [g.unit_by_name[name].op] + [m for m in g.gm.graph.nodes if m.name in inl]:
            for a in n.all_input_nodes:
                if a.op in ("placeholder", "get_attr") or a.name in inl or g.owner.get(a.name) in rset:
                    continue
                if a.name in tainted and isinstance(env.get(a.name), Tensor):
                    raise ConfigError(
                        f"pc: unit {name!r} reads {a.name!r}, a tensor computed from a relaxing value that is not "
                        "itself a value node (e.g. a mask or an index), which standard predictive coding would hold "
                        "at its forward value while the value node moves; use pc:fixed_prediction=true, or compute "
                        "it from the model input")
