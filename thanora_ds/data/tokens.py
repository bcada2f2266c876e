"""`TokenStore`: the input ids and labels of every example, compactly, in a few flat numpy arrays.

An LLaVA-1.5 example is mostly image tokens (576 per image against ~100-200 text tokens), and its labels are
either the token itself (answer tokens) or -100. So the store keeps:

* `input_ids` (int32): all examples concatenated, each maximal run of the image token collapsed to one token;
* `label_mask` (uint8, same length): 1 where the label is the token, 0 where it is -100 (a collapsed image run
  is always 0: image tokens are never labels);
* `run_at` (int64) / `run_len` (int32): where in `input_ids` a collapsed run sits and how many tokens it stands
  for (sorted by position);
* `offsets` (int64, n + 1): example i is `input_ids[offsets[i]:offsets[i + 1]]`.

About 5 bytes per text token and nothing per image token, against 8 bytes per token of every kind for plain int32
ids and labels (and ~70 bytes per token as Python lists): LLaVA-665K takes a few hundred MB instead of GBs, in
memory and in the data cache, where these arrays are memory-mapped (`cache.py`). `row(i)` gives back exactly the
lists the encoder produced; `TokenStoreBuilder.add` refuses labels that are neither the token nor -100.
"""

from __future__ import annotations

from array import array
from typing import Optional

import numpy as np

IGNORE_INDEX = -100
ARRAYS = {"input_ids": np.int32, "label_mask": np.uint8, "offsets": np.int64, "run_at": np.int64, "run_len": np.int32}


class TokenStore:
    def __init__(self, input_ids, label_mask, offsets, run_at, run_len):
        self.input_ids, self.label_mask, self.offsets = input_ids, label_mask, offsets
        self.run_at, self.run_len = run_at, run_len

    @classmethod
    def from_arrays(cls, arrays: dict) -> "TokenStore":
        return cls(*(arrays[name] for name in ARRAYS))

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: np.ascontiguousarray(getattr(self, name), dtype=dtype) for name, dtype in ARRAYS.items()}

    def check(self) -> None:
        """Raise ValueError if the arrays do not fit together (a damaged cache entry)."""
        n, o = len(self.input_ids), self.offsets
        if len(self.label_mask) != n or len(o) < 1 or int(o[0]) != 0 or int(o[-1]) != n \
                or (len(o) > 1 and bool(np.any(np.diff(o) < 0))):
            raise ValueError("token arrays and offsets disagree")
        if len(self.run_at) != len(self.run_len) or (len(self.run_at) and (
                int(self.run_at.min()) < 0 or int(self.run_at.max()) >= n or int(self.run_len.min()) < 1
                or bool(np.any(np.diff(self.run_at) <= 0)))):
            raise ValueError("image token runs out of range")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def tokens(self) -> int:
        """Total number of tokens (image runs expanded)."""
        return len(self.input_ids) + int(np.sum(self.run_len, dtype=np.int64)) - len(self.run_len)

    def row(self, i: int) -> tuple[list[int], list[int]]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        ids = np.asarray(self.input_ids[a:b], dtype=np.int64)
        labels = np.where(np.asarray(self.label_mask[a:b]) != 0, ids, IGNORE_INDEX)
        lo, hi = np.searchsorted(self.run_at, [a, b])
        if hi > lo:
            reps = np.ones(b - a, dtype=np.int64)
            reps[np.asarray(self.run_at[lo:hi]) - a] = self.run_len[lo:hi]
            ids, labels = np.repeat(ids, reps), np.repeat(labels, reps)
        return ids.tolist(), labels.tolist()


class TokenStoreBuilder:
    """Collects encoded examples one by one (`add`), then `finish()` gives the TokenStore."""

    def __init__(self, image_token_id: Optional[int] = None):
        self.image_token_id = image_token_id
        self._ids, self._mask = array("i"), array("B")
        assert self._ids.itemsize == 4
        self._offsets, self._run_at, self._run_len = [0], [], []

    def add(self, input_ids: list[int], labels: list[int]) -> None:
        ids = np.asarray(input_ids, dtype=np.int64)
        lab = np.asarray(labels, dtype=np.int64)
        if ids.shape != lab.shape:
            raise ValueError(f"{len(input_ids)} input ids but {len(labels)} labels")
        mask = lab == ids
        if not np.all(mask | (lab == IGNORE_INDEX)):
            raise ValueError("a label that is neither its token nor -100 (the token store cannot hold it)")
        if self.image_token_id is not None:
            image = ids == self.image_token_id
            if np.any(image & mask):
                raise ValueError("an image token carries a label")
            if image.any():
                start = image & ~np.concatenate(([False], image[:-1]))    # first token of each run
                keep = ~image | start
                where = np.flatnonzero(start)
                ends = np.flatnonzero(image & ~np.concatenate((image[1:], [False])))
                kept_before = np.cumsum(keep) - 1                         # position of each kept token
                base = len(self._ids)
                self._run_at.extend((base + kept_before[where]).tolist())
                self._run_len.extend((ends - where + 1).tolist())
                ids, mask = ids[keep], mask[keep]
        self._ids.frombytes(ids.astype(np.int32).tobytes())
        self._mask.frombytes(mask.astype(np.uint8).tobytes())
        self._offsets.append(len(self._ids))

    def finish(self) -> TokenStore:
        def arr(a, dtype):
            return np.frombuffer(a, dtype=dtype).copy() if len(a) else np.zeros(0, dtype=dtype)

        return TokenStore(arr(self._ids, np.int32), arr(self._mask, np.uint8),
                          np.asarray(self._offsets, dtype=np.int64), np.asarray(self._run_at, dtype=np.int64),
                          np.asarray(self._run_len, dtype=np.int32))
