"""On-disk cache of the validated, tokenized data, so that a restart (SLURM requeue, a second run on the same
data) neither re-reads nor re-tokenizes anything.

What is cached: everything `build_multitask_data` computes before splitting: per task, every valid example's
token ids and labels, its id, source file, image paths and `content_start`, the per-task truncation counts, and
the whole validation log (problems, per-task skip counts, notices such as dropped leading gpt turns), which a
cached start replays through the same `ProblemLog.finish`, so its warnings and errors are exactly those of the
first start. Splits, mixing and sampling are recomputed from it (cheap and deterministic), so changing `seed`,
`preview_samples`, `eval_samples` or the mixing reuses the entry.

Key (sha256, `cache_key`): the cache format version (`FORMAT`, raised whenever encoding changes what it produces);
each data file's absolute path, size and modification time in nanoseconds; the data settings that change what is
encoded (sources with their task rules, the closed task list, image_folder, image_aspect_ratio, max_length,
skip_invalid, max_errors); a digest of the tokenizer's in-memory state (its full `tokenizers` JSON: vocabulary,
merges, normalizer, pre/post-processor; chat template; special and added tokens) and of the processor's (class,
image token, patch size, feature strategy, extra tokens, image processor settings, chat template); and the
versions of transformers, tokenizers, jinja2 and datasets (which render, tokenize and read). File identity is
(path, size, mtime_ns), as `datasets` itself keys its Arrow cache of local files, and not a content hash: it costs
one stat per file whereas hashing LLaVA-665K's 1 GB JSON costs a full read at every start; an edit through any
normal tool changes the mtime. The in-memory tokenizer state is digested, not its files, because a tokenizer is
often changed after loading (pad token, chat template) and that must invalidate too.

Images are not part of the key (hundreds of thousands of files): the entry records each image's size and mtime
at validation, and a cached start stats every image (no open, no decode); any difference, or a missing image, is
a warning and a rebuild, so an image that became unreadable is reported at start-up, not mid-training.

Store, and why not `datasets`: an entry is a folder `<cache_dir>/<key>/` with `tokens.safetensors` (the
`TokenStore` arrays of `tokens.py`: ids with image-token runs collapsed, a label mask, run positions and lengths,
row offsets), `records.json` (the per-example table, the tasks and the validation log), `references.json` (each
example's reference answer, its last assistant turn as written, read only when an evaluation scores it) and
`manifest.json` (written last: format, sizes and xxh3-128 checksums of the others). The token arrays are memory-mapped
(`numpy.memmap` at the byte ranges the safetensors header gives), so the ranks of a node share one copy in the page
cache. `datasets`' Arrow files (`save_to_disk`) would also memory-map, but a truncated one is not an error: an
Arrow file cut at a record batch boundary loads with `load_from_disk` as a shorter table (checked here with
datasets 5.2: 11000 of 20000 rows, no warning). An integrity check of our own is needed either way; safetensors is a
format this project already writes (HASI's statistics cache), with a header stating every tensor's exact byte
range, so a cut file is seen before the checksum is even computed.

Built once: with several ranks, rank 0 looks the entry up and builds it if needed while the others wait on a
barrier of their own gloo group (its timeout is a day, not the job's collective timeout: a first build of
LLaVA-665K tokenizes for a long while), then load it. A rank that cannot see rank 0's entry (a node-local cache
folder on a multi-node job, or a build that failed on rank 0) builds it itself, with a warning. Writes are atomic:
a temporary folder, fsynced, renamed into place; a reader never sees a half-written entry. An entry that fails its
check (missing or truncated file, checksum mismatch, unreadable JSON, another format) is rebuilt with a warning,
never used. A cache folder that cannot be written is a warning: the run goes on with what it built.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import shutil
import struct
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..checkpoint import fsync_path
from .config import DataConfig
from .errors import Problem, ProblemLog
from .tokens import ARRAYS, TokenStore

logger = logging.getLogger("thanora_ds.data")

FORMAT = 3   # 2: references.json; 3: content_start also skips the template's default system block
TOKENS, RECORDS, MANIFEST = "tokens.safetensors", "records.json", "manifest.json"
REFERENCES = "references.json"   # each example's reference answer (its last assistant turn), read only to evaluate
# settings of DataConfig that change what is encoded (the rest: splits, mixing, streaming, the cache itself)
ENCODING_KEYS = ("image_folder", "image_aspect_ratio", "max_length", "skip_invalid", "max_errors")
WAIT_TIMEOUT = datetime.timedelta(hours=24)


def default_cache_dir() -> str:
    """`$THANORA_DATA_CACHE`, else `$XDG_CACHE_HOME/thanora_ds/data` (`~/.cache/thanora_ds/data`).

    A user-level folder, as `datasets` keeps `~/.cache/huggingface/datasets`, rather than the run's output folder:
    the data code is not told the output folder, entries are keyed by what they were built from so runs on the same
    data share one (a grid of runs, or a new output folder for the same data, builds nothing), and a home folder is
    usually on the shared filesystem a multi-node job needs. An entry of LLaVA-665K takes a few GB: point
    `data.cache_dir` at a scratch filesystem where home has a small quota."""
    env = os.environ.get("THANORA_DATA_CACHE")
    if env:
        return os.path.abspath(os.path.expanduser(env))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "thanora_ds", "data")


# ----------------------------------------------------------------------------------------------
# what is cached


@dataclass
class EncodedData:
    """The result of validation and tokenization, before splitting: what one cache entry holds."""

    tasks: list[str]                      # task names; items' task_id index this list
    store: TokenStore                     # every example's input ids and labels (row i: example i)
    task_id: list[int]
    record_id: list[str]
    source: list[str]
    images: list[list[str]]
    content_start: list[int]
    truncated: dict[str, int]
    log: ProblemLog
    image_stat: dict[str, list[int]] = field(default_factory=dict)  # image path -> [size, mtime_ns] at validation
    # each example's reference answer: in memory after a build; from a cache entry, the file (read when needed)
    reference: Optional[list[str]] = None
    reference_file: Optional[str] = None

    def references(self) -> list[str]:
        if self.reference is None:
            self.reference = json.loads(Path(self.reference_file).read_text(encoding="utf-8"))
            if len(self.reference) != len(self):
                raise ValueError(f"{self.reference_file}: {len(self.reference)} references for {len(self)} examples")
        return self.reference

    def __len__(self) -> int:
        return len(self.task_id)


def _file_identity(path: str) -> dict:
    try:
        st = os.stat(path)
    except OSError:
        return {"path": os.path.abspath(path), "missing": True}
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def image_stat(path: str) -> Optional[list[int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def image_stats(paths: list[str]) -> list[Optional[list[int]]]:
    """`image_stat` of every path, in threads: a stat waits on the filesystem (a network round trip on NFS or
    Lustre) with the GIL released, so hundreds of thousands of them overlap."""
    if len(paths) < 4096:
        return [image_stat(p) for p in paths]
    from concurrent.futures import ThreadPoolExecutor

    chunks = [paths[i:i + 2048] for i in range(0, len(paths), 2048)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        return [s for part in pool.map(lambda c: [image_stat(p) for p in c], chunks) for s in part]


def tokenizer_digest(tok) -> str:
    h = hashlib.sha256(type(tok).__name__.encode())
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # a slow tokenizer: its vocabulary is what it is
        h.update(json.dumps(sorted(tok.get_vocab().items())).encode())
    h.update(json.dumps({
        "chat_template": getattr(tok, "chat_template", None),
        "special": [str(t) for t in tok.all_special_tokens], "special_ids": list(tok.all_special_ids),
        "eos": tok.eos_token_id, "pad": tok.pad_token_id, "bos": tok.bos_token_id,
        "added": {str(k): str(v) for k, v in getattr(tok, "added_tokens_decoder", {}).items()},
    }, sort_keys=True, default=str).encode())
    return h.hexdigest()


def processor_digest(processor) -> Optional[str]:
    if processor is None:
        return None
    ip = getattr(processor, "image_processor", None)
    state = {
        "class": type(processor).__name__,
        "chat_template": getattr(processor, "chat_template", None),
        **{k: getattr(processor, k, None) for k in ("image_token", "image_token_id", "patch_size",
                                                     "vision_feature_select_strategy", "num_additional_image_tokens")},
        "image_processor": None if ip is None else {"class": type(ip).__name__, **ip.to_dict()},
    }
    return hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("transformers", "tokenizers", "jinja2", "datasets"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def key_parts(cfg: DataConfig, tokenizer, processor) -> dict:
    """Everything the cache key is the digest of (see the module docstring), as plain JSON."""
    settings = {k: getattr(cfg, k) for k in ENCODING_KEYS}
    settings["sources"] = [asdict(s) for s in cfg.sources]
    settings["tasks"] = sorted(cfg.tasks)
    tok = tokenizer if tokenizer is not None else processor.tokenizer
    return {
        "format": FORMAT,
        "files": [_file_identity(s.path) for s in cfg.sources],
        "data": settings,
        "tokenizer": tokenizer_digest(tok),
        "processor": processor_digest(processor),
        "versions": _versions(),
    }


def cache_key(parts: dict) -> str:
    """The entry's folder name: sha256 of `key_parts`."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


