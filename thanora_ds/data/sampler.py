"""Multi-task mixing: which (task, example) each data-parallel rank trains on next.

Epoch semantics (the contract other code relies on):

* An epoch is `D = ceil(N / W) * W` global draws, N = sum of the task train sizes, W = world size.
  Task t gets exactly `c_t` of them, `c_t` = the largest-remainder rounding of `p_t * D`, so the
  mixture matches the configured proportions exactly up to rounding, every epoch, instead of only
  in expectation. The order of the D task labels is a seeded shuffle per epoch.
* Each task reads its examples from an endless stream: a seeded permutation of its train split,
  reshuffled (new permutation) at every wrap-around. Task t's stream advances by `c_t` per
  epoch. With `natural` mixing and W dividing N, `c_t = n_t`, so an epoch is every training
  example exactly once; with other mixings small tasks repeat and large ones are subsampled,
  which is the point of temperature mixing. When W does not divide N, the < W extra draws come
  from the next pass of the streams (the same padding choice as torch's DistributedSampler).
* Rank r takes the global draws r, r + W, r + 2W, ...: ranks get disjoint positions, equal
  counts (D / W each, so no rank waits on a collective another rank never joins), and together
  cover the epoch. Every rank computes the same global sequence from the seed: no communication.

State is two integers (epoch, draws already yielded on this rank within the epoch), plus what is
needed to refuse a state from a different mixture. `iter()` continues from the state; finishing
an epoch moves to the next one. The state counts what was *yielded*: a loader that prefetches
must save the state that matches what the model consumed (e.g. iterate the sampler in the
training loop, or DataLoader(num_workers=0), which pulls indices one batch at a time).
"""

from __future__ import annotations

import math
from typing import Iterator, Optional, Sequence

import numpy as np

MIXINGS = ("natural", "temperature", "weights")


def mixture_probabilities(
    task_sizes: Sequence[int], mixing: str = "natural", temperature: float = 2.0, weights=None
) -> list[float]:
    """p_t for `natural` (n_t / N), `temperature` (n_t^(1/T), normalized) or `weights` (normalized)."""
    sizes = np.asarray(task_sizes, dtype=np.float64)
    if mixing == "natural":
        raw = sizes
    elif mixing == "temperature":
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        raw = np.where(sizes > 0, sizes ** (1.0 / temperature), 0.0)
    elif mixing == "weights":
        if weights is None or len(weights) != len(sizes):
            raise ValueError(f"mixing='weights' needs one weight per task ({len(sizes)}), got {weights!r}")
        raw = np.asarray(weights, dtype=np.float64)
        if (raw < 0).any():
            raise ValueError(f"weights must be >= 0, got {list(weights)}")
        empty = [t for t, (w, n) in enumerate(zip(raw, sizes)) if w > 0 and n == 0]
        if empty:
            raise ValueError(f"tasks {empty} have a weight but no training examples")
    else:
        raise ValueError(f"mixing must be one of {MIXINGS}, got {mixing!r}")
    if not raw.sum() > 0:
        raise ValueError(f"the mixture is empty (task sizes {list(task_sizes)}, mixing {mixing!r})")
    return (raw / raw.sum()).tolist()


def largest_remainder(probabilities: Sequence[float], total: int) -> list[int]:
    """Integers proportional to `probabilities` summing to `total` (ties to the lower index)."""
    exact = [p * total for p in probabilities]
    counts = [math.floor(x) for x in exact]
    order = sorted(range(len(exact)), key=lambda t: (-(exact[t] - counts[t]), t))
    for t in order[: total - sum(counts)]:
        counts[t] += 1
    return counts


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(k) for k in key])))


