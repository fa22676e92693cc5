"""Models: MLPs from layer specs and a registry of named built-in models.

A named model is a factory ``f(in_shape, num_classes, **options) -> nn.Module`` registered
with :func:`register_model`. Modules in this package that define models are imported on
first use, so adding a model is one file.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import inspect
import os
import pkgutil
import sys
import traceback
from typing import Any, Callable

import torch
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


FACTORY_FORM = "def FACTORY(in_shape: tuple, num_classes: int, **options) -> torch.nn.Module"


def build_named_model(name: str, in_shape: tuple[int, ...], num_classes: int, **options: Any) -> nn.Module:
    """A built-in model by name, or a user's factory given as ``package.module:function``."""
    return make_named_model(name, in_shape, num_classes, options)


def make_named_model(name: str, in_shape: tuple[int, ...], num_out: int, options: dict[str, Any] | None = None,
                     outputs: str = "classes") -> nn.Module:
    """:func:`build_named_model` with ``outputs`` naming what the ``num_out`` outputs are, for the
    messages (``"classes"``; ``"input features (task: autoencode)"``).

    A user factory ``package.module:function`` is checked before and after the call, each check a
    one-line ConfigError: the module imports (a module in the current folder is found as
    ``python -m`` finds it), the function can be called as :data:`FACTORY_FORM` with the options,
    it returns an ``nn.Module``, and one forward pass of a zero batch (2, *in_shape) (eval mode,
    no_grad, the RNG state restored) gives (2, num_out) outputs."""
    options = dict(options or {})
    _discover()
    if name in _MODELS:
        return _MODELS[name][0](in_shape, num_out, **options)
    if ":" not in name:
        raise ConfigError(f"unknown model {name!r}; built-in models: {', '.join(sorted(_MODELS)) or 'none'} "
                          "(or a factory of your own as package.module:function)")
    factory = load_factory(name)
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):  # a builtin or C callable without a signature: call it and see
        sig = None
    if sig is not None:
        try:
            sig.bind(tuple(in_shape), num_out, **options)
        except TypeError as e:
            opts = f" with options {options}" if options else ""
            raise ConfigError(f"model factory {name!r} has the signature {sig} and cannot be called as "
                              f"{name.partition(':')[2]}(in_shape, num_classes{', **options' if options else ''}){opts}: "
                              f"{e}; a model factory must look like {FACTORY_FORM}") from None
    try:
        model = factory(tuple(in_shape), num_out, **options)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001  (the factory's own error, e.g. about an option: one line, with where)
        raise ConfigError(f"model factory {name!r} raised {_one_line(e)}") from e
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model factory {name!r} returned {type(model).__name__}, not a torch.nn.Module; "
                          f"a model factory must look like {FACTORY_FORM}")
    check_output_width(model, name, tuple(in_shape), num_out, outputs)
    return model


def load_factory(name: str) -> Callable[..., Any]:
    """The callable named ``package.module:function``; a ConfigError (one line) saying why not."""
    mod, _, fn = name.partition(":")
    if not mod or not fn or ":" in fn:
        raise ConfigError(f"model {name!r}: write a factory of your own as package.module:function "
                          f"(e.g. mymodels:make), the function being {FACTORY_FORM}")
    module = _import_user_module(mod, name)
    factory = getattr(module, fn, None)
    if factory is None:
        where = getattr(module, "__file__", None) or mod
        found = sorted(k for k, v in vars(module).items()
                       if callable(v) and not k.startswith("_") and getattr(v, "__module__", None) == module.__name__)
        hint = f"; its functions and classes: {', '.join(found)}" if found else ""
        raise ConfigError(f"model factory {name!r}: module {mod!r} ({where}) has no attribute {fn!r}{hint}")
    if not callable(factory):
        raise ConfigError(f"model factory {name!r}: {mod}.{fn} is a {type(factory).__name__}, not a function; "
                          f"a model factory must look like {FACTORY_FORM}")
    return factory


def _is_missing(e: ModuleNotFoundError, mod: str) -> bool:
    """Whether ``e`` says ``mod`` itself (or a package above it) is missing, rather than
    something the module imports."""
    return e.name is not None and (mod == e.name or mod.startswith(e.name + "."))


