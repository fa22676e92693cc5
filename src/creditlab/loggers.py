"""Where a run's numbers go while it trains: one small interface, :class:`Logger`, and its
implementations.

* :class:`creditlab.metrics.MetricsWriter`: ``metrics.jsonl`` in the run directory (always on;
  ``metrics.csv``, ``summary.json`` and the plots are written from it and the loop's history);
* :class:`TensorBoardLogger`: TensorBoard event files in the run directory
  (``logging: {tensorboard: true}`` or ``--tensorboard``; ``pip install -e ".[tensorboard]"``);
* your own: ``logging: {loggers: [package.module:factory]}``, where
  ``factory(cfg, out_dir, resume_step)`` returns an object with the four methods below (a
  class is such a factory; ``resume_step`` is None for a fresh run). A Weights &
  Biases or MLflow logger is one file; see docs/design.md, "Logging".

What each method receives (rank 0 of a run only; plain floats, NaN where undefined):

* ``log_config(cfg)``: the resolved config (a dict as in ``config.yaml``), once per process
  that trains the run (again after a resume);
* ``log_step(record)``: every ``log_every`` steps, the record written to ``metrics.jsonl``:
  ``{"kind": "step", "epoch", "step" (0-based global step), "loss", "angles": {layer: deg},
  "mean_angle_deg", ...}`` plus the algorithm's ``diagnostics()`` and step extras (feedback
  alignment ``feedback_angle_deg/<layer>``, ``feedback_norm_ratio/<layer>``,
  ``sign_congruence_pct/<layer>``, relaxation residuals, ...);
* ``log_epoch(record)``: at each epoch end, ``{"kind": "epoch", "epoch" (1-based), "step"
  (steps done), "seconds", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
  "test_loss", "test_accuracy"}`` (accuracies for classification only);
* ``close()``: at the end of the process's training, also after an error or an interrupt.

A resumed run continues from its checkpoint: a logger constructed with ``resume_step=G``
(see :func:`open_loggers`) should drop what it logged at steps >= G before the interruption.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

from creditlab.errors import ConfigError

TENSORBOARD_HINT = 'pip install -e ".[tensorboard]"'


@runtime_checkable
class Logger(Protocol):
    """What the training loop calls; see the module docstring for the records."""

    def log_config(self, cfg: dict) -> None: ...

    def log_step(self, record: dict) -> None: ...

    def log_epoch(self, record: dict) -> None: ...

    def close(self) -> None: ...


class LoggerGroup:
    """Several loggers behind one: each call goes to every logger in order; ``close`` closes
    all of them even if one fails (the first error is raised after)."""

    def __init__(self, loggers: list[Logger]):
        self.loggers = list(loggers)

    def log_config(self, cfg: dict) -> None:
        for lg in self.loggers:
            lg.log_config(cfg)

    def log_step(self, record: dict) -> None:
        for lg in self.loggers:
            lg.log_step(record)

    def log_epoch(self, record: dict) -> None:
        for lg in self.loggers:
            lg.log_epoch(record)

    def close(self) -> None:
        error: BaseException | None = None
        for lg in self.loggers:
            try:
                lg.close()
            except Exception as e:  # noqa: BLE001 - close the others first
                error = error or e
        if error is not None:
            raise error


# ---- TensorBoard --------------------------------------------------------------------------
def _summary_writer() -> type:
    """torch's SummaryWriter, or a one-line ConfigError naming the extra to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(f"logging.tensorboard: TensorBoard is not installed; install the extra: "
                          f"{TENSORBOARD_HINT}") from None
    return SummaryWriter


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def hparams_of(cfg: dict) -> dict[str, bool | int | float | str]:
    """The config as TensorBoard hyper-parameters: dotted keys, numbers and booleans as they
    are, everything else (lists, null, text) as its text."""
    out: dict[str, bool | int | float | str] = {}
    for k, v in _flat(cfg).items():
        out[k] = v if isinstance(v, (bool, int, float)) and not (isinstance(v, float) and math.isnan(v)) else str(v)
    return out


#: epoch-record keys -> TensorBoard tags (other numeric keys keep their own name)
_EPOCH_TAGS = {"seconds": "time/epoch_seconds", "epoch": "epoch"}
#: the metrics the HParams dashboard shows beside the hyper-parameters
_HPARAM_METRICS = ("accuracy/test", "accuracy/val", "loss/test", "loss/val")


def epoch_tag(key: str) -> str:
    """``test_accuracy`` -> ``accuracy/test``, ``train_loss`` -> ``loss/train``; ``seconds`` ->
    ``time/epoch_seconds``; any other key as it is."""
    if key in _EPOCH_TAGS:
        return _EPOCH_TAGS[key]
    split, _, metric = key.partition("_")
    if split in ("train", "val", "test") and metric:
        return f"{metric}/{split}"
    return key


