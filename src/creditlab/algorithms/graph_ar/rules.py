"""The update rule per node kind: each unit's pushes (the VJP of its operation at the forward
values, applied to stacked states: closed forms for Linear, Conv2d, max-pool, add, cat and
reshapes, autograd's ``torch.func.vjp`` for any other operation) and each parameter's update
(the VJP with respect to it of the operation that consumes it, at the unit's relaxed state)."""

from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import Tensor, nn

from creditlab.algorithms.graph_ar.ops import act_derivative, get_attr
from creditlab.algorithms.graph_ar.relaxation import GraphRelaxation, PushFn, no_push
from creditlab.algorithms.graph_ar.units import Unit


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

    def _make_push(self, u: Unit, env: dict[str, Any], rset: set[str], d: Tensor | None,
                   exact: bool = False) -> PushFn:
        parents = [a for a in dict.fromkeys(self._inputs(u)) if self.owner[a.name] in rset]
        if not parents:
            return no_push
        op = u.op
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
        # generic: autograd VJP at the forward values, vmapped over the stack
        fn = self._op_function(op, env, parents)
        vals = tuple(env[a.name] for a in parents)
        _, vjp_fn = torch.func.vjp(fn, *vals)
        names = [self.owner[a.name] for a in parents]

        def generic_push(s: Tensor) -> dict[str, Tensor]:
            s = pre(s)
            if s.shape[0] == 1:
                gs = tuple(g.unsqueeze(0) for g in vjp_fn(s[0]))
            else:
                gs = torch.func.vmap(vjp_fn)(s)
            out: dict[str, Tensor] = {}
            for nm, g in zip(names, gs):
                if nm in out:
                    out[nm] = out[nm] + g
                else:
                    out[nm] = g
            return out

        return generic_push

    def _op_function(self, op: fx.Node, env: dict[str, Any], varying: list[fx.Node],
                     params: dict[str, Tensor] | None = None) -> Callable[..., Tensor]:
        """The node's operation as a function of the tensors of ``varying`` (others fixed)."""
        idx = {a.name: i for i, a in enumerate(varying)}
        gm = self.gm

        def fn(*ts: Tensor) -> Tensor:
            def val(a: fx.Node) -> Any:
                if a.name in idx:
                    return ts[idx[a.name]]
                return get_attr(gm, str(a.target)) if a.op == "get_attr" else env[a.name]

            args = fx.node.map_arg(op.args, val)
            kwargs = fx.node.map_arg(op.kwargs, val)
            if op.op == "call_module":
                mod = gm.get_submodule(str(op.target))
                if params is not None:
                    return torch.func.functional_call(mod, params, tuple(args), dict(kwargs))
                return mod(*args, **kwargs)
            if op.op == "call_method":
                return getattr(args[0], str(op.target))(*args[1:], **kwargs)
            return op.target(*args, **kwargs)  # type: ignore[operator]

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

        for name in rel.order:
            u = self.unit_by_name[name]
            params = self._params_of[name]
            if not params:
                continue
            delta = states[name]
            d = derivs[name]
            if d is not None and (exact or uses_derivative(ud, u.kind)):
                delta = delta * d
            xin = env[u.op.args[0].name] if u.op.args and isinstance(u.op.args[0], fx.Node) else None
            if u.kind == "linear":
                m: Any = u.module
                gw = delta.reshape(-1, delta.shape[-1]).t() @ xin.reshape(-1, xin.shape[-1])
                put(m.weight, gw)
                if m.bias is not None:
                    put(m.bias, delta.reshape(-1, delta.shape[-1]).sum(0))
                if not exact:
                    self._feedback_grad(u, gw, fb)
            elif u.kind == "conv":
                m = u.module
                gw = torch.nn.grad.conv2d_weight(xin, m.weight.shape, delta, m.stride, m.padding, m.dilation, m.groups)
                put(m.weight, gw)
                if m.bias is not None:
                    put(m.bias, delta.sum((0, 2, 3)))
                if not exact:
                    self._feedback_grad(u, gw, fb)
            else:
                self._generic_param_grads(u, env, delta, put)
        return grads, fb

    def _feedback_grad(self, u: Unit, gw: Tensor, fb: dict[str, Tensor]) -> None:
        """Learned psi receives the weight update's local product, transposed (as ``ar``)."""
        key = self._fb_of.get(str(u.op.target))
        if key is None or self.options["feedback"] != "learned":
            return
        g = gw.transpose(0, 1).contiguous()
        fb[key] = fb[key] + g if key in fb else g

    def _generic_param_grads(self, u: Unit, env: dict[str, Any], delta: Tensor, put) -> None:
        op = u.op
        if op.op == "call_module" and u.module is not None:
            named = {k: p for k, p in u.module.named_parameters() if p.requires_grad}
            keys = list(named)
            vals = tuple(named[k].detach() for k in keys)
            f = lambda *ps: self._op_function(op, env, [], dict(zip(keys, ps)))()  # noqa: E731
            _, vjp_fn = torch.func.vjp(f, *vals)
            for k, g in zip(keys, vjp_fn(delta)):
                put(named[k], g)
        if u.param_inputs:
            ps = [get_attr(self.gm, str(g.target)) for g in u.param_inputs]
            f = self._op_function(op, env, u.param_inputs)
            _, vjp_fn = torch.func.vjp(f, *(p.detach() for p in ps))
            for p, g in zip(ps, vjp_fn(delta)):
                put(p, g)
