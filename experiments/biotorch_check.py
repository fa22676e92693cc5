"""Side-by-side check of creditlab's ``fa`` and ``signsym`` (uSF, brSF, frSF) against BioTorch.

Run once and reported in ``docs/feedback_families.md`` ("Checked against BioTorch"); not a test
dependency. BioTorch is installed without its dependencies (it needs only torch for the modules
used here) in a scratch virtual environment that sees this repository's torch and creditlab:

    python -m venv --system-site-packages /tmp/btvenv
    /tmp/btvenv/bin/pip install --no-deps biotorch          # 0.0.16 on PyPI
    /tmp/btvenv/bin/python experiments/biotorch_check.py    # --dtype float32 | float64 (default: both)

``--json`` prints one JSON object instead (for ``creditlab results record``, which runs ``python``
as its own interpreter: give it BioTorch with ``PYTHONPATH=/tmp/btvenv/lib/python3.X/site-packages``):
``{"biotorch", "torch", "steps", "lr", "results": [{"algo", "biotorch_type", "biotorch_init",
"model_init", "control", "errors": {MODEL: {DTYPE: error}}, "sign_flips": {MODEL: {DTYPE: n}}}],
"draws": {DTYPE: difference}, "brsf_kaiming": what BioTorch's brSF with its non-xavier init did}``;
the exit status is 1 where a case is not as expected, as without ``--json``.

Only ``biotorch.layers.fa_constructor`` (the Linear / Conv2d that every BioTorch FA-family layer
is) and, through it, ``biotorch.autograd.fa`` are imported; they import nothing but torch.

For each model (an MLP with biases and a small convolutional net with padding, stride and
pooling) and each method, the same weights and biases are put into both implementations, and the
feedback of BioTorch's layers is set to creditlab's:

* ``fa``: BioTorch's ``weight_backward`` := creditlab's B;
* ``usf``: nothing copied; the scale is each side's own (``signsym:init=xavier`` against
  BioTorch's xavier option, ``signsym:init=default`` against its PyTorch-default option);
* ``frsf``: BioTorch's ``weight_backward`` := creditlab's fixed magnitudes M;
* ``brsf``: both draw afresh every step; the magnitudes creditlab drew in its backward pass (|B|
  after its step) are handed to BioTorch's draw (``torch.nn.init.xavier_uniform_``, which its forward
  calls) for the same layer and step. Separately, the draws themselves are compared: from the same
  seed, creditlab's brSF/frSF magnitude draw and BioTorch's ``abs(xavier_uniform_(...))`` give the
  same numbers.

Then both run ``--steps`` SGD steps on the same batches (cross-entropy, batch mean) and every
parameter's gradient is compared at every step: max |g_creditlab - g_biotorch| / max |g_biotorch|,
the largest over parameters and steps. The SGD steps use a large learning rate so that some
weights change sign between steps (the feedback must follow W's signs as they are at the step).
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn

try:
    from biotorch.layers import fa_constructor as bt
except ImportError as exc:  # pragma: no cover - the check needs BioTorch
    sys.exit(f"biotorch is not importable ({exc}); install it in a scratch venv: "
             "python -m venv --system-site-packages /tmp/btvenv && /tmp/btvenv/bin/pip install --no-deps biotorch, "
             "then run /tmp/btvenv/bin/python experiments/biotorch_check.py")

from creditlab.algorithms import build_algorithm
from creditlab.losses import build_loss


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16), nn.Tanh(),
                         nn.Linear(16, 10))


def convnet() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(),
                         nn.Linear(8 * 3 * 3, 16), nn.ReLU(), nn.Linear(16, 10))


MODELS = {"mlp": (mlp, (64,)), "conv": (convnet, (3, 12, 12))}


def biotorch_copy(net: nn.Sequential, mode: str, init: str) -> nn.Sequential:
    """The same architecture with BioTorch's layers (``layer_config`` type ``mode``, init option
    ``init``), carrying ``net``'s weights and biases."""
    out = []
    for m in net:
        cfg = {"type": mode, "options": {"constrain_weights": False, "gradient_clip": False, "init": init}}
        if isinstance(m, nn.Linear):
            b = bt.Linear(m.in_features, m.out_features, m.bias is not None, cfg)
        elif isinstance(m, nn.Conv2d):
            b = bt.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                          m.bias is not None, m.padding_mode, cfg)
        else:
            out.append(m)
            continue
        b = b.to(m.weight.dtype)
        with torch.no_grad():
            b.weight.copy_(m.weight)
            if m.bias is not None:
                b.bias.copy_(m.bias)
        if mode in ("usf", "brsf"):  # BioTorch forms these from sign(W) in forward; set the initial one likewise
            b.weight_backward = nn.Parameter(b.scaling_factor * torch.sign(b.weight.detach()), requires_grad=False)
        out.append(b)
    return nn.Sequential(*out)


