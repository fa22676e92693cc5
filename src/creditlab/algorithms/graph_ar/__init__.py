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
* any other operation: its autograd VJP at the forward values (eager ``torch.autograd.grad``). For
  max-pooling this routes the state to the argmax of each window, as the authors' CNN code.
  Multi-output operations (chunk, LSTM, attention) are evaluated inside the units of the
  getitems that read them; random operations replay the generator state they had in the
  forward pass, and modules see their buffers as before it (drawn once, updated once).
  In-place operations are rewritten out of place before tracing ends (:func:`.tracing.functionalize`).

Weights update with the local product at the relaxed state: every parameter's update is the
VJP with respect to it of the node that consumes it, at delta = x^i * f'(a)
(``update_derivative``), e.g. dW = delta^T x_in for a Linear edge; learned psi gets dW
transposed (as ``ar``).

Schedules and modes (same options as ``ar``): with N the nilpotent map (N x)_i = sum over free
children j of J_{j,i}^T x^j and b_i = J_{o,i}^T c, one Euler step is x <- M x + eta b with
M = (1-eta) I + eta N (``synchronous``) or (1-eta)(I - eta N)^{-1} (``sweep``: units updated
in reverse topological order, each from its children's newest states). Then
x(T) = x* + sum_k w_k N^k (x(0) - x*), w_k from :func:`creditlab.algorithms._relaxation_weights.relaxation_weights`
(binomial / negative-binomial). ``exact`` evaluates this by one reverse topological pass that
carries for each unit the vectors [x*, (N^0 e)_i, (N^1 e)_i, ...] graded by path length
(e = x(0) - x*), each its own tensor, through the unit's VJP. With ``init=zero`` e = -x* and the
vectors are the per-path-length parts G_i[m] = (N^m b)_i, x(T)_i = sum_m (1 - sum_{k<=m} w_k)
G_i[m]; only the path lengths that exist are carried (a chain carries one). Where the states
below a unit need fewer combinations of these vectors than it has (towards the input), it
carries those combinations instead, one per distance to a state asked for below it
(:mod:`.closed_form`; the training step asks for the states of the units with parameters).
Negligible terms are not computed (issue 20): init=forward drops the orders whose weights sum
to at most the dtype's machine epsilon times the largest (a unit pushes at most 31 vectors at
T = 100, eta = 0.1, synchronous, float32), init=zero the path lengths whose weight is at most
that times the largest at their unit. ``steps=inf`` gives x* with
one backward pass, Conv2d and BatchNorm units computing their parameters' updates in the same
kernel call. ``diagnostics()`` reports each state's relaxation residual ||x(T) - x*|| / ||x*||.

``derivative`` / ``update_derivative`` take ``true``, ``false`` or, for the Appendix C
conditions, ``no_conv`` (drop f' only after Conv2d edges) or ``no_fc`` (only after Linear
edges).

Layout, one role per module: :mod:`.tracing` (torch.fx tracing, the recording forward),
:mod:`.ops` (operation tables, activation derivatives), :mod:`.units` (states and their kinds),
:mod:`.relaxation` (the problem and its exact / simulated solution), :mod:`.closed_form`
(which vectors each unit carries in the exact solution), :mod:`.rules` (the VJP
rule per node kind and the parameter updates), :mod:`.guard` (``verify=first``) and
:mod:`.algorithm` (the ``graph_ar`` class). The relaxation weights are shared with the MLP
``ar`` through :mod:`creditlab.algorithms._relaxation_weights`, the options through
:mod:`creditlab.algorithms._ar_options`; this package does not import ``ar``.
"""

from creditlab.algorithms._relaxation_weights import tail_weights
from creditlab.algorithms.graph_ar.algorithm import GraphActivationRelaxation
from creditlab.algorithms.graph_ar.guard import locate_divergence
from creditlab.algorithms.graph_ar.ops import DERIVATIVE_CHOICES
from creditlab.algorithms.graph_ar.relaxation import (
    GraphRelaxation,
    relax_graph_exact,
    relax_graph_simulate,
)
from creditlab.algorithms.graph_ar.tracing import (
    mlp_as_graph,
    recording_module,
    trace_module,
)
from creditlab.algorithms.graph_ar.units import Unit, build_units

__all__ = [
    "DERIVATIVE_CHOICES", "GraphActivationRelaxation", "GraphRelaxation", "Unit", "build_units", "locate_divergence",
    "mlp_as_graph", "recording_module", "relax_graph_exact", "relax_graph_simulate", "tail_weights", "trace_module",
]
