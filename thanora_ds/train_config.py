"""The run configuration of ``launchers/train.py``: one YAML/JSON file plus ``section.key=value`` overrides.

    model:     what to fine-tune (a Hugging Face directory, loaded with from_pretrained)
    data:      thanora_ds.data.DataConfig (sources, splits, mixing, validation)
    thanora:   thanora_ds.config.ThanoraConfig (the method)
    train:     optimization, schedule, checkpoints, logging
    deepspeed: which DeepSpeed JSON to start from and key overrides
    dist:      process-group settings (backend, timeout); NCCL/gloo environment is documented in the README
"""
from __future__ import annotations

import dataclasses
import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ThanoraConfig
from .data import DataConfig
from .typed_config import ConfigError, apply_overrides, from_dict, read_config_file

REPO_ROOT = Path(__file__).resolve().parent.parent
ATTENTION = ("auto", "sdpa", "eager", "flash_attention_2")
DTYPES = ("fp32", "bf16")


def flash_attention_available() -> bool:
    import importlib.util

    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


@dataclass
class ModelConfig:
    path: str = ""                        # Hugging Face model directory (from_pretrained)
    processor_path: str | None = None     # tokenizer / processor directory; default: path
    dtype: str = "fp32"                   # fp32 | bf16
    attn_implementation: str = "auto"     # auto: flash_attention_2 on CUDA with flash-attn installed, else sdpa
    activation_checkpointing: bool = True


@dataclass
class TrainingConfig:
    output_dir: str = "runs/thanora"
    micro_batch_size: int = 4             # per rank
    gradient_accumulation_steps: int = 1
    max_steps: int | None = None          # optimizer steps; or num_epochs (exactly one of the two)
    num_epochs: int | None = None         # passes over the training mixture (the sampler's epoch), see README
    lr: float = 2e-4
    projector_lr: float | None = None     # default: lr
    # false: no adapters are injected and HASI is skipped; only the multimodal projector trains (needs
    # thanora.train_projector: true), the language model and vision tower frozen: LLaVA-1.5's stage 1
    adapters: bool = True
    weight_decay: float = 0.0
    warmup_steps: int = 10
    min_lr_ratio: float = 0.0             # cosine decays to lr * min_lr_ratio
    max_grad_norm: float = 1.0            # 0 disables clipping
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    seed: int = 42
    save_every: int = 50                  # steps; 0 = only at the end and on SIGTERM/SIGUSR1
    keep_last: int = 2
    resume: str = "auto"                  # auto | never | a checkpoint directory
    stop_at_step: int = 0                 # checkpoint and exit 0 after this step (schedule still max_steps)
    log_every: int = 1
    eval_every: int = 0                   # steps between evaluations of the eval splits (and at the end); 0 = never
    eval_generate: bool = False           # also generate and score (each task's scorer), not only the eval loss
    eval_max_new_tokens: int = 128        # generation cap where data.tasks.<task>.max_new_tokens sets none
    preview_batch_size: int = 8           # HASI preview forward batch size (per rank)
    hasi_groups_per_pass: int = 0         # HASI statistics held for this many input groups at once (0 = all);
                                          # bounds initializer memory, see README "HASI memory"
    # experiment trackers, rank 0: tensorboard (OUTPUT/tensorboard), wandb, mlflow (thanora_ds/trackers.py); [] = none
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    run_name: str = ""                    # the trackers' run name; default: the output directory's name


@dataclass
class DeepSpeedOptions:
    config: str = "ds_configs/zero3.json"  # relative to the repository, the config file, or absolute
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted keys, e.g. zero_optimization.stage: 2


DIST_BACKENDS = ("auto", "nccl", "gloo")
TORCH_DISTRIBUTED_DEBUG = ("", "OFF", "INFO", "DETAIL")
NCCL_DEBUG = ("", "VERSION", "WARN", "INFO", "TRACE")