def routed(net: nn.Sequential) -> list[tuple[str, nn.Module]]:
    return [(str(i), m) for i, m in enumerate(net) if isinstance(m, (nn.Linear, nn.Conv2d))]


@contextmanager
def handed_draws(draws: list[torch.Tensor | None]):
    """BioTorch's brSF forward calls ``torch.nn.init.xavier_uniform_(wb)`` once per layer, in
    forward order; fill ``wb`` with the given magnitudes instead (or draw as usual for None)."""
    orig = torch.nn.init.xavier_uniform_
    queue = list(draws)

    def fill(t, gain=1.0, **kw):
        m = queue.pop(0)
        if m is None:
            return orig(t, gain, **kw)
        with torch.no_grad():
            return t.copy_(m)

    torch.nn.init.xavier_uniform_ = fill
    try:
        yield
    finally:
        torch.nn.init.xavier_uniform_ = orig
    if queue:
        raise RuntimeError(f"BioTorch drew {len(draws) - len(queue)} magnitudes, expected {len(draws)}")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = float(b.abs().max())
    return float((a - b).abs().max()) / (scale if scale > 0 else 1.0)


def compare(model: str, spec: str, mode: str, bt_init: str, model_init: str, dtype: torch.dtype, steps: int,
            lr: float, seed: int = 0) -> tuple[float, int]:
    """Largest relative gradient error over parameters and steps, and how many weights changed sign."""
    make, in_shape = MODELS[model]
    torch.manual_seed(seed)
    with torch.no_grad():
        net = make().to(dtype)
        if model_init == "xavier":
            for _, m in routed(net):
                nn.init.xavier_uniform_(m.weight)
    loss = build_loss("cross_entropy")
    algo = build_algorithm(spec, net, loss)
    bnet = biotorch_copy(net, mode, bt_init)
    layers, blayers = routed(net), routed(bnet)
    with torch.no_grad():
        for (n, _), (_, b) in zip(layers, blayers):
            if mode == "fa":
                b.weight_backward.copy_(algo.B[n])
            elif mode == "frsf":
                b.weight_backward.copy_(algo.M[n])

    worst, flips = 0.0, 0
    start_signs = [torch.sign(m.weight.detach()).clone() for _, m in layers]
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        x = torch.randn((16, *in_shape), generator=g).to(dtype)
        y = torch.randint(0, 10, (16,), generator=g)
        algo.B.clear() if mode == "brsf" else None
        algo.step(x, y)
        for p in bnet.parameters():
            p.grad = None
        # brSF: the magnitudes creditlab drew in this step, |B| (= M where W != 0; where W = 0 both B are 0)
        draws = [algo.B[n].abs() if n in algo.B else None for n, _ in layers]
        with handed_draws(draws) if mode == "brsf" else nullcontext():
            out = bnet(x)
        F.cross_entropy(out, y).backward()
        cl = dict(net.named_parameters())
        for name, p in bnet.named_parameters():
            if not p.requires_grad:
                continue  # BioTorch's weight_backward / bias_backward
            worst = max(worst, rel_err(cl[name].grad, p.grad))
        with torch.no_grad():  # the same SGD step on both
            for name, p in bnet.named_parameters():
                if p.requires_grad:
                    cl[name].sub_(lr * cl[name].grad)
                    p.copy_(cl[name])
    flips = sum(int((torch.sign(m.weight.detach()) != s).sum()) for (_, m), s in zip(layers, start_signs))
    return worst, flips


