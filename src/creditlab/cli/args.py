"""Reading what a user typed: comma lists, shapes, the flags and ``KEY=VALUE`` overrides, and
the config they resolve to."""

from __future__ import annotations

import math
import shlex
from pathlib import Path

from creditlab import config as config_mod
from creditlab.config import Override
from creditlab.errors import ConfigError


def _csv(text: str | None) -> list[str] | None:
    return None if text is None else [s.strip() for s in _split_specs(text) if s.strip()]


def _split_specs(text: str) -> list[str]:
    """Split ``bp,ar:steps=10,eta=0.1,fa`` into specs: a comma starts a new spec unless what
    follows looks like ``key=value`` (an option of the previous spec)."""
    parts, out = text.split(","), []
    for part in parts:
        if out and "=" in part.split(":")[0] and ":" in out[-1]:
            out[-1] += "," + part
        else:
            out.append(part)
    return out


def _ints(text: str | None, flag: str = "--seeds") -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text}: give comma-separated integers, e.g. {flag} 0,1,2") from None


def _floats(text: str, flag: str, example: str) -> list[float]:
    try:
        values = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise ConfigError(f"{flag} {text}: give comma-separated positive numbers, e.g. {flag} {example}")
    return values


def _shape(text: str | None) -> tuple[int, ...] | None:
    return None if text is None else tuple(int(s) for s in text.lower().split("x"))


#: flags that are short forms of config keys: argparse dest -> (config key, flag)
_FLAG_KEYS = {"dataset": ("dataset", "--dataset"), "epochs": ("epochs", "--epochs"),
              "data_dir": ("data_dir", "--data-dir"), "device": ("device", "--device"),
              "threads": ("threads", "--threads"), "algo": ("algo", "--algo"), "config_seed": ("seed", "--seed")}


def _overrides(args) -> list[Override]:
    """The command line's config values, labelled as typed: the flags first, then the
    ``KEY=VALUE`` arguments (a key given by both, with different values, is refused)."""
    out = [Override(key, v, f"{flag} {v}") for dest, (key, flag) in _FLAG_KEYS.items()
           if (v := getattr(args, dest, None)) is not None]
    if getattr(args, "algos", None) is not None:
        out.append(Override("algos", _csv(args.algos), f"--algos {args.algos}"))
    if getattr(args, "seeds", None) is not None:
        out.append(Override("seeds", _ints(args.seeds), f"--seeds {args.seeds}"))
    if getattr(args, "deterministic", False):
        out.append(Override("deterministic", True, "--deterministic"))
    if getattr(args, "tensorboard", False):
        out.append(Override("logging.tensorboard", True, "--tensorboard"))
    model, arch = getattr(args, "model", None), getattr(args, "arch", None)
    if model is not None and arch is not None:
        raise ConfigError(f"--model {model} --arch {arch}: give one (--model names a model, --arch builds an MLP "
                          "from a layer spec)")
    if model is not None:
        out.append(Override("model.name", model, f"--model {model}"))
    if arch is not None:
        out += [Override("model.arch", arch, f"--arch {arch}"), Override("model.name", None, f"--arch {arch}")]
    return out + [config_mod.parse_override(t) for t in getattr(args, "overrides", None) or []]


def _one_algo(raw: dict | None, origin: str | None, over: list[Override]) -> tuple[list[Override], str | None]:
    """A config file that lists ``algos:`` but no ``algo:``, for a command that runs one
    algorithm: its only entry (and a note saying so), or an error asking for ``--algo``."""
    algos = (raw or {}).get("algos")
    if "algo" in (raw or {}) or not isinstance(algos, list) or not algos or any(o.key == "algo" for o in over):
        return over, None
    if len(algos) == 1:
        return over + [Override("algo", algos[0], f"{origin} (algos:)")], \
            f"the config lists one algorithm (algos:), training it: {algos[0]}"
    raise ConfigError(f"{origin} lists {len(algos)} algorithms under algos: ({'; '.join(map(str, algos))}) and no "
                      f"algo:, and this command runs one: choose it with --algo, e.g. --algo {shlex.quote(str(algos[0]))}")


def _all_algos(raw: dict | None, origin: str | None, over: list[Override]) -> tuple[list[Override], str | None]:
    """A config file that names one ``algo:`` and no ``algos:``, for a command that runs a list
    of algorithms (compare): that one algorithm (and a note saying so), never the default list."""
    if not raw or "algo" not in raw or "algos" in raw or any(o.key == "algos" for o in over):
        return over, None
    return over + [Override("algos", [raw["algo"]], f"{origin} (algo:)")], \
        f"the config names one algorithm (algo:) and no algos:, comparing it alone: {raw['algo']}"


def _load_cfg(args, base: dict | None = None, one_algo: bool = False,
              all_algos: bool = False) -> tuple[dict, list[Override], str | None]:
    """The resolved config of ``--config`` (else ``base``, else the defaults) with the command
    line's values; also the overrides (to tell what was given explicitly) and a note to print."""
    over = _overrides(args)
    raw, origin = (config_mod.read(args.config), args.config) if args.config else (base, None)
    note = None
    if one_algo:
        over, note = _one_algo(raw, origin, over)
    if all_algos and args.config:
        over, note = _all_algos(raw, origin, over)
    return config_mod.resolve(raw, over, origin=origin), over, note


def _stored(out: Path) -> dict | None:
    """A run directory's resolved config (``--resume`` without ``--config``), if it has one."""
    path = out / "config.yaml"
    return config_mod.read(path) if path.is_file() else None


def _explicit(over: list[Override], key: str) -> bool:
    return any(o.key == key for o in over)


def _default_run_dir(cfg: dict) -> Path:
    return Path("runs") / f"{cfg['name']}-{cfg['algo'].replace(':', '_').replace(',', '_')}-s{cfg['seed']}"


