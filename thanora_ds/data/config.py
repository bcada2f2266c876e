"""The `data:` section of a run config.

Plain dataclasses, so that a config can be built in code (tests) or from YAML/JSON
(`DataConfig.from_dict`, which goes through the project's one typed loader, `typed_config.from_dict`:
unknown keys, wrong types and non-finite numbers are errors naming the key), and written back with
`to_dict` next to a checkpoint. A misspelt `skip_invalid` silently left at its default, or the string
"false" read as true, is exactly the kind of mistake that costs a training run.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from ..typed_config import ConfigError, from_dict

FORMATS = ("auto", "llava", "chat", "prompt_response")
MIXINGS = ("natural", "temperature", "weights")
ASPECT_RATIOS = ("processor", "pad")
SOURCE_SPLITS = ("all", "train", "eval")


@dataclass
class SourceConfig:
    """One data file. `task` set here names the task of every record in the file; otherwise each
    record's own `task` field does."""

    path: str
    format: str = "auto"
    task: Optional[str] = None
    # which splits the file feeds: all (train, preview and a carved-out eval split), train (train and preview
    # only), eval (the task's eval split is then exactly the records of its eval sources: a benchmark's test set)
    split: str = "all"
    # records without a `task` field (LLaVA-665K): name the task by a rule instead of splitting the file by hand.
    # "image_folder": the first folder of the record's `image` path (coco/train2017/1.jpg -> coco), `text_task`
    # for records without an image; "field:NAME": the value of the record's field NAME. `task_map` renames or
    # merges what the rule gives ({ocr_vqa: ocr, textvqa: ocr}). A record's own `task` field still wins.
    task_from: Optional[str] = None
    text_task: str = "text"
    task_map: dict[str, str] = field(default_factory=dict)

    def check_values(self, prefix: str = "data.sources[?]") -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"{prefix}.format: {self.format!r} is not one of {FORMATS} ({self.path})")
        if self.task is not None and (not isinstance(self.task, str) or not self.task.strip()):
            raise ConfigError(f"{prefix}.task: must be a non-empty string, got {self.task!r} ({self.path})")
        if self.task_from is not None and self.task is not None:
            raise ConfigError(f"{prefix}.task_from: set together with {prefix}.task; use one of them ({self.path})")
        if self.task_from is not None and not (self.task_from == "image_folder"
                                               or (self.task_from.startswith("field:") and self.task_from[6:])):
            raise ConfigError(f"{prefix}.task_from: {self.task_from!r} is neither 'image_folder' nor 'field:NAME' "
                              f"({self.path})")
        if self.split not in SOURCE_SPLITS:
            raise ConfigError(f"{prefix}.split: {self.split!r} is not one of {SOURCE_SPLITS} ({self.path})")


