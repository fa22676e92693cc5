"""Tracing a module into a torch.fx graph, functionalizing its in-place operations, and the
compiled copy of the graph that records every node's value (and the random state before each
node that may draw random numbers)."""

from __future__ import annotations

import inspect
import operator
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from creditlab.algorithms.graph_ar.ops import (
    DETERMINISTIC_FUNCTIONS,
    DETERMINISTIC_METHODS,
    DETERMINISTIC_MODULES,
    VIEW_FUNCTIONS,
    VIEW_METHODS,
    VIEW_MODULES,
    rng_state,
)
from creditlab.errors import ConfigError
from creditlab.models import MLP
from creditlab.models.activations import Activation

_AUGMENTED = {"iadd": operator.iadd, "isub": operator.isub, "imul": operator.imul, "itruediv": operator.itruediv,
              "ifloordiv": operator.ifloordiv, "imod": operator.imod, "ipow": operator.ipow, "imatmul": operator.imatmul,
              "iand": operator.iand, "ior": operator.ior, "ixor": operator.ixor}
_OUT_OF_PLACE = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                 operator.itruediv: operator.truediv, operator.ifloordiv: operator.floordiv, operator.imod: operator.mod,
                 operator.ipow: operator.pow, operator.imatmul: operator.matmul, operator.iand: operator.and_,
                 operator.ior: operator.or_, operator.ixor: operator.xor}


class _Proxy(fx.Proxy):
    """An fx proxy that records augmented assignments (``h += y``) as the in-place operations
    they are on tensors (plain fx records them out of place, which changes what ``skip = h``
    beside them sees)."""


def _augmented(op):
    def method(self, other):
        return self.tracer.create_proxy("call_function", op, (self, other), {})
    return method


for _name, _op in _AUGMENTED.items():
    setattr(_Proxy, f"__{_name}__", _augmented(_op))


class _Tracer(fx.Tracer):
    """torch.fx tracer that keeps creditlab activations as leaves (their ``df`` is used) and
    records augmented assignments."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, Activation) or super().is_leaf_module(m, qualname)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)


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
    state = {k: t.detach().clone() for k, t in root.state_dict(keep_vars=True).items() if isinstance(t, Tensor)}
    try:
        graph = tracer.trace(root)
    except Exception as err:  # noqa: BLE001 - any tracing failure becomes a user-facing error
        raise ConfigError(_untraceable_message(root, err)) from None
    finally:
        changed = _restore_changed(root, state)
    if changed:
        raise ConfigError(
            f"graph AR: the forward pass of {type(root).__name__} modifies {changed!r} with an operation torch.fx does "
            "not record (a tensor method called on the buffer itself, e.g. `self.count.add_(1)`, runs once while "
            "tracing and never again); keep state in torch.nn modules (BatchNorm) or outside forward")
    gm = fx.GraphModule(tracer.root, graph)
    functionalize(gm)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _restore_changed(root: nn.Module, state: dict[str, Tensor]) -> str | None:
    """Put back every parameter and buffer that tracing changed; the first one's name."""
    first = None
    with torch.no_grad():
        for k, t in root.state_dict(keep_vars=True).items():
            if k in state and not torch.equal(t.detach(), state[k]):
                t.copy_(state[k])
                first = first or k
    return first


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
# functionalization: in-place operations rewritten out of place, or refused by name
# ----------------------------------------------------------------------------------------
def _inplace_kind(gm: fx.GraphModule, n: fx.Node) -> str | None:
    """How ``n`` mutates its first argument: 'method' (``h.relu_()``), 'function'
    (``torch.relu_``), 'kwarg' (``F.relu(h, inplace=True)``), 'augmented' (``h += y``), 'module'
    (``nn.ReLU(inplace=True)``); None if it does not."""
    t = n.target
    if n.op == "call_method" and str(t).endswith("_") and not str(t).endswith("__"):
        return "method"
    if n.op == "call_function":
        if t in _OUT_OF_PLACE:
            return "augmented"
        name = getattr(t, "__name__", "")
        if name.endswith("_") and not name.endswith("__") and getattr(torch, name, None) is t:
            return "function"
        if _bound(n).get("inplace") is True:
            return "kwarg"
    if n.op == "call_module" and getattr(gm.get_submodule(str(t)), "inplace", False) is True:
        return "module"
    return None


def _bound(n: fx.Node) -> dict[str, Any]:
    try:
        return dict(inspect.signature(n.target).bind(*n.args, **n.kwargs).arguments)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return dict(n.kwargs)


def _may_alias(gm: fx.GraphModule, n: fx.Node) -> bool:
    """Whether ``n``'s value may share memory with another node's (a view, an identity module)."""
    if n.op == "call_method":
        return str(n.target) in VIEW_METHODS
    if n.op == "call_function":
        if n.target is getattr:
            return n.args[1] in ("T", "mT", "H", "mH", "data", "real", "imag")
        return n.target in VIEW_FUNCTIONS
    if n.op == "call_module":
        return isinstance(gm.get_submodule(str(n.target)), VIEW_MODULES)
    return True  # placeholder, get_attr


