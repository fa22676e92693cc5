"""Activation Relaxation on arbitrary computation graphs (AR paper, Appendix A; file 000).

The module is traced with ``torch.fx`` into a DAG of operations. The relaxing *states* are the
outputs of the graph's operations, except that an elementwise activation h = f(a) whose input
a is an operation used only by it is *fused* into that operation: the unit (a, h) has the
state h, and the edge from a parent p of a carries f'(a) in its Jacobian. So an MLP traced as
a graph has exactly the MLP's states x^1..x^L. Units whose value does not depend on any
parameter (the input, a flatten of the input) are not relaxed; the unit that produces the
model output is clamped to c = dL/dout (Appendix B).

After the forward pass every edge's vector-Jacobian product is evaluated at the forward
values and held fixed. A free unit i relaxes by Euler steps of (Appendix A, Eq. 13)

    dx^i/dt = -x^i + sum_{j in children(i)} J_{j,i}^T x^j,

whose fixed point is the multivariate chain rule (Eq. 12): x^i* = dL/dx^i. Edge VJPs:

* ``nn.Linear``: J^T v = (v * f'(a)) B with B = W (``feedback=transpose``), a fixed random
  psi^T (``random``) or a learned psi^T (``learned``, Eq. 6); psi has W's transposed shape.
* ``nn.Conv2d``: J^T v = conv_transpose(v * f'(a), B), B = W or psi transposed in its first two
  axes (psi has shape (in, out, kh, kw), the transposed kernel).
* any other operation: its autograd VJP at the forward values (``torch.func.vjp``). For
  max-pooling this routes the state to the argmax of each window, as the authors' CNN code.

Weights update with the local product at the relaxed state: for a unit with parameters,
delta = x^i * f'(a) (``update_derivative``) and theta.grad = (d op / d theta)^T delta, e.g.
dW = delta^T x_in for a Linear edge; learned psi gets dW transposed (as ``ar``).

Schedules and modes (same options as ``ar``): with N the nilpotent map (N x)_i = sum over free
children j of J_{j,i}^T x^j and b_i = J_{o,i}^T c, one Euler step is x <- M x + eta b with
M = (1-eta) I + eta N (``synchronous``) or (1-eta)(I - eta N)^{-1} (``sweep``: units updated
in reverse topological order, each from its children's newest states). Then
x(T) = x* + sum_k w_k N^k (x(0) - x*), w_k from :func:`creditlab.algorithms._relaxation_weights.relaxation_weights`
(binomial / negative-binomial). ``exact`` evaluates this by one reverse topological pass that
carries for each unit the stack [x*, (N^0 e)_i, (N^1 e)_i, ...] graded by path length
(e = x(0) - x*): one batched VJP per edge over at most depth+1 stacked vectors, O(depth)
backward passes. With ``init=zero`` e = -x* and the stack is the per-path-length parts
G_i[m] = (N^m b)_i, x(T)_i = sum_m (1 - sum_{k<=m} w_k) G_i[m]; only the path lengths that
exist are carried (a chain carries one). ``steps=inf`` gives x* with one backward pass.

``derivative`` / ``update_derivative`` take ``true``, ``false`` or, for the Appendix C
conditions, ``no_conv`` (drop f' only after Conv2d edges) or ``no_fc`` (only after Linear
edges).
"""

from __future__ import annotations

import math
import operator
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from creditlab.algorithms import Algorithm, StepResult, register_algorithm
from creditlab.algorithms._verify import guard_first_step, snapshot
from creditlab.algorithms._verify import tolerance as _verify_tolerance
from creditlab.algorithms._relaxation_weights import tail_weights, weights
from creditlab.algorithms.ar import ActivationRelaxation, check_relaxation_options
from creditlab.errors import ConfigError
from creditlab.models import MLP
from creditlab.models.activations import Activation, ReLU, Sigmoid, Tanh
from creditlab.models.init import init_weight_

DERIVATIVE_CHOICES = (True, False, "no_conv", "no_fc")

_ACT_MODULES = (Activation, nn.Tanh, nn.ReLU, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU,
                nn.Softplus, nn.Identity, nn.Hardtanh, nn.ReLU6)
_ACT_FUNCTIONS = {torch.tanh, torch.relu, torch.sigmoid, F.relu, F.tanh, F.sigmoid, F.leaky_relu,
                  F.elu, F.gelu, F.silu, F.softplus, F.hardtanh, F.relu6}
