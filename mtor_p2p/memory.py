"""Process-wide memory allocator settings for a peer that moves large messages.

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
import os
import sys
from pathlib import Path

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
