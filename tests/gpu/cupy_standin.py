"""A NumPy stand-in for the slice of CuPy that ``kernels/backend.py`` uses. NOT a GPU.

The machines that run this project's tests have no GPU, so the CuPy backend's logic (the row
pipeline over three streams, staging buffers, the pinned pool, the resident cache under memory
pressure, the float16 fallback rules, the TF32 refusal, the cuBLAS argument mapping) is run
against this model instead. It proves the logic, never speed, and never CuPy itself: the GPU
tests in ``test_kernels_gpu.py`` do that on a lent GPU.

What it models, and how faithfully:

* Device memory is host memory owned by NumPy buffers, and device pointers are their real
  addresses: the backend's raw-pointer code (``MemoryPointer`` offsets, cuBLAS leading
  dimensions and strides) moves real bytes, and every copy or GEMM operand is bounds-checked
  against a live allocation.
* A stream is a queue. Copies queued on it run only when something waits for them
  (``Stream.synchronize``, ``Event.synchronize``, or a stream that ``wait_event``-ed them being
  flushed). Kernels (elementwise ops, ``matmul``, cuBLAS) run eagerly on the current stream after
  flushing that stream's queue. So a missing ``wait_event`` shows up as a kernel reading memory
  the copy has not filled yet, and a staging buffer reused before its DMA ran as wrong bytes.
  Not modelled: CuPy's pool handing a freed block to another allocation while a copy on another
  stream still reads it (blocks here stay alive while a queued copy refers to them).
* Host memory from ``runtime.hostAlloc`` is "pinned"; ``pointerGetAttributes`` says so. An
  asynchronous copy from or to other host memory behaves as CUDA's does for pageable memory
  (the upload's source is read at once; the download completes before returning) and is
  counted in :attr:`CupyStandin.pageable_async_copies`.
* Device memory has a capacity: an allocation beyond it raises ``OutOfMemoryError`` as CuPy's
  pool does after freeing its cached blocks. Failures can be injected (:meth:`CupyStandin.fail`).
* ``CUPY_TF32`` is read as CuPy 14.2 reads it (``_routines_linalg.get_compute_type``: lazily, at
  the first float32 product, then cached for the process), and float32 products with a TF32
  compute type (2-D) or a TF32 cuBLAS math mode round their inputs to TF32 (10 mantissa bits).
* ``cublas.gemmStridedBatchedEx`` implements cuBLAS's column-major definition independently of
  the backend: ``C[i + j ldc] = alpha sum_l op(A)[i, l] op(B)[l, j] + beta C[i + j ldc]``.

Names and parameters follow CuPy 14.2's source (``cupy/cuda/memory.pyx``, ``stream.pyx``,
``device.pyx``, ``cupy_backends/cuda/api/runtime.pyx``, ``cupy_backends/cuda/libs/cublas.pyx``,
``cupy/_core/_routines_linalg.pyx``); ``test_cupy_standin.py`` compares them with an installed
CuPy when there is one.
"""

from __future__ import annotations

import collections
import ctypes
import os
import sys
import threading
import time
import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.lib.mixins import NDArrayOperatorsMixin

# cudaError_t names of the statuses the stand-in raises.
_CUDA_ERRORS = {
    1: ("cudaErrorInvalidValue", "invalid argument"),
    2: ("cudaErrorMemoryAllocation", "out of memory"),
    35: ("cudaErrorInsufficientDriver", "CUDA driver version is insufficient for CUDA runtime"),
    100: ("cudaErrorNoDevice", "no CUDA-capable device is detected"),
    101: ("cudaErrorInvalidDevice", "invalid device ordinal"),
}
_CUBLAS_STATUS = {
    1: "CUBLAS_STATUS_NOT_INITIALIZED",
    3: "CUBLAS_STATUS_ALLOC_FAILED",
    7: "CUBLAS_STATUS_INVALID_VALUE",
    8: "CUBLAS_STATUS_ARCH_MISMATCH",
    13: "CUBLAS_STATUS_EXECUTION_FAILED",
    15: "CUBLAS_STATUS_NOT_SUPPORTED",
}
_CUDA_R_32F, _CUDA_R_16F = 0, 2
_CUBLAS_COMPUTE_32F = 68
_DTYPE_OF_CUDA = {_CUDA_R_32F: np.dtype(np.float32), _CUDA_R_16F: np.dtype(np.float16)}
_CUBLAS_TF32_TENSOR_OP_MATH = 3


class CUDARuntimeError(RuntimeError):
    """``cupy_backends.cuda.api.runtime.CUDARuntimeError(status)``."""

    def __init__(self, status: int) -> None:
        self.status = status
        name, message = _CUDA_ERRORS.get(status, (f"cudaError{status}", "unknown error"))
        super().__init__(f"{name}: {message}")


