"""`build_multitask_data`: records -> validated, tokenized, split per task.

Everything that can be wrong with the data is found here, before any model is loaded: the
structural checks of `records.py` and the length/template checks of `encode.py` go into one
problem log, so the user sees a single report (or a single per-task skip count).

The validated, tokenized result is cached on disk (`cache.py`, `data.cache` / `data.cache_dir`): built once
(rank 0; the other ranks wait and load it), reused by every later start with the same data files,
tokenizer/processor and data settings, which then reads no record, tokenizes nothing and opens no image. The
problem log is part of the entry and is replayed, so skip counts and notices read the same from a cached start.

Images: validation reads only each image's header and checks its end marker (`records.image_problem`); the number
of image tokens comes from the processor's configuration where it is fixed (`image_tokens.py`), so encoding decodes
one image (the check of that number against the processor's real output) instead of all of them. Pixel values are
computed when an example is read (`ExampleList.__getitem__`), i.e. where the trainer reads it: the trainer reads
`train_example()` in its own process, one micro-batch at a time, so each step decodes its own batch's images
there; nothing decodes ahead. A `torch.utils.data.DataLoader` with workers over an `ExampleList` decodes in its
workers instead (forked workers share the token arrays).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from .cache import CacheInfo, EncodedData, cached, image_stats
from .config import DataConfig
from .encode import Encoder, pixel_values_for
from .errors import DataValidationError, Problem, RecordProblem
from .records import line_index, load_records, problem_for
from .sampler import MixtureSampler
from .splits import split_indices
from .tokens import TokenStore, TokenStoreBuilder

logger = logging.getLogger("thanora_ds.data")


@dataclass
class _Item:
    row: int  # the example's row in the TokenStore
    task_id: int
    id: str
    images: list[str]
    source: str = ""
    content_start: int = 0


class ExampleList(Sequence):
    """A split of one task. Items are dicts (`input_ids`, `labels`, `task_id`, `id`, `content_start`, and
    `pixel_values` [n_images, C, H, W] when the record has images). Token ids are held compactly in one
    `TokenStore` per data set (memory maps of the cache entry on a cached start); pixel values are computed on access from the image files, so a large image set costs no RAM."""

    def __init__(self, items: list[_Item], store: TokenStore, processor=None, pad_to_square: bool = False):
        self._items, self._store, self._processor, self._pad = items, store, processor, pad_to_square

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        it = self._items[i]
        input_ids, labels = self._store.row(it.row)
        ex: dict[str, Any] = {
            "input_ids": input_ids,
            "labels": labels,
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
    cache: CacheInfo = field(default_factory=CacheInfo)  # how this start got its data (built, or from the cache)
    read_references: Optional[Callable[[], dict[str, list[str]]]] = None   # see `references`
    _references: Optional[dict[str, list[str]]] = field(default=None, repr=False)

    def references(self, task: str) -> list[str]:
        """The reference answers of ``eval[task]`` (each record's last assistant turn, as written), in its order.
        From a cache entry they are read at the first call (training alone never reads them)."""
        if self._references is None:
            self._references = self.read_references()
        return self._references[task]

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
    """Read, validate (structure, then length with the real tokenizer) and tokenize all sources, or load all of
    that from the data cache (`cache.py`). Every rank calls it; with several ranks only rank 0 builds.

    Raises `DataValidationError` listing every problem (up to `cfg.max_errors`), unless
    `cfg.skip_invalid`, in which case invalid records are skipped and counted per task
    (`.skipped`, and a logged warning).
    """
    if tokenizer is None and processor is None:
        raise ValueError("build_multitask_data needs a tokenizer or a processor")
    pad_id = (tokenizer if tokenizer is not None else processor.tokenizer).pad_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token before building data")
    enc, info = cached(cfg, tokenizer, processor, lambda: _encode_all(cfg, tokenizer, processor))
    skipped = enc.log.finish(cfg.skip_invalid)
    store = enc.store
    names = enc.tasks
    encoded: dict[str, list[_Item]] = {t: [] for t in names}
    for row, task_id in enumerate(enc.task_id):
        encoded[names[task_id]].append(_Item(row, task_id, enc.record_id[row], enc.images[row], enc.source[row],
                                             enc.content_start[row]))
    truncated = enc.truncated

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
    pad = cfg.image_aspect_ratio == "pad"
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
        train[t] = ExampleList(tr_items, store, processor, pad)
        preview[t] = ExampleList(pv_items, store, processor, pad)
        eval_[t] = ExampleList(ev_items, store, processor, pad)
    return MultiTaskData(tasks, train, preview, eval_, skipped, pad_id, cfg, {t: n for t, n in truncated.items() if n},
                         info, _eval_references(enc, {t: [it.row for it in eval_[t]._items] for t in tasks}))


def _eval_references(enc: EncodedData, rows: dict[str, list[int]]) -> Callable[[], dict[str, list[str]]]:
    """What reads the eval examples' references: after a build, those of the eval rows, kept now (not every
    record's); from a cache entry, its references file, read once when first asked for and then let go."""
    if enc.reference is not None:
        kept = {t: [enc.reference[r] for r in rs] for t, rs in rows.items()}
        return lambda: kept

    def read() -> dict[str, list[str]]:
        every = enc.references()
        enc.reference = None
        return {t: [every[r] for r in rs] for t, rs in rows.items()}

    return read


def _encode_all(cfg: DataConfig, tokenizer, processor) -> EncodedData:
    """Read and validate every record and tokenize every valid one: what a cache entry holds (the problem log is
    not finished here; the caller does that, from a fresh build and from a cached one alike)."""
    loaded = load_records(cfg, _defer=True)
    log = loaded.problems
    encoder = Encoder(tokenizer, processor, cfg.max_length, cfg.image_aspect_ratio == "pad")
    lines = line_index()
    tokens = TokenStoreBuilder(encoder.image_token_id)
    task_ids, record_ids, sources, images, content_start, references = [], [], [], [], [], []
    truncated: dict[str, int] = {}
    names = [t for t, recs in loaded.by_task.items() if recs or t in cfg.tasks]
    for task_id, task in enumerate(names):
        for rec in loaded.by_task[task]:
            try:
                enc = encoder.encode(rec)
            except RecordProblem as p:
                log.add(problem_for(rec, p.field, p.message, lines))
                continue
            truncated[task] = truncated.get(task, 0) + enc.truncated
            tokens.add(enc.input_ids, enc.labels)
            task_ids.append(task_id)
            record_ids.append(rec.id)
            sources.append(rec.source)
            images.append(list(rec.images))
            content_start.append(int(enc.content_start))
            references.append(next(m["content"] for m in reversed(rec.messages) if m["role"] == "assistant"))
    checked = set(loaded.image_checks) | {p for imgs in images for p in imgs}
    return EncodedData(
        tasks=names, store=tokens.finish(), task_id=task_ids, record_id=record_ids, source=sources,
        images=images, content_start=content_start, truncated=truncated, log=log,
        image_stat=dict(zip(sorted(checked), image_stats(sorted(checked)))), reference=references,
    )


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