@dataclass
class DistConfig:
    """Process-group settings (docs/scale.md, "NCCL and gloo settings").

    The string keys set the named environment variable just before the process group starts, on every rank;
    left empty ("", the default) they leave the variable as the environment has it, so cluster-wide exports
    (module files, sbatch scripts) keep working and the library's own default applies when nothing is set.
    A value set here wins over the environment (the change is logged)."""
    backend: str = "auto"                  # auto: nccl on CUDA, gloo on CPU
    timeout_minutes: int = 30              # collective timeout, nccl and gloo alike (HASI on a 7B model needs
                                           # minutes on one rank; a hung peer is reported after this long)
    socket_ifname: str = ""                # NCCL_SOCKET_IFNAME and GLOO_SOCKET_IFNAME: the interface(s) for
                                           # bootstrap/socket traffic, e.g. "ib0", "eth0", "lo" (one host).
                                           # "^docker0,lo" (exclusion) is NCCL syntax: gloo is then left alone.
                                           # Unset: NCCL skips lo/docker*, gloo uses the address of the hostname
    nccl_debug: str = ""                   # NCCL_DEBUG: VERSION | WARN | INFO | TRACE (unset: errors only)
    nccl_debug_subsys: str = ""            # NCCL_DEBUG_SUBSYS, e.g. "INIT,NET" (unset: INIT,BOOTSTRAP,ENV)
    torch_distributed_debug: str = ""      # TORCH_DISTRIBUTED_DEBUG: OFF | INFO | DETAIL (collective checks;
                                           # DETAIL is slow, for a hang or mismatch hunt only)
    nccl_ib_disable: bool | None = None    # NCCL_IB_DISABLE: true = no InfiniBand, TCP sockets only
                                           # (null: NCCL uses IB when it finds it)
    env: dict[str, Any] = field(default_factory=dict)  # any other variable, set the same way, e.g.
                                           # {NCCL_NET_GDR_LEVEL: PHB, TORCH_NCCL_ASYNC_ERROR_HANDLING: 1}

    def __post_init__(self) -> None:
        if self.backend not in DIST_BACKENDS:
            raise ConfigError(f"dist.backend: unknown value {self.backend!r}; choose one of {list(DIST_BACKENDS)}")
        if not isinstance(self.timeout_minutes, int) or self.timeout_minutes < 1:
            raise ConfigError(f"dist.timeout_minutes: must be >= 1, got {self.timeout_minutes!r}")
        if self.nccl_debug.upper() not in NCCL_DEBUG:
            raise ConfigError(f"dist.nccl_debug: unknown value {self.nccl_debug!r}; choose one of {list(NCCL_DEBUG[1:])}")
        if self.torch_distributed_debug.upper() not in TORCH_DISTRIBUTED_DEBUG:
            raise ConfigError(f"dist.torch_distributed_debug: unknown value {self.torch_distributed_debug!r}; "
                              f"choose one of {list(TORCH_DISTRIBUTED_DEBUG[1:])}")
        for key in self.env:
            if not str(key).replace("_", "").isalnum():
                raise ConfigError(f"dist.env: {key!r} is not an environment variable name")

    def environment(self) -> dict[str, str]:
        """The variables these settings set (only the non-empty ones)."""
        out: dict[str, str] = {}
        if self.socket_ifname:
            out["NCCL_SOCKET_IFNAME"] = self.socket_ifname
            if not self.socket_ifname.startswith("^") and not self.socket_ifname.startswith("="):
                out["GLOO_SOCKET_IFNAME"] = self.socket_ifname
        if self.nccl_debug:
            out["NCCL_DEBUG"] = self.nccl_debug.upper()
        if self.nccl_debug_subsys:
            out["NCCL_DEBUG_SUBSYS"] = self.nccl_debug_subsys
        if self.torch_distributed_debug:
            out["TORCH_DISTRIBUTED_DEBUG"] = self.torch_distributed_debug.upper()
        if self.nccl_ib_disable is not None:
            out["NCCL_IB_DISABLE"] = "1" if self.nccl_ib_disable else "0"
        for key, value in self.env.items():
            out[str(key)] = ("1" if value else "0") if isinstance(value, bool) else str(value)
        return out


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    thanora: ThanoraConfig = field(default_factory=ThanoraConfig)
    train: TrainingConfig = field(default_factory=TrainingConfig)
    deepspeed: DeepSpeedOptions = field(default_factory=DeepSpeedOptions)
    dist: DistConfig = field(default_factory=DistConfig)
    config_dir: str = "."

    def validate(self) -> None:
        """Checks between sections and against the files named (model folder, DeepSpeed JSON); no side effects
        beyond resolving ``attn_implementation: auto``."""
        m, t = self.model, self.train
        if not m.path:
            raise ConfigError("model.path: required (a Hugging Face model directory)")
        if not Path(m.path).is_dir():
            raise ConfigError(f"model.path: {m.path} is not a directory")
        if not (Path(m.path) / "config.json").is_file():
            raise ConfigError(f"model.path: {m.path} has no config.json (not a Hugging Face model folder: "
                              "save one with save_pretrained)")
        if m.processor_path and not Path(m.processor_path).is_dir():
            raise ConfigError(f"model.processor_path: {m.processor_path} is not a directory")
        from .models import family_of_path

        family = family_of_path(m.path, "model.path")   # a refused family stops here, before anything loads
        if m.dtype not in DTYPES:
            raise ConfigError(f"model.dtype: unknown value {m.dtype!r}; choose one of {list(DTYPES)}")
        if m.attn_implementation not in ATTENTION:
            raise ConfigError(f"model.attn_implementation: unknown value {m.attn_implementation!r}; "
                              f"choose one of {list(ATTENTION)}")
        if m.attn_implementation == "flash_attention_2" and not flash_attention_available():
            raise ConfigError("model.attn_implementation: flash_attention_2 needs flash-attn and a CUDA GPU, "
                              "which this machine lacks (pip install -e .[gpu] on a CUDA machine); use sdpa or auto")
        if m.attn_implementation == "auto":
            m.attn_implementation = "flash_attention_2" if flash_attention_available() else "sdpa"
        if not self.data.sources:
            raise ConfigError("data.sources: empty; name at least one data file")
        if (t.max_steps is None) == (t.num_epochs is None):
            raise ConfigError("train.max_steps / train.num_epochs: set exactly one of them (got "
                              f"max_steps={t.max_steps}, num_epochs={t.num_epochs})")
        if t.num_epochs is not None and t.num_epochs < 1:
            raise ConfigError(f"train.num_epochs: must be >= 1, got {t.num_epochs}")
        if t.max_steps is not None and t.max_steps < 1:
            raise ConfigError(f"train.max_steps: must be >= 1, got {t.max_steps}")
        for key in ("micro_batch_size", "gradient_accumulation_steps", "keep_last", "log_every",
                    "preview_batch_size", "eval_max_new_tokens"):
            if getattr(t, key) < 1:
                raise ConfigError(f"train.{key}: must be >= 1, got {getattr(t, key)}")
        for key in ("lr", "weight_decay", "warmup_steps", "max_grad_norm", "save_every", "hasi_groups_per_pass",
                    "stop_at_step", "eval_every"):
            if getattr(t, key) < 0:
                raise ConfigError(f"train.{key}: must be >= 0, got {getattr(t, key)}")
        if t.projector_lr is not None and not t.projector_lr > 0:
            raise ConfigError(f"train.projector_lr: must be > 0, got {t.projector_lr}")
        if not 0 <= t.min_lr_ratio <= 1:
            raise ConfigError(f"train.min_lr_ratio: must be in [0, 1], got {t.min_lr_ratio}")
        if len(t.adam_betas) != 2 or not all(0 <= b < 1 for b in t.adam_betas):
            raise ConfigError(f"train.adam_betas: two numbers in [0, 1), got {t.adam_betas}")
        if not t.adam_eps > 0:
            raise ConfigError(f"train.adam_eps: must be > 0, got {t.adam_eps}")
        if t.resume not in ("auto", "never") and not Path(t.resume).is_dir():
            raise ConfigError(f"train.resume: {t.resume!r} is neither auto, never nor a checkpoint directory")
        from .trackers import REPORT_TO
        unknown = [r for r in t.report_to if r not in REPORT_TO]
        if unknown:
            raise ConfigError(f"train.report_to: unknown tracker(s) {unknown}; choose from {list(REPORT_TO)}")
        for name, module in (("wandb", "wandb"), ("mlflow", "mlflow")):
            if name in t.report_to and importlib.util.find_spec(module) is None:
                raise ConfigError(f"train.report_to: {name} is not installed (pip install -e .[trackers])")
        if not t.adapters and not self.thanora.train_projector:
            raise ConfigError("train.adapters: false leaves nothing to train unless thanora.train_projector is true "
                              "(projector-only training, LLaVA stage 1)")
        if not t.adapters and family.projector_name is None:
            raise ConfigError(f"train.adapters: false trains the multimodal projector alone, but {m.path} is not a "
                              "multimodal (LLaVA) model: it has no projector")
        if self.thanora.train_projector is False and t.projector_lr is not None:
            raise ConfigError("train.projector_lr: set, but thanora.train_projector is false")
        self.thanora.validate()
        self.deepspeed_template()

    def deepspeed_path(self) -> Path:
        candidates = [Path(self.deepspeed.config), Path(self.config_dir) / self.deepspeed.config,
                      REPO_ROOT / self.deepspeed.config]
        for c in candidates:
            if c.is_file():
                return c
        raise ConfigError(f"deepspeed.config: {self.deepspeed.config} not found (looked in "
                          f"{', '.join(str(c.parent) for c in candidates)})")

    def deepspeed_template(self) -> dict:
        """The DeepSpeed JSON with ``deepspeed.overrides`` applied, checked against DeepSpeed's schema."""
        import json

        from .ds_config import check_deepspeed_config, with_overrides

        path = self.deepspeed_path()
        try:
            template = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            where = f"{path}:{err.lineno}" if isinstance(err, json.JSONDecodeError) else str(path)
            raise ConfigError(f"deepspeed.config: {where}: not valid JSON ({getattr(err, 'msg', err)})") from None
        if not isinstance(template, dict):
            raise ConfigError(f"deepspeed.config: {path}: the top level must be a JSON object")
        try:
            check_deepspeed_config(template, f"deepspeed.config ({path})")
            check_deepspeed_config(with_overrides({}, self.deepspeed.overrides), "deepspeed.overrides")
            merged = with_overrides(template, self.deepspeed.overrides)
            check_deepspeed_config(merged, f"deepspeed.config ({path}) with deepspeed.overrides")
        except ValueError as err:
            raise ConfigError(str(err)) from None
        return merged

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def resolve_hub_id(repo_id: str, key: str) -> str:
    """The local snapshot folder of a hub model ID from the Hugging Face cache (HF_HOME / HF_HUB_CACHE), never
    downloading: N ranks fetching gigabytes at start-up is a mistake on a cluster, and air-gapped nodes
    (HF_HUB_OFFLINE=1) have no hub at all."""
    import os

    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except LocalEntryNotFoundError:
        offline = " (HF_HUB_OFFLINE=1)" if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") else ""
        raise ConfigError(f"{key}: {repo_id!r} is not a local folder, and as a Hugging Face hub ID it is not in the "
                          f"cache {HF_HUB_CACHE}{offline}: download it once, on a machine with network, with "
                          f"`hf download {repo_id}` (the same HF_HOME on every node), or give a local folder") from None


def load_train_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Read the file, apply overrides, build and validate the typed config (no model or data loaded)."""
    raw = read_config_file(path) if path else {}
    raw = apply_overrides(raw, list(overrides))
    base_dir = Path(path).resolve().parent if path else Path.cwd()
    data = DataConfig.from_dict(raw.pop("data", None), base_dir=base_dir)
    raw.pop("config_dir", None)
    cfg = from_dict(TrainConfig, raw)
    cfg.data = data
    cfg.config_dir = str(base_dir)
    model = cfg.model
    for key in ("path", "processor_path"):
        value = getattr(model, key)
        if value and not Path(value).is_absolute():
            # relative to the working directory if it exists there (CLI habit), else to the config file; a hub ID
            # (org/name) that is neither is looked up in the Hugging Face cache
            here, there = Path.cwd() / value, base_dir / value
            local = here if here.exists() else there
            if not local.exists() and HUB_ID.fullmatch(value):
                setattr(model, key, resolve_hub_id(value, f"model.{key}"))
            else:
                setattr(model, key, str(local.resolve()))
    if not Path(cfg.train.output_dir).is_absolute():
        cfg.train.output_dir = str(Path.cwd() / cfg.train.output_dir)
    cfg.validate()
    return cfg
