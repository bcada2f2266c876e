"""Batching: right-padded tensors for training and the per-rank preview batches HASI reads.

Padding is decided by each example's length, never by comparing token ids with the pad id, so a
tokenizer whose pad token equals its end-of-turn token keeps its end-of-turn labels.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from .encode import IGNORE_INDEX


def collate_batch(examples: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples into `input_ids`, `attention_mask`, `labels` (-100 on
    padding), `task_ids` [B], and `pixel_values` (all images of the batch concatenated in
    example order, which is the order their image tokens appear) when any example has images."""
    if not examples:
        raise ValueError("collate_batch got no examples")
    width = max(len(e["input_ids"]) for e in examples)
    n = len(examples)
    input_ids = torch.full((n, width), int(pad_token_id), dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    for b, e in enumerate(examples):
        k = len(e["input_ids"])
        if len(e["labels"]) != k:
            raise ValueError(f"example {e.get('id')!r}: {k} input ids but {len(e['labels'])} labels")
        input_ids[b, :k] = torch.as_tensor(e["input_ids"], dtype=torch.long)
        labels[b, :k] = torch.as_tensor(e["labels"], dtype=torch.long)
        attention_mask[b, :k] = 1
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "task_ids": torch.tensor([int(e["task_id"]) for e in examples], dtype=torch.long),
        # where each example's content starts after its own system turn (HASI's statistics skip the turn)
        "content_start": torch.tensor([int(e.get("content_start", 0)) for e in examples], dtype=torch.long),
    }
    pixels = [torch.as_tensor(e["pixel_values"]) for e in examples if e.get("pixel_values") is not None]
    if pixels:
        batch["pixel_values"] = torch.cat(pixels, dim=0)
    return batch


def preview_shard(n: int, rank: int = 0, world_size: int = 1) -> range:
    """This rank's contiguous share of n preview samples (sizes differ by at most one)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
    start = rank * n // world_size
    return range(start, (rank + 1) * n // world_size)


def preview_batch_count(data, task: str, batch_size: int, world_size: int = 1) -> int:
    """The largest number of preview batches any rank gets for `task`. Under ZeRO-3 every rank
    must run the same number of forwards; ranks with fewer batches make up the difference."""
    n = len(data.preview[task])
    return max(-(-len(preview_shard(n, r, world_size)) // batch_size) for r in range(world_size))


def preview_batches(data, task: str, batch_size: int, rank: int = 0, world_size: int = 1) -> Iterator[dict]:
    """Collated batches of this rank's disjoint share of `task`'s preview split; over all ranks
    each preview sample is used exactly once, so reduced statistics do not depend on W."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    examples = data.preview[task]
    idx = list(preview_shard(len(examples), rank, world_size))
    for s in range(0, len(idx), batch_size):
        yield collate_batch([examples[i] for i in idx[s : s + batch_size]], data.pad_token_id)