def draws_equal(dtype: torch.dtype) -> float:
    """From one seed: creditlab's brSF/frSF magnitudes (init=xavier) against BioTorch's
    abs(xavier_uniform_); the largest relative difference over the conv net's layers."""
    net = convnet().to(dtype)
    algo = build_algorithm("signsym:variant=brsf,init=xavier", net, build_loss("cross_entropy"))
    diff = 0.0
    for i, (_, m) in enumerate(routed(net)):
        torch.manual_seed(100 + i)
        ours = algo._draw(m, 0.0)
        torch.manual_seed(100 + i)
        theirs = torch.nn.init.xavier_uniform_(torch.empty_like(m.weight)).abs()
        diff = max(diff, rel_err(ours, theirs))
    return diff


CASES = [  # (creditlab spec, BioTorch type, BioTorch init option, model init, expected equal)
    ("fa", "fa", "xavier", "default", True),
    ("signsym:variant=usf,init=xavier", "usf", "xavier", "xavier", True),
    ("signsym:variant=usf,init=default", "usf", "kaiming", "default", True),
    ("signsym:variant=frsf,init=xavier", "frsf", "xavier", "xavier", True),
    ("signsym:variant=brsf,init=xavier", "brsf", "xavier", "xavier", True),
    # control, expected to differ: uSF's default init=like takes W's sample standard deviation at
    # construction, not xavier's formula, so on a xavier-initialised model its scale is close, not equal
    ("signsym:variant=usf", "usf", "xavier", "xavier", False),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=["float32", "float64", "both"], default="both")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--lr", type=float, default=0.5)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the text report")
    args = ap.parse_args()
    from importlib.metadata import version

    say = (lambda *a, **k: None) if args.json else print
    say(f"BioTorch {version('biotorch')} ({bt.__file__}), torch {torch.__version__}")
    dtypes = ["float32", "float64"] if args.dtype == "both" else [args.dtype]
    failed = False
    results = [{"algo": spec, "biotorch_type": mode, "biotorch_init": bt_init, "model_init": model_init,
                "control": not equal, "errors": {m: {} for m in MODELS}, "sign_flips": {m: {} for m in MODELS}}
               for spec, mode, bt_init, model_init, equal in CASES]
    draws = {}
    for dname in dtypes:
        dtype = getattr(torch, dname)
        torch.set_default_dtype(dtype)  # BioTorch's brSF draws into torch.Tensor(size), of the default dtype
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        say(f"\n{dname}: max relative gradient error over every parameter and {args.steps} steps (tolerance {tol:g})")
        for model in MODELS:
            for entry, (spec, mode, bt_init, model_init, equal) in zip(results, CASES):
                err, flips = compare(model, spec, mode, bt_init, model_init, dtype, args.steps, args.lr)
                entry["errors"][model][dname], entry["sign_flips"][model][dname] = err, flips
                ok = (err <= tol) == equal
                failed |= not ok
                verdict = ("equal" if err <= tol else "differs") + (" (control)" if not equal else "")
                say(f"  {model:5s} {spec:36s} vs BioTorch {mode:4s} (init {bt_init:7s}) {err:9.2e}  "
                    f"{flips:4d} sign flips  {verdict}{'' if ok else '  UNEXPECTED'}")
        d = draws[dname] = draws_equal(dtype)
        failed |= d > tol
        say(f"  brSF/frSF magnitude draws from one seed, creditlab vs BioTorch: max relative difference {d:.2e}")
    torch.set_default_dtype(torch.float32)

    # BioTorch's brSF with its non-xavier init refers to an unimported name
    layer = bt.Linear(4, 3, True, {"type": "brsf", "options": {"init": "kaiming"}})
    try:
        layer(torch.randn(2, 4))
        kaiming = "ran"
        say("\nBioTorch brsf with init=kaiming ran")
    except NameError as exc:
        kaiming = f"fails in forward: NameError: {exc}"
        say(f"\nBioTorch brsf with init=kaiming {kaiming}")
    if args.json:
        print(json.dumps({"biotorch": version("biotorch"), "torch": torch.__version__, "steps": args.steps,
                          "lr": args.lr, "results": results, "draws": draws, "brsf_kaiming": kaiming}, indent=2))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