class CUBLASError(RuntimeError):
    """``cupy_backends.cuda.libs.cublas.CUBLASError(status)``."""

    def __init__(self, status: int) -> None:
        self.status = status
        super().__init__(_CUBLAS_STATUS.get(status, f"CUBLAS_STATUS_{status}"))


class OutOfMemoryError(MemoryError):
    """``cupy.cuda.memory.OutOfMemoryError(size, total, limit=0)``."""

    def __init__(self, size: int, total: int, limit: int = 0) -> None:
        self._size, self._total, self._limit = size, total, limit
        super().__init__(
            f"Out of memory allocating {size:,} bytes (allocated so far: {total:,} bytes)."
        )


class PointerAttributes:
    """``runtime.PointerAttributes``: ``type`` 0 unregistered, 1 host (pinned), 2 device."""

    def __init__(self, device: int, devicePointer: int, hostPointer: int, type: int) -> None:
        self.device = device
        self.devicePointer = devicePointer
        self.hostPointer = hostPointer
        self.type = type


@dataclass(frozen=True)
class FakeGpu:
    """One physical card of the stand-in machine."""

    name: str = "Stand-in H200 (not a GPU)"
    pci_bus_id: str = "0000:3B:00.0"
    major: int = 9
    minor: int = 0
    mem_total: int = 1 << 30


# -- memory ---------------------------------------------------------------------------------------
class _Allocation:
    """One device allocation: a NumPy byte buffer whose address is the device pointer."""

    def __init__(self, standin: CupyStandin, nbytes: int) -> None:
        self.nbytes = nbytes
        self.buffer = np.zeros(max(nbytes, 1), np.uint8)
        self.ptr = int(self.buffer.ctypes.data)
        standin._register(self)
        weakref.finalize(self, standin._unregister, self.ptr, nbytes)


class MemoryPointer:
    """``cupy.cuda.MemoryPointer``: an allocation and a byte offset into it."""

    def __init__(self, mem: _Allocation, offset: int) -> None:
        self.mem = mem
        self.ptr = mem.ptr + offset

    def __add__(self, offset: int) -> MemoryPointer:
        return MemoryPointer(self.mem, self.ptr - self.mem.ptr + int(offset))

    def __int__(self) -> int:
        return self.ptr

    def copy_from_host_async(self, mem: Any, size: int, stream: Any = None) -> None:
        """Queue host -> device on ``stream`` (the current one by default)."""
        standin = _current_standin()
        source = mem if isinstance(mem, int) else mem.value
        self._check(size)
        stream = stream if stream is not None else standin.current_stream()
        if size <= 0:
            return
        destination, mem = self.ptr, self.mem
        # The queued copy holds the allocation: CuPy's pool orders a freed block's reuse after
        # the work already queued on the stream, so dropping the array here is legal.
        if standin.is_pinned(source, size):
            pinned = standin._pinned_buffer(source)
            stream._enqueue(
                lambda: (mem, pinned, standin._pinned_dma(destination, source, size, source))
            )
        else:
            # CUDA stages pageable memory before returning: the source may change afterwards.
            standin.pageable_async_copies += 1
            staged = _bytes_at(source, size).copy()
            stream._enqueue(lambda: (mem, ctypes.memmove(destination, staged.ctypes.data, size)))

    def copy_to_host_async(self, mem: Any, size: int, stream: Any = None) -> None:
        """Queue device -> host on ``stream``; completes before returning for pageable memory."""
        standin = _current_standin()
        target = mem if isinstance(mem, int) else mem.value
        self._check(size)
        stream = stream if stream is not None else standin.current_stream()
        if size <= 0:
            return
        source, mem = self.ptr, self.mem
        if standin.is_pinned(target, size):
            pinned = standin._pinned_buffer(target)
            stream._enqueue(
                lambda: (mem, pinned, standin._pinned_dma(target, source, size, target))
            )
            return
        stream._enqueue(lambda: (mem, ctypes.memmove(target, source, size)))
        standin.pageable_async_copies += 1
        stream.synchronize()

    def _check(self, size: int) -> None:
        if not self.mem.ptr <= self.ptr <= self.ptr + size <= self.mem.ptr + self.mem.nbytes:
            raise AssertionError(
                f"copy of {size} bytes at offset {self.ptr - self.mem.ptr} overruns an "
                f"allocation of {self.mem.nbytes} bytes"
            )


def _bytes_at(ptr: int, nbytes: int) -> np.ndarray:
    return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_uint8)), shape=(nbytes,))