_ACT_METHODS = {"tanh", "relu", "sigmoid"}
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape}
_UNSUPPORTED_MODULES = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm, nn.RReLU)
_UNSUPPORTED_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.batch_norm,
                          F.rrelu, torch.rand_like, torch.randn_like, torch.bernoulli}
_RESHAPE_METHODS = {"view", "reshape", "flatten"}


# ----------------------------------------------------------------------------------------
# tracing
# ----------------------------------------------------------------------------------------
class _Tracer(fx.Tracer):
    """torch.fx tracer that keeps creditlab activations as leaves (their ``df`` is used)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, Activation) or super().is_leaf_module(m, qualname)


class _MLPGraph(nn.Module):
    """A traceable view of an MLP sharing its ``layers`` and ``acts`` (same parameter names)."""

    def __init__(self, mlp: MLP):
        super().__init__()
        self.layers = mlp.layers
        self.acts = mlp.acts

    def forward(self, x: Tensor) -> Tensor:
        h = torch.flatten(x, 1)
        for layer, f in zip(self.layers, self.acts):
            h = f(layer(h))
        return h


def mlp_as_graph(mlp: MLP) -> nn.Module:
    """The MLP as a graph: flatten, layers.0, acts.0, layers.1, ... (MLP.forward's input check
    is Python control flow on a shape, which torch.fx cannot trace)."""
    return _MLPGraph(mlp)


def trace_module(model: nn.Module) -> fx.GraphModule:
    """Trace ``model`` (an MLP through :func:`mlp_as_graph`); a module that cannot be traced is
    refused with a :class:`ConfigError` naming the offending source line."""
    root = mlp_as_graph(model) if isinstance(model, MLP) else model
    tracer = _Tracer()
    try:
        graph = tracer.trace(root)
    except Exception as err:  # noqa: BLE001 - any tracing failure becomes a user-facing error
        raise ConfigError(_untraceable_message(root, err)) from None
    gm = fx.GraphModule(tracer.root, graph)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _untraceable_message(root: nn.Module, err: Exception) -> str:
    torch_dir = str(Path(torch.__file__).parent)
    frames = [f for f in traceback.extract_tb(err.__traceback__) if not f.filename.startswith(torch_dir)
              and f.filename != __file__]
    where = ""
    if frames:
        f = frames[-1]
        where = f" at {f.filename}:{f.lineno} in {f.name}(): `{(f.line or '').strip()}`"
    return (f"graph AR cannot trace {type(root).__name__} with torch.fx{where} ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). The forward pass must be one fixed graph of "
            "tensor operations: replace Python control flow on tensor values (if/while/for over data) with "
            "tensor operations such as torch.where, or move it into a submodule from torch.nn")


# ----------------------------------------------------------------------------------------
# the static plan: units, relaxed set, topological order
# ----------------------------------------------------------------------------------------
@dataclass
class Unit:
    """One relaxing state: operation ``op`` with optionally a fused elementwise ``act``."""

    op: fx.Node
    act: fx.Node | None = None
    kind: str = "other"  # linear | conv | maxpool | add | cat | reshape | act | other
    module: nn.Module | None = None
    param_inputs: list[fx.Node] = field(default_factory=list)  # get_attr parameters used by op

    @property
    def node(self) -> fx.Node:
        return self.act if self.act is not None else self.op

    @property
    def name(self) -> str:
        return self.act.name if self.act is not None else self.op.name


def _is_activation(gm: fx.GraphModule, n: fx.Node) -> bool:
    if n.op == "call_module":
        return isinstance(gm.get_submodule(str(n.target)), _ACT_MODULES)
    if n.op == "call_function":
        return n.target in _ACT_FUNCTIONS
    if n.op == "call_method":
        return n.target in _ACT_METHODS
    return False


def _kind(gm: fx.GraphModule, n: fx.Node) -> tuple[str, nn.Module | None]:
    if n.op == "call_module":
        m = gm.get_submodule(str(n.target))
        if type(m) is nn.Linear:
            return "linear", m
        if type(m) is nn.Conv2d and m.padding_mode == "zeros" and isinstance(m.padding, tuple):
            return "conv", m
        if isinstance(m, nn.Flatten):
            return "reshape", m
        if type(m) is nn.MaxPool2d and not m.return_indices:
            return "maxpool", m
        if isinstance(m, _ACT_MODULES):
            return "act", m
        return "other", m
    if n.op == "call_function" and n.target in _RESHAPE_FUNCTIONS:
        return "reshape", None
    if n.op == "call_function" and n.target in (operator.add, operator.sub, torch.add, torch.sub):
        return "add", None
    if n.op == "call_function" and n.target is torch.cat and isinstance(n.args[0], (list, tuple)):
        return "cat", None
    if n.op == "call_method" and n.target in _RESHAPE_METHODS:
        return "reshape", None
    if _is_activation(gm, n):
        return "act", None
    return "other", None


def _own_params(gm: fx.GraphModule, u: Unit) -> list[tuple[str, nn.Parameter]]:
    out: list[tuple[str, nn.Parameter]] = []
    if u.op.op == "call_module" and u.module is not None:
        out += [(f"{u.op.target}.{k}", p) for k, p in u.module.named_parameters() if p.requires_grad]
    for g in u.param_inputs:
        p = _get_attr(gm, str(g.target))
        out.append((str(g.target), p))
    return out


def _get_attr(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def build_units(gm: fx.GraphModule) -> tuple[list[Unit], dict[str, str], fx.Node]:
    """Units in topological order, the map node name -> unit name, and the output's node."""
    units: list[Unit] = []
    owner: dict[str, str] = {}  # fx node name -> unit name (state node)
    by_op: dict[str, Unit] = {}
    output: fx.Node | None = None
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "get_attr"):
            continue
        if n.op == "output":
            output = n
            continue
        src = n.args[0] if n.args else None
        if (_is_activation(gm, n) and isinstance(src, fx.Node) and src.name in by_op
                and by_op[src.name].act is None and len(src.users) == 1 and by_op[src.name].kind != "act"):
            u = by_op.pop(src.name)
            u.act = n
            owner[src.name] = n.name
            owner[n.name] = n.name
            continue
        kind, mod = _kind(gm, n)
        if isinstance(mod, _UNSUPPORTED_MODULES) or (n.op == "call_function" and n.target in _UNSUPPORTED_FUNCTIONS):
            what = type(mod).__name__ if mod is not None else getattr(n.target, "__name__", str(n.target))
            raise ConfigError(
                f"graph AR does not support {what} (node {n.name!r}, {n.op} {n.target}): its forward is random or "
                "updates running statistics, so its Jacobian cannot be re-evaluated at the forward values; remove it "
                "or train this model with bp")
        u = Unit(op=n, kind=kind, module=mod)
        for a in n.all_input_nodes:
            if a.op == "get_attr" and isinstance(_get_attr(gm, str(a.target)), nn.Parameter) \
                    and _get_attr(gm, str(a.target)).requires_grad:
                u.param_inputs.append(a)
        units.append(u)
        by_op[n.name] = u
        owner[n.name] = n.name
    assert output is not None
    ret = output.args[0]
    if not isinstance(ret, fx.Node):
        raise ConfigError("graph AR needs a model whose forward returns one tensor (the output the loss is applied to); "
                          f"this one returns {type(ret).__name__}")
    # unit names: the state node; re-key so owner values point at the final state node
    final = {u.op.name: u.name for u in units}
    owner = {k: final.get(v, v) for k, v in owner.items()}
    return units, owner, ret