# ----------------------------------------------------------------------------------------------
# writing and reading one entry


def _digest(path: Path) -> str:
    """xxh3-128 of the file (xxhash comes with `datasets`): ~20 GB/s, so checking a whole entry at every start costs
    little next to reading it; it guards against damage, not against tampering."""
    import xxhash

    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _log_state(log: ProblemLog) -> dict:
    return {
        "max_errors": log.max_errors, "total": log.total, "per_task": dict(log.per_task),
        "problems": [asdict(p) for p in log.problems], "fatal": [asdict(p) for p in log.fatal],
        "notices": log.notices, "notice_counts": dict(log.notice_counts),
        "notice_tasks": {k: dict(v) for k, v in log.notice_tasks.items()},
    }


def _log_from(state: dict) -> ProblemLog:
    from collections import Counter

    log = ProblemLog(state["max_errors"])
    log.total = state["total"]
    log.per_task = Counter(state["per_task"])
    log.problems = [Problem(**p) for p in state["problems"]]
    log.fatal = [Problem(**p) for p in state["fatal"]]
    log.notices = {k: list(v) for k, v in state["notices"].items()}
    log.notice_counts = Counter(state["notice_counts"])
    log.notice_tasks = {k: Counter(v) for k, v in state["notice_tasks"].items()}
    return log


