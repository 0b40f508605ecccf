"""JSON into the frozen config dataclasses, every field checked against its declaration.

A run's config arrives as JSON (budgets, ``--overrides``, ``--variant``, the pipeline's string
parameters), and a wrong value must fail before any work, saying which field and what it
accepts, not minutes later inside meta-training. The dataclasses are the single source of
truth for that: :func:`from_json` reads each field's type annotation (``int``, ``float``,
``str``, ``bool``, ``tuple[T, ...]``, ``tuple[T, U]``, ``T | None``, a nested dataclass) and
the :class:`Range` it may carry as :data:`typing.Annotated` metadata::

    meta_steps: Annotated[int, COUNT] = 60        # an integer >= 1
    sigma: Annotated[float, POSITIVE] = 0.05      # a number > 0

so adding a field adds its check; there is no list of fields to keep in step. A range on a
tuple applies to each element, on ``T | None`` to the value when it is not null. A class's
own ``__post_init__`` checks (choices, relations between fields) still run, their messages
prefixed with the field path. Integers must fit JAX's int32, numbers must be finite, and
``true``/``false`` is not a number.

Errors are :class:`ConfigError`, a ``ValueError`` (exit code 2 at the command line) whose
message starts with the field's path, e.g. ``meta_train.meta_steps must be an integer >= 1,
got "ten".``
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from typing import Any, Mapping

INT32_MAX = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric field accepts: ``low``/``high`` bounds (``None``: unbounded),
    each included unless ``low_open``/``high_open``."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True

    def describe(self) -> str:
        low, high = _number(self.low), _number(self.high)
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {low}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {high}"
        return ""


def _number(value: float | None) -> str:
    if value is None:
        return ""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


# The ranges the configs use most.
COUNT = Range(1)  # steps, sizes, numbers of things
NON_NEGATIVE = Range(0)
POSITIVE = Range(0, low_open=True)
PROBABILITY = Range(0, 1)
OPEN_UNIT = Range(0, 1, low_open=True, high_open=True)
DECAY = Range(0, 1, high_open=True)  # an EMA's decay: 0 forgets at once, 1 never moves
SEED = Range(0, INT32_MAX)


class ConfigError(ValueError):
    """A config value that does not match its field's declaration; the message names the
    field's path and what it accepts."""


