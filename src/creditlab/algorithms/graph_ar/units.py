"""The units of graph AR: one relaxing state per operation, elementwise activations fused into
the operation they follow, each unit's kind (which VJP rule applies), and the plan of a graph
(fixed at its first batch, from the value types): which units relax, the states each unit's
operation reads, the tuple-valued operations evaluated inside it, and its parameters."""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from creditlab.algorithms.graph_ar.ops import (
    ACT_FUNCTIONS,
    ACT_METHODS,
    ACT_MODULES,
    RESHAPE_FUNCTIONS,
    RESHAPE_METHODS,
    get_attr,
)
from creditlab.errors import ConfigError


@dataclass
class Unit:
    """One relaxing state: operation ``op`` with optionally a fused elementwise ``act``."""

    op: fx.Node
    act: fx.Node | None = None
    kind: str = "other"  # linear | conv | batchnorm | maxpool | add | cat | reshape | slice | pad | act | other
    module: nn.Module | None = None
    param_inputs: list[fx.Node] = field(default_factory=list)  # get_attr parameters used by op

    @property
    def node(self) -> fx.Node:
        return self.act if self.act is not None else self.op

    @property
    def name(self) -> str:
        return self.act.name if self.act is not None else self.op.name


def is_activation(gm: fx.GraphModule, n: fx.Node) -> bool:
    if n.op == "call_module":
        return isinstance(gm.get_submodule(str(n.target)), ACT_MODULES)
    if n.op == "call_function":
        return n.target in ACT_FUNCTIONS
    if n.op == "call_method":
        return n.target in ACT_METHODS
    return False


def node_kind(gm: fx.GraphModule, n: fx.Node) -> tuple[str, nn.Module | None]:
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
        if type(m) in BATCHNORMS:
            return "batchnorm", m
        if isinstance(m, ACT_MODULES):
            return "act", m
        return "other", m
    if n.op == "call_function" and n.target in RESHAPE_FUNCTIONS:
        return "reshape", None
    if n.op == "call_function" and n.target in (operator.add, operator.sub, torch.add, torch.sub):
        return "add", None
    if n.op == "call_function" and n.target is torch.cat and isinstance(n.args[0], (list, tuple)):
        return "cat", None
    if n.op == "call_function" and n.target is operator.getitem and len(n.args) == 2 and not n.kwargs \
            and basic_index(n.args[1]) is not None:
        return "slice", None
    if n.op == "call_function" and n.target is F.pad and constant_pad(n) is not None:
        return "pad", None
    if n.op == "call_method" and n.target in RESHAPE_METHODS:
        return "reshape", None
    if is_activation(gm, n):
        return "act", None
    return "other", None


BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def basic_index(idx: Any) -> tuple[Any, ...] | None:
    """``idx`` as a tuple if it is basic indexing only (slices of Python ints, ints, None,
    Ellipsis), whose VJP is a write into a zero tensor; None otherwise (tensors, fx nodes, bools)."""
    items = idx if isinstance(idx, tuple) else (idx,)
    for e in items:
        if isinstance(e, slice):
            if not all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in (e.start, e.stop, e.step)):
                return None
        elif not (e is None or e is Ellipsis or (isinstance(e, int) and not isinstance(e, bool))):
            return None
    return tuple(items)


def constant_pad(n: fx.Node) -> tuple[int, ...] | None:
    """The pad widths of ``F.pad(x, pad)`` in constant mode with non-negative Python ints (its
    VJP is a slice of the cotangent); None otherwise."""
    args = list(n.args) + [None] * 4
    pad = n.kwargs.get("pad", args[1])
    mode = n.kwargs.get("mode", args[2] if args[2] is not None else "constant")
    if mode != "constant" or not isinstance(pad, (tuple, list)) or len(pad) % 2:
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in pad):
        return None
    return tuple(pad)