# ----------------------------------------------------------------------------------------
# per-batch relaxation problem
# ----------------------------------------------------------------------------------------
PushFn = Callable[[Tensor], dict[str, Tensor]]


def _no_push(s: Tensor) -> dict[str, Tensor]:
    """The push of a unit with no relaxing parent (e.g. the first layer)."""
    return {}


def _pool_with_indices(x: Tensor, kernel_size: Any, stride: Any, padding: Any, dilation: Any,
                       ceil_mode: bool) -> tuple[Tensor, Tensor]:
    return F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode=ceil_mode, return_indices=True)


def recording_module(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[str]]:
    """A copy of the traced graph that returns every node's value (one compiled call, no
    interpreter); ``nn.MaxPool2d`` nodes also return their argmax indices (``NAME#idx``)."""
    g = fx.Graph()
    val_map: dict[fx.Node, fx.Node] = {}
    g.graph_copy(gm.graph, val_map)
    names: list[str] = []
    outs: list[fx.Node] = []
    for n in gm.graph.nodes:
        if n.op in ("output", "get_attr"):
            continue
        m = val_map[n]
        mod = gm.get_submodule(str(n.target)) if n.op == "call_module" else None
        if type(mod) is nn.MaxPool2d and not mod.return_indices and len(n.args) == 1 and not n.kwargs:
            with g.inserting_after(m):
                both = g.call_function(_pool_with_indices, (m.args[0], mod.kernel_size, mod.stride, mod.padding,
                                                            mod.dilation, mod.ceil_mode))
            with g.inserting_after(both):
                val = g.call_function(operator.getitem, (both, 0))
            with g.inserting_after(val):
                idx = g.call_function(operator.getitem, (both, 1))
            m.replace_all_uses_with(val)
            g.erase_node(m)
            names += [n.name, n.name + "#idx"]
            outs += [val, idx]
        else:
            names.append(n.name)
            outs.append(m)
    g.output(tuple(outs))
    return fx.GraphModule(gm, g), names


