"""Stopping a run cleanly: Ctrl-C (SIGINT) and SIGTERM (what SLURM and most schedulers send
before a kill) both save the mid-epoch checkpoint and say how to resume.

In a one-process run the signal takes effect at the end of the step under way, so the
checkpoint never holds a half-counted step (an update applied but not yet counted); a second
signal stops at once. In a data-parallel rank, where the ranks must stop at the same step,
the signal stops at once (the run resumes from its last epoch's checkpoint)."""

from __future__ import annotations

import signal
import threading
from typing import Any

from creditlab.errors import CreditlabError

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal's number, as shells report it


class Interrupted(CreditlabError):
    """Training stopped on Ctrl-C or SIGTERM; the checkpoint was saved; ``--resume`` continues."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = signum
        self.exit_code = EXIT_CODES.get(signum, 130)


class StopRequested(BaseException):
    """Raised where a stop signal lands (or at the next step boundary); not an ``Exception``,
    so no ``except Exception`` in between swallows it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class StopSignals:
    """Handlers for SIGINT and SIGTERM while a run trains. ``deferred=True`` (one process):
    the first signal sets :attr:`requested` and the loop stops at the end of the step; a second
    raises at once. ``deferred=False`` (a data-parallel rank): the first raises at once. Only the
    main thread can own signal handlers; elsewhere nothing is installed."""

    def __init__(self, deferred: bool = True):
        self.deferred = deferred
        self.enabled = threading.current_thread() is threading.main_thread()
        self.requested: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is not None or not self.deferred:
            raise StopRequested(self.requested or signum)
        self.requested = signum

    def check(self) -> None:
        """At a step boundary: stop here if a signal came during the step."""
        if self.requested is not None:
            raise StopRequested(self.requested)

    def install(self) -> None:
        if self.enabled:
            for s in EXIT_CODES:
                self._previous[s] = signal.signal(s, self._handle)

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}


def signal_name(signum: int) -> str:
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
