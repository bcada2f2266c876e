"""Atomic, resumable checkpoints: DeepSpeed engine state + ThanoRA metadata.

Layout under ``<output_dir>/checkpoints``::

    step-00000040/           a complete checkpoint (DeepSpeed's files + the files below)
        thanora_meta.json    step, run fingerprint, world size, config
        allocation.json      HASI's split (the adapters' block sizes)
        corda_init.safetensors   (mode corda) the initial blocks subtracted from the base weights
        rank-00000.pt ...    per-rank RNG states and sampler position
    latest                   name of the newest complete checkpoint (replaced atomically)

Atomicity: every rank writes into ``.tmp-step-N``; after a barrier rank 0 writes the metadata, fsyncs, and
renames the folder to ``step-N`` (one atomic rename), then replaces ``latest``. A crash at any point leaves
the previous checkpoint complete and still the one ``latest`` names; stale ``.tmp-*`` folders are removed at
the next save.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import torch

from . import distributed as D

META = "thanora_meta.json"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class CheckpointError(RuntimeError):
    pass


class Checkpoints:
    def __init__(self, output_dir: str | Path, keep_last: int = 2):
        self.root = Path(output_dir) / "checkpoints"
        self.keep_last = keep_last

    @staticmethod
    def name(step: int) -> str:
        return f"step-{step:08d}"

    def complete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("step-*") if (p / META).is_file())

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if pointer.is_file():
            candidate = self.root / pointer.read_text().strip()
            if (candidate / META).is_file():
                return candidate
        done = self.complete()
        return done[-1] if done else None

    def save(self, engine, step: int, meta: dict, rank_state: dict, extra_files: dict[str, bytes] | None = None):
        """Collective. ``meta`` (rank 0's) and ``extra_files`` are written by rank 0; ``rank_state`` by every rank."""
        final = self.root / self.name(step)
        tmp = self.root / f".tmp-{self.name(step)}"
        if D.is_main():
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
        D.barrier()
        engine.save_checkpoint(str(self.root), tag=tmp.name, save_latest=False)
        torch.save(rank_state, tmp / f"rank-{D.rank():05d}.pt")
        _fault_point("after_engine_save", step)
        D.barrier()
        if D.is_main():
            for name, payload in (extra_files or {}).items():
                (tmp / name).write_bytes(payload)
            with open(tmp / META, "w") as f:
                json.dump(meta, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(tmp)
            if final.exists():  # a re-save of the same step (e.g. SIGTERM right after a periodic save)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            atomic_write_text(self.root / "latest", final.name)
            for old in self.complete()[:-self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        D.barrier()
        return final

    @staticmethod
    def read_meta(path: Path) -> dict:
        meta_path = Path(path) / META
        if not meta_path.is_file():
            raise CheckpointError(f"{path} is not a complete thanora_ds checkpoint (no {META})")
        return json.loads(meta_path.read_text())

    @staticmethod
    def load(engine, path: Path) -> dict:
        """Load the engine state; returns this rank's rank state (RNG, sampler)."""
        path = Path(path)
        loaded, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=False)
        if loaded is None:
            raise CheckpointError(f"DeepSpeed could not load the checkpoint in {path}")
        rank_file = path / f"rank-{D.rank():05d}.pt"
        if not rank_file.is_file():
            raise CheckpointError(f"{rank_file} is missing: the checkpoint is incomplete")
        return torch.load(rank_file, weights_only=False)


def check_compatible(meta: dict, fingerprint: dict, world_size: int, path: Path) -> None:
    """Refuse, before any model is loaded, a checkpoint made by a different run or world size."""
    theirs = meta.get("fingerprint", {})
    diffs = [f"{k}: checkpoint has {theirs.get(k)!r}, this run has {v!r}" for k, v in fingerprint.items()
             if theirs.get(k) != v]
    if diffs:
        raise CheckpointError(f"{path} comes from another run; refusing to resume:\n  " + "\n  ".join(diffs)
                              + "\n(use train.resume=never or another train.output_dir to start afresh)")
    if meta.get("world_size") != world_size:
        raise CheckpointError(
            f"{path} was written by {meta.get('world_size')} ranks and this run has {world_size}: DeepSpeed ZeRO "
            "optimizer partitions resume only at the same world size (convert it with DeepSpeed's universal "
            "checkpointing, or relaunch with the same number of ranks)")


def _fault_point(where: str, step: int) -> None:
    """Test hook: THANORA_FAULT=after_engine_save:STEP kills this process with SIGKILL at that point of the
    save of step STEP, to prove that an interrupted save leaves the previous checkpoint usable."""
    spec = os.environ.get("THANORA_FAULT", "")
    if spec == f"{where}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
