"""Random hyper-parameter search over Bartunov et al. (2018)'s Table 4 space, selecting on the
validation split only.

Table 4 (appendix): learning rate in [1e-5, 3e-4] (we draw it log-uniformly: the paper does not
say how), beta1 fixed at 0.9, beta2 in {0.99, 0.999}, epsilon in {1e-4, 1e-6, 1e-8}, the DTP
penultimate step alpha in [0.01, 0.2] and the inverse-training noise sigma in [0.01, 0.3]
(uniform); the forward and the inverse Adam are drawn independently from the same space. The
paper ran 60 configurations per experiment and reports the best *test* error within 500
epochs; here every trial is a full :func:`creditlab.train.train` run, trials are ranked by their
best validation accuracy (or lowest validation loss for ``task: autoencode``) and the winner's
test figure is read at the epoch its validation split selects. Test numbers never enter the
ranking.

Algorithm options are only set where the algorithm has them (``inv_*`` and ``sigma`` for the
target-propagation family, ``alpha`` for dtp); options fixed in the config's spec stay fixed.
"""

from __future__ import annotations

import copy
import json
import math
import random
from pathlib import Path
from typing import Any

from creditlab.algorithms import algorithm_class
from creditlab.errors import ConfigError, DivergenceError
from creditlab.spec import format_spec, parse_spec

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
OPTIMIZER_KEYS = ("lr", "beta1", "beta2", "eps")


def _draw(rng: random.Random, dist: tuple) -> Any:
    kind = dist[0]
    if kind == "loguniform":
        return math.exp(rng.uniform(math.log(dist[1]), math.log(dist[2])))
    if kind == "uniform":
        return rng.uniform(dist[1], dist[2])
    if kind == "choice":
        return rng.choice(list(dist[1]))
    raise ConfigError(f"search space: unknown distribution {dist!r}; use loguniform, uniform or choice")


def sample_trial(config: dict, rng: random.Random, space: dict[str, tuple] | None = None) -> tuple[dict, dict]:
    """One configuration drawn from ``space`` (default Table 4): (trial config, drawn values)."""
    space = TABLE4 if space is None else space
    name, opts = parse_spec(str(config.get("algo", "bp")))
    allowed = algorithm_class(name).defaults
    drawn: dict[str, Any] = {}
    cfg = copy.deepcopy(config)
    opt = dict(cfg.get("optimizer", {}))
    opt["name"] = "adam"
    for key in sorted(space):  # sorted: the draw order, hence the trials, depend on the seed only
        value = _draw(rng, space[key])
        if key in OPTIMIZER_KEYS:
            drawn[key] = value
        elif key in allowed and key not in opts:
            drawn[key] = value
    opt["lr"] = drawn.get("lr", opt.get("lr", 1e-3))
    opt["betas"] = [drawn.get("beta1", 0.9), drawn.get("beta2", 0.999)]
    opt["eps"] = drawn.get("eps", opt.get("eps", 1e-8))
    cfg["optimizer"] = opt
    algo_opts = dict(opts)
    algo_opts.update({k: v for k, v in drawn.items() if k not in OPTIMIZER_KEYS})
    cfg["algo"] = format_spec(name, algo_opts)
    return cfg, drawn


def _score(summary: dict) -> float:
    if "best_val_accuracy" in summary:
        return float(summary["best_val_accuracy"])
    if "best_val_loss" in summary:
        return -float(summary["best_val_loss"])
    raise ConfigError("search needs a validation split: set val_size > 0 in the config")


def run_search(config: dict, trials: int, out_dir: str | Path, seed: int = 0,
               space: dict[str, tuple] | None = None, progress: bool = False) -> dict:
    """Run ``trials`` random configurations of ``config`` (each a full training run under
    ``out_dir/trial-NNN``), rank them on the validation split, write ``out_dir/search.json``
    and return ``{"best": {...}, "trials": [...]}``. Diverged trials are recorded, not fatal."""
    from creditlab.train import train

    if trials < 1:
        raise ConfigError(f"search: trials={trials} must be >= 1 (the paper used 60)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records: list[dict] = []
    for t in range(trials):
        cfg, drawn = sample_trial(config, rng, space)
        cfg["name"] = f"{config.get('name', 'run')}-trial{t:03d}"
        run_dir = out / f"trial-{t:03d}"
        rec: dict[str, Any] = {"trial": t, "dir": str(run_dir), "algo": cfg["algo"], "params": drawn}
        try:
            summary = train(cfg, run_dir, progress=progress)
            rec["summary"] = summary
            rec["score"] = _score(summary)
        except DivergenceError as e:
            rec["diverged"] = str(e)
            rec["score"] = -math.inf
        records.append(rec)
        (out / "search.json").write_text(json.dumps({"trials": records}, indent=2, default=str))
    best = max(records, key=lambda r: r["score"])
    result = {"selected_on": "validation", "seed": seed, "best": best, "trials": records}
    if "summary" in best:
        s = best["summary"]
        result["best_test_at_selected_epoch"] = s.get("test_accuracy_at_best_val", s.get("test_loss_at_best_val"))
        result["best_test_over_training"] = s.get("best_test_accuracy_over_training")
    (out / "search.json").write_text(json.dumps(result, indent=2, default=str))
    return result


__all__ = ["TABLE4", "run_search", "sample_trial"]
