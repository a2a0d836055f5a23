"""The CuPy backend on a real GPU (marker ``gpu``); skipped, with the reason, without one.

Needs only NumPy, pytest and CuPy (no libp2p, no install of this package: ``conftest.py`` loads
``kernels/`` from the checkout). On a lent GPU::

    python -m pytest -m gpu tests/gpu -p no:cacheprovider

or ``benchmarks/gpu_check.sh``, which also runs ``benchmarks/gpu_kernels.py``. Sizes stay small:
the whole module takes seconds on an H200 (speed is the benchmark's business).
"""

from __future__ import annotations

import gc
import os
from typing import Any

import numpy as np
import pytest

from mtor_kernels import (
    CupyBackend,
    compare,
    content_key,
    force_float32_math,
    get_kernel,
    gpu_status,
    select_backend,
)

STATUS = gpu_status()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not STATUS.usable, reason=f"no usable GPU: {STATUS.reason}"),
]

CASES = [(n, d) for n in ("matmul", "mlp", "attention") for d in (np.float32, np.float16)]
IDS = [f"{n}-{np.dtype(d).name}" for n, d in CASES]


def operands_of(name: str, dtype: Any, rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def normal(*shape: int, scale: float = 1.0) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(dtype)

    if name == "matmul":
        return {"a": normal(rows, 256), "b": normal(256, 192)}
    if name == "mlp":
        return {
            "x": normal(rows, 128),
            "w1": normal(128, 512, scale=128**-0.5),
            "b1": normal(512, scale=0.1),
            "w2": normal(512, 96, scale=512**-0.5),
            "b2": normal(96, scale=0.1),
        }
    return {
        "q": normal(rows, 4, 64, 32),
        "k": normal(rows, 4, 80, 32),
        "v": normal(rows, 4, 80, 16),
    }


def excess_over_bound(name: str, operands: dict[str, np.ndarray], result: np.ndarray) -> float:
    """Largest ``|result - exact| - bound`` over every row (<= 0 for an honest result)."""
    kernel = get_kernel(name)
    expected = kernel.expected_rows(operands, range(kernel.n_rows(operands)))
    return float((np.abs(result.astype(np.float64) - expected.values) - expected.tolerance).max())


@pytest.fixture(scope="module")
def backend() -> CupyBackend:
    chosen = select_backend("cupy")
    assert isinstance(chosen, CupyBackend)
    return chosen


@pytest.fixture(scope="module")
def pipelined() -> CupyBackend:
    """Cuts every shard into row chunks and stages through small buffers."""
    return CupyBackend(pipeline_min_bytes=0, pipeline_chunk_bytes=1, staging_chunk_bytes=64 << 10)


@pytest.mark.parametrize(("name", "dtype"), CASES, ids=IDS)
@pytest.mark.parametrize("mode", ["whole", "chunked"])
def test_kernels_are_honest_on_the_gpu(
    backend: CupyBackend, pipelined: CupyBackend, name: str, dtype: Any, mode: str
) -> None:
    chosen = backend if mode == "whole" else pipelined
    operands = operands_of(name, dtype, rows=600 if name != "attention" else 6)
    result = get_kernel(name).run(operands, chosen)
    assert isinstance(result, np.ndarray) and result.dtype == np.float32
    assert excess_over_bound(name, operands, result) <= 0
    assert compare(get_kernel(name).reference(operands), result, dtype)[0]
    assert chosen.fp16_gemm == "cublasGemmStridedBatchedEx"  # tensor cores, not the fallback


def test_resident_operand_is_served_from_the_cache(backend: CupyBackend) -> None:
    kernel = get_kernel("matmul")
    operands = operands_of("matmul", np.float16, rows=64, seed=3)
    keys = {"b": content_key(operands["b"])}
    backend.cache.discard(keys["b"])
    before = backend.cache.stats()
    first = kernel.run(operands, backend, keys=keys)
    second = kernel.run(operands, backend, keys=keys)
    after = backend.cache.stats()
    assert (after.misses - before.misses, after.hits - before.hits) == (1, 1)
    np.testing.assert_array_equal(first, second)
    assert excess_over_bound("matmul", operands, second) <= 0


def test_copies_pinned_and_staged(backend: CupyBackend, pipelined: CupyBackend) -> None:
    data = np.random.default_rng(1).standard_normal((1234, 77)).astype(np.float32)
    np.testing.assert_array_equal(pipelined.get(pipelined.put(data)), data)  # many pieces
    pinned = backend.empty_host(data.shape, data.dtype)
    assert backend.pinned.owns(pinned.ctypes.data, pinned.nbytes)
    pinned[...] = data
    out = backend.get(backend.put(pinned))
    np.testing.assert_array_equal(out, data)
    assert backend.pinned.owns(out.ctypes.data, out.nbytes)


def test_a_host_array_made_on_a_thread_is_pinned_and_a_shard_runs_from_it(
    backend: CupyBackend,
) -> None:
    """``empty_host`` called on another thread than the backend's (as a caller receiving
    bytes on a thread would) gives memory CUDA sees as page-locked, and a shard from it is
    right."""
    import threading

    import cupy

    kernel = get_kernel("matmul")
    operands = operands_of("matmul", np.float32, rows=512, seed=6)
    made: list[np.ndarray] = []
    thread = threading.Thread(
        target=lambda: made.append(backend.empty_host(operands["a"].shape, np.float32))
    )
    thread.start()
    thread.join()
    (a,) = made
    assert backend.pinned.owns(a.ctypes.data, a.nbytes)
    attributes = cupy.cuda.runtime.pointerGetAttributes(a.ctypes.data)
    assert attributes.type == 1  # cudaMemoryTypeHost: page-locked
    a[...] = operands["a"]
    result = kernel.run({"a": a, "b": operands["b"]}, backend)
    assert excess_over_bound("matmul", operands, result) <= 0


def test_pinned_memory_does_not_grow_with_shards(backend: CupyBackend) -> None:
    kernel = get_kernel("matmul")
    operands = operands_of("matmul", np.float32, rows=512, seed=4)
    kernel.run(operands, backend)
    gc.collect()
    before = backend.pinned.stats()
    for _ in range(20):
        kernel.run(operands, backend)
    gc.collect()
    after = backend.pinned.stats()
    assert after.bytes == before.bytes and after.allocations == before.allocations
    assert after.bytes <= after.max_bytes


def test_out_of_memory_evicts_and_retries(backend: CupyBackend) -> None:
    """A memory-pool limit plays a small device: resident operands fill it, the next shard
    runs out, the backend evicts them and retries."""
    import cupy

    pool = cupy.get_default_memory_pool()
    pool.free_all_blocks()
    limit = pool.used_bytes() + (44 << 20)
    rng = np.random.default_rng(5)
    small = CupyBackend(max_cache_bytes=40 << 20)
    kernel = get_kernel("matmul")
    try:
        pool.set_limit(size=limit)
        for _ in range(2):  # two 16 MiB resident operands stay cached
            b = rng.standard_normal((2048, 2048)).astype(np.float32)
            kernel.run(
                {"a": np.ones((8, 2048), np.float32), "b": b}, small, keys={"b": content_key(b)}
            )
        operands = {
            "a": rng.standard_normal((1024, 2048)).astype(np.float32),  # 8 MiB
            "b": rng.standard_normal((2048, 2048)).astype(np.float32),  # 16 MiB, result 8 MiB
        }
        result = kernel.run(operands, small, keys={"b": content_key(operands["b"])})
    finally:
        pool.set_limit(size=0)
    assert small.oom_retries == 1
    assert excess_over_bound("matmul", operands, result) <= 0


def test_tf32_is_forced_off_for_float32(backend: CupyBackend) -> None:
    import cupy
    from cupy._core import _routines_linalg as linalg

    rng = np.random.default_rng(5)
    operands = {
        "a": rng.standard_normal((64, 256)).astype(np.float32),
        "b": rng.standard_normal((256, 64)).astype(np.float32),
    }
    with backend.device:
        linalg.set_compute_type(np.float32, linalg.COMPUTE_TYPE_TF32)
        try:
            with backend.activate():
                tf32 = cupy.matmul(cupy.asarray(operands["a"]), cupy.asarray(operands["b"])).get()
            tf32_excess = excess_over_bound("matmul", operands, tf32)
            assert force_float32_math() is not None  # said what it changed (and logged it)
            assert linalg.get_compute_type(np.float32) == linalg.COMPUTE_TYPE_DEFAULT
        finally:
            linalg.set_compute_type(np.float32, linalg.COMPUTE_TYPE_DEFAULT)
    assert excess_over_bound("matmul", operands, get_kernel("matmul").run(operands, backend)) <= 0
    # Record of what TF32 would have done on this card (expected well above 0 on Ampere+).
    print(f"TF32 product: {tf32_excess:+.3g} over the float32 bound")


def test_gpu_status_names_the_nvml_device() -> None:
    pynvml = pytest.importorskip("pynvml", reason="nvidia-ml-py is not installed")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        pytest.skip(f"NVML unavailable: {exc}")
    try:
        bus_ids = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            info = pynvml.nvmlDeviceGetPciInfo(pynvml.nvmlDeviceGetHandleByIndex(index))
            bus = info.busId.decode() if isinstance(info.busId, bytes) else str(info.busId)
            bus_ids.append(bus)
    finally:
        pynvml.nvmlShutdown()

    def parts(bus_id: str) -> tuple[int, ...]:
        domain, bus, rest = bus_id.split(":")
        device, function = rest.split(".")
        return tuple(int(p, 16) for p in (domain, bus, device, function))

    assert parts(STATUS.pci_bus_id) in {parts(b) for b in bus_ids}, (STATUS, bus_ids)
    print(f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}: {STATUS}")
