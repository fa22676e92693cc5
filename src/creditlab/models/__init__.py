"""Models: MLPs from layer specs and a registry of named built-in models.

A named model is a factory ``f(in_shape, num_classes, **options) -> nn.Module`` registered
with :func:`register_model`. Modules in this package that define models are imported on
first use, so adding a model is one file.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Callable

from torch import nn

from creditlab.errors import ConfigError
from creditlab.models.activations import Activation, make_activation
from creditlab.models.mlp import MLP, Trace, parse_arch, require_mlp

ModelFactory = Callable[..., nn.Module]
_MODELS: dict[str, tuple[ModelFactory, str]] = {}
_DISCOVERED = False


def register_model(name: str, help: str = "") -> Callable[[ModelFactory], ModelFactory]:
    def deco(fn: ModelFactory) -> ModelFactory:
        _MODELS[name] = (fn, help or (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return deco


def _discover() -> None:
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def model_names() -> dict[str, str]:
    _discover()
    return {k: v[1] for k, v in sorted(_MODELS.items())}


def build_named_model(name: str, in_shape: tuple[int, ...], num_classes: int, **options: Any) -> nn.Module:
    """A built-in model by name, or a user's factory given as ``package.module:function``."""
    _discover()
    if name in _MODELS:
        return _MODELS[name][0](in_shape, num_classes, **options)
    if ":" in name:
        mod, _, fn = name.partition(":")
        try:
            factory = getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"cannot import model factory {name!r}: {e}") from None
        return factory(in_shape, num_classes, **options)
    raise ConfigError(f"unknown model {name!r}; built-in models: {', '.join(_MODELS) or 'none'} (or package.module:factory)")


__all__ = [
    "MLP", "Trace", "Activation", "make_activation", "parse_arch", "require_mlp",
    "register_model", "model_names", "build_named_model",
]
