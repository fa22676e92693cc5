"""Write the committed GPU plans of experiments/plans/plans.yaml (run from the repository root).

Each plan is ``creditlab compare --config FILE --device cuda --plan experiments/plans/DIR``
(``one_algo``: the file's single ``algo:`` as its ``algos``, for the Bartunov rows, whose files
each hold one algorithm with its own hyper-parameters). A directory that already holds a plan
is replaced. ``--check`` writes nothing and exits 1 naming each plan that differs from what its
file gives now.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

from creditlab import config as config_mod
from creditlab.compare import plan

HERE = Path("experiments/plans")


def entries() -> list[dict]:
    return yaml.safe_load((HERE / "plans.yaml").read_text())["plans"]


def write(entry: dict, root: Path = Path(".")) -> None:
    """Plan ``entry`` into ``root / experiments/plans / DIR`` with paths relative to ``root``."""
    cfg = config_mod.load(entry["config"])
    if entry.get("one_algo"):
        cfg["algos"] = [cfg["algo"]]
    cfg["device"] = "cuda"
    target = root / HERE / entry["dir"]
    shutil.rmtree(target, ignore_errors=True)
    here = Path.cwd()
    try:
        os.chdir(root)
        plan(cfg, HERE / entry["dir"])
    finally:
        os.chdir(here)


def differing(entry: dict) -> list[str]:
    """The files of the committed plan ``entry`` that replanning changes, adds or removes."""
    with tempfile.TemporaryDirectory() as tmp:
        write(entry, Path(tmp))
        new, old = Path(tmp) / HERE / entry["dir"], HERE / entry["dir"]
        names = {p.relative_to(new) for p in new.rglob("*") if p.is_file()}
        names |= {p.relative_to(old) for p in old.rglob("*") if p.is_file()} if old.is_dir() else set()
        return sorted(str(n) for n in names
                      if not ((new / n).is_file() and (old / n).is_file() and filecmp.cmp(new / n, old / n, shallow=False)))


def main(argv: list[str]) -> int:
    if argv == ["--check"]:
        bad = [f"{e['dir']}: {', '.join(d[:3])}{' ...' if len(d) > 3 else ''}" for e in entries() if (d := differing(e))]
        for line in bad:
            print(f"plan differs from its experiment file: {line} (rerun python experiments/plans/make.py)",
                  file=sys.stderr)
        return 1 if bad else 0
    for e in entries():
        write(e)
        print(f"planned {HERE / e['dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
