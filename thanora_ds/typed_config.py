"""The one config loader: nested dataclasses from YAML/JSON mappings and ``section.key=value`` overrides.

Every section of a run config (model, data, thanora, train, deepspeed, dist) is a dataclass loaded by
``from_dict``, which checks each value against the field's type annotation and names the full dotted key in
every error (``data.preview_samples: expected int, got 8.5``). Types are coerced only where no reading is
ambiguous: an int where a float is wanted, and a string that spells a number where a float is wanted (YAML 1.1
reads ``1e-3`` as a string). Strings are never read as booleans (``"false"`` is refused, not taken as true),
floats never as ints, and NaN or infinity is refused everywhere, also inside free-form mappings: a NaN
``spr_lambda`` or ``max_grad_norm`` would silently switch SPR or clipping off. A dataclass may define
``check_values(prefix)`` for checks between fields; it runs right after the dataclass is built. Loading has no side
effects: nothing is created, read beyond the config file, or set in the environment.
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown or impossible; the message names the key."""


def join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def check_finite(value: Any, key: str) -> None:
    """Refuse NaN / infinity anywhere inside ``value`` (numbers, lists, mappings)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: must be a finite number, got {value!r}")
    if isinstance(value, dict):
        for k, v in value.items():
            check_finite(v, join(key, k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_finite(v, f"{key}[{i}]")


def _type_name(value: Any) -> str:
    return "a string" if isinstance(value, str) else type(value).__name__


def coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` as type ``tp`` (a dataclass, scalar, list[...], dict[...] or Optional of one), else ConfigError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], key)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if tp is Any:
        check_finite(value, key)
        return value
    if tp is float:
        if isinstance(value, str):
            try:  # YAML 1.1 reads 1e-3 (no dot) as a string
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        elif isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, float):
            raise ConfigError(f"{key}: expected a number, got {_type_name(value)} {value!r}")
        check_finite(value, key)
        return value
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {_type_name(value)} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {_type_name(value)} {value!r}"
                              + (" (remove the quotes)" if isinstance(value, str) else ""))
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {_type_name(value)} {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {_type_name(value)} {value!r}")
        return [coerce(v, args[0], f"{key}[{i}]") if args else v for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {_type_name(value)} {value!r}")
        return {str(k): coerce(v, args[1], join(key, k)) if args else v for k, v in value.items()}
    return value


def from_dict(cls: type, data: dict | None, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data`` (unknown keys and wrong types raise ConfigError naming the key),
    then run its ``check_values(prefix)`` if it has one."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or cls.__name__}: expected a mapping, got {_type_name(data)} {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(str(k) for k in set(data) - set(names))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(join(prefix, k) for k in unknown)}; "
                          f"known: {', '.join(sorted(names))}")
    kwargs = {k: coerce(v, hints[k], join(prefix, k)) for k, v in data.items()}
    try:
        obj = cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:  # a __post_init__ check
        raise ConfigError(f"{prefix or cls.__name__}: {err}") from err
    if hasattr(obj, "check_values"):
        obj.check_values(prefix)
    return obj


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` strings (values parsed as YAML: 8, 1e-3, true, [q_proj, v_proj], null)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({err})") from None
    return data


def read_config_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err})") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {_type_name(data)}")
    return data