@dataclass
class GraphRelaxation:
    """The relaxation problem of one batch: units in topological order (relaxed only), their
    edge pushes (stacked vectors (K, *state) -> contributions to each relaxed parent), the
    forward states, and the output unit clamped to ``clamp``."""

    order: list[str]
    push: dict[str, PushFn]
    forward: dict[str, Tensor]
    out: str
    clamp: Tensor

    @property
    def free(self) -> list[str]:
        return [u for u in self.order if u != self.out]

    def fixed_point(self) -> dict[str, Tensor]:
        return relax_graph_exact(self, None, math.inf, 1.0, "synchronous")


def _accumulate(acc: dict[str, Tensor], name: str, t: Tensor) -> None:
    """acc[name] += t, zero-padding the stack dimension (0) on the right where lengths differ."""
    if name not in acc:
        acc[name] = t
        return
    a = acc[name]
    if a.shape[0] < t.shape[0]:
        a, t = t, a
    if a.shape[0] == t.shape[0]:
        acc[name] = a + t
    else:
        a = a.clone()
        a[: t.shape[0]] += t
        acc[name] = a


def relax_graph_exact(rel: GraphRelaxation, init: dict[str, Tensor] | None, steps: float, eta: float,
                      schedule: str) -> dict[str, Tensor]:
    """Closed-form states after ``steps`` Euler steps (``init`` None: zero states). Includes
    the clamped output unit."""
    states: dict[str, Tensor] = {rel.out: rel.clamp}
    acc: dict[str, Tensor] = {}
    for name, t in rel.push[rel.out](rel.clamp.unsqueeze(0)).items():
        _accumulate(acc, name, t)
    free = list(reversed(rel.free))
    if math.isinf(steps):
        for u in free:
            a = acc.get(u)
            x = a[0] if a is not None else torch.zeros_like(rel.forward[u])
            states[u] = x
            for name, t in rel.push[u](x.unsqueeze(0)).items():
                _accumulate(acc, name, t)
        return states
    T = int(steps)
    if init is not None:
        # stack A_u = [x*_u, E_u[1], E_u[2], ...]; pushed S_u = [x*_u, E_u[0], E_u[1], ...]
        wall = torch.tensor(weights(T, float(eta), schedule, len(rel.order) + 1),
                            dtype=rel.clamp.dtype, device=rel.clamp.device)
        for u in free:
            a = acc.get(u)
            if a is None:
                a = torch.zeros_like(rel.forward[u]).unsqueeze(0)
            star = a[0]
            e0 = init[u] - star
            if rel.push[u] is _no_push:  # nothing to carry on: skip building the stack
                wk = wall[1: a.shape[0]].reshape(-1, *([1] * star.dim()))
                states[u] = star + wall[0] * e0 + (wk * a[1:]).sum(0)
                continue
            s = torch.cat([star.unsqueeze(0), e0.unsqueeze(0), a[1:]], 0)
            wk = wall[: s.shape[0] - 1].reshape(-1, *([1] * star.dim()))
            states[u] = star + (wk * s[1:]).sum(0)
            for name, t in rel.push[u](s).items():
                _accumulate(acc, name, t)
        return states
    # init=zero: graded parts G_u[m] with labels m (only the path lengths that exist)
    labels: dict[str, list[int]] = {}
    gacc: dict[str, dict[int, Tensor]] = {}

    def add(name: str, lab: list[int], t: Tensor) -> None:
        d = gacc.setdefault(name, {})
        for i, m in enumerate(lab):
            d[m] = d[m] + t[i] if m in d else t[i]

    for name, t in rel.push[rel.out](rel.clamp.unsqueeze(0)).items():
        add(name, [0], t)
    tail = tail_weights(T, float(eta), schedule, max(len(rel.order), 1))
    for u in free:
        d = gacc.get(u, {})
        if not d:
            states[u] = torch.zeros_like(rel.forward[u])
            continue
        lab = sorted(d)
        g = torch.stack([d[m] for m in lab], 0)
        coef = torch.tensor([tail[m] for m in lab], dtype=g.dtype, device=g.device)
        states[u] = torch.tensordot(coef, g, dims=1)
        labels[u] = lab
        for name, t in rel.push[u](g).items():
            add(name, [m + 1 for m in lab], t)
    return states


