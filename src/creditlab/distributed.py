"""Data-parallel training on ``torch.distributed``: N processes that share a global batch of B
train as one process with batch B would.

The contract, for every algorithm:

* The loop draws the global batch once from the seeded stream (every rank draws the same
  indices) and rank r takes the contiguous slice :func:`shard_range` gives it. While an
  algorithm's step runs, the loop makes that :class:`Shard` current (:func:`use_shard`).
* A quantity averaged over the batch is divided by the **global** batch size,
  :func:`batch_total` (``Loss.reduce`` and every explicit ``/ n`` in an algorithm go through
  it), so each rank's ``.grad`` is its share of the global update and the loop's all-reduce
  SUM of the ``.grad`` tensors gives exactly the single-process update. A term that does not
  depend on the batch (GAIT-prop's orthogonality regularizer) is multiplied by
  :func:`constant_share` (1 on rank 0, 0 elsewhere), so it is counted once.
* Every per-sample random draw of an algorithm goes through :func:`noise_like`, which draws the
  noise of the whole global batch from the (identically seeded) global generator and returns
  this rank's rows: the noise of a sample is a function of its place in the global batch, not of
  the rank layout, and every rank's generator stays in step.
* Algorithm state fitted from batch statistics sums them across ranks before using them
  (:func:`all_reduce_`, e.g. the ridge sufficient statistics of ``np:fit=ridge``).

Outside a distributed run the shard is the whole batch, :func:`batch_total` is the local batch
size and :func:`noise_like` is ``torch.randn_like``: single-process numbers are unchanged.

:class:`Distributed` holds the process group of a ``torchrun`` launch (``gloo`` on CPU,
``nccl`` on CUDA) with its timeout, reduces gradients, sums metrics and compares a bit-level
checksum of parameters and state across ranks. The group it creates lives as long as the
process (one train run or several) and is destroyed once, before the interpreter shuts down
(:meth:`Distributed.close`, registered with :mod:`atexit`): a gloo group left alive at exit still
has worker threads that may be releasing the last collective's tensors, which needs the
interpreter, and one doing so while it finalizes aborts the process (``terminate called without
an active exception``, SIGABRT) after the run has finished.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from creditlab.errors import ConfigError, CreditlabError


@dataclass(frozen=True)
class Shard:
    """Rows ``offset : offset + size`` of a global batch of ``total`` samples, on ``rank`` of
    ``world`` processes."""

    offset: int
    size: int
    total: int
    rank: int = 0
    world: int = 1


_CURRENT: ContextVar[Shard | None] = ContextVar("creditlab_shard", default=None)


@contextlib.contextmanager
def use_shard(shard: Shard) -> Iterator[Shard]:
    """Make ``shard`` the current one while the block runs (the loop wraps each step in it)."""
    token = _CURRENT.set(shard)
    try:
        yield shard
    finally:
        _CURRENT.reset(token)


def shard_range(total: int, rank: int, world: int) -> tuple[int, int]:
    """(offset, size) of rank's contiguous slice of ``total`` samples: the first
    ``total % world`` ranks take one sample more."""
    base, extra = divmod(total, world)
    size = base + (1 if rank < extra else 0)
    return rank * base + min(rank, extra), size


def batch_total(n: int) -> int:
    """The batch size a batch mean divides by: the global batch's while a shard of ``n`` local
    samples is current, else ``n``."""
    s = _CURRENT.get()
    return s.total if s is not None and s.size == n else n


def constant_share() -> float:
    """Weight of a batch-independent term in this rank's update: 1 on rank 0 (and in a single
    process), 0 elsewhere, so the all-reduced sum counts it once."""
    s = _CURRENT.get()
    return 1.0 if s is None or s.rank == 0 else 0.0


def noise_like(h: Tensor) -> Tensor:
    """N(0, 1) noise of ``h``'s shape (batch first): this rank's rows of the noise drawn for the
    whole global batch from the global generator (``torch.randn_like(h)`` in a single process)."""
    s = _CURRENT.get()
    if s is None or s.world == 1 or s.size != h.shape[0]:
        return torch.randn_like(h)
    full = torch.randn((s.total, *h.shape[1:]), device=h.device, dtype=h.dtype)
    return full[s.offset:s.offset + s.size]


def all_reduce_(t: Tensor) -> Tensor:
    """Sum ``t`` over the ranks in place while a sharded step runs (identity otherwise)."""
    s = _CURRENT.get()
    if s is not None and s.world > 1:
        import torch.distributed as dist

        dist.all_reduce(t)
    return t


def in_launch() -> bool:
    """True inside a ``torchrun`` worker of a job with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _bits(t: Tensor) -> Tensor:
    """The tensor's raw bits as integers (a checksum sees every bit, not a rounded value)."""
    t = t.detach().contiguous()
    if t.is_floating_point():
        t = t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    return t.to(torch.int64)


def checksum(t: Tensor) -> Tensor:
    """Two int64 sums of ``t``'s bit patterns, plain and position-weighted (wrapping): equal
    tensors give equal checksums; a one-bit change anywhere changes the first."""
    b = _bits(t).reshape(-1)
    w = torch.arange(1, b.numel() + 1, device=b.device, dtype=torch.int64) % 65521 + 1
    return torch.stack([b.sum(), (b * w).sum()])


