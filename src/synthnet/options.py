"""Typed, documented options with their ranges: the one place each setting's default, meaning and bounds
are written.

Library settings classes (:class:`synthnet.methods.imitation.ImitationSettings`, the targets', tasks'
and rewards' option classes, the zoo's :class:`synthnet.zoo.training.Recipe`) declare every field with
:func:`option`; their ``__post_init__`` calls :func:`check_options`. The packaged Hydra config is built
from the same classes (``synthnet/configs/schema.py``), so a value out of range is refused when the
config is composed, with the key's full name, and by the library when it is called directly.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

from synthnet.errors import SynthNetError


def option(default: Any, help: str, *, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False, choices: Sequence[Any] | None = None,
           each: bool = False) -> Any:
    """A dataclass field with its help text and range: ``low <= value <= high`` (``<`` where open),
    one of ``choices``; ``each`` applies the range to every element of a list. ``None`` is always
    allowed where the default is ``None`` (the field's meaning for it is in ``help``)."""
    metadata = {"help": help, "low": low, "high": high, "low_open": low_open, "high_open": high_open,
                "choices": tuple(choices) if choices is not None else None, "each": each}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def help_of(f: dataclasses.Field) -> str:
    return f.metadata.get("help", "")


def _describe(meta: Mapping[str, Any]) -> str:
    if meta.get("choices") is not None:
        return "one of " + ", ".join(map(str, meta["choices"]))
    low, high = meta.get("low"), meta.get("high")
    if low is not None and high is not None:
        return f"in {'(' if meta['low_open'] else '['}{low}, {high}{')' if meta['high_open'] else ']'}"
    if low is not None:
        return f"{'>' if meta['low_open'] else '>='} {low}"
    return f"{'<' if meta['high_open'] else '<='} {high}"


def check_value(key: str, value: Any, meta: Mapping[str, Any]) -> None:
    """Refuse ``value`` of option ``key`` (full name, e.g. ``method.lr``) outside ``meta``'s range."""
    if value is None or not meta:
        return
    values = list(value) if meta.get("each") and isinstance(value, (list, tuple)) else [value]
    if meta.get("choices") is not None:
        if any(v not in meta["choices"] for v in values):
            raise SynthNetError(f"{key} must be {_describe(meta)}, got {value!r}")
        return
    low, high = meta.get("low"), meta.get("high")
    if low is None and high is None:
        return
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not math.isfinite(v)):
            raise SynthNetError(f"{key} must be a finite number {_describe(meta)}, got {value!r}")
        if low is not None and (v < low or (meta["low_open"] and v == low)):
            raise SynthNetError(f"{key} must be {_describe(meta)}, got {value!r}")
        if high is not None and (v > high or (meta["high_open"] and v == high)):
            raise SynthNetError(f"{key} must be {_describe(meta)}, got {value!r}")


def check_options(obj: Any, prefix: str) -> None:
    """Check every :func:`option` field of the dataclass instance ``obj``; errors name ``prefix + field``."""
    for f in dataclasses.fields(obj):
        check_value(prefix + f.name, getattr(obj, f.name), f.metadata)


def build_options(cls: type, values: Mapping[str, Any], prefix: str, *, ignore: Sequence[str] = ("name",)) -> Any:
    """``cls(**values)`` (missing keys take their defaults), refusing unknown keys by their full name."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known - set(ignore))
    if unknown:
        raise SynthNetError(f"unknown option {prefix}{unknown[0]}; available: {', '.join(sorted(known))}")
    return cls(**{k: v for k, v in values.items() if k in known})
