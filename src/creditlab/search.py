"""Hyper-parameter search as an Optuna study, selecting on the validation split only.

The default space is Bartunov et al. (2018)'s Table 4 (appendix): learning rate in
[1e-5, 3e-4] (we draw it log-uniformly: the paper does not say how), beta1 fixed at 0.9, beta2 in
{0.99, 0.999}, epsilon in {1e-4, 1e-6, 1e-8}, the DTP penultimate step alpha in [0.01, 0.2] and
the inverse-training noise sigma in [0.01, 0.3] (uniform); the forward and the inverse Adam are
drawn independently from the same space. The paper ran 60 configurations per experiment and
reports the best *test* error within 500 epochs; here every trial is a full
:func:`creditlab.train.train` run in ``out/trial-NNNNN`` (the Optuna trial number), trials are
ranked by their best validation accuracy (or minus the lowest validation loss for ``task:
autoencode``; the study maximises) and the winner's test figure is read at the epoch its
validation split selects. Test numbers never enter the ranking: they are stored as the trial's
user attributes only.

A config may declare its own space and sampler (``search:`` in the YAML)::

    search:
      sampler: random                 # random (default) | tpe
      space:                          # null: Table 4
        lr: [loguniform, 1.0e-5, 3.0e-4]
        sigma: [uniform, 0.01, 0.3]
        beta2: [choice, [0.99, 0.999]]

Names are optimizer keys (``lr``, ``beta1``, ``beta2``, ``eps``, ``momentum``, ``weight_decay``;
naming a beta or eps makes the optimizer Adam, as Table 4 does) or options of the config's
algorithm; any other name is an error. Without a declared space the search varies Table 4 as it
applies to the algorithm (:func:`table4_space`): the forward Adam always, and for the
target-propagation family (tp, dtp, sdtp, aosdtp) also the inverse Adam ``inv_*``, ``sigma`` and,
for dtp, ``alpha`` (for BP, FA, DFA, ... only the forward Adam, as the paper tuned BP).

**The space wins over the config.** Every key of the space is varied, and each trial replaces
the config's value of it, whether the value is in ``optimizer:`` or pinned in the algorithm spec
(``dtp:alpha=0.15,sigma=0.36``): a config is the point a search starts from (the
``experiments/bartunov-*.yaml`` files pin Table 5's *results*), not a constraint on it. Values of
keys outside the space (``schedule``, ``aux``, ...) stay as the config has them. To keep a key
fixed, declare a space without it. The search prints the keys it varies and the config values
the trials replace (unless quiet), and records them in ``search.json`` (``varied``, ``space``,
``space_source``, ``replaced_config_values``).

Engine: an Optuna study in an RDB storage (default ``sqlite:///<out>/search.db``), joined with
``load_if_exists`` by every worker, local (``workers``) or on other machines (same ``--storage``
URL and ``--study`` name). ``trials`` is the study's total of finished trials (COMPLETE, or
PRUNED = diverged), however many workers share it. Workers send a heartbeat; a trial whose worker
was killed is marked FAIL once its heartbeat is older than the grace period (2 x heartbeat) and
does not count: another trial replaces it. Such trials are listed in ``search.json`` under
``worker_died``; a search that still reaches its total says so in one line on stderr and
succeeds. A trial whose run raised is FAIL with the user attribute ``error`` (and its worker
fails); one started when the study was already complete, with ``surplus``. The study stores the
config it was created for; joining it with another names each differing dotted key. A storage
URL whose database driver is not installed fails at once, naming the package to install. The
random sampler draws each trial's values from (seed, trial number, parameter name) alone, so any
number of workers draw the same values for the same trial numbers; TPE depends on the order
trials finish in.
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import multiprocessing
import socket
import sys
import time
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import yaml
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution
from optuna.trial import FrozenTrial, TrialState

from creditlab import config as config_mod
from creditlab.errors import ConfigError, CreditlabError, DivergenceError
from creditlab.parallel import split_cores
from creditlab.search_space import (  # noqa: F401 (TABLE4 and the checks are part of the search interface)
    ADAM_KEYS, OPTIMIZER_KEYS, SAMPLERS, TABLE4, check_search, check_space, parse_distribution, replaced_values,
    search_space, table4_space,
)
from creditlab.spec import format_spec, parse_spec

DEFAULT_HEARTBEAT = 60  # seconds between a worker's heartbeats; a trial is stale after 2 x this
TEST_KEYS = ("test_accuracy_at_best_val", "best_test_accuracy_over_training", "test_loss_at_best_val",
             "test_accuracy", "test_loss")
_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def _suggest(trial: optuna.Trial, name: str, dist: tuple) -> Any:
    if dist[0] == "loguniform":
        return trial.suggest_float(name, dist[1], dist[2], log=True)
    if dist[0] == "uniform":
        return trial.suggest_float(name, dist[1], dist[2])
    if dist[0] == "choice":
        return trial.suggest_categorical(name, list(dist[1]))
    raise ConfigError(f"search space: unknown distribution {dist!r}; use loguniform, uniform or choice")


def trial_config(config: dict, trial: optuna.Trial, space: dict[str, tuple] | None = None) -> tuple[dict, dict]:
    """One configuration suggested by ``trial`` from ``space`` (default :func:`table4_space` of the
    config's algorithm): (trial config, suggested values). Every key of the space is suggested, in
    sorted order (the order the random sampler sees them in), and replaces the config's value of
    it, an option pinned in the algorithm spec included; a key that is neither an optimizer key
    nor an option of the algorithm is a ConfigError."""
    algo = str(config.get("algo", "bp"))
    space = table4_space(algo) if space is None else space
    check_space(space, algo)
    name, opts = parse_spec(algo)
    params: dict[str, Any] = {key: _suggest(trial, key, space[key]) for key in sorted(space)}
    cfg = copy.deepcopy(config)
    opt = dict(cfg.get("optimizer", {}))
    if any(k in space for k in ADAM_KEYS):
        opt["name"] = "adam"
    betas = list(opt.get("betas", [0.9, 0.999]))
    opt["betas"] = [params.get("beta1", betas[0]), params.get("beta2", betas[1])]
    opt.update({k: params[k] for k in ("lr", "eps", "momentum", "weight_decay") if k in params})
    cfg["optimizer"] = opt
    algo_opts = dict(opts)
    algo_opts.update({k: v for k, v in params.items() if k not in OPTIMIZER_KEYS})
    cfg["algo"] = format_spec(name, algo_opts)
    return cfg, params


def score(summary: dict) -> float:
    """What the study maximises: best validation accuracy, or minus the best validation loss."""
    if "best_val_accuracy" in summary:
        return float(summary["best_val_accuracy"])
    if "best_val_loss" in summary:
        return -float(summary["best_val_loss"])
    raise ConfigError("search needs a validation split: set val_size > 0 in the config")


class NumberSeededRandomSampler(optuna.samplers.BaseSampler):
    """Independent uniform (log-uniform for ``log=True``) draws whose values depend only on
    (seed, trial number, parameter name): the same trial numbers get the same values whichever
    worker runs them, and a rerun with the same seed repeats them."""

    def __init__(self, seed: int = 0):
        if seed < 0:
            raise ConfigError(f"search seed {seed} must be >= 0")
        self.seed = seed

    def infer_relative_search_space(self, study, trial) -> dict[str, BaseDistribution]:
        return {}

    def sample_relative(self, study, trial, search_space) -> dict[str, Any]:
        return {}

    def sample_independent(self, study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution) -> Any:
        rng = np.random.default_rng([self.seed, trial.number, zlib.crc32(param_name.encode())])
        d = param_distribution
        if isinstance(d, CategoricalDistribution):
            return d.choices[int(rng.integers(len(d.choices)))]
        if isinstance(d, FloatDistribution) and d.step is None:
            if d.log:
                value = math.exp(rng.uniform(math.log(d.low), math.log(d.high)))
            else:
                value = float(rng.uniform(d.low, d.high))
            return min(max(value, d.low), d.high)  # exp(log(x)) may round a last bit past the bound
        raise ConfigError(f"search: {param_name} has distribution {d!r}; the random sampler draws "
                          "uniform, loguniform and choice only")


def make_sampler(kind: str, seed: int, worker: int = 0) -> optuna.samplers.BaseSampler:
    """``random``: :class:`NumberSeededRandomSampler` (the same for every worker); ``tpe``:
    Optuna's TPE seeded with ``seed + worker`` (equal seeds would repeat its random start-up)."""
    if kind == "random":
        return NumberSeededRandomSampler(seed)
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed + worker)
    raise ConfigError(f"search sampler {kind!r}; valid: {', '.join(SAMPLERS)}")


