"""``creditlab check``: one batch, the algorithm's updates against autograd's, per layer."""

from __future__ import annotations

from typing import Any

import torch

from creditlab.algorithms import build_algorithm
from creditlab.build import DTYPES, default_dtype, mlp_for
from creditlab.devices import resolve_device
from creditlab.diagnostics.angles import backprop_grads, current_updates, layer_angles, mean_angle
from creditlab.errors import ConfigError
from creditlab.losses import build_loss
from creditlab.models import build_named_model, parse_arch


def make_model(arch: str | None, model: str | None, act: str, out_act: str, bias: bool, init: str,
               in_shape: tuple[int, ...], classes: int, options: dict | None = None,
               algo: str | list[str] | None = None) -> torch.nn.Module:
    if (arch is None) == (model is None):
        raise ConfigError("give exactly one of --arch (a layer spec) or --model (a built-in model name)")
    if arch is not None:
        return mlp_for(algo, parse_arch(arch), act, out_act, bias, init)
    return build_named_model(model, in_shape, classes, **(options or {}))  # type: ignore[arg-type]


def run_check(algo: str, arch: str | None = None, model: str | None = None, act: str = "relu",
              out_act: str = "linear", bias: bool = True, init: str = "xavier", batch: int = 64,
              dtype: str = "float32", loss: str = "mse", seed: int = 0, device: str = "cpu",
              in_shape: tuple[int, ...] | None = None, classes: int = 10, dataset: str | None = None) -> dict[str, Any]:
    dev, dt = resolve_device(device), DTYPES.get(dtype)
    if dt is None:
        raise ConfigError(f"--dtype {dtype!r}; valid: float32, float64")
    torch.manual_seed(seed)
    if dataset:
        from creditlab.data import load_dataset

        data = load_dataset(dataset)
        in_shape, classes = data.in_shape, data.num_classes
        x, y = data.x_train[:batch], data.y_train[:batch]
    else:
        if in_shape is None:
            in_shape = (parse_arch(arch)[0],) if arch else (1, 28, 28)
        if arch:
            classes = parse_arch(arch)[-1]
        x = torch.rand((batch, *in_shape))
        y = torch.randint(0, classes, (batch,))
    with default_dtype(dt):  # initialised in the checked dtype, not drawn in float32 and cast
        net = make_model(arch, model, act, out_act, bias, init, tuple(in_shape), classes, algo=algo)
    net = net.to(device=dev, dtype=dt)
    x, y = x.to(device=dev, dtype=dt), y.to(dev)
    lossf = build_loss(loss)
    algorithm = build_algorithm(algo, net, lossf)
    rng = torch.get_rng_state()
    reference = backprop_grads(net, lossf, x, y)
    torch.set_rng_state(rng)  # the algorithm's forward draws the same dropout masks
    for p in net.parameters():
        p.grad = None
    algorithm.step(x, y)
    rows = layer_angles(net, algorithm.reported_updates() or current_updates(net), reference)
    return {"algo": algorithm.spec, "dtype": dtype, "batch": batch, "loss": lossf.spec(), "layers": rows,
            "mean_angle_deg": mean_angle(rows)}
