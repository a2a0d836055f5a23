"""Where kernels run: NumPy on the host, or CuPy on a CUDA device.

A :class:`Backend` gives kernels the same API on both sides:

* ``xp``: the array module (``numpy`` or ``cupy``) for elementwise work;
* :meth:`Backend.run`: one shard, host operands in, host result out (what a worker calls);
* :meth:`Backend.put` / :meth:`Backend.get`: host -> backend and backend -> host copies;
* :meth:`Backend.matmul`: a float32 result of ``a @ b`` for float32 or float16 operands, with
  float32 accumulation (float16 operands run on tensor cores on a GPU);
* a bounded cache of *resident* operands (weights, the ``B`` of a matmul) keyed by a
  caller-given content hash, so a matrix sent once stays on the device between shards.

The GPU data path (:class:`CupyBackend`, "GPU path" in ``docs/compute.md``):

* host buffers are page-locked (pinned) and come from a bounded pool (:class:`PinnedHostPool`)
  that reuses them and frees idle ones, so page-locked memory never grows without bound;
* a shard's rows are cut into chunks and each chunk's upload, compute and download run on three
  CUDA streams, so chunk ``i + 1`` is uploaded while chunk ``i`` computes and chunk ``i - 1``
  is downloaded;
* resident operands stay on the device in an LRU cache with a byte budget; out of memory
  evicts it, returns CuPy's pooled blocks and retries the shard once;
* float16 products run on tensor cores with float32 accumulation and output; float32 products
  never use TF32 (it would break the verification bounds), whatever ``CUPY_TF32`` says.

CuPy is an optional dependency: every ``import cupy`` is inside a function, so this module
imports (and the NumPy backend works) on machines without CuPy or without a GPU.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import gc
import hashlib
import logging
import math
import os
import queue
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "Backend",
    "BackendUnavailable",
    "CacheStats",
    "CupyBackend",
    "GpuStatus",
    "NumpyBackend",
    "PinnedHostPool",
    "PinnedStats",
    "ResidentCache",
    "content_key",
    "force_float32_math",
    "gpu_available",
    "gpu_status",
    "report_cpu_fallback",
    "select_backend",
]

log = logging.getLogger(__name__)

# CUDA / cuBLAS ABI constants (cuda_runtime_api.h, cublas_api.h). They are part of the C ABI and
# never change; spelling them out avoids depending on where a CuPy version re-exports them.
_CUDA_R_32F = 0
_CUDA_R_16F = 2
_CUBLAS_OP_N = 0
_CUBLAS_OP_T = 1
_CUBLAS_COMPUTE_32F = 68  # float32 accumulation, no TF32 down-conversion of the inputs
_CUBLAS_GEMM_DEFAULT_TENSOR_OP = 99
_CUDA_MEMORY_TYPE_HOST = 1  # cudaMemoryTypeHost: page-locked (pinned) host memory
# cublasMath_t: the low bits say which tensor-core shortcuts float32 routines may take.
_CUBLAS_MATH_MODE_MASK = 0xF
_CUBLAS_DEFAULT_MATH = 0
_CUBLAS_PEDANTIC_MATH = 2
# cublasStatus_t values that say "this call cannot work here", as opposed to a passing failure.
_CUBLAS_STATUS_ALLOC_FAILED = 3
_CUBLAS_STATUS_ARCH_MISMATCH = 8
_CUBLAS_STATUS_NOT_SUPPORTED = 15
_CUDA_ERROR_MEMORY_ALLOCATION = 2  # cudaErrorMemoryAllocation

_STAGING_CHUNK_BYTES = 8 << 20
_PIPELINE_MIN_BYTES = 16 << 20
_PIPELINE_CHUNK_BYTES = 16 << 20
_PIPELINE_MAX_CHUNKS = 8
# A row chunk of a 2-D operand keeps at least this many rows: a GEMM of fewer rows leaves
# tensor cores idle (the anchors: 83 TFLOP/s at n=1024 against 690 at 4096 in float16).
_PIPELINE_MIN_ROWS_2D = 256
_PINNED_MAX_BYTES = 512 << 20
_PINNED_IDLE_SECONDS = 30.0
_PINNED_ROUND_BYTES = 1 << 20


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here (CuPy missing, or no usable CUDA device)."""


# -- the resident cache ------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheStats:
    """Counters of a :class:`ResidentCache`."""

    hits: int
    misses: int
    evictions: int
    entries: int
    bytes: int
    max_bytes: int


