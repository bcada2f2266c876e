"""Multi-task data for ThanoRA: loading and validation (`records`), tokenization (`encode`; image token
counts from the processor's configuration: `image_tokens`), compact token storage (`tokens`), the on-disk
cache of all that (`cache`: a restart reads, decodes and tokenizes nothing), per-task splits (`splits`),
mixing across tasks and ranks (`sampler`), batching (`collate`).

Typical use::

    cfg = DataConfig.from_dict(yaml_cfg["data"], base_dir=config_dir)
    data = build_multitask_data(cfg, tokenizer=tok)          # or processor=... for LLaVA
    sampler = data.make_sampler(rank, world_size)            # state_dict() goes into checkpoints
    for task_id, i in sampler: ...  data.train_example(task_id, i) ... collate_batch(...)
"""

from .collate import collate_batch, preview_batch_count, preview_batches
from .config import DataConfig, SourceConfig, TaskConfig
from .encode import IGNORE_INDEX
from .errors import DataValidationError, Problem
from .multitask import MultiTaskData, build_multitask_data
from .records import LoadedRecords, Record, load_records
from .sampler import MixtureSampler, mixture_probabilities

__all__ = [
    "DataConfig",
    "SourceConfig",
    "TaskConfig",
    "DataValidationError",
    "Problem",
    "Record",
    "LoadedRecords",
    "load_records",
    "build_multitask_data",
    "MultiTaskData",
    "MixtureSampler",
    "mixture_probabilities",
    "collate_batch",
    "preview_batches",
    "preview_batch_count",
    "IGNORE_INDEX",
]
