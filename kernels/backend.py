"""Where kernels run: NumPy on the host, or CuPy on a CUDA device.

A :class:`Backend` gives kernels four things, with the same API on both sides:

* ``xp``: the array module (``numpy`` or ``cupy``) for elementwise work;
* :meth:`Backend.put` / :meth:`Backend.get`: host -> backend and backend -> host copies;
* :meth:`Backend.matmul`: a float32 result of ``a @ b`` for float32 or float16 operands, with
  float32 accumulation (float16 operands run on tensor cores on a GPU);
* a bounded cache of *resident* operands (weights, the ``B`` of a matmul) keyed by a
  caller-given content hash, so a matrix sent once stays on the device between shards.

CuPy is an optional dependency: every ``import cupy`` is inside a function, so this module
imports (and the NumPy backend works) on machines without CuPy or without a GPU.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "Backend",
    "BackendUnavailable",
    "CacheStats",
    "CupyBackend",
    "NumpyBackend",
    "ResidentCache",
    "content_key",
    "gpu_available",
    "select_backend",
]

# CUDA / cuBLAS ABI constants (cuda_runtime_api.h, cublas_api.h). They are part of the C ABI and
# never change; spelling them out avoids depending on where a CuPy version re-exports them.
_CUDA_R_32F = 0
_CUDA_R_16F = 2
_CUBLAS_OP_N = 0
_CUBLAS_OP_T = 1
_CUBLAS_COMPUTE_32F = 68  # float32 accumulation, no TF32 down-conversion of the inputs
_CUBLAS_GEMM_DEFAULT_TENSOR_OP = 99
_CUDA_MEMORY_TYPE_HOST = 1  # cudaMemoryTypeHost: page-locked (pinned) host memory

_STAGING_CHUNK_BYTES = 16 << 20


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here (CuPy missing, or no usable CUDA device)."""


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
        ((n, k) / (batch, n, k) when ``transpose_b``).
        """

    @abstractmethod
    def synchronize(self) -> None:
        """Wait until all queued work of this backend is done (no-op on NumPy)."""


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


class CupyBackend(Backend):
    """Runs kernels on one CUDA device with CuPy.

    * Host -> device copies go through page-locked (pinned) memory, which the anchors measured at
      53 GB/s against 7-12 GB/s for pageable memory. An array from :meth:`empty_host` is already
      pinned and is copied directly; any other array is staged through two pinned chunk buffers,
      so that copying chunk ``i + 1`` on the CPU overlaps the DMA of chunk ``i``.
    * :meth:`get` copies into a fresh pinned array and returns it (no extra host copy).
    * All work is queued on one non-blocking stream; :meth:`get` and :meth:`synchronize` wait.
    * Resident operands live in a :class:`ResidentCache` bounded by ``max_cache_bytes``
      (default: a quarter of the device memory free when the backend starts).
    * float16 products call ``cublasGemmStridedBatchedEx`` with float16 inputs, a float32 output
      and ``CUBLAS_COMPUTE_32F`` (tensor cores, float32 accumulation). CuPy's own ``matmul`` would
      round the result to float16. Should that call fail on some CuPy version, the product falls
      back to widening the operands to float32 (same result, slower); ``fp16_gemm`` says which.
    """

    name = "cupy"

    def __init__(
        self,
        device_id: int = 0,
        *,
        max_cache_bytes: int | None = None,
        staging_chunk_bytes: int = _STAGING_CHUNK_BYTES,
    ) -> None:
        try:
            import cupy
            import cupyx
        except ImportError as exc:  # pragma: no cover - depends on the machine
            raise BackendUnavailable(f"CuPy is not installed: {exc}") from exc
        if not gpu_available():
            raise BackendUnavailable("no usable CUDA device")
        self._cupy = cupy
        self._cupyx = cupyx
        self.xp = cupy
        self.device = cupy.cuda.Device(device_id)
        with self.device:
            free_bytes, _total = cupy.cuda.runtime.memGetInfo()
            self.stream = cupy.cuda.Stream(non_blocking=True)
        self.cache = ResidentCache(free_bytes // 4 if max_cache_bytes is None else max_cache_bytes)
        self._chunk_bytes = int(staging_chunk_bytes)
        # Two pinned staging buffers and, for each, the event of the last DMA that read it.
        self._staging: list[tuple[np.ndarray, Any]] = []
        # Pinned caller arrays whose asynchronous upload may still be running.
        self._uploads_in_flight: list[tuple[Any, np.ndarray]] = []
        self._lock = threading.Lock()
        self.fp16_gemm = "cublasGemmStridedBatchedEx"

    @contextlib.contextmanager
    def activate(self) -> Iterator[None]:
        """Make this backend's device and stream current (cuBLAS follows the current stream)."""
        with self.device, self.stream:
            yield

    def put(self, array: Any, key: str | None = None) -> Any:
        """Copy ``array`` to the device (asynchronously), or return the cached copy for ``key``.

        A pinned ``array`` (from :meth:`empty_host`) is read by the DMA after this returns:
        do not modify it before the next :meth:`get` or :meth:`synchronize`.
        """
        cupy = self._cupy
        if isinstance(array, cupy.ndarray):
            return array
        host = np.ascontiguousarray(array)
        if key is not None:
            cached = self.cache.lookup(key)
            # A key reused for other content by mistake must not hand back a wrong array.
            if cached is not None and cached.shape == host.shape and cached.dtype == host.dtype:
                return cached
        with self.activate():
            device_array = cupy.empty(host.shape, host.dtype)
            if host.nbytes:
                if self._is_pinned(host):
                    device_array.set(host, stream=self.stream)
                    with self._lock:
                        self._forget_finished_uploads()
                        self._uploads_in_flight.append((self.stream.record(), host))
                else:
                    self._upload_through_staging(host, device_array)
        if key is not None:
            self.cache.insert(key, device_array, device_array.nbytes)
        return device_array

    def get(self, array: Any) -> np.ndarray:
        """Copy ``array`` into a new pinned host array and wait for it."""
        cupy = self._cupy
        with self.activate():
            device_array = cupy.ascontiguousarray(array)
            if device_array.size == 0:
                return np.empty(device_array.shape, device_array.dtype)
            out = self._cupyx.empty_pinned(device_array.shape, device_array.dtype)
            device_array.get(stream=self.stream, out=out, blocking=True)
        with self._lock:
            self._uploads_in_flight.clear()
        return out

    def empty_host(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """An uninitialised pinned host array."""
        return self._cupyx.empty_pinned(shape, dtype)

    def synchronize(self) -> None:
        """Wait for every copy and kernel queued on this backend's stream."""
        self.stream.synchronize()
        with self._lock:
            self._uploads_in_flight.clear()

    def matmul(self, a: Any, b: Any, *, transpose_b: bool = False, scale: float = 1.0) -> Any:
        """float32 ``scale * (a @ b)`` on the device (see :meth:`Backend.matmul`)."""
        cupy = self._cupy
        _check_matmul_dtypes(a, b)
        with self.activate():
            if a.dtype == np.float16 and self.fp16_gemm == "cublasGemmStridedBatchedEx":
                try:
                    return self._gemm_fp16_fp32(a, b, transpose_b=transpose_b, scale=scale)
                except Exception as exc:  # any failure: fall back to the exact float32 path
                    self.fp16_gemm = f"fallback to float32 ({type(exc).__name__}: {exc})"
            a32 = a.astype(cupy.float32, copy=False)
            b32 = b.astype(cupy.float32, copy=False)
            if transpose_b:
                b32 = cupy.swapaxes(b32, -1, -2)
            out = cupy.matmul(a32, b32)
            if scale != 1.0:
                out *= np.float32(scale)
            return out

    # -- internals ---------------------------------------------------------------------------

    def _is_pinned(self, host: np.ndarray) -> bool:
        try:
            attributes = self._cupy.cuda.runtime.pointerGetAttributes(host.ctypes.data)
        except Exception:  # old drivers raise for pageable memory
            return False
        return getattr(attributes, "type", -1) == _CUDA_MEMORY_TYPE_HOST

    def _forget_finished_uploads(self) -> None:
        self._uploads_in_flight = [(e, h) for e, h in self._uploads_in_flight if not e.done]

    def _upload_through_staging(self, host: np.ndarray, device_array: Any) -> None:
        """Pageable -> pinned (CPU) -> device (DMA), chunk by chunk, two buffers in turn."""
        source = host.reshape(-1).view(np.uint8)
        total = source.size
        with self._lock:
            if not self._staging:
                self._staging = [
                    (self._cupyx.empty_pinned((self._chunk_bytes,), np.uint8), None)
                    for _ in range(2)
                ]
            for index, offset in enumerate(range(0, total, self._chunk_bytes)):
                slot = index % 2
                buffer, last_read = self._staging[slot]
                if last_read is not None:
                    last_read.synchronize()  # the DMA that last read this buffer has finished
                length = min(self._chunk_bytes, total - offset)
                buffer[:length] = source[offset : offset + length]
                (device_array.data + offset).copy_from_host_async(
                    buffer.ctypes.data, length, self.stream
                )
                self._staging[slot] = (buffer, self.stream.record())

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
            self._cupy.cuda.device.get_cublas_handle(),
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


def _check_matmul_dtypes(a: Any, b: Any) -> None:
    if a.dtype != b.dtype or a.dtype not in (np.float32, np.float16):
        raise TypeError(f"matmul operands must share float32 or float16, got {a.dtype}, {b.dtype}")


def gpu_available() -> bool:
    """Whether CuPy imports and a CUDA device answers; never raises."""
    try:
        import cupy

        if not cupy.cuda.is_available():
            return False
        with cupy.cuda.Device(0):
            cupy.cuda.runtime.memGetInfo()  # touches the driver: fails on a broken setup
        return True
    except Exception:  # any failure means "no usable GPU"
        return False


def select_backend(prefer: str = "auto") -> Backend:
    """A backend: ``"cupy"``, ``"numpy"``, or ``"auto"`` (CuPy when a GPU is usable).

    Create one per worker and keep it: the resident cache lives in the backend.
    Raises :class:`BackendUnavailable` for ``"cupy"`` without a usable GPU, ValueError for an
    unknown name.
    """
    if prefer == "numpy":
        return NumpyBackend()
    if prefer == "cupy":
        return CupyBackend()
    if prefer == "auto":
        return CupyBackend() if gpu_available() else NumpyBackend()
    raise ValueError(f"unknown backend {prefer!r}: expected 'auto', 'cupy' or 'numpy'")
