"""The one training loop, for every algorithm.

Per batch: ``optimizer.zero_grad(set_to_none=True)``; ``algo.step(x, y)`` writes the updates
into ``.grad``; every ``log_every`` steps the per-layer angle to a shadow autograd backprop on
the same batch (before the update) is logged; ``optimizer.step()``. Per epoch: accuracy on
the validation and test splits, metrics (with the epoch's ``lr``), the ``lr_schedule``'s step,
a checkpoint (atomic). The loop never branches on the algorithm.

A run directory holds ``config.yaml`` (resolved), ``metrics.jsonl`` (one JSON object per logged
step and per epoch), ``metrics.csv`` (the epoch rows), ``summary.json`` (see :func:`_summary`),
``checkpoint.pt``, PNG plots and, with ``logging: {tensorboard: true}``, TensorBoard event
files. The records go through :class:`creditlab.loggers.Logger` objects (metrics.jsonl always).
``resume=True`` continues from the checkpoint (saved at every epoch end and on Ctrl-C) and ends
with the same numbers as an uninterrupted run: batch order and augmentation are functions of
(seed, epoch, step), and the RNG state is checkpointed.
"""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from creditlab import config as config_mod
from creditlab.algorithms import Algorithm
from creditlab.build import DTYPES, build_all, build_data
from creditlab.devices import resolve_device
from creditlab.data import Dataset, augment_batch, batch_indices, epoch_generator, iterate
from creditlab.distributed import Distributed, Shard, in_launch, shard_range, stochastic_modules, use_shard
from creditlab.diagnostics.angles import (EXACT_DEG, backprop_grads, current_updates, differing_layers, layer_angles,
                                          layer_means, mean_angle, mean_over)
from creditlab.errors import CreditlabError, DivergenceError
from creditlab.interrupt import Interrupted, StopRequested, StopSignals, signal_name
from creditlab.losses import Loss
from creditlab.rng import global_rng_state, set_global_rng_state
from creditlab.loggers import LoggerGroup, check_loggers, open_loggers
from creditlab.metrics import MetricsWriter, NullWriter, angles_from, progress_bar, report_epoch, write_csv, write_plots
from creditlab.provenance import environment
from creditlab.rundir import (CHECKPOINT, RunLock, check_out_dir, check_resume, check_signature, holds_run,
                              model_signature, prepare, read_checkpoint, save_checkpoint, write_json, writing)
from creditlab.spec import format_spec, parse_spec

DIVERGED = "diverged.json"  # in the run directory when a run stopped on NaN/inf: {"message", "step", "where"}


def prepare_batch(cfg: dict, xb: Tensor, yb: Tensor, dtype: torch.dtype, device) -> tuple[Tensor, Tensor]:
    xb = xb.to(device=device, dtype=dtype)
    if cfg["task"] == "autoencode":
        return xb, xb.reshape(xb.shape[0], -1)
    return xb, yb.to(device)


@torch.no_grad()
def evaluate(model: nn.Module, loss: Loss, x: Tensor, y: Tensor, cfg: dict, batch: int = 1000,
             dd: Distributed | None = None) -> dict[str, float]:
    """Accuracy (classify) and mean per-sample loss over a split, in eval mode. In a
    data-parallel run each rank evaluates its slice and the sums are all-reduced."""
    was = model.training
    model.eval()
    dtype, device = DTYPES[cfg["dtype"]], next(model.parameters()).device
    if dd is not None:
        off, size = shard_range(len(x), dd.rank, dd.world)
        x, y = x[off:off + size], y[off:off + size]
    correct, total, loss_sum = 0, 0, 0.0
    for xb, yb in iterate(x, y, batch):
        xb, tb = prepare_batch(cfg, xb, yb, dtype, device)
        out = model(xb)
        loss_sum += float(loss.per_sample(out, tb).sum())
        if cfg["task"] == "classify":
            correct += int((out.argmax(1) == tb).sum())
        total += len(xb)
    model.train(was)
    if dd is not None:
        loss_sum, correct, total = dd.sum_floats([loss_sum, correct, total])
    res = {"loss": loss_sum / max(total, 1)}
    if cfg["task"] == "classify":
        res["accuracy"] = correct / max(total, 1)
    return res