def from_json(cls: type, data: Any, path: str = "", defaults: Any = None) -> Any:
    """``data`` (parsed JSON) as an instance of the frozen dataclass ``cls``.

    Fields ``data`` leaves out keep ``defaults``' values (for a nested config, the enclosing
    config's default, not its class's), else the class defaults; a field without a default
    must be given. ``path`` names ``data`` in messages (``""``: the top level).
    """
    if isinstance(data, cls):
        return data
    shorthand = getattr(cls, "json_shorthand", None)
    if shorthand is not None and isinstance(data, str):
        data = {shorthand: data}  # e.g. a task given as its dataset's name
    if not isinstance(data, Mapping):
        raise ConfigError(f"{_name(path)} must be {describe(cls)}, got {_show(data)}.")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"Unknown field(s) {unknown} in {_name(path)}; known: {sorted(fields)}.")
    hints = _hints(cls)
    required = [
        name for name, f in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if defaults is None and not required:
        defaults = cls()  # its nested configs' defaults are the class's choice, not theirs
    if defaults is None:
        missing = [name for name in required if name not in data]
        if missing:
            name = missing[0]
            raise ConfigError(f"{_join(path, name)} is required: {describe(hints[name])}.")
    kwargs = {
        name: _convert(hints[name], value, _join(path, name), getattr(defaults, name, None))
        for name, value in data.items()
    }
    try:
        return dataclasses.replace(defaults, **kwargs) if defaults is not None else cls(**kwargs)
    except ValueError as err:  # the class's own checks: choices, relations between fields
        message = str(err)
        if path and f"{path}." not in message:
            message = f"{path}: {message}"
        raise ConfigError(message) from None


def describe(tp: Any) -> str:
    """What a field of type ``tp`` accepts, in words: ``an integer >= 1``."""
    tp, ranges = _unwrap(tp)
    return _describe(tp, ranges)


def _convert(tp: Any, value: Any, path: str, default: Any = None, ranges: tuple[Range, ...] = ()) -> Any:
    tp, extra = _unwrap(tp)
    ranges = (*ranges, *extra)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if len(options) != 1 or len(args) != 2:
            raise TypeError(f"{path}: only `T | None` unions convert from JSON, not {tp}")
        if value is None:
            return None
        if not _is_leaf(options[0]):  # a list or an object: its own message names the part
            return _convert(options[0], value, path, default, ranges)
        try:
            return _convert(options[0], value, path, default, ranges)
        except ConfigError:
            raise ConfigError(f"{path} must be {_describe(tp, ranges)}, got {_show(value)}.") from None
    if dataclasses.is_dataclass(tp):
        return from_json(tp, value, path, default if dataclasses.is_dataclass(default) else None)
    if origin is tuple:
        return _convert_tuple(tp, args, value, path, ranges)
    if not _leaf_ok(tp, value) or (ranges and not all(value in r for r in ranges)):
        raise ConfigError(f"{path} must be {_describe(tp, ranges)}, got {_show(value)}.")
    return value


def _convert_tuple(tp: Any, args: tuple[Any, ...], value: Any, path: str, ranges: tuple[Range, ...]) -> tuple:
    variadic = len(args) == 2 and args[1] is Ellipsis
    if not isinstance(value, (list, tuple)) or (not variadic and len(value) != len(args)):
        raise ConfigError(f"{path} must be {_describe(tp, ranges)}, got {_show(value)}.")
    types_ = [args[0]] * len(value) if variadic else list(args)
    return tuple(
        _convert(t, v, f"{path}[{i}]", None, ranges) for i, (t, v) in enumerate(zip(types_, value))
    )


def _leaf_ok(tp: Any, value: Any) -> bool:
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool) and abs(value) <= INT32_MAX
    if tp is float:
        return (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        )
    if tp is str:
        return isinstance(value, str)
    if tp is Any:
        return True
    raise TypeError(f"No JSON conversion for fields of type {tp!r}")


def _is_leaf(tp: Any) -> bool:
    tp, _ = _unwrap(tp)
    return tp in (bool, int, float, str)


def _describe(tp: Any, ranges: tuple[Range, ...] = ()) -> str:
    tp, extra = _unwrap(tp)
    ranges = (*ranges, *extra)
    bounds = " and ".join(r.describe() for r in ranges if r.describe())
    bounded = f" {bounds}" if bounds else ""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        return " or ".join([_describe(o, ranges) for o in options] + ["null"])
    if dataclasses.is_dataclass(tp):
        names = [f.name for f in dataclasses.fields(tp) if f.init]
        shorthand = getattr(tp, "json_shorthand", None)
        text = f"an object with fields {names}"
        return f"a {shorthand} name or {text}" if shorthand else text
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_plural(args[0], ranges)}"
        return f"a list of {len(args)} {_plural(args[0], ranges)}"
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string", Any: "any value"}
    return words.get(tp, repr(tp)) + bounded


def _plural(tp: Any, ranges: tuple[Range, ...]) -> str:
    single = _describe(tp, ranges)
    for article, noun in (("an integer", "integers"), ("a number", "numbers"), ("a string", "strings")):
        if single.startswith(article):
            return noun + single[len(article):]
    return single


def _unwrap(tp: Any) -> tuple[Any, tuple[Range, ...]]:
    """``Annotated[T, Range(...), ...]`` → ``(T, ranges)``."""
    if typing.get_origin(tp) is typing.Annotated:
        base, *meta = typing.get_args(tp)
        return base, tuple(m for m in meta if isinstance(m, Range))
    return tp, ()


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _name(path: str) -> str:
    return path or "the config"


def _show(value: Any) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 200 else text[:200] + "…"
