"""Typed, validated configuration: plain mappings (parsed ``params.yaml``) -> frozen dataclasses.

The library never reads YAML itself; the stage scripts parse ``params.yaml`` and hand the
resulting mapping to :func:`genmodels.configs.load_params`. Every section is a frozen
dataclass. Unknown keys, wrong types and out-of-range values raise :class:`ConfigError`
naming the dotted key, the offending value and what is allowed, before any work starts.
"""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Iterable, Mapping
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

T = TypeVar("T")


class ConfigError(ValueError):
    """A params value is unknown, ill-typed or out of range.

    The message always names the dotted key, the value given and what is allowed.
    """

    def __init__(self, key: str, value: Any, allowed: str, hint: str | None = None, *, unknown: bool = False) -> None:
        self.key = key
        self.value = value
        self.allowed = allowed
        if unknown:  # the key itself is wrong, not its value
            msg = f"params key '{key}' (value {value!r}) is not a known key; {allowed}"
        else:
            msg = f"params key '{key}': got {value!r}; expected {allowed}"
        if hint:
            msg += f". {hint}"
        super().__init__(msg)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin in (tuple, list):
        args = get_args(tp)
        inner = _type_name(args[0]) if args else "any"
        return f"a list of {inner}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping with keys {', '.join(f.name for f in dataclasses.fields(tp))}"
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return the (possibly converted) value."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in get_args(tp) and type(value) in {type(a) for a in get_args(tp)}:
            return value
        raise ConfigError(key, value, _type_name(tp))
    if origin in (Union, types.UnionType):
        errors = []
        for arg in get_args(tp):
            try:
                return _coerce(arg, value, key)
            except ConfigError as err:
                errors.append(err)
        raise ConfigError(key, value, _type_name(tp))
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(key, value, "null")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, value, _type_name(tp))
        args = get_args(tp)
        inner = args[0] if args else Any
        return tuple(_coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(key, value, _type_name(tp))
        return from_mapping(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, value, "true or false")
    if tp is int:
        # bool is a subclass of int: reject it explicitly, `epochs: true` is a typo, not 1.
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(key, value, "an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = float(value)
            if not math.isfinite(value):
                raise ConfigError(key, value, "a finite number")
            return value
        # YAML 1.1 reads "1e-3" (no dot) as a string; accept numeric strings of that form.
        if isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                raise ConfigError(key, value, "a number") from None
            if math.isfinite(f):
                return f
        raise ConfigError(key, value, "a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(key, value, "a string")
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # programming error


def from_mapping(cls: type[T], data: Mapping[str, Any], prefix: str) -> T:
    """Build the frozen dataclass ``cls`` from ``data``, validating keys and types.

    Missing keys take the dataclass default; keys without a default are required.
    After construction the dataclass' own ``__post_init__`` checks ranges.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(prefix, data, _type_name(cls))
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        close = _close_matches(unknown[0], fields)
        raise ConfigError(
            key,
            data[unknown[0]],
            (f"the keys under '{prefix}' are " if prefix else "the top-level sections are ") + ", ".join(sorted(fields)),
            f"Did you mean {close!r}?" if close else "Remove it or fix its spelling.",
            unknown=True,
        )
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(key, None, f"a value ({_type_name(hints[name])}); this key is required")
    obj = cls(**kwargs)
    # Nested dataclasses validate themselves in __post_init__; remember where we are so
    # their range errors carry the full dotted key.
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate(prefix)
    return obj


def _close_matches(word: str, options: Iterable[str]) -> str | None:
    import difflib

    m = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return m[0] if m else None


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain nested dict (tuples become lists), for logging and checkpoints."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{'a': {'b': 1}}`` -> ``{'a.b': 1}`` (for MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


# --- range checks used by the sections' validate() methods -------------------------------


def check(cond: bool, key: str, value: Any, allowed: str) -> None:
    """Raise :class:`ConfigError` unless ``cond``."""
    if not cond:
        raise ConfigError(key, value, allowed)


def positive(prefix: str, obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        check(v > 0, f"{prefix}.{n}", v, "a number > 0")


def non_negative(prefix: str, obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        check(v >= 0, f"{prefix}.{n}", v, "a number >= 0")


def in_open_unit(prefix: str, obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        check(0 < v < 1, f"{prefix}.{n}", v, "a number strictly between 0 and 1")


def in_unit(prefix: str, obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        check(0 <= v <= 1, f"{prefix}.{n}", v, "a number between 0 and 1")


__all__ = [
    "ConfigError",
    "check",
    "flatten",
    "from_mapping",
    "in_open_unit",
    "in_unit",
    "non_negative",
    "positive",
    "to_dict",
]