def _tensor_like(n: Any) -> bool:
    """Whether ``n`` is surely a tensor, not a Python number (whose ``+=`` rebinds, not mutates)."""
    if not isinstance(n, fx.Node):
        return False
    if n.op in ("call_module", "placeholder", "get_attr"):
        return True
    if n.op == "call_method":
        return str(n.target) not in ("size", "dim", "numel", "item", "tolist", "__len__", "stride", "element_size")
    if n.target is getattr:
        return n.args[1] in ("T", "mT", "H", "mH", "data", "real", "imag", "values")
    if n.target is operator.getitem:
        return _tensor_like(n.args[0]) and not (isinstance(n.args[0], fx.Node) and n.args[0].target is getattr)
    if getattr(n.target, "__module__", "") in ("_operator", "operator"):
        return any(_tensor_like(a) for a in n.args)
    return str(getattr(n.target, "__module__", "")).startswith("torch")


def functionalize(gm: fx.GraphModule) -> None:
    """Rewrite every in-place operation as its out-of-place twin, and make the nodes that read
    the mutated tensor after it read the operation's result instead (what they saw in eager
    mode). Refused by name where that is not provably the eager semantics: the tensor is the
    model input, a parameter or buffer, may share memory with another value (a view), or has
    no out-of-place twin."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for n in list(gm.graph.nodes):
        kind = _inplace_kind(gm, n)
        if kind is None or not n.args or not isinstance(n.args[0], fx.Node):
            continue
        a = n.args[0]
        what = f"the in-place operation {getattr(n.target, '__name__', n.target)} (node {n.name!r}) on {a.name!r}"
        later = [u for u in a.users if u is not n and order[u] > order[n]]
        if a.op in ("placeholder", "get_attr"):
            raise ConfigError(f"graph AR cannot run {what}: it modifies the model input or a parameter/buffer in "
                              "place; compute a new tensor instead (e.g. `h = x.relu()`)")
        if _may_alias(gm, a) or any(_may_alias(gm, u) for u in a.users if u is not n):
            raise ConfigError(f"graph AR cannot run {what}: that tensor may share memory with another value (a view "
                              "or an alias), so rewriting it out of place could change what the other value sees; "
                              "write it out of place (`h = h + y`, `h = h.relu()`, inplace=False)")
        if kind == "augmented" and later and not _tensor_like(a):
            raise ConfigError(f"graph AR cannot tell whether {what} mutates a tensor or rebinds a number, and "
                              f"{', '.join(repr(u.name) for u in later)} read {a.name!r} afterwards; write it as "
                              "`h = h + y`")
        if kind == "method":
            twin = str(n.target)[:-1]
            if not callable(getattr(torch.Tensor, twin, None)):
                raise ConfigError(f"graph AR cannot run {what}: Tensor.{n.target} has no out-of-place twin "
                                  f"Tensor.{twin}; compute a new tensor instead")
            n.target = twin
        elif kind == "function":
            n.target = getattr(torch, n.target.__name__[:-1])  # type: ignore[union-attr]
        elif kind == "augmented":
            n.target = _OUT_OF_PLACE[n.target]  # type: ignore[index]
        elif kind == "kwarg":
            if "inplace" in n.kwargs:
                n.kwargs = {**n.kwargs, "inplace": False}
            else:
                pos = list(inspect.signature(n.target).parameters).index("inplace")  # type: ignore[arg-type]
                n.args = tuple(False if i == pos else v for i, v in enumerate(n.args))
        else:  # an in-place module (shared with the user's model) is given a copy to overwrite
            n.meta["inplace_module"] = True
        def swap(v: fx.Node, new: fx.Node = n, old: fx.Node = a) -> fx.Node:
            return new if v is old else v

        for u in later:
            u.args = fx.node.map_arg(u.args, swap)
            u.kwargs = fx.node.map_arg(u.kwargs, swap)


# ----------------------------------------------------------------------------------------
# the recording forward
# ----------------------------------------------------------------------------------------
def _needs_rng(gm: fx.GraphModule, n: fx.Node) -> bool:
    """Whether ``n`` may draw random numbers (anything not known to be deterministic)."""
    if n.op == "call_module":
        return not isinstance(gm.get_submodule(str(n.target)), DETERMINISTIC_MODULES)
    if n.op == "call_function":
        return n.target not in DETERMINISTIC_FUNCTIONS
    if n.op == "call_method":
        return str(n.target) not in DETERMINISTIC_METHODS
    return False


def _pool_with_indices(x: Tensor, kernel_size: Any, stride: Any, padding: Any, dilation: Any,
                       ceil_mode: bool) -> tuple[Tensor, Tensor]:
    return F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode=ceil_mode, return_indices=True)


_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _plain_batchnorm(mod: nn.Module) -> bool:
    """A BatchNorm module of the exact torch types, with no hooks: its forward is
    ``_BatchNorm.forward``, which :func:`_batchnorm_with_stats` reproduces."""
    from torch.nn.modules import module as _module

    return (type(mod) in _BATCHNORMS and not mod._forward_hooks and not mod._forward_pre_hooks
            and not _module._global_forward_hooks and not _module._global_forward_pre_hooks)


def _batchnorm_with_stats(mod: nn.modules.batchnorm._BatchNorm, x: Tensor
                          ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    """``mod(x)`` and, where it normalizes with the batch's statistics on the CPU, those
    statistics (mean, 1/sqrt(var + eps)) as its kernel computed them: ``_BatchNorm.forward``
    step by step (running statistics and ``num_batches_tracked`` updated as it updates them),
    calling the kernel ``torch.batch_norm`` calls on the CPU (bitwise the same output), so graph
    AR's BatchNorm VJP does not compute the statistics a second time."""
    batch = mod.training or (mod.running_mean is None and mod.running_var is None)
    if not batch or x.device.type != "cpu" or x.dim() < 2:
        return mod(x), None
    mod._check_input_dim(x)
    eaf = 0.0 if mod.momentum is None else mod.momentum
    if mod.training and mod.track_running_stats and mod.num_batches_tracked is not None:
        mod.num_batches_tracked.add_(1)
        eaf = 1.0 / float(mod.num_batches_tracked) if mod.momentum is None else mod.momentum
    track = not mod.training or mod.track_running_stats
    F._verify_batch_size(x.size())  # type: ignore[attr-defined]
    out, mean, invstd = torch.ops.aten.native_batch_norm(x, mod.weight, mod.bias, mod.running_mean if track else None,
                                                        mod.running_var if track else None, True, eaf, mod.eps)
    return out, (mean, invstd)



