"""The CuPy backend's logic, run against a NumPy stand-in for CuPy (NOT a GPU).

No machine that runs these tests has a GPU, so ``tests/gpu/cupy_standin.py`` models the slice of
CuPy the backend uses (see its docstring for what it models and what it does not). These tests
check the backend's logic on it: results through the chunked three-stream pipeline, stream
ordering, the cuBLAS argument mapping, the pinned pool's bounds, the resident cache under
memory pressure, the float16 fallback rules, the TF32 refusal, and the reasons given when there
is no usable GPU. Speed, and CuPy itself, are for ``test_kernels_gpu.py`` on a lent GPU.
"""

from __future__ import annotations

import gc
import importlib
import inspect
import json
import logging
import sys
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from mtor_kernels import (
    BackendUnavailable,
    CupyBackend,
    NumpyBackend,
    PinnedHostPool,
    compare,
    content_key,
    get_kernel,
    gpu_status,
    select_backend,
)
from mtor_kernels.backend import force_float32_math
from tests.gpu.cupy_standin import (
    CUBLASError,
    CupyStandin,
    FakeGpu,
    OutOfMemoryError,
    Stream,
)

MiB = 1 << 20


def operands_of(name: str, dtype: Any, rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def normal(*shape: int, scale: float = 1.0) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(dtype)

    if name == "matmul":
        return {"a": normal(rows, 48), "b": normal(48, 40)}
    if name == "mlp":
        return {
            "x": normal(rows, 32),
            "w1": normal(32, 64, scale=32**-0.5),
            "b1": normal(64, scale=0.1),
            "w2": normal(64, 24, scale=64**-0.5),
            "b2": normal(24, scale=0.1),
        }
    return {
        "q": normal(rows, 2, 12, 8),
        "k": normal(rows, 2, 10, 8),
        "v": normal(rows, 2, 10, 6),
    }


def assert_honest(name: str, operands: dict[str, np.ndarray], result: np.ndarray) -> None:
    kernel = get_kernel(name)
    assert isinstance(result, np.ndarray) and result.dtype == np.float32
    rows = range(kernel.n_rows(operands))
    expected = kernel.expected_rows(operands, rows)
    excess = np.abs(result.astype(np.float64) - expected.values) - expected.tolerance
    assert excess.max() <= 0, f"{name}: {excess.max()} beyond the honest bound"
    dtype = next(iter(operands.values())).dtype
    assert compare(kernel.reference(operands), result, dtype)[0]


def pipelined(**kwargs: Any) -> CupyBackend:
    """A backend that cuts even tiny shards into row chunks and stages through tiny buffers."""
    settings: dict[str, Any] = {
        "pipeline_min_bytes": 0,
        "pipeline_chunk_bytes": 1,
        "staging_chunk_bytes": 4096,
    }
    settings.update(kwargs)
    return CupyBackend(**settings)


# -- the stand-in itself ---------------------------------------------------------------------


def test_standin_refuses_what_cupy_refuses(standin: CupyStandin) -> None:
    import cupy

    device = cupy.asarray(np.ones(3, np.float32))
    with pytest.raises(TypeError):
        np.asarray(device)
    with pytest.raises(TypeError):
        device + np.ones(3, np.float32)
    np.testing.assert_array_equal((device * 2).get(), [2, 2, 2])


def test_standin_catches_a_missing_wait(
    standin: CupyStandin, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Proof that the model can see an ordering bug: with wait_event doing nothing, kernels read
    # device memory the upload stream has not filled yet.
    backend = pipelined()
    operands = operands_of("matmul", np.float32, rows=600)
    monkeypatch.setattr(Stream, "wait_event", lambda self, event: None)
    result = get_kernel("matmul").run(operands, backend)
    assert not np.allclose(result, get_kernel("matmul").reference(operands))


@pytest.mark.parametrize("name", ["matmul", "mlp", "attention"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "chunked"])
def test_kernels_on_the_backend_are_honest(
    standin: CupyStandin, name: str, dtype: Any, chunked: bool
) -> None:
    backend = pipelined() if chunked else CupyBackend()
    rows = 600 if name != "attention" else 5
    operands = operands_of(name, dtype, rows=rows)
    result = get_kernel(name).run(operands, backend)
    assert_honest(name, operands, result)
    assert backend.fp16_gemm == "cublasGemmStridedBatchedEx"
    assert (standin.gemm_calls > 0) == (dtype == np.float16)
    assert standin.pageable_async_copies == 0  # every DMA went through pinned memory
    assert standin.tf32_products == 0


def test_chunks_overlap_on_three_streams(standin: CupyStandin) -> None:
    backend = pipelined()
    operands = operands_of("matmul", np.float16, rows=1100)
    kernel = get_kernel("matmul")
    chunks = backend._row_chunks(kernel, operands, np.empty((1100, 40), np.float32))
    assert len(chunks) == 1100 // 256  # the 2-D minimum of rows per chunk
    assert chunks[0][0] == 0 and chunks[-1][1] == 1100
    result = kernel.run(operands, backend)
    assert standin.gemm_calls == len(chunks)
    assert_honest("matmul", operands, result)
    # Large shards with the default settings: 2 to 8 chunks of about 16 MiB.
    big = {"a": np.empty((8192, 4096), np.float16), "b": np.empty((4096, 4096), np.float16)}
    assert len(CupyBackend()._row_chunks(kernel, big, np.empty((8192, 4096), np.float32))) == 8
    small = {"a": np.empty((64, 64), np.float16), "b": np.empty((64, 64), np.float16)}
    assert CupyBackend()._row_chunks(kernel, small, np.empty((64, 64), np.float32)) == [(0, 64)]


def test_fp16_gemm_argument_mapping(standin: CupyStandin) -> None:
    """cuBLAS's column-major definition (in the stand-in) against NumPy, every layout."""
    import cupy

    backend = CupyBackend()
    rng = np.random.default_rng(1)

    def half(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float16)

    cases = [
        (half(5, 7), half(7, 3), False),  # 2-D
        (half(4, 5, 7), half(4, 7, 3), False),  # batched
        (half(4, 5, 7), half(7, 3), False),  # one b for every batch entry (stride 0)
        (half(5, 7), half(3, 7), True),  # a @ b.T
        (half(4, 5, 7), half(4, 3, 7), True),  # batched a @ b.T
    ]
    for a, b, transpose_b in cases:
        with backend.activate():
            out = backend.matmul(
                cupy.asarray(a), cupy.asarray(b), transpose_b=transpose_b, scale=0.5
            )
        b32 = np.swapaxes(b, -1, -2) if transpose_b else b
        expected = 0.5 * np.matmul(a.astype(np.float32), b32.astype(np.float32))
        np.testing.assert_allclose(backend.get(out), expected, rtol=1e-6, atol=1e-6)
    assert standin.gemm_calls == len(cases)


def test_concurrent_shards_use_separate_lanes(standin: CupyStandin) -> None:
    backend = pipelined(lanes=2)
    kernel = get_kernel("matmul")
    shards = [operands_of("matmul", np.float16, rows=520, seed=s) for s in range(6)]
    results: dict[int, np.ndarray] = {}

    def work(index: int) -> None:
        results[index] = kernel.run(shards[index], backend)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(shards))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, operands in enumerate(shards):
        assert_honest("matmul", operands, results[index])


# -- pinned host memory ---------------------------------------------------------------------------


def test_results_are_pinned_and_their_buffers_come_back(standin: CupyStandin) -> None:
    backend = CupyBackend()
    kernel = get_kernel("matmul")
    operands = operands_of("matmul", np.float32, rows=300)
    result = kernel.run(operands, backend)
    assert backend.pinned.owns(result.ctypes.data, result.nbytes)
    view = result[10:20]
    del result
    gc.collect()
    assert backend.pinned.stats().leased_bytes > 0  # a view still holds the buffer
    del view
    gc.collect()
    assert backend.pinned.stats().leased_bytes == 0
    before = backend.pinned.stats()
    for _ in range(30):  # many shards, nothing kept: the same buffers reused, no growth
        kernel.run(operands, backend)
    after = backend.pinned.stats()
    assert after.allocations == before.allocations and after.bytes == before.bytes
    assert after.bytes <= 3 * MiB  # the result and two staging buffers sized to the copies
    assert standin.pinned_allocations == after.allocations


def test_pinned_memory_stays_bounded_while_results_are_kept(standin: CupyStandin) -> None:
    backend = CupyBackend(max_pinned_bytes=4 * MiB, staging_chunk_bytes=64 << 10)
    kernel = get_kernel("matmul")
    operands = {
        "a": np.random.default_rng(0).standard_normal((2048, 64)).astype(np.float32),
        "b": np.random.default_rng(1).standard_normal((64, 256)).astype(np.float32),
    }  # a 2 MiB result: at most one fits next to the staging reserve
    kept = [kernel.run(operands, backend) for _ in range(6)]
    reference = kernel.reference(operands)
    for result in kept:
        np.testing.assert_allclose(result, reference, rtol=1e-5, atol=1e-4)
    assert standin.pinned_bytes <= 4 * MiB
    assert backend.pinned.stats().refusals > 0  # the others went through pageable memory
    assert standin.pageable_async_copies == 0  # ... by staging, not by pageable DMA


def test_page_locking_refused_falls_back_to_pageable_copies(standin: CupyStandin) -> None:
    backend = CupyBackend()
    standin.fail("hostAlloc", MemoryError("ulimit -l"), times=100)
    operands = operands_of("matmul", np.float32, rows=64)
    result = get_kernel("matmul").run(operands, backend)
    assert_honest("matmul", operands, result)
    assert standin.pageable_async_copies > 0


def test_pinned_pool_reuses_trims_and_refuses() -> None:
    now = [0.0]
    allocated: dict[int, int] = {}
    next_ptr = [4096]

    def alloc(nbytes: int) -> int:
        ptr = next_ptr[0]
        next_ptr[0] += nbytes + 4096
        allocated[ptr] = nbytes
        return ptr

    pool = PinnedHostPool(
        alloc,
        lambda ptr: allocated.pop(ptr),
        max_bytes=8 * MiB,
        idle_seconds=30,
        clock=lambda: now[0],
    )
    first = pool.acquire(3 * MiB)
    assert first is not None and first.nbytes == 3 * MiB and pool.owns(first.ptr, 3 * MiB)
    pool.release(first)
    again = pool.acquire(2 * MiB + 1)  # fits the idle 3 MiB buffer
    assert again is first and pool.stats().reuses == 1
    small = pool.acquire(1)  # a new block (small requests round to a power of two, >= 4 KiB)
    assert small is not None and small.nbytes == 4096
    assert pool.acquire(5 * MiB) is None  # 3 + 5 MiB + 4 KiB > 8 MiB: refused, nothing idle
    pool.release(again)
    assert pool.acquire(5 * MiB) is not None  # the idle 3 MiB block is freed to make room
    assert pool.stats().frees == 1
    assert pool.acquire(2 * MiB, reserve=2 * MiB) is None  # 5 + 2 + 2 reserved > 8
    array = pool.lease_array((256, 1024), np.float32)  # 1 MiB
    assert array is not None and pool.owns(array.ctypes.data, array.nbytes)
    del array
    gc.collect()
    now[0] = 100.0
    assert pool.trim() == 1 * MiB  # the returned array's block, idle for 100 s
    assert sum(allocated.values()) == pool.stats().bytes == 5 * MiB + 4096


# -- the resident cache and running out of memory -------------------------------------------------


def test_resident_cache_evicts_least_recently_used(standin: CupyStandin) -> None:
    b_bytes = 48 * 40 * 4
    backend = CupyBackend(max_cache_bytes=2 * b_bytes)
    kernel = get_kernel("matmul")
    shards = [operands_of("matmul", np.float32, rows=16, seed=s) for s in range(3)]
    keys = [{"b": content_key(s["b"])} for s in shards]
    for operands, key in zip(shards, keys, strict=True):
        kernel.run(operands, backend, keys=key)
    stats = backend.cache.stats()
    assert (stats.entries, stats.evictions, stats.bytes) == (2, 1, 2 * b_bytes)
    assert keys[0]["b"] not in backend.cache  # the least recently used went first
    result = kernel.run(shards[2], backend, keys=keys[2])
    assert backend.cache.stats().hits == 1
    assert_honest("matmul", shards[2], result)


def test_out_of_memory_evicts_frees_and_retries_once(
    standin: CupyStandin, backend_log: pytest.LogCaptureFixture
) -> None:
    backend = CupyBackend()
    kernel = get_kernel("matmul")
    operands = operands_of("matmul", np.float32, rows=64)
    key = {"b": content_key(operands["b"])}
    kernel.run(operands, backend, keys=key)
    assert backend.cache.stats().entries == 1
    standin.fail("alloc", OutOfMemoryError(1 << 30, 0))
    result = kernel.run(operands, backend, keys=key)
    assert_honest("matmul", operands, result)
    assert backend.oom_retries == 1 and backend.cache.stats().evictions == 1
    assert standin.memory_pool.free_all_blocks_calls >= 1
    assert "out of device memory" in backend_log.text
    standin.fail("alloc", OutOfMemoryError(1 << 30, 0), times=2)
    with pytest.raises(MemoryError):
        kernel.run(operands, backend, keys=key)  # retried once, then the error stands


def test_a_full_device_is_relieved_by_evicting_the_cache(make_standin: Callable[..., Any]) -> None:
    standin = make_standin((FakeGpu(mem_total=80 << 10),))
    backend = CupyBackend(max_cache_bytes=64 << 10)
    kernel = get_kernel("matmul")
    rng = np.random.default_rng(0)
    # Two resident operands of 24 KiB stay cached; the next shard (a 12 KiB, b 24 KiB, result
    # 32 KiB) fits only without them.
    for _ in range(2):
        b = rng.standard_normal((48, 128)).astype(np.float32)
        kernel.run({"a": np.ones((4, 48), np.float32), "b": b}, backend, keys={"b": content_key(b)})
    operands = {
        "a": rng.standard_normal((64, 48)).astype(np.float32),
        "b": rng.standard_normal((48, 128)).astype(np.float32),
    }
    result = kernel.run(operands, backend, keys={"b": content_key(operands["b"])})
    assert backend.oom_retries == 1
    assert_honest("matmul", operands, result)
    assert standin.peak_device_bytes <= 80 << 10


# -- float16 GEMM failures ------------------------------------------------------------------------


@pytest.mark.parametrize("status", [15, 8], ids=["not-supported", "arch-mismatch"])
def test_fp16_off_for_good_only_when_unsupported(
    standin: CupyStandin, backend_log: pytest.LogCaptureFixture, status: int
) -> None:
    backend = CupyBackend()
    operands = operands_of("matmul", np.float16, rows=32)
    standin.fail("gemm", CUBLASError(status))
    assert_honest("matmul", operands, get_kernel("matmul").run(operands, backend))
    assert backend.fp16_gemm.startswith("float32 fallback")
    calls = standin.gemm_calls
    assert_honest("matmul", operands, get_kernel("matmul").run(operands, backend))
    assert standin.gemm_calls == calls  # not tried again
    assert "not supported here" in backend_log.text


def test_fp16_transient_out_of_memory_frees_and_retries(standin: CupyStandin) -> None:
    backend = CupyBackend()
    operands = operands_of("matmul", np.float16, rows=32)
    standin.fail("gemm", OutOfMemoryError(1 << 30, 0))
    assert_honest("matmul", operands, get_kernel("matmul").run(operands, backend))
    assert backend.fp16_gemm == "cublasGemmStridedBatchedEx"
    assert standin.gemm_calls == 1 and backend.fp16_fallbacks == 0
    assert standin.memory_pool.free_all_blocks_calls >= 1
    # cuBLAS's own workspace allocation failing counts as out of memory too.
    standin.fail("gemm", CUBLASError(3), times=2)
    assert_honest("matmul", operands, get_kernel("matmul").run(operands, backend))
    assert backend.fp16_fallbacks == 1  # retried once, then this product only went float32
    assert backend.fp16_gemm == "cublasGemmStridedBatchedEx"
    get_kernel("matmul").run(operands, backend)
    assert standin.gemm_calls == 2


def test_fp16_other_failures_fall_back_for_one_product(
    standin: CupyStandin, backend_log: pytest.LogCaptureFixture
) -> None:
    backend = CupyBackend()
    operands = operands_of("mlp", np.float16, rows=16)
    standin.fail("gemm", CUBLASError(13), times=3)
    assert_honest("mlp", operands, get_kernel("mlp").run(operands, backend))
    get_kernel("mlp").run(operands, backend)
    assert backend.fp16_fallbacks == 3 and backend.fp16_gemm == "cublasGemmStridedBatchedEx"
    assert backend_log.text.count("float16 GEMM failed") == 1  # said once, not per product


# -- TF32 -----------------------------------------------------------------------------------------


def tf32_sensitive_operands() -> dict[str, np.ndarray]:
    # Zero-mean data, k = 256: TF32 lands at ~13x the honest bound, float32 at ~0.004x.
    rng = np.random.default_rng(5)
    return {
        "a": rng.standard_normal((8, 256)).astype(np.float32),
        "b": rng.standard_normal((256, 8)).astype(np.float32),
    }


def test_tf32_would_break_the_bounds_and_is_forced_off(
    standin: CupyStandin, monkeypatch: pytest.MonkeyPatch, backend_log: pytest.LogCaptureFixture
) -> None:
    import cupy

    monkeypatch.setenv("CUPY_TF32", "1")
    operands = tf32_sensitive_operands()
    kernel = get_kernel("matmul")
    # What CUPY_TF32=1 does to a plain CuPy float32 product: outside the honest bound.
    tf32 = cupy.matmul(cupy.asarray(operands["a"]), cupy.asarray(operands["b"])).get()
    expected = kernel.expected_rows(operands, range(8))
    assert (np.abs(tf32 - expected.values) > expected.tolerance).any()
    assert standin.tf32_products == 1
    backend = CupyBackend()
    assert "forced back to float32" in backend_log.text
    assert_honest("matmul", operands, kernel.run(operands, backend))
    assert standin.tf32_products == 1 and standin.float32_products == 2


def test_tf32_math_mode_is_reset(
    standin: CupyStandin, backend_log: pytest.LogCaptureFixture
) -> None:
    backend = CupyBackend()
    handle = standin.cublas_handle()
    standin.math_modes[handle] = 3  # CUBLAS_TF32_TENSOR_OP_MATH, set by someone else
    operands = tf32_sensitive_operands()
    assert_honest("matmul", operands, get_kernel("matmul").run(operands, backend))
    assert standin.tf32_products == 0
    assert standin.math_modes[handle] == 0
    assert "math mode 3" in backend_log.text


def test_tf32_without_a_way_to_turn_it_off_is_refused(
    standin: CupyStandin, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUPY_TF32", "1")
    monkeypatch.delattr(standin.modules["cupy._core._routines_linalg"], "set_compute_type")
    with pytest.raises(BackendUnavailable, match="CUPY_TF32"):
        force_float32_math()
    backend = select_backend("auto")  # a worker then computes on the CPU, and says why
    assert isinstance(backend, NumpyBackend)


# -- availability and its reasons -----------------------------------------------------------------


def test_gpu_status_describes_the_visible_device(
    make_standin: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    make_standin(
        (FakeGpu(pci_bus_id="0000:3B:00.0"), FakeGpu(name="Second", pci_bus_id="0000:86:00.0"))
    )
    status = gpu_status()
    assert (
        status.usable and status.pci_bus_id == "0000:3B:00.0" and status.compute_capability == "9.0"
    )
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    status = gpu_status()
    assert status.usable and status.name == "Second" and status.pci_bus_id == "0000:86:00.0"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    status = gpu_status()
    assert not status.usable and "CUDA_VISIBLE_DEVICES=''" in status.reason


def test_gpu_status_reasons(
    make_standin: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    make_standin(driver_error=35)
    status = gpu_status()
    assert not status.usable and "cudaErrorInsufficientDriver" in status.reason
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
    status = gpu_status()
    assert not status.usable and "CuPy is not installed" in status.reason


def test_no_gpu_is_reported_once_at_the_default_level(
    make_standin: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    make_standin(driver_error=100)
    caplog.set_level(logging.WARNING)
    assert isinstance(select_backend("auto"), NumpyBackend)
    assert isinstance(select_backend("auto"), NumpyBackend)
    lines = [r for r in caplog.records if "no usable GPU" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    assert "cudaErrorNoDevice" in lines[0].getMessage()


def test_gpu_none_means_numpy_even_with_a_gpu(standin: CupyStandin) -> None:
    assert isinstance(select_backend("none"), NumpyBackend)
    assert isinstance(select_backend("auto"), CupyBackend)


def test_empty_host_arrays_upload_without_staging(standin: CupyStandin) -> None:
    backend = CupyBackend()
    data = np.arange(12, dtype=np.float32).reshape(3, 4)
    pinned = backend.empty_host(data.shape, data.dtype)
    assert backend.pinned.owns(pinned.ctypes.data, pinned.nbytes)
    pinned[...] = data
    on_device = backend.put(pinned)
    del pinned  # the backend keeps it alive until its DMA has run
    gc.collect()
    np.testing.assert_array_equal(backend.get(on_device), data)
    np.testing.assert_array_equal(backend.get(backend.put(data * 2)), data * 2)


# -- the stand-in against the real CuPy ----------------------------------------------------------


def _real_parameters(function: Any) -> list[str]:
    """Parameter names of a CuPy function, from its signature or its Cython docstring."""
    try:
        return [p for p in inspect.signature(function).parameters if p != "self"]
    except (TypeError, ValueError):
        first = (function.__doc__ or "").strip().splitlines()[0]
        inside = first[first.index("(") + 1 : first.rindex(")")]
        names = [
            part.strip().split("=")[0].split()[-1] for part in inside.split(",") if part.strip()
        ]
        return [n for n in names if n != "self"]


def _standin_parameters(function: Any) -> list[str]:
    return [p for p in inspect.signature(function).parameters if p != "self"]


def test_standin_signatures_match_the_installed_cupy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in sys.modules if n == "cupy" or n.startswith(("cupy.", "cupy_backends"))]:
        if getattr(sys.modules[name], "__doc__", "") and "stand-in" in str(
            sys.modules[name].__doc__
        ):
            monkeypatch.delitem(sys.modules, name)
    real = pytest.importorskip("cupy", reason="CuPy is not installed: nothing to compare with")
    from cupy._core import _routines_linalg as real_linalg

    standin = CupyStandin()
    fake = standin.modules
    pairs = [
        (real.cuda.runtime.hostAlloc, fake["cupy.cuda.runtime"].hostAlloc, ["size", "flags"]),
        (real.cuda.runtime.freeHost, fake["cupy.cuda.runtime"].freeHost, ["ptr"]),
        (
            real.cuda.runtime.pointerGetAttributes,
            fake["cupy.cuda.runtime"].pointerGetAttributes,
            ["ptr"],
        ),
        (
            real.cuda.runtime.getDeviceProperties,
            fake["cupy.cuda.runtime"].getDeviceProperties,
            None,
        ),
        (
            real.cuda.memory.MemoryPointer.copy_from_host_async,
            fake["cupy"].cuda.MemoryPointer.copy_from_host_async,
            None,
        ),
        (
            real.cuda.memory.MemoryPointer.copy_to_host_async,
            fake["cupy"].cuda.MemoryPointer.copy_to_host_async,
            None,
        ),
        (
            real.cuda.memory.MemoryPool.free_all_blocks,
            fake["cupy"].get_default_memory_pool().free_all_blocks,
            None,
        ),
        (real.cuda.memory.OutOfMemoryError.__init__, OutOfMemoryError.__init__, None),
        (real.cuda.Stream.__init__, Stream.__init__, None),
        (real.cuda.Stream.record, Stream.record, None),
        (real.cuda.Stream.wait_event, Stream.wait_event, None),
        (real.cuda.Event.__init__, fake["cupy.cuda"].Event.__init__, None),
        (real.cuda.Event.record, fake["cupy.cuda"].Event.record, None),
        (real.ndarray.get, fake["cupy"].ndarray.get, None),
        (real.ndarray.astype, fake["cupy"].ndarray.astype, None),
        (real.empty, fake["cupy"].empty, None),
        (real.ascontiguousarray, fake["cupy"].ascontiguousarray, None),
        (real_linalg.set_compute_type, fake["cupy._core._routines_linalg"].set_compute_type, None),
        (real_linalg.get_compute_type, fake["cupy._core._routines_linalg"].get_compute_type, None),
    ]
    for real_function, fake_function, expected in pairs:
        real_names = _real_parameters(real_function)
        assert _standin_parameters(fake_function) == (expected or real_names), real_function
        if expected:
            assert real_names == expected, real_function
    for constant in (
        "COMPUTE_TYPE_DEFAULT",
        "COMPUTE_TYPE_PEDANTIC",
        "COMPUTE_TYPE_TF32",
        "COMPUTE_TYPE_FP32",
    ):
        assert getattr(real_linalg, constant) == getattr(
            fake["cupy._core._routines_linalg"], constant
        )
    # The C ABI constants the backend spells out, where this CuPy exposes them.
    runtime = real.cuda.runtime
    assert (runtime.memoryTypeHost, runtime.CUDA_R_16F, runtime.CUDA_R_32F) == (1, 2, 0)
    try:
        cublas = importlib.import_module("cupy_backends.cuda.libs.cublas")
    except ImportError:  # the wheel loads libcublas lazily; absent without a CUDA install
        return
    assert _real_parameters(cublas.gemmStridedBatchedEx) == _standin_parameters(
        fake["cupy_backends.cuda.libs.cublas"].gemmStridedBatchedEx
    )
    for name in ("getMathMode", "setMathMode"):
        assert _real_parameters(getattr(cublas, name)) == _standin_parameters(
            getattr(fake["cupy_backends.cuda.libs.cublas"], name)
        )
    expected = {"CUBLAS_COMPUTE_32F": 68, "CUBLAS_GEMM_DEFAULT_TENSOR_OP": 99, "CUBLAS_OP_T": 1}
    for name, value in expected.items():
        if hasattr(cublas, name):
            assert getattr(cublas, name) == value, name


# -- the benchmark script, smoke-tested on the stand-in ---------------------------------------


def test_gpu_benchmark_runs_end_to_end_on_the_standin(
    standin: CupyStandin, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from benchmarks import gpu_kernels

    out = tmp_path / "gpu.json"
    assert gpu_kernels.main(["--quick", "--json", str(out)]) == 0
    document = json.loads(out.read_text())
    whats = {record["what"] for record in document["records"]}
    assert {"device", "correct", "bus", "gemm", "shard_e2e", "memory", "freivalds"} <= whats
    summary = document["summary"]
    assert summary["failures"] == [] and summary["device"] == FakeGpu().name
    assert summary["gemm_float16_n128_vs_cupy"] > 0
    assert summary["shard_float32_n512_vs_pinned_bus"] > 0
    cases = {r["case"] for r in document["records"] if r["what"] == "shard_e2e"}
    assert "worker: a received into ordinary memory, b resident" in cases
    assert '"summary"' in capsys.readouterr().out  # the JSON document goes to stdout too


def test_gpu_benchmark_without_a_gpu_exits_3(
    make_standin: Callable[..., Any], capsys: pytest.CaptureFixture[str]
) -> None:
    from benchmarks import gpu_kernels

    make_standin(driver_error=100)
    assert gpu_kernels.main(["--quick"]) == gpu_kernels.EXIT_NO_GPU == 3
    assert "no usable GPU: " in capsys.readouterr().err
