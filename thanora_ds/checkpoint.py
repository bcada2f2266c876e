"""Atomic, resumable checkpoints: DeepSpeed engine state + ThanoRA metadata.

Layout under ``<output_dir>/checkpoints``::

    step-00000040/           a complete checkpoint (DeepSpeed's files + the files below)
        thanora_meta.json    step, run fingerprint, world size, config
        allocation.json      HASI's split (the adapters' block sizes)
        corda_init.safetensors   (mode corda) the initial blocks subtracted from the base weights
        rank-00000.pt ...    per-rank RNG states and sampler position
        manifest.json        every other file's size and sha256, written last
    latest                   name of the newest complete checkpoint (replaced atomically)
    corrupt-step-N/          a checkpoint that failed verification on resume, set aside (never deleted)

Atomicity: every rank writes into ``.tmp-step-N``; after a barrier rank 0 writes the metadata, the ranks
digest the files (each a share), rank 0 writes the manifest, fsyncs, and renames the folder to ``step-N``
(one atomic rename), then replaces ``latest``. A crash at any point leaves the previous checkpoint complete
and still the one ``latest`` names; stale ``.tmp-*`` folders are removed at the next save.

Verification: resume checks every file against the manifest (present, size, digest) before the model is
loaded; ``resume: auto`` falls back from a damaged checkpoint to the newest intact one, with a warning naming
what was wrong, and sets the damaged one aside as ``corrupt-step-N``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
from pathlib import Path

import torch

from . import distributed as D

META = "thanora_meta.json"
MANIFEST = "manifest.json"
log = logging.getLogger("thanora_ds")


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's entries: a rename is durable once its folder is synced)."""
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
    fsync_path(path.parent)


class CheckpointError(RuntimeError):
    pass


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def _my_share(names: list[str]) -> list[str]:
    """This rank's share of a folder's files for digesting (round robin: ranks hash in parallel)."""
    return names[D.rank()::D.world_size()]


def write_manifest(folder: Path) -> None:
    """Collective: every rank digests its share of the files, rank 0 writes ``manifest.json``."""
    names = _files(folder)
    mine = {n: {"size": (folder / n).stat().st_size, "sha256": file_digest(folder / n)} for n in _my_share(names)}
    entries = {}
    for part in D.all_gather_objects(mine):
        entries.update(part)
    if D.is_main():
        atomic_write_text(folder / MANIFEST, json.dumps({"files": dict(sorted(entries.items()))}, indent=1))


