"""The run directory: one writer at a time, never overwritten by accident, and a resumed run
that is the run that was started.

* :class:`RunLock` takes an exclusive OS file lock (``flock``) on ``DIR/.creditlab.lock`` for
  as long as a run writes into ``DIR``; the kernel releases it when the process ends, even on
  kill -9, so a killed run never leaves a stale lock. A second writer is refused, naming the
  holder's pid.
* :func:`prepare` refuses an ``--out`` that already holds a run unless the caller resumes it
  or asked to overwrite it (then the old run is removed first, and only if every file in the
  directory is one creditlab writes: nothing of the user's is deleted).
* :func:`resume_differences` compares the configuration a checkpoint was trained with to the
  one given on ``--resume``: every key that changes what is computed must be equal; the one
  allowed change is a larger ``epochs``, given explicitly, which extends the run.
* :func:`save_checkpoint` writes atomically (a full disk leaves the previous checkpoint in
  place); :func:`load_checkpoint` refuses a damaged or foreign file by name.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from creditlab.errors import ConfigError, CreditlabError

CHECKPOINT = "checkpoint.pt"
LOCK = ".creditlab.lock"
#: files whose presence means a directory holds a (possibly unfinished) run or comparison
RUN_MARKERS = (CHECKPOINT, "metrics.jsonl", "summary.json", "diverged.json", "plan.json", "search.db")
#: every file name creditlab writes into a run, comparison, plan or search directory
_OURS = {CHECKPOINT, LOCK, "checkpoint.tmp", "config.yaml", "metrics.jsonl", "metrics.csv", "summary.json",
         "summary.md", "diverged.json", "plan.json", "commands.txt", "search.db", "search.json", "relax.json",
         "report.html"}
#: config keys that only label or place a run, never change what it computes
LABELS = ("name", "notes", "published", "data_dir", "threads", "seeds", "search", "distributed.timeout_s",
          "distributed.check_every", "logging")  # logging: where the numbers are written, never what they are
_CHECKPOINT_KEYS = ("model", "optimizer", "algorithm", "rng", "epoch", "step_in_epoch", "global_step", "history",
                    "angles", "metrics_lines", "partial", "signature")


class RunDirError(CreditlabError):
    """The run directory cannot be written (full disk, read-only, not a directory)."""


# ---- one writer ------------------------------------------------------------------------
class RunLock:
    """An exclusive lock on a run directory, held by this process until :meth:`release`
    (or its exit). ``fcntl.flock`` locks belong to the open file, so the kernel drops them
    with the process; where ``fcntl`` does not exist (Windows) the lock is a no-op."""

    def __init__(self, directory: Path):
        self.path = Path(directory) / LOCK
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return self
        with writing(self.path.parent):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ConfigError(f"{self.path.parent} is in use by another creditlab process (pid {holder}); "
                                  "wait for it to finish or choose another --out") from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


# ---- never overwritten -----------------------------------------------------------------
def holds_run(directory: Path) -> bool:
    """True if ``directory`` or a folder below it holds a run's files (see RUN_MARKERS)."""
    d = Path(directory)
    if not d.is_dir():
        return False
    return any(p.name in RUN_MARKERS for p in d.rglob("*"))  # one walk of the tree


def _foreign(directory: Path) -> list[Path]:
    """Files below ``directory`` that creditlab does not write."""
    return [p for p in sorted(Path(directory).rglob("*")) if p.is_file()
            and not (p.name in _OURS or p.suffix in (".png", ".tmp") or p.name.startswith("search.db")
                     or p.name.startswith("events.out.tfevents"))]


def check_out_dir(directory: Path) -> None:
    """``--out`` must be a directory (or not exist yet)."""
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise ConfigError(f"--out {d} is an existing file, not a run directory; choose a directory")


def refuse_existing(directory: Path, what: str = "run") -> None:
    """Refuse to start a new run in a directory that already holds one."""
    if holds_run(directory):
        raise ConfigError(f"{directory} already holds a {what}; continue it with --resume, replace it with "
                          "--overwrite (removes it first), or choose another --out")


def remove_run(directory: Path) -> None:
    """``--overwrite``: delete the run in ``directory`` (everything but the lock the caller
    holds), refusing if any file there is not one creditlab writes."""
    d = Path(directory)
    foreign = _foreign(d)
    if foreign:
        shown = ", ".join(str(p.relative_to(d)) for p in foreign[:3]) + (" ..." if len(foreign) > 3 else "")
        raise ConfigError(f"--overwrite: {d} holds files creditlab did not write ({shown}); nothing was removed. "
                          "Move them away or choose another --out")
    with writing(d):
        for p in d.iterdir():
            if p.name == LOCK:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()