@dataclass
class TaskConfig:
    """Per-task settings. `weight` is used by `mixing: weights`; `scorer`, `choices` (the answer options of a
    `multiple_choice` task; default: the distinct reference answers of its eval split) and `max_new_tokens`
    (generation cap of this task; default: the evaluator's own) by evaluation."""

    weight: Optional[float] = None
    scorer: str = "exact_match"
    choices: Optional[list[str]] = None
    max_new_tokens: Optional[int] = None

    def check_values(self, prefix: str = "data.tasks.?") -> None:
        from ..scorers import SCORERS

        if self.scorer not in SCORERS:
            raise ConfigError(f"{prefix}.scorer: unknown scorer {self.scorer!r}; choose one of {sorted(SCORERS)}")
        if self.weight is not None and not self.weight >= 0:
            raise ConfigError(f"{prefix}.weight: must be >= 0, got {self.weight}")
        if self.max_new_tokens is not None and not self.max_new_tokens >= 1:
            raise ConfigError(f"{prefix}.max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        if self.choices is not None and len(set(self.choices)) < 2:
            raise ConfigError(f"{prefix}.choices: a multiple-choice task needs at least 2 distinct choices, "
                              f"got {self.choices!r}")


@dataclass
class DataConfig:
    """Where the data is and how it is split, validated and mixed (see docs of each field)."""

    sources: list[SourceConfig] = field(default_factory=list)
    # if non-empty, the closed list of tasks: a record with another task is an "unknown task" error
    tasks: dict[str, TaskConfig] = field(default_factory=dict)
    image_folder: Optional[str] = None  # LLaVA `image` paths are relative to it (else to the data file)
    # processor: the image processor's own resize/crop; pad: LLaVA-1.5's `image_aspect_ratio pad`, the image padded
    # to a square with the processor's mean colour first (nothing of a wide image is cropped away)
    image_aspect_ratio: str = "processor"
    max_length: int = 512  # longer examples are truncated; one with no label left is an error
    # N_t for the HASI preview, capped by the task's size. METHOD.md says 128; 32 is the default here because it
    # already fixes the rank split (METHOD.md section 6) and the quality benchmark found no gain from more
    # previews (N_t 4 / 16 / 64; docs/quality.md), while HASI's cost grows linearly with N_t.
    preview_samples: int = 32
    eval_samples: int = 32  # per task
    seed: int = 0
    mixing: str = "natural"
    temperature: float = 2.0  # p_t proportional to n_t ** (1 / temperature)
    skip_invalid: bool = False
    max_errors: int = 50  # problems listed in one DataValidationError (all are counted)
    # read files as a stream instead of first converting them to a cached Arrow copy on disk; the
    # validated records and token ids are still held in memory (splits need every record)
    streaming: bool = False
    # the validated, tokenized data is cached on disk (data/cache.py) and reused by every later start with the same
    # data files, tokenizer/processor and encoding settings (a SLURM requeue starts in seconds); false: always rebuild
    cache: bool = True
    # where: default $THANORA_DATA_CACHE, else $XDG_CACHE_HOME/thanora_ds/data (~/.cache/thanora_ds/data); an entry
    # of LLaVA-665K takes a few GB, so point it at a scratch filesystem (shared between nodes) where home is small
    cache_dir: Optional[str] = None

    def __post_init__(self):
        self.sources = [s if isinstance(s, SourceConfig) else SourceConfig(**s) for s in self.sources]
        self.tasks = {
            str(k): (v if isinstance(v, TaskConfig) else TaskConfig(**(v or {}))) for k, v in self.tasks.items()
        }
        self.check_values()

    def check_values(self, prefix: str = "data") -> None:
        def bad(key: str, msg: str) -> ConfigError:
            return ConfigError(f"{prefix}.{key}: {msg}")

        if self.mixing not in MIXINGS:
            raise bad("mixing", f"{self.mixing!r} is not one of {MIXINGS}")
        if self.image_aspect_ratio not in ASPECT_RATIOS:
            raise bad("image_aspect_ratio", f"{self.image_aspect_ratio!r} is not one of {ASPECT_RATIOS}")
        if not self.temperature > 0:
            raise bad("temperature", f"must be > 0, got {self.temperature}")
        if self.max_length < 2:
            raise bad("max_length", f"must be >= 2, got {self.max_length}")
        for name in ("preview_samples", "eval_samples"):
            if getattr(self, name) < 0:
                raise bad(name, f"must be >= 0, got {getattr(self, name)}")
        if self.max_errors < 1:
            raise bad("max_errors", f"must be >= 1, got {self.max_errors}")
        if self.cache_dir is not None and (not isinstance(self.cache_dir, str) or not self.cache_dir.strip()):
            raise bad("cache_dir", f"must be a folder path, got {self.cache_dir!r} (leave it out for the default; "
                                   "data.cache: false turns the cache off)")
        if self.cache_dir is not None and os.path.exists(self.cache_dir) and not os.path.isdir(self.cache_dir):
            raise bad("cache_dir", f"{self.cache_dir} exists and is not a folder")
        for i, src in enumerate(self.sources):
            src.check_values(f"{prefix}.sources[{i}]")
        for name, t in self.tasks.items():
            t.check_values(f"{prefix}.tasks.{name}")
        if self.mixing == "weights":
            missing = [n for n, t in self.tasks.items() if t.weight is None]
            if not self.tasks or missing:
                raise bad("mixing", "weights needs a weight for every task in data.tasks"
                          + (f"; missing for: {', '.join(missing)}" if missing else " (data.tasks is empty)"))

    @classmethod
    def from_dict(cls, d: dict[str, Any], base_dir: str | os.PathLike = ".", prefix: str = "data") -> "DataConfig":
        """Build from a parsed YAML/JSON mapping with the typed loader; relative paths resolve against
        `base_dir` (the config file's folder). A source may be given as a bare path."""
        if d is None:
            d = {}
        if not isinstance(d, dict):
            raise ConfigError(f"{prefix}: expected a mapping, got {type(d).__name__}")
        d = dict(d)
        sources = d.get("sources")
        if isinstance(sources, list):
            resolved = []
            for i, s in enumerate(sources):
                if isinstance(s, str):
                    s = {"path": s}
                if not isinstance(s, dict):
                    raise ConfigError(f"{prefix}.sources[{i}]: expected a mapping or a path, got {type(s).__name__}")
                if "path" not in s:
                    raise ConfigError(f"{prefix}.sources[{i}].path: required (the data file)")
                if not isinstance(s["path"], str) or not s["path"]:
                    raise ConfigError(f"{prefix}.sources[{i}].path: expected a file path, got {s['path']!r}")
                resolved.append(dict(s, path=_resolve(s["path"], base_dir)))
            d["sources"] = resolved
        for key in ("image_folder", "cache_dir"):
            if isinstance(d.get(key), str) and d[key].strip():
                d[key] = _resolve(d[key], base_dir)
        if isinstance(d.get("tasks"), dict):  # `task:` with nothing under it is a task with default settings
            d["tasks"] = {k: ({} if v is None else v) for k, v in d["tasks"].items()}
        return from_dict(cls, d, prefix)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-able form (as written next to checkpoints)."""
        return dataclasses.asdict(self)


def _resolve(path: str, base_dir) -> str:
    path = os.path.expanduser(str(path))
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(str(base_dir), path))