def _with_record(g: fx.Graph, m: fx.Node, fn: Any, args: tuple) -> list[fx.Node]:
    """Replace node ``m`` by ``fn(*args)``, which returns (its value, a record of the forward
    pass), and return the two getitem nodes: the value takes ``m``'s uses, the record is
    recorded beside it."""
    with g.inserting_after(m):
        both = g.call_function(fn, args)
    with g.inserting_after(both):
        val = g.call_function(operator.getitem, (both, 0))
    with g.inserting_after(val):
        rec = g.call_function(operator.getitem, (both, 1))
    m.replace_all_uses_with(val)
    g.erase_node(m)
    return [val, rec]

def recording_module(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[str]]:
    """A copy of the traced graph that returns every node's value (one compiled call, no
    interpreter); ``nn.MaxPool2d`` nodes also return their argmax indices (``NAME#idx``),
    BatchNorm nodes their batch statistics (``NAME#bnstats``, :func:`_batchnorm_with_stats`), and
    each node that may draw random numbers the generators' state just before it (``NAME#rng``)."""
    g = fx.Graph()
    val_map: dict[fx.Node, fx.Node] = {}
    g.graph_copy(gm.graph, val_map)
    first = next((val_map[n] for n in gm.graph.nodes if n.op == "placeholder"), None)
    names: list[str] = []
    outs: list[fx.Node] = []
    for n in gm.graph.nodes:
        if n.op in ("output", "get_attr"):
            continue
        m = val_map[n]
        if first is not None and _needs_rng(gm, n):
            with g.inserting_before(m):
                outs.append(g.call_function(rng_state, (first,)))
            names.append(n.name + "#rng")
        mod = gm.get_submodule(str(n.target)) if n.op == "call_module" else None
        if n.meta.get("inplace_module"):
            with g.inserting_before(m):
                m.args = (g.call_method("clone", (m.args[0],)), *m.args[1:])
        if mod is not None and _plain_batchnorm(mod) and len(n.args) == 1 and not n.kwargs \
                and not n.meta.get("inplace_module"):
            with g.inserting_before(m):
                mod_node = g.get_attr(str(n.target))
            outs += _with_record(g, m, _batchnorm_with_stats, (mod_node, m.args[0]))
            names += [n.name, n.name + "#bnstats"]
        elif type(mod) is nn.MaxPool2d and not mod.return_indices and len(n.args) == 1 and not n.kwargs:
            outs += _with_record(g, m, _pool_with_indices, (m.args[0], mod.kernel_size, mod.stride, mod.padding,
                                                             mod.dilation, mod.ceil_mode))
            names += [n.name, n.name + "#idx"]
        else:
            names.append(n.name)
            outs.append(m)
    g.output(tuple(outs))
    return fx.GraphModule(gm, g), names
