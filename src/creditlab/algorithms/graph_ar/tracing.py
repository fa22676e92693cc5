"""Tracing a module into a torch.fx graph, and the compiled copy that records every node's value."""

from __future__ import annotations

import operator
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from creditlab.errors import ConfigError
from creditlab.models import MLP
from creditlab.models.activations import Activation


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