def relax_graph_simulate(rel: GraphRelaxation, init: dict[str, Tensor] | None, steps: int, eta: float,
                         schedule: str) -> dict[str, Tensor]:
    """Euler steps one by one (synchronous, or a sweep in reverse topological order)."""
    if math.isinf(steps):
        raise ConfigError("ar: mode=simulate needs a finite number of steps; use mode=exact for steps=inf")
    free = list(reversed(rel.free))
    xs = {u: (init[u].clone() if init is not None else torch.zeros_like(rel.forward[u])) for u in free}
    from_out: dict[str, Tensor] = {}
    for name, t in rel.push[rel.out](rel.clamp.unsqueeze(0)).items():
        _accumulate(from_out, name, t)
    for _ in range(int(steps)):
        acc = dict(from_out)
        if schedule == "synchronous":
            for u in free:
                for name, t in rel.push[u](xs[u].unsqueeze(0)).items():
                    _accumulate(acc, name, t)
            for u in free:
                a = acc.get(u)
                xs[u] = xs[u] + eta * (-xs[u] + (a[0] if a is not None else 0.0))
        else:
            for u in free:  # reverse topological: every child already updated and pushed
                a = acc.get(u)
                xs[u] = xs[u] + eta * (-xs[u] + (a[0] if a is not None else 0.0))
                for name, t in rel.push[u](xs[u].unsqueeze(0)).items():
                    _accumulate(acc, name, t)
    xs[rel.out] = rel.clamp
    return xs


# ----------------------------------------------------------------------------------------
# the algorithm
# ----------------------------------------------------------------------------------------
def _uses(flag: Any, kind: str) -> bool:
    """Whether the f' governed by option value ``flag`` applies after an edge of ``kind``."""
    if flag is True:
        return True
    if flag is False:
        return False
    if flag == "no_conv":
        return kind != "conv"
    return kind != "linear"  # no_fc