def save(entry: Path, enc: EncodedData, parts: Optional[dict] = None) -> bool:
    """Write `enc` as the entry `entry` atomically; True if written (False, with a warning, if it cannot be)."""
    from safetensors.numpy import save_file

    tmp = entry.parent / f".{entry.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
        save_file(enc.store.arrays(), str(tmp / TOKENS))
        sources = sorted(set(enc.source))
        source_index = {s: i for i, s in enumerate(sources)}
        paths = sorted({p for imgs in enc.images for p in imgs} | set(enc.image_stat))
        path_index = {p: i for i, p in enumerate(paths)}
        table = {
            "tasks": enc.tasks, "truncated": enc.truncated, "log": _log_state(enc.log),
            "sources": sources, "image_paths": paths, "image_stat": [enc.image_stat.get(p) for p in paths],
            "task_id": enc.task_id, "record_id": enc.record_id, "source": [source_index[s] for s in enc.source],
            "images": [[path_index[p] for p in imgs] for imgs in enc.images], "content_start": enc.content_start,
        }
        (tmp / RECORDS).write_text(json.dumps(table, separators=(",", ":")))
        (tmp / REFERENCES).write_text(json.dumps(enc.references(), separators=(",", ":")), encoding="utf-8")
        manifest = {"format": FORMAT, "examples": len(enc), "built": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "files": {name: {"size": (tmp / name).stat().st_size, "xxh3_128": _digest(tmp / name)}
                              for name in (TOKENS, RECORDS, REFERENCES)},
                    "key_parts": parts}
        for name in (TOKENS, RECORDS, REFERENCES):
            fsync_path(tmp / name)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
        fsync_path(tmp / MANIFEST)
        if entry.exists():  # a damaged entry being replaced (a sound one is never rebuilt)
            old = entry.parent / f".{entry.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(entry, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, entry)
        except OSError:  # another process renamed its (identical) entry into place first
            if not (entry / MANIFEST).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        prune(entry.parent, keep=entry.name)
        return True
    except OSError as err:
        logger.warning("data cache: cannot write %s (%s); continuing without saving it", entry, err)
        shutil.rmtree(tmp, ignore_errors=True)
        return False