class MixtureSampler:
    """Iterates `(task_id, index_in_task_train_split)` for one rank; see the module docstring
    for the exact epoch semantics. Deterministic for a seed; resumable via `state_dict()`."""

    def __init__(
        self,
        task_sizes: Sequence[int],
        mixing: str = "natural",
        temperature: float = 2.0,
        weights: Optional[Sequence[float]] = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        self.task_sizes = [int(n) for n in task_sizes]
        if any(n < 0 for n in self.task_sizes) or not self.task_sizes:
            raise ValueError(f"bad task sizes {task_sizes!r}")
        self.mixing, self.temperature, self.seed = mixing, float(temperature), int(seed)
        self.rank, self.world_size = rank, world_size
        self.probabilities = mixture_probabilities(self.task_sizes, mixing, temperature, weights)
        total = sum(self.task_sizes)
        self.epoch_draws = math.ceil(total / world_size) * world_size  # global, D in the docstring
        self.counts = largest_remainder(self.probabilities, self.epoch_draws)  # c_t
        self.epoch = 0
        self.position = 0  # draws yielded on this rank in the current epoch
        self._perm_cache: dict[tuple[int, int], np.ndarray] = {}

    def __len__(self) -> int:
        """Draws per epoch on this rank."""
        return self.epoch_draws // self.world_size

    # -- the global sequence ---------------------------------------------------------------------

    def _task_permutation(self, task: int, pass_: int) -> np.ndarray:
        key = (task, pass_)
        if key not in self._perm_cache:
            if len(self._perm_cache) > 4 * len(self.task_sizes):
                self._perm_cache.clear()
            self._perm_cache[key] = _rng(self.seed, 1, task, pass_).permutation(self.task_sizes[task])
        return self._perm_cache[key]

    def epoch_sequence(self, epoch: int) -> list[tuple[int, int]]:
        """All D global draws of `epoch` (every rank computes the same list)."""
        labels = np.repeat(np.arange(len(self.counts)), self.counts)
        labels = labels[_rng(self.seed, 0, epoch).permutation(len(labels))]
        out = [None] * len(labels)
        for t, c in enumerate(self.counts):
            if c == 0:
                continue
            n = self.task_sizes[t]
            stream = np.arange(epoch * c, (epoch + 1) * c)  # positions in task t's endless stream
            idx = np.empty(c, dtype=np.int64)
            for p in np.unique(stream // n):
                sel = stream // n == p
                idx[sel] = self._task_permutation(t, int(p))[stream[sel] % n]
            for slot, i in zip(np.flatnonzero(labels == t), idx):
                out[slot] = (t, int(i))
        return out

    # -- iteration and state ---------------------------------------------------------------------

    def _roll_over(self) -> None:
        if self.position >= len(self):
            self.epoch, self.position = self.epoch + 1, 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        """This rank's remaining draws of the current epoch; then the state moves to the next epoch."""
        self._roll_over()
        seq = self.epoch_sequence(self.epoch)
        while self.position < len(self):
            item = seq[self.position * self.world_size + self.rank]
            self.position += 1
            yield item
        self._roll_over()

    def state_dict(self) -> dict:
        """Plain JSON-able state for checkpoints."""
        self._roll_over()
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "world_size": self.world_size,
            "task_sizes": list(self.task_sizes),
            "counts": list(self.counts),
        }

    def seek(self, state: dict) -> None:
        """Continue from a state saved at another world size: the same epoch, at the same number of global draws
        (floored to a whole draw per rank). Refuses a state of another mixture or seed."""
        for key in ("seed", "task_sizes"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"sampler state does not match this sampler: {key} is {state.get(key)!r} in the "
                                 f"checkpoint but {getattr(self, key)!r} now")
        global_draws = int(state["position"]) * int(state["world_size"])
        self.epoch, self.position = int(state["epoch"]), min(global_draws // self.world_size, len(self))
        self._roll_over()

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`; refuses a state saved for another mixture, seed or world size
        (continuing it would silently change which data is seen)."""
        mine = self.state_dict()
        for key in ("seed", "world_size", "task_sizes", "counts"):
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"sampler state does not match this sampler: {key} is {state.get(key)!r} in the "
                    f"checkpoint but {mine[key]!r} now"
                )
        if not 0 <= int(state["position"]) <= len(self):
            raise ValueError(f"sampler state position {state['position']} out of range [0, {len(self)}]")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._roll_over()
