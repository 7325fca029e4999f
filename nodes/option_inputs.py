"""Node inputs made from a dataclass's fields, and the dataclass made back from the widgets' values.

Each field whose ``metadata["node"]`` describes a widget (``input``, ``widget``, ``tooltip``, ``min``/``max``/``step``,
``optional``: see :class:`~saeuron_core.erasure.options.EraseOptions`) is one input, in field order, with the field's
default; a node lists such options nowhere itself.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Generic, Mapping, Optional, Sequence, TypeVar

from comfy_api.latest import io

from .common import parse_pairs

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])
WIDGETS = ("float", "int", "boolean", "combo", "pairs")


@dataclasses.dataclass(frozen=True)
class FieldInputs(Generic[T]):
    """The fields of the dataclass ``cls`` that carry ``metadata["node"]``, as node inputs."""

    cls: type[T]

    def fields(self) -> list[dataclasses.Field]:
        """The fields offered as inputs, in order."""
        return [f for f in dataclasses.fields(self.cls) if "node" in f.metadata]  # type: ignore[arg-type]

    def names(self) -> list[str]:
        """The inputs' names, in order."""
        return [f.metadata["node"]["input"] for f in self.fields()]

    def inputs(self) -> list[io.Input]:
        """One ComfyUI input per field."""
        return [_widget(self.cls, f) for f in self.fields()]

    def values(self, args: Sequence[Any] = (), named: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
        """``{field: value}`` from the widgets: ``args`` in input order, then ``named`` by input name; a widget not
        given takes its default. Too many values or an unknown name is a ``TypeError``, as in a call."""
        fields, names, named = self.fields(), self.names(), named or {}
        if len(args) > len(names):
            raise TypeError(f"{len(args)} values for the {len(names)} inputs {', '.join(names)}")
        given = dict(zip(names, args))
        wrong = sorted(set(named) - set(names)) + sorted(set(named) & set(given))
        if wrong:
            raise TypeError(f"unknown or repeated input {', '.join(wrong)}; the inputs are {', '.join(names)}")
        given.update(named)
        return {f.name: _value(f, given.get(name, _default(f))) for f, name in zip(fields, names)}

    def build(self, args: Sequence[Any] = (), named: Optional[Mapping[str, Any]] = None) -> T:
        """The dataclass from the widgets (see :meth:`values`); the other fields keep their defaults."""
        return self.cls(**self.values(args, named))

    def signed(self, fn: F) -> F:
        """``fn``, which takes the inputs as ``**options``, shown with each input as a parameter of its own.

        ComfyUI hands a node's ``validate_inputs`` the inputs its signature names (all of them, sockets included, to
        one taking ``**kwargs``) and reports a failure against each; this keeps that to the widgets it names.
        """
        sig = inspect.signature(fn)
        own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        more = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=_default(f))
                for f, name in zip(self.fields(), self.names())]
        fn.__signature__ = sig.replace(parameters=own + more)  # type: ignore[attr-defined]
        return fn


def _default(f: dataclasses.Field) -> Any:
    """The widget's default: the field's (a ``pairs`` widget's text is empty)."""
    return "" if f.metadata["node"]["widget"] == "pairs" else f.default


def _value(f: dataclasses.Field, value: Any) -> Any:
    return parse_pairs(value) if f.metadata["node"]["widget"] == "pairs" else value


def _widget(cls: type, f: dataclasses.Field) -> io.Input:
    spec = f.metadata["node"]
    name, kind = spec["input"], spec["widget"]
    common = {"default": _default(f), "optional": spec.get("optional", False), "tooltip": spec["tooltip"]}
    if kind == "combo":
        return io.Combo.Input(name, options=list(f.metadata["choices"]), **common)
    if kind == "pairs":
        return io.String.Input(name, multiline=False, **common)
    if kind == "boolean":
        return io.Boolean.Input(name, **common)
    if kind in ("float", "int"):
        limits = {k: spec[k] for k in ("min", "max", "step") if k in spec}
        return (io.Float if kind == "float" else io.Int).Input(name, **limits, **common)
    raise TypeError(f"{cls.__name__}.{f.name}: unknown widget {kind!r} (known: {', '.join(WIDGETS)})")
