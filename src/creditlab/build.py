"""Building a run's pieces from a resolved config: data, model, loss, algorithm, optimizer."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from creditlab.algorithms import Algorithm, algorithm_class, build_algorithm
from creditlab.data import Dataset, load_dataset
from creditlab.devices import resolve_device
from creditlab.errors import ConfigError
from creditlab.losses import Loss, build_loss
from creditlab.models import MLP, make_named_model, parse_arch
from creditlab.spec import parse_spec

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """PyTorch's default floating dtype set to ``dtype`` inside the block (restored after, on
    error too), so a model is created and initialised in its run's dtype: an orthogonal (or any)
    initialisation drawn in float32 and cast to float64 is only float32-exact (W W^T - I ~ 1e-7
    per entry instead of 1e-16)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def build_data(cfg: dict) -> Dataset:
    data = load_dataset(cfg["dataset"], cfg["data_dir"], cfg["val_size"])
    n = cfg["train_subset"]
    if n is not None:
        if n > len(data.x_train):
            raise ConfigError(f"train_subset={n} exceeds the {len(data.x_train)} training images of {cfg['dataset']}")
        data.x_train, data.y_train = data.x_train[:n], data.y_train[:n]
    return data


def output_size(cfg: dict, data: Dataset) -> int:
    return data.in_features if cfg["task"] == "autoencode" else data.num_classes


def mlp_for(algos: str | list[str] | None, sizes: list[int], act, out_act: str, bias: bool, init: str) -> nn.Module:
    """The model for a layer spec: the first of ``algos`` that builds its own
    (``model_from_arch``, e.g. GAIT-prop's invertible net), else a plain MLP. A comparison passes
    all its algorithms, so every run trains the same kind of model."""
    for algo in [algos] if isinstance(algos, str) else (algos or []):
        model = algorithm_class(parse_spec(algo)[0]).model_from_arch(sizes, act, out_act, bias, init)
        if model is not None:
            return model
    return MLP(sizes, act, out_act, bias, init)


def build_model(cfg: dict, data_shape: tuple[int, ...], num_out: int) -> nn.Module:
    """The config's model on its dtype and device; the layer spec, or a user factory's model
    (checked by :func:`creditlab.models.make_named_model`), must fit the data. The model is
    constructed under :func:`default_dtype` (the run's dtype), so its initialisation is drawn in
    that dtype, not drawn in float32 and cast."""
    dtype = DTYPES[cfg["dtype"]]
    with default_dtype(dtype):  # parameters created and initialised in the run's dtype
        model = _construct_model(cfg, data_shape, num_out)
    return model.to(device=resolve_device(cfg["device"]), dtype=dtype)


def _construct_model(cfg: dict, data_shape: tuple[int, ...], num_out: int) -> nn.Module:
    m = cfg["model"]
    what = "input features (task: autoencode)" if cfg["task"] == "autoencode" else "classes"
    if m["name"]:
        model = make_named_model(m["name"], tuple(data_shape), num_out, m["options"], outputs=what)
    else:
        sizes = parse_arch(m["arch"])
        n_in = 1
        for s in data_shape:
            n_in *= int(s)
        if sizes[0] != n_in:
            raise ConfigError(f"model.arch {m['arch']!r} starts with {sizes[0]} inputs but the data has {n_in} "
                              f"features per sample (shape {tuple(data_shape)})")
        if sizes[-1] != num_out:
            raise ConfigError(f"model.arch {m['arch']!r} ends with {sizes[-1]} outputs but the data has {num_out} {what}")
        model = mlp_for([cfg["algo"], *cfg["algos"]], sizes, m["act"], m["out_act"], m["bias"], m["init"])
    return model


def inherit_betas(groups: list[dict[str, Any]], betas: tuple[float, float] | list[float]) -> list[dict[str, Any]]:
    """An algorithm's group may set one Adam beta and leave the other None (e.g. ``dtp:inv_beta1=0.99``):
    the None entries take the optimizer's value."""
    for g in groups:
        if "betas" in g and any(b is None for b in g["betas"]):
            g["betas"] = tuple(float(d) if b is None else float(b) for b, d in zip(g["betas"], betas))
    return groups


class AdamWithPlainSGDGroups(torch.optim.Adam):
    """Adam, except that groups marked ``plain_sgd`` are stepped by p -= lr * grad (no moments,
    no weight decay): e.g. node perturbation's feedback weights with ``b_optimizer=sgd`` while the
    forward weights use Adam (Lansdell et al.'s CIFAR code)."""

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        groups = self.param_groups
        for g in groups:
            if g.get("plain_sgd"):
                for p in g["params"]:
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-g["lr"])
        self.param_groups = [g for g in groups if not g.get("plain_sgd")]
        try:
            return super().step(closure)
        finally:
            self.param_groups = groups


def build_optimizer(cfg: dict, model: nn.Module, algo: Algorithm) -> torch.optim.Optimizer:
    """The run's optimizer over the model's parameters and the algorithm's groups. A group may
    leave a beta None (the optimizer's value is used) or be marked ``plain_sgd`` (stepped by
    plain SGD at its lr, without momentum or weight decay, whatever the run's optimizer)."""
    o = cfg["optimizer"]
    groups: list[dict[str, Any]] = [{"params": [p for p in model.parameters() if p.requires_grad], "name": "model"}]
    groups += inherit_betas(algo.param_groups(o["lr"]), o["betas"])
    for g in groups:
        if g.get("plain_sgd"):
            g.update(momentum=0.0, weight_decay=0.0)
    if o["name"] == "sgd":
        return torch.optim.SGD(groups, lr=o["lr"], momentum=o["momentum"], weight_decay=o["weight_decay"])
    cls = AdamWithPlainSGDGroups if any(g.get("plain_sgd") for g in groups) else torch.optim.Adam
    return cls(groups, lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"], weight_decay=o["weight_decay"])


def build_all(cfg: dict, data: Dataset) -> tuple[nn.Module, Loss, Algorithm, torch.optim.Optimizer]:
    """Model, loss, algorithm, optimizer, drawn from the global RNG seeded with cfg['seed']."""
    torch.manual_seed(cfg["seed"])
    model = build_model(cfg, data.in_shape, output_size(cfg, data))
    loss = build_loss(cfg["loss"])
    algo = build_algorithm(cfg["algo"], model, loss)
    return model, loss, algo, build_optimizer(cfg, model, algo)
