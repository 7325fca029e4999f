"""Command-line options made from a config dataclass's fields, and the dataclass made back from them.

A :class:`Fields` names some fields of a dataclass. :meth:`Fields.add_to` adds one option per field
(``--field-name`` unless the command names it otherwise): its type and choices come from the field's
annotation (``Optional[int]`` -> ``int``, ``Literal[...]`` -> choices, ``bool`` -> a switch), its default
from the dataclass, its help from the command's own words or else the field's ``metadata["help"]``
(``metadata["choices"]`` also counts). :meth:`Fields.build` reads the parsed values back into an instance.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Callable, Generic, Literal, Mapping, Optional, TypeVar, Union

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Fields(Generic[T]):
    """Some fields of the dataclass ``cls`` as command-line options.

    ``flags``, ``help``, ``types`` and ``defaults`` change a field's option where the dataclass alone does not
    say it: another flag (``{"guidance_scale": "--guidance"}``), the command's help text (``None``: none),
    an argparse ``type`` for a field the annotation cannot give (``list[int]``), or another default.
    """

    cls: type[T]
    names: tuple[str, ...]
    flags: Mapping[str, str] = dataclasses.field(default_factory=dict)
    help: Mapping[str, Optional[str]] = dataclasses.field(default_factory=dict)
    types: Mapping[str, Callable[[str], Any]] = dataclasses.field(default_factory=dict)
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        known = {f.name for f in dataclasses.fields(self.cls)}  # type: ignore[arg-type]
        named = set(self.names).union(self.flags, self.help, self.types, self.defaults)
        if named - known:
            raise TypeError(f"{self.cls.__name__} has no field {', '.join(sorted(named - known))}")

    def flag(self, name: str) -> str:
        """The option of field ``name``: ``--field-name`` unless ``flags`` says otherwise."""
        return self.flags.get(name, "--" + name.replace("_", "-"))

    def dest(self, name: str) -> str:
        """Where argparse stores field ``name``'s value (derived from its flag, so the metavar stays the flag's)."""
        return self.flag(name).lstrip("-").replace("-", "_")

    def add_to(self, parser: Union[argparse.ArgumentParser, argparse._ArgumentGroup]) -> None:
        """Add one option per named field to ``parser`` (or an argument group), in the order of ``names``."""
        hints = typing.get_type_hints(self.cls)
        fields = {f.name: f for f in dataclasses.fields(self.cls)}  # type: ignore[arg-type]
        for name in self.names:
            parser.add_argument(self.flag(name), **self._option(fields[name], hints[name]))

    def values(self, args: argparse.Namespace) -> dict[str, Any]:
        """``{field: parsed value}`` of the named fields."""
        return {name: getattr(args, self.dest(name)) for name in self.names}

    def build(self, args: argparse.Namespace, **more: Any) -> T:
        """The dataclass from the parsed options; ``more`` sets other fields or replaces parsed values."""
        return self.cls(**{**self.values(args), **more})

    def _option(self, f: dataclasses.Field, hint: Any) -> dict[str, Any]:
        default = self.defaults.get(f.name, _default(f))
        option: dict[str, Any] = {"help": self.help.get(f.name, f.metadata.get("help"))}
        if default is dataclasses.MISSING:
            option["required"] = True
        else:
            option["default"] = default
        kind, choices = _value_type(hint, default)
        if kind is bool:
            option["action"] = "store_true" if default is False else argparse.BooleanOptionalAction
            return option
        if f.name in self.types:
            kind = self.types[f.name]
        elif kind is None:
            raise TypeError(f"{self.cls.__name__}.{f.name}: no command-line type for {hint}; give one in types")
        if kind is not str:  # argparse's own default; leaving it out keeps strings as they are
            option["type"] = kind
        choices = f.metadata.get("choices", choices)
        if choices is not None:
            option["choices"] = list(choices)
        return option


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _value_type(hint: Any, default: Any) -> tuple[Optional[type], Optional[tuple[Any, ...]]]:
    """``(type, choices)`` an option parses a field of type ``hint`` into (``(None, None)``: no simple one)."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        values = typing.get_args(hint)
        return type(values[0]), values
    if origin is Union or origin is types.UnionType:
        members = [m for m in typing.get_args(hint) if m is not type(None)]
        if len(members) == 1:  # Optional[X]
            return _value_type(members[0], default)
        if type(default) in members:  # e.g. Union[float, Mapping[str, float]] = 0.0: the option takes a float
            return type(default), None
        return None, None
    if hint in (bool, int, float, str):
        return hint, None
    return None, None