@register_algorithm
class GraphActivationRelaxation(Algorithm):
    """``graph_ar``: Activation Relaxation on any torch.fx-traceable module (Appendix A);
    ``ar`` on a model that is not an MLP builds this. Options as ``ar`` (module docstring)."""

    name = "graph_ar"
    defaults = dict(ActivationRelaxation.defaults)  # the same options as the MLP ``ar``
    divergence_hint = ActivationRelaxation.divergence_hint

    def __init__(self, model: nn.Module, loss, **options: Any):
        super().__init__(model, loss, **options)
        o = self.options
        check_relaxation_options(o)
        for key in ("derivative", "update_derivative"):
            if o[key] not in DERIVATIVE_CHOICES or o[key] in (0, 1) and not isinstance(o[key], bool):
                raise ConfigError(f"ar option {key}={o[key]!r} is not valid; choose one of: true, false, no_conv, no_fc")
        self.gm = trace_module(model)
        self._rec, self._rec_names = recording_module(self.gm)
        self.units, self.owner, self.out_node = build_units(self.gm)
        self.unit_by_name = {u.name: u for u in self.units}
        self._params_of = {u.name: _own_params(self.gm, u) for u in self.units}
        self._plan: tuple[list[str], set[str], str] | None = None
        self._verified = False
        self._struct_relaxed = self._structurally_relaxed()
        self.feedback = nn.ParameterDict()
        self._fb_of: dict[str, str] = {}  # module target -> feedback key
        if o["feedback"] != "transpose":
            self._make_feedback()

    # -- structure -------------------------------------------------------------------
    def _inputs(self, u: Unit) -> list[fx.Node]:
        return [a for a in u.op.all_input_nodes if a.op not in ("placeholder", "get_attr")]

    def _structurally_relaxed(self) -> set[str]:
        rel: set[str] = set()
        for u in self.units:
            if _own_params(self.gm, u) or any(self.owner[a.name] in rel for a in self._inputs(u)):
                rel.add(u.name)
        return rel

    def _make_feedback(self) -> None:
        kw = self.factory_kwargs()
        init = self.options["feedback_init"] or getattr(self.model, "init_spec", None) or "xavier"
        for u in self.units:
            if u.kind not in ("linear", "conv") or u.name not in self._struct_relaxed:
                continue
            src = u.op.args[0]
            if not (isinstance(src, fx.Node) and self.owner.get(src.name) in self._struct_relaxed):
                continue  # first layer: its backward weights are never used
            target = str(u.op.target)
            if target in self._fb_of:
                continue
            w = torch.empty(u.module.weight.shape, **kw)  # type: ignore[union-attr]
            init_weight_(w, init)
            key = target.replace(".", "_")
            self.feedback[key] = nn.Parameter(w.transpose(0, 1).contiguous(),
                                              requires_grad=self.options["feedback"] == "learned")
            self._fb_of[target] = key

    def backward_weight(self, target: str, transpose: bool = False) -> Tensor:
        """B (W's shape) used by the VJP of the Linear/Conv2d module ``target`` (e.g. ``fc1``):
        W itself (``transpose``, or ``transpose=True``) or psi transposed in its first two axes."""
        key = self._fb_of.get(target)
        if key is None or transpose:
            return self.gm.get_submodule(target).weight
        return self.feedback[key].transpose(0, 1)

    # -- optimizer and checkpoint plumbing ------------------------------------------
    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        if self.options["feedback"] != "learned" or not len(self.feedback):
            return []
        return [{"params": list(self.feedback.values()), "lr": self.options["feedback_lr"] or lr,
                 "weight_decay": float(self.options["feedback_decay"]), "name": "ar.feedback"}]

    def state_dict(self) -> dict[str, Any]:
        return {"feedback": {k: p.detach().clone() for k, p in self.feedback.items()}} if len(self.feedback) else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for k, v in state.get("feedback", {}).items():
                self.feedback[k].copy_(v)

    def diagnostics(self) -> dict[str, float]:
        if not len(self.feedback):
            return {}
        from creditlab.diagnostics.feedback import feedback_alignment

        pairs = []
        for target, key in self._fb_of.items():
            w = self.gm.get_submodule(target).weight.detach()
            pairs.append((target, w, self.feedback[key].detach().transpose(0, 1)))
        return feedback_alignment(pairs)

    # -- the per-batch problem -------------------------------------------------------
    @torch.no_grad()
    def forward_values(self, x: Tensor) -> dict[str, Any]:
        return dict(zip(self._rec_names, self._rec(x)))

    def _deriv(self, u: Unit, env: dict[str, Any]) -> Tensor | None:
        """f'(a) of the unit's fused activation at the forward pre-activation."""
        if u.act is None:
            return None
        return _act_derivative(self.gm, u.act, env[u.op.name], env[u.act.name])

    @torch.no_grad()
    def build(self, env: dict[str, Any], clamp: Tensor,
              exact: bool = False) -> tuple[GraphRelaxation, dict[str, Tensor | None]]:
        """The batch's relaxation problem; ``exact``: with transpose feedback and every f' (the
        machinery the guard checks against autograd, whatever the run's variant)."""
        o = self.options
        if self._plan is None:  # which units relax: fixed by the graph and the value types
            relaxed: list[str] = []
            rset: set[str] = set()
            for u in self.units:
                v = env[u.name]
                if not (isinstance(v, Tensor) and v.is_floating_point()):
                    continue
                if self._params_of[u.name] or any(self.owner[a.name] in rset for a in self._inputs(u)):
                    relaxed.append(u.name)
                    rset.add(u.name)
            out = self.owner.get(self.out_node.name)
            if out not in rset:
                raise ConfigError("graph AR: the model output does not depend on any trainable parameter")
            self._plan = (relaxed, rset, out)
        relaxed, rset, out = self._plan
        derivs: dict[str, Tensor | None] = {}
        push: dict[str, PushFn] = {}
        for name in relaxed:
            u = self.unit_by_name[name]
            d = self._deriv(u, env)
            derivs[name] = d
            d_relax = d if d is not None and (exact or _uses(o["derivative"], u.kind)) else None
            push[name] = self._make_push(u, env, rset, d_relax, exact)
        forward = {name: env[name] for name in relaxed}
        return GraphRelaxation(relaxed, push, forward, out, clamp), derivs  # type: ignore[arg-type]

    def _make_push(self, u: Unit, env: dict[str, Any], rset: set[str], d: Tensor | None,
                   exact: bool = False) -> PushFn:
        parents = [a for a in dict.fromkeys(self._inputs(u)) if self.owner[a.name] in rset]
        if not parents:
            return _no_push
        op = u.op
        if u.kind == "act":  # unfused elementwise activation: J^T v = f'(a) v (or v)
            dd = (_act_derivative(self.gm, op, env[op.args[0].name], env[op.name])
                  if exact or _uses(self.options["derivative"], "act") else None)
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
                return _get_attr(gm, str(a.target)) if a.op == "get_attr" else env[a.name]

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

    # -- relaxation and updates -------------------------------------------------------
    @torch.no_grad()
    def relax(self, env: dict[str, Any], clamp: Tensor) -> tuple[GraphRelaxation, dict[str, Tensor], dict]:
        o = self.options
        rel, derivs = self.build(env, clamp)
        init = {u: env[u] for u in rel.free} if o["init"] == "forward" else None
        if o["mode"] == "exact":
            states = relax_graph_exact(rel, init, o["steps"], float(o["eta"]), o["schedule"])
        else:
            states = relax_graph_simulate(rel, init, o["steps"], float(o["eta"]), o["schedule"])
        return rel, states, derivs

    def step(self, x: Tensor, y: Tensor) -> StepResult:
        pending = self.options["verify"] == "first" and not self._verified
        before = snapshot(self.model, x.device) if pending else None
        with torch.no_grad():
            env = self.forward_values(x)
            out = env[self.out_node.name]
            loss = self.loss(out, y)
            clamp = self.loss.grad(out, y)
            rel, states, derivs = self.relax(env, clamp)
            grads, fb = self.updates(env, rel, states, derivs, self.options["update_derivative"])
            for p, g in grads.values():
                p.grad = g
            for key, g in fb.items():
                self.feedback[key].grad = g
        if pending:
            try:
                self._verified = self._verify(x, y, env, clamp, grads, before)  # type: ignore[arg-type]
            except ConfigError:
                for p, _ in grads.values():
                    p.grad = None
                raise
        return StepResult(loss, out)

    # -- the guard (verify=first) ---------------------------------------------------
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
            users = [u.name for u in self.units if any(q is p for _, q in self._params_of[u.name])]
            return f" (used by node {users[0]!r})" if users else " (no unit of the traced graph uses it)"

        return guard_first_step(self.name, self.model, self.loss, x, y, before, env[self.out_node.name], updates,
                                lambda: locate_divergence(self.gm, env, self.model, x), consumer)

    # -- updates ---------------------------------------------------------------------
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
            if d is not None and (exact or _uses(ud, u.kind)):
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
            ps = [_get_attr(self.gm, str(g.target)) for g in u.param_inputs]
            f = self._op_function(op, env, u.param_inputs)
            _, vjp_fn = torch.func.vjp(f, *(p.detach() for p in ps))
            for p, g in zip(ps, vjp_fn(delta)):
                put(p, g)


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
    tol = _verify_tolerance(x.dtype)
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


def _act_name(gm: fx.GraphModule, act: fx.Node) -> str | None:
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


def _act_derivative(gm: fx.GraphModule, act: fx.Node, a: Tensor, h: Tensor) -> Tensor:
    """f'(a) elementwise (h = f(a) is the forward output): tanh, sigmoid and relu from h (the
    same arithmetic as their ``Activation.df``), other creditlab activations by ``df``, any
    other function by autograd."""
    name = _act_name(gm, act)
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