def verify(folder: Path) -> str | None:
    """None if the checkpoint's files match its manifest, else what is wrong (names the file). Collective."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"{folder / MANIFEST} is missing (the checkpoint was not finished, or written by an older version)"
    except (ValueError, KeyError, TypeError) as err:
        return f"{folder / MANIFEST} is unreadable ({type(err).__name__}: {err})"
    problems = []
    for name in _my_share(sorted(manifest)):
        path, want = folder / name, manifest[name]
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif path.stat().st_size != want["size"]:
            problems.append(f"{path} has {path.stat().st_size} bytes, the manifest says {want['size']} (truncated?)")
        elif file_digest(path) != want["sha256"]:
            problems.append(f"{path} does not match its sha256 in the manifest (overwritten or corrupted)")
    found = sorted(p for part in D.all_gather_objects(problems) for p in part)
    return "; ".join(found) if found else None


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
        D.barrier()
        write_manifest(tmp)
        _fault_point("before_rename", step)
        if D.is_main():
            fsync_path(tmp)
            if final.exists():  # a re-save of the same step (e.g. SIGTERM right after a periodic save)
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_path(self.root)
            atomic_write_text(self.root / "latest", final.name)
            # prune only checkpoints older than this one: a newer one (left by a run that resumed an earlier
            # checkpoint on purpose) is not this save's to delete
            older = [p for p in self.complete() if p.name < final.name]
            for old in older[: max(0, len(older) - (self.keep_last - 1))]:
                shutil.rmtree(old, ignore_errors=True)
            kept = {p.name for p in self.complete()}
            for converted in (self.root / "universal").glob("step-*"):  # universal copies of pruned checkpoints
                if converted.name not in kept:
                    shutil.rmtree(converted, ignore_errors=True)
        D.barrier()
        return final

    def candidates(self) -> list[Path]:
        """Complete checkpoints to resume from, best first: the one ``latest`` names, then the others newest first."""
        done = self.complete()[::-1]
        first = self.latest()
        return ([first] if first is not None else []) + [p for p in done if p != first]

    def set_aside(self, path: Path, reason: str) -> None:
        """Rank 0: move a damaged checkpoint out of the way (kept for inspection as ``corrupt-step-N``)."""
        if D.is_main() and path.is_dir():
            target, n = path.with_name(f"corrupt-{path.name}"), 1
            while target.exists():  # an earlier damaged copy of the same step: keep both
                n += 1
                target = path.with_name(f"corrupt-{path.name}.{n}")
            os.replace(path, target)
            (target / "WHY.txt").write_text(reason + "\n")
            log.warning("set aside %s as %s", path.name, target)

    @staticmethod
    def read_meta(path: Path) -> dict:
        meta_path = Path(path) / META
        if not meta_path.is_file():
            raise CheckpointError(f"{path} is not a complete thanora_ds checkpoint (no {META})")
        try:
            meta = json.loads(meta_path.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{meta_path} is unreadable ({type(err).__name__}: {err})") from None
        if not isinstance(meta, dict) or "step" not in meta:
            raise CheckpointError(f"{meta_path} has no 'step': not a thanora_ds checkpoint")
        return meta

    @staticmethod
    def load(engine, path: Path, universal_root: Path | None = None) -> dict:
        """Load the engine state; returns this rank's rank state (RNG, sampler). With ``universal_root`` (another
        data-parallel layout) the engine state comes from DeepSpeed's universal form, and the rank state is rank 0's
        (its sampler position is rescaled by the caller; the per-rank RNG streams cannot carry over)."""
        path = Path(path)
        rank_file = path / f"rank-{0 if universal_root else D.rank():05d}.pt"
        if not rank_file.is_file():
            raise CheckpointError(f"{rank_file} is missing: the checkpoint is incomplete")
        try:
            loaded, _ = engine.load_checkpoint(str(universal_root or path.parent), tag=path.name,
                                               load_module_strict=False)
            state = torch.load(rank_file, weights_only=False)
        except Exception as err:  # noqa: BLE001 - unpickling errors of a damaged file come in many types
            raise CheckpointError(f"{path}: could not be loaded ({type(err).__name__}: {err})") from None
        if loaded is None:
            raise CheckpointError(f"DeepSpeed could not load the checkpoint in {path}")
        return state


def check_compatible(meta: dict, fingerprint: dict, layout: dict, path: Path) -> bool:
    """Refuse, before any model is loaded, a checkpoint made by a different run. Returns whether it was written with
    another data-parallel layout (world size, micro-batch, accumulation: ``layout``), which resumes through DeepSpeed's
    universal checkpoint."""
    theirs = meta.get("fingerprint", {})
    diffs = [f"{k}: checkpoint has {theirs.get(k)!r}, this run has {v!r}" for k, v in fingerprint.items()
             if theirs.get(k) != v]
    if diffs:
        raise CheckpointError(f"{path} comes from another run; refusing to resume:\n  " + "\n  ".join(diffs)
                              + "\n(start afresh in another train.output_dir)")
    return any(meta.get("layout", {}).get(k) != v for k, v in layout.items())


def to_universal(path: Path) -> Path:
    """Collective: DeepSpeed's universal form of the checkpoint ``path`` (made once, by rank 0, kept beside it in
    ``checkpoints/universal/step-N``), which any world size and micro-batch can load. Returns the folder holding it."""
    root = path.parent / "universal"
    target = root / path.name
    if D.is_main() and not (target / MANIFEST).is_file():
        import argparse

        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        partial = root / f".tmp-{path.name}"
        shutil.rmtree(partial, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
        ds_to_universal(argparse.Namespace(input_folder=str(path), output_folder=str(partial), num_extract_workers=1,
                                           num_merge_workers=1, keep_temp_folder=False, strict=True,
                                           inject_missing_state=True))
        atomic_write_text(partial / MANIFEST, json.dumps({"files": {}, "from": str(path)}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(partial, target)
        log.info("converted %s to DeepSpeed's universal checkpoint %s", path.name, target)
    D.barrier()
    return root


def fault_requested(where: str, step: int) -> bool:
    """Test hook: THANORA_FAULT=WHERE:STEP (after_engine_save, before_rename: SIGKILL inside that save;
    nan_adapter: a NaN written into an adapter after that optimizer step; pause_after: idle after that step
    until a stop is requested, then checkpoint and exit)."""
    return os.environ.get("THANORA_FAULT", "") == f"{where}:{step}"


def _fault_point(where: str, step: int) -> None:
    """SIGKILL this process at that point of the save of step STEP when the test hook asks for it, to prove that
    an interrupted save leaves the previous checkpoint usable."""
    if fault_requested(where, step):
        os.kill(os.getpid(), signal.SIGKILL)