# the Python module a SQLAlchemy dialect imports -> what to pip install (and another way, if any)
DRIVERS = {"psycopg": ("'psycopg[binary]'", "or write postgresql+psycopg2://... and pip install psycopg2-binary"),
           "psycopg2": ("psycopg2-binary", ""), "pg8000": ("pg8000", ""), "asyncpg": ("asyncpg", ""),
           "pymysql": ("PyMySQL", ""),
           "MySQLdb": ("mysqlclient", "or write mysql+pymysql://... and pip install PyMySQL"),
           "mysql": ("mysql-connector-python", ""), "mariadb": ("mariadb", ""), "oracledb": ("oracledb", ""),
           "cx_Oracle": ("cx_Oracle", ""), "pyodbc": ("pyodbc", ""), "pymssql": ("pymssql", "")}
URL_FORMS = "e.g. sqlite:///runs/s/search.db, postgresql://user:password@host/db or mysql+pymysql://user:password@host/db"


def check_storage_url(url: str) -> None:
    """Fail fast, before any connection, on a storage URL that is not one, names an unknown kind
    of database, or needs a database driver that is not installed (the error names the package)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    if "://" not in url:
        raise ConfigError(f"--storage {url!r} is not a database URL; {URL_FORMS}")
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(f"--storage {_redact(url)} is not a database URL; {URL_FORMS}") from None
    try:
        dialect = parsed.get_dialect()
    except NoSuchModuleError:
        raise ConfigError(f"--storage {_redact(url)}: unknown kind of database {parsed.drivername!r}; "
                          f"{URL_FORMS}") from None
    load = getattr(dialect, "import_dbapi", None) or getattr(dialect, "dbapi", None)
    if load is None:
        return
    try:
        load()
    except ImportError as e:
        module = getattr(e, "name", None) or str(e)
        package, other = DRIVERS.get(module, (module.split(".")[0], ""))
        raise ConfigError(f"--storage {_redact(url)} needs the database driver {module!r} "
                          f"(SQLAlchemy's for {parsed.drivername}://), which is not installed: pip install {package}"
                          f"{f' ({other})' if other else ''}") from None


def open_storage(url: str, heartbeat: int = DEFAULT_HEARTBEAT) -> optuna.storages.RDBStorage:
    """An Optuna RDB storage with worker heartbeats (grace period 2 x ``heartbeat`` seconds).
    SQLite waits up to 60 s for a lock held by another worker instead of failing at once. The URL
    and its driver are checked first (:func:`check_storage_url`)."""
    check_storage_url(url)
    if heartbeat < 1:
        raise ConfigError(f"--heartbeat {heartbeat}: must be >= 1 second")
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    import sqlalchemy.exc

    def connect() -> optuna.storages.RDBStorage:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=int(heartbeat),
                                              grace_period=2 * int(heartbeat))

    try:
        try:
            return connect()
        except sqlalchemy.exc.IntegrityError:
            # Workers started at the same moment on a fresh database race to create its tables and
            # stamp its schema version; the loser's insert of the version row fails. The schema now
            # exists: open it as it is (a second failure is a real one and is reported).
            return connect()
    except Exception as e:  # noqa: BLE001  (host unreachable, wrong password, ...: all the user's to fix)
        raise ConfigError(f"cannot open the search storage {_redact(url)}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001
        return url.split("://")[0] + "://..."


def _fingerprint(cfg: dict) -> str:
    """The config a study is for, without what may differ between machines."""
    return config_mod.dump({k: v for k, v in cfg.items() if k not in ("device", "threads", "data_dir")})


_ABSENT = object()


def _config_diff(theirs: Any, mine: Any, prefix: str = "") -> list[str]:
    """``key.sub: V (study) vs W (this config)`` for every dotted key whose values differ."""
    if isinstance(theirs, dict) and isinstance(mine, dict):
        out = []
        for key in sorted(set(theirs) | set(mine), key=str):
            out += _config_diff(theirs.get(key, _ABSENT), mine.get(key, _ABSENT), f"{prefix}{key}.")
        return out
    if theirs == mine:
        return []

    def show(v: Any) -> str:
        return "(absent)" if v is _ABSENT else json.dumps(v, default=str)

    return [f"{prefix.rstrip('.')}: {show(theirs)} (study) vs {show(mine)} (this config)"]


def open_study(cfg: dict, storage: optuna.storages.BaseStorage, name: str,
               sampler: optuna.samplers.BaseSampler) -> optuna.Study:
    """Create the study or join it. The creator stores its resolved config (device, threads and
    data_dir aside) in the study's user attribute ``config``; joining a study made for another
    config is an error naming each differing key with both values."""
    study = optuna.create_study(storage=storage, study_name=name, sampler=sampler, direction="maximize",
                                load_if_exists=True)
    mine = _fingerprint(cfg)
    theirs = study.user_attrs.get("config")
    if theirs is None:
        study.set_user_attr("config", mine)
    elif theirs != mine:
        try:
            diff = _config_diff(yaml.safe_load(theirs), yaml.safe_load(mine))
        except yaml.YAMLError:
            diff = ["(the study's stored config cannot be read)"]
        if diff:
            more = f"; and {len(diff) - 6} more" if len(diff) > 6 else ""
            raise ConfigError(f"study {name!r} in this storage was created for another config: "
                              f"{'; '.join(diff[:6])}{more}; use another --study name (or --out directory) "
                              "or the study's own config")
    return study


def _fail_stale(study: optuna.Study) -> None:
    """Mark FAIL the RUNNING trials whose worker is gone: Optuna's check for a heartbeat older
    than the grace period, plus the trials it skips, those with no heartbeat at all (a worker
    killed between creating the trial and its first heartbeat) started over a grace period ago;
    without this a study could wait for such a trial forever."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    for trial_id in _heartbeatless(study):
        try:
            study._storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:  # another worker got there first
            pass


