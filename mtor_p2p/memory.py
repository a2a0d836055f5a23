"""Process-wide memory settings for a peer that moves large messages, and large arrays whose
memory is used again (:class:`RecycledArrays`: a requester's job outputs).

Every request or response a peer receives becomes a new ``bytes`` object (a 4 MiB upload
chunk, a 1 MiB result). With glibc's defaults, freed blocks of that size go back to the
kernel (blocks above the mmap threshold are unmapped; the heap's top is trimmed past the
trim threshold), so the next message faults in fresh, zeroed pages: measured on loopback, that
cost more than decrypting the message (AES-GCM runs at about 9 GB/s here; a 4 MiB lane
message went from about 820 to 1,240 MiB/s with the settings below).

:func:`keep_freed_memory_for_reuse` raises the mmap threshold to its maximum (32 MiB on
64-bit glibc) and keeps up to :data:`TRIM_THRESHOLD_BYTES` of freed heap for reuse. The cost:
a process may hold that much freed memory (counted in its RSS) after a burst of traffic.
On other C libraries it does nothing.

:func:`fault_in_small_pages` stops NumPy from advising transparent huge pages for its large
arrays (a job's output, an 8192² operand). With the kernel's usual ``defrag=madvise``, a
fault in an advised region compacts memory on the spot when no huge page is free: measured
on the project's VM, writing a fresh 200 MiB array cost 1.8-2.4 ms per MiB that way, against
0.6 ms per MiB in small pages (and 0.13 ms when huge pages happened to be free). The requester
of a 200-shard 512² job spent 1.7-1.9 CPU-s instead of 1.9-2.7, interleaved runs. On the AMD
EPYC VM (2026-12-05), ``compact_stall`` in ``/proc/vmstat`` stayed 0 through such runs: there
the slow part is a huge page's first touch, not compaction, and small pages still won
(requester 4.6 against 5.5 ms of CPU per 512² shard, ``BENCHMARKS.md``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math
import mmap
import os
import sys
import threading
import weakref
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Blocks up to this size come from the heap (glibc refuses more than 32 MiB on 64-bit).
MMAP_THRESHOLD_BYTES = 32 << 20
#: Freed heap kept for reuse before the top of the heap is given back to the kernel.
TRIM_THRESHOLD_BYTES = 128 << 20

_done = False


def keep_freed_memory_for_reuse() -> bool:
    """Apply the settings once per process; whether they took effect."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt, nothing to tune
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
    if not ok:
        log.debug("mallopt refused the large-message settings")
    _done = ok
    return ok


#: The kernel's THP defrag modes in which a fault in an madvised region compacts on the spot
#: (Documentation/admin-guide/mm/transhuge.rst): the bracketed word of the file below.
_STALLING_DEFRAG_MODES = {"always", "madvise", "defer+madvise"}
_DEFRAG_SETTING = "/sys/kernel/mm/transparent_hugepage/defrag"


def _advised_faults_stall(setting: str = _DEFRAG_SETTING) -> bool:
    try:
        text = Path(setting).read_text(encoding="ascii")
    except OSError:
        return False
    chosen = text[text.find("[") + 1 : text.find("]")] if "[" in text else ""
    return chosen in _STALLING_DEFRAG_MODES


def fault_in_small_pages() -> bool:
    """Stop NumPy advising huge pages for large arrays in this process (see the module's
    docstring), where the kernel compacts memory on the spot for advised regions; whether it
    did. A user's own ``NUMPY_MADVISE_HUGEPAGE`` setting wins.

    Process-wide and not undone (NumPy has one switch): a program embedding ``mtor_p2p``
    that wants huge pages for its own arrays sets ``NUMPY_MADVISE_HUGEPAGE=1``.
    """
    if "NUMPY_MADVISE_HUGEPAGE" in os.environ or not sys.platform.startswith("linux"):
        return False
    if not _advised_faults_stall():
        return False
    try:
        from numpy._core.multiarray import _set_madvise_hugepage
    except ImportError:  # NumPy < 2: the same switch under its old name
        try:
            from numpy.core.multiarray import _set_madvise_hugepage  # type: ignore[no-redef]
        except ImportError:
            return False
    try:
        _set_madvise_hugepage(False)
    except Exception as exc:  # a private switch: never worth failing a host's start for
        log.debug("could not stop NumPy advising huge pages: %s", exc)
        return False
    return True


def tune_for_large_messages() -> None:
    """Both settings, once per process: what a peer that moves large arrays wants."""
    keep_freed_memory_for_reuse()
    fault_in_small_pages()


#: Recycling needs private anonymous mappings and madvise(2)'s MADV_FREE (the pages' contents
#: may be discarded when memory runs short; written again before that, they stay: Linux 4.5
#: and later, the BSDs, macOS). Elsewhere arrays come from np.empty as before.
_CAN_RECYCLE = all(hasattr(mmap, name) for name in ("MAP_PRIVATE", "MAP_ANONYMOUS", "MADV_FREE"))
#: Recycled arrays keep at most this many bytes of freed regions, and at most this many.
RECYCLED_FREE_BYTES = 1 << 30
RECYCLED_FREE_REGIONS = 4


