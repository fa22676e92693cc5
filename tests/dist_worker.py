"""One rank of the data-parallel tests (started by tests/test_distributed.py under
``torchrun --standalone --nproc_per_node 2``): trains every config of a JSON file with
:func:`creditlab.train.train`, one run directory per config name."""

import json
import sys
from pathlib import Path

from creditlab.train import train


def main() -> None:
    configs = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    for name, cfg in configs.items():
        train(cfg, out / name, progress=False)


if __name__ == "__main__":
    main()
