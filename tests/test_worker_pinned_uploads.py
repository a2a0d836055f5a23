"""A GPU worker receives uploads into pinned memory, within half of its pinned budget.

The GPU is replaced by the CuPy stand-in (``tests/gpu/cupy_standin.py``): this machine has
none. What is tested is the worker's wiring (its upload buffers come from the executor's
``receive_buffer``) and the backend's rule for them; that pinned rows go to the device faster
was measured on an H200 (BENCHMARKS.md, "GPU").
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import trio.testing

from mtor_kernels.backend import CupyBackend, NumpyBackend
from mtor_p2p.compute.protocol import CHUNK_BYTES, PROTOCOL_UPLOAD
from mtor_p2p.records.arrays import meta_of, pack
from tests.gpu.cupy_standin import CupyStandin
from tests.test_worker_attacks import Requester, bench, run

RNG = np.random.default_rng(5)
MIB = 1 << 20


async def upload(network: Requester, worker_id: str, array: np.ndarray) -> None:
    """Send ``array`` to the worker in CHUNK_BYTES pieces."""
    meta = meta_of(array)
    data = memoryview(array).cast("B")
    for offset in range(0, meta.nbytes, CHUNK_BYTES):
        chunk = bytes(data[offset : offset + CHUNK_BYTES])
        message = pack({"array": meta.to_json(), "offset": offset}, chunk)
        await network.network.request(worker_id, PROTOCOL_UPLOAD, message)


@pytest.fixture
def gpu_backend(monkeypatch: pytest.MonkeyPatch) -> Iterator[CupyBackend]:
    """The CuPy backend on the stand-in, with a 40 MiB pinned budget (uploads: 20 MiB)."""
    monkeypatch.delenv("CUPY_TF32", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    standin = CupyStandin().install(monkeypatch)
    try:
        yield CupyBackend(max_pinned_bytes=40 * MIB, staging_chunk_bytes=MIB)
    finally:
        standin.uninstall()


async def test_a_gpu_workers_uploads_land_in_pinned_memory_within_half_its_budget(
    autojump_clock: trio.testing.MockClock, gpu_backend: CupyBackend
) -> None:
    """Multi-chunk uploads are received straight into pinned buffers while the pinned pool,
    the new buffer included, stays within half its budget; the next one goes to ordinary
    memory. A shard computed from a pinned A is right, and once the shard has run (its own
    slice of A is not kept) the buffer goes back to the pool."""
    pool = gpu_backend.pinned
    rows = (2 * CHUNK_BYTES + MIB) // (4 * 256)  # 9 MiB of float32: three chunks, 9 MiB pinned
    first, second, third = (RNG.standard_normal((rows, 256)).astype("float32") for _ in "abc")
    async with bench(backend=gpu_backend) as b:
        alice = await b.requester("alice")
        for array in (first, second):
            await upload(alice, b.worker_id, array)
            stored = b.worker.operands.get(meta_of(array).digest)
            assert stored is not None and np.array_equal(stored, array)
            assert pool.owns(stored.ctypes.data, stored.nbytes), "a pinned upload buffer"
        assert pool.stats().leased_bytes == 18 * MIB
        # 27 MiB would pass half of 40: this one is received into ordinary memory.
        await upload(alice, b.worker_id, third)
        stored = b.worker.operands.get(meta_of(third).digest)
        assert stored is not None and np.array_equal(stored, third)
        assert not pool.owns(stored.ctypes.data, stored.nbytes)
        assert pool.stats().leased_bytes == 18 * MIB

        # A shard on the first (pinned) A: right, and its A is dropped after the run, so the
        # pinned buffer returns to the pool (idle, for the next upload or result).
        operands = {"a": first, "b": RNG.standard_normal((256, 64)).astype("float32")}
        before = pool.stats().leased_bytes
        await run(b, alice, operands, shard=0, quote=2.0)
        assert meta_of(first).digest not in b.worker.operands
        assert pool.stats().leased_bytes == before - 9 * MIB


async def test_a_numpy_worker_receives_into_ordinary_memory(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Without a GPU the upload buffer is a plain NumPy array (``Backend.receive_buffer``)."""
    array = RNG.standard_normal(((CHUNK_BYTES + MIB) // 4,)).astype("float32")
    async with bench(backend=NumpyBackend()) as b:
        alice = await b.requester("alice")
        await upload(alice, b.worker_id, array)
        stored = b.worker.operands.get(meta_of(array).digest)
        assert stored is not None and np.array_equal(stored, array)
    buffer = NumpyBackend().receive_buffer(3)
    assert buffer.dtype == np.uint8 and buffer.shape == (3,)


def test_the_gpu_worker_benchmark_runs_end_to_end_on_the_standin(
    gpu_backend: CupyBackend, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``benchmarks/gpu_worker_e2e.py`` (the real worker and client on memnet, CuPy against
    NumPy) smoke-tested on the stand-in: every shard's output passes Freivalds."""
    from benchmarks import gpu_worker_e2e

    out = tmp_path / "e2e.json"
    argv = ["--n", "256", "--shards", "2", "--rounds", "1", "--json", str(out)]
    assert gpu_worker_e2e.main(argv) == 0
    document = json.loads(out.read_text())
    assert document["summary"]["failed_checks"] == 0
    assert {r["backend"] for r in document["records"]} == {"cupy", "numpy"}
    assert all(r["shards_run"] == 4 for r in document["records"])  # cold and warm jobs
    assert '"summary"' in capsys.readouterr().out
