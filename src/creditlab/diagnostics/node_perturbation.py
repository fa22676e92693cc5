"""Diagnostics of learned feedback weights (Lansdell, Prakash & Kording, ICLR 2020, Figs. 2, 4).

Per hidden layer i (named after the forward layer W^{i+1} that B^{i+1} stands in for):

* ``rel_error``: |W - B|_F / |W|_F. For ``form=dfa`` W is the product of the forward matrices
  above the layer, W^{N+1} ... W^{i+1} (what B converges to in a linear net, Corollary 1);
  only defined when every layer is ``nn.Linear``.
* ``grad_angle_deg``: angle between the synthetic hidden-unit gradient g^i = B^T e~ and the
  true lambda^i = dL/dh^i from backprop, both flattened over the batch, in [0, 180]. (The
  authors' code compares B^T e and W^T e with the same e, on the first sample of the batch,
  and folds angles above 90 degrees to 180 - angle; we report the unfolded angle to the
  true gradient, the quantity §4.1 describes.)
* ``sign_pct``: percentage of entries with sign(B) = sign(W) (same W as ``rel_error``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from creditlab.diagnostics.angles import angle_deg
from creditlab.diagnostics.feedback import sign_congruence

if TYPE_CHECKING:  # pragma: no cover
    from creditlab.algorithms._feedback_learning import BlockNet, FeedbackLearner


def relative_error(w: Tensor, b: Tensor) -> float:
    """|W - B|_F / |W|_F."""
    wn = float(w.double().norm())
    return float((w.double() - b.double()).norm()) / wn if wn > 0 else math.nan


def sign_agreement_pct(w: Tensor, b: Tensor) -> float:
    """Percentage of entries of B whose sign equals W's."""
    return sign_congruence(w, b)


def target_matrices(net: "BlockNet", form: str) -> list[Tensor | None]:
    """What each B should converge to: W^{i+1} (fa) or W^{N+1}...W^{i+1} (dfa, linear layers)."""
    ws = [blk.layer.weight.detach() for blk in net.blocks]
    n_hidden = len(net.blocks) - 1
    if form == "fa":
        return [ws[i + 1] for i in range(n_hidden)]
    if not all(isinstance(blk.layer, nn.Linear) for blk in net.blocks):
        return [None] * n_hidden
    out: list[Tensor | None] = []
    for i in range(n_hidden):
        v = ws[-1]
        for w in reversed(ws[i + 1:-1]):
            v = v @ w
        out.append(v)
    return out


def hidden_gradients(algo: "FeedbackLearner", x: Tensor, y: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """(synthetic g^i, true dL/dh^i) for every hidden layer on the batch (x, y), computed with
    the current B and W and without changing anything (RNG state included)."""
    from creditlab.algorithms._feedback_learning import rng_state, set_rng_state

    dev = x.device
    state = rng_state(dev)
    try:
        clean = algo.clean_pass(x, y)
        L = len(algo.net.blocks)
        es: list[Tensor | None] = [None] * L
        es[L - 1] = clean.e_out
        synth: list[Tensor] = [clean.e_out] * (L - 1)
        for i in reversed(range(L - 1)):
            g = algo.feedback(i, algo.regressor(i, es, clean.e_out))
            synth[i] = g.detach()
            with torch.enable_grad():
                (es[i],) = torch.autograd.grad(clean.out[i], clean.pre[i], grad_outputs=g, retain_graph=True)
        set_rng_state(dev, state)
        with torch.enable_grad():
            hs, out = algo.net.hidden_outputs(x)
            true = [g.detach() for g in torch.autograd.grad(algo.loss(out, y), hs)]
    finally:
        set_rng_state(dev, state)
    return synth, true


def feedback_report(algo: "FeedbackLearner", x: Tensor, y: Tensor) -> dict[str, float]:
    """Flat dict of the three diagnostics per layer, keys ``<algo>/<metric>/<layer>``."""
    out: dict[str, float] = {}
    synth, true = hidden_gradients(algo, x, y)
    for (name, w, b), g, lam in zip(algo.feedback_pairs(), synth, true):
        out[f"{algo.name}/grad_angle_deg/{name}"] = angle_deg(g, lam)
        if w is not None:
            out[f"{algo.name}/rel_error/{name}"] = relative_error(w, b)
            out[f"{algo.name}/sign_pct/{name}"] = sign_agreement_pct(w, b)
    return out


def summarize(report: dict[str, Any]) -> dict[str, float]:
    """Mean of each metric over layers (for tables)."""
    acc: dict[str, list[float]] = {}
    for k, v in report.items():
        parts = k.split("/")
        if len(parts) == 3 and not math.isnan(v):
            acc.setdefault(parts[1], []).append(float(v))
    return {k: sum(v) / len(v) for k, v in acc.items()}
