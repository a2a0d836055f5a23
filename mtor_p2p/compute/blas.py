"""How many threads the BLAS library of this process may use.

A node runs its event loop (the network, the handlers) and blocking work (kernels, the
requester's Freivalds check) in the same process. OpenBLAS starts one thread per core and its
threads spin while they wait for work, so on a 2-core machine a product on a worker thread
takes both cores and the event loop waits for the scheduler to give it one back: measured on
the requester, the 0.4 ms of float32 products of a 512x512 check took 13 ms. A node therefore
caps BLAS at one thread fewer than the cores it may run on (at least one).

The cap goes through ``threadpoolctl`` when it is installed, else through the OpenBLAS that
NumPy loaded (found in ``/proc/self/maps``, set with its ``*_set_num_threads`` function). A
user who set ``OPENBLAS_NUM_THREADS``, ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS`` keeps that
choice; ``MTOR_BLAS_THREADS`` overrides the default here.
"""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Environment variables by which a user already chose BLAS threads at process start.
USER_SETTINGS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
#: Overrides :func:`default_blas_threads`.
OVERRIDE = "MTOR_BLAS_THREADS"
#: Functions that set OpenBLAS's thread count, as NumPy's and distributions' builds name them.
_OPENBLAS_SETTERS = (
    "scipy_openblas_set_num_threads64_",
    "scipy_openblas_set_num_threads",
    "openblas_set_num_threads64_",
    "openblas_set_num_threads",
)


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_blas_threads(cores: int | None = None) -> int:
    """One thread fewer than ``cores`` (default: :func:`usable_cores`), at least one, so that
    the event loop keeps a core; ``MTOR_BLAS_THREADS`` overrides it."""
    override = os.environ.get(OVERRIDE, "").strip()
    if override.isdigit() and int(override) > 0:
        return int(override)
    return max(1, (usable_cores() if cores is None else cores) - 1)


def limit_blas_threads(threads: int | None = None) -> int | None:
    """Cap this process's BLAS thread pools at ``threads`` (default
    :func:`default_blas_threads`). Returns the cap set, or None when the user already chose
    one by environment or no BLAS library could be told."""
    if threads is None:
        if any(os.environ.get(name) for name in USER_SETTINGS):
            return None
        threads = default_blas_threads()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return threads if _set_openblas_threads(threads) else None
    threadpool_limits(limits=threads, user_api="blas")
    return threads


_OPENBLAS_GETTERS = (
    "scipy_openblas_get_num_threads64_",
    "scipy_openblas_get_num_threads",
    "openblas_get_num_threads64_",
    "openblas_get_num_threads",
)
_getters: list[Any] | None = None


def single_threaded() -> bool:
    """True if every BLAS library loaded here is OpenBLAS running one thread now.

    Only then may a small product run on the event loop: OpenBLAS serialises its
    multi-threaded calls within a process, so with more threads a 0.6 ms check waited for
    another thread's large product (measured: the loop stalled 633 ms behind a 3072²
    product with 2 BLAS threads, under 1 ms with one). Unknown libraries count as not."""
    global _getters
    if _getters is None:
        _getters = _openblas_functions(_OPENBLAS_GETTERS, [], ctypes.c_int)
    return bool(_getters) and all(getter() == 1 for getter in _getters)


def _set_openblas_threads(threads: int) -> bool:
    """Set the thread count of every OpenBLAS loaded in this process; True if one was."""
    setters = _openblas_functions(_OPENBLAS_SETTERS, [ctypes.c_int], None)
    for setter in setters:
        setter(threads)
    done = bool(setters)
    if not done:
        log.info("no BLAS thread control found; set OPENBLAS_NUM_THREADS to cap BLAS threads")
    return done


def _openblas_functions(names: tuple[str, ...], argtypes: list[Any], restype: Any) -> list[Any]:
    """For every OpenBLAS loaded in this process, the first of ``names`` it exports."""
    found = []
    for path in _loaded_libraries("openblas"):
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        for name in names:
            function = getattr(library, name, None)
            if function is not None:
                function.argtypes = argtypes
                function.restype = restype
                found.append(function)
                break
    return found


def _loaded_libraries(fragment: str) -> list[str]:
    """Paths of the shared libraries mapped into this process whose name holds ``fragment``."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    paths = []
    for line in maps.splitlines():
        path = line.split(maxsplit=5)[-1] if line.count(" ") >= 5 else ""
        if fragment in Path(path).name.lower() and path not in paths:
            paths.append(path)
    return paths
