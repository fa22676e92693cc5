"""The update rule per node kind: each unit's pushes (the VJP of its operation at the forward
values, applied to stacked states: closed forms for Linear, Conv2d, max-pool, add, cat and
reshapes, autograd's VJP for any other operation) and each parameter's update
(the VJP with respect to it of the operation that consumes it, at the unit's relaxed state)."""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, fx, nn

from creditlab.algorithms._verify import tolerance
from creditlab.algorithms.graph_ar.ops import act_derivative, get_attr, replaying
from creditlab.algorithms.graph_ar.relaxation import GraphRelaxation, PushFn, no_push
from creditlab.algorithms.graph_ar.units import Plan, Unit
from creditlab.errors import ConfigError


def uses_derivative(flag: Any, kind: str) -> bool:
    """Whether the f' governed by option value ``flag`` applies after an edge of ``kind``."""
    if flag is True:
        return True
    if flag is False:
        return False
    if flag == "no_conv":
        return kind != "conv"
    return kind != "linear"  # no_fc


class NodeRules:
    """The pushes and parameter updates of :class:`GraphActivationRelaxation` (a mixin: it
    reads the algorithm's graph, units, options and backward weights)."""

    def _make_push(self, u: Unit, env: dict[str, Any], plan: Plan, d: Tensor | None,
                   exact: bool = False) -> PushFn:
        parents = plan.parents[u.name]
        if not parents:
            return no_push
        op = u.op
        if plan.inlined[u.name]:  # reads a multi-output operation: the generic rule through it
            return self._generic_push(u, env, parents, d)
        if u.kind == "act":  # unfused elementwise activation: J^T v = f'(a) v (or v)
            dd = (act_derivative(self.gm, op, env[op.args[0].name], env[op.name])
                  if exact or uses_derivative(self.options["derivative"], "act") else None)
            p = self.owner[parents[0].name]
            return lambda s: {p: s if dd is None else s * dd}
        pre = (lambda s: s) if d is None else (lambda s: s * d)
        if u.kind == "linear":
            B = self.backward_weight(str(u.op.target), exact)
            p = self.owner[parents[0].name]
            return lambda s: {p: pre(s) @ B}
        if u.kind == "conv":
            m: nn.Conv2d = u.module  # type: ignore[assignment]
            B = self.backward_weight(str(u.op.target), exact)
            xin = env[op.args[0].name]
            p = self.owner[parents[0].name]

            def conv_push(s: Tensor) -> dict[str, Tensor]:
                k = s.shape[0]
                v = pre(s).reshape(k * s.shape[1], *s.shape[2:])
                g = torch.nn.grad.conv2d_input((v.shape[0],) + tuple(xin.shape[1:]), B, v, m.stride,
                                               m.padding, m.dilation, m.groups)
                return {p: g.reshape(k, *xin.shape)}

            return conv_push
        if u.kind == "maxpool" and op.name + "#idx" in env:
            idx = env[op.name + "#idx"]
            xin_shape = tuple(env[parents[0].name].shape)
            p = self.owner[parents[0].name]
            flat_idx = idx.flatten(2).unsqueeze(0)

            def pool_push(s: Tensor) -> dict[str, Tensor]:
                v = pre(s).flatten(3)
                k = s.shape[0]
                out = v.new_zeros(k, *xin_shape[:2], xin_shape[2] * xin_shape[3])
                out.scatter_add_(3, flat_idx.expand(k, *flat_idx.shape[1:]), v)
                return {p: out.reshape(k, *xin_shape)}

            return pool_push
        if u.kind == "add" and not op.kwargs and len(op.args) == 2:
            signs = [1.0, -1.0 if op.target in (operator.sub, torch.sub) else 1.0]
            terms = [(self.owner[a.name], sg, tuple(env[a.name].shape)) for a, sg in zip(op.args, signs)
                     if isinstance(a, fx.Node) and a in parents]
            out_shape = tuple(env[op.name].shape)

            def add_push(s: Tensor) -> dict[str, Tensor]:
                s = pre(s)
                res: dict[str, Tensor] = {}
                for nm, sg, shape in terms:
                    g = s if shape == out_shape else s.sum_to_size(s.shape[0], *shape)
                    g = g if sg == 1.0 else -g
                    res[nm] = res[nm] + g if nm in res else g
                return res

            return add_push
        if u.kind == "cat":
            items = op.args[0]
            dim = op.args[1] if len(op.args) > 1 else op.kwargs.get("dim", 0)
            sizes = [env[a.name].shape[dim] if isinstance(a, fx.Node) else 0 for a in items]
            owners = [self.owner[a.name] if isinstance(a, fx.Node) and a in parents else None for a in items]

            def cat_push(s: Tensor) -> dict[str, Tensor]:
                s = pre(s)
                d = dim % (s.dim() - 1) + 1
                res: dict[str, Tensor] = {}
                for nm, g in zip(owners, torch.split(s, sizes, dim=d)):
                    if nm is not None:
                        res[nm] = res[nm] + g if nm in res else g
                return res

            return cat_push
        if u.kind == "reshape" and len(parents) == 1 and len([a for a in op.all_input_nodes]) == 1:
            shape = tuple(env[parents[0].name].shape)
            p = self.owner[parents[0].name]
            return lambda s: {p: pre(s).reshape(s.shape[0], *shape)}
        return self._generic_push(u, env, parents, d)

    def _generic_push(self, u: Unit, env: dict[str, Any], parents: list[fx.Node], d: Tensor | None) -> PushFn:
        """Autograd's VJP of the unit's operation at the forward values (random draws replayed,
        buffers as before the forward pass), batched over the stack."""
        pre = (lambda s: s) if d is None else (lambda s: s * d)
        vjp = self._vjp(u, env, self._function(u, env, parents), tuple(env[a.name] for a in parents))
        names = [self.owner[a.name] for a in parents]

        def generic_push(s: Tensor) -> dict[str, Tensor]:
            out: dict[str, Tensor] = {}
            for nm, g in zip(names, vjp(pre(s), True)):
                out[nm] = out[nm] + g if nm in out else g
            return out

        return generic_push

    def _vjp(self, u: Unit, env: dict[str, Any], fn: Callable[..., Tensor], primals: tuple[Tensor, ...]
             ) -> Callable[[Tensor, bool], tuple[Tensor, ...]]:
        """fn's VJP at ``primals`` by eager autograd: the operation runs once, the way the
        forward pass ran it (torch.func's transforms may pick other kernels, which draw random
        numbers in another order). The returned function maps cotangents (stacked along a
        leading axis when ``batched``) to one gradient per primal. While the first-step guard is
        pending, the operation's value is checked against its forward value: an operation whose
        randomness or state cannot be held fixed is refused by name."""
        with torch.enable_grad():
            xs = tuple(p.detach().requires_grad_(True) for p in primals)
            out = fn(*xs)
        if self._checking:
            fwd = env[u.op.name]
            tol = tolerance(fwd.dtype)
            if out.shape != fwd.shape or float((out.detach() - fwd).norm()) > tol * float(fwd.norm()):
                raise ConfigError(
                    f"graph AR: node {u.op.name!r} ({u.op.op} {getattr(u.op.target, '__name__', u.op.target)}) "
                    "evaluated again at its forward inputs does not reproduce its forward value: its random draws "
                    "or its state cannot be held fixed (e.g. a module mixing fused-kernel and plain dropout); "
                    "use eval mode or dropout=0 for it, or train this model with bp")

        def vjp(v: Tensor, batched: bool) -> tuple[Tensor, ...]:
            if not out.requires_grad:
                return tuple(torch.zeros((v.shape[0], *x.shape) if batched else x.shape, dtype=x.dtype,
                                         device=x.device) for x in xs)
            if batched and v.shape[0] == 1:
                return tuple(g.unsqueeze(0) for g in vjp(v[0], False))
            if batched:
                try:
                    gs = torch.autograd.grad(out, xs, v, retain_graph=True, allow_unused=True, is_grads_batched=True)
                except RuntimeError:  # an operation without a batching rule for its backward
                    per = [vjp(vk, False) for vk in v]
                    return tuple(torch.stack(g) for g in zip(*per))
                return tuple(torch.zeros((v.shape[0], *x.shape), dtype=x.dtype, device=x.device) if g is None else g
                             for x, g in zip(xs, gs))
            gs = torch.autograd.grad(out, xs, v, retain_graph=True, allow_unused=True)
            return tuple(torch.zeros_like(x) if g is None else g for x, g in zip(xs, gs))

        return vjp

    def _function(self, u: Unit, env: dict[str, Any], varying: list[fx.Node],
                  params: list[tuple[str, nn.Parameter]] = ()) -> Callable[..., Tensor]:
        """The unit's operation (with the tuple-valued nodes it reads evaluated inside) as a
        function of the values of ``varying`` and then of ``params`` (by qualified name; other
        nodes fixed at their forward values). Each node evaluated draws the random numbers it
        drew in the forward pass, and a module sees copies of its buffers as they were before
        the forward pass (so running statistics are updated only by the forward pass)."""
        idx = {a.name: i for i, a in enumerate(varying)}
        pidx = {name: len(varying) + j for j, (name, _) in enumerate(params)}
        inlined = self._plan.inlined.get(u.name, set()) if self._plan is not None else set()
        gm, before = self.gm, self._buffers_before

        def fn(*vals: Tensor) -> Tensor:
            memo: dict[str, Any] = {}

            def val(a: fx.Node) -> Any:
                if a.name in idx:
                    return vals[idx[a.name]]
                if a.op == "get_attr":
                    t = str(a.target)
                    if t in pidx:
                        return vals[pidx[t]]
                    return before[t].clone() if t in before else get_attr(gm, t)
                if a.name in inlined:
                    if a.name not in memo:
                        memo[a.name] = call(a)
                    return memo[a.name]
                return env[a.name]

            def call(n: fx.Node) -> Any:
                args = fx.node.map_arg(n.args, val)
                kwargs = fx.node.map_arg(n.kwargs, val)
                if n.meta.get("inplace_module"):  # it overwrites its input: give it a copy
                    args = (args[0].clone(), *args[1:])
                with replaying(env.get(n.name + "#rng")):
                    if n.op == "call_module":
                        t = str(n.target)
                        mod = gm.get_submodule(t)
                        state = {k: vals[pidx[f"{t}.{k}"]] for k, _ in mod.named_parameters() if f"{t}.{k}" in pidx}
                        state.update({k: before[f"{t}.{k}"].clone() for k, _ in mod.named_buffers()
                                      if f"{t}.{k}" in before})
                        return torch.func.functional_call(mod, state, tuple(args), dict(kwargs))
                    if n.op == "call_method":
                        return getattr(args[0], str(n.target))(*args[1:], **kwargs)
                    return n.target(*args, **kwargs)  # type: ignore[operator]

            return call(u.op)

        return fn

    def updates(self, env: dict[str, Any], rel: GraphRelaxation, states: dict[str, Tensor],
                derivs: dict[str, Tensor | None], ud: Any, exact: bool = False
                ) -> tuple[dict[int, tuple[Tensor, Tensor]], dict[str, Tensor]]:
        """theta.grad = (d op/d theta)^T delta at each unit with parameters (summed over the
        units sharing a parameter), by id of the parameter; and learned psi's updates."""
        grads: dict[int, tuple[Tensor, Tensor]] = {}
        fb: dict[str, Tensor] = {}

        def put(p: Tensor, g: Tensor) -> None:
            if not p.requires_grad:  # a frozen parameter keeps .grad None
                return
            if id(p) in grads:
                grads[id(p)] = (p, grads[id(p)][1] + g)
            else:
                grads[id(p)] = (p, g)

        plan = self._plan
        for name in rel.order:
            u = self.unit_by_name[name]
            params = plan.params[name]
            if not params:
                continue
            delta = states[name]
            d = derivs[name]
            if d is not None and (exact or uses_derivative(ud, u.kind)):
                delta = delta * d
            if u.kind in ("linear", "conv") and not plan.inlined[name]:
                m: Any = u.module
                xin = env[u.op.args[0].name]
                if u.kind == "linear":
                    gw = delta.reshape(-1, delta.shape[-1]).t() @ xin.reshape(-1, xin.shape[-1])
                    gb = delta.reshape(-1, delta.shape[-1]).sum(0) if m.bias is not None else None
                else:
                    gw = torch.nn.grad.conv2d_weight(xin, m.weight.shape, delta, m.stride, m.padding, m.dilation,
                                                     m.groups)
                    gb = delta.sum((0, 2, 3)) if m.bias is not None else None
                put(m.weight, gw)
                if gb is not None:
                    put(m.bias, gb)
                if not exact:
                    self._feedback_grad(u, gw, fb)
            else:  # the VJP, with respect to each parameter, of the operation that consumes it
                vjp = self._vjp(u, env, self._function(u, env, [], params), tuple(p for _, p in params))
                for (_, p), g in zip(params, vjp(delta, False)):
                    put(p, g)
        return grads, fb

    def _feedback_grad(self, u: Unit, gw: Tensor, fb: dict[str, Tensor]) -> None:
        """Learned psi receives the weight update's local product, transposed (as ``ar``)."""
        key = self._fb_of.get(str(u.op.target))
        if key is None or self.options["feedback"] != "learned":
            return
        g = gw.transpose(0, 1).contiguous()
        fb[key] = fb[key] + g if key in fb else g
