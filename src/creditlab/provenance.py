"""Where a run's numbers come from: the code, the machine and the data, as the ``environment``
block of every run's ``summary.json`` (see :func:`environment`).

Nothing here may stop a run: each field that cannot be found is ``null``.
"""

from __future__ import annotations

import platform
import re
import socket
import subprocess
from pathlib import Path
from typing import Any

import torch


def _git(args: list[str], where: Path) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state(where: Path | None = None) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the git checkout the creditlab package is imported from, or
    (None, None) when it is not one (an installed wheel, no git): ``git rev-parse HEAD`` and
    whether ``git status`` shows changes to tracked files. A package merely lying below some
    other repository (a virtual environment inside a project) does not count: the package's
    own ``__init__.py`` must be tracked there."""
    pkg = where or Path(__file__).resolve().parent
    if _git(["ls-files", "--error-unmatch", "__init__.py"], pkg) is None:
        return None, None
    commit = _git(["rev-parse", "HEAD"], pkg)
    status = _git(["status", "--porcelain", "--untracked-files=no"], pkg)
    return commit, (None if status is None else bool(status))


def _gpu_name(device: torch.device) -> str | None:
    if device.type != "cuda":
        return None
    try:
        return torch.cuda.get_device_name(device)
    except Exception:  # noqa: BLE001 - provenance never fails a run
        return None


def cpu_model() -> str | None:
    """The CPU's model name (``/proc/cpuinfo``), or None where that file says nothing."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    return m.group(1).strip() if m else None


def environment(cfg: dict, device: torch.device | str | None = None, data: Any = None) -> dict[str, Any]:
    """The ``environment`` block of a run's ``summary.json``:

    * ``creditlab_version``; ``git_commit`` and ``git_dirty`` (tracked files changed) of the
      checkout the package runs from, null outside a git checkout (:func:`git_state`);
    * ``torch_version``, ``numpy_version``, ``python_version``, ``platform``, ``hostname``;
    * ``device`` (as resolved, e.g. ``cpu``, ``cuda:0``), ``gpu_name`` (null on the CPU),
      ``cuda_version`` (torch's CUDA build, null for a CPU build), ``threads`` (torch
      intra-op threads of this process), ``dtype``;
    * ``dataset`` (the config's spec), ``data_files`` (file name -> md5 of what was read, see
      :class:`creditlab.data.Dataset`; for the fake dataset ``{"generated": SPEC}``) and
      ``data_verified`` (true: every md5 matched the published or shipped one; false:
      computed on reading, none is published; null: generated data or unknown).

    A resumed run records the environment of the process that wrote its last epoch."""
    from creditlab import __version__

    def safe(fn, default=None):
        try:
            return fn()
        except Exception:  # noqa: BLE001 - provenance never fails a run
            return default

    import numpy

    commit, dirty = safe(git_state, (None, None))
    dev = torch.device(device) if device is not None else None
    return {
        "creditlab_version": __version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "torch_version": torch.__version__,
        "numpy_version": numpy.__version__,
        "python_version": platform.python_version(),
        "platform": safe(platform.platform),
        "hostname": safe(socket.gethostname),
        "device": str(dev) if dev is not None else cfg.get("device"),
        "gpu_name": _gpu_name(dev) if dev is not None else None,
        "cuda_version": getattr(torch.version, "cuda", None),
        "threads": safe(torch.get_num_threads),
        "dtype": cfg.get("dtype"),
        "dataset": cfg.get("dataset"),
        "data_files": dict(getattr(data, "provenance", None) or {}) or None,
        "data_verified": getattr(data, "provenance_verified", None),
    }