def _advise_free(region: mmap.mmap) -> bool:
    """Advise ``region`` MADV_FREE; whether the kernel took the advice."""
    try:
        region.madvise(mmap.MADV_FREE)
    except (OSError, ValueError):  # an old kernel, a sandbox that refuses it
        return False
    return True


class RecycledArrays:
    """Large arrays whose memory is used again, once nothing refers to it, by the next array
    asked for (a requester's job outputs: one per job, the same size job after job).

    Why: an array above glibc's largest mmap threshold (32 MiB) is a fresh mapping each
    time, faulted in a page at a time as it is first written: 0.43-0.51 ms per MiB of small
    pages on the project's VM (Intel Xeon, 2026-12-05), against 0.10 ms to write memory
    already mapped. In a requester's B-shared 512² job, copying each answer into the job's
    output was 11-14% of its event loop's samples, nearly all of it those faults.

    A region comes back once the last array or view on it is gone (a weak reference to the
    buffer NumPy holds). It is then advised ``MADV_FREE``, before anyone may take it: the
    kernel may take its pages back if memory runs short (the next write then faults in fresh
    ones), and otherwise leaves them mapped (a write costs 0.21-0.24 ms per MiB there); a
    region the kernel refuses that advice for is unmapped, not kept. Such pages count in the
    process's RSS until taken back. Where there is no MADV_FREE, arrays come from
    ``np.empty``. At most :data:`RECYCLED_FREE_REGIONS` regions and
    :data:`RECYCLED_FREE_BYTES` wait for reuse; a region is reused for an array of at least
    half its size. Thread-safe; a region given back while another thread holds the lock is
    unmapped instead of waited for (a weak reference's callback may run inside any
    allocation).
    """

    def __init__(
        self,
        *,
        min_bytes: int = MMAP_THRESHOLD_BYTES,
        max_free_bytes: int = RECYCLED_FREE_BYTES,
        max_free: int = RECYCLED_FREE_REGIONS,
    ) -> None:
        self.min_bytes = min_bytes
        self.max_free_bytes = max_free_bytes
        self.max_free = max_free
        self._free: list[mmap.mmap] = []  # oldest first
        self._lock = threading.Lock()
        #: Every region made, alive (see owns).
        self._regions: weakref.WeakSet[mmap.mmap] = weakref.WeakSet()
        #: Arrays made on a recycled region, and on a fresh one (for tests and benchmarks).
        self.reused = self.fresh = 0

    def empty(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """An uninitialised C-contiguous array, as ``np.empty`` (its contents may be an
        earlier array's: every element is to be written before it is read)."""
        dtype = np.dtype(dtype)
        count = math.prod(shape)
        nbytes = count * dtype.itemsize
        if nbytes < self.min_bytes or not _CAN_RECYCLE or dtype.hasobject:
            return np.empty(shape, dtype)
        region = self._take(nbytes)
        if region is None:
            region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            self._regions.add(region)
            self.fresh += 1
        else:
            self.reused += 1
        flat = np.frombuffer(region, dtype, count=count)
        # flat.base is the buffer NumPy took from the region: every array or view on this
        # memory leads to it, so it is gone only when they all are.
        assert isinstance(flat.base, memoryview), type(flat.base)
        weakref.finalize(flat.base, self._give_back, region).atexit = False
        return flat.reshape(shape)

    def owns(self, array: np.ndarray) -> bool:
        """Whether ``array``'s memory is a region this made: a private mapping of this
        process's own, over whose whole pages another private mapping may be placed (a
        worker's sealed output, ``local_share.take_shared_output``). A region so changed is
        unmapped when given back, never reused: the kernel refuses ``MADV_FREE`` on file
        pages, and a region it refuses that advice for is not kept."""
        base: Any = array
        while isinstance(base, np.ndarray):
            base = base.base
        return (
            isinstance(base, memoryview)
            and isinstance(base.obj, mmap.mmap)
            and base.obj in self._regions
        )

    def _take(self, nbytes: int) -> mmap.mmap | None:
        with self._lock:
            fits = [r for r in self._free if nbytes <= len(r) <= 2 * nbytes]
            if not fits:
                return None
            region = min(fits, key=len)
            self._free.remove(region)
            return region

    def _give_back(self, region: mmap.mmap) -> None:
        # Advised before it is listed: once listed, another thread may take it and write an
        # output into it, which a late MADV_FREE would let the kernel discard (a review
        # found that race). A region the kernel will not take back when memory runs short is
        # not kept at all.
        if len(region) > self.max_free_bytes or not _advise_free(region):
            self._close(region)
            return
        if not self._lock.acquire(blocking=False):
            self._close(region)
            return
        try:
            self._free.append(region)
            dropped = []
            while (
                len(self._free) > self.max_free
                or sum(len(r) for r in self._free) > self.max_free_bytes
            ):
                dropped.append(self._free.pop(0))
        finally:
            self._lock.release()
        for old in dropped:
            self._close(old)

    @staticmethod
    def _close(region: mmap.mmap) -> None:
        try:
            region.close()
        except BufferError:  # still exported somewhere: unmapped when that goes
            pass

    def free_bytes(self) -> int:
        """Bytes of regions waiting for reuse."""
        with self._lock:
            return sum(len(r) for r in self._free)


#: The process's recycled arrays (a requester's job outputs).
RECYCLED = RecycledArrays()