def own_params(gm: fx.GraphModule, u: Unit) -> list[tuple[str, nn.Parameter]]:
    out: list[tuple[str, nn.Parameter]] = []
    if u.op.op == "call_module" and u.module is not None:
        out += [(f"{u.op.target}.{k}", p) for k, p in u.module.named_parameters() if p.requires_grad]
    for g in u.param_inputs:
        p = get_attr(gm, str(g.target))
        out.append((str(g.target), p))
    return out


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
        if (is_activation(gm, n) and isinstance(src, fx.Node) and src.name in by_op
                and by_op[src.name].act is None and len(src.users) == 1 and by_op[src.name].kind != "act"):
            u = by_op.pop(src.name)
            u.act = n
            owner[src.name] = n.name
            owner[n.name] = n.name
            continue
        kind, mod = node_kind(gm, n)
        u = Unit(op=n, kind=kind, module=mod)
        for a in n.all_input_nodes:
            if a.op == "get_attr" and isinstance(get_attr(gm, str(a.target)), nn.Parameter) \
                    and get_attr(gm, str(a.target)).requires_grad:
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


def _carries_float(v: Any) -> bool:
    """A tuple or list holding (at any depth) a floating tensor: the value of a multi-output
    operation (chunk, split, max(dim), LSTM, MultiheadAttention), read through getitem."""
    return isinstance(v, (tuple, list)) and any(
        (isinstance(t, Tensor) and t.is_floating_point()) or _carries_float(t) for t in v)


def _trainable(gm: fx.GraphModule, a: fx.Node) -> nn.Parameter | None:
    p = get_attr(gm, str(a.target))
    return p if isinstance(p, nn.Parameter) and p.requires_grad else None


@dataclass
class Plan:
    """Which units relax (topological order), the output unit, and per unit: its ``parents``
    (the nodes with relaxed states its operation reads, also through tuple-valued operations),
    the names of those tuple-valued nodes (``inlined``: evaluated inside the unit's function,
    so each getitem of a multi-output operation is a unit whose VJP runs through it), and its
    trainable ``params`` (qualified name, parameter) of the operation and the inlined nodes."""

    relaxed: list[str]
    rset: set[str]
    out: str
    parents: dict[str, list[fx.Node]]
    inlined: dict[str, set[str]]
    params: dict[str, list[tuple[str, nn.Parameter]]]


def _walk(gm: fx.GraphModule, node: fx.Node, tuples: set[str], inl: set[str], reads: list[fx.Node],
          ps: dict[int, tuple[str, nn.Parameter]]) -> None:
    """Collect what ``node`` reads: tuple-valued nodes (inlined, walked through), the other
    nodes (``reads``) and the trainable parameters of it and the inlined nodes (``ps``)."""
    if node.op == "call_module":
        for k, p in gm.get_submodule(str(node.target)).named_parameters():
            if p.requires_grad:
                ps.setdefault(id(p), (f"{node.target}.{k}", p))
    for a in node.all_input_nodes:
        if a.op == "placeholder":
            continue
        if a.op == "get_attr":
            p = _trainable(gm, a)
            if p is not None:
                ps.setdefault(id(p), (str(a.target), p))
        elif a.name in tuples:
            if a.name not in inl:
                inl.add(a.name)
                _walk(gm, a, tuples, inl, reads, ps)
        elif a not in reads:
            reads.append(a)


def make_plan(gm: fx.GraphModule, units: list[Unit], owner: dict[str, str], out_node: fx.Node,
              env: dict[str, Any]) -> Plan:
    tuples = {u.name for u in units if _carries_float(env.get(u.name))}
    relaxed: list[str] = []
    rset: set[str] = set()
    parents: dict[str, list[fx.Node]] = {}
    inlined: dict[str, set[str]] = {}
    params: dict[str, list[tuple[str, nn.Parameter]]] = {}
    for u in units:
        v = env.get(u.name)
        if u.name in tuples or not (isinstance(v, Tensor) and v.is_floating_point()):
            continue
        inl: set[str] = set()
        reads: list[fx.Node] = []
        ps: dict[int, tuple[str, nn.Parameter]] = {}
        _walk(gm, u.op, tuples, inl, reads, ps)
        pa = [a for a in reads if owner.get(a.name) in rset]
        if ps or pa:
            relaxed.append(u.name)
            rset.add(u.name)
            parents[u.name], inlined[u.name], params[u.name] = pa, inl, list(ps.values())
    out = owner.get(out_node.name, out_node.name)
    if out not in rset:
        raise ConfigError("graph AR: the model output does not depend on any trainable parameter")
    return Plan(relaxed, rset, out, parents, inlined, params)
