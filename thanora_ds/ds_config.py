"""The DeepSpeed JSON of a run: ``"auto"`` values filled from the run config, dotted-key overrides, and the check of
every key and value against DeepSpeed's own config schema before anything starts."""
from __future__ import annotations

from typing import Any

from .distributed import world_size


def _set_dotted(config: dict, key: str, value: Any) -> None:
    node = config
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def with_overrides(config: dict, overrides: dict | None) -> dict:
    """A copy of ``config`` with dotted-key overrides (``zero_optimization.stage: 2``) applied."""
    import copy

    config = copy.deepcopy(config)
    for key, value in (overrides or {}).items():
        _set_dotted(config, key, value)
    return config


def fill_deepspeed_config(template: dict, *, micro_batch_size: int, grad_accum: int, clip: float, bf16: bool,
                          hidden_size: int, overrides: dict | None = None) -> dict:
    """Replace the "auto" values of a DeepSpeed JSON with those of the run (as the HF Trainer does), then apply
    dotted-key overrides. Any "auto" left is an error naming its key."""
    import copy
    import json

    config = copy.deepcopy(template)
    auto = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * world_size(),
        "gradient_clipping": clip,
        "bf16.enabled": bf16,
        "zero_optimization.reduce_bucket_size": hidden_size * hidden_size,
        "zero_optimization.allgather_bucket_size": hidden_size * hidden_size,
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "zero_optimization.stage3_param_persistence_threshold": 10 * hidden_size,
    }
    for key, value in auto.items():
        node = config
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict) and node.get(parts[-1]) == "auto":
            node[parts[-1]] = value
    config = with_overrides(config, overrides)
    left = [k for k in _dotted_keys(config) if _get_dotted(config, k) == "auto"]
    if left:
        raise ValueError(f"deepspeed config: no value for \"auto\" key(s) {left}; set them in deepspeed.overrides")
    json.dumps(config)  # must stay serializable
    return config


# DeepSpeed sections with a pydantic model (extra keys forbidden): a misspelt key there is an error, as in DeepSpeed.
_SECTION_MODELS = {
    "zero_optimization": ("deepspeed.runtime.zero.config", "DeepSpeedZeroConfig"),
    "bf16": ("deepspeed.runtime.precision_config", "DeepSpeedBF16Config"),
    "fp16": ("deepspeed.runtime.precision_config", "DeepSpeedFP16Config"),
    "tensorboard": ("deepspeed.monitor.config", "TensorBoardConfig"),
    "wandb": ("deepspeed.monitor.config", "WandbConfig"),
    "csv_monitor": ("deepspeed.monitor.config", "CSVConfig"),
    "comet": ("deepspeed.monitor.config", "CometConfig"),
    "comms_logger": ("deepspeed.comm.config", "CommsLoggerConfig"),
    "compile": ("deepspeed.compile.config", "CompileConfig"),
}
# modules whose string constants name DeepSpeed's config keys (DeepSpeed itself ignores unknown top-level keys)
_KEY_MODULES = ("deepspeed.runtime.constants", "deepspeed.runtime.zero.constants", "deepspeed.profiling.constants",
                "deepspeed.elasticity.constants", "deepspeed.autotuning.constants", "deepspeed.compression.constants",
                "deepspeed.runtime.data_pipeline.constants", "deepspeed.nebula.constants",
                "deepspeed.checkpoint.constants", "deepspeed.runtime.activation_checkpointing.config",
                "deepspeed.runtime.swap_tensor.constants", "deepspeed.monitor.config")


def _deepspeed_top_level_keys() -> set[str]:
    import importlib
    import re

    keys = set(_SECTION_MODELS)
    for name in _KEY_MODULES:
        try:
            module = importlib.import_module(name)
        except Exception:  # a DeepSpeed build without that feature
            continue
        keys |= {v for k, v in vars(module).items() if k.isupper() and isinstance(v, str) and re.fullmatch(r"[a-z_0-9]+", v)}
    return keys


def check_deepspeed_config(config: dict, where: str) -> None:
    """Check the keys and values of a DeepSpeed config against DeepSpeed's own schema before anything starts: an
    unknown top-level key (which DeepSpeed would silently ignore) and any key or value its pydantic section models
    refuse raise ValueError naming the dotted key. ``"auto"`` values (filled later from the run) are not checked."""
    import difflib
    import importlib

    known = _deepspeed_top_level_keys()
    for key, value in config.items():
        if key not in known:
            near = difflib.get_close_matches(key, sorted(known), n=1)
            raise ValueError(f"{where}: {key}: not a DeepSpeed config key (DeepSpeed would ignore it)"
                             + (f"; did you mean {near[0]}?" if near else ""))
        if key not in _SECTION_MODELS or not isinstance(value, dict):
            continue
        module, cls_name = _SECTION_MODELS[key]
        try:
            model = getattr(importlib.import_module(module), cls_name)
        except (ImportError, AttributeError):
            continue
        fields = {n for n, f in model.model_fields.items()} | {f.alias for f in model.model_fields.values() if f.alias}
        for sub in value:
            if sub not in fields:
                near = difflib.get_close_matches(sub, sorted(fields), n=1)
                raise ValueError(f"{where}: {key}.{sub}: not a key of DeepSpeed's {key} section"
                                 + (f"; did you mean {key}.{near[0]}?" if near else ""))
        try:
            model(**{k: v for k, v in value.items() if v != "auto"})
        except Exception as err:  # pydantic.ValidationError: name the first offending key
            errors = getattr(err, "errors", lambda: [])()
            loc = ".".join(str(p) for p in errors[0]["loc"]) if errors else ""
            msg = errors[0]["msg"] if errors else str(err)
            raise ValueError(f"{where}: {key}{'.' + loc if loc else ''}: {msg}") from None


def _dotted_keys(config: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in config.items():
        full = f"{prefix}.{k}" if prefix else k
        keys += _dotted_keys(v, full) if isinstance(v, dict) else [full]
    return keys


def _get_dotted(config: dict, key: str) -> Any:
    for part in key.split("."):
        config = config[part]
    return config


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))
