"""Experiment configuration: YAML read into a dict, validated once at the edge, written back
fully resolved into every run directory.

Schema (every key, with its default; ``null`` = unset)::

    name: run                     # a label for the run
    dataset: mnist-mini           # mnist | fashion-mnist | cifar10 | mnist-mini | fake[:opts]
    data_dir: null                # folder with the dataset files (else $CREDITLAB_DATA, cache)
    val_size: null                # held-out tail of the training set (dataset default)
    train_subset: null            # train on the first N training images only (small budgets)
    task: classify                # classify | autoencode (target = the flattened input)
    augment: null                 # {crop_pad: 4, flip: vertical|horizontal|both|none}
    model:                        # an MLP from a layer spec ...
      arch: 784-300-300-100-10    #   sizes; the first must match the data, the last the classes
      act: relu                   #   hidden activation, or a list per hidden layer
      out_act: linear             #   output activation (softmax = logits + softmax in the loss)
      bias: true
      init: xavier                #   normal(STD) | xavier | xavier_normal | orthogonal | default
      name: null                  # ... or a built-in / user model (then arch/act are not used)
      options: {}                 #   keyword arguments of the named model's factory
    loss: cross_entropy           # mse | cross_entropy, with :reduction=sum|mean
    algo: bp                      # one algorithm spec (train)
    algos: [bp]                   # the algorithms of a comparison (compare)
    optimizer: {name: sgd, lr: 0.01, momentum: 0.0, betas: [0.9, 0.999], eps: 1.0e-8, weight_decay: 0.0}
    epochs: 10
    batch_size: 64
    seed: 0                       # model init, algorithm state, batch order, noise
    seeds: [0]                    # the seeds of a comparison
    dtype: float32                # float32 | float64
    device: cpu                   # cpu | cuda | cuda:N | auto (cuda if present); never a silent fallback
    deterministic: false          # torch.use_deterministic_algorithms (see docs/scaling.md)
    distributed:                  # data-parallel runs under torchrun (docs/scaling.md)
      check_every: 100            #   steps between cross-rank checksums of parameters and state (0: never)
      timeout_s: 600              #   collective timeout: a dead or stuck rank ends the job after this
    log_every: 100                # steps between logged losses/angles; 0 disables angles
    threads: null                 # torch intra-op threads (null: torch's default)
    search: null                  # creditlab search: {sampler: random|tpe, space: {NAME: DIST}};
                                  #   DIST = [loguniform, LO, HI] | [uniform, LO, HI] | [choice, [V, ...]];
                                  #   null (or space: null) = Bartunov et al.'s Table 4, random sampler
    published: {}                 # the paper's numbers, printed beside ours
    notes: ""
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from creditlab.errors import ConfigError

DEFAULTS: dict[str, Any] = {
    "name": "run",
    "dataset": "mnist-mini",
    "data_dir": None,
    "val_size": None,
    "train_subset": None,
    "task": "classify",
    "augment": None,
    "model": {"arch": "784-300-300-100-10", "act": "relu", "out_act": "linear", "bias": True,
              "init": "xavier", "name": None, "options": {}},
    "loss": "cross_entropy",
    "algo": "bp",
    "algos": ["bp"],
    "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.0, "betas": [0.9, 0.999], "eps": 1e-8,
                  "weight_decay": 0.0},
    "epochs": 10,
    "batch_size": 64,
    "seed": 0,
    "seeds": [0],
    "dtype": "float32",
    "device": "cpu",
    "deterministic": False,
    "distributed": {"check_every": 100, "timeout_s": 600},
    "log_every": 100,
    "threads": None,
    "search": None,
    "published": {},
    "notes": "",
}

_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,), "dataset": (str,), "data_dir": (str, type(None)), "val_size": (int, float, type(None)),
    "train_subset": (int, type(None)),
    "task": (str,), "augment": (dict, type(None)), "model": (dict,), "loss": (str, dict), "algo": (str,),
    "algos": (list,), "optimizer": (dict,), "epochs": (int,), "batch_size": (int,), "seed": (int,),
    "seeds": (list,), "dtype": (str,), "device": (str,), "deterministic": (bool,), "distributed": (dict,),
    "log_every": (int,), "threads": (int, type(None)), "search": (dict, type(None)), "published": (dict,), "notes": (str,),
}
_MODEL_TYPES = {"arch": (str, list, type(None)), "act": (str, list), "out_act": (str,), "bias": (bool,),
                "init": (str,), "name": (str, type(None)), "options": (dict,)}
_OPT_TYPES = {"name": (str,), "lr": (int, float), "momentum": (int, float), "betas": (list,),
              "eps": (int, float), "weight_decay": (int, float)}
_DIST_TYPES = {"check_every": (int,), "timeout_s": (int, float)}
_AUGMENT = {"crop_pad": 0, "flip": "none"}
_SEARCH = {"space": None, "sampler": "random"}


def _merge(base: dict, over: dict, where: str, types: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if key not in types:
            raise ConfigError(f"unknown config key {where}{key!r}; valid keys: {', '.join(types)}")
        if not isinstance(value, types[key]) or (isinstance(value, bool) and bool not in types[key]):
            names = " or ".join(t.__name__ for t in types[key])
            raise ConfigError(f"config key {where}{key} = {value!r} has type {type(value).__name__}; expected {names}")
        out[key] = value
    return out


def resolve(raw: dict | None = None, **overrides: Any) -> dict:
    """Defaults + ``raw`` + ``overrides`` (ignoring None overrides), validated."""
    raw = dict(raw or {})
    for k, v in overrides.items():
        if v is not None:
            raw[k] = v
    cfg = _merge(DEFAULTS, {k: v for k, v in raw.items() if k not in ("model", "optimizer")}, "", _TYPES)
    for key in ("model", "optimizer"):
        if key in raw and not isinstance(raw[key], dict):
            raise ConfigError(f"config key {key} must be a mapping, got {raw[key]!r}")
    cfg["model"] = _merge(DEFAULTS["model"], raw.get("model", {}), "model.", _MODEL_TYPES)
    cfg["optimizer"] = _merge(DEFAULTS["optimizer"], raw.get("optimizer", {}), "optimizer.", _OPT_TYPES)
    cfg["distributed"] = _merge(DEFAULTS["distributed"], cfg["distributed"], "distributed.", _DIST_TYPES)
    if cfg["augment"] is not None:
        cfg["augment"] = _merge(_AUGMENT, cfg["augment"], "augment.", {"crop_pad": (int,), "flip": (str,)})
    if cfg["search"] is not None:
        cfg["search"] = _merge(_SEARCH, cfg["search"], "search.", {"space": (dict, type(None)), "sampler": (str,)})
    validate(cfg)
    return cfg


def validate(cfg: dict) -> None:
    from creditlab.algorithms import validate_spec
    from creditlab.data import DATASETS
    from creditlab.losses import build_loss

    opt = cfg["optimizer"]
    if opt["name"] not in ("sgd", "adam"):
        raise ConfigError(f"optimizer.name={opt['name']!r}; valid: sgd, adam")
    if not opt["lr"] > 0:
        raise ConfigError(f"optimizer.lr={opt['lr']} must be positive")
    if len(opt["betas"]) != 2 or not all(0 <= b < 1 for b in opt["betas"]):
        raise ConfigError(f"optimizer.betas={opt['betas']} must be two numbers in [0, 1)")
    for key in ("epochs", "batch_size"):
        if cfg[key] <= 0:
            raise ConfigError(f"{key}={cfg[key]} must be positive")
    if cfg["train_subset"] is not None and cfg["train_subset"] <= 0:
        raise ConfigError(f"train_subset={cfg['train_subset']} must be a positive number of images (or null)")
    if cfg["log_every"] < 0:
        raise ConfigError(f"log_every={cfg['log_every']} must be >= 0 (0 disables angle logging)")
    if cfg["distributed"]["check_every"] < 0 or not cfg["distributed"]["timeout_s"] > 0:
        raise ConfigError(f"distributed={cfg['distributed']}: check_every must be >= 0 (0: never) and timeout_s > 0")
    if cfg["task"] not in ("classify", "autoencode"):
        raise ConfigError(f"task={cfg['task']!r}; valid: classify, autoencode")
    if cfg["dtype"] not in ("float32", "float64"):
        raise ConfigError(f"dtype={cfg['dtype']!r}; valid: float32, float64")
    if cfg["dataset"].split(":")[0] not in DATASETS:
        raise ConfigError(f"dataset={cfg['dataset']!r}; valid: {', '.join(DATASETS)}")
    if not cfg["seeds"] or not all(isinstance(s, int) for s in cfg["seeds"]):
        raise ConfigError(f"seeds={cfg['seeds']} must be a non-empty list of integers")
    if not cfg["algos"]:
        raise ConfigError("algos must name at least one algorithm")
    for spec in [cfg["algo"], *cfg["algos"]]:
        validate_spec(str(spec))
    build_loss(cfg["loss"])
    if cfg["model"]["name"] is None and cfg["model"]["arch"] is None:
        raise ConfigError("model needs either arch (a layer spec) or name (a built-in model)")
    if cfg["search"] is not None:
        from creditlab.search import check_search

        check_search(cfg["search"], cfg["algo"])


def load(path: str | Path, **overrides: Any) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} not found")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of config keys")
    try:
        return resolve(raw, **overrides)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None


def dump(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)
