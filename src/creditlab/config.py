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
    lr_schedule: null             # null: constant lr; {name: multistep, milestones: [100, 150], gamma: 0.1}:
                                  #   every lr (each optimizer group's) *= gamma after epoch 100 and after 150
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
    logging: {tensorboard: false, loggers: []}  # TensorBoard event files in the run directory (--tensorboard;
                                  #   pip install -e ".[tensorboard]"); loggers: [package.module:factory] (creditlab/loggers.py)
    threads: null                 # torch intra-op threads (null: torch's default)
    search: null                  # creditlab search: {sampler: random|tpe, space: {NAME: DIST}};
                                  #   DIST = [loguniform, LO, HI] | [uniform, LO, HI] | [choice, [V, ...]];
                                  #   null (or space: null) = Bartunov et al.'s Table 4, random sampler
    published: {}                 # the published numbers: {kind: paper|authors-code|read-from-figure,
                                  #   source, protocol, values: {NAME: VALUE}, claim} (creditlab/published.py)
    notes: ""

Numbers follow YAML 1.2 (``1e-3``, ``5E-4``, ``.5``, ``+1e-3`` are floats; ``010`` is 10, ``0o10``
8, ``0x10`` 16), which PyYAML's YAML 1.1 reader would take for strings; ``true``/``false`` (and
PyYAML's ``yes``/``no``/``on``/``off``) are booleans.

Overrides: ``KEY=VALUE`` with a dotted key (``optimizer.lr=1e-3``, ``model.arch=784-100-10``,
``seeds=[0,1]``) sets one key inside the file's mapping, keeping its siblings; the value is read
as YAML (numbers, ``true``/``false``, ``null``, ``[..]``/``{..}``, quotes), anything else is the
text as typed (``algo=ar:steps=10,eta=0.1``). See :func:`parse_override` and :func:`resolve`.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

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
    "lr_schedule": None,
    "epochs": 10,
    "batch_size": 64,
    "seed": 0,
    "seeds": [0],
    "dtype": "float32",
    "device": "cpu",
    "deterministic": False,
    "distributed": {"check_every": 100, "timeout_s": 600},
    "log_every": 100,
    "logging": {"tensorboard": False, "loggers": []},
    "threads": None,
    "search": None,
    "published": {},
    "notes": "",
}

_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,), "dataset": (str,), "data_dir": (str, type(None)), "val_size": (int, float, type(None)),
    "train_subset": (int, type(None)),
    "task": (str,), "augment": (dict, type(None)), "model": (dict,), "loss": (str, dict), "algo": (str,),
    "algos": (list,), "optimizer": (dict,), "lr_schedule": (dict, type(None)), "epochs": (int,),
    "batch_size": (int,), "seed": (int,),
    "seeds": (list,), "dtype": (str,), "device": (str,), "deterministic": (bool,), "distributed": (dict,),
    "log_every": (int,), "logging": (dict,), "threads": (int, type(None)), "search": (dict, type(None)), "published": (dict,), "notes": (str,),
}
_MODEL_TYPES = {"arch": (str, list, type(None)), "act": (str, list), "out_act": (str,), "bias": (bool,),
                "init": (str,), "name": (str, type(None)), "options": (dict,)}
_OPT_TYPES = {"name": (str,), "lr": (int, float), "momentum": (int, float), "betas": (list,),
              "eps": (int, float), "weight_decay": (int, float)}
#: lr_schedule names -> their keys' defaults (None: required)
LR_SCHEDULES: dict[str, dict[str, Any]] = {"multistep": {"milestones": None, "gamma": 0.1}}
_LR_SCHEDULE_TYPES = {"name": (str,), "milestones": (list,), "gamma": (int, float)}
_DIST_TYPES = {"check_every": (int,), "timeout_s": (int, float)}
_LOGGING_TYPES = {"tensorboard": (bool,), "loggers": (list,)}
_AUGMENT = {"crop_pad": 0, "flip": "none"}
_AUGMENT_TYPES = {"crop_pad": (int,), "flip": (str,)}
_SEARCH = {"space": None, "sampler": "random"}
_SEARCH_TYPES = {"space": (dict, type(None)), "sampler": (str,)}

