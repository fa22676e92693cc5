"""Saving and restoring torch's random number generators, so a diagnostic or a check can draw
random numbers (or replay a step's draws) without changing what training draws next."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch


def rng_state(device: torch.device) -> Any:
    """The state of the generator that draws on ``device``."""
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def set_rng_state(device: torch.device, state: Any) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def global_rng_state() -> dict[str, Any]:
    """Every generator's state: the CPU one and, where CUDA exists, each GPU's."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_global_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def rng_preserved() -> Iterator[None]:
    """Run the block, then put every generator back where it was."""
    state = global_rng_state()
    try:
        yield
    finally:
        set_global_rng_state(state)