def _heartbeatless(study: optuna.Study) -> list[int]:
    """Ids of RUNNING trials started more than the grace period ago that never sent a heartbeat
    (read from the RDB storage's heartbeat table; Optuna has no public call for it)."""
    storage = getattr(study._storage, "_backend", study._storage)  # a study wraps its RDB storage in a cache
    interval = getattr(storage, "heartbeat_interval", None)
    if not isinstance(storage, optuna.storages.RDBStorage) or interval is None:
        return []
    from optuna.storages._rdb import models
    from sqlalchemy.orm import Session

    grace = datetime.timedelta(seconds=storage.grace_period or 2 * interval)
    now = datetime.datetime.now()  # the clock Optuna stamps datetime_start with
    old = {t._trial_id for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
           if t.datetime_start is not None and now - t.datetime_start > grace}
    if not old:
        return []
    with Session(storage.engine) as session:
        beating = {tid for (tid,) in session.query(models.TrialHeartbeatModel.trial_id)
                   .filter(models.TrialHeartbeatModel.trial_id.in_(old))}
    return sorted(old - beating)


def _room(study: optuna.Study, trials: int, heartbeat: float, before: int | None = None) -> bool:
    """Whether another trial is needed: False once ``trials`` (numbered below ``before``) have
    finished; True while fewer are finished or running; while the running ones could still make
    up the total, wait for them (a killed worker's trial turns FAIL after the grace period)."""
    while True:
        live = study.get_trials(deepcopy=False, states=(*_FINISHED, TrialState.RUNNING))
        if before is not None:
            live = [t for t in live if t.number < before]
        if sum(t.state in _FINISHED for t in live) >= trials:
            return False
        if len(live) < trials:
            return True
        time.sleep(min(1.0, heartbeat))  # poll; a stale trial turns FAIL only after the grace period anyway
        _fail_stale(study)


