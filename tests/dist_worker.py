"""One rank of the data-parallel tests (started by tests/test_distributed.py under
``torchrun --standalone --nproc_per_node 2``): trains every config of a JSON file with
:func:`creditlab.train.train`, one run directory per config name.

At exit it writes the names of the process's threads still alive to
``OUT/threads-at-exit-rank<RANK>.txt``, one a line (Linux: from ``/proc/self/task``). The hook
is registered before the process group exists, and :mod:`atexit` runs hooks last-registered
first, so it sees the process as the interpreter's shutdown will, after creditlab's own
exit-time cleanup."""

import atexit
import json
import os
import sys
from pathlib import Path

from creditlab.train import train

TASKS = Path("/proc/self/task")


def thread_names() -> list[str]:
    names = []
    for task in TASKS.iterdir():
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:  # the thread ended while we looked
            pass
    return sorted(names)


def main() -> None:
    configs = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    if TASKS.is_dir():
        record = out / f"threads-at-exit-rank{os.environ['RANK']}.txt"
        atexit.register(lambda: record.write_text("\n".join(thread_names()) + "\n"))
    for name, cfg in configs.items():
        train(cfg, out / name, progress=False)


if __name__ == "__main__":
    main()
