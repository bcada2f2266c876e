"""On-disk cache of HASI's preview statistics (S_t = sum X^T X and n_t per input group), keyed by what they
depend on: the base weights, the dtype, the targets, every preview sample's tokens (and pixels), the common
prefix and the content rule. Runs that differ only in what comes after the statistics (learning rate, gamma,
lambda, allocation, tau, seeds of the random inits) compute them once: the benchmark grid's variants of a seed,
or a restarted run before its first checkpoint.

Layout: ``ROOT/<key>/<input group leader>.safetensors`` (``sum`` [T, d, d] fp32, ``count`` [T] fp64), written
by rank 0 atomically (temporary file, then rename) after each statistics pass, and ``ROOT/<key>/complete.json``
written last. An entry without ``complete.json``, with a missing file, a file whose header does not parse or a
tensor of another shape is not used (warning) and is recomputed and overwritten. Every rank must see the same
files (a shared filesystem on multi-node runs): the ranks agree on a hit before any of them relies on it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from . import distributed as D

log = logging.getLogger(__name__)
FORMAT = 1


def statistics_key(parts: dict, previews: list[list[dict]]) -> str:
    """sha256 over ``parts`` (JSON-serializable identity of model and settings) and the preview samples."""
    h = hashlib.sha256(json.dumps({"format": FORMAT, **parts}, sort_keys=True, default=str).encode())
    for task_examples in previews:
        h.update(b"task")
        for ex in task_examples:
            h.update(json.dumps([ex["input_ids"], int(ex.get("content_start", 0))]).encode())
            pixels = ex.get("pixel_values")
            if pixels is not None:
                h.update(torch.as_tensor(pixels).float().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


class StatisticsCache:
    def __init__(self, root: str | Path, key: str):
        self.dir = Path(root) / key
        self._writing = False   # set by the first save: the entry is then marked incomplete until finish()

    def _file(self, leader: str) -> Path:
        return self.dir / f"{leader}.safetensors"

    def _usable_here(self, leaders: dict[str, int], num_tasks: int) -> bool:
        from safetensors import safe_open

        if not (self.dir / "complete.json").is_file():
            return False
        try:
            for leader, d in leaders.items():
                with safe_open(str(self._file(leader)), framework="pt") as f:
                    if (list(f.get_slice("sum").get_shape()) != [num_tasks, d, d]
                            or list(f.get_slice("count").get_shape()) != [num_tasks]):
                        raise ValueError(f"{leader}: unexpected shapes")
        except Exception as err:  # noqa: BLE001 - any damage means: recompute
            log.warning("HASI statistics cache %s is damaged (%s); recomputing it", self.dir, err)
            return False
        return True

    def usable(self, leaders: dict[str, int], num_tasks: int) -> bool:
        """Whether every rank finds a complete, intact entry (``leaders``: input group -> d_in). Collective."""
        return all(D.all_gather_objects(self._usable_here(leaders, num_tasks)))

    def load(self, leader: str) -> tuple[torch.Tensor, torch.Tensor]:
        from safetensors.torch import load_file

        tensors = load_file(str(self._file(leader)))
        return tensors["sum"], tensors["count"]

    def save(self, leader: str, sums: torch.Tensor, counts: torch.Tensor) -> None:
        """Rank 0 only."""
        from safetensors.torch import save_file

        if not self._writing:   # an entry being (re)written is not complete
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / "complete.json").unlink(missing_ok=True)
            self._writing = True
        tmp = self._file(leader).with_suffix(f".tmp{os.getpid()}")
        save_file({"sum": sums.detach().cpu().contiguous(), "count": counts.detach().cpu().contiguous()}, str(tmp))
        os.replace(tmp, self._file(leader))

    def finish(self, leaders: list[str]) -> None:
        """Rank 0 only, after every group was saved."""
        tmp = self.dir / f"complete.json.tmp{os.getpid()}"
        tmp.write_text(json.dumps({"groups": leaders}))
        os.replace(tmp, self.dir / "complete.json")
        log.info("HASI statistics cached in %s", self.dir)