class MemoryPool:
    """``cupy.cuda.MemoryPool``: accounting only (blocks are freed when arrays die)."""

    def __init__(self, standin: CupyStandin) -> None:
        self._standin = standin
        self.free_all_blocks_calls = 0
        self.limit = 0  # bytes; 0: none

    def free_all_blocks(self, stream: Any = None) -> None:
        self.free_all_blocks_calls += 1

    def set_limit(self, size: int | None = None, fraction: float | None = None) -> None:
        if fraction is not None:
            size = int(fraction * self._standin._capacity())
        self.limit = int(size or 0)

    def get_limit(self) -> int:
        return self.limit

    def used_bytes(self) -> int:
        return self._standin.device_bytes

    def total_bytes(self) -> int:
        return self._standin.device_bytes


# -- streams and events ---------------------------------------------------------------------------
class Stream:
    """``cupy.cuda.Stream``: a queue of copies, run when something waits for them."""

    null: Stream | None = None

    def __init__(
        self,
        null: bool = False,
        non_blocking: bool = False,
        ptds: bool = False,
        priority: Any = None,
    ) -> None:
        self._queue: collections.deque[Callable[[], Any]] = collections.deque()
        self._enqueued = 0
        self._executed = 0
        self._lock = threading.RLock()
        self._run_lock = threading.RLock()
        self.ptr = 0 if null else id(self)
        self.non_blocking = non_blocking

    def __enter__(self) -> Stream:
        _current_standin()._stream_stack().append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _current_standin()._stream_stack().pop()

    def _enqueue(self, work: Callable[[], Any]) -> None:
        with self._lock:
            self._queue.append(work)
            self._enqueued += 1

    def _run_until(self, position: int) -> None:
        # One thread at a time runs this stream's work, in order, and a position counts as
        # reached only once its work has finished. Counted when taken, a waiter on another
        # thread returned while the copy it waited for was still running: a lane's shard read
        # a resident B whose upload on another lane had not landed, and a whole shard came out
        # zeros (11 of 300 runs of the GPU benchmark on this stand-in, 2026-12-07).
        with self._run_lock:
            while True:
                with self._lock:
                    if self._executed >= position or not self._queue:
                        return
                    work = self._queue.popleft()
                work()
                with self._lock:
                    self._executed += 1

    @property
    def done(self) -> bool:
        return self._executed >= self._enqueued

    def synchronize(self) -> None:
        self._run_until(self._enqueued)

    def record(self, event: Event | None = None) -> Event:
        event = event if event is not None else Event()
        event.record(self)
        return event

    def wait_event(self, event: Event) -> None:
        # A barrier: work queued after it starts only once the event's stream got there.
        self._enqueue(event.synchronize)


class Event:
    """``cupy.cuda.Event``: a position in one stream's queue."""

    def __init__(
        self, block: bool = False, disable_timing: bool = False, interprocess: bool = False
    ) -> None:
        self._stream: Stream | None = None
        self._position = 0
        self._time = 0.0

    def record(self, stream: Stream | None = None) -> None:
        stream = stream if stream is not None else _current_standin().current_stream()
        self._stream, self._position = stream, stream._enqueued
        # Timing (for a smoke test of the benchmark only): when the stream gets here.
        stream._enqueue(self._stamp)
        self._position = stream._enqueued

    def _stamp(self) -> None:
        self._time = time.perf_counter()

    @property
    def done(self) -> bool:
        return self._stream is None or self._stream._executed >= self._position

    def synchronize(self) -> None:
        if self._stream is not None:
            self._stream._run_until(self._position)