def algorithm_parameters(algo: Algorithm) -> list[tuple[str, Tensor]]:
    """The algorithm's own trainable tensors (its optimizer groups), named for messages."""
    return [(f"{algo.name}.{g.get('name', 'state')}[{i}]", p)
            for g in algo.param_groups(1.0) for i, p in enumerate(g["params"])]


def checked_parameters(model: nn.Module, algo: Algorithm) -> list[tuple[str, Tensor]]:
    """Every parameter whose update :func:`check_finite` inspects, named for the message."""
    return list(model.named_parameters()) + algorithm_parameters(algo)


def check_finite(params: list[tuple[str, Tensor]], algo: Algorithm, loss: Tensor, step: int) -> None:
    """Stop with a message naming the step, the layer and the algorithm on NaN/inf."""
    named = [(n, p.grad) for n, p in params if p.grad is not None]
    flags = torch.stack([torch.isfinite(loss).all()] + [torch.isfinite(g).all() for _, g in named])
    if bool(flags.all()):
        return
    where = "loss" if not bool(flags[0]) else next(n for (n, _), ok in zip(named, flags[1:]) if not bool(ok))
    raise DivergenceError(
        f"divergence at step {step}: non-finite values in {where} (algorithm {algo.spec}); "
        f"hint: {algo.divergence_hint}. Metrics up to here are in the run directory.",
        step=step, where=where,
    )


def shadow_backprop(model: nn.Module, loss: Loss, x: Tensor, y: Tensor, rng_before: dict[str, Any]) -> dict[str, Tensor]:
    """Backprop's gradients on the batch the algorithm just used, with the RNG replayed to its
    state before the algorithm's step, so stochastic layers (dropout) draw the same masks as the
    algorithm's first forward pass; the RNG is then put back, so logging never changes training."""
    after = global_rng_state()
    set_global_rng_state(rng_before)
    try:
        return backprop_grads(model, loss, x, y)
    finally:
        set_global_rng_state(after)