def _cwd_on_path() -> bool:
    cwd = os.path.realpath(os.getcwd())
    return any(os.path.realpath(p or os.curdir) == cwd for p in sys.path if isinstance(p, str))


def _import_user_module(mod: str, name: str) -> Any:
    """Import ``mod``; if it is missing but would be found in the current folder, do what
    ``python -m`` does: add that folder to sys.path (at the end: installed packages keep
    precedence) and import again."""
    for attempt in (0, 1):
        try:
            return importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if not _is_missing(e, mod):
                raise ConfigError(f"model factory {name!r}: importing module {mod!r} failed: {e} "
                                  f"(an import inside {mod}: install what it needs)") from None
            top = mod.split(".")[0]
            if attempt == 0 and not _cwd_on_path() and \
                    importlib.machinery.PathFinder.find_spec(top, [os.getcwd()]) is not None:
                sys.path.append(os.getcwd())
                importlib.invalidate_caches()
                continue
            raise ConfigError(f"model factory {name!r}: no module named {e.name!r}; the folder that holds "
                              f"{top} (its .py file or package) must be on PYTHONPATH, or be the current "
                              "folder") from None
        except ImportError as e:
            raise ConfigError(f"model factory {name!r}: importing module {mod!r} failed: {e} "
                              f"(an import inside {mod})") from None
        except Exception as e:  # noqa: BLE001  (a SyntaxError or an error in the module's own code)
            raise ConfigError(f"model factory {name!r}: importing module {mod!r} raised {_one_line(e)}") from e
    raise AssertionError("unreachable")


def _one_line(e: BaseException) -> str:
    """``Type: first line of the message (at file:line)``, the place being the innermost frame
    outside torch and creditlab (the user's code), for a one-line error."""
    text = str(e).strip().splitlines()
    where = ""
    skip = (os.path.dirname(torch.__file__), os.path.dirname(os.path.dirname(__file__)))
    frames = [f for f in traceback.extract_tb(e.__traceback__) if not f.filename.startswith(skip)]
    if frames:
        where = f" (at {frames[-1].filename}:{frames[-1].lineno})"
    return f"{type(e).__name__}: {text[0] if text else ''}{where}"


def check_output_width(model: nn.Module, name: str, in_shape: tuple[int, ...], num_out: int,
                       outputs: str = "classes") -> None:
    """One forward pass of a zero batch (2, *in_shape) in eval mode and no_grad, every module's
    train/eval mode and the RNG state restored: the output must be (2, num_out)."""
    first = next(iter(model.parameters()), None)
    if first is None:
        first = next(iter(model.buffers()), None)
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.get_default_dtype()
    x = torch.zeros((2, *in_shape), dtype=dtype, device=first.device if first is not None else None)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            out = model(x)
    except Exception as e:  # noqa: BLE001  (the data's shape does not suit the model: the user's to fix)
        raise ConfigError(f"model {name!r} fails on a zero batch of the data's shape {tuple(x.shape)}: "
                          f"{_one_line(e)}") from e
    finally:
        for m, was in modes:
            m.training = was
    want = f"(batch, {num_out}): one output per {'class' if outputs == 'classes' else 'input feature'}"
    if not isinstance(out, torch.Tensor):
        raise ConfigError(f"model {name!r} returns {type(out).__name__}, not a tensor; its forward must return "
                          f"a tensor of shape {want}")
    if out.dim() != 2 or out.shape[1] != num_out:
        raise ConfigError(f"model {name!r} gives outputs of shape {tuple(out.shape)} for a batch of 2 inputs "
                          f"of shape {tuple(in_shape)}, but the data has {num_out} {outputs}: its forward must "
                          f"return {want} (the factory gets num_classes={num_out})")


__all__ = [
    "MLP", "Trace", "Activation", "make_activation", "parse_arch", "require_mlp",
    "register_model", "model_names", "build_named_model", "make_named_model", "load_factory",
    "check_output_width", "FACTORY_FORM",
]
