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
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from creditlab.diagnostics.angles import angle_deg
from creditlab.diagnostics.feedback import sign_congruence
from creditlab.rng import rng_state, set_rng_state


class BlockNet(Protocol):
    """What these diagnostics read of a feedback learner's network (``algorithms._feedback_learning.BlockNet``),
    described here so that diagnostics never import the algorithms that use them."""

    blocks: Any


class FeedbackLearner(Protocol):
    """What these diagnostics read of a feedback learner (``algorithms._feedback_learning.FeedbackLearner``):
    ``net``, ``loss``, ``name``, ``clean_pass``, ``feedback``, ``regressor``, ``through_post`` and
    ``feedback_pairs``."""

    net: Any


def relative_error(w: Tensor, b: Tensor) -> float:
    """|W - B|_F / |W|_F."""
    wn = float(w.double().norm())
    return float((w.double() - b.double()).norm()) / wn if wn > 0 else math.nan


def sign_agreement_pct(w: Tensor, b: Tensor) -> float:
    """Percentage of entries of B whose sign equals W's."""
    return sign_congruence(w, b)


def target_matrices(net: BlockNet, form: str) -> list[Tensor | None]:
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


def hidden_gradients(algo: FeedbackLearner, x: Tensor, y: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """(synthetic g^i, true dL/dh^i) for every hidden layer on the batch (x, y), computed with
    the current B and W and without changing anything (RNG state included)."""

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
                es[i] = algo.through_post(i, g, clean)
        set_rng_state(dev, state)
        with torch.enable_grad():
            hs, out = algo.net.hidden_outputs(x)
            true = [g.detach() for g in torch.autograd.grad(algo.loss(out, y), hs)]
    finally:
        set_rng_state(dev, state)
    return synth, true


def feedback_report(algo: FeedbackLearner, x: Tensor, y: Tensor) -> dict[str, float]:
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


# ---- figures (paper Figs. 2A-C, 3B-C) ---------------------------------------------------------

METRICS = (("rel_error", "relative error |W - B| / |W|"), ("grad_angle_deg", "angle to true dL/dh (deg)"),
           ("sign_pct", "sign agreement W, B (%)"))


def read_step_rows(metrics_jsonl: str) -> list[dict]:
    """The logged step rows of a run's metrics.jsonl."""
    import json

    rows = []
    with open(metrics_jsonl) as f:
        for line in f:
            r = json.loads(line)
            if r.get("kind") == "step":
                rows.append(r)
    return rows


def plot_feedback_diagnostics(path: str, runs: dict[str, list[dict]]) -> None:
    """Three panels (relative error, synthetic-gradient angle, sign agreement) against the
    step, one line per (run, layer), from the step rows of metrics.jsonl (Fig. 2A-C / 4A-C)."""
    from creditlab.plots import plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, (metric, label) in zip(axes, METRICS):
        for run, rows in runs.items():
            keys = sorted({k for r in rows for k in r if k.split("/")[1:2] == [metric]})
            for k in keys:
                pts = [(r["step"], r[k]) for r in rows if k in r]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=f"{run} {k.split('/')[-1]}")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@torch.no_grad()
def plot_autoencoder(path: str, model: nn.Module, x: Tensor, labels: Tensor, latent_layer: int = 1, n_show: int = 8) -> None:
    """Latent codes coloured by digit (Fig. 3B) and reconstructions (Fig. 3C) of an MLP
    autoencoder; ``latent_layer`` indexes the hidden layer whose output is the code."""
    from creditlab.plots import plt

    was = model.training
    model.eval()
    tr = model.trace(x)
    model.train(was)
    z = tr.xs[latent_layer + 1].cpu()
    rec = tr.xs[-1].cpu()
    fig = plt.figure(figsize=(12, 5))
    ax = fig.add_subplot(1, 2, 1)
    fig.suptitle("latent code (left); inputs (top) and reconstructions (bottom)")
    sc = ax.scatter(z[:, 0], z[:, 1], c=labels.cpu(), cmap="tab10", s=4)
    fig.colorbar(sc, ax=ax)
    ax.set_title("latent code")
    side = int(round(math.sqrt(x[0].numel())))
    for k in range(n_show):
        for row, img in ((0, x[k].reshape(side, side)), (1, rec[k].reshape(side, side))):
            a = fig.add_subplot(2, 2 * n_show, row * 2 * n_show + n_show + k + 1)
            a.imshow(img.cpu(), cmap="gray")
            a.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