# -- arrays ---------------------------------------------------------------------------------------
class ndarray(NDArrayOperatorsMixin):
    """``cupy.ndarray``: a NumPy view of an :class:`_Allocation`.

    Refuses to turn into a NumPy array implicitly, and refuses NumPy operands, as CuPy does.
    """

    def __init__(self, array: np.ndarray, mem: _Allocation) -> None:
        self._a = array
        self._mem = mem

    # construction helpers
    @staticmethod
    def _adopt(values: np.ndarray) -> ndarray:
        """A new device array holding a copy of host ``values``."""
        standin = _current_standin()
        values = np.asarray(values)
        mem = standin._allocate(values.nbytes)
        array = np.ndarray(values.shape, values.dtype, buffer=mem.buffer, offset=0)
        array[...] = values
        return ndarray(array, mem)

    def _like(self, result: Any) -> Any:
        if not isinstance(result, np.ndarray):
            return result
        if np.shares_memory(result, self._mem.buffer):
            return ndarray(result, self._mem)
        return ndarray._adopt(result)

    # NumPy protocol
    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise TypeError(
            "Implicit conversion to a NumPy array is not allowed. Please use `.get()` to "
            "construct a NumPy array explicitly."
        )

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        _flush_current()
        unwrapped = [_unwrap(x) for x in inputs]
        out = kwargs.get("out")
        if out is not None:
            kwargs["out"] = tuple(_unwrap(x) for x in out)
        result = getattr(ufunc, method)(*unwrapped, **kwargs)
        if out is not None:
            return out[0] if len(out) == 1 else out
        return ndarray._adopt(result) if isinstance(result, np.ndarray) else result

    # attributes
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: self._like(self._a.T))

    @property
    def data(self) -> MemoryPointer:
        return MemoryPointer(self._mem, int(self._a.ctypes.data) - self._mem.ptr)

    def __len__(self) -> int:
        return len(self._a)

    def __repr__(self) -> str:
        return f"standin.ndarray(shape={self.shape}, dtype={self.dtype})"

    # indexing and views
    def _view_or_copy(self, operation: Callable[[np.ndarray], np.ndarray]) -> ndarray:
        # A view reads nothing (no kernel, no flush); a copy is a kernel on the current stream.
        result = operation(self._a)
        if not np.shares_memory(result, self._mem.buffer):
            _flush_current()
            result = operation(self._a)
        return self._like(result)

    def __getitem__(self, key: Any) -> Any:
        index = _unwrap(key)
        return self._view_or_copy(lambda a: a[index])

    def __setitem__(self, key: Any, value: Any) -> None:
        _flush_current()
        self._a[_unwrap(key)] = _unwrap(value)

    def reshape(self, *shape: Any) -> ndarray:
        return self._view_or_copy(lambda a: a.reshape(*shape))

    def ravel(self) -> ndarray:
        return self._view_or_copy(lambda a: a.ravel())

    def swapaxes(self, axis1: int, axis2: int) -> ndarray:
        return self._like(self._a.swapaxes(axis1, axis2))

    def copy(self) -> ndarray:
        _flush_current()
        return ndarray._adopt(self._a.copy())

    def astype(
        self,
        dtype: Any,
        order: str = "K",
        casting: Any = None,
        subok: Any = None,
        copy: bool = True,
    ) -> ndarray:
        if not copy and np.dtype(dtype) == self.dtype:
            return self
        _flush_current()
        return ndarray._adopt(self._a.astype(dtype))

    def max(self, axis: Any = None, out: Any = None, keepdims: bool = False) -> ndarray:
        _flush_current()
        return ndarray._adopt(np.asarray(self._a.max(axis=axis, keepdims=keepdims)))

    def sum(
        self, axis: Any = None, dtype: Any = None, out: Any = None, keepdims: bool = False
    ) -> ndarray:
        _flush_current()
        return ndarray._adopt(np.asarray(self._a.sum(axis=axis, dtype=dtype, keepdims=keepdims)))

    def fill(self, value: Any) -> None:
        _flush_current()
        self._a.fill(value)

    def item(self) -> Any:
        _flush_current()
        return self._a.item()

    # host copies (synchronous, like CuPy's defaults)
    def get(
        self, stream: Any = None, order: str = "C", out: Any = None, blocking: bool = True
    ) -> np.ndarray:
        (stream or _current_standin().current_stream()).synchronize()
        if out is None:
            return np.array(self._a, order=order)
        out[...] = self._a
        return out

    def set(self, arr: Any, stream: Any = None) -> None:
        (stream or _current_standin().current_stream()).synchronize()
        self._a[...] = np.asarray(arr)


def _unwrap(value: Any) -> Any:
    if isinstance(value, ndarray):
        return value._a
    if isinstance(value, np.ndarray) and value.ndim > 0:
        raise TypeError(f"Unsupported type {type(value)}")  # CuPy refuses host arrays
    if isinstance(value, tuple):
        return tuple(_unwrap(v) for v in value)
    return value


def _flush_current() -> None:
    _current_standin().current_stream().synchronize()


# -- the stand-in ---------------------------------------------------------------------------------

_ACTIVE: list[CupyStandin] = []


def _current_standin() -> CupyStandin:
    return _ACTIVE[-1]


