"""The ``graph_ar`` algorithm: graph AR's options, backward weights, per-batch problem and step."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, fx, nn

from creditlab.algorithms import Algorithm, StepResult, register_algorithm
from creditlab.algorithms._ar_options import (
    AR_DEFAULTS,
    DIVERGENCE_HINT,
    check_relaxation_options,
)
from creditlab.algorithms._residuals import RelaxationResidual
from creditlab.algorithms._verify import snapshot
from creditlab.algorithms.graph_ar.guard import GuardRules
from creditlab.algorithms.graph_ar.ops import DERIVATIVE_CHOICES, Derivative, act_derivative
from creditlab.algorithms.graph_ar.relaxation import (
    FusedFn,
    GraphRelaxation,
    PushFn,
    relax_graph_exact,
    relax_graph_simulate,
)
from creditlab.algorithms.graph_ar.rules import NodeRules, uses_derivative
from creditlab.algorithms.graph_ar.tracing import recording_module, trace_module
from creditlab.algorithms.graph_ar.units import (
    Plan,
    Unit,
    build_units,
    make_plan,
    own_params,
)
from creditlab.errors import ConfigError
from creditlab.models.init import init_weight_


def _init_feedback(w: Tensor, spec: str, kind: str) -> None:
    """psi's initial values (in W's shape): the init scheme ``spec`` of :mod:`creditlab.models.init`,
    or ``he`` as the built-in ResNets initialise W (He et al. 2015 normal, fan-out, for Conv2d;
    PyTorch's default for Linear)."""
    if str(spec).strip().lower() in ("he", "kaiming"):
        if kind == "conv":
            nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu")
        else:
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        return
    init_weight_(w, spec)


class _AllStates(dict):
    """The states a step computed (those its updates read), and every other state on first
    asking for it (the relaxation residual): ``full`` recomputes them all, once."""

    def __init__(self, states: dict[str, Tensor], full: Callable[[], dict[str, Tensor]]):
        super().__init__(states)
        self._full: Callable[[], dict[str, Tensor]] | None = full

    def __missing__(self, key: str) -> Tensor:
        if self._full is None:
            raise KeyError(key)
        full, self._full = self._full, None
        for k, v in full().items():
            self.setdefault(k, v)
        return self[key]


@register_algorithm
class GraphActivationRelaxation(RelaxationResidual, NodeRules, GuardRules, Algorithm):
    """``graph_ar``: Activation Relaxation on any torch.fx-traceable module (Appendix A);
    ``ar`` on a model that is not an MLP builds this. Options as ``ar`` (module docstring)."""

    name = "graph_ar"
    defaults = dict(AR_DEFAULTS)  # the same options as the MLP ``ar``
    divergence_hint = DIVERGENCE_HINT

    def __init__(self, model: nn.Module, loss, **options: Any):
        super().__init__(model, loss, **options)
        o = self.options
        check_relaxation_options(o)
        for key in ("derivative", "update_derivative"):
            if o[key] not in DERIVATIVE_CHOICES or o[key] in (0, 1) and not isinstance(o[key], bool):
                raise ConfigError(f"ar option {key}={o[key]!r} is not valid; choose one of: true, false, no_conv, no_fc")
        self._graphs: dict[tuple[bool, ...], dict[str, Any]] = {}
        self._key: tuple[bool, ...] | None = None
        self._buffers_before: dict[str, Tensor] = {}
        self._checking = False  # the guard's re-evaluation check, on its pending step
        self.last_rows: dict[str, int] = {}  # vectors each unit's pushes carried in the last step
        self._all_modules = list(self.model.modules())  # read every step for their train/eval modes
        self._watch: list[Tensor] | None = None
        self._module_of: dict[str, nn.Module] = {}
        self._use_graph()
        self._struct_relaxed = self._structurally_relaxed()
        self.feedback = nn.ParameterDict()
        self._fb_of: dict[str, str] = {}  # module target -> feedback key
        if o["feedback"] != "transpose":
            self._make_feedback()

    # -- the traced graph, one per train/eval configuration --------------------------
    _GRAPH = ("gm", "_rec", "_rec_names", "units", "owner", "out_node", "unit_by_name", "_plan", "_verified",
              "_buffer_slots", "_costs")

    def _use_graph(self) -> None:
        """Trace the model for its current train/eval modes (torch.fx bakes ``self.training``
        into functional calls such as ``F.dropout(h, p, self.training)``), or switch back to the
        graph traced for them; each graph has its own plan and its own first-step guard."""
        key = tuple(m.training for m in self._all_modules)
        if key == self._key:
            return
        if self._key is not None:
            self._graphs[self._key] = {a: getattr(self, a) for a in self._GRAPH}
        if key in self._graphs:
            self.__dict__.update(self._graphs[key])
        else:
            self.gm = trace_module(self.model)
            self._rec, self._rec_names = recording_module(self.gm)
            self.units, self.owner, self.out_node = build_units(self.gm)
            self.unit_by_name = {u.name: u for u in self.units}
            self._plan: Plan | None = None
            self._verified = False
            # (qualified name, module, key) of every buffer, read live each step (a module's
            # buffers may be replaced, e.g. by .to()); the push costs per batch shape
            self._buffer_slots = [(f"{mn}.{k}" if mn else k, mod, k) for mn, mod in self.gm.named_modules()
                                  for k, b in mod._buffers.items() if b is not None]
            self._costs: dict[tuple, dict[str, float]] = {}
        self._key = key

    def _inputs(self, u: Unit) -> list[fx.Node]:
        return [a for a in u.op.all_input_nodes if a.op not in ("placeholder", "get_attr")]

    def _structurally_relaxed(self) -> set[str]:
        rel: set[str] = set()
        for u in self.units:
            if own_params(self.gm, u) or any(self.owner[a.name] in rel for a in self._inputs(u)):
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
            _init_feedback(w, init, u.kind)
            key = target.replace(".", "_")
            self.feedback[key] = nn.Parameter(w.transpose(0, 1).contiguous(),
                                              requires_grad=self.options["feedback"] == "learned")
            self._fb_of[target] = key

    def backward_weight(self, target: str, transpose: bool = False) -> Tensor:
        """B (W's shape) used by the VJP of the Linear/Conv2d module ``target`` (e.g. ``fc1``):
        W itself (``transpose``, or ``transpose=True``) or psi transposed in its first two axes."""
        key = self._fb_of.get(target)
        if key is None or transpose:
            m = self._module_of.get(target)
            if m is None:  # (a trace holds the model's own submodules: one lookup per target)
                m = self._module_of[target] = self.gm.get_submodule(target)
            return m.weight
        return self.feedback[key].transpose(0, 1)

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
        """Per unit ``relax_residual/NAME`` (and ``relax_residual_max``, ``_mean``): how far the
        last step's relaxation left each state from its equilibrium (:meth:`relaxation_residuals`);
        with learned or random feedback, the alignment of psi^T with W per module."""
        out = self.residual_diagnostics()
        if not len(self.feedback):
            return out
        from creditlab.diagnostics.feedback import feedback_alignment

        pairs = []
        for target, key in self._fb_of.items():
            w = self.gm.get_submodule(target).weight.detach()
            pairs.append((target, w, self.feedback[key].detach().transpose(0, 1)))
        return {**out, **feedback_alignment(pairs)}

    # -- the relaxation residual of the last step ---------------------------------------
    def unit_label(self, name: str) -> str:
        """A unit's name in the log: its module's qualified name (``stages.0.0.bn1``, as in the
        parameter names) for a module, else its graph node's name (``add_3``, ``mean``)."""
        op = self.unit_by_name[name].op
        return str(op.target) if op.op == "call_module" else op.name

    def _watched(self) -> list[Tensor]:
        if self._watch is None:  # the model's parameters and the feedback weights, listed once
            self._watch = list(self.model.parameters()) + list(self.feedback.values())
        return self._watch

    def _remember(self, rel: GraphRelaxation, states: dict[str, Tensor]) -> None:
        """Keep what the residual needs until the next step: for steps = inf only the unit names
        (it is 0), else the problem (its pushes hold the forward values) and the states."""
        self.last_rows = dict(rel.rows)
        labels = {self.unit_label(u): u for u in rel.free}
        self._remember_relaxation(labels, *((None, None) if math.isinf(self.options["steps"]) else (rel, states)))

    @torch.no_grad()
    def forward_values(self, x: Tensor) -> dict[str, Any]:
        """Every node's forward value (and max-pool indices, random states) for the batch; the
        buffers as they were before it are kept for re-evaluating operations."""
        self._use_graph()
        self._buffers_before = {n: mod._buffers[k].detach().clone() for n, mod, k in self._buffer_slots
                                if mod._buffers.get(k) is not None}
        return dict(zip(self._rec_names, self._rec(x)))

    def _deriv(self, u: Unit, env: dict[str, Any]) -> Derivative | None:
        """f'(a) of the unit's fused activation at the forward pre-activation."""
        if u.act is None:
            return None
        return act_derivative(self.gm, u.act, env[u.op.name], env[u.act.name])

    @torch.no_grad()
    def build(self, env: dict[str, Any], clamp: Tensor,
              exact: bool = False) -> tuple[GraphRelaxation, dict[str, Derivative | None]]:
        """The batch's relaxation problem; ``exact``: with transpose feedback and every f' (the
        machinery the guard checks against autograd, whatever the run's variant)."""
        o = self.options
        if self._plan is None:  # which units relax: fixed by the graph and the value types
            self._plan = make_plan(self.gm, self.units, self.owner, self.out_node, env)
        plan = self._plan
        relaxed, out = plan.relaxed, plan.out
        derivs: dict[str, Derivative | None] = {}
        push: dict[str, PushFn] = {}
        fused: dict[str, FusedFn] = {}
        # the costs only weigh plans against each other (every plan is exact): keyed on shapes
        shape_key = (tuple(clamp.shape), tuple(getattr(env.get(relaxed[0]), "shape", ())), exact)
        cost = self._costs.get(shape_key)
        known = cost is not None
        cost = {} if cost is None else cost
        for name in relaxed:
            u = self.unit_by_name[name]
            d = self._deriv(u, env)
            derivs[name] = d
            d_relax = d if d is not None and (exact or uses_derivative(o["derivative"], u.kind)) else None
            push[name] = self._make_push(u, env, plan, d_relax, exact)
            if not known:
                cost[name] = self._push_cost(u, env, plan, d_relax)
            d_update = d if d is not None and (exact or uses_derivative(o["update_derivative"], u.kind)) else None
            if d_relax is d_update:
                f = self._make_fused(u, env, plan, d_relax, exact)
                if f is not None:
                    fused[name] = f
        if not known:
            self._costs[shape_key] = cost
        forward = {name: env[name] for name in relaxed}
        parents = {name: list(dict.fromkeys(self.owner[a.name] for a in plan.parents[name])) for name in relaxed}
        return GraphRelaxation(relaxed, push, forward, out, clamp, parents, fused=fused,  # type: ignore[arg-type]
                               cost=cost), derivs

    @torch.no_grad()
    def relax(self, env: dict[str, Any], clamp: Tensor) -> tuple[GraphRelaxation, dict[str, Tensor], dict]:
        o = self.options
        rel, derivs = self.build(env, clamp)
        init = {u: env[u] for u in rel.free} if o["init"] == "forward" else None
        if o["mode"] == "exact":
            # the updates read the states of the units with parameters (at the fixed point not
            # even those, where the pushes make the updates); the relaxation residual reads all
            # of them and recomputes them when asked for (:class:`_AllStates`)
            keep = {u for u in rel.order if self._plan.params[u]  # type: ignore[union-attr]
                    and not (math.isinf(o["steps"]) and u in rel.fused)}
            states = relax_graph_exact(rel, init, o["steps"], float(o["eta"]), o["schedule"], updates=True,
                                       keep=keep)
            if not math.isinf(o["steps"]):
                states = _AllStates(states, lambda: relax_graph_exact(rel, init, o["steps"], float(o["eta"]),
                                                                      o["schedule"]))
        else:
            states = relax_graph_simulate(rel, init, o["steps"], float(o["eta"]), o["schedule"])
        return rel, states, derivs

    def step(self, x: Tensor, y: Tensor) -> StepResult:
        self._forget_relaxation()  # the last step's relaxation is released before this one allocates
        self._use_graph()
        pending = self.options["verify"] == "first" and not self._verified
        self._checking = pending
        before = snapshot(self.model, x.device) if pending else None
        with torch.no_grad():
            env = self.forward_values(x)
            out = env[self.out_node.name]
            loss = self.loss(out, y)
            clamp = self.loss.grad(out, y)
            rel, states, derivs = self.relax(env, clamp)
            grads, fb = self.updates(env, rel, states, derivs, self.options["update_derivative"])
            self._remember(rel, states)
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