class _Surplus(Exception):
    """A trial started after the study already had its total (a race between workers)."""


def search_worker(cfg: dict, trials: int, out: str | Path, storage_url: str, study_name: str, sampler: str,
                  seed: int, space: dict[str, tuple], worker: int = 0, heartbeat: int = DEFAULT_HEARTBEAT,
                  progress: bool = False, verbose: bool = True) -> None:
    """One worker: runs the study's trials until it holds ``trials`` finished ones."""
    from creditlab.build import build_data
    from creditlab.train import train

    optuna.logging.set_verbosity(optuna.logging.INFO if verbose else optuna.logging.WARNING)
    out = Path(out)
    study = open_study(cfg, open_storage(storage_url, heartbeat), study_name, make_sampler(sampler, seed, worker))
    if not _room(study, trials, heartbeat):
        return
    data = build_data(cfg)
    if len(data.x_val) == 0:
        raise ConfigError("search needs a validation split: set val_size > 0 in the config")
    host = socket.gethostname()

    def objective(trial: optuna.Trial) -> float:
        if not _room(study, trials, heartbeat, before=trial.number):
            trial.set_user_attr("surplus", True)
            raise _Surplus(f"trial {trial.number} not needed: the study already has {trials} finished trials")
        run_cfg, params = trial_config(cfg, trial, space)
        run_cfg["name"] = f"{cfg['name']}-trial{trial.number:05d}"
        run_dir = out / f"trial-{trial.number:05d}"
        trial.set_user_attr("dir", str(run_dir))
        trial.set_user_attr("host", host)
        trial.set_user_attr("algo", run_cfg["algo"])
        try:
            summary = train(run_cfg, run_dir, progress=progress, data=data)
        except DivergenceError as e:  # a result ("this point diverges"), not a crash: PRUNED, counted
            trial.set_user_attr("diverged", str(e))
            raise optuna.TrialPruned(f"diverged: {e}") from None
        except BaseException as e:  # a crash or Ctrl-C: FAIL, marked so that it is not taken for a dead worker
            try:
                trial.set_user_attr("error", f"{type(e).__name__}: {_first_line(e)}")
            except Exception:  # noqa: BLE001  (the storage itself may be what failed)
                pass
            raise
        trial.set_user_attr("summary", summary)
        for key in TEST_KEYS:
            if key in summary:
                trial.set_user_attr(key, summary[key])
        return score(summary)

    def stop_when_done(study: optuna.Study, _trial: FrozenTrial) -> None:
        if not _room(study, trials, heartbeat):
            study.stop()

    study.optimize(objective, n_trials=trials, callbacks=[stop_when_done], catch=(_Surplus,))