def prune(root: Path, keep: str = "") -> list[str]:
    """Remove the entries none of whose data files exists any more (data in a deleted temporary folder, a moved
    data set: nothing can hit them again), and temporary folders of writers that died more than a day ago.
    Returns the names removed."""
    removed = []
    try:
        children = list(root.iterdir())
    except OSError:
        return removed
    for child in children:
        if child.name == keep or not child.is_dir():
            continue
        try:
            if child.name.startswith("."):
                gone = time.time() - child.stat().st_mtime > 86400
            else:
                files = json.loads((child / MANIFEST).read_text()).get("key_parts", {}).get("files") or []
                gone = bool(files) and not any(os.path.exists(f["path"]) for f in files)
        except (OSError, ValueError, AttributeError, TypeError, KeyError):
            continue  # an entry being written by someone else, or not ours: leave it
        if gone:
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child.name)
    return removed


def _memmap_tensors(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file as read-only memory maps (header: u64 length, JSON, then the data)."""
    dtypes = {"I32": np.int32, "I64": np.int64, "U8": np.uint8}
    size = path.stat().st_size
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise ValueError("header longer than the file")
        header = json.loads(f.read(n))
    out = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        begin, end = spec["data_offsets"]
        dtype = dtypes[spec["dtype"]]
        count = int(np.prod(spec["shape"])) if spec["shape"] else 1
        if 8 + n + end > size or end - begin != count * np.dtype(dtype).itemsize:
            raise ValueError(f"tensor {name} lies outside the file (truncated)")
        out[name] = (np.memmap(path, dtype=dtype, mode="r", offset=8 + n + begin, shape=(count,))
                     if count else np.zeros(0, dtype=dtype))
    return out


def load(entry: Path) -> Optional[EncodedData]:
    """The entry's data, or None: silently if there is no entry, with a warning if it is damaged or an image it
    names has changed since."""
    if not (entry / MANIFEST).exists():
        if entry.exists():
            logger.warning("data cache: %s has no manifest (an incomplete entry); rebuilding it", entry)
        return None
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
        if manifest.get("format") != FORMAT:
            raise ValueError(f"format {manifest.get('format')} (this code writes {FORMAT})")
        for name, want in manifest["files"].items():
            size = (entry / name).stat().st_size
            if size != want["size"]:
                raise ValueError(f"{name} is {size} bytes, the manifest says {want['size']} (truncated?)")
            if _digest(entry / name) != want["xxh3_128"]:
                raise ValueError(f"{name}: its checksum differs from the manifest (damaged)")
        tensors = _memmap_tensors(entry / TOKENS)
        table = json.loads((entry / RECORDS).read_text())
        if set(tensors) != set(ARRAYS):
            raise ValueError(f"tensors {sorted(tensors)}, expected {sorted(ARRAYS)}")
        store = TokenStore.from_arrays(tensors)
        store.check()
        n = len(table["task_id"])
        if n != manifest["examples"] or len(store) != n:
            raise ValueError("the example table and the token arrays disagree")
        paths, stats, sources = table["image_paths"], table["image_stat"], table["sources"]
        enc = EncodedData(
            tasks=table["tasks"], store=store,
            task_id=table["task_id"], record_id=table["record_id"], source=[sources[i] for i in table["source"]],
            images=[[paths[i] for i in imgs] for imgs in table["images"]], content_start=table["content_start"],
            truncated=table["truncated"], log=_log_from(table["log"]), image_stat=dict(zip(paths, stats)),
            reference_file=str(entry / REFERENCES),
        )
        if not (len(enc.record_id) == len(enc.source) == len(enc.images) == len(enc.content_start) == n
                and len(stats) == len(paths) and all(0 <= t < len(enc.tasks) for t in enc.task_id)):
            raise ValueError("the example table's columns disagree")
    except Exception as err:  # noqa: BLE001 - any damage means: rebuild, never use it
        logger.warning("data cache: %s is damaged (%s); rebuilding it", entry, err)
        return None
    changed = [p for p, s, now in zip(paths, stats, image_stats(paths)) if now != s]
    if changed:
        logger.warning("data cache: %d image(s) changed or disappeared since %s was built (e.g. %s); rebuilding it",
                       len(changed), entry, ", ".join(changed[:3]))
        return None
    return enc


# ----------------------------------------------------------------------------------------------
# built once over all ranks


@dataclass
class CacheInfo:
    """How this start got its data: `status` is `off`, `hit`, `built` (and saved), `built-unsaved`, or
    `built-here` (a rank that could not see rank 0's entry)."""

    status: str = "off"
    path: Optional[str] = None
    seconds: float = 0.0


def cached(cfg: DataConfig, tokenizer, processor, build: Callable[[], EncodedData]) -> tuple[EncodedData, CacheInfo]:
    """`build()`'s result through the cache (see the module docstring for the protocol). Every rank calls it."""
    from .. import distributed as D

    t0 = time.time()
    if not cfg.cache:
        return build(), CacheInfo("off", None, time.time() - t0)
    parts = key_parts(cfg, tokenizer, processor)
    key = cache_key(parts)
    root = Path(cfg.cache_dir or default_cache_dir())
    entry = root / key

    def build_and_save(status: str) -> tuple[EncodedData, CacheInfo]:
        enc = build()
        saved = save(entry, enc, parts)
        if saved:
            logger.info("data cache: built and saved %s (%d examples)", entry, len(enc))
        return enc, CacheInfo(status if saved else "built-unsaved", str(entry), time.time() - t0)

    def hit(enc: EncodedData) -> tuple[EncodedData, CacheInfo]:
        info = CacheInfo("hit", str(entry), time.time() - t0)
        logger.info("data cache: loaded %s (%d examples, %.1fs)", entry, len(enc), info.seconds)
        return enc, info

    if D.world_size() == 1:
        enc = load(entry)
        return hit(enc) if enc is not None else build_and_save("built")

    import torch.distributed as dist

    group = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)
    try:
        if D.is_main():
            enc = load(entry)
            if enc is not None:
                dist.barrier(group=group)
                return hit(enc)
            try:
                return build_and_save("built")
            finally:  # the others wait for this, whether the build worked or raised
                dist.barrier(group=group)
        dist.barrier(group=group)
        enc = load(entry)
        if enc is not None:
            return hit(enc)
        logger.warning("data cache: rank %d does not see the entry rank 0 built (%s: a folder that is not shared "
                       "between nodes, or rank 0's build failed); building it on this rank", D.rank(), entry)
        return build_and_save("built-here")
    finally:
        dist.destroy_process_group(group)