class ResidentCache:
    """A least-recently-used map from content keys to backend arrays, bounded by bytes.

    Values are opaque (device arrays on CuPy); the cache only tracks their size. An entry larger
    than ``max_bytes`` is never stored. Thread-safe: a worker may run shards from several threads.
    An evicted array stays alive as long as a running shard still holds it.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._lock = threading.Lock()

    def lookup(self, key: str) -> Any | None:
        """The value stored under ``key`` (now most recently used), or None; counts a hit/miss."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self._misses += 1
                return None
            self._entries.move_to_end(key)
            self._hits += 1
            return entry[0]

    def insert(self, key: str, value: Any, nbytes: int) -> bool:
        """Store ``value`` under ``key``, evicting least recently used entries to make room.

        Returns False (and stores nothing) when ``nbytes`` alone exceeds ``max_bytes``.
        """
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            if nbytes > self.max_bytes:
                return False
            while self._bytes + nbytes > self.max_bytes and self._entries:
                _, (_, evicted_bytes) = self._entries.popitem(last=False)
                self._bytes -= evicted_bytes
                self._evictions += 1
            self._entries[key] = (value, nbytes)
            self._bytes += nbytes
            return True

    def discard(self, key: str) -> None:
        """Forget ``key`` if present."""
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]

    def evict_all(self) -> int:
        """Drop every entry, counting each as an eviction; returns how many there were."""
        with self._lock:
            count = len(self._entries)
            self._entries.clear()
            self._bytes = 0
            self._evictions += count
            return count

    def clear(self) -> None:
        """Drop every entry (counters are kept)."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries

    def stats(self) -> CacheStats:
        """A snapshot of the counters."""
        with self._lock:
            return CacheStats(
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
                entries=len(self._entries),
                bytes=self._bytes,
                max_bytes=self.max_bytes,
            )


def content_key(array: np.ndarray) -> str:
    """A key naming ``array``'s content exactly (dtype, shape and bytes), for the resident cache.

    Uses BLAKE3 when installed (8-10 GB/s on one core), BLAKE2b otherwise.
    """
    contiguous = np.ascontiguousarray(array)
    header = f"{contiguous.dtype.str}{contiguous.shape}".encode()
    try:
        import blake3
    except ImportError:
        digest = hashlib.blake2b(header, digest_size=32)
        digest.update(memoryview(contiguous).cast("B"))
        return "blake2b:" + digest.hexdigest()
    hasher = blake3.blake3(header)
    hasher.update(memoryview(contiguous).cast("B"))
    return "blake3:" + hasher.hexdigest()


# -- page-locked host memory ---------------------------------------------------------------------


@dataclass(frozen=True)
class PinnedStats:
    """Counters of a :class:`PinnedHostPool` (bytes are page-locked host memory)."""

    bytes: int  # allocated now: leased + idle
    leased_bytes: int
    idle_bytes: int
    max_bytes: int
    allocations: int  # page-locking calls so far
    reuses: int  # requests served by an idle buffer
    refusals: int  # requests answered None (over budget or page-locking refused)
    frees: int


class _PinnedBlock:
    __slots__ = ("idle_since", "nbytes", "ptr")

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.ptr = ptr
        self.nbytes = nbytes
        self.idle_since = 0.0


class _HostLease:
    """Exposes a pinned block to NumPy; the block goes back to its pool when this object dies.

    NumPy keeps the object that exports ``__array_interface__`` as the array's base, and every
    view's chain of bases ends at it: the block is returned only when no view is left.
    """

    def __init__(self, block: _PinnedBlock, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.__array_interface__ = {
            "version": 3,
            "shape": tuple(shape),
            "typestr": dtype.str,
            "data": (block.ptr, False),
        }


def _host_view(ptr: int, nbytes: int) -> np.ndarray:
    """A uint8 NumPy view of ``nbytes`` at ``ptr`` (the caller keeps the memory alive)."""
    return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_uint8)), shape=(nbytes,))


class PinnedHostPool:
    """A bounded pool of page-locked host buffers, reused and freed when idle.

    CuPy's own pinned pool (behind ``cupyx.empty_pinned``) never returns memory to the system, so
    a worker that allocated a fresh pinned result per shard kept growing. This pool:

    * never holds more than ``max_bytes`` (leased and idle together): :meth:`acquire` answers
      None instead, and the caller copies through pageable memory (slower, still correct);
    * reuses an idle buffer that fits (at most twice the request, or 4 MiB more), else allocates
      (sizes rounded up, to 1 MiB multiples from 1 MiB, so that similar shards share buffers);
    * frees idle buffers after ``idle_seconds``, and the least recently used idle ones first
      when a new allocation needs room.

    ``alloc(nbytes) -> ptr`` and ``free(ptr)`` do the page-locking (``cudaHostAlloc`` /
    ``cudaFreeHost`` on CuPy). Buffers handed out as NumPy arrays (:meth:`lease_array`) come
    back by themselves when the last view of the array is garbage; their return is queued
    lock-free and applied on the next call, because it may run inside the garbage collector.
    """

    def __init__(
        self,
        alloc: Callable[[int], int],
        free: Callable[[int], None],
        *,
        max_bytes: int = _PINNED_MAX_BYTES,
        idle_seconds: float = _PINNED_IDLE_SECONDS,
        round_bytes: int = _PINNED_ROUND_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_bytes < 0 or round_bytes < 1:
            raise ValueError("max_bytes must be >= 0 and round_bytes >= 1")
        self.max_bytes = int(max_bytes)
        self.idle_seconds = float(idle_seconds)
        self._alloc = alloc
        self._free = free
        self._round = int(round_bytes)
        self._clock = clock
        self._lock = threading.Lock()
        self._leased: dict[int, _PinnedBlock] = {}
        self._idle: list[_PinnedBlock] = []  # least recently released first
        self._returned: collections.deque[_PinnedBlock] = collections.deque()
        self._bytes = 0
        self._allocations = 0
        self._reuses = 0
        self._refusals = 0
        self._frees = 0
        self._refusal_logged = False

    # -- leasing ---------------------------------------------------------------------------

    def acquire(self, nbytes: int, *, reserve: int = 0) -> _PinnedBlock | None:
        """A pinned block of at least ``nbytes``, or None when the budget (less ``reserve``
        bytes kept for others) or the system refuses. Give it back with :meth:`release`."""
        if nbytes <= 0:
            raise ValueError("nbytes must be > 0")
        with self._lock:
            self._take_returns()
            self._trim_locked(self._clock(), self.idle_seconds)
            fitting = [
                b for b in self._idle if nbytes <= b.nbytes <= max(2 * nbytes, nbytes + (4 << 20))
            ]
            if fitting:
                block = min(fitting, key=lambda b: b.nbytes)
                self._idle.remove(block)
                self._leased[block.ptr] = block
                self._reuses += 1
                return block
            size = self._rounded(nbytes)
            limit = self.max_bytes - max(0, reserve)
            while self._bytes + size > limit and self._idle:
                self._free_locked(self._idle.pop(0))
            if self._bytes + size > limit:
                self._refusals += 1
                return None
            try:
                ptr = int(self._alloc(size))
            except Exception as exc:  # the system may cap page-locked memory (ulimit -l)
                self._refusals += 1
                if not self._refusal_logged:
                    self._refusal_logged = True
                    log.warning(
                        "page-locking %.1f MiB of host memory failed (%s: %s): copies go through "
                        "pageable memory, about 5x slower",
                        size / 2**20,
                        type(exc).__name__,
                        exc,
                    )
                return None
            block = _PinnedBlock(ptr, size)
            self._leased[ptr] = block
            self._bytes += size
            self._allocations += 1
            return block

    def release(self, block: _PinnedBlock) -> None:
        """Give ``block`` back (the caller no longer reads or writes it, nor does any DMA)."""
        with self._lock:
            self._take_returns()
            self._release_locked(block)
            self._trim_locked(self._clock(), self.idle_seconds)

    def lease_array(
        self, shape: tuple[int, ...], dtype: Any, *, reserve: int = 0
    ) -> np.ndarray | None:
        """An uninitialised pinned NumPy array whose block returns to the pool when the array
        (and every view of it) is garbage; None when :meth:`acquire` refuses."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if nbytes == 0:
            return None
        block = self.acquire(nbytes, reserve=reserve)
        if block is None:
            return None
        lease = _HostLease(block, tuple(int(d) for d in shape), dtype)
        weakref.finalize(lease, self._returned_by_gc, block)
        return np.asarray(lease)

    # -- upkeep ----------------------------------------------------------------------------

    def trim(self, idle_seconds: float | None = None) -> int:
        """Free idle buffers unused for ``idle_seconds`` (default: the pool's); returns bytes."""
        with self._lock:
            self._take_returns()
            return self._trim_locked(
                self._clock(), self.idle_seconds if idle_seconds is None else idle_seconds
            )

    def owns(self, ptr: int, nbytes: int) -> bool:
        """Whether ``[ptr, ptr + nbytes)`` lies inside one block leased from this pool."""
        with self._lock:
            return any(
                b.ptr <= ptr and ptr + nbytes <= b.ptr + b.nbytes for b in self._leased.values()
            )

    def stats(self) -> PinnedStats:
        """A snapshot of the counters."""
        with self._lock:
            self._take_returns()
            idle = sum(b.nbytes for b in self._idle)
            return PinnedStats(
                bytes=self._bytes,
                leased_bytes=self._bytes - idle,
                idle_bytes=idle,
                max_bytes=self.max_bytes,
                allocations=self._allocations,
                reuses=self._reuses,
                refusals=self._refusals,
                frees=self._frees,
            )

    # -- internals ---------------------------------------------------------------------------

    def _rounded(self, nbytes: int) -> int:
        """Sizes from ``round_bytes`` up are rounded to a multiple of it, smaller ones to a
        power of two (at least 4 KiB): similar requests share buffers, small ones stay small."""
        if nbytes >= self._round:
            return -(-nbytes // self._round) * self._round
        return max(4096, 1 << (nbytes - 1).bit_length())

    def _returned_by_gc(self, block: _PinnedBlock) -> None:
        # Runs wherever the last view dies (any thread, maybe inside the garbage collector):
        # no lock, only an atomic append; the next call files the block.
        block.idle_since = self._clock()
        self._returned.append(block)

    def _take_returns(self) -> None:  # lock held
        while self._returned:
            block = self._returned.popleft()
            self._release_locked(block, block.idle_since)

    def _release_locked(self, block: _PinnedBlock, when: float | None = None) -> None:
        if self._leased.pop(block.ptr, None) is None:
            return  # already returned
        if block.nbytes > self.max_bytes:
            self._free_locked(block)  # shrunk budget: too big to keep
            return
        block.idle_since = self._clock() if when is None else when
        self._idle.append(block)

    def _trim_locked(self, now: float, idle_seconds: float) -> int:
        expired = [b for b in self._idle if now - b.idle_since >= idle_seconds]
        self._idle = [b for b in self._idle if now - b.idle_since < idle_seconds]
        for block in expired:
            self._free_locked(block)
        return sum(b.nbytes for b in expired)

    def _free_locked(self, block: _PinnedBlock) -> None:
        self._bytes -= block.nbytes
        self._frees += 1
        try:
            self._free(block.ptr)
        except Exception as exc:  # freeing must not break the caller; the OS reclaims at exit
            log.warning("freeing a pinned host buffer failed: %s: %s", type(exc).__name__, exc)


# -- backends -------------------------------------------------------------------------------------


class Backend(ABC):
    """Common interface of the NumPy and CuPy backends (see the module docstring)."""

    #: ``"numpy"`` or ``"cupy"``.
    name: str
    #: The array module for elementwise work on this backend's arrays.
    xp: Any
    #: Resident operands, keyed by the caller's content key.
    cache: ResidentCache

    @abstractmethod
    def activate(self) -> contextlib.AbstractContextManager[None]:
        """A context in which this backend's device and stream are current."""

    @abstractmethod
    def put(self, array: Any, key: str | None = None) -> Any:
        """``array`` as a backend array; with ``key``, served from / stored in the cache.

        ``key`` must name the content exactly (see :func:`content_key`): a hit returns the
        stored array without copying anything.
        """

    @abstractmethod
    def get(self, array: Any) -> np.ndarray:
        """A host NumPy array holding ``array`` (waits for the work that produces it)."""

    @abstractmethod
    def empty_host(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """An uninitialised host array that :meth:`put` copies fastest (pinned on CuPy).

        Receive shard bytes straight into it to skip one host copy.
        """

    @abstractmethod
    def matmul(self, a: Any, b: Any, *, transpose_b: bool = False, scale: float = 1.0) -> Any:
        """``scale * (a @ b)`` (or ``a @ b.T`` on the last two axes) as float32.

        ``a`` and ``b`` share one dtype, float32 or float16; products accumulate in float32.
        ``a`` is (m, k) or (batch, m, k); ``b`` is (k, n) or, batched like ``a``, (batch, k, n)
        ((n, k) / (batch, n, k) when ``transpose_b``). Runs on the current stream: call it
        inside :meth:`activate` (or from a kernel's ``forward`` inside :meth:`run`).
        """

    @abstractmethod
    def synchronize(self) -> None:
        """Wait until all queued work of this backend is done (no-op on NumPy)."""

    def run(self, kernel: Any, operands: Mapping[str, np.ndarray], keys: Mapping[str, str]) -> Any:
        """Run ``kernel`` on validated host ``operands``; return the float32 host result.

        ``keys`` maps resident operand names to content keys. This default puts every operand,
        calls ``kernel.forward`` and gets the result; :class:`CupyBackend` pipelines it.
        """
        with self.activate():
            on_backend = {
                name: self.put(array, key=keys.get(name) if name in kernel.resident else None)
                for name, array in operands.items()
            }
            result = kernel.forward(self, on_backend)
            return self.get(result)

    def release_memory(self) -> None:  # noqa: B027 - a no-op by default on purpose
        """Give back what can be given back (resident cache, pooled device and pinned memory).

        A no-op on the host.
        """


class NumpyBackend(Backend):
    """Runs kernels with NumPy on the host; the reference every other backend is checked against.

    The resident cache is disabled (``max_bytes=0``): host arrays are already where NumPy needs
    them, so :meth:`put` never copies.
    """

    name = "numpy"
    xp = np

    def __init__(self) -> None:
        self.cache = ResidentCache(0)

    def activate(self) -> contextlib.AbstractContextManager[None]:
        """Nothing to activate on the host."""
        return contextlib.nullcontext()

    def put(self, array: Any, key: str | None = None) -> np.ndarray:
        """``array`` as a C-contiguous NumPy array (no copy when it already is one)."""
        return np.ascontiguousarray(array)

    def get(self, array: Any) -> np.ndarray:
        """``array`` itself (it is already on the host)."""
        return np.asarray(array)

    def empty_host(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """``np.empty(shape, dtype)``."""
        return np.empty(shape, dtype)

    def synchronize(self) -> None:
        """Nothing is ever queued: NumPy computes eagerly."""

    def matmul(
        self, a: np.ndarray, b: np.ndarray, *, transpose_b: bool = False, scale: float = 1.0
    ) -> np.ndarray:
        """float32 ``scale * (a @ b)``: float16 operands are widened exactly, then float32 BLAS."""
        _check_matmul_dtypes(a, b)
        a32 = a.astype(np.float32, copy=False)
        b32 = b.astype(np.float32, copy=False)
        if transpose_b:
            b32 = np.swapaxes(b32, -1, -2)
        out = np.matmul(a32, b32)
        if scale != 1.0:
            out *= np.float32(scale)
        return out


class _Slot:
    """One pinned staging buffer of a lane and the last DMA that used it."""

    __slots__ = ("block", "event", "pending")

    def __init__(self) -> None:
        self.block: _PinnedBlock | None = None
        self.event: Any = None  # recorded after the last copy through this buffer
        self.pending: np.ndarray | None = None  # download: where the bytes go once copied


class _Lane:
    """Streams and staging buffers one shard uses at a time.

    Uploads run on ``h2d``, kernels on ``compute``, downloads on ``d2h``; events order them. The
    public put/get API uses a lane whose three streams are one stream.
    """

    def __init__(self, cupy: Any, stream: Any | None = None) -> None:
        if stream is None:
            self.h2d = cupy.cuda.Stream(non_blocking=True)
            self.compute = cupy.cuda.Stream(non_blocking=True)
            self.d2h = cupy.cuda.Stream(non_blocking=True)
        else:
            self.h2d = self.compute = self.d2h = stream
        self.uploads = [_Slot(), _Slot()]
        self.downloads = [_Slot(), _Slot()]
        self.upload_turn = 0
        self.download_turn = 0

    def streams(self) -> tuple[Any, ...]:
        return tuple({id(s): s for s in (self.h2d, self.compute, self.d2h)}.values())


class CupyBackend(Backend):
    """Runs kernels on one CUDA device with CuPy (see the module docstring for the data path).

    * ``device_id`` counts the devices CUDA shows this process: ``CUDA_VISIBLE_DEVICES``
      chooses which physical GPU is device 0, and the capacity probe advertises that one only.
    * :meth:`run` cuts a shard into row chunks (when it moves at least 16 MiB) and pipelines
      upload, compute and download on three streams; :meth:`put`, :meth:`get` and
      :meth:`matmul` are the same steps one at a time, on :attr:`stream`.
    * Host copies go through page-locked memory from a :class:`PinnedHostPool` bounded by
      ``max_pinned_bytes``: an array from :meth:`empty_host` or a result from :meth:`run` or
      :meth:`get` is pinned (while the pool has room) and copied by DMA directly; any other host
      array is staged through two pinned buffers of ``staging_chunk_bytes``, so that copying
      piece ``i + 1`` on the CPU overlaps the DMA of piece ``i``.
    * Resident operands live in a :class:`ResidentCache` bounded by ``max_cache_bytes``
      (default: a quarter of the device memory free when the backend starts), least recently
      used out first. Out of device memory during a shard evicts the whole cache, frees
      CuPy's pooled blocks and retries the shard once.
    * float16 products call ``cublasGemmStridedBatchedEx`` with float16 inputs, a float32
      output and ``CUBLAS_COMPUTE_32F`` (tensor cores, float32 accumulation); CuPy's own
      ``matmul`` would round the result to float16. Only a definite "not supported here"
      (cuBLAS NOT_SUPPORTED or ARCH_MISMATCH, or a CuPy without the binding) switches this off
      for good (:attr:`fp16_gemm` says so); out of memory frees memory and retries once, and any
      other failure computes that one product by widening to float32 (same result, slower).
    * float32 products never use TF32: ``CUPY_TF32=1`` or a TF32 cuBLAS math mode is overridden
      with a warning (see :func:`force_float32_math`).
    """

    name = "cupy"

    def __init__(
        self,
        device_id: int = 0,
        *,
        max_cache_bytes: int | None = None,
        max_pinned_bytes: int = _PINNED_MAX_BYTES,
        staging_chunk_bytes: int = _STAGING_CHUNK_BYTES,
        pipeline_min_bytes: int = _PIPELINE_MIN_BYTES,
        pipeline_chunk_bytes: int = _PIPELINE_CHUNK_BYTES,
        lanes: int = 2,
    ) -> None:
        status = gpu_status(device_id)
        if not status.usable:
            raise BackendUnavailable(status.reason)
        import cupy

        self._cupy = cupy
        self.xp = cupy
        self.device_id = device_id
        self.device = cupy.cuda.Device(device_id)
        #: What the capacity probe advertises for this backend's device.
        self.status = status
        with self.device:
            #: What had asked for TF32 float32 products and was overridden (None: nothing).
            self.tf32_forced_off = force_float32_math()
            free_bytes, _total = cupy.cuda.runtime.memGetInfo()
            self.stream = cupy.cuda.Stream(non_blocking=True)
            self._main = _Lane(cupy, self.stream)
            self._lanes: queue.SimpleQueue[_Lane] = queue.SimpleQueue()
            for _ in range(max(1, lanes)):
                self._lanes.put(_Lane(cupy))
        self.cache = ResidentCache(free_bytes // 4 if max_cache_bytes is None else max_cache_bytes)
        self._chunk_bytes = int(staging_chunk_bytes)
        self._pipeline_min_bytes = int(pipeline_min_bytes)
        self._pipeline_chunk_bytes = int(pipeline_chunk_bytes)
        runtime = cupy.cuda.runtime
        self.pinned = PinnedHostPool(
            lambda nbytes: runtime.hostAlloc(nbytes, 0),
            runtime.freeHost,
            max_bytes=max_pinned_bytes,
        )
        # Results and empty_host arrays leave this much of the pinned budget to staging buffers.
        self._staging_reserve = 4 * self._chunk_bytes
        # Pinned caller arrays whose asynchronous upload on the main stream may still be running.
        self._uploads_in_flight: list[tuple[Any, np.ndarray]] = []
        self._main_lock = threading.RLock()
        self.fp16_gemm = "cublasGemmStridedBatchedEx"
        #: float16 products that fell back to float32 one at a time (passing failures).
        self.fp16_fallbacks = 0
        #: Shards retried after running out of device memory.
        self.oom_retries = 0
        self._fallback_logged: set[str] = set()

    # -- public API ------------------------------------------------------------------------

    @contextlib.contextmanager
    def activate(self) -> Iterator[None]:
        """Make this backend's device and main stream current (cuBLAS follows the stream)."""
        with self.device, self.stream:
            yield

    def put(self, array: Any, key: str | None = None) -> Any:
        """Copy ``array`` to the device on :attr:`stream`, or return the cached copy for ``key``.

        A pinned ``array`` (from :meth:`empty_host`) is read by the DMA after this returns:
        do not modify it before the next :meth:`get` or :meth:`synchronize`.
        """
        cupy = self._cupy
        if isinstance(array, cupy.ndarray):
            return array
        with self._main_lock, self.device:
            caller = cupy.cuda.get_current_stream()
            with self.stream:
                device_array = self._place(self._main, np.ascontiguousarray(array), key, [])
            if caller is not self.stream:
                # Work the caller queues next on its own stream must see the copy.
                caller.wait_event(self.stream.record())
            return device_array

    def get(self, array: Any) -> np.ndarray:
        """Copy ``array`` to the host and wait for it: into a pinned array leased from
        :attr:`pinned` when it has room, else into a pageable one through staging buffers."""
        cupy = self._cupy
        with self._main_lock, self.device:
            caller = cupy.cuda.get_current_stream()
            if caller is not self.stream:
                # ``array`` may still be computing on the caller's stream.
                self.stream.wait_event(caller.record())
            with self.stream:
                return self._get_on_main(cupy.ascontiguousarray(array))

    def _get_on_main(self, device_array: Any) -> np.ndarray:
        out = self._host_array(device_array.shape, device_array.dtype)
        try:
            self._download(self._main, device_array, out)
            self._finish_downloads(self._main)
            self.stream.synchronize()
        finally:
            self._after_main_sync()
        return out

    def empty_host(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """An uninitialised host array, pinned while the pinned pool has room.

        Its page-locked buffer returns to the pool when the array is garbage.
        """
        return self._host_array(tuple(shape), np.dtype(dtype))

    def synchronize(self) -> None:
        """Wait for every copy and kernel queued on :attr:`stream`."""
        with self._main_lock:
            try:
                self.stream.synchronize()
                self._finish_downloads(self._main)
            finally:
                self._after_main_sync()

    def release_memory(self) -> None:
        """Evict every resident operand, return CuPy's pooled device blocks and idle pinned
        buffers (arrays a running shard still holds stay alive until it ends)."""
        evicted = self.cache.evict_all()
        gc.collect()  # device arrays kept alive only by reference cycles go too
        with self.device:
            self._cupy.get_default_memory_pool().free_all_blocks()
        self.pinned.trim(0.0)
        log.info("released device memory: %d resident operand(s) evicted", evicted)

    def matmul(self, a: Any, b: Any, *, transpose_b: bool = False, scale: float = 1.0) -> Any:
        """float32 ``scale * (a @ b)`` on the current stream (see :meth:`Backend.matmul`)."""
        _check_matmul_dtypes(a, b)
        if a.dtype == np.float16 and self.fp16_gemm == "cublasGemmStridedBatchedEx":
            product = self._fp16_product(a, b, transpose_b=transpose_b, scale=scale)
            if product is not None:
                return product
        return self._float32_product(a, b, transpose_b=transpose_b, scale=scale)

    def run(self, kernel: Any, operands: Mapping[str, np.ndarray], keys: Mapping[str, str]) -> Any:
        """One shard through the pipelined data path; out of memory retries it once after
        :meth:`release_memory`. Returns a float32 host array (pinned while the pool has room)."""
        try:
            return self._run_once(kernel, operands, keys)
        except Exception as exc:
            if not self._is_out_of_memory(exc):
                raise
            self.oom_retries += 1
            log.warning(
                "out of device memory in a %s shard (%s); evicting resident operands and "
                "freeing the memory pool, then retrying once",
                kernel.name,
                exc,
            )
        # Retried outside the ``except`` block: the traceback holds the failed attempt's
        # frames, and with them its device arrays, until the block ends.
        self.release_memory()
        return self._run_once(kernel, operands, keys)

    # -- the pipelined shard ----------------------------------------------------------------

    def _run_once(
        self, kernel: Any, operands: Mapping[str, np.ndarray], keys: Mapping[str, str]
    ) -> Any:
        cupy = self._cupy
        lane = self._lanes.get()
        # Every device array this shard touches stays referenced here until the lane's streams
        # are synchronized: CuPy's pool would otherwise hand a block still read by a pending
        # copy on another stream to the next allocation.
        held: list[Any] = []
        try:
            with self.device, lane.compute:
                # Blocks freed by earlier work on this compute stream may be reused below, and
                # the upload stream writes into them: it starts after that work.
                lane.h2d.wait_event(lane.compute.record())
                placed: dict[str, Any] = {}
                splits: dict[str, tuple[np.ndarray, Any]] = {}
                for name, array in operands.items():
                    host = np.ascontiguousarray(array)
                    if name in kernel.split_operands:
                        device_array = cupy.empty(host.shape, host.dtype)
                        held.append(device_array)
                        splits[name] = (host, device_array)
                    else:
                        key = keys.get(name) if name in kernel.resident else None
                        placed[name] = self._place(lane, host, key, held)
                out_shape = tuple(kernel.output_shape(operands))
                out = self._host_array(out_shape, np.dtype(kernel.output_dtype(operands)))
                previous: tuple[Any, Any, np.ndarray] | None = None
                for start, stop in self._row_chunks(kernel, operands, out):
                    for host, device_array in splits.values():
                        self._upload(lane, host[start:stop], device_array[start:stop])
                    lane.compute.wait_event(lane.h2d.record())
                    chunk = dict(placed)
                    chunk.update({n: d[start:stop] for n, (_, d) in splits.items()})
                    result = cupy.ascontiguousarray(kernel.forward(self, chunk))
                    held.append(result)
                    computed = lane.compute.record()
                    # Download the previous chunk only now, so that its copy (and any wait on
                    # a staging buffer) comes after this chunk's kernels are queued.
                    if previous is not None:
                        self._download_after(lane, *previous)
                    previous = (computed, result, out[start:stop])
                if previous is not None:
                    self._download_after(lane, *previous)
                self._finish_downloads(lane)
                lane.d2h.synchronize()
            return out
        finally:
            try:
                for stream in lane.streams():
                    stream.synchronize()
                self._release_slots(lane)
            finally:
                del held
                self._lanes.put(lane)

    def _row_chunks(
        self, kernel: Any, operands: Mapping[str, np.ndarray], out: np.ndarray
    ) -> list[tuple[int, int]]:
        """Row ranges of one shard: one range below ``pipeline_min_bytes`` moved, else 2-8
        ranges of about ``pipeline_chunk_bytes`` (split operands in plus result out)."""
        rows = int(kernel.n_rows(operands))
        moved = out.nbytes + sum(operands[n].nbytes for n in kernel.split_operands)
        if rows < 2 or moved < self._pipeline_min_bytes:
            return [(0, rows)]
        count = min(_PIPELINE_MAX_CHUNKS, max(2, math.ceil(moved / self._pipeline_chunk_bytes)))
        if operands[kernel.split_operand].ndim == 2:
            count = min(count, rows // _PIPELINE_MIN_ROWS_2D)
        count = max(1, min(count, rows))
        base, extra = divmod(rows, count)
        ranges, start = [], 0
        for index in range(count):
            stop = start + base + (1 if index < extra else 0)
            ranges.append((start, stop))
            start = stop
        return ranges

    # -- copies -------------------------------------------------------------------------------

    def _place(self, lane: _Lane, host: np.ndarray, key: str | None, held: list[Any]) -> Any:
        """``host`` on the device for ``lane.compute``: a cache hit (after its upload event),
        or a new upload on ``lane.h2d`` that the compute stream waits for."""
        if key is not None:
            entry = self.cache.lookup(key)
            if entry is not None:
                cached, ready = entry
                # A key reused for other content by mistake must not hand back a wrong array.
                if cached.shape == host.shape and cached.dtype == host.dtype:
                    # Its upload may have been queued by another lane and still be running.
                    lane.compute.wait_event(ready)
                    held.append(cached)
                    return cached
        device_array = self._cupy.empty(host.shape, host.dtype)
        held.append(device_array)
        self._upload(lane, host, device_array)
        ready = lane.h2d.record()
        if lane.compute is not lane.h2d:
            lane.compute.wait_event(ready)
        if key is not None:
            self.cache.insert(key, (device_array, ready), int(device_array.nbytes))
        return device_array

    def _upload(self, lane: _Lane, host: np.ndarray, device_array: Any) -> None:
        """Queue ``host`` -> ``device_array`` (both contiguous, same bytes) on ``lane.h2d``."""
        nbytes = int(host.nbytes)
        if nbytes == 0:
            return
        if self._is_pinned(host):
            device_array.data.copy_from_host_async(host.ctypes.data, nbytes, lane.h2d)
            if lane is self._main:
                self._track_pinned_upload(host)
            return
        source = host.reshape(-1).view(np.uint8)
        for offset in range(0, nbytes, self._chunk_bytes):
            length = min(self._chunk_bytes, nbytes - offset)
            slot = lane.uploads[lane.upload_turn % 2]
            lane.upload_turn += 1
            if slot.event is not None:
                slot.event.synchronize()  # the DMA that last read this buffer has finished
                slot.event = None
            target = device_array.data + offset
            if not self._fit_slot(slot, length):
                # No page-locked memory to spare: CUDA copies pageable memory itself (it
                # returns once the bytes are staged, so the source may change afterwards).
                target.copy_from_host_async(source[offset:].ctypes.data, length, lane.h2d)
                continue
            _host_view(slot.block.ptr, length)[...] = source[offset : offset + length]
            target.copy_from_host_async(slot.block.ptr, length, lane.h2d)
            slot.event = lane.h2d.record()

    def _download_after(self, lane: _Lane, ready: Any, device_array: Any, host: np.ndarray) -> None:
        if lane.d2h is not lane.compute:
            lane.d2h.wait_event(ready)
        self._download(lane, device_array, host)

    def _download(self, lane: _Lane, device_array: Any, host: np.ndarray) -> None:
        """Queue ``device_array`` -> ``host`` on ``lane.d2h``; pageable ``host`` is complete
        only after :meth:`_finish_downloads`."""
        nbytes = int(host.nbytes)
        if nbytes == 0:
            return
        if self._is_pinned(host):
            device_array.data.copy_to_host_async(host.ctypes.data, nbytes, lane.d2h)
            return
        target = host.reshape(-1).view(np.uint8)
        for offset in range(0, nbytes, self._chunk_bytes):
            length = min(self._chunk_bytes, nbytes - offset)
            slot = lane.downloads[lane.download_turn % 2]
            lane.download_turn += 1
            self._drain(slot)
            source = device_array.data + offset
            if not self._fit_slot(slot, length):
                source.copy_to_host_async(target[offset:].ctypes.data, length, lane.d2h)
                continue
            source.copy_to_host_async(slot.block.ptr, length, lane.d2h)
            slot.event = lane.d2h.record()
            slot.pending = target[offset : offset + length]

    def _fit_slot(self, slot: _Slot, length: int) -> bool:
        """Give the idle ``slot`` a pinned buffer of at least ``length`` bytes (sized to the
        copy, at most ``staging_chunk_bytes``: a small shard does not pin 2 x 8 MiB)."""
        if slot.block is not None and slot.block.nbytes < length:
            self.pinned.release(slot.block)
            slot.block = None
        if slot.block is None:
            slot.block = self.pinned.acquire(length)
        return slot.block is not None

    @staticmethod
    def _drain(slot: _Slot) -> None:
        """Wait for the download through ``slot`` and copy its bytes to where they belong."""
        if slot.pending is None:
            return
        slot.event.synchronize()
        assert slot.block is not None
        slot.pending[...] = _host_view(slot.block.ptr, slot.pending.size)
        slot.pending = None
        slot.event = None

    def _finish_downloads(self, lane: _Lane) -> None:
        # In the order they were queued, so the CPU copy of one overlaps the DMA of the next.
        first = lane.download_turn % 2
        for index in (first, 1 - first):
            self._drain(lane.downloads[index])

    def _release_slots(self, lane: _Lane) -> None:
        """Return ``lane``'s staging buffers to the pool (its streams are synchronized)."""
        for slot in (*lane.uploads, *lane.downloads):
            slot.event = None
            slot.pending = None
            if slot.block is not None:
                self.pinned.release(slot.block)
                slot.block = None

    def _after_main_sync(self) -> None:
        self._uploads_in_flight.clear()
        self._release_slots(self._main)

    def _track_pinned_upload(self, host: np.ndarray) -> None:
        # Keep a pinned source alive until its DMA is done, even if the caller drops it.
        self._uploads_in_flight = [(e, h) for e, h in self._uploads_in_flight if not e.done]
        self._uploads_in_flight.append((self.stream.record(), host))

    def _host_array(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        leased = self.pinned.lease_array(shape, dtype, reserve=self._staging_reserve)
        return leased if leased is not None else np.empty(shape, dtype)

    def _is_pinned(self, host: np.ndarray) -> bool:
        if host.nbytes == 0:
            return False
        pointer = host.ctypes.data
        if self.pinned.owns(pointer, host.nbytes):
            return True
        try:
            attributes = self._cupy.cuda.runtime.pointerGetAttributes(pointer)
        except Exception:  # old drivers raise for pageable memory
            return False
        return getattr(attributes, "type", -1) == _CUDA_MEMORY_TYPE_HOST

    # -- products -----------------------------------------------------------------------------

    def _float32_product(self, a: Any, b: Any, *, transpose_b: bool, scale: float) -> Any:
        cupy = self._cupy
        _ensure_float32_math_mode(cupy)
        a32 = a.astype(cupy.float32, copy=False)
        b32 = b.astype(cupy.float32, copy=False)
        if transpose_b:
            b32 = cupy.swapaxes(b32, -1, -2)
        out = cupy.matmul(a32, b32)
        if scale != 1.0:
            out *= np.float32(scale)
        return out

    def _fp16_product(self, a: Any, b: Any, *, transpose_b: bool, scale: float) -> Any | None:
        """The tensor-core product, or None when this call must fall back to float32."""
        failure: BaseException | None = None
        for attempt in (1, 2):
            out_of_memory = False
            try:
                return self._gemm_fp16_fp32(a, b, transpose_b=transpose_b, scale=scale)
            except Exception as exc:
                if attempt == 1 and not _is_unsupported(exc) and self._is_out_of_memory(exc):
                    out_of_memory = True
                else:
                    # Without its traceback, which holds the failed call's device arrays.
                    failure = exc.with_traceback(None)
                    break
            if out_of_memory:
                # Outside the ``except`` block, whose traceback keeps the failed attempt's
                # arrays alive: free what can be freed and try once more.
                self.release_memory()
        assert failure is not None
        description = f"{type(failure).__name__}: {failure}"
        if _is_unsupported(failure):
            self.fp16_gemm = f"float32 fallback (unsupported here: {description})"
            log.warning(
                "float16 GEMM with float32 output is not supported here (%s): float16 "
                "products are widened to float32 from now on",
                description,
            )
            return None
        self.fp16_fallbacks += 1
        if type(failure).__name__ not in self._fallback_logged:
            self._fallback_logged.add(type(failure).__name__)
            log.warning(
                "float16 GEMM failed (%s); this product is widened to float32 "
                "(float16 stays on for the next ones)",
                description,
            )
        return None

    def _gemm_fp16_fp32(self, a: Any, b: Any, *, transpose_b: bool, scale: float) -> Any:
        """float16 x float16 -> float32 product with cuBLAS, batched over a leading axis.

        cuBLAS is column-major, and a row-major (r, c) array is the column-major (c, r) matrix,
        its transpose. So we ask cuBLAS for C^T (n x m) = B^T (n x k) @ A^T (k x m): B's buffer
        comes first, A's second, and C^T in column-major order is C in row-major order. With
        ``transpose_b``, B is stored (n, k), read as column-major (k, n), and transposed (OP_T).
        """
        cupy = self._cupy
        from cupy_backends.cuda.libs import cublas

        batched = a.ndim == 3
        a3 = cupy.ascontiguousarray(a if batched else a[None])
        b3 = cupy.ascontiguousarray(b if b.ndim == 3 else b[None])
        batch, m, k = a3.shape
        if b3.shape[0] not in (1, batch):
            raise ValueError(f"batch sizes differ: {a3.shape} and {b3.shape}")
        if transpose_b:
            n = b3.shape[1]
            op_b, ld_b = _CUBLAS_OP_T, k
        else:
            n = b3.shape[2]
            op_b, ld_b = _CUBLAS_OP_N, n
        # A 2-D b is shared by every batch entry: stride 0.
        stride_b = n * k if b3.shape[0] > 1 else 0
        out = cupy.empty((batch, m, n), cupy.float32)
        alpha = np.array(scale, dtype=np.float32)
        beta = np.array(0.0, dtype=np.float32)
        cublas.gemmStridedBatchedEx(
            cupy.cuda.device.get_cublas_handle(),
            op_b,
            _CUBLAS_OP_N,
            n,
            m,
            k,
            alpha.ctypes.data,
            b3.data.ptr,
            _CUDA_R_16F,
            ld_b,
            stride_b,
            a3.data.ptr,
            _CUDA_R_16F,
            k,
            m * k,
            beta.ctypes.data,
            out.data.ptr,
            _CUDA_R_32F,
            n,
            m * n,
            batch,
            _CUBLAS_COMPUTE_32F,
            _CUBLAS_GEMM_DEFAULT_TENSOR_OP,
        )
        return out if batched else out[0]

    def _is_out_of_memory(self, exc: BaseException) -> bool:
        """Device memory ran out: CuPy's pool, a cudaMalloc, or cuBLAS's workspace."""
        if isinstance(exc, self._cupy.cuda.memory.OutOfMemoryError):
            return True
        status = getattr(exc, "status", None)
        kind = type(exc).__name__
        return (kind == "CUBLASError" and status == _CUBLAS_STATUS_ALLOC_FAILED) or (
            kind == "CUDARuntimeError" and status == _CUDA_ERROR_MEMORY_ALLOCATION
        )


def _is_unsupported(exc: BaseException) -> bool:
    """A failure that will repeat on every call: this CuPy lacks the binding, or cuBLAS says
    the operation or architecture is not supported."""
    if isinstance(exc, ImportError | AttributeError | NotImplementedError):
        return True
    return type(exc).__name__ == "CUBLASError" and getattr(exc, "status", None) in (
        _CUBLAS_STATUS_NOT_SUPPORTED,
        _CUBLAS_STATUS_ARCH_MISMATCH,
    )


def _check_matmul_dtypes(a: Any, b: Any) -> None:
    if a.dtype != b.dtype or a.dtype not in (np.float32, np.float16):
        raise TypeError(f"matmul operands must share float32 or float16, got {a.dtype}, {b.dtype}")


# -- float32 numerics ------------------------------------------------------------------------------


def force_float32_math() -> str | None:
    """Make CuPy's float32 products full float32 in this process; returns what was changed.

    TF32 rounds each float32 input to 10 mantissa bits (a relative error of 2**-11 per
    product, against 2**-24 for float32), which puts honest float32 results far outside the
    verification bounds of ``base`` and ``verify``. ``CUPY_TF32=1`` (read by CuPy on the first
    float32 product), ``set_compute_type(float32, TF32)`` and a TF32 cuBLAS math mode on the
    current thread's handle are overridden, with a warning. Raises :class:`BackendUnavailable`
    when TF32 is asked for and this CuPy offers no way to turn it off. Needs a current device.
    """
    import cupy

    changed: list[str] = []
    try:
        from cupy._core import _routines_linalg as linalg
    except ImportError:
        linalg = None
    tf32_env = os.environ.get("CUPY_TF32", "0").strip()
    if linalg is None or not hasattr(linalg, "set_compute_type"):
        if tf32_env not in ("", "0"):
            raise BackendUnavailable(
                f"CUPY_TF32={tf32_env} asks for TF32 float32 products, which fail verification, "
                "and this CuPy cannot be told to ignore it: unset CUPY_TF32"
            )
    else:
        current = linalg.get_compute_type(np.float32)
        allowed = (linalg.COMPUTE_TYPE_DEFAULT, linalg.COMPUTE_TYPE_PEDANTIC)
        allowed += (getattr(linalg, "COMPUTE_TYPE_FP32", linalg.COMPUTE_TYPE_DEFAULT),)
        if current not in allowed:
            linalg.set_compute_type(np.float32, linalg.COMPUTE_TYPE_DEFAULT)
            changed.append(f"compute type {linalg.compute_type_to_str(current)}")
    mode = _ensure_float32_math_mode(cupy, warn=False)
    if mode is not None:
        changed.append(f"cuBLAS math mode {mode}")
    if changed:
        log.warning(
            "float32 products were set to use TF32 (%s; CUPY_TF32=%r): forced back to float32 "
            "for this process, since TF32 results fail verification",
            ", ".join(changed),
            tf32_env,
        )
        return ", ".join(changed)
    return None


def _ensure_float32_math_mode(cupy: Any, *, warn: bool = True) -> int | None:
    """Reset a TF32 / tensor-op math mode on this thread's cuBLAS handle (CuPy keeps one handle
    per thread and device); returns the mode found when it had to be reset."""
    try:
        from cupy_backends.cuda.libs import cublas

        handle = cupy.cuda.device.get_cublas_handle()
        mode = int(cublas.getMathMode(handle))
    except Exception:  # no cuBLAS binding: the product itself will say so
        return None
    if mode & _CUBLAS_MATH_MODE_MASK in (_CUBLAS_DEFAULT_MATH, _CUBLAS_PEDANTIC_MATH):
        return None
    cublas.setMathMode(handle, mode & ~_CUBLAS_MATH_MODE_MASK)
    if warn:
        log.warning(
            "cuBLAS math mode %d allows TF32 for float32 products: reset to the default "
            "(TF32 results fail verification)",
            mode,
        )
    return mode


# -- availability --------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuStatus:
    """Whether the CuPy backend can compute on CUDA device ``device_id``, and if not, why.

    ``device_id`` counts the devices visible to this process (``CUDA_VISIBLE_DEVICES``);
    ``pci_bus_id`` names the physical card, which is how the capacity probe finds it in NVML.
    """

    usable: bool
    reason: str
    device_id: int = 0
    name: str = ""
    pci_bus_id: str = ""
    mem_total: int = 0
    mem_free: int = 0
    compute_capability: str = ""
    cuda_driver_version: int = 0
    cupy_version: str = ""


def gpu_status(device_id: int = 0) -> GpuStatus:
    """Probe CuPy and CUDA device ``device_id`` end to end; never raises.

    Beyond importing CuPy it queries the driver, allocates, runs a 2x2 float64 product (which
    loads cuBLAS: a CuPy wheel imports fine without its CUDA libraries and fails only there)
    and copies the result back.
    """
    try:
        import cupy
    except ImportError as exc:
        return GpuStatus(
            False,
            f"CuPy is not installed ({exc}); on a machine with an NVIDIA GPU and driver, "
            "install the gpu-cuda12 or gpu-cuda13 extra",
            device_id,
        )
    except Exception as exc:  # a broken install: say so rather than crash the probe
        return GpuStatus(False, f"CuPy failed to import: {type(exc).__name__}: {exc}", device_id)
    version = str(getattr(cupy, "__version__", ""))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    shown = "" if visible is None else f" (CUDA_VISIBLE_DEVICES={visible!r})"
    try:
        count = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as exc:
        return GpuStatus(
            False, f"no usable CUDA driver or device{shown}: {exc}", device_id, cupy_version=version
        )
    if device_id >= count:
        return GpuStatus(
            False,
            f"CUDA shows {count} device(s){shown}, not device {device_id}",
            device_id,
            cupy_version=version,
        )
    try:
        runtime = cupy.cuda.runtime
        with cupy.cuda.Device(device_id) as device:
            properties = runtime.getDeviceProperties(device_id)
            free_bytes, total_bytes = runtime.memGetInfo()
            # float64: exact whatever TF32 setting float32 products have.
            probe = cupy.ones((2, 2), dtype=cupy.float64)
            product = cupy.matmul(probe, probe).get()
            if not np.array_equal(product, np.full((2, 2), 2.0)):
                return GpuStatus(
                    False,
                    f"a 2x2 product on CUDA device {device_id} came back wrong: {product.tolist()}",
                    device_id,
                    cupy_version=version,
                )
            name = properties.get("name", b"")
            return GpuStatus(
                True,
                "ok",
                device_id,
                name=(name.decode() if isinstance(name, bytes) else str(name))[:128],
                pci_bus_id=str(device.pci_bus_id),
                mem_total=int(total_bytes),
                mem_free=int(free_bytes),
                compute_capability=f"{properties.get('major', 0)}.{properties.get('minor', 0)}",
                cuda_driver_version=int(runtime.driverGetVersion()),
                cupy_version=version,
            )
    except Exception as exc:  # any failure here means "cannot compute on it"
        return GpuStatus(
            False,
            f"CUDA device {device_id}{shown} failed a test product: {type(exc).__name__}: {exc}",
            device_id,
            cupy_version=version,
        )


def gpu_available(device_id: int = 0) -> bool:
    """Whether the CuPy backend can compute on CUDA device ``device_id``; never raises."""
    return gpu_status(device_id).usable


_reported_fallbacks: set[str] = set()
_reported_lock = threading.Lock()


def report_cpu_fallback(reason: str, detail: str = "") -> None:
    """Log, once per process and reason, why kernels run on the CPU.

    At WARNING, so that a node at the default log level says why it lends no GPU. The capacity
    probe adds what NVML saw (``detail``); :func:`select_backend` reports the same reason
    without repeating the line.
    """
    with _reported_lock:
        if reason in _reported_fallbacks:
            return
        _reported_fallbacks.add(reason)
    prefix = f"{detail}; " if detail else ""
    log.warning("%sno usable GPU: %s. Kernels run on the CPU with NumPy", prefix, reason)


def select_backend(prefer: str = "auto") -> Backend:
    """A backend: ``"cupy"``, ``"numpy"`` (or ``"none"``, the ``--gpu none`` spelling), or
    ``"auto"`` (CuPy when a GPU is usable, else NumPy with a logged reason).

    Create one per worker and keep it: the resident cache and the pinned pool live in the
    backend. Raises :class:`BackendUnavailable` for ``"cupy"`` without a usable GPU, ValueError
    for an unknown name.
    """
    if prefer in ("numpy", "none"):
        return NumpyBackend()
    if prefer == "cupy":
        return CupyBackend()
    if prefer == "auto":
        status = gpu_status()
        if status.usable:
            try:
                return CupyBackend()
            except BackendUnavailable as exc:  # e.g. CUPY_TF32 with an unpatchable CuPy
                report_cpu_fallback(str(exc))
                return NumpyBackend()
        report_cpu_fallback(status.reason)
        return NumpyBackend()
    raise ValueError(f"unknown backend {prefer!r}: expected 'auto', 'cupy', 'numpy' or 'none'")
