"""A short matrix-product micro-benchmark giving the TFLOP/s a peer advertises.

CuPy on the first GPU when one is usable, NumPy otherwise. The result is cached in the data
directory, keyed by what was measured, so a restart does not spend seconds re-measuring.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mtor_p2p.capacity.record import Device
from mtor_p2p.config import write_private

log = logging.getLogger(__name__)

CACHE_FILE_NAME = "capacity-bench.json"
CACHE_MAX_AGE_SECONDS = 7 * 24 * 3600


@dataclass(frozen=True)
class BenchResult:
    """Achieved matrix-product throughput on one backend."""

    backend: str  # "numpy" or "cupy"
    dtype: str
    n: int
    tflops: float
    measured_at: float  # wall-clock seconds, for cache expiry only


def _best_of(fn: object, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        best = min(best, time.perf_counter() - start)
    return best


def bench_numpy(n: int = 1024, repeats: int = 5) -> BenchResult:
    """float32 n×n matrix product with NumPy; best of ``repeats`` runs."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b  # warm-up: BLAS thread start and page faults
    seconds = _best_of(lambda: a @ b, repeats)
    return BenchResult("numpy", "float32", n, 2 * n**3 / seconds / 1e12, time.time())


def bench_cupy(n: int = 4096, repeats: int = 10) -> BenchResult | None:
    """float32 n×n matrix product with CuPy on the current GPU; None if no GPU is usable."""
    try:
        import cupy  # type: ignore[import-not-found]

        if not cupy.cuda.is_available():
            return None
        from mtor_kernels.backend import force_float32_math

        force_float32_math()  # advertise float32 throughput, as the worker computes it, not TF32
        a = cupy.random.standard_normal((n, n), dtype=cupy.float32)
        b = cupy.random.standard_normal((n, n), dtype=cupy.float32)
        a @ b
        cupy.cuda.Device().synchronize()
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        best = float("inf")
        for _ in range(repeats):
            start.record()
            a @ b
            stop.record()
            stop.synchronize()
            best = min(best, cupy.cuda.get_elapsed_time(start, stop) / 1e3)
        return BenchResult("cupy", "float32", n, 2 * n**3 / best / 1e12, time.time())
    except Exception as exc:  # any CuPy/CUDA failure means: measure on the CPU instead
        log.info("CuPy benchmark unavailable (%s); using NumPy", type(exc).__name__)
        return None


def _cache_key(devices: list[Device]) -> str:
    names = ",".join(f"{d.kind}:{d.name}" for d in devices)
    return f"{names}|numpy={np.__version__}|cpus={os.cpu_count()}"


def measure_tflops(devices: list[Device], data_dir: Path | None, *, refresh: bool = False) -> float:
    """Achieved TFLOP/s of the best device, from the cache when it is fresh."""
    cache = data_dir / CACHE_FILE_NAME if data_dir is not None else None
    key = _cache_key(devices)
    if cache is not None and cache.exists() and not refresh:
        try:
            cached = json.loads(cache.read_text())
            if cached["key"] == key and time.time() - cached["measured_at"] < CACHE_MAX_AGE_SECONDS:
                return float(cached["tflops"])
        except (ValueError, KeyError, TypeError, OSError):
            log.info("ignoring unreadable benchmark cache %s", cache)
    result = None
    if any(d.kind == "gpu" for d in devices):
        result = bench_cupy()
    if result is None:
        result = bench_numpy()
    if cache is not None:
        write_private(cache, json.dumps({"key": key, **asdict(result)}))
    return result.tflops
