"""The update rule per node kind: each unit's pushes (the VJP of its operation at the forward
values, applied to stacked states: closed forms for Linear, Conv2d, max-pool, add, cat and
reshapes, autograd's VJP for any other operation) and each parameter's update
(the VJP with respect to it of the operation that consumes it, at the unit's relaxed state)."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, fx, nn

from creditlab.algorithms._verify import tolerance
from creditlab.algorithms.graph_ar.ops import Derivative, act_derivative, get_attr, replaying, times_derivative
from creditlab.algorithms.graph_ar.relaxation import FusedFn, GraphRelaxation, PushFn, Rows, no_push
from creditlab.algorithms.graph_ar.units import Plan, Unit, basic_index, constant_pad
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

    def _make_push(self, u: Unit, env: dict[str, Any], plan: Plan, d: Derivative | None,
                   exact: bool = False) -> PushFn:
        """The unit's push: its VJP at the forward values applied to each vector it carries
        (``Rows``: one tensor per vector; one call over all of them where it pays)."""
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
            return lambda rows: {p: [times_derivative(r, dd) for r in rows]}

        def pre(r: Tensor) -> Tensor:
            return times_derivative(r, d)

        if u.kind == "linear":
            B = self.backward_weight(str(u.op.target), exact)
            p = self.owner[parents[0].name]

            def linear_push(rows: Rows) -> dict[str, Rows]:
                if len(rows) == 1:
                    return {p: [pre(rows[0]) @ B]}
                return {p: list((pre(torch.stack(rows)) @ B).unbind(0))}

            return linear_push
        if u.kind == "conv":
            m: nn.Conv2d = u.module  # type: ignore[assignment]
            B = self.backward_weight(str(u.op.target), exact)
            xin = env[op.args[0].name]
            p = self.owner[parents[0].name]
            per_call = max(1, 64 // max(xin.shape[0], 1))  # vectors per call

            def conv_push(rows: Rows) -> dict[str, Rows]:
                # one call per vector of >= 64 samples (one call over a tall stack was measured
                # 2.4x slower on the CPU at 14 x 64 samples of 16x32x32), with the real input
                if per_call == 1:
                    return {p: [torch.ops.aten.convolution_backward(
                        pre(r), xin, B, None, m.stride, m.padding, m.dilation, False, [0] * len(m.stride),
                        m.groups, [True, False, False])[0] for r in rows]}
                out: Rows = []
                for i in range(0, len(rows), per_call):
                    c = torch.cat([pre(r) for r in rows[i: i + per_call]])
                    g = torch.nn.grad.conv2d_input((c.shape[0],) + tuple(xin.shape[1:]), B, c, m.stride, m.padding,
                                                   m.dilation, m.groups)
                    out += list(g.split(xin.shape[0]))
                return {p: out}

            return conv_push
        if u.kind == "maxpool" and op.name + "#idx" in env:
            idx = env[op.name + "#idx"]
            xin_shape = tuple(env[parents[0].name].shape)
            p = self.owner[parents[0].name]
            flat_idx = idx.flatten(2)

            def pool_push(rows: Rows) -> dict[str, Rows]:
                out = []
                for r in rows:
                    o = r.new_zeros(*xin_shape[:2], xin_shape[2] * xin_shape[3])
                    o.scatter_add_(2, flat_idx, pre(r).flatten(2))
                    out.append(o.reshape(xin_shape))
                return {p: out}

            return pool_push
        if u.kind == "add" and not op.kwargs and len(op.args) == 2:
            signs = [1.0, -1.0 if op.target in (operator.sub, torch.sub) else 1.0]
            terms = [(self.owner[a.name], sg, tuple(env[a.name].shape)) for a, sg in zip(op.args, signs)
                     if isinstance(a, fx.Node) and a in parents]
            out_shape = tuple(env[op.name].shape)

            def add_push(rows: Rows) -> dict[str, Rows]:
                vs = [pre(r) for r in rows]
                res: dict[str, Rows] = {}
                for nm, sg, shape in terms:
                    gs = [v if shape == out_shape else v.sum_to_size(*shape) for v in vs]
                    gs = gs if sg == 1.0 else [-g for g in gs]
                    res[nm] = [a + b for a, b in zip(res[nm], gs)] if nm in res else gs
                return res

            return add_push
        if u.kind == "cat":
            items = op.args[0]
            dim = op.args[1] if len(op.args) > 1 else op.kwargs.get("dim", 0)
            sizes = [env[a.name].shape[dim] if isinstance(a, fx.Node) else 0 for a in items]
            owners = [self.owner[a.name] if isinstance(a, fx.Node) and a in parents else None for a in items]

            def cat_push(rows: Rows) -> dict[str, Rows]:
                res: dict[str, Rows] = {}
                for r in rows:
                    per: dict[str, Tensor] = {}  # an input concatenated twice: its pieces summed
                    for nm, g in zip(owners, torch.split(pre(r), sizes, dim=dim)):
                        if nm is not None:
                            per[nm] = per[nm] + g if nm in per else g
                    for nm, g in per.items():
                        res.setdefault(nm, []).append(g)
                return res

            return cat_push
        if u.kind == "batchnorm" and len(parents) == 1 and parents[0] is op.args[0] and len(op.args) == 1 \
                and not op.kwargs:
            return self._batchnorm_push(u, env, parents[0], pre, exact)
        if u.kind == "slice" and len(parents) == 1 and parents[0] is op.args[0] \
                and isinstance(env[parents[0].name], Tensor):
            idx = basic_index(op.args[1])
            shape = tuple(env[parents[0].name].shape)
            p = self.owner[parents[0].name]

            def slice_push(rows: Rows) -> dict[str, Rows]:
                out = []
                for r in rows:
                    o = r.new_zeros(shape)
                    o[idx] = pre(r)
                    out.append(o)
                return {p: out}

            return slice_push
        if u.kind == "pad" and len(parents) == 1 and parents[0] is op.args[0]:
            widths = constant_pad(op)
            out_shape = tuple(env[op.name].shape)
            n = len(widths) // 2  # type: ignore[arg-type]
            lead = (slice(None),) * (len(out_shape) - n)
            crop = lead + tuple(slice(widths[2 * i], out_shape[-1 - i] - widths[2 * i + 1])  # type: ignore[index]
                                for i in reversed(range(n)))
            p = self.owner[parents[0].name]
            return lambda rows: {p: [pre(r)[crop] for r in rows]}
        if u.kind == "reshape" and len(parents) == 1 and len([a for a in op.all_input_nodes]) == 1:
            shape = tuple(env[parents[0].name].shape)
            p = self.owner[parents[0].name]
            return lambda rows: {p: [pre(r).reshape(shape) for r in rows]}
        return self._generic_push(u, env, parents, d)

    def _push_cost(self, u: Unit, env: dict[str, Any], plan: Plan, d: Derivative | None) -> float:
        """The estimated cost of the unit's push per vector, in elementwise passes over as many
        elements (what :mod:`.closed_form` weighs against sums): a Linear or Conv2d VJP costs its
        multiply-adds at about 30 per elementwise pass (measured on the CPU), BatchNorm's three
        passes, the other closed-form rules one over their input and output, a generic VJP four."""
        out = float(env[u.name].numel()) if isinstance(env.get(u.name), Tensor) else 1.0
        ins = sum(float(env[a.name].numel()) for a in plan.parents[u.name] if isinstance(env.get(a.name), Tensor))
        pre = out if d is not None else 0.0
        if plan.inlined[u.name]:
            return 4.0 * (out + ins)
        if u.kind == "conv":
            m: Any = u.module
            per = m.in_channels // m.groups * math.prod(m.kernel_size)
            return out * per / 30.0 + pre + ins
        if u.kind == "linear":
            return out * u.module.in_features / 30.0 + pre + ins  # type: ignore[union-attr]
        if u.kind == "batchnorm":
            return 3.0 * out + pre
        if u.kind in ("maxpool", "add", "cat", "slice", "pad", "reshape", "act"):
            return out + ins + pre
        return 4.0 * (out + ins)

    def _make_fused(self, u: Unit, env: dict[str, Any], plan: Plan, d: Derivative | None, exact: bool
                    ) -> FusedFn | None:
        """For the fixed point (steps = inf, where a unit's update reads the vector it pushes):
        the push and the parameters' updates of a Conv2d or BatchNorm unit from one
        kernel call (as autograd's backward makes them), if its backward weight is W and the
        relaxation and the update apply the same f' (``d``); else None."""
        parents = plan.parents[u.name]
        if u.kind not in ("conv", "batchnorm") or not parents or plan.inlined[u.name] or not plan.params[u.name] \
                or len(parents) != 1 or parents[0] is not u.op.args[0]:
            return None
        if u.kind == "conv" and not exact and str(u.op.target) in self._fb_of:
            return None
        m: Any = u.module
        xin = env[u.op.args[0].name]
        p = self.owner[parents[0].name]
        wmask = m.weight is not None and m.weight.requires_grad
        bmask = m.bias is not None and m.bias.requires_grad

        def grads(gw: Tensor | None, gb: Tensor | None) -> list[tuple[Tensor, Tensor]]:
            return ([(m.weight, gw)] if wmask else []) + ([(m.bias, gb)] if bmask else [])

        if u.kind == "conv":
            bias = [m.out_channels] if m.bias is not None else None

            def conv_fused(rows: Rows) -> tuple[dict[str, Rows], list[tuple[Tensor, Tensor]]]:
                gi, gw, gb = torch.ops.aten.convolution_backward(
                    times_derivative(rows[0], d), xin, m.weight.detach(), bias, m.stride, m.padding, m.dilation,
                    False, [0] * len(m.stride), m.groups, [True, wmask, bmask])
                return {p: [gi]}, grads(gw, gb)

            return conv_fused
        if u.kind == "batchnorm" and len(u.op.args) == 1 and not u.op.kwargs:
            _, a, b, batch = self._batchnorm_stats(u, env)
            w = m.weight.detach() if m.weight is not None else None

            def bn_fused(rows: Rows) -> tuple[dict[str, Rows], list[tuple[Tensor, Tensor]]]:
                gi, gw, gb = torch.ops.aten.native_batch_norm_backward(
                    times_derivative(rows[0], d), xin, w, None if batch else a, None if batch else b,
                    a if batch else None, b if batch else None, batch, m.eps, [True, wmask, bmask])
                return {p: [gi]}, grads(gw, gb)

            return bn_fused
        return None

    def _batchnorm_stats(self, u: Unit, env: dict[str, Any]) -> tuple[Tensor, Tensor | None, Tensor | None, bool]:
        """(input, mean, invstd-or-variance, batch statistics?) of a BatchNorm node at its forward
        values: batch statistics (mean, 1/sqrt(var + eps)) in train mode or without running
        statistics (as ``_BatchNorm.forward``), else the running (mean, var) as they were before
        the forward pass. Computed once per batch (kept in ``env``)."""
        key = u.op.name + "#bn"
        if key in env:
            return env[key]
        m: nn.modules.batchnorm._BatchNorm = u.module  # type: ignore[assignment]
        xin = env[u.op.args[0].name]
        t = str(u.op.target)
        if m.training or (m.running_mean is None and m.running_var is None):
            rec = env.get(u.op.name + "#bnstats")  # recorded by the forward pass (CPU)
            _, mean, invstd = (None, *rec) if rec is not None else torch.ops.aten.native_batch_norm(
                xin, None, None, None, None, True, 0.0, m.eps)
            env[key] = (xin, mean, invstd, True)
        else:
            env[key] = (xin, self._buffers_before.get(f"{t}.running_mean", m.running_mean),
                        self._buffers_before.get(f"{t}.running_var", m.running_var), False)
        return env[key]

    def _batchnorm_push(self, u: Unit, env: dict[str, Any], parent: fx.Node, pre: Callable[[Tensor], Tensor],
                        exact: bool) -> PushFn:
        """BatchNorm's VJP with respect to its input: with batch statistics (which couple the
        samples) autograd's own kernel, one call per vector; with running statistics a
        per-channel scale."""
        m: nn.modules.batchnorm._BatchNorm = u.module  # type: ignore[assignment]
        xin, a, b, batch = self._batchnorm_stats(u, env)
        w = m.weight.detach() if m.weight is not None else None
        p = self.owner[parent.name]
        eps = m.eps
        if not batch:  # y = (x - mean) / sqrt(var + eps) * w + b: a per-channel scale
            scale = torch.rsqrt(b + eps)  # type: ignore[operator]
            if w is not None:
                scale = scale * w
            scale = scale.reshape(1, -1, *([1] * (xin.dim() - 2)))
            return lambda rows: {p: [pre(r) * scale for r in rows]}
        return lambda rows: {p: [torch.ops.aten.native_batch_norm_backward(
            pre(r), xin, w, None, None, a, b, True, eps, [True, False, False])[0] for r in rows]}

    def _generic_push(self, u: Unit, env: dict[str, Any], parents: list[fx.Node], d: Derivative | None) -> PushFn:
        """Autograd's VJP of the unit's operation at the forward values (random draws replayed,
        buffers as before the forward pass), batched over the vectors."""
        vjp = self._vjp(u, env, self._function(u, env, parents), tuple(env[a.name] for a in parents))
        names = [self.owner[a.name] for a in parents]

        def generic_push(rows: Rows) -> dict[str, Rows]:
            v = torch.stack([times_derivative(r, d) for r in rows])
            out: dict[str, Tensor] = {}
            for nm, g in zip(names, vjp(v, True)):
                out[nm] = out[nm] + g if nm in out else g
            return {nm: list(g.unbind(0)) for nm, g in out.items()}

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
                derivs: dict[str, Derivative | None], ud: Any, exact: bool = False
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
            if name in rel.grads:  # computed with the push, at the same (fixed-point) state
                for p, g in rel.grads[name]:
                    put(p, g)
                continue
            delta = states[name]
            d = derivs[name]
            if d is not None and (exact or uses_derivative(ud, u.kind)):
                delta = times_derivative(delta, d)
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
            elif u.kind == "batchnorm" and not plan.inlined[name] and len(u.op.args) == 1 and not u.op.kwargs:
                m = u.module
                xin, a, b, batch = self._batchnorm_stats(u, env)
                mask = [False, m.weight is not None and m.weight.requires_grad, m.bias is not None and m.bias.requires_grad]
                if mask[1] or mask[2]:
                    _, gw, gb = torch.ops.aten.native_batch_norm_backward(
                        delta, xin, m.weight, None if batch else a, None if batch else b, a if batch else None,
                        b if batch else None, batch, m.eps, mask)
                    if mask[1]:
                        put(m.weight, gw)
                    if mask[2]:
                        put(m.bias, gb)
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
