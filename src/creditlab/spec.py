"""Compact specs: ``name`` or ``name:key=value,key=value`` (algorithms, losses, models).

Values are parsed as bool (``true``/``false``), int, float, ``inf`` or left as strings.
"""

from __future__ import annotations

import math
from typing import Any

from creditlab.errors import ConfigError


def parse_value(text: str) -> Any:
    low = text.strip().lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("inf", "infinity"):
        return math.inf
    if low in ("none", "null"):
        return None
    try:
        return int(low)
    except ValueError:
        pass
    try:
        return float(low)
    except ValueError:
        return text.strip()


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Split ``"ar:steps=100,eta=0.1"`` into ``("ar", {"steps": 100, "eta": 0.1})``."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"empty spec {spec!r}: expected 'name' or 'name:key=value,...'")
    name, _, rest = spec.strip().partition(":")
    options: dict[str, Any] = {}
    if rest.strip():
        for item in rest.split(","):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise ConfigError(
                    f"bad option {item!r} in spec {spec!r}: expected key=value (e.g. 'ar:steps=100,eta=0.1')"
                )
            options[key.strip()] = parse_value(value)
    return name.strip(), options


def format_spec(name: str, options: dict[str, Any]) -> str:
    if not options:
        return name
    return name + ":" + ",".join(f"{k}={_fmt(v)}" for k, v in options.items())


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return str(value)


def check_options(kind: str, name: str, options: dict[str, Any], allowed: dict[str, Any]) -> dict[str, Any]:
    """Fill defaults and reject unknown option names, listing the valid ones."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        valid = ", ".join(f"{k} (default {_fmt(v)})" for k, v in allowed.items()) or "none"
        raise ConfigError(f"unknown option(s) {', '.join(unknown)} for {kind} {name!r}; valid options: {valid}")
    out = dict(allowed)
    out.update(options)
    return out


def choice(kind: str, key: str, value: Any, valid: tuple[str, ...]) -> str:
    if value not in valid:
        raise ConfigError(f"{kind} option {key}={value!r} is not valid; choose one of: {', '.join(valid)}")
    return value