class CupyStandin:
    """State of one stand-in "machine" and the module objects that expose it as CuPy.

    ``gpus``: the physical cards; ``CUDA_VISIBLE_DEVICES`` (integers) chooses which are visible,
    as the CUDA runtime does. ``driver_error``: a CUDA status ``getDeviceCount`` raises.
    """

    def __init__(
        self, gpus: tuple[FakeGpu, ...] = (FakeGpu(),), *, driver_error: int | None = None
    ) -> None:
        self.gpus = gpus
        self.driver_error = driver_error
        self.pageable_async_copies = 0
        self.gemm_calls = 0
        self.float32_products = 0
        self.tf32_products = 0
        self.device_bytes = 0
        self.peak_device_bytes = 0
        self._allocations: dict[int, int] = {}  # ptr -> nbytes (device)
        self._pinned: dict[int, np.ndarray] = {}  # ptr -> buffer (page-locked host)
        self.pinned_allocations = 0
        self.pinned_frees = 0
        self._failures: dict[str, list[BaseException]] = collections.defaultdict(list)
        self._local = threading.local()
        self._handles: dict[int, int] = {}
        self.math_modes: dict[int, int] = {}
        self._compute_types = [0, 0, 0, 0]  # COMPUTE_TYPE_TBD for bf16, f16, f32, f64
        self.null_stream = Stream(null=True)
        self.memory_pool = MemoryPool(self)
        self.modules = self._build_modules()

    # -- control --------------------------------------------------------------------------

    def fail(self, what: str, error: BaseException, times: int = 1) -> None:
        """Make the next ``times`` calls of ``what`` raise ``error``: ``"gemm"`` (cuBLAS
        gemmStridedBatchedEx), ``"alloc"`` (device allocation) or ``"hostAlloc"``."""
        self._failures[what].extend([error] * times)

    def _maybe_fail(self, what: str) -> None:
        if self._failures.get(what):
            raise self._failures[what].pop(0)

    @property
    def pinned_bytes(self) -> int:
        return sum(buffer.nbytes for buffer in self._pinned.values())

    def visible(self) -> list[FakeGpu]:
        value = os.environ.get("CUDA_VISIBLE_DEVICES")
        if value is None:
            return list(self.gpus)
        chosen = []
        for part in value.split(","):
            part = part.strip()
            if not part.lstrip("-").isdigit() or int(part) < 0 or int(part) >= len(self.gpus):
                break  # CUDA stops at the first invalid entry
            chosen.append(self.gpus[int(part)])
        return chosen

    def current_device(self) -> int:
        return getattr(self._local, "device", 0)

    def _stream_stack(self) -> list[Stream]:
        stack = getattr(self._local, "streams", None)
        if stack is None:
            stack = self._local.streams = []
        return stack

    def current_stream(self) -> Stream:
        stack = self._stream_stack()
        return stack[-1] if stack else self.null_stream

    # -- memory ---------------------------------------------------------------------------

    def _capacity(self) -> int:
        visible = self.visible()
        return visible[self.current_device()].mem_total if visible else 0

    def _allocate(self, nbytes: int) -> _Allocation:
        self._maybe_fail("alloc")
        limit = self.memory_pool.limit
        if self.device_bytes + nbytes > self._capacity():
            raise OutOfMemoryError(nbytes, self.device_bytes)
        if limit and self.device_bytes + nbytes > limit:
            raise OutOfMemoryError(nbytes, self.device_bytes, limit)
        return _Allocation(self, nbytes)

    def _register(self, allocation: _Allocation) -> None:
        self._allocations[allocation.ptr] = allocation.nbytes
        self.device_bytes += allocation.nbytes
        self.peak_device_bytes = max(self.peak_device_bytes, self.device_bytes)

    def _unregister(self, ptr: int, nbytes: int) -> None:
        if self._allocations.pop(ptr, None) is not None:
            self.device_bytes -= nbytes

    def _device_range(self, ptr: int, nbytes: int) -> bool:
        return any(p <= ptr and ptr + nbytes <= p + n for p, n in self._allocations.items())

    def _pinned_dma(self, destination: int, source: int, size: int, host: int) -> None:
        # The queued copy holds the buffer (no crash), and freeing it first is reported.
        if not self.is_pinned(host, size):
            raise AssertionError("page-locked memory was freed before its queued DMA ran")
        ctypes.memmove(destination, source, size)

    def _pinned_buffer(self, ptr: int) -> np.ndarray | None:
        return next((b for p, b in self._pinned.items() if p <= ptr < p + b.nbytes), None)

    def is_pinned(self, ptr: int, nbytes: int) -> bool:
        return any(p <= ptr and ptr + nbytes <= p + b.nbytes for p, b in self._pinned.items())

    def host_alloc(self, size: int, flags: int) -> int:
        self._maybe_fail("hostAlloc")
        buffer = np.zeros(max(size, 1), np.uint8)
        ptr = int(buffer.ctypes.data)
        self._pinned[ptr] = buffer
        self.pinned_allocations += 1
        return ptr

    def free_host(self, ptr: int) -> None:
        if self._pinned.pop(ptr, None) is None:
            raise CUDARuntimeError(1)
        self.pinned_frees += 1

    def pointer_attributes(self, ptr: int) -> PointerAttributes:
        if self.is_pinned(ptr, 1):
            return PointerAttributes(-1, 0, ptr, 1)
        if self._device_range(ptr, 1):
            return PointerAttributes(self.current_device(), ptr, 0, 2)
        return PointerAttributes(-2, 0, 0, 0)  # cudaMemoryTypeUnregistered

    # -- products ------------------------------------------------------------------------

    def _float32_tf32(self, batched: bool) -> bool:
        handle_tf32 = (
            self.math_modes.get(self.cublas_handle(), 0) & 0xF == _CUBLAS_TF32_TENSOR_OP_MATH
        )
        compute_tf32 = not batched and self.get_compute_type(np.float32) == 7
        return handle_tf32 or compute_tf32

    def matmul(self, a: ndarray, b: ndarray) -> ndarray:
        _flush_current()
        x, y = _unwrap(a), _unwrap(b)
        if x.dtype == np.float32 and y.dtype == np.float32:
            self.float32_products += 1
            if self._float32_tf32(batched=x.ndim > 2 or y.ndim > 2):
                self.tf32_products += 1
                x, y = _round_to_tf32(x), _round_to_tf32(y)
        return ndarray._adopt(np.matmul(x, y))

    def cublas_handle(self) -> int:
        thread = threading.get_ident()
        return self._handles.setdefault(thread, 1000 + len(self._handles))

    def gemm_strided_batched_ex(
        self,
        handle: int,
        transa: int,
        transb: int,
        m: int,
        n: int,
        k: int,
        alpha: int,
        A: int,
        Atype: int,
        lda: int,
        strideA: int,
        B: int,
        Btype: int,
        ldb: int,
        strideB: int,
        beta: int,
        C: int,
        Ctype: int,
        ldc: int,
        strideC: int,
        batchCount: int,
        computeType: int,
        algo: int,
    ) -> None:
        """cuBLAS's definition, column-major, on raw pointers (bounds-checked)."""
        _flush_current()
        self._maybe_fail("gemm")
        self.gemm_calls += 1
        if Atype not in _DTYPE_OF_CUDA or Btype not in _DTYPE_OF_CUDA or Ctype != _CUDA_R_32F:
            raise CUBLASError(15)
        if computeType != _CUBLAS_COMPUTE_32F:
            raise CUBLASError(15)
        if min(m, n, k, batchCount) < 0 or transa not in (0, 1) or transb not in (0, 1):
            raise CUBLASError(7)
        rows_a = m if transa == 0 else k
        rows_b = k if transb == 0 else n
        if lda < max(1, rows_a) or ldb < max(1, rows_b) or ldc < max(1, m):
            raise CUBLASError(7)
        alpha_value = float(_bytes_at(alpha, 4).view(np.float32)[0])
        beta_value = float(_bytes_at(beta, 4).view(np.float32)[0])
        a_type, b_type, c_type = _DTYPE_OF_CUDA[Atype], _DTYPE_OF_CUDA[Btype], np.dtype(np.float32)
        for p in range(batchCount):
            a_stored = self._column_major(
                A + p * strideA * a_type.itemsize, a_type, rows_a, k if transa == 0 else m, lda
            )
            b_stored = self._column_major(
                B + p * strideB * b_type.itemsize, b_type, rows_b, n if transb == 0 else k, ldb
            )
            c = self._column_major(C + p * strideC * c_type.itemsize, c_type, m, n, ldc)
            op_a = a_stored if transa == 0 else a_stored.T  # (m, k)
            op_b = b_stored if transb == 0 else b_stored.T  # (k, n)
            product = np.matmul(op_a.astype(np.float32), op_b.astype(np.float32))
            result = np.float32(alpha_value) * product
            if beta_value != 0.0:
                result = result + np.float32(beta_value) * c
            c[...] = result

    def _column_major(self, ptr: int, dtype: np.dtype, rows: int, cols: int, ld: int) -> np.ndarray:
        """The (rows, cols) column-major matrix at ``ptr`` with leading dimension ``ld``."""
        extent = ((cols - 1) * ld + rows) * dtype.itemsize if rows and cols else 0
        if extent and not self._device_range(ptr, extent):
            raise AssertionError(
                f"cuBLAS operand of {extent} bytes at {ptr:#x} is outside any allocation"
            )
        flat = np.ctypeslib.as_array(
            ctypes.cast(ptr, ctypes.POINTER(ctypes.c_uint8)), shape=(max(extent, 1),)
        )
        typed = flat[:extent].view(dtype) if extent else np.empty(0, dtype)
        return np.lib.stride_tricks.as_strided(
            typed, shape=(rows, cols), strides=(dtype.itemsize, ld * dtype.itemsize)
        )

    # CuPy 14.2 _routines_linalg.get_compute_type / set_compute_type
    def get_compute_type(self, dtype: Any) -> int:
        index = _compute_type_index(dtype)
        if self._compute_types[index] == 0:  # COMPUTE_TYPE_TBD
            compute_type = 1  # COMPUTE_TYPE_DEFAULT
            if np.dtype(dtype).char in "fF" and int(os.getenv("CUPY_TF32", "0")) > 0:
                compute_type = 7  # COMPUTE_TYPE_TF32
            self.set_compute_type(dtype, compute_type)
        return self._compute_types[index]

    def set_compute_type(self, dtype: Any, compute_type: int) -> None:
        if compute_type not in range(8):
            raise ValueError(f"Unknown compute type: {compute_type}")
        self._compute_types[_compute_type_index(dtype)] = compute_type

    # -- modules ------------------------------------------------------------------------------

    def _build_modules(self) -> dict[str, types.ModuleType]:
        standin = self

        def module(name: str, **attributes: Any) -> types.ModuleType:
            created = types.ModuleType(name, "stand-in (tests/gpu/cupy_standin.py), not CuPy")
            created.__dict__.update(attributes)
            return created

        def get_device_count() -> int:
            if standin.driver_error is not None:
                raise CUDARuntimeError(standin.driver_error)
            return len(standin.visible())

        def mem_get_info() -> tuple[int, int]:
            capacity = standin._capacity()
            return capacity - standin.device_bytes, capacity

        def get_device_properties(device: int) -> dict[str, Any]:
            gpu = standin._visible_gpu(device)
            return {
                "name": gpu.name.encode(),
                "totalGlobalMem": gpu.mem_total,
                "major": gpu.major,
                "minor": gpu.minor,
                "multiProcessorCount": 132,
            }

        runtime = module(
            "cupy.cuda.runtime",
            CUDARuntimeError=CUDARuntimeError,
            PointerAttributes=PointerAttributes,
            getDeviceCount=get_device_count,
            memGetInfo=mem_get_info,
            getDeviceProperties=get_device_properties,
            driverGetVersion=lambda: 13000,
            runtimeGetVersion=lambda: 13000,
            hostAlloc=lambda size, flags: standin.host_alloc(size, flags),
            freeHost=lambda ptr: standin.free_host(ptr),
            pointerGetAttributes=lambda ptr: standin.pointer_attributes(ptr),
            deviceGetPCIBusId=lambda device: standin._visible_gpu(device).pci_bus_id,
        )
        memory = module(
            "cupy.cuda.memory",
            OutOfMemoryError=OutOfMemoryError,
            MemoryPointer=MemoryPointer,
            MemoryPool=MemoryPool,
        )
        device_module = module("cupy.cuda.device", get_cublas_handle=standin.cublas_handle)

        class Device:
            """``cupy.cuda.Device``."""

            def __init__(self, device: int | None = None) -> None:
                self.id = standin.current_device() if device is None else int(device)

            def __enter__(self) -> Device:
                if self.id >= len(standin.visible()):
                    raise CUDARuntimeError(101)
                stack = getattr(standin._local, "devices", None)
                if stack is None:
                    stack = standin._local.devices = []
                stack.append(standin.current_device())
                standin._local.device = self.id
                return self

            def __exit__(self, *exc: object) -> None:
                standin._local.device = standin._local.devices.pop()

            @property
            def pci_bus_id(self) -> str:
                return standin._visible_gpu(self.id).pci_bus_id

            @property
            def compute_capability(self) -> str:
                gpu = standin._visible_gpu(self.id)
                return f"{gpu.major}{gpu.minor}"

            def synchronize(self) -> None:
                standin.null_stream.synchronize()

        cuda = module(
            "cupy.cuda",
            Device=Device,
            Stream=Stream,
            Event=Event,
            MemoryPointer=MemoryPointer,
            runtime=runtime,
            memory=memory,
            device=device_module,
            is_available=lambda: standin.driver_error is None and bool(standin.visible()),
            get_current_stream=lambda device_id=-1: standin.current_stream(),
            get_elapsed_time=lambda start, end: (end._time - start._time) * 1e3,
        )
        linalg = module(
            "cupy._core._routines_linalg",
            COMPUTE_TYPE_TBD=0,
            COMPUTE_TYPE_DEFAULT=1,
            COMPUTE_TYPE_PEDANTIC=2,
            COMPUTE_TYPE_FP16=3,
            COMPUTE_TYPE_FP32=4,
            COMPUTE_TYPE_FP64=5,
            COMPUTE_TYPE_BF16=6,
            COMPUTE_TYPE_TF32=7,
            get_compute_type=standin.get_compute_type,
            set_compute_type=standin.set_compute_type,
            compute_type_to_str=lambda compute_type: {
                0: "COMPUTE_TYPE_TBD",
                1: "COMPUTE_TYPE_DEFAULT",
                2: "COMPUTE_TYPE_PEDANTIC",
                3: "COMPUTE_TYPE_FP16",
                4: "COMPUTE_TYPE_FP32",
                5: "COMPUTE_TYPE_FP64",
                6: "COMPUTE_TYPE_BF16",
                7: "COMPUTE_TYPE_TF32",
            }.get(compute_type, compute_type),
        )
        core = module("cupy._core", _routines_linalg=linalg)

        def get_math_mode(handle: int) -> int:
            return standin.math_modes.get(handle, 0)

        def set_math_mode(handle: int, mode: int) -> None:
            standin.math_modes[handle] = mode

        cublas = module(
            "cupy_backends.cuda.libs.cublas",
            CUBLASError=CUBLASError,
            gemmStridedBatchedEx=standin.gemm_strided_batched_ex,
            getMathMode=get_math_mode,
            setMathMode=set_math_mode,
            CUBLAS_DEFAULT_MATH=0,
            CUBLAS_TENSOR_OP_MATH=1,
        )
        libs = module("cupy_backends.cuda.libs", cublas=cublas)
        backends_cuda = module("cupy_backends.cuda", libs=libs)
        backends = module("cupy_backends", cuda=backends_cuda)

        def empty(shape: Any, dtype: Any = float, order: str = "C") -> ndarray:
            dtype = np.dtype(dtype)
            shape = (shape,) if isinstance(shape, int) else tuple(shape)
            mem = standin._allocate(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
            return ndarray(np.ndarray(shape, dtype, buffer=mem.buffer), mem)

        def full(shape: Any, value: Any, dtype: Any = float) -> ndarray:
            out = empty(shape, dtype)
            _flush_current()
            out._a.fill(value)
            return out

        def asarray(a: Any, dtype: Any = None, order: Any = None) -> ndarray:
            if isinstance(a, ndarray):
                return a if dtype is None else a.astype(dtype, copy=False)
            _flush_current()
            return ndarray._adopt(np.asarray(a, dtype=dtype))

        def ascontiguousarray(a: ndarray, dtype: Any = None) -> ndarray:
            if dtype is not None and np.dtype(dtype) != a.dtype:
                a = a.astype(dtype)
            if a.flags.c_contiguous:
                return a
            _flush_current()
            return ndarray._adopt(np.ascontiguousarray(a._a))

        def ufunc(function: Any) -> Callable[..., Any]:
            def call(*args: Any, **kwargs: Any) -> Any:
                return function(*args, **kwargs)

            return call

        cupy = module(
            "cupy",
            __version__="14.2.0+standin",
            ndarray=ndarray,
            cuda=cuda,
            _core=core,
            uint8=np.uint8,
            float16=np.float16,
            float32=np.float32,
            float64=np.float64,
            empty=empty,
            zeros=lambda shape, dtype=float: full(shape, 0, dtype),
            ones=lambda shape, dtype=float: full(shape, 1, dtype),
            asarray=asarray,
            ascontiguousarray=ascontiguousarray,
            matmul=standin.matmul,
            swapaxes=lambda a, axis1, axis2: a.swapaxes(axis1, axis2),
            tanh=ufunc(np.tanh),
            exp=ufunc(np.exp),
            abs=ufunc(np.abs),
            get_default_memory_pool=lambda: standin.memory_pool,
        )
        return {
            "cupy": cupy,
            "cupy.cuda": cuda,
            "cupy.cuda.runtime": runtime,
            "cupy.cuda.memory": memory,
            "cupy.cuda.device": device_module,
            "cupy._core": core,
            "cupy._core._routines_linalg": linalg,
            "cupy_backends": backends,
            "cupy_backends.cuda": backends_cuda,
            "cupy_backends.cuda.libs": libs,
            "cupy_backends.cuda.libs.cublas": cublas,
        }

    def _visible_gpu(self, device: int) -> FakeGpu:
        visible = self.visible()
        if not 0 <= device < len(visible):
            raise CUDARuntimeError(101)
        return visible[device]

    def install(self, monkeypatch: Any) -> CupyStandin:
        """Make ``import cupy`` (and the submodules the backend imports) give this stand-in;
        ``monkeypatch`` restores ``sys.modules``, :meth:`uninstall` the rest."""
        for name, created in self.modules.items():
            monkeypatch.setitem(sys.modules, name, created)
        _ACTIVE.append(self)
        return self

    def uninstall(self) -> None:
        """Stop being the stand-in that module functions talk to."""
        if self in _ACTIVE:
            _ACTIVE.remove(self)


def _compute_type_index(dtype: Any) -> int:
    char = np.dtype(dtype).char
    if char == "e":
        return 1
    if char in "fF":
        return 2
    if char in "dD":
        return 3
    raise TypeError(f"dtype is not supported: {dtype}")


def _round_to_tf32(values: np.ndarray) -> np.ndarray:
    """float32 ``values`` rounded to TF32 (10 explicit mantissa bits), nearest, as float32."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)
    return rounded.view(np.float32)
