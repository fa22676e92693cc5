"""Device names as users write them (``cpu``, ``cuda``, ``cuda:N``, ``auto``) turned into torch
devices, never with a silent fallback."""

from __future__ import annotations

import torch

from creditlab.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name!r} is not a device name; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} requested but CUDA is not available on this machine; use device: cpu")
    return dev