def _died(t: FrozenTrial) -> bool:
    """A FAIL trial that its worker did not end itself (no ``surplus``, no ``error``): the worker
    died and another marked the trial failed once its heartbeat stopped."""
    return t.state == TrialState.FAIL and "surplus" not in t.user_attrs and "error" not in t.user_attrs


def _record(t: FrozenTrial) -> dict:
    return {"trial": t.number, "state": t.state.name, "score": t.value, "params": t.params, **t.user_attrs}


def report(study: optuna.Study, trials: int) -> dict:
    """``search.json``'s content: every trial (state, params, score, test figures) and the best."""
    all_trials = study.get_trials(deepcopy=False)
    complete = [t for t in all_trials if t.state == TrialState.COMPLETE]
    best = _record(study.best_trial) if complete else None
    res: dict[str, Any] = {"selected_on": "validation", "study": study.study_name, "trials_requested": trials,
                           "finished": sum(t.state in _FINISHED for t in all_trials),
                           "diverged": sum("diverged" in t.user_attrs for t in all_trials),
                           "worker_died": [t.number for t in all_trials if _died(t)],
                           "best": best, "trials": [_record(t) for t in all_trials]}
    if best is not None and "summary" in best:
        s = best["summary"]
        res["best_test_at_selected_epoch"] = s.get("test_accuracy_at_best_val", s.get("test_loss_at_best_val"))
        res["best_test_over_training"] = s.get("best_test_accuracy_over_training")
    return res


