"""The Markdown pieces every kind of generated table shares: a fixed-point number without a
negative zero, an escaped cell, a row's label and the header lines."""

from __future__ import annotations


def fixed(x: float, digits: int) -> str:
    """``x`` to ``digits`` decimals; ``-0.00`` prints as ``0.00``."""
    text = f"{x:.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def esc(text: str) -> str:
    """``text`` as a table cell (``|`` escaped)."""
    return text.replace("|", "\\|")


def label(row: dict, algo: object = None) -> str:
    """A row's label: its ``label:``, else its algorithm spec in backticks."""
    return str(row.get("label") or f"`{row.get('algo') if algo is None else algo}`")


def header(headers: list[str]) -> list[str]:
    """A table's first lines: a blank line, the escaped headers, the separator."""
    return ["", "| " + " | ".join(esc(h) for h in headers) + " |", "|" + "---|" * len(headers)]
