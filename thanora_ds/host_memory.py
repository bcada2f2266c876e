"""Host (CPU) memory of the process: what glibc's malloc keeps, and keeping HASI's working memory out of it.

HASI allocates and frees gigabytes in pieces of a few MB; glibc keeps freed heap memory in the process and,
after the first large frees, serves such pieces from its main heap. ``trim_host_memory`` gives the freed heap
back after HASI; ``hasi_heap_scope`` keeps HASI's pieces out of the heap in the first place and ``in_own_arena``
runs HASI in a malloc arena of its own (issue 14, docs/performance.md sections 2 and 3). The glibc calls go through ctypes; elsewhere (musl, macOS) they are no-ops.
"""
from __future__ import annotations

import contextlib

import torch


def trim_host_memory() -> bool:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``); on CUDA also empty torch's cache.

    HASI allocates and frees gigabytes of statistics and fp64 decomposition workspaces in pieces of a few MB.
    glibc raises its mmap threshold after the first large frees, so later pieces come from the heap, and the
    freed heap stays in the process: on SmolLM2 (1 process) RSS after HASI was 5.2 GB with 0.56 GB of live
    tensors, 1.2 GB after malloc_trim, as in a plain LoRA run. Returns whether the trim ran (glibc only)."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        trim = getattr(libc, "malloc_trim", None)
    except OSError:
        trim = None
    if trim is None:
        return False
    trim(0)
    return True


# glibc malloc introspection (issue 14: heap behaviour of the training steps after HASI). glibc serves an allocation
# of at least its mmap threshold with a fresh mmap (returned to the OS on free) and smaller ones from the heap
# (kept by the process). The threshold is dynamic: freeing an mmapped chunk larger than it (up to 32 MiB on 64-bit)
# raises it to that chunk's size, and nothing lowers it again (mallopt(M_MMAP_THRESHOLD) pins it).

_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 2**20        # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit


def _libc():
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    if libc is None or not all(hasattr(libc, f) for f in ("mallinfo2", "mallopt", "malloc", "free")):
        return None
    return libc


def heap_info() -> dict | None:
    """glibc's ``mallinfo2``: bytes in the heap arenas (``arena``), free in them (``fordblks``), in mmapped chunks
    (``hblkhd``, ``hblks`` of them). None without glibc >= 2.33."""
    import ctypes

    libc = _libc()
    if libc is None:
        return None

    class MallInfo2(ctypes.Structure):
        _fields_ = [(f, ctypes.c_size_t) for f in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc.mallinfo2.restype = MallInfo2
    info = libc.mallinfo2()
    return {f: int(getattr(info, f)) for f, _ in MallInfo2._fields_}


def mmap_threshold(step: float = 1.02, low: int = 2**16) -> int | None:
    """glibc's current mmap threshold (to ``step`` precision), found by malloc/free of growing sizes and checking
    whether ``mallinfo2`` counts a new mmapped chunk: the smallest size served by mmap. Scanning upward, so the
    probe itself raises the threshold by at most one page. Nothing is touched (no page faults). An upper bound when
    the heap holds free chunks of such sizes (they serve a request before mmap is considered); None without glibc
    or when no size up to 33 MiB is mmapped."""
    import ctypes

    libc = _libc()
    if libc is None:
        return None
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size = low
    while size <= _MMAP_THRESHOLD_MAX + 2**20:
        before = heap_info()["hblks"]
        ptr = libc.malloc(size)
        mapped = heap_info()["hblks"] > before
        libc.free(ptr)
        if mapped:
            return size
        size = int(size * step) + 1
    return None


def pin_mmap_threshold(size: int) -> bool:
    """``mallopt(M_MMAP_THRESHOLD, size)``: allocations of ``size`` bytes and more are mmapped from now on (and
    glibc stops adjusting the threshold). Returns whether it was set."""
    libc = _libc()
    return bool(libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, int(size)) == 1)


_M_TRIM_THRESHOLD = -1
HASI_MMAP_THRESHOLD = 2**20        # during HASI: pieces of 1 MiB and more are mmapped (returned to the OS on free)


@contextlib.contextmanager
def hasi_heap_scope(threshold: int = HASI_MMAP_THRESHOLD):
    """Keep HASI's working memory out of glibc's main heap (issue 14, measured in docs/performance.md section 3).

    HASI holds gigabytes at once in pieces of one to a few MB (statistics, weight copies, covariances, fp64
    decomposition workspaces), below glibc's dynamic mmap threshold after the model load (~19 MiB measured on
    SmolLM2), so without this scope they grew the main heap to 4.0 GB (mallinfo2 ``arena``). Allocations still alive
    at its top after HASI keep that extent: ``malloc_trim`` hands the free pages back (RSS as plain LoRA's after
    setup), but 3.3 GB of free chunks stay inside the heap, the training steps are served from them all over the
    4 GB instead of from a compact heap, and RSS grew to 3.6 GB against plain LoRA's 2.3 GB after 6 steps, with
    equal live tensors. Inside this scope pieces of ``threshold`` bytes and more are mmapped (returned to the OS on
    free), so HASI's memory never enters the heap. glibc cannot re-enable its dynamic threshold afterwards: it is
    pinned at the dynamic rule's maximum (32 MiB; trim threshold 64 MiB, twice it, as that rule sets it). Raising a
    plain LoRA run's threshold to 27 MiB (benchmarks/step_time.py --probe, variant lora_mmap28) changed neither
    its RSS nor its CPU time per step beyond the machine's noise. Yields whether it applied (glibc only)."""
    if not pin_mmap_threshold(threshold):
        yield False
        return
    try:
        yield True
    finally:
        pin_mmap_threshold(_MMAP_THRESHOLD_MAX)
        libc = _libc()
        if libc is not None:
            libc.mallopt(_M_TRIM_THRESHOLD, 2 * _MMAP_THRESHOLD_MAX)


def in_own_arena(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` on a fresh thread, so that glibc serves its allocations from a malloc arena of its own.

    HASI's pieces below ``hasi_heap_scope``'s threshold (small tensors, Python objects, per-layer temporaries) still
    entered the main heap between allocations that outlive HASI, and the heap's free chunks then let RSS grow during
    training (one process, SmolLM2, statistics-only init: 0.4 GB more free heap than plain LoRA after 7 steps). A new
    thread gets a new arena while glibc's limit allows (8 per core; beyond it threads share arenas, as before this
    change); what HASI frees there is never mixed into the main heap that the training steps reuse. The CUDA device is per thread: the caller's is set on the new one. Exceptions propagate;
    the thread is a daemon so that a signal that ends the main thread does not wait for it."""
    import threading

    result: dict = {}
    device = torch.cuda.current_device() if torch.cuda.is_available() else None

    def target():
        try:
            if device is not None:
                torch.cuda.set_device(device)
            result["value"] = fn(*args, **kwargs)
        except BaseException as err:   # noqa: BLE001 - re-raised in the caller's thread
            result["error"] = err

    thread = threading.Thread(target=target, name="hasi", daemon=True)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]
