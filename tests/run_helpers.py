"""Helpers of the tests that run ``creditlab`` as a user would, in a process of its own, and
interrupt it (SIGKILL, SIGINT, SIGTERM, a second writer)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable


def creditlab_process(args: list[str]) -> subprocess.Popen:
    """``python -m creditlab ARGS`` started, its output captured as text."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "creditlab", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_until(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 120) -> None:
    """Poll ``ready()`` while ``proc`` runs, for at most ``timeout`` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.01)


def metric_rows(run: Path) -> list[dict]:
    """A run's metrics.jsonl records without their wall-clock times (what reruns must reproduce)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("seconds", None)
    return rows


def logged_lines(run: Path) -> int:
    m = run / "metrics.jsonl"
    return len(m.read_text().splitlines()) if m.exists() else 0
