"""The ``pc`` algorithm: options, the step on any traced module, the first-step guard and the
diagnostics (energy over the relaxation, per-unit error norms)."""

from __future__ import annotations

import math
from itertools import pairwise
from typing import Any

import torch
from torch import Tensor, nn

from creditlab.algorithms import Algorithm, StepResult, register_algorithm
from creditlab.algorithms._residuals import RelaxationResidual
from creditlab.algorithms._verify import (
    VERIFY_CHOICES,
    guard_first_step,
    snapshot,
    tolerance,
)
from creditlab.algorithms.graph_ar import GraphActivationRelaxation, locate_divergence
from creditlab.algorithms.graph_ar.units import make_plan
from creditlab.algorithms.predictive_coding.predictions import (
    UnitPredictor,
    refuse_derived_inputs,
)
from creditlab.algorithms.predictive_coding.relaxation import (
    Relaxed,
    relax_fixed,
    relax_standard,
)
from creditlab.distributed import all_reduce_, batch_total
from creditlab.errors import ConfigError
from creditlab.losses import as_targets
from creditlab.spec import choice

PC_DEFAULTS: dict[str, Any] = {
    "steps": 100,
    "eta": 0.1,
    "fixed_prediction": False,
    "init": "forward",
    "output_precision": 1.0,
    "energy_trace": False,
    "verify": "first",
}

Updates = dict[int, tuple[Tensor, Tensor]]  # id of the parameter -> (parameter, update)


def check_pc_options(o: dict[str, Any]) -> None:
    for key in ("fixed_prediction", "energy_trace"):
        if not isinstance(o[key], bool):
            raise ConfigError(f"pc option {key}={o[key]!r} must be true or false")
    choice("pc", "init", o["init"], ("forward", "zero"))
    if o["verify"] is False:  # the spec parser reads "off" as false
        o["verify"] = "off"
    choice("pc", "verify", o["verify"], VERIFY_CHOICES)
    steps = o["steps"]
    if not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 0) and not (
            isinstance(steps, float) and math.isinf(steps) and steps > 0):
        raise ConfigError(f"pc option steps={steps!r} must be a non-negative integer (or inf with fixed_prediction=true)")
    if math.isinf(steps) and not o["fixed_prediction"]:
        raise ConfigError("pc: steps=inf needs fixed_prediction=true; without the fixed-prediction assumption the "
                          "relaxation has no closed-form equilibrium, so give a finite number of steps")
    gamma = o["output_precision"]
    if not (isinstance(gamma, (int, float)) and not isinstance(gamma, bool) and 0 < gamma < math.inf):
        raise ConfigError(f"pc option output_precision={gamma!r} must be a positive number (the weight of the "
                          "output's energy term; 1 is the plain loss)")
    eta = o["eta"]
    if not (isinstance(eta, (int, float)) and not isinstance(eta, bool) and 0 < eta < 2):
        raise ConfigError(f"pc option eta={eta!r} must be a number with 0 < eta < 2: the energy's curvature is at "
                          "least 1 along the top value nodes (their own error), so gradient steps of eta >= 2 do not "
                          "converge, and eta <= 0 does not descend (the default is 0.1)")