def run_search(config: dict, trials: int, out_dir: str | Path, seed: int = 0, space: dict[str, tuple] | None = None,
               progress: bool = False, storage: str | None = None, study: str | None = None, workers: int = 1,
               sampler: str | None = None, heartbeat: int = DEFAULT_HEARTBEAT, verbose: bool | None = None) -> dict:
    """Run (or join) the study until it has ``trials`` finished trials of ``config``, with
    ``workers`` local worker processes; write ``out_dir/search.json`` and return its content.

    ``space`` overrides the config's ``search.space`` (default Table 4); ``sampler`` its
    ``search.sampler`` (default random); ``storage`` defaults to ``sqlite:///<out_dir>/search.db``
    and ``study`` to the config's name. Diverged trials are PRUNED and recorded, not fatal."""
    cfg = config_mod.resolve(config)
    if trials < 1:
        raise ConfigError(f"search: trials={trials} must be >= 1 (the paper used 60)")
    if storage is not None:
        check_storage_url(storage)  # before anything is created: a missing driver fails at once
    search = cfg["search"] or {}
    kind = sampler or search.get("sampler") or "random"
    make_sampler(kind, seed)  # validates kind and seed before anything starts
    if space is None:
        source = "Bartunov et al. Table 4" if search.get("space") is None else "the config's search.space"
        space = search_space(cfg)
    else:
        source = "the space given"
        space = {k: parse_distribution(k, v) for k, v in space.items()}
        check_space(space, cfg["algo"], "space")
    replaced = replaced_values(cfg, space)
    verbose = progress if verbose is None else verbose
    if verbose:
        print(f"creditlab: the search varies {', '.join(sorted(space))} ({source}); each trial replaces the "
              f"config's {', '.join(f'{k}={v}' for k, v in replaced.items()) or 'values of them'}",
              file=sys.stderr, flush=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    url = storage or f"sqlite:///{(out / 'search.db').resolve()}"
    name = study or cfg["name"]
    workers, threads = split_cores(workers, cfg["threads"], "--workers")
    if workers > 1 and cfg["threads"] is None:
        cfg["threads"] = threads
    the_study = open_study(cfg, open_storage(url, heartbeat), name, make_sampler(kind, seed))  # create it once
    failed_before = {t.number for t in the_study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
    args = dict(cfg=cfg, trials=trials, out=str(out), storage_url=url, study_name=name, sampler=kind, seed=seed,
                space=space, heartbeat=heartbeat, verbose=verbose)
    failed: list[str] = []
    killed: list[str] = []
    if workers == 1:
        search_worker(**args, progress=progress)
    else:
        ctx = multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=search_worker, kwargs=dict(args, worker=i, progress=False)) for i in range(workers)]
        for p in procs:
            p.start()
        for i, p in enumerate(procs):
            p.join()
            if p.exitcode is not None and p.exitcode < 0:  # killed by a signal: its trial is failed and replaced
                killed.append(f"worker {i} ({_signal_name(-p.exitcode)})")
            elif p.exitcode != 0:
                failed.append(f"worker {i} (exit code {p.exitcode})")
    res = report(the_study, trials)
    res.update(seed=seed, sampler=kind, storage=_redact(url), workers=workers, space_source=source,
               space={k: list(v) for k, v in sorted(space.items())}, varied=sorted(space),
               replaced_config_values=replaced)
    (out / "search.json").write_text(json.dumps(res, indent=2, default=str))
    try:  # report.html (creditlab.report); a failure there never loses search.json
        from creditlab.report import write_report
        write_report(out, kind="search", config=cfg)
    except Exception as e:  # noqa: BLE001
        print(f"creditlab: report.html not written: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    complete = res["finished"] >= trials
    if failed or (killed and not complete):
        raise CreditlabError(f"search: {', '.join(failed + killed)} failed; the study keeps every finished trial "
                             f"({res['finished']} of {trials}); run the same command again to complete it")
    died = [n for n in res["worker_died"] if n not in failed_before]
    if died and complete:
        which = (f"a worker died during trial {died[0]}; its trial was" if len(died) == 1 else
                 f"workers died during trials {', '.join(map(str, died))}; their trials were")
        print(f"creditlab: {which} marked failed and replaced ({res['finished']} of {trials} trials finished)",
              file=sys.stderr, flush=True)
    elif killed:
        print(f"creditlab: {', '.join(killed)} was killed between trials; the other workers finished the study "
              f"({res['finished']} of {trials} trials finished)", file=sys.stderr, flush=True)
    return res


def _signal_name(number: int) -> str:
    import signal

    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


__all__ = ["TABLE4", "NumberSeededRandomSampler", "check_search", "check_space", "check_storage_url", "make_sampler",
           "open_storage", "open_study", "parse_distribution", "replaced_values", "report", "run_search", "score",
           "search_space", "search_worker", "table4_space", "trial_config"]