def _summary(cfg: dict, spec: str, history: list[dict], angles: list[float], finished: bool,
             processes: int = 1, layer_log: list[dict] | None = None, env: dict | None = None) -> dict:
    """A run's ``summary.json``: ``algo``, ``dataset``, ``seed``, ``epochs`` (done),
    ``finished``, ``processes`` (data-parallel runs only); the last epoch's ``train_/val_/
    test_accuracy`` and ``_loss``; the validation-selected epoch (``best_val_accuracy``,
    ``best_val_epoch``, ``test_accuracy_at_best_val``; ``best_test_accuracy_over_training``;
    none of these with ``val_size: 0``, where there is no validation split to select by); and

    * ``seconds_per_epoch``: mean training time over every epoch (the first one's warm-up
      included; kept for older tables); ``epoch_seconds_median``: the median over epochs 2..N
      (None with one epoch); ``first_epoch_seconds``: epoch 1's time, apart;
    * ``mean_angle_deg``: angle to backprop averaged over the logged steps and every layer
      (the output layer included, 0 by construction for most algorithms);
      ``layer_angles_deg``: per layer, the mean over the logged steps; ``differing_layers``:
      the layers whose mean exceeds ``angle_tolerance_deg`` (:data:`EXACT_DEG`), where the
      algorithm's update differs from backprop's; ``mean_angle_differing_deg``: the mean of
      ``layer_angles_deg`` over them (over every layer when none differs);
    * ``environment``: the code, machine and data files (:func:`creditlab.provenance.environment`).
    """
    s: dict[str, Any] = {"algo": spec, "dataset": cfg["dataset"], "seed": cfg["seed"],
                         "epochs": len(history), "finished": finished}
    if processes > 1:
        s["processes"] = processes  # a data-parallel run
    if history:
        last = history[-1]
        s["seconds_per_epoch"] = sum(h["seconds"] for h in history) / len(history)
        later = sorted(h["seconds"] for h in history[1:])
        s["epoch_seconds_median"] = statistics.median(later) if later else None
        s["first_epoch_seconds"] = history[0]["seconds"]
        for key in ("train_accuracy", "val_accuracy", "test_accuracy", "train_loss", "val_loss", "test_loss"):
            if key in last:
                s[key] = last[key]
        if "val_accuracy" in last:
            best = max(history, key=lambda h: h["val_accuracy"])
            s["best_val_accuracy"] = best["val_accuracy"]
            s["best_val_epoch"] = best["epoch"]
            s["test_accuracy_at_best_val"] = best["test_accuracy"]
            s["best_test_accuracy_over_training"] = max(h["test_accuracy"] for h in history)
        elif "val_loss" in last:
            best = min(history, key=lambda h: h["val_loss"])
            s["best_val_loss"] = best["val_loss"]
            s["best_val_epoch"] = best["epoch"]
            s["test_loss_at_best_val"] = best["test_loss"]
    finite = [a for a in angles if not math.isnan(a)]
    s["mean_angle_deg"] = sum(finite) / len(finite) if finite else None
    means = layer_means(layer_log or [])
    s["layer_angles_deg"] = means
    s["differing_layers"] = differing_layers(means)
    s["mean_angle_differing_deg"] = mean_over(means, s["differing_layers"])
    s["angle_tolerance_deg"] = EXACT_DEG
    if env is not None:
        s["environment"] = env
    return s


def _stored_environment(out: Path) -> dict | None:
    """The ``environment`` of a run's existing summary.json (a finished run asked again)."""
    try:
        return json.loads((out / "summary.json").read_text()).get("environment")
    except (OSError, ValueError, AttributeError):
        return None


_DIST: Distributed | None = None


def distributed_context(cfg: dict) -> Distributed | None:
    """The process group of a ``torchrun`` launch (created once per process), else None."""
    global _DIST
    if not in_launch():
        return None
    if _DIST is None:
        _DIST = Distributed(cfg["device"], cfg["distributed"]["timeout_s"])
    return _DIST


def set_deterministic(on: bool) -> None:
    """``torch.use_deterministic_algorithms`` (CUDA also needs a fixed cuBLAS workspace and no
    cuDNN autotuning); an op without a deterministic kernel then raises instead of running."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(on)


def state_tensors(model: nn.Module, algo: Algorithm, optimizer: torch.optim.Optimizer) -> list[tuple[str, Tensor]]:
    """Every tensor a data-parallel rank must hold bit-identically: parameters, buffers, the
    algorithm's state and the optimizer's, named for the cross-rank check's message."""
    named = [(f"model.{n}", t) for n, t in model.state_dict().items() if isinstance(t, Tensor)]

    def walk(prefix: str, v: Any) -> None:
        if isinstance(v, Tensor):
            named.append((prefix, v))
        elif isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}.{k}", x)
        elif isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                walk(f"{prefix}[{i}]", x)

    walk(f"{algo.name}", algo.state_dict())
    walk("optimizer", optimizer.state_dict()["state"])
    return named + algorithm_parameters(algo)


