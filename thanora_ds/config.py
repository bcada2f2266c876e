"""Typed configuration: dataclasses loadable from YAML/JSON, with ``section.key=value`` CLI overrides.

Every error names the offending key with its full dotted path (``thanora.rank``), and all checks run before
any model or data is loaded.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .hasi import ALLOCATIONS, SPECTRA
from .spr import SPR_TERMS

MODES = ("orthogonal", "corda", "random")
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class ConfigError(ValueError):
    """A configuration value is missing, unknown or impossible; the message names the key."""


@dataclass
class ThanoraConfig:
    """The method's settings (METHOD.md); defaults follow METHOD.md until the benchmark settles them."""

    rank: int = 16                      # r, total LoRA rank per target layer
    alpha: float = 32.0                 # s = alpha / r (rsLoRA: alpha / sqrt(r))
    rslora: bool = False
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    shared_rank: int | None = None      # r_c; None = floor(r / (T + 1)); 0 allowed
    mode: str = "orthogonal"            # orthogonal | corda | random
    allocation: str = "scaled_softmax"  # scaled_softmax | softmax | proportional | uniform
    tau: float = 3.0
    min_rank: int = 1
    gamma: float = 1.0
    spectrum: str = "weighted"          # weighted: W (C + delta I); covariance: C alone
    spr_lambda: float = 1e-3
    spr_normalize: bool = True
    spr_terms: str = "both"             # both | A | B
    train_projector: bool = False       # LLaVA: train the multimodal projector fully
    init_seed: int = 0                  # seed of the random (shared-block / mode=random) initializations

    def resolved_shared_rank(self, num_tasks: int) -> int:
        return self.rank // (num_tasks + 1) if self.shared_rank is None else self.shared_rank

    def validate(self, num_tasks: int | None = None, prefix: str = "thanora") -> None:
        def bad(key: str, msg: str) -> ConfigError:
            return ConfigError(f"{prefix}.{key}: {msg}")

        if self.rank < 1:
            raise bad("rank", f"must be >= 1, got {self.rank}")
        for key, options in (("mode", MODES), ("allocation", ALLOCATIONS), ("spectrum", SPECTRA),
                             ("spr_terms", SPR_TERMS)):
            if getattr(self, key) not in options:
                raise bad(key, f"unknown value {getattr(self, key)!r}; choose one of {list(options)}")
        for key in ("spr_lambda", "tau", "alpha"):
            if getattr(self, key) < 0:
                raise bad(key, f"must be >= 0, got {getattr(self, key)}")
        if self.tau == 0 and self.allocation in ("scaled_softmax", "softmax"):
            raise bad("tau", "must be > 0 for softmax allocations")
        if not 0 <= self.dropout < 1:
            raise bad("dropout", f"must be in [0, 1), got {self.dropout}")
        if self.min_rank < 0:
            raise bad("min_rank", f"must be >= 0, got {self.min_rank}")
        if self.shared_rank is not None and self.shared_rank < 0:
            raise bad("shared_rank", f"must be >= 0, got {self.shared_rank}")
        if not self.targets:
            raise bad("targets", "is empty: name at least one linear layer (e.g. q_proj)")
        if num_tasks is not None:
            if num_tasks < 1:
                raise ConfigError("no tasks: the data defines no task (data.sources / data.tasks)")
            r_c = self.resolved_shared_rank(num_tasks)
            need = num_tasks * self.min_rank + r_c
            if need > self.rank:
                raise bad("rank", f"r={self.rank} is too small for {num_tasks} tasks at min_rank={self.min_rank} "
                                  f"plus a shared block of {r_c}: need r >= {need}")


# --------------------------------------------------------------------------------------------------------
# Generic loading of nested dataclasses from dicts, files and overrides.

def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-3 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") if args else v for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {k: _coerce(v, args[1], f"{key}.{k}") if args else v for k, v in value.items()}
    return value


def from_dict(cls: type, data: dict | None, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError naming the key."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or cls.__name__}: expected a mapping, got {data!r}")
    if hasattr(cls, "from_config_dict"):
        return cls.from_config_dict(data, prefix)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(_join(prefix, k) for k in unknown)}; "
                          f"known: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(v, hints[k], _join(prefix, k)) for k, v in data.items()}
    return cls(**kwargs)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


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
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return data


def read_config_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data
