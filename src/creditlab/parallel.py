"""Local parallelism: how many processes to start and how many torch threads each gets, so that
processes x threads never exceeds the cores this process may use."""

from __future__ import annotations

import os

from creditlab.errors import ConfigError


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS reports it)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def split_cores(jobs: int, threads: int | None, flag: str = "--jobs") -> tuple[int, int]:
    """``(processes, threads per process)`` for ``jobs`` parallel processes.

    Threads per process: ``threads`` (the config's) if set, else ``max(1, cores // jobs)``. When
    ``jobs x threads`` would exceed the cores, the number of processes is clamped to
    ``max(1, cores // threads)`` and a note says so (oversubscribed cores only slow every
    process down; the results do not depend on how many run at once)."""
    if jobs < 1:
        raise ConfigError(f"{flag} {jobs}: must be >= 1 (1 runs everything in this process, one after another)")
    if threads is not None and threads < 1:
        raise ConfigError(f"threads={threads} must be >= 1 (or null for an even share of the cores)")
    cores = available_cores()
    per = threads if threads is not None else max(1, cores // jobs)
    fit = max(1, cores // per)
    if jobs > fit:
        print(f"creditlab: {flag} {jobs} x {per} thread(s) exceeds the {cores} core(s) here; "
              f"running {fit} process(es) at a time", flush=True)
        jobs = fit
    return jobs, per


__all__ = ["available_cores", "split_cores"]