def lr_scheduler(cfg: dict, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The run's ``lr_schedule`` over every group of ``optimizer`` (None: a constant lr);
    stepped once per epoch, so after epoch e (1-based) every group's lr is its initial one times
    gamma ** (the number of milestones <= e)."""
    s = cfg["lr_schedule"]
    if s is None:
        return None
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(s["milestones"]), gamma=float(s["gamma"]))


def _sum_updates(dd: Distributed, optimizer: torch.optim.Optimizer, reported: dict[str, Tensor] | None) -> None:
    """All-reduce every ``.grad`` (each rank holds its share of the global-batch update), and
    the reported updates that are not ``.grad`` tensors themselves."""
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    seen = {t.data_ptr() for t in grads}
    extra = [t for t in (reported or {}).values() if t.data_ptr() not in seen]
    dd.sum_(grads + extra)


def train(cfg: dict, out_dir: str | os.PathLike, resume: bool = False, progress: bool = True,
          data: Dataset | None = None, overwrite: bool = False, extend: bool = False) -> dict:
    """Train one (algorithm, seed) run as configured; returns the summary (also written to
    ``out_dir/summary.json``). Raises DivergenceError on NaN/inf, Interrupted on Ctrl-C or
    SIGTERM (the mid-epoch checkpoint saved).

    The run directory is locked while the run writes into it (a second writer is refused).
    A directory that already holds a run is refused unless ``resume`` (continue it: its stored
    config must equal ``cfg`` in everything that changes what is computed; ``extend=True``
    says ``cfg['epochs']`` was given explicitly and may exceed the run's, extending it; a
    finished run resumed without a change returns its summary) or ``overwrite`` (remove the
    old run first). See :mod:`creditlab.rundir`.

    Under ``torchrun`` with more than one process this is one rank of a data-parallel run
    (:mod:`creditlab.distributed`): every rank draws the same global batch and trains on its
    slice, updates are all-reduced, and rank 0 alone writes the run directory."""
    cfg = config_mod.resolve(cfg)
    out = Path(out_dir)
    check_out_dir(out)
    check_loggers(cfg)  # e.g. TensorBoard asked for and not installed: one line, before anything is written
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    set_deterministic(cfg["deterministic"])
    dd = distributed_context(cfg)
    rank0 = dd is None or dd.rank == 0
    world = 1 if dd is None else dd.world
    lock = RunLock(out)
    refused: CreditlabError | None = None
    ck: dict | None = None
    try:
        if rank0:
            with writing(out):
                out.mkdir(parents=True, exist_ok=True)
            lock.acquire()
            prepare(out, resume, overwrite)
        if resume:
            ck = _resumable(out, cfg, extend, world, rank0)
    except CreditlabError as e:
        refused = e
    if dd is not None and dd.sum_floats([float(refused is not None)])[0] and refused is None:
        refused = CreditlabError("the run was refused on another rank (rank 0 prints why)")  # no rank trains alone
    if refused is not None:
        lock.release()
        raise refused
    try:
        if ck is not None and _finished(ck, cfg):
            if rank0:
                print(f"creditlab: {out} is a finished run of {cfg['epochs']} epochs; nothing to train (to train "
                      f"it further: --resume --epochs N with N > {cfg['epochs']})", file=sys.stderr, flush=True)
            env = _stored_environment(out) or environment(cfg)  # the trained run's, if its summary is there
            spec = format_spec(*parse_spec(cfg["algo"]))  # the run's (its stored config equals cfg)
            summary = _summary(cfg, spec, ck["history"], ck["angles"], finished=True, processes=world,
                               layer_log=_layer_log(ck, out), env=env)
            if rank0 and not (out / "summary.json").exists():  # e.g. lost with a killed job's last write
                write_json(out / "summary.json", summary)
            return summary
        with writing(out):
            return _train(cfg, out, ck, progress, data, dd)
    finally:
        lock.release()


def _resumable(out: Path, cfg: dict, extend: bool, world: int, rank0: bool = True) -> dict:
    """The checkpoint to resume from, once the run's stored config and ``cfg`` agree."""
    ck_path = out / CHECKPOINT
    if not ck_path.exists():
        if holds_run(out):
            raise CreditlabError(f"--resume: {out} holds a run that stopped before its first checkpoint; start it "
                                 "again with --overwrite (without --resume)")
        raise CreditlabError(f"--resume: no checkpoint at {ck_path}; start the run without --resume")
    ck = read_checkpoint(ck_path)
    stored = yaml.safe_load(ck.get("config") or "") or {}
    check_resume(stored, cfg, extend, out)
    if ck.get("processes", 1) != world:
        raise CreditlabError(f"--resume: {out} was trained with {ck.get('processes', 1)} process(es), this is "
                             f"{world}; resume with --nproc {ck.get('processes', 1)} (the rounding of the batch "
                             "sums depends on it)")
    if rank0 and cfg["epochs"] > stored.get("epochs", cfg["epochs"]):
        print(f"creditlab: extending the run in {out} from {stored['epochs']} to {cfg['epochs']} epochs",
              file=sys.stderr, flush=True)
    return ck


def _layer_log(ck: dict, out: Path) -> list[dict]:
    """The per-layer angles of every logged step so far: the checkpoint's, or, from a
    checkpoint written before it kept them, the step rows of metrics.jsonl (truncated to it)."""
    if "layer_angles" in ck:
        return list(ck["layer_angles"])
    rows = angles_from(out / "metrics.jsonl")
    return [r["angles"] for r in rows[:len(ck.get("angles", []))]]


def _finished(ck: dict, cfg: dict) -> bool:
    """The checkpoint holds every epoch ``cfg`` asks for."""
    return ck["epoch"] >= cfg["epochs"] and ck["step_in_epoch"] == 0


def _train(cfg: dict, out: Path, ck: dict | None, progress: bool, data: Dataset | None,
           dd: Distributed | None) -> dict:
    """The training loop of :func:`train`, in a locked and checked run directory; ``ck`` is
    the checkpoint to continue from, if any."""
    rank0 = dd is None or dd.rank == 0
    world = 1 if dd is None else dd.world
    if rank0:
        (out / DIVERGED).unlink(missing_ok=True)
    device = dd.device if dd is not None else resolve_device(cfg["device"])
    dtype = DTYPES[cfg["dtype"]]
    data = data if data is not None else build_data(cfg)
    if data.x_train.device != device or data.x_train.dtype != dtype:
        data.to(device, dtype)  # once: batches, shuffles and augmentation then stay on the device
    model, loss, algo, optimizer = build_all(cfg, data)
    scheduler = lr_scheduler(cfg, optimizer)
    resync_rng = dd is not None and bool(stochastic_modules(model))
    check_every = cfg["distributed"]["check_every"] if dd is not None else 0
    ck_path = out / CHECKPOINT
    start_epoch, start_step, global_step, history, angles, keep = 0, 0, 0, [], [], None
    layer_log: list[dict] = []  # {layer: angle} per logged step (the summary's per-layer angles)
    partial: list = [0.0, 0.0, 0, 0]  # an interrupted epoch's time, loss sum, correct, seen
    if ck is not None:
        check_signature(ck, ck_path, model)
        model.load_state_dict(ck["model"])
        algo.load_state_dict(ck["algorithm"])
        optimizer.load_state_dict(ck["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(ck["lr_scheduler"])
        set_global_rng_state(ck["rng"])
        start_epoch, start_step, global_step = ck["epoch"], ck["step_in_epoch"], ck["global_step"]
        history, angles, keep, partial = ck["history"], ck["angles"], ck["metrics_lines"], ck["partial"]
        layer_log = _layer_log(ck, out) if rank0 or "layer_angles" in ck else []
    if rank0:
        (out / "config.yaml").write_text(config_mod.dump(cfg))
    env = environment(cfg, device, data) if rank0 else None
    metrics = MetricsWriter(out / "metrics.jsonl", keep) if rank0 else NullWriter()
    try:
        log = open_loggers(cfg, out, metrics, global_step if ck is not None else None) if rank0 else LoggerGroup([metrics])
    except BaseException:
        metrics.close()
        raise
    checked = checked_parameters(model, algo)
    augmenting = bool(cfg["augment"] and cfg["augment"]["crop_pad"] + (cfg["augment"]["flip"] != "none"))

    def checkpoint(epoch: int, step_in_epoch: int, partial: list) -> None:
        if not rank0:
            return
        save_checkpoint(ck_path, {
            "partial": partial,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "algorithm": algo.state_dict(),
            "lr_scheduler": None if scheduler is None else scheduler.state_dict(),
            "rng": global_rng_state(), "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step,
            "history": history, "angles": angles, "layer_angles": layer_log, "metrics_lines": metrics.lines,
            "signature": model_signature(model), "model_spec": str(getattr(model, "spec", lambda: "")()),
            "config": config_mod.dump(cfg), "processes": world,
        })

    def batch(epoch: int, i: int, idx: Tensor) -> tuple[Shard, Tensor, Tensor]:
        """This rank's slice of the global batch ``idx``, prepared (and augmented: the random
        crops and flips are drawn for the global batch, so a sample's do not depend on ranks)."""
        shard = dd.shard(len(idx)) if dd is not None else Shard(0, len(idx), len(idx))
        rows = slice(shard.offset, shard.offset + shard.size)
        sel = idx if augmenting else idx[rows]
        xb, yb = prepare_batch(cfg, data.x_train[sel], data.y_train[sel], dtype, device)
        if augmenting:
            gen = epoch_generator(cfg["seed"], epoch * 1_000_003 + i, salt=1, device=device)
            xb = augment_batch(xb, cfg["augment"]["crop_pad"], cfg["augment"]["flip"], gen)[rows]
            yb = yb[rows]
        return shard, xb, yb

    summary: dict = {}
    interrupted = False
    stop = StopSignals(deferred=dd is None)
    try:
        stop.install()
        log.log_config(cfg)
        for epoch in range(start_epoch, cfg["epochs"]):
            algo.on_epoch_start(epoch)
            model.train()
            batches = batch_indices(len(data.x_train), cfg["batch_size"], cfg["seed"], epoch, device=device)
            # an algorithm may run several passes per epoch (alternating target propagation: an
            # inverse pass, then a forward pass, so `epochs` counts forward epochs)
            batches = algo.epoch_batches(epoch, batches) if hasattr(algo, "epoch_batches") else batches
            first = start_step if epoch == start_epoch else 0
            t_epoch, loss_sum, correct, seen = partial if first else (0.0, 0.0, 0, 0)
            bar = progress_bar(range(first, len(batches)), progress and rank0, f"{algo.name} epoch {epoch + 1}/{cfg['epochs']}")
            step_in_epoch = first
            try:
                for i in bar:
                    shard, xb, yb = batch(epoch, i, batches[i])
                    log_now = cfg["log_every"] > 0 and global_step % cfg["log_every"] == 0
                    rng_before = global_rng_state() if log_now else None
                    t0 = time.perf_counter()
                    optimizer.zero_grad(set_to_none=True)
                    with use_shard(shard):
                        res = algo.step(xb, yb)
                        reported = algo.reported_updates() if log_now else None
                        if dd is not None:
                            _sum_updates(dd, optimizer, reported)
                        check_finite(checked, algo, res.loss, global_step)
                        diag: dict = {}
                        if log_now:
                            t_log = time.perf_counter()
                            diag = algo.diagnostics()  # of this step, before the optimizer applies it
                            bp = shadow_backprop(model, loss, xb, yb, rng_before)
                            if dd is not None:
                                dd.sum_(list(bp.values()))
                            rows = layer_angles(model, reported or current_updates(model), bp)
                            t0 += time.perf_counter() - t_log  # diagnostics are not training time
                    optimizer.step()
                    if resync_rng:
                        dd.sync_rng()  # type: ignore[union-attr]
                    t_epoch += time.perf_counter() - t0
                    global_step += 1
                    step_in_epoch = i + 1
                    if check_every and global_step % check_every == 0:
                        dd.check_consistent(state_tensors(model, algo, optimizer), global_step)  # type: ignore[union-attr]
                    loss_sum += float(res.loss) * (shard.total if loss.reduction == "mean" else 1)
                    seen += len(xb)
                    if cfg["task"] == "classify":
                        correct += int((res.output.argmax(1) == yb).sum())
                    if log_now:
                        m = mean_angle(rows)
                        angles.append(m)
                        layer_log.append({r["name"]: r["angle_deg"] for r in rows})
                        step_loss = float(res.loss) if dd is None else dd.sum_floats([float(res.loss)])[0]
                        log.log_step({"kind": "step", "epoch": epoch, "step": global_step - 1, "loss": step_loss,
                                       "angles": {r["name"]: r["angle_deg"] for r in rows}, "mean_angle_deg": m,
                                       **res.extras, **diag})
                    stop.check()  # at a step boundary: the checkpoint below is consistent
            except (KeyboardInterrupt, StopRequested) as e:
                interrupted = True
                signum = e.signum if isinstance(e, StopRequested) else signal.SIGINT
                what = f"{signal_name(signum)}: interrupted in epoch {epoch + 1}"
                if dd is not None:  # the ranks' partial sums are not gathered mid-epoch
                    raise Interrupted(f"{what}; a data-parallel run resumes from the last epoch's checkpoint in "
                                      f"{ck_path} with --resume", signum) from None
                checkpoint(epoch, step_in_epoch, [t_epoch, loss_sum, correct, seen])
                raise Interrupted(f"{what} after step {global_step}; checkpoint saved in {ck_path}; continue with "
                                  f"creditlab train --out {out} --resume", signum) from None
            for p in model.parameters():
                if not bool(torch.isfinite(p).all()):
                    raise DivergenceError(f"divergence in epoch {epoch + 1}: non-finite weights after the update "
                                          f"(algorithm {algo.spec}); hint: {algo.divergence_hint}", step=global_step)
            if dd is not None:
                loss_sum, correct, seen = dd.sum_floats([loss_sum, correct, seen])
                correct, seen = int(correct), int(seen)
            record: dict[str, Any] = {"kind": "epoch", "epoch": epoch + 1, "step": global_step, "seconds": t_epoch,
                                      "train_loss": loss_sum / max(seen, 1),  # mean per-sample loss
                                      "lr": optimizer.param_groups[0]["lr"]}  # the model's, this epoch
            if cfg["task"] == "classify":
                record["train_accuracy"] = correct / max(seen, 1)
            for split in ("val", "test"):
                x, y = data.split(split)
                if len(x):
                    for k, v in evaluate(model, loss, x, y, cfg, dd=dd).items():
                        record[f"{split}_{k}"] = v
            history.append(record)
            log.log_epoch(record)
            if scheduler is not None:
                scheduler.step()  # per epoch, on every rank alike: the next epoch's lr in every group
            checkpoint(epoch + 1, 0, [0.0, 0.0, 0, 0])
            summary = _summary(cfg, algo.spec, history, angles, finished=epoch + 1 == cfg["epochs"], processes=world,
                               layer_log=layer_log, env=env)
            if rank0:
                write_json(out / "summary.json", summary)
                if progress:
                    report_epoch(record)
    except DivergenceError as e:
        if rank0:
            (out / DIVERGED).write_text(json.dumps({"message": str(e), "step": e.step, "where": e.where}))
        raise
    finally:
        stop.restore()
        log.close()
        if history and not interrupted and rank0:
            write_csv(out / "metrics.csv", history)
            write_plots(out, history, angles_from(out / "metrics.jsonl"),
                        title=f"{algo.spec}, seed {cfg['seed']}, {cfg['dataset']}")
    if not summary:
        summary = _summary(cfg, algo.spec, history, angles, finished=True, processes=world, layer_log=layer_log, env=env)
        if rank0:
            write_json(out / "summary.json", summary)
    return summary


