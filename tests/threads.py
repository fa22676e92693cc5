"""One torch thread for a block: the tests' nets are tiny, so intra-op threads only add overhead
and contend on a shared machine. The autouse fixture in conftest.py applies it to every test;
module-scoped fixtures, which are set up before it, use it themselves."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