def prepare(directory: Path, resume: bool, overwrite: bool, what: str = "run") -> None:
    """The checks before a run writes into ``directory`` (which the caller has locked)."""
    if resume and overwrite:
        raise ConfigError("--resume continues the run in --out and --overwrite replaces it: give one of them")
    if overwrite:
        remove_run(directory)
    elif not resume:
        refuse_existing(directory, what)


@contextlib.contextmanager
def writing(directory: Path) -> Iterator[None]:
    """Turn an OS error while writing into ``directory`` into one line naming the path (full
    disk, read-only). An error about a file elsewhere (a dataset file that cannot be read) is
    not the run directory's and passes through unchanged."""
    try:
        yield
    except OSError as e:
        if e.filename is not None and not _inside(Path(e.filename), Path(directory)):
            raise
        where = e.filename or directory
        raise RunDirError(f"cannot write {where}: {e.strerror or e}; the run directory keeps its last "
                          "checkpoint, if any (free space or choose another --out, then --resume)") from None


def _inside(path: Path, directory: Path) -> bool:
    try:
        path.resolve().relative_to(directory.resolve())
        return True
    except ValueError:
        return False


# ---- the resumed run is the run that was started ---------------------------------------
def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict) and (d or not prefix):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return float(a) == float(b)
    return a == b


def resume_differences(stored: dict, given: dict) -> list[tuple[str, Any, Any]]:
    """(key, stored value, given value) of every dotted key, other than ``epochs`` and the
    LABELS, whose value differs between the run's stored config and the given one."""
    a, b = _flat(stored), _flat(given)
    skip = lambda k: k == "epochs" or any(k == lab or k.startswith(lab + ".") for lab in LABELS)  # noqa: E731
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if not skip(k) and not _same(a.get(k), b.get(k))]


def check_resume(stored: dict, cfg: dict, extend: bool, where: Path) -> None:
    """Refuse a ``--resume`` whose config would compute something else than the run did
    (``stored``: the config the checkpoint was trained with)."""
    diffs = resume_differences(stored, cfg)
    old, new = stored.get("epochs"), cfg["epochs"]
    if diffs:
        listed = "; ".join(f"{k}: {v!r} (run) vs {w!r} (given)" for k, v, w in diffs)
        raise ConfigError(f"--resume: {where} was trained with another config: {listed}. A resumed run keeps its "
                          "config (train --resume --out DIR alone reads it from the run); for another config "
                          "start a new run in another --out")
    if new != old and not extend:
        raise ConfigError(f"--resume: {where} is a run of {old} epochs but the config says {new}; to extend the run "
                          f"to {new} epochs say so with --epochs {new}, else resume without changing epochs")
    if extend and new < old:
        raise ConfigError(f"--resume --epochs {new}: {where} is a run of {old} epochs; a run can only be extended "
                          "(give more epochs than it has)")


# ---- checkpoints ------------------------------------------------------------------------
def model_signature(model: nn.Module) -> list[list]:
    return [[k, list(v.shape)] for k, v in model.state_dict().items()]


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Atomic: the new checkpoint replaces the old one only once it is completely on disk."""
    tmp = path.with_suffix(".tmp")
    try:
        torch.save(payload, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise RunDirError(f"cannot write the checkpoint {path}: {e.strerror or e}; the previous checkpoint is "
                          "kept (free space or choose another --out, then --resume)") from None


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A creditlab checkpoint's contents, or a one-line refusal for anything else."""
    bad = ConfigError(f"{path} is not a creditlab checkpoint (or is damaged); delete it or start without --resume "
                      "(with --overwrite to replace the run)")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any unpickling failure means the same to the user
        raise bad from None
    if not isinstance(ck, dict) or any(k not in ck for k in _CHECKPOINT_KEYS):
        raise bad
    return ck


def check_signature(ck: dict[str, Any], path: Path, model: nn.Module) -> None:
    """Refuse a checkpoint whose tensors do not fit ``model``."""
    if ck["signature"] != model_signature(model):
        raise ConfigError(
            f"{path}: checkpoint is for a different architecture ({ck.get('model_spec', '?')}); "
            f"this config builds {getattr(model, 'spec', lambda: type(model).__name__)()}. "
            "Use another --out directory or the config the checkpoint was made with."
        )


def write_json(path: Path, obj: Any) -> None:
    with writing(path.parent):
        path.write_text(json.dumps(obj, indent=2))


__all__ = [
    "CHECKPOINT", "LOCK", "RunLock", "RunDirError", "holds_run", "check_out_dir", "refuse_existing", "remove_run",
    "prepare", "writing", "resume_differences", "check_resume", "model_signature", "save_checkpoint",
    "read_checkpoint", "check_signature", "write_json",
]
