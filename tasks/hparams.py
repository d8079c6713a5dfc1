"""Hyperparameters declared in factory signatures and checked before anything compiles.

Registries map names to plain factories. A factory's signature is the single source of
truth: parameter names, defaults and types, with ranges attached by ``Annotated``::

    def sgd(learning_rate: Annotated[float, Range(0, None, low_open=True)] = 0.01,
            nesterov: bool = False,
            nonfinite: Literal["skip", "shrink"] = "shrink"): ...

:func:`check_hparams` rejects unknown names (listing the valid ones), wrong types,
out-of-range values and invalid choices with a :class:`ConfigError` that names the
field.
"""

from __future__ import annotations

import inspect
import math
import types
import typing
from collections.abc import Callable
from typing import Any, NamedTuple


class ConfigError(ValueError):
    """Invalid user configuration: the message names the field and the valid choices."""


class Range(NamedTuple):
    """A numeric interval constraint, used as ``Annotated[float, Range(...)]``."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def contains(self, value: float) -> bool:
        if self.low is not None and (
            value < self.low or (self.low_open and value == self.low)
        ):
            return False
        return not (
            self.high is not None
            and (value > self.high or (self.high_open and value == self.high))
        )

    def __str__(self) -> str:
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        left = "(" if self.low_open or self.low is None else "["
        right = ")" if self.high_open or self.high is None else "]"
        return f"{left}{lo}, {hi}{right}"


#: Common constraints.
POSITIVE = Range(0, None, low_open=True)
NONNEGATIVE = Range(0, None)
UNIT = Range(0, 1)
UNIT_OPEN = Range(0, 1, high_open=True)


class HParam(NamedTuple):
    """One declared hyperparameter."""

    name: str
    kind: Any  # float, int, bool, str, or a tuple of allowed choices
    optional: bool  # None allowed
    default: Any
    range: Range | None

    def type_name(self) -> str:
        if isinstance(self.kind, tuple):
            text = "|".join(repr(c) for c in self.kind)
        else:
            text = getattr(self.kind, "__name__", str(self.kind))
        if self.range is not None:
            text += f" in {self.range}"
        return text + (" or None" if self.optional else "")


def _parse_annotation(annotation: Any) -> tuple[Any, bool, Range | None]:
    range_ = None
    if typing.get_origin(annotation) is typing.Annotated:
        annotation, *extras = typing.get_args(annotation)
        range_ = next((e for e in extras if isinstance(e, Range)), None)
    optional = False
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        annotation = args[0] if len(args) == 1 else Any
        if typing.get_origin(annotation) is typing.Annotated:
            inner, range_ = _parse_annotation(annotation)[0::2]
            annotation = inner
    if typing.get_origin(annotation) is typing.Literal:
        return tuple(typing.get_args(annotation)), optional, range_
    return annotation, optional, range_


def declared_hparams(factory: Callable) -> dict[str, HParam]:
    """The hyperparameters a factory declares, in signature order."""
    try:
        hints = typing.get_type_hints(factory, include_extras=True)
    except (NameError, TypeError):
        hints = {}
    out = {}
    for p in inspect.signature(factory).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        kind, optional, range_ = _parse_annotation(hints.get(p.name, Any))
        default = p.default if p.default is not p.empty else inspect.Parameter.empty
        out[p.name] = HParam(p.name, kind, optional, default, range_)
    return out


def coerce(what: str, hp: HParam, value: Any) -> Any:
    """``value`` checked against ``hp`` (type, choices, range) and converted.

    ``what`` starts the error message, e.g. "optimizer hyperparameter" or "run
    option"; the field's name follows it.
    """
    field = f"{what} {hp.name!r}"
    if value is None:
        if hp.optional or hp.kind is Any:
            return None
        raise ConfigError(f"{field} cannot be None; expected {hp.type_name()}")
    if isinstance(hp.kind, tuple):
        if value not in hp.kind:
            choices = ", ".join(repr(c) for c in hp.kind)
            raise ConfigError(f"{field} = {value!r} is not one of {choices}")
        return value
    if hp.kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{field} = {value!r} must be true or false")
        return value
    if hp.kind in (int, float):
        integral = isinstance(value, int) or (
            isinstance(value, float) and value.is_integer() and hp.kind is int
        )
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(
                f"{field} = {value!r} must be a number ({hp.type_name()})"
            )
        if hp.kind is int and not integral:
            raise ConfigError(f"{field} = {value!r} must be an integer")
        try:
            value = hp.kind(value)
        except OverflowError:
            message = f"{field} = {value!r} is out of range {hp.range}"
            raise ConfigError(message) from None
        if not math.isfinite(value) or (hp.range and not hp.range.contains(value)):
            raise ConfigError(f"{field} = {value!r} is out of range {hp.range}")
        return value
    if hp.kind is str and not isinstance(value, str):
        raise ConfigError(f"{field} = {value!r} must be a string")
    return value


def check_hparams(what: str, name: str, factory: Callable, given: dict) -> dict:
    """Validate ``given`` against ``factory``'s signature; return all hyperparameters.

    Args:
      what: "task" or "optimizer", used in messages.
      name: the registry name, used in messages.
      factory: the factory whose signature declares the hyperparameters.
      given: user-supplied values.

    Returns:
      The complete keyword arguments: given values (coerced) plus defaults.

    Raises:
      ConfigError: for unknown names, missing required values, wrong types or ranges.
    """
    declared = declared_hparams(factory)
    unknown = sorted(set(given) - set(declared))
    if unknown:
        valid = ", ".join(declared) or "(none)"
        raise ConfigError(
            f"unknown {what} hyperparameter {unknown[0]!r} for {name!r}; valid: {valid}"
        )
    out = {}
    for hp in declared.values():
        if hp.name in given:
            out[hp.name] = coerce(f"{what} hyperparameter", hp, given[hp.name])
        elif hp.default is inspect.Parameter.empty:
            raise ConfigError(f"{what} {name!r} needs hyperparameter {hp.name!r}")
        else:
            out[hp.name] = hp.default
    return out
