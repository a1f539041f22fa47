"""Dataclasses stored as JSON (:class:`DictIO`) and the one "built-in name or JSON file" rule (:func:`name_or_json`).

Torch-free on purpose: :mod:`hpvit.config` builds its presets on these, and the command line reads the preset
registry to write its ``--help`` without importing torch. :mod:`hpvit.utils` re-exports both names.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, ClassVar

from .errors import ConfigError, HPViTError


class DictIO:
    """Mixin for dataclasses stored as JSON: ``to_dict``, ``to_json``, ``from_dict`` and ``replace``.

    ``from_dict`` / ``replace`` refuse unknown keys, naming them and the valid ones (raised as the class's
    ``_dict_error``); ``from_dict`` skips keys that start with ``_`` (``"_comment"`` documents a JSON file) and
    turns JSON lists back into tuples for fields declared as tuples. Both end with :meth:`_check`, which a
    subclass overrides to validate the built object.
    """

    _dict_error: ClassVar[type[HPViTError]] = ConfigError
    _dict_what: ClassVar[str] = "config field"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def _refuse_unknown(cls, keys, where: str = "") -> None:
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        bad = sorted(set(keys) - names)
        if bad:
            pre = f"{where}: " if where else ""
            kind = cls._dict_what.split()[-1]
            raise cls._dict_error(f"{pre}unknown {cls._dict_what}(s) {bad}; valid {kind}s are {sorted(names)}")

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = ""):
        d = {k: v for k, v in d.items() if not str(k).startswith("_")}
        cls._refuse_unknown(d, where)
        hints = typing.get_type_hints(cls)
        d = {k: tuple(v) if isinstance(v, list) and _is_tuple_type(hints.get(k)) else v for k, v in d.items()}
        obj = cls(**d)
        obj._check(where)
        return obj

    def replace(self, **changes: Any):
        """A copy with some fields changed (unknown fields are refused)."""
        self._refuse_unknown(changes)
        obj = dataclasses.replace(self, **changes)  # type: ignore[type-var]
        obj._check()
        return obj

    def _check(self, where: str = "") -> None:
        """Validate a freshly built object (default: nothing to check)."""


def _is_tuple_type(tp: Any) -> bool:
    if tp is None:
        return False
    if typing.get_origin(tp) is tuple or tp is tuple:
        return True
    return any(_is_tuple_type(a) for a in typing.get_args(tp))


def name_or_json(value: "str | os.PathLike", names: "list[str]", kind: str) -> "tuple[str, dict[str, Any] | None]":
    """The one "built-in name or JSON file" rule of hpvit (presets, recipes): ``(name, None)`` when ``value``
    names a built-in (one of ``names``), else ``(where, fields)`` read from the JSON file ``value`` (which must
    hold a JSON object). ``kind`` ("config", "recipe") goes into the errors, which list the built-in names."""
    s = os.fspath(value)
    if s in names:
        return s, None
    p = Path(s)
    if not (s.endswith(".json") or p.exists()):
        raise ConfigError(f"unknown {kind} {s!r}; choose from {sorted(names)} or pass a JSON file path")
    if not p.is_file():
        raise ConfigError(f"{kind} file {p} does not exist; give a JSON file or one of {sorted(names)}")
    try:
        d = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: not a valid JSON {kind.split()[0]} ({e})") from e
    if not isinstance(d, dict):
        raise ConfigError(f"{p}: expected a JSON object of {kind} fields")
    return str(p), d


def field_type_problems(obj: Any) -> list[str]:
    """``"key: expected TYPE, got VALUE"`` for each field of the dataclass ``obj`` whose value does not have its
    declared type (int, float, bool, str, None, tuples of those; an int is a valid float, NaN and inf are not;
    other types unchecked)."""
    hints = typing.get_type_hints(type(obj))
    out = []
    for f in dataclasses.fields(obj):
        tp, v = hints.get(f.name), getattr(obj, f.name)
        if tp is not None and _fits(v, tp) is False:
            out.append(f"{f.name}: expected {_type_name(tp)}, got {v!r}")
    return out


def _fits(v: Any, tp: Any) -> "bool | None":
    """Whether ``v`` has type ``tp``; None when ``tp`` is not one :func:`field_type_problems` checks."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        res = [_fits(v, a) for a in args]
        return True if any(r is True for r in res) else (None if None in res else False)
    if tp is type(None):
        return v is None
    if tp is bool:
        return isinstance(v, bool)
    if tp is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if tp is float:  # a finite number: NaN and inf pass every range check written as a comparison
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if tp is str:
        return isinstance(v, str)
    if origin is tuple:
        if not isinstance(v, (tuple, list)):
            return False
        items = args[:1] * len(v) if len(args) == 2 and args[1] is Ellipsis else args
        if len(items) != len(v):
            return False
        res = [_fits(x, a) for x, a in zip(v, items)]
        return False if False in res else True
    return None


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "").replace("NoneType", "null")
