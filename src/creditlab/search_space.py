"""The space a ``creditlab search`` varies: Bartunov et al.'s Table 4 (the default, as it
applies to the config's algorithm) or the config's own ``search.space``, and its validation.

Kept apart from :mod:`creditlab.search` (the Optuna study) so that :mod:`creditlab.config`
can validate a ``search`` block without importing the search and the training loop."""

from __future__ import annotations

from typing import Any

from creditlab.algorithms import algorithm_class
from creditlab.algorithms._targetprop import TargetPropagation
from creditlab.errors import ConfigError
from creditlab.spec import parse_spec

# name -> ("loguniform", lo, hi) | ("uniform", lo, hi) | ("choice", [values])
TABLE4: dict[str, tuple] = {
    "lr": ("loguniform", 1e-5, 3e-4),
    "beta1": ("choice", [0.9]),
    "beta2": ("choice", [0.99, 0.999]),
    "eps": ("choice", [1e-4, 1e-6, 1e-8]),
    "inv_lr": ("loguniform", 1e-5, 3e-4),
    "inv_beta1": ("choice", [0.9]),
    "inv_beta2": ("choice", [0.99, 0.999]),
    "inv_eps": ("choice", [1e-4, 1e-6, 1e-8]),
    "alpha": ("uniform", 0.01, 0.2),
    "sigma": ("uniform", 0.01, 0.3),
}
OPTIMIZER_KEYS = ("lr", "beta1", "beta2", "eps", "momentum", "weight_decay")
ADAM_KEYS = ("beta1", "beta2", "eps")
SAMPLERS = ("random", "tpe")


def parse_distribution(name: str, raw: Any) -> tuple:
    """``[loguniform, LO, HI]``, ``[uniform, LO, HI]`` or ``[choice, [V, ...]]`` (lists or tuples)
    as the tuple form of :data:`TABLE4`; anything else is a ConfigError naming the entry."""
    where = f"search.space.{name}"
    forms = "write [loguniform, LO, HI], [uniform, LO, HI] or [choice, [V1, V2, ...]]"
    if not isinstance(raw, (list, tuple)) or not raw or raw[0] not in ("loguniform", "uniform", "choice"):
        raise ConfigError(f"{where} = {raw!r}: {forms}")
    kind = raw[0]
    if kind == "choice":
        if len(raw) != 2 or not isinstance(raw[1], (list, tuple)) or not raw[1]:
            raise ConfigError(f"{where} = {raw!r}: choice needs one non-empty list of values; {forms}")
        bad = [v for v in raw[1] if not (v is None or isinstance(v, (bool, int, float, str)))]
        if bad:
            raise ConfigError(f"{where}: choice values must be numbers, strings, booleans or null; got {bad!r}")
        return ("choice", list(raw[1]))
    numbers = len(raw) == 3 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw[1:])
    if not numbers:
        raise ConfigError(f"{where} = {raw!r}: {kind} needs two numbers LO < HI")
    lo, hi = float(raw[1]), float(raw[2])
    if not lo < hi or (kind == "loguniform" and lo <= 0):
        raise ConfigError(f"{where} = {raw!r}: needs LO < HI{' and LO > 0' if kind == 'loguniform' else ''}")
    return (kind, lo, hi)


def check_search(search: dict, algo: str) -> None:
    """Validate a config's ``search`` block against its algorithm (called by config.validate)."""
    if search["sampler"] not in SAMPLERS:
        raise ConfigError(f"search.sampler={search['sampler']!r}; valid: {', '.join(SAMPLERS)}")
    space = search["space"]
    if space is None:
        return
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"search.space = {space!r} must be a mapping name -> distribution (or null for Table 4)")
    for key, raw in space.items():
        parse_distribution(str(key), raw)
    check_space({str(k): v for k, v in space.items()}, algo)


def table4_space(algo: str) -> dict[str, tuple]:
    """Table 4 for ``algo``: the forward Adam (``lr``, ``beta1``, ``beta2``, ``eps``) always, and
    for the target-propagation family (tp, dtp, sdtp, aosdtp) its own options: the inverse Adam
    (``inv_*``), ``sigma`` and, for dtp, ``alpha``. Other algorithms get the optimizer keys only
    (np's ``sigma`` is its perturbation size, not Table 4's inverse-training noise)."""
    cls = algorithm_class(parse_spec(str(algo))[0])
    tp = issubclass(cls, TargetPropagation)
    return {k: v for k, v in TABLE4.items() if k in OPTIMIZER_KEYS or (tp and k in cls.defaults)}


def check_space(space: dict[str, tuple], algo: str, where: str = "search.space") -> None:
    """Every name of ``space`` must be an optimizer key or an option of ``algo``'s algorithm."""
    name, _ = parse_spec(str(algo))
    options = algorithm_class(name).defaults
    bad = [key for key in space if key not in OPTIMIZER_KEYS and key not in options]
    valid = f"valid: {', '.join([*OPTIMIZER_KEYS, *sorted(options)])}"
    if len(bad) == 1:
        raise ConfigError(f"{where}.{bad[0]}: neither an optimizer key nor an option of algorithm {name}; {valid}")
    if bad:
        raise ConfigError(f"{where}: {', '.join(bad)} are neither optimizer keys nor options of algorithm {name}; "
                          f"{valid}")


def search_space(cfg: dict) -> dict[str, tuple]:
    """The space the search varies, every key of it: the config's declared ``search.space`` as
    tuples, else :func:`table4_space` of its algorithm."""
    declared = (cfg.get("search") or {}).get("space")
    if declared is None:
        return table4_space(str(cfg.get("algo", "bp")))
    return {str(k): parse_distribution(str(k), v) for k, v in declared.items()}


def replaced_values(cfg: dict, space: dict[str, tuple]) -> dict[str, Any]:
    """The config's own values of the searched keys, which the trials replace: the optimizer's
    (``beta1``/``beta2`` are its ``betas``) and those the algorithm spec pins."""
    _, opts = parse_spec(str(cfg.get("algo", "bp")))
    opt = cfg.get("optimizer") or {}
    betas = list(opt.get("betas") or [None, None])
    mine = {"beta1": betas[0], "beta2": betas[1], **{k: opt[k] for k in OPTIMIZER_KEYS if k in opt}}
    out = {}
    for key in sorted(space):
        if key in opts:
            out[key] = opts[key]
        elif key in OPTIMIZER_KEYS and mine.get(key) is not None:
            out[key] = mine[key]
    return out