# ---- YAML: 1.2 numbers ------------------------------------------------------------------
_INT_TAG, _FLOAT_TAG = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"
#: YAML 1.2 core schema integers (plus 1.1's ``1_000`` digit grouping) and floats
_INT = re.compile(r"^(?:[-+]?[0-9]+(?:_[0-9]+)*|0o[0-7]+|0x[0-9a-fA-F]+)$")
_FLOAT = re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$")


class Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 numbers: ``1e-3`` is a float (a string under YAML
    1.1), ``010`` is ten (eight under 1.1); no implicit dates (a date is text)."""


Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag not in (_INT_TAG, _FLOAT_TAG, _TIMESTAMP_TAG)]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
Loader.add_implicit_resolver(_INT_TAG, _INT, list("-+0123456789"))  # before floats: "10" is an int
Loader.add_implicit_resolver(_FLOAT_TAG, _FLOAT, list("-+0123456789."))


def _construct_int(loader: yaml.SafeLoader, node: yaml.Node) -> int:
    text = loader.construct_scalar(node)
    if not isinstance(text, str) or not _INT.match(text):  # e.g. an explicit !!int 0b101: YAML 1.1's reading
        return yaml.SafeLoader.construct_yaml_int(loader, node)
    text = text.replace("_", "")
    if text.startswith(("0o", "0x")):
        return int(text[2:], 8 if text[1] == "o" else 16)
    return int(text, 10)


Loader.add_constructor(_INT_TAG, _construct_int)


class Dumper(yaml.SafeDumper):
    """Quotes every string that YAML 1.1 *or* :class:`Loader` would read as something else
    (``'1e-3'``, ``'yes'``, ``'010'``), so what :func:`dump` writes reads back the same with
    :func:`load` and with ``yaml.safe_load``."""


Dumper.yaml_implicit_resolvers = {ch: list(r) for ch, r in yaml.SafeDumper.yaml_implicit_resolvers.items()}
for _ch, _resolvers in Loader.yaml_implicit_resolvers.items():
    for _tag, _rx in _resolvers:
        if (_tag, _rx) not in Dumper.yaml_implicit_resolvers.get(_ch, []):
            Dumper.yaml_implicit_resolvers.setdefault(_ch, []).append((_tag, _rx))


# ---- overrides --------------------------------------------------------------------------
@dataclass(frozen=True)
class Override:
    """One value set from outside the file: ``key`` is a dotted path (``optimizer.lr``), and
    ``label`` says where it came from, for messages (``optimizer.lr=1e-3``, ``--epochs 3``)."""

    key: str
    value: Any
    label: str


_SCALAR_TAGS = ("tag:yaml.org,2002:null", "tag:yaml.org,2002:bool", _INT_TAG, _FLOAT_TAG)


def parse_value(text: str, label: str | None = None) -> Any:
    """A ``KEY=VALUE`` value: ``[..]``/``{..}`` and quoted text are read as YAML flow; plain text
    that YAML reads as null, a boolean or a number is that; anything else is the text itself
    (so ``ar:steps=10,eta=0.1`` and ``784-100-10`` stay strings)."""
    s = text.strip()
    if not s:
        return ""
    if s[0] in "[{'\"":
        try:
            return yaml.load(s, Loader=Loader)  # noqa: S506 (a safe loader)
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"{label or s}: {s} is not valid YAML ({problem}); e.g. seeds=[0,1] or "
                              f"model.options={{width: 100}}") from None
    for tag, rx in Loader.yaml_implicit_resolvers.get(s[0], []):
        if rx.match(s):
            return yaml.load(s, Loader=Loader) if tag in _SCALAR_TAGS else s  # noqa: S506
    return s


_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*(?:\.[A-Za-z0-9_][A-Za-z0-9_-]*)*$")


def parse_override(text: str) -> Override:
    """``KEY=VALUE`` (Hydra's habit; a leading ``+`` or ``++`` is accepted and ignored) into an
    :class:`Override` labelled with the text as typed."""
    key, eq, value = text.partition("=")
    key = key.strip().lstrip("+")
    if not eq or not key:
        if text.startswith("~"):
            raise ConfigError(f"{text}: removing a key is not supported; set it instead, e.g. {text[1:]}=null")
        raise ConfigError(f"{text!r} is not a KEY=VALUE override; e.g. optimizer.lr=1e-3, model.arch=784-100-10, "
                          f"epochs=3 (keys: {', '.join(DEFAULTS)})")
    if not _KEY.match(key):
        raise ConfigError(f"{text}: {key!r} is not a config key; a key is dotted names, e.g. optimizer.lr "
                          f"(keys: {', '.join(DEFAULTS)})")
    return Override(key, parse_value(value, text), text)


def _as_override(item: str | Override) -> Override:
    return item if isinstance(item, Override) else parse_override(item)


def _set(raw: dict, o: Override) -> None:
    path = o.key.split(".")
    d = raw
    for i, part in enumerate(path[:-1]):
        nxt = d.get(part)
        if nxt is None:
            nxt = d[part] = {}
        elif not isinstance(nxt, dict):
            raise _keyed(ConfigError(f"{'.'.join(path[:i + 1])} is {nxt!r}, not a mapping, so it has no key "
                                     f"{path[i + 1]!r}"), ".".join(path[:i + 1]))
        d = nxt
    d[path[-1]] = copy.deepcopy(o.value)


def _keyed(e: ConfigError, key: str) -> ConfigError:
    """Tag an error with the config key it is about (for :func:`resolve` to say where it came from)."""
    if getattr(e, "key", None) is None:
        e.key = key  # type: ignore[attr-defined]
    return e


def _covers(a: str, b: str) -> bool:
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


_IGNORED_BY_NAMED = ("arch", "act", "out_act", "bias", "init")


def _merge(base: dict, over: dict, where: str, types: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if key not in types:
            raise _keyed(ConfigError(f"unknown config key {where}{key!r}; valid keys: {', '.join(types)}"),
                         f"{where}{key}")
        if not isinstance(value, types[key]) or (isinstance(value, bool) and bool not in types[key]):
            names = " or ".join(t.__name__ for t in types[key])
            hint = "; a list is written [a, b]" if list in types[key] and isinstance(value, str) else ""
            raise _keyed(ConfigError(f"config key {where}{key} = {value!r} has type {type(value).__name__}; "
                                     f"expected {names}{hint}"), f"{where}{key}")
        out[key] = value
    return out


def resolve(raw: dict | None = None, dotted: Iterable[str | Override] | None = None, *,
            origin: str | None = None, **overrides: Any) -> dict:
    """Defaults + ``raw`` + ``overrides`` (top-level keys; None ones ignored) + ``dotted``
    (``KEY=VALUE`` strings or :class:`Override`\\ s, applied in order, each into the mapping
    its dotted key names), validated.

    An error names where the offending value came from: the override's label
    (``optimizer.lr=abc: ...``, ``--algo fq: ...``), else ``origin`` (the file ``raw`` was
    read from), else nothing. A key set twice to different values by ``dotted`` is refused."""
    raw = copy.deepcopy(dict(raw or {}))
    for k, v in overrides.items():
        if v is not None:
            raw[k] = v
    given = [_as_override(o) for o in dotted or ()]
    first: dict[str, Override] = {}
    for o in given:
        prev = first.setdefault(o.key, o)
        if prev.value != o.value or type(prev.value) is not type(o.value):
            raise ConfigError(f"{o.key} is given twice, by {prev.label} and by {o.label}; give it once")
    try:
        for o in given:
            try:
                _set(raw, o)
            except ConfigError as e:
                raise _keyed(e, o.key)
        cfg = _resolve(raw)
        named = cfg["model"]["name"]
        for o in given:
            part = o.key.split(".")
            if named is not None and part[0] == "model" and len(part) == 2 and part[1] in _IGNORED_BY_NAMED:
                raise _keyed(ConfigError(f"model.{part[1]} is not used by the named model {named!r} (model.name); "
                                         f"set model.name=null to build an MLP, or use --arch"), o.key)
    except ConfigError as e:
        key = getattr(e, "key", None)
        where = next((o.label for o in reversed(given) if key is not None and _covers(o.key, key)), None)
        where = where or (None if key is not None and key.split(".")[0] in overrides else origin)
        if where is None:
            raise
        located = ConfigError(f"{where}: {e}")
        located.key = key  # type: ignore[attr-defined]
        raise located from None
    return cfg


def _resolve(raw: dict) -> dict:
    cfg = _merge(DEFAULTS, {k: v for k, v in raw.items() if k not in ("model", "optimizer")}, "", _TYPES)
    for key in ("model", "optimizer"):
        if key in raw and not isinstance(raw[key], dict):
            raise _keyed(ConfigError(f"config key {key} must be a mapping, got {raw[key]!r}"), key)
    cfg["model"] = _merge(DEFAULTS["model"], raw.get("model", {}), "model.", _MODEL_TYPES)
    cfg["optimizer"] = _merge(DEFAULTS["optimizer"], raw.get("optimizer", {}), "optimizer.", _OPT_TYPES)
    cfg["distributed"] = _merge(DEFAULTS["distributed"], cfg["distributed"], "distributed.", _DIST_TYPES)
    cfg["logging"] = _merge(DEFAULTS["logging"], cfg["logging"], "logging.", _LOGGING_TYPES)
    if cfg["augment"] is not None:
        cfg["augment"] = _merge(_AUGMENT, cfg["augment"], "augment.", _AUGMENT_TYPES)
    if cfg["lr_schedule"] is not None:
        cfg["lr_schedule"] = _merge_lr_schedule(cfg["lr_schedule"])
    if cfg["search"] is not None:
        cfg["search"] = _merge(_SEARCH, cfg["search"], "search.", _SEARCH_TYPES)
    validate(cfg)
    return cfg


def _merge_lr_schedule(raw: dict) -> dict:
    """``lr_schedule`` with its name's defaults; a key the named schedule does not have is unknown."""
    name = raw.get("name")
    if not isinstance(name, str) or name not in LR_SCHEDULES:
        given = "lr_schedule has no name" if name is None else f"lr_schedule.name={name!r}"
        raise _keyed(ConfigError(f"{given}; valid: {', '.join(LR_SCHEDULES)} (e.g. lr_schedule: {{name: multistep, "
                                 "milestones: [100, 150], gamma: 0.1}, or lr_schedule.name=multistep "
                                 "lr_schedule.milestones=[100,150]), or lr_schedule: null for a constant lr"),
                     "lr_schedule" if name is None else "lr_schedule.name")
    types = {k: _LR_SCHEDULE_TYPES[k] for k in ("name", *LR_SCHEDULES[name])}
    return _merge({"name": name, **LR_SCHEDULES[name]}, raw, "lr_schedule.", types)


def _check_lr_schedule(s: dict) -> None:
    m = s["milestones"]
    _check(m is not None, "lr_schedule.milestones", "lr_schedule.milestones is required for multistep: the epochs "
                                                    "after which lr *= gamma, e.g. [100, 150]")
    _check(bool(m) and all(isinstance(e, int) and not isinstance(e, bool) and e > 0 for e in m)
           and all(a < b for a, b in zip(m, m[1:])), "lr_schedule.milestones",
           f"lr_schedule.milestones={m} must be positive epoch numbers in increasing order, e.g. [100, 150]")
    _check(0 < s["gamma"] < float("inf"), "lr_schedule.gamma",
           f"lr_schedule.gamma={s['gamma']} must be a positive number (lr *= gamma at each milestone)")


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise _keyed(ConfigError(message), key)


def validate(cfg: dict) -> None:
    from creditlab.algorithms import validate_spec
    from creditlab.data import DATASETS
    from creditlab.losses import build_loss

    opt = cfg["optimizer"]
    _check(opt["name"] in ("sgd", "adam"), "optimizer.name", f"optimizer.name={opt['name']!r}; valid: sgd, adam")
    _check(opt["lr"] > 0, "optimizer.lr", f"optimizer.lr={opt['lr']} must be positive")
    _check(len(opt["betas"]) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in opt["betas"]),
           "optimizer.betas", f"optimizer.betas={opt['betas']} must be two numbers in [0, 1)")
    if cfg["lr_schedule"] is not None:
        _check_lr_schedule(cfg["lr_schedule"])
    for key in ("epochs", "batch_size"):
        _check(cfg[key] > 0, key, f"{key}={cfg[key]} must be positive")
    _check(cfg["train_subset"] is None or cfg["train_subset"] > 0, "train_subset",
           f"train_subset={cfg['train_subset']} must be a positive number of images (or null)")
    _check(cfg["log_every"] >= 0, "log_every", f"log_every={cfg['log_every']} must be >= 0 (0 disables angle logging)")
    _check(cfg["distributed"]["check_every"] >= 0 and cfg["distributed"]["timeout_s"] > 0, "distributed",
           f"distributed={cfg['distributed']}: check_every must be >= 0 (0: never) and timeout_s > 0")
    _check(all(isinstance(n, str) and ":" in n for n in cfg["logging"]["loggers"]), "logging.loggers",
           f"logging.loggers={cfg['logging']['loggers']} must list package.module:factory names")
    _check(cfg["threads"] is None or cfg["threads"] >= 1, "threads",
           f"threads={cfg['threads']} must be >= 1 (torch threads per run) or null (torch's default)")
    _check(cfg["task"] in ("classify", "autoencode"), "task", f"task={cfg['task']!r}; valid: classify, autoencode")
    _check(cfg["dtype"] in ("float32", "float64"), "dtype", f"dtype={cfg['dtype']!r}; valid: float32, float64")
    _check(cfg["dataset"].split(":")[0] in DATASETS, "dataset",
           f"dataset={cfg['dataset']!r}; valid: {', '.join(DATASETS)}")
    seeds = cfg["seeds"]
    _check(bool(seeds) and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds), "seeds",
           f"seeds={seeds} must be a non-empty list of integers")
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    _check(not twice, "seeds", f"seeds={seeds} lists seed {', '.join(map(str, twice))} more than once; "
                               "give each seed once (each is one run)")
    _check(bool(cfg["algos"]), "algos", "algos must name at least one algorithm")
    for key, spec in [("algo", cfg["algo"]), *(("algos", a) for a in cfg["algos"])]:
        try:
            validate_spec(str(spec))
        except ConfigError as e:
            raise _keyed(e, key)
    try:
        build_loss(cfg["loss"])
    except ConfigError as e:
        raise _keyed(e, "loss")
    _check(cfg["model"]["name"] is not None or cfg["model"]["arch"] is not None, "model",
           "model needs either arch (a layer spec) or name (a built-in model)")
    if cfg["search"] is not None:
        from creditlab.search_space import check_search

        try:
            check_search(cfg["search"], cfg["algo"])
        except ConfigError as e:
            raise _keyed(e, "search")
    from creditlab.published import check_published

    try:
        check_published(cfg["published"])
    except ConfigError as e:
        raise _keyed(e, "published")


def read(path: str | Path) -> dict:
    """The mapping in a YAML config file, as written (not validated; YAML 1.2 numbers)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} not found" if not p.exists() else f"config file {p} is not a file")
    try:
        raw = yaml.load(p.read_text(), Loader=Loader) or {}  # noqa: S506 (a safe loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({' '.join(str(e).split())})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of config keys")
    return raw


def load(path: str | Path, dotted: Iterable[str | Override] | None = None, **overrides: Any) -> dict:
    """:func:`resolve` of the file's mapping; an error in a file value is prefixed with the
    file's path, one in an override with the override."""
    return resolve(read(path), dotted, origin=str(path), **overrides)


def dump(cfg: dict) -> str:
    return yaml.dump(cfg, Dumper=Dumper, sort_keys=False)