@register_algorithm
class PredictiveCoding(RelaxationResidual, Algorithm):
    """``pc``: predictive coding (inference learning) on any torch.fx-traceable module, MLPs
    included (the package docstring has the equations). Options: ``steps`` (T, an integer, or
    inf with ``fixed_prediction``), ``eta`` (the relaxation step), ``fixed_prediction`` (hold
    predictions and Jacobians at the forward pass: Millidge, Tschantz & Buckley 2020),
    ``init`` forward|zero (the value nodes' start), ``energy_trace`` (log the energy after
    every relaxation step) and ``verify`` first|off (the first-step guard against autograd)."""

    name = "pc"
    defaults = dict(PC_DEFAULTS)
    divergence_hint = "lower eta (the relaxation step) or the learning rate, or use pc:fixed_prediction=true"

    def __init__(self, model: nn.Module, loss, **options: Any):
        super().__init__(model, loss, **options)
        check_pc_options(self.options)
        try:  # graph AR's tracing, functionalization, recording forward, units and per-node rules
            self.graph = GraphActivationRelaxation(model, loss, steps=math.inf, verify="off")
        except ConfigError as err:
            raise ConfigError(f"pc: {err}") from None
        self._standard_ok: set[Any] = set()  # graphs checked for derived inputs (standard variant)
        self._last: dict[str, Any] | None = None
        self._summary: dict[str, Any] | None = None

    def _watched(self) -> list[Tensor]:
        return list(self.model.parameters())

    def _scale(self, n: int) -> float:
        """The update's factor on dF/dtheta: r / gamma, r = d(reduced loss) / d(sum of per-sample
        losses) (1 for a sum, 1/N of the global batch for a mean) and gamma the output precision."""
        r = 1.0 if self.loss.reduction == "sum" else 1.0 / batch_total(n)
        return r / float(self.options["output_precision"])

    # -- the step ------------------------------------------------------------------------
    def step(self, x: Tensor, y: Tensor) -> StepResult:
        self._forget_relaxation()
        self._last, self._summary = None, None
        g = self.graph
        g._use_graph()
        pending = self.options["verify"] == "first" and not g._verified
        g._checking = pending
        before = snapshot(self.model, x.device) if pending else None
        try:
            grads, env, out, loss, clamp = self._run(x, y)
        except BaseException:
            g._checking = False
            raise
        if pending:
            try:
                g._verified = self._verify(x, y, env, out, grads, clamp, before)
            except ConfigError:
                for p, _ in grads.values():
                    p.grad = None
                raise
            finally:
                g._checking = False
        return StepResult(loss, out)

    @torch.no_grad()
    def _run(self, x: Tensor, y: Tensor) -> tuple[Updates, dict[str, Any], Tensor, Tensor, Tensor | None]:
        """The forward pass, the relaxation and the updates (written into .grad)."""
        g = self.graph
        env = g.forward_values(x)
        out = env[g.out_node.name]
        loss = self.loss(out, y)
        if g._plan is None:
            g._plan = make_plan(g.gm, g.units, g.owner, g.out_node, env)
        if self.options["fixed_prediction"]:
            grads, clamp = self._fixed(env, out, y)
        else:
            grads, clamp = self._standard(env, out, y), None
        for p, gr in grads.values():
            p.grad = gr
        return grads, env, out, loss, clamp

    def _standard(self, env: dict[str, Any], out: Tensor, y: Tensor) -> Updates:
        g, o = self.graph, self.options
        plan = g._plan
        if g._key not in self._standard_ok:
            refuse_derived_inputs(g, env)
            self._standard_ok.add(g._key)
        order, top = plan.relaxed, plan.out
        predictors = {u: UnitPredictor(g, u, env) for u in order}
        x0 = {u: (env[u] if o["init"] == "forward" else torch.zeros_like(env[u])) for u in order if u != top}
        t = as_targets(y, out)
        gamma = float(o["output_precision"])

        def output_term(mu: Tensor) -> tuple[Tensor, Tensor]:
            return gamma * self.loss.per_sample(mu, t).sum(), gamma * self.loss.sample_grad(mu, t)

        res = relax_standard(order, top, predictors, x0, int(o["steps"]), float(o["eta"]), output_term)
        scale = self._scale(out.shape[0])
        grads: Updates = {}
        for u in order:
            if plan.params[u]:
                # dF/dmu_u = -eps_u (the output's: gamma dl/dmu_out), times r / gamma
                for p, gr in res.predictions[u].grads(res.eps[u] * -scale):
                    _put(grads, p, gr)
        self._keep(res, order, out.shape[0])
        return grads

    def _fixed(self, env: dict[str, Any], out: Tensor, y: Tensor) -> tuple[Updates, Tensor]:
        g, o = self.graph, self.options
        clamp = self.loss.grad(out, y)
        rel, derivs = g.build(env, clamp, exact=True)  # pushes: the Jacobians at the forward values
        scale = self._scale(out.shape[0])
        s0 = None if o["init"] == "forward" else {u: env[u] * scale for u in rel.free}  # x(0) = 0: eps = -mu
        out_sum = float(o["output_precision"]) * self.loss.per_sample(out, y).sum()
        res = relax_fixed(rel, s0, o["steps"], float(o["eta"]), scale, out_sum, trace=bool(o["energy_trace"]))
        grads = g.updates(env, rel, res.x, derivs, True, exact=True)[0]
        labels = {g.unit_label(u): u for u in rel.free}
        self._remember_relaxation(labels, *((None, None) if math.isinf(o["steps"]) else (rel, res.x)))
        self._keep(res, rel.order, out.shape[0])
        return grads, clamp

    def _keep(self, res: Relaxed, order: list[str], n: int) -> None:
        self._last = {"energy": res.energy, "eps": {u: res.eps[u] for u in order}, "n": batch_total(n)}

    # -- the first-step guard ----------------------------------------------------------
    def _verify(self, x: Tensor, y: Tensor, env: dict[str, Any], out: Tensor, grads: Updates,
                clamp: Tensor | None, before) -> bool:
        """The traced forward must be model(x), and the equilibrium updates of the machinery
        this variant runs must be autograd's gradients: for ``fixed_prediction`` graph AR's
        pushes at the forward values (the step's own updates when steps = inf); for the standard
        variant this package's predictions, VJPs and parameter updates evaluated at the forward
        values, where the fixed point of their backward pass is backprop."""
        g = self.graph
        names = {id(p): n for n, p in self.model.named_parameters()}

        def updates() -> dict[str, Tensor | None]:
            if not self.options["fixed_prediction"]:
                eq = self.forward_equilibrium(env, y)
            elif math.isinf(self.options["steps"]):
                eq = grads
            else:
                eq = g.equilibrium_updates(env, clamp)  # type: ignore[arg-type]
            return {names[i]: gr for i, (_, gr) in eq.items() if i in names}

        def consumer(pname: str) -> str:
            p = dict(self.model.named_parameters())[pname]
            users = [u for u, ps in g._plan.params.items() if any(q is p for _, q in ps)]
            return f" (used by node {users[0]!r})" if users else " (no unit of the traced graph uses it)"

        with torch.no_grad():
            return guard_first_step(self.name, self.model, self.loss, x, y, before, out, updates,
                                    lambda: locate_divergence(g.gm, env, self.model, x), consumer)

    @torch.no_grad()
    def forward_equilibrium(self, env: dict[str, Any], y: Tensor) -> Updates:
        """The standard variant's machinery at the forward values: every prediction made from
        the forward values (each must reproduce its forward value), the output's loss gradient
        carried down through the predictions' VJPs (backprop through them), and each unit's
        parameter update at that vector; equal to autograd's gradients when every unit is exact."""
        g = self.graph
        plan = g._plan
        values = {u: env[u] for u in plan.relaxed if u != plan.out}
        preds = {}
        for u in plan.relaxed:
            preds[u] = UnitPredictor(g, u, env).predict(values, params=True)
            fwd = env[u]
            tol = tolerance(fwd.dtype)
            if preds[u].mu.shape != fwd.shape or float((preds[u].mu - fwd).norm()) > tol * float(fwd.norm()):
                raise ConfigError(
                    f"pc verify=first: the prediction of unit {u!r} from the forward values of its inputs does not "
                    "reproduce its forward value (its random draws or state cannot be held fixed, e.g. a module "
                    "mixing fused-kernel and plain dropout); use eval mode or dropout=0 for it, or "
                    "pc:fixed_prediction=true; verify=off skips this check")
        s: dict[str, Tensor] = {plan.out: self.loss.grad(preds[plan.out].mu, y)}
        acc: dict[str, Tensor] = {}
        grads: Updates = {}
        for u in reversed(plan.relaxed):
            if u != plan.out:
                s[u] = acc.pop(u) if u in acc else torch.zeros_like(env[u])
            for p, c in preds[u].vjp(s[u]).items():
                acc[p] = acc[p] + c if p in acc else c
            if plan.params[u]:
                for p, gr in preds[u].grads(s[u]):
                    _put(grads, p, gr)
        return grads

    # -- diagnostics -------------------------------------------------------------------
    def _summarize(self) -> dict[str, Any] | None:
        """The last step's energy per relaxation step and error norm per unit, over the global
        batch: sums all-reduced across data-parallel ranks, divided by its size."""
        if self._summary is not None or self._last is None:
            return self._summary
        last = self._last
        eps = last["eps"]
        sq = [torch.linalg.vector_norm(e) ** 2 for e in eps.values()]
        vec = torch.cat([torch.stack(last["energy"]), torch.stack(sq).to(last["energy"][0].dtype)])
        if vec.device.type != "mps":  # (no float64 there)
            vec = vec.double()
        all_reduce_(vec)  # on the batch's device, as the process group's backend needs
        n = float(last["n"])
        energy = (vec[: len(last["energy"])] / n).tolist()
        norms = (vec[len(last["energy"]):] / n).sqrt().tolist()
        self._summary = {"energy": energy, "errors": dict(zip(eps, norms)),
                         "tol": tolerance(last["energy"][0].dtype)}
        self._last = None
        return self._summary

    def energy_trace(self) -> list[float] | None:
        """The last step's energy F / N (mean over the global batch of the per-sample energy)
        before the first relaxation step and after each: T + 1 values, or 2 (start and end) for
        ``fixed_prediction`` without ``energy_trace`` and for steps = inf; None before a step."""
        s = self._summarize()
        return None if s is None else list(s["energy"])

    def diagnostics(self) -> dict[str, float]:
        """``pc_energy_first`` / ``pc_energy_last`` (:meth:`energy_trace` at both ends),
        ``pc_energy_max`` (its largest value, where every step's is kept), for the standard variant ``pc_energy_rises`` (the
        steps at which F rose by more than the dtype's tolerance) and ``pc_energy_max_rise``
        (the largest rise relative to F, 0 if none): a value node crossing a ReLU's kink gives
        rises of about 1e-4; eta beyond the stability limit 2 / (largest curvature of F) gives
        rises of order 1,
        ``pc_error/NAME`` per relaxed unit (root mean over the batch of ||eps_u||^2 at the values
        the update used; the output's is ||dl/dmu_out||), with ``energy_trace=true`` also
        ``pc_energy/t`` for every t, and with ``fixed_prediction`` and finite steps each value
        node's ``relax_residual/NAME`` (||eps(T) - eps*|| / ||eps*||, eps* the backprop
        equilibrium), as graph AR reports it."""
        out = self.residual_diagnostics() if self.options["fixed_prediction"] else {}
        s = self._summarize()
        if s is None:
            return out
        e = s["energy"]
        out.update({"pc_energy_first": e[0], "pc_energy_last": e[-1]})
        if not math.isinf(self.options["steps"]) and len(e) == int(self.options["steps"]) + 1:
            out["pc_energy_max"] = max(e)  # every step's energy is known
        if not self.options["fixed_prediction"]:  # the standard relaxation descends F
            rises = [(b - a) / abs(a) for a, b in pairwise(e) if b > a + s["tol"] * abs(a)]
            out["pc_energy_rises"] = float(len(rises))
            out["pc_energy_max_rise"] = max(rises, default=0.0)
        out.update({f"pc_error/{self.graph.unit_label(u)}": v for u, v in s["errors"].items()})
        if self.options["energy_trace"]:
            out.update({f"pc_energy/{t}": v for t, v in enumerate(e)})
        return out


def _put(grads: Updates, p: Tensor, g: Tensor) -> None:
    """Add ``g`` to ``p``'s update (a parameter shared by several units gets their sum); a frozen
    parameter gets none (its .grad stays None)."""
    if not p.requires_grad:
        return
    grads[id(p)] = (p, grads[id(p)][1] + g) if id(p) in grads else (p, g)
