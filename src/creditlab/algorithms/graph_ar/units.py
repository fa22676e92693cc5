"""The units of graph AR: one relaxing state per operation, elementwise activations fused into
the operation they follow, and each unit's kind (which VJP rule applies) and parameters."""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from creditlab.algorithms.graph_ar.ops import (
    ACT_FUNCTIONS, ACT_METHODS, ACT_MODULES, RESHAPE_FUNCTIONS, RESHAPE_METHODS, UNSUPPORTED_FUNCTIONS,
    UNSUPPORTED_MODULES, get_attr,
)
from creditlab.errors import ConfigError


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
        if isinstance(m, ACT_MODULES):
            return "act", m
        return "other", m
    if n.op == "call_function" and n.target in RESHAPE_FUNCTIONS:
        return "reshape", None
    if n.op == "call_function" and n.target in (operator.add, operator.sub, torch.add, torch.sub):
        return "add", None
    if n.op == "call_function" and n.target is torch.cat and isinstance(n.args[0], (list, tuple)):
        return "cat", None
    if n.op == "call_method" and n.target in RESHAPE_METHODS:
        return "reshape", None
    if is_activation(gm, n):
        return "act", None
    return "other", None


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
        if isinstance(mod, UNSUPPORTED_MODULES) or (n.op == "call_function" and n.target in UNSUPPORTED_FUNCTIONS):
            what = type(mod).__name__ if mod is not None else getattr(n.target, "__name__", str(n.target))
            raise ConfigError(
                f"graph AR does not support {what} (node {n.name!r}, {n.op} {n.target}): its forward is random or "
                "updates running statistics, so its Jacobian cannot be re-evaluated at the forward values; remove it "
                "or train this model with bp")
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
