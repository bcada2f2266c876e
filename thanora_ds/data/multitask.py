"""`build_multitask_data`: records -> validated, tokenized, split per task.

Everything that can be wrong with the data is found here, before any model is loaded: the
structural checks of `records.py` and the length/template checks of `encode.py` go into one
problem log, so the user sees a single report (or a single per-task skip count).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .config import DataConfig
from .encode import Encoder, pixel_values_for
from .errors import DataValidationError, Problem, RecordProblem
from .records import line_index, load_records, problem_for
from .sampler import MixtureSampler
from .splits import split_indices

logger = logging.getLogger("thanora_ds.data")


@dataclass
class _Item:
    input_ids: list[int]
    labels: list[int]
    task_id: int
    id: str
    images: list[str]
    source: str = ""
    content_start: int = 0


class ExampleList(Sequence):
    """A split of one task. Items are dicts (`input_ids`, `labels`, `task_id`, `id`, and
    `pixel_values` [n_images, C, H, W] when the record has images). Token ids are held in memory;
    pixel values are computed on access from the image files, so a large image set costs no RAM."""

    def __init__(self, items: list[_Item], processor=None, pad_to_square: bool = False):
        self._items, self._processor, self._pad = items, processor, pad_to_square

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        it = self._items[i]
        ex: dict[str, Any] = {
            "input_ids": list(it.input_ids),
            "labels": list(it.labels),
            "task_id": it.task_id,
            "id": it.id,
            "content_start": it.content_start,
        }
        if it.images:
            ex["pixel_values"] = pixel_values_for(self._processor, it.images, self._pad)
        return ex


@dataclass
class MultiTaskData:
    """Tokenized data of all tasks. Task ids index `tasks` (sorted names)."""

    tasks: list[str]
    train: dict[str, ExampleList]
    preview: dict[str, ExampleList]
    eval: dict[str, ExampleList]
    skipped: dict[str, int]
    pad_token_id: int
    config: DataConfig
    truncated: dict[str, int] = field(default_factory=dict)  # per task, examples cut at max_length

    @property
    def task_sizes(self) -> list[int]:
        """Train split sizes in task-id order (what `MixtureSampler` takes)."""
        return [len(self.train[t]) for t in self.tasks]

    def train_example(self, task_id: int, index: int) -> dict:
        """The example a `MixtureSampler` draw `(task_id, index)` points to."""
        return self.train[self.tasks[task_id]][index]

    def make_sampler(self, rank: int = 0, world_size: int = 1) -> MixtureSampler:
        """A sampler over the train splits with this config's mixing and seed."""
        cfg = self.config
        weights = [cfg.tasks[t].weight for t in self.tasks] if cfg.mixing == "weights" else None
        return MixtureSampler(
            self.task_sizes, cfg.mixing, cfg.temperature, weights, cfg.seed, rank, world_size
        )


def build_multitask_data(cfg: DataConfig, tokenizer=None, processor=None) -> MultiTaskData:
    """Read, validate (structure, then length with the real tokenizer) and tokenize all sources.

    Raises `DataValidationError` listing every problem (up to `cfg.max_errors`), unless
    `cfg.skip_invalid`, in which case invalid records are skipped and counted per task
    (`.skipped`, and a logged warning).
    """
    loaded = load_records(cfg, _defer=True)
    log = loaded.problems
    pad = cfg.image_aspect_ratio == "pad"
    encoder = Encoder(tokenizer, processor, cfg.max_length, pad)
    pad_id = encoder.tokenizer.pad_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token before building data")

    lines = line_index()
    encoded: dict[str, list[_Item]] = {}
    truncated: dict[str, int] = {}
    names = [t for t, recs in loaded.by_task.items() if recs or t in cfg.tasks]
    for task_id, task in enumerate(names):
        items = encoded.setdefault(task, [])
        for rec in loaded.by_task[task]:
            try:
                enc = encoder.encode(rec)
            except RecordProblem as p:
                log.add(problem_for(rec, p.field, p.message, lines))
                continue
            truncated[task] = truncated.get(task, 0) + enc.truncated
            items.append(_Item(enc.input_ids, enc.labels, task_id, rec.id, rec.images, rec.source, enc.content_start))
    skipped = log.finish(cfg.skip_invalid)

    empty = [t for t in names if not encoded[t]]
    missing = [t for t in empty if t in cfg.tasks]
    if missing:  # skipping cannot fix a configured task with no data
        raise DataValidationError(
            [Problem(file="<config>", field=f"tasks.{t}", message="configured task has no valid record", task=t) for t in missing]
        )
    if empty:
        logger.warning("tasks with no valid record left after skipping, dropped: %s", ", ".join(empty))
    tasks = [t for t in names if encoded[t]]
    if not tasks:
        raise DataValidationError([Problem(file="<config>", message="no valid record in any source")])
    if len(tasks) != len(names):  # renumber task ids after dropping emptied tasks
        for new_id, t in enumerate(tasks):
            for it in encoded[t]:
                it.task_id = new_id
    for t, n in sorted(truncated.items()):
        if n:
            logger.info("task %s: %d example(s) truncated to max_length=%d", t, n, cfg.max_length)

    role = {src.path: src.split for src in cfg.sources}
    without_training = [t for t in tasks if all(role[it.source] == "eval" for it in encoded[t])]
    if without_training:
        raise DataValidationError([Problem(file="<config>", field="sources[].split", task=t,
                                           message=f"task {t} has records only in eval sources: nothing to train on")
                                   for t in without_training])
    train, preview, eval_ = {}, {}, {}
    for t in tasks:
        items = encoded[t]
        tr_items, pv_items, ev_items = _split_task(t, items, role, cfg)
        if not pv_items and cfg.preview_samples > 0:
            # too few records for a disjoint preview split (METHOD.md 2.1 caps N_t by the task's size): HASI would
            # see no statistic for this task at all, so its training records are previewed instead
            pv_items = tr_items[: cfg.preview_samples]
            logger.warning("task %s has %d record(s): too few for a separate preview split; HASI previews its %d "
                           "training record(s) instead (its ranks rest on very little data)", t, len(items), len(pv_items))
        train[t] = ExampleList(tr_items, processor, pad)
        preview[t] = ExampleList(pv_items, processor, pad)
        eval_[t] = ExampleList(ev_items, processor, pad)
    return MultiTaskData(tasks, train, preview, eval_, skipped, pad_id, cfg, {t: n for t, n in truncated.items() if n})


def _split_task(task: str, items: list[_Item], role: dict[str, str], cfg: DataConfig):
    """(train, preview, eval) items of one task. Only `all` sources: one seeded split (splits.py). With eval
    sources: eval is exactly their records, train and preview come from the rest. With train-only sources and no
    eval source: eval is carved from the `all` records alone."""
    evals = [it for it in items if role[it.source] == "eval"]
    rest = [it for it in items if role[it.source] != "eval"]
    carvable = [it for it in rest if role[it.source] == "all"]
    if not evals and len(carvable) == len(rest):
        tr, pv, ev = split_indices(len(items), task, cfg.seed, cfg.preview_samples, cfg.eval_samples)
        return [items[i] for i in tr], [items[i] for i in pv], [items[i] for i in ev]
    if not evals:
        _, _, ev = split_indices(len(carvable), task, cfg.seed, 0, cfg.eval_samples)
        evals = [carvable[i] for i in ev]
        held = {id(it) for it in evals}
        rest = [it for it in rest if id(it) not in held]
    tr, pv, _ = split_indices(len(rest), task, cfg.seed, cfg.preview_samples, 0)
    return [rest[i] for i in tr], [rest[i] for i in pv], evals