class TensorBoardLogger:
    """TensorBoard event files (``events.out.tfevents.*``) in the run directory.

    The x axis of every scalar is the global step (0-based, as ``metrics.jsonl``'s step
    records): step records at their step, an epoch's scalars at the step of its last batch
    (``record["step"] - 1``). Tags:

    * per logged step: ``loss/step`` (the batch loss), ``angle_to_bp/<layer>`` and
      ``angle_to_bp/mean`` (degrees), and every other number in the record under its own key
      (the algorithm's diagnostics: ``feedback_angle_deg/<layer>``,
      ``feedback_norm_ratio/<layer>``, ``sign_congruence_pct/<layer>``, ...);
    * per epoch: ``loss/{train,val,test}``, ``accuracy/{train,val,test}``,
      ``time/epoch_seconds`` and ``epoch``;
    * the config: as hyper-parameters (the HParams dashboard, with the test and validation
      metrics) and as YAML text (``config``).

    On resume (``resume_step=G``) the new event file starts with TensorBoard's purge marker at
    G, so what the interrupted process logged at steps >= G is dropped by the reader."""

    def __init__(self, out: Path, resume_step: int | None = None):
        writer = _summary_writer()
        self.writer = writer(log_dir=str(out), purge_step=resume_step)

    def log_config(self, cfg: dict) -> None:
        from torch.utils.tensorboard.summary import hparams

        from creditlab import config as config_mod

        metrics = {m: None for m in _HPARAM_METRICS}
        exp, ssi, sei = hparams(hparams_of(cfg), metrics)
        fw = self.writer._get_file_writer()
        for s in (exp, ssi, sei):
            fw.add_summary(s)
        text = config_mod.dump(cfg)
        self.writer.add_text("config", "    " + text.replace("\n", "\n    "), 0)

    def log_step(self, record: dict) -> None:
        step = int(record["step"])
        add = self.writer.add_scalar
        if _number(record.get("loss")) is not None:
            add("loss/step", record["loss"], step)
        for layer, a in (record.get("angles") or {}).items():
            if _number(a) is not None:
                add(f"angle_to_bp/{layer}", a, step)
        if _number(record.get("mean_angle_deg")) is not None:
            add("angle_to_bp/mean", record["mean_angle_deg"], step)
        for k, v in record.items():
            if k not in ("kind", "epoch", "step", "loss", "angles", "mean_angle_deg") and _number(v) is not None:
                add(k, v, step)

    def log_epoch(self, record: dict) -> None:
        step = int(record["step"]) - 1
        for k, v in record.items():
            if k not in ("kind", "step") and _number(v) is not None:
                self.writer.add_scalar(epoch_tag(k), v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


# ---- building the loggers of a run --------------------------------------------------------
def load_logger_factory(name: str) -> Callable[[dict, Path, "int | None"], Logger]:
    """The factory named ``package.module:factory`` (``logging.loggers``); a one-line
    ConfigError saying why not."""
    mod, _, attr = name.partition(":")
    if not mod or not attr:
        raise ConfigError(f"logging.loggers: {name!r} is not package.module:factory (e.g. mylogging:WandbLogger)")
    try:
        module = importlib.import_module(mod)
    except ImportError as e:
        raise ConfigError(f"logging.loggers: {name!r}: cannot import {mod!r} ({e}); the folder that holds it "
                          "must be on PYTHONPATH") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"logging.loggers: {name!r}: module {mod!r} has no callable {attr!r}")
    return factory


def check_loggers(cfg: dict) -> None:
    """Refuse, before anything runs, a config that asks for a logger this machine lacks."""
    logging = cfg.get("logging") or {}
    if logging.get("tensorboard"):
        _summary_writer()
    for name in logging.get("loggers") or []:
        load_logger_factory(name)


def open_loggers(cfg: dict, out: Path, jsonl: Logger, resume_step: int | None = None) -> LoggerGroup:
    """The loggers of one run (rank 0): ``jsonl`` (the metrics.jsonl writer) first, then
    TensorBoard and the config's own loggers, as ``cfg['logging']`` asks."""
    logging = cfg.get("logging") or {}
    loggers: list[Logger] = [jsonl]
    try:
        if logging.get("tensorboard"):
            loggers.append(TensorBoardLogger(out, resume_step))
        for name in logging.get("loggers") or []:
            lg = load_logger_factory(name)(cfg, out, resume_step)
            missing = [m for m in ("log_config", "log_step", "log_epoch", "close") if not callable(getattr(lg, m, None))]
            if missing:
                raise ConfigError(f"logging.loggers: {name!r} returned {type(lg).__name__}, which lacks "
                                  f"{', '.join(missing)} (see creditlab.loggers.Logger)")
            loggers.append(lg)
    except BaseException:
        LoggerGroup(loggers[1:]).close()
        raise
    return LoggerGroup(loggers)


__all__ = ["Logger", "LoggerGroup", "TensorBoardLogger", "check_loggers", "open_loggers", "load_logger_factory",
           "hparams_of", "epoch_tag", "TENSORBOARD_HINT"]