class Distributed:
    """The process group of a ``torchrun`` job: rank, world size, the device this rank uses,
    and the collectives the training loop needs."""

    def __init__(self, device: str, timeout_s: float):
        """Join the job torchrun started (its environment names rank, world size, local rank
        and the rendezvous) on this rank's device for the config's ``device``."""
        import torch.distributed as dist

        self.rank = int(os.environ["RANK"])
        self.world = int(os.environ["WORLD_SIZE"])
        self.device = self.device_for(device, int(os.environ.get("LOCAL_RANK", "0")))
        self.dist = dist
        self.owns_group = not dist.is_initialized()
        if self.owns_group:  # env:// rendezvous (torchrun sets MASTER_ADDR, MASTER_PORT, RANK, ...)
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
            atexit.register(self.close)

    def close(self) -> None:
        """Destroy the process group this object created (once; later calls do nothing). It
        runs at process exit, while the interpreter is whole: destroying the group joins its
        worker threads, so none is left to release a collective's tensors during interpreter
        shutdown. Every collective here is waited for and all ranks run the same ones, so a rank
        that got here has no exchange left with the others; a rank that stops on an error just
        closes its connections, and a peer still waiting on it fails at once instead of hanging.
        A group created by someone else is theirs to destroy."""
        if self.owns_group and self.dist.is_initialized():
            self.dist.destroy_process_group()
        self.owns_group = False

    @staticmethod
    def device_for(name: str, local_rank: int) -> torch.device:
        """The device of one rank: ``cuda`` / ``auto`` on a GPU machine give ``cuda:LOCAL_RANK``;
        an explicit ``cuda:N`` would put every rank on one GPU and is refused."""
        if name.startswith("cuda:"):
            raise ConfigError(f"device={name!r} with torchrun: every rank would use the same GPU; use "
                              "device: cuda (rank r of a node takes cuda:LOCAL_RANK)")
        if name in ("cuda", "auto") and torch.cuda.is_available():
            if local_rank >= torch.cuda.device_count():
                raise ConfigError(f"local rank {local_rank} but only {torch.cuda.device_count()} GPU(s) on this "
                                  "node; start at most that many processes per node (--nproc_per_node)")
            torch.cuda.set_device(local_rank)
            return torch.device("cuda", local_rank)
        from creditlab.devices import resolve_device

        return resolve_device(name)

    # ---- collectives --------------------------------------------------------------------
    def shard(self, total: int) -> Shard:
        if total < self.world:
            raise ConfigError(f"a batch of {total} samples cannot be split over {self.world} processes; "
                              "use batch_size >= the number of processes (and a training set whose last "
                              "batch is at least that large, or train_subset to trim it)")
        off, size = shard_range(total, self.rank, self.world)
        return Shard(off, size, total, self.rank, self.world)

    def sum_(self, tensors: Sequence[Tensor]) -> None:
        """All-reduce SUM in place, one flat buffer per dtype."""
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for group in by_dtype.values():
            flat = torch.cat([t.reshape(-1) for t in group])
            self.dist.all_reduce(flat)
            i = 0
            for t in group:
                t.copy_(flat[i:i + t.numel()].view_as(t))
                i += t.numel()

    def sum_floats(self, values: Sequence[float]) -> list[float]:
        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        self.dist.all_reduce(t)
        return [float(v) for v in t.tolist()]

    def sync_rng(self) -> None:
        """Give every rank rank 0's generator state (after rank-local draws such as dropout
        masks, which would otherwise leave the ranks' generators apart)."""
        state = torch.get_rng_state().to(self.device)
        self.dist.broadcast(state, 0)
        torch.set_rng_state(state.cpu())
        if self.device.type == "cuda":
            cs = torch.cuda.get_rng_state(self.device).to(self.device)
            self.dist.broadcast(cs, 0)
            torch.cuda.set_rng_state(cs.cpu(), self.device)

    def check_consistent(self, named: Sequence[tuple[str, Tensor]], step: int) -> None:
        """Compare a bit-level checksum of every tensor across ranks; on a difference stop with
        the first tensor that differs and the ranks that disagree with rank 0."""
        if not named:
            return
        local = torch.stack([checksum(t.to(self.device)) for _, t in named])
        gathered = [torch.empty_like(local) for _ in range(self.world)]
        self.dist.all_gather(gathered, local)
        ref = gathered[0]
        for i, (name, _) in enumerate(named):
            bad = [r for r in range(1, self.world) if not torch.equal(gathered[r][i], ref[i])]
            if bad:
                raise CreditlabError(
                    f"ranks out of step at step {step}: {name} differs between rank 0 and rank(s) "
                    f"{', '.join(map(str, bad))}. Data-parallel ranks must hold bit-identical parameters "
                    "and state; a rank-local random draw or a nondeterministic kernel is the usual cause "
                    "(see docs/scaling.md). The last good checkpoint is in the run directory.")


def stochastic_modules(model: nn.Module) -> list[str]:
    """Names of modules that draw random numbers of their own in training mode (their draws are
    per rank: dropout masks in a data-parallel run are statistically, not bitwise, equal)."""
    kinds = (nn.modules.dropout._DropoutNd, nn.RReLU)
    return [n for n, m in model.named_modules() if isinstance(m, kinds)]


__all__ = [
    "Shard", "use_shard", "shard_range", "batch_total", "constant_share", "noise_like",
    "all_reduce_", "in_launch", "checksum", "Distributed", "stochastic_modules",
]
