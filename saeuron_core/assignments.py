"""Parsing of ``KEY=VALUE`` options as the CLI and the ComfyUI nodes take them."""

from __future__ import annotations

from typing import Any, Callable, Iterable

from .errors import ConfigError


def parse_assignments(items: Iterable[str], what: str, form: str, kind: Callable[[str], Any] = str) -> dict[str, Any]:
    """``["a=1", "b=2"]`` -> ``{"a": kind("1"), "b": kind("2")}``, or an error saying what ``what`` takes."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            if not sep or not key.strip() or not value.strip():
                raise ValueError(item)
            out[key.strip()] = kind(value.strip())
        except ValueError:
            raise ConfigError(f"{what} takes {form}, got {item!r}") from None
    return out
