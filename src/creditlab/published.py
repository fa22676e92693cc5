"""The ``published:`` block of an experiment file: the numbers a paper (or its authors' code)
reports for the experiment, each with its exact source and the kind of source it is.

Schema (every key optional; ``{}`` = nothing published)::

    published:
      kind: paper                  # paper | authors-code | read-from-figure: how the values were
                                   #   obtained (the default of every value below)
      source: "Bartunov et al. 2018, Table 1"   # where, precisely: a table or figure number
                                   #   (paper), a file and cell or line (authors-code), a figure
                                   #   and panel with the point read (read-from-figure)
      protocol: "best test error within 500 epochs"   # how the source measured them
      values:                      # NAME: VALUE, or GROUP: {NAME: VALUE, ...} (nested)
        bp: 1.48                   #   a number, a text ("< 10") or a list ([train, test])
        np: {value: 2.65, kind: authors-code, source: "fig_2_validate_nodepert.ipynb, cell 9"}
                                   #   one value with its own kind and source (and a note)
      claim: "..."                 # what the source says where it gives no number
      notes: "..."
      # any other key: free-form numbers or text from before this schema (still accepted, not
      # used by ``creditlab tables``)

Rules (checked when a config is loaded): ``kind`` is one of :data:`KINDS`; a ``kind`` needs a
``source``; every value under ``values`` has a kind and a source, its own or the block's.
``creditlab tables`` reads values by their dotted path (``values.cifar10.bp``, list items by
index: ``cifar10_shallow.bp.1``) with :func:`lookup`, and prints each with its kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from creditlab.errors import ConfigError

#: the kinds of source a published number can have
KINDS = ("paper", "authors-code", "read-from-figure")
_VALUE_KEYS = {"value", "kind", "source", "note"}


@dataclass(frozen=True)
class Published:
    """One published value with where it comes from."""

    value: Any
    kind: str
    source: str
    note: str = ""


def _text(block: dict, key: str, where: str) -> str | None:
    v = block.get(key)
    if v is None:
        return None
    if not isinstance(v, str) or not v.strip():
        raise ConfigError(f"{where}.{key} = {v!r} must be a non-empty text")
    return v


def _kind(block: dict, where: str) -> str | None:
    kind = _text(block, "kind", where)
    if kind is not None and kind not in KINDS:
        raise ConfigError(f"{where}.kind = {kind!r}; valid: {', '.join(KINDS)}")
    if kind is not None and block.get("source") is None:
        raise ConfigError(f"{where} says kind {kind} but names no source; add {where}.source (e.g. a table or "
                          f"figure number, or the authors' file and cell)")
    return kind


def _scalar(v: Any) -> bool:
    return isinstance(v, (int, float, str)) and not isinstance(v, bool)


def _leaves(values: Any, where: str, kind: str | None, source: str | None) -> None:
    if isinstance(values, dict) and "value" in values:
        extra = sorted(set(values) - _VALUE_KEYS)
        if extra:
            raise ConfigError(f"{where}: unknown key {extra[0]!r} of a published value; valid: "
                              f"{', '.join(sorted(_VALUE_KEYS))}")
        _leaves(values["value"], f"{where}.value", _kind(values, where) or kind,
                _text(values, "source", where) or source)
        _text(values, "note", where)
    elif isinstance(values, dict):
        if not values:
            raise ConfigError(f"{where} is an empty mapping; give values or remove it")
        for k, v in values.items():
            _leaves(v, f"{where}.{k}", kind, source)
    else:
        ok = _scalar(values) or (isinstance(values, list) and values and all(_scalar(x) for x in values))
        if not ok:
            raise ConfigError(f"{where} = {values!r}: a published value is a number, a text or a list of them")
        if kind is None or source is None:
            raise ConfigError(f"{where} has no {'kind' if kind is None else 'source'}: give published."
                              f"{'kind' if kind is None else 'source'} or one on the value "
                              f"({{value: ..., kind: paper|authors-code|read-from-figure, source: ...}})")


def check_published(block: dict, where: str = "published") -> None:
    """Raise ConfigError, naming the key, if ``block`` breaks the schema above."""
    kind = _kind(block, where)
    source = _text(block, "source", where)
    for key in ("protocol", "claim", "notes"):
        _text(block, key, where)
    if "values" in block:
        if not isinstance(block["values"], dict):
            raise ConfigError(f"{where}.values must be a mapping of names to values")
        _leaves(block["values"], f"{where}.values", kind, source)


def lookup(block: dict, path: str) -> Published:
    """The value at dotted ``path`` under ``block['values']`` with its kind and source."""
    check_published(block)
    node: Any = block.get("values") or {}
    kind, source, note = block.get("kind"), block.get("source"), ""
    for i, part in enumerate(path.split(".")):
        if isinstance(node, dict) and "value" in node:
            kind, source, note = node.get("kind", kind), node.get("source", source), node.get("note", "")
            node = node["value"]
        here = ".".join(path.split(".")[:i + 1])
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            have = ", ".join(map(str, node)) if isinstance(node, dict) else f"{len(node)} items" if isinstance(
                node, list) else "a single value"
            raise ConfigError(f"published.values.{here} does not exist (there: {have or 'nothing'})")
    if isinstance(node, dict) and "value" in node:
        kind, source, note = node.get("kind", kind), node.get("source", source), node.get("note", "")
        node = node["value"]
    if not _scalar(node):
        raise ConfigError(f"published.values.{path} is {node!r}, not one number or text; name one item")
    return Published(node, kind, source, note)
