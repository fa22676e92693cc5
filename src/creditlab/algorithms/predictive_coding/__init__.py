"""Predictive coding, inference learning (Whittington & Bogacz 2017; on arbitrary computation
graphs Millidge, Tschantz & Buckley 2020, "Predictive coding approximates backprop along
arbitrary computation graphs").

The model is traced as graph AR traces it (:mod:`creditlab.algorithms.graph_ar`: torch.fx,
in-place operations rewritten out of place, random draws replayed, buffers updated once per
step): every relaxed unit u (an operation with its fused elementwise activation; an MLP gives
exactly its layers) has a value node x_u and a prediction mu_u = f_u(x_parents) from its
parents' value nodes (the model input and other constants at their forward values). The energy
of a batch is

    F = sum_n [ sum_u 1/2 ||x_u,n - mu_u,n||^2 + l(mu_out,n, y_n) ],

the free value nodes being every relaxed unit but the output. The output is *clamped to the
target* and its energy term is the training loss itself at the prediction: for ``mse`` the
squared error with x_out = y, for ``cross_entropy`` -sum_i y_i log softmax(mu_out)_i with the
one-hot target, as jpc (``pc_energy_fn``, loss="ce") and PCX (``ce_energy``) define it. The
relaxation is per sample (F is a sum over the batch, as in PCX; jpc divides by the batch size,
which rescales its step), so eta does not depend on the batch size or on the loss's reduction.

The value nodes start at the forward pass (``init=forward``; ``zero``: at 0) and take ``steps``
synchronous gradient steps of size ``eta`` on F:

    x_u <- x_u - eta (eps_u - sum_{c in children(u)} J_{c,u}^T eps_c),   eps_u = x_u - mu_u,

with eps_out = -dl/dmu_out and J_{c,u} = d mu_c / d x_u. Then each parameter theta of unit u
gets .grad = r (d mu_u / d theta)^T (-eps_u) (the output unit: r (d mu_out/d theta)^T dl/dmu_out),
i.e. r dF/dtheta: the local error times the presynaptic value for a Linear layer, dW = -r
(eps_u * f'(a_u))^T x_parent. r is the loss's reduction (1 for a sum, 1 / global batch for a
mean), so the update is on the scale of dL/dtheta.

* Standard (``fixed_prediction=false``, the default): predictions and Jacobians are recomputed
  at the current values each step (Whittington & Bogacz; jpc; PCX), and the update reads the
  relaxed presynaptic values. It approaches backprop as the output error shrinks; F decreases
  for a small enough eta.
* ``fixed_prediction=true`` (Millidge et al. 2020): mu and J held at the forward pass and the
  update read at the forward values. Then the errors obey eps <- (1 - eta) eps + eta J^T eps,
  a linear iteration whose fixed point is eps_u* = -dl/dmu_u (backprop's chain rule), so the
  update at convergence is exactly autograd's gradient of the loss; ``steps=inf`` gives it in
  one backward pass. In coordinates s = -r eps this is Activation Relaxation's iteration from a
  zero state: ``pc:fixed_prediction=true,steps=T`` equals ``ar:init=zero,steps=T``, and it is
  computed with graph AR's closed form (F at t = 0 and T) unless ``energy_trace=true`` asks for
  the energy after every step (then step by step; the same updates to rounding).

Defaults: steps = 100, eta = 0.1, as in Millidge et al.'s code (BerenMillidge/PredictiveCodingBackprop,
``--n_inference_steps 100 --inference_learning_rate 0.1``; its update is written
2 * rate * dF/dx, an effective 0.2) and as ``ar``, so the two compare at the same relaxation
steps. eta must lie in (0, 2): F's curvature is at least 1 along the top value nodes (their own
error term), so larger steps cannot converge; the standard variant may need a smaller eta
where the weights are large, which ``diagnostics()``'s energy shows. ``verify=first`` checks
the first step of each traced graph against autograd (:meth:`PredictiveCoding._verify`).

Layout: :mod:`.predictions` (a unit's prediction, VJP and parameter update at current values),
:mod:`.relaxation` (the two relaxations as functions of tensors), :mod:`.algorithm` (the ``pc``
class). This package reads graph AR's tracing, plan and rules and does not change them.
"""

from creditlab.algorithms.predictive_coding.algorithm import (
    PredictiveCoding,
    check_pc_options,
)
from creditlab.algorithms.predictive_coding.relaxation import (
    relax_fixed,
    relax_standard,
)

__all__ = ["PredictiveCoding", "check_pc_options", "relax_fixed", "relax_standard"]
