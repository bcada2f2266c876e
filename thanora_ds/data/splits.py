"""Per-task train / preview / eval splits: disjoint, deterministic, independent of world size.

Every rank computes the same split from (seed, task name, task size) alone, so no rank has to
broadcast it and a rerun with the same data and seed gets the same eval set. The seed mixes in a
CRC of the task name (stable across processes, unlike Python's `hash`), so adding a task does not
reshuffle the others.

Sizes, for a task with n records:
  eval    = min(eval_samples, n // 4)
  preview = min(preview_samples, (n - eval) // 2)      (N_t of HASI; capped by the task's size)
  train   = the rest (at least half of what eval leaves, so never empty when n >= 1)
The caps only bite on tiny tasks; they keep a 10-record task trainable.
"""

from __future__ import annotations

import zlib

import numpy as np


def split_sizes(n: int, preview_samples: int, eval_samples: int) -> tuple[int, int, int]:
    n_eval = min(eval_samples, n // 4)
    n_preview = min(preview_samples, (n - n_eval) // 2)
    return n - n_eval - n_preview, n_preview, n_eval


def split_indices(n: int, task: str, seed: int, preview_samples: int, eval_samples: int):
    """(train, preview, eval) lists of record indices of one task."""
    n_train, n_preview, n_eval = split_sizes(n, preview_samples, eval_samples)
    key = [int(seed), zlib.crc32(task.encode("utf-8")), 2]
    perm = np.random.Generator(np.random.PCG64(np.random.SeedSequence(key))).permutation(n).tolist()
    eval_ = sorted(perm[:n_eval])
    preview = sorted(perm[n_eval : n_eval + n_preview])
    train = sorted(perm[n_eval + n_preview :])
    return train, preview, eval_
