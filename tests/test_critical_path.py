"""Work on a shard's critical path (issue 9): each operand hashed once per side, verification
in the operands' precision, receipts group-committed and settled after the result, pipelined
shards. Whole jobs run on tests/test_virtual_time.py's memnet cluster under the mock clock.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import pytest
import trio
import trio.testing

import mtor_p2p.compute.worker as worker_module
import mtor_p2p.records.arrays as arrays
from mtor_p2p.compute.scheduler import SHARED_IN_FLIGHT
from mtor_p2p.ledger.names import LEDGER_RULES
from mtor_p2p.network import RemoteError
from mtor_p2p.node import Node
from tests.products import assert_product_close
from tests.test_virtual_time import ORDERS, cluster, trio_seed  # noqa: F401 (a fixture)

RNG = np.random.default_rng(9)


def small_operands() -> dict[str, np.ndarray]:
    """A 64x48 by 48x32 float32 product's operands, drawn from RNG (a then b)."""
    return {
        "a": RNG.standard_normal((64, 48)).astype("float32"),
        "b": RNG.standard_normal((48, 32)).astype("float32"),
    }


@asynccontextmanager
async def one_worker(
    worker_region: str = "WEU", requester_region: str = "WEU"
) -> AsyncIterator[tuple[Node, Node]]:
    """A settled memnet cluster of a requester (not serving) and one worker: (requester,
    worker)."""
    async with cluster(["requester", "worker"]) as c:
        worker = await c.start("worker", worker_region)
        requester = await c.start("requester", requester_region, serve=False)
        await c.settle()
        yield requester, worker


@asynccontextmanager
async def two_workers() -> AsyncIterator[Node]:
    """A settled memnet cluster of a requester (not serving) and two workers, w1 and w2, all
    in WEU: the requester."""
    async with cluster(["requester", "w1", "w2"]) as c:
        await c.start("w1", "WEU")
        await c.start("w2", "WEU")
        requester = await c.start("requester", "WEU", serve=False)
        await c.settle()
        yield requester


def count_hashing(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Count whole-array hashes (``content_hash``) and incremental upload hashers."""
    counts: Counter[str] = Counter()
    whole, incremental = arrays.content_hash, worker_module.content_hasher

    def counted_whole(array: np.ndarray) -> str:
        counts["whole"] += 1
        return whole(array)

    def counted_incremental(dtype: str, shape: Any) -> Any:
        counts["upload"] += 1
        return incremental(dtype, shape)

    monkeypatch.setattr(arrays, "content_hash", counted_whole)
    monkeypatch.setattr(worker_module, "content_hasher", counted_incremental)
    return counts


def cheap_flags(
    monkeypatch: pytest.MonkeyPatch, node: Node, picks: Callable[[str], bool]
) -> list[bool]:
    """The ``cheap`` argument (on the event loop or not) of each blocking call of ``node``'s
    scheduler whose function's qualified name ``picks`` chooses, in order."""
    runtime = node.scheduler.runtime
    original = runtime.run_blocking
    flags: list[bool] = []

    async def spy(fn: Any, *args: Any, cheap: bool = False, **kwargs: Any) -> Any:
        if picks(getattr(fn, "__qualname__", "")):
            flags.append(cheap)
        return await original(fn, *args, cheap=cheap, **kwargs)

    monkeypatch.setattr(runtime, "run_blocking", spy)
    return flags


def count_uploads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the operands uploaded (``client.upload``), in order."""
    from mtor_p2p.compute import client

    uploads: list[int] = []
    upload = client.upload

    async def counted(network: Any, worker: str, array: np.ndarray, **kwargs: Any) -> Any:
        uploads.append(array.nbytes)
        return await upload(network, worker, array, **kwargs)

    monkeypatch.setattr(client, "upload", counted)
    return uploads


async def test_each_operand_is_hashed_once_per_side(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A one-shard job with both operands sent: the requester hashes A and B once (job ID
    and run request share the descriptions) and the output once (its check against the
    receipt); the worker hashes each operand once (they travel in the run request: small)
    and its output once."""
    async with one_worker() as (requester, _):
        counts = count_hashing(monkeypatch)
        operands = small_operands()
        result = await requester.submit("matmul", operands, shards=1, max_workers=1)
        assert_product_close(result.output, operands["a"] @ operands["b"])
        # requester: a, b, output; worker: a and b (carried in the run request), output.
        assert counts == {"whole": 6}


async def test_the_scheduler_hashes_a_large_downloaded_output_through_its_runtime(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An output too large for the run answer is downloaded, and the scheduler hands the
    download its runtime's blocking hook, so that the output's hash (4 MiB or more) runs
    off the event loop in production."""
    from mtor_p2p.compute import client

    hooks: list[Any] = []
    download = client.download

    async def recorded(*args: Any, **kwargs: Any) -> Any:
        hooks.append(kwargs.get("run_blocking"))
        return await download(*args, **kwargs)

    monkeypatch.setattr(client, "download", recorded)
    async with one_worker() as (requester, _):
        operands = {
            "a": RNG.standard_normal((1025, 16)).astype("float32"),
            "b": RNG.standard_normal((16, 1024)).astype("float32"),  # output: 4.004 MiB
        }
        result = await requester.submit("matmul", operands, shards=1, max_workers=1)
        assert_product_close(result.output, operands["a"] @ operands["b"])
    assert hooks and all(hook is not None for hook in hooks)


async def test_a_shard_slice_is_hashed_once_however_many_attempts(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four shards: each slice of A is hashed once by the requester, B once for the job, and
    A never whole (its slices' hashes are what every request and receipt names)."""
    async with one_worker() as (requester, _):
        counts = count_hashing(monkeypatch)
        operands = small_operands()
        await requester.submit("matmul", operands, shards=4, max_workers=1)
        # requester: b for the job, 4 slices, 4 outputs; worker: b once (carried by a run
        # request, resident afterwards), each slice once (each carried by its run request),
        # 4 outputs.
        assert counts["whole"] == (1 + 4 + 4) + (1 + 4 + 4)
        assert counts["upload"] == 0


async def test_slices_are_hashed_ahead_on_the_blocking_hook_each_once(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once a job's first shard has left, the slices of the shards not yet sent are hashed
    on the blocking hook (a thread in production), a batch a call, so that sending each
    finds its description made; every slice is still hashed once."""
    from mtor_p2p.compute import scheduler

    monkeypatch.setattr(scheduler, "HASH_AHEAD_BYTES", 3 * 16 * 48 * 4)  # 3 slices a call
    async with one_worker() as (requester, _):
        operands = small_operands()
        await requester.submit("matmul", operands, shards=2, max_workers=1)  # its trial
        runtime = requester.scheduler.runtime
        original = runtime.run_blocking
        batches: list[int] = []

        async def spy(fn: Any, *args: Any, **kwargs: Any) -> Any:
            result = await original(fn, *args, **kwargs)
            if getattr(fn, "__name__", "") == "hash_slices":
                batches.append(len(result))
            return result

        monkeypatch.setattr(runtime, "run_blocking", spy)
        counts = count_hashing(monkeypatch)
        result = await requester.submit("matmul", operands, shards=4, max_workers=1)
        assert_product_close(result.output, operands["a"] @ operands["b"])
        # The first shards' slices are hashed as they are sent; the rest ahead, at most 3 a
        # call.
        assert batches and sum(batches) >= 1 and max(batches) <= 3, batches
        # requester: b, 4 slices, 4 outputs; worker: 4 slices, 4 outputs (b is resident
        # there since the trial job).
        assert counts["whole"] == (1 + 4 + 4) + (4 + 4)
        # A shard that reaches the hashing ahead waits for it, and the other way round: with
        # slow hashing on the blocking hook both meet, and still each slice is hashed once.
        counts.clear()

        async def slow_hashing(fn: Any, *args: Any, **kwargs: Any) -> Any:
            if getattr(fn, "__name__", "") in ("hash_slices", "hash_all"):
                await trio.sleep(0.05)
            return await original(fn, *args, **kwargs)

        monkeypatch.setattr(runtime, "run_blocking", slow_hashing)
        a = RNG.standard_normal((16 * 8, 48)).astype("float32")
        result = await requester.submit("matmul", {**operands, "a": a}, shards=8, max_workers=1)
    assert_product_close(result.output, a @ operands["b"])
    assert counts["whole"] == (1 + 8 + 8) + (8 + 8), counts


async def test_hashing_a_shards_operands_is_not_counted_as_the_workers_time(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The requester's own hashing of a shard's slice (made slow here: 5 s of virtual time
    per call) is not the worker's time: a shard's measured seconds, which rank the worker in
    every later job and go into a challenge's attestation, start once its operands are
    described."""
    from mtor_p2p.compute.scheduler import Scheduler

    describe = Scheduler.describe

    async def slow(self: Scheduler, arrays: dict[str, np.ndarray]) -> Any:
        await trio.sleep(5)
        return await describe(self, arrays)

    monkeypatch.setattr(Scheduler, "describe", slow)
    async with one_worker() as (requester, _):
        operands = small_operands()
        result = await requester.submit("matmul", operands, shards=2, max_workers=1)
        assert_product_close(result.output, operands["a"] @ operands["b"])
        assert len(result.shards) == 2
        assert all(0 < shard.seconds < 5 for shard in result.shards), result.shards


# -- Freivalds in float32 ---------------------------------------------------------------------


def sequential_product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float32 product accumulated one term at a time (the honest order with the largest
    error: every rounding of a constant-sign sum goes the same way)."""
    out = np.zeros((a.shape[0], b.shape[1]), np.float32)
    for t in range(a.shape[1]):
        out = (out + np.outer(a[:, t], b[t]).astype(np.float32)).astype(np.float32)
    return out


def honest_inputs(kind: str, m: int, k: int, n: int, rng: np.random.Generator) -> tuple:
    if kind == "normal":
        a, b = rng.standard_normal((m, k)), rng.standard_normal((k, n))
    elif kind == "uniform":  # all positive: rounding drifts one way
        a, b = rng.random((m, k)), rng.random((k, n))
    elif kind == "rank-one constant":
        a = np.outer(rng.uniform(0.05, 1, m), np.ones(k))
        b = np.outer(np.ones(k), rng.uniform(0.05, 1, n))
    elif kind == "ill-conditioned":  # rows and columns scaled over 12 orders of magnitude
        a = rng.standard_normal((m, k)) * np.logspace(-6, 6, m)[:, None]
        b = rng.standard_normal((k, n)) * np.logspace(6, -6, n)[None, :]
    elif kind == "large":  # squares overflow float32: norms fall back to float64
        a, b = rng.standard_normal((m, k)) * 1e15, rng.standard_normal((k, n)) * 1e12
    elif kind == "small":  # squares underflow float32
        a, b = rng.standard_normal((m, k)) * 1e-14, rng.standard_normal((k, n)) * 1e-3
    else:
        raise AssertionError(kind)
    return a.astype(np.float32), b.astype(np.float32)


KINDS = ["normal", "uniform", "rank-one constant", "ill-conditioned", "large", "small"]
SHAPES = [(1, 1, 1), (7, 300, 5), (64, 256, 48), (128, 1024, 96), (9, 4096, 11)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_honest_float32_products_pass_the_float32_check(
    kind: str, shape: tuple[int, int, int]
) -> None:
    """BLAS's product and the sequential one (the worst honest order) pass, with margin."""
    from mtor_kernels.verify import freivalds

    m, k, n = shape
    for seed in range(3):
        rng = np.random.default_rng([seed, *shape, KINDS.index(kind)])
        a, b = honest_inputs(kind, m, k, n, rng)
        products = [a @ b]
        if k <= 1024:
            products.append(sequential_product(a, b))
        for c in products:
            result = freivalds(a, b, c, rng=rng)
            assert result.ok and result.max_error < 0.5, (kind, shape, seed, result.max_error)


@pytest.mark.parametrize("shape", SHAPES[1:], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", ["normal", "uniform", "ill-conditioned", "large"])
def test_one_wrong_element_of_typical_size_is_caught_in_every_round(
    kind: str, shape: tuple[int, int, int]
) -> None:
    """One element off by a quarter of its row's typical entry (rms): caught with one round,
    for every seed, and the row reported is the wrong one."""
    from mtor_kernels.verify import freivalds

    m, k, n = shape
    for seed in range(8):
        rng = np.random.default_rng([100 + seed, *shape])
        a, b = honest_inputs(kind, m, k, n, rng)
        c = a @ b
        i, j = int(rng.integers(m)), int(rng.integers(n))
        row_rms = float(np.sqrt(np.mean(c[i].astype(np.float64) ** 2)))
        c[i, j] += np.float32(0.25 * row_rms)
        result = freivalds(a, b, c, rounds=1, rng=rng)
        assert not result.ok and result.row == i, (kind, shape, seed, result.max_error)


def test_the_float32_check_is_used_unless_values_leave_float32s_range() -> None:
    """Float32 throughout for ordinary data; NaN and products beyond float32's range go to
    the float64 check, whose verdicts they keep."""
    import mtor_kernels.verify as verify

    rng = np.random.default_rng(1)
    a, b = honest_inputs("normal", 32, 64, 16, rng)
    signs = np.ones((16, 2), np.int8)
    assert verify._residual_ratios32(a, b, a @ b, signs, 3.0) is not None
    # Entries of 1e19: every element of C is 2e38 (finite), the sums of a row are not.
    huge_a, huge_b = np.full((4, 2), 1e19, np.float32), np.full((2, 16), 1e19, np.float32)
    huge_c = huge_a @ huge_b
    assert np.isfinite(huge_c).all()
    assert verify._residual_ratios32(huge_a, huge_b, huge_c, signs, 3.0) is None
    assert verify.freivalds(huge_a, huge_b, huge_c, rng=rng).ok  # float64 path: accepted
    with_nan = a.copy()
    with_nan[3, 4] = np.nan
    assert verify._residual_ratios32(with_nan, b, with_nan @ b, signs, 3.0) is None


def test_float32_check_tolerance_is_a_few_times_the_float64_one() -> None:
    """What the cheaper check gives up: its tolerance, the smallest error it is sure to see,
    stays within 4x of the float64 check's for square N(0, 1) data."""
    import mtor_kernels.verify as verify

    rng = np.random.default_rng(2)
    for size in (64, 256, 512):
        a, b = honest_inputs("normal", size, size, size, rng)
        c = a @ b
        wrong = c.copy()
        wrong[5, 7] += 1.0
        signs = (rng.integers(0, 2, (size, 4), dtype=np.int8) * 2 - 1).astype(np.int8)
        r32 = verify._residual_ratios32(a, b, wrong, signs, 3.0)
        r64 = verify._residual_ratios(a, b, wrong, signs, 3.0)
        assert r32 is not None
        # Row 5's residual is the same error seen against each tolerance.
        assert 1.0 < r64[5].max() / r32[5].max() < 4.0, size


# -- BLAS threads -------------------------------------------------------------------------------


def test_a_check_runs_on_the_event_loop_only_while_blas_runs_one_thread() -> None:
    """OpenBLAS serialises its multi-threaded calls within a process: a small check on the
    event loop could wait out another thread's large product. ``single_threaded`` says when
    the loop may run one (the scheduler's ``cheap`` path), read from OpenBLAS itself."""
    from mtor_p2p.compute import blas

    if not blas._loaded_libraries("openblas"):
        pytest.skip("NumPy here does not use OpenBLAS")
    try:
        assert blas._set_openblas_threads(2)
        assert not blas.single_threaded()
        assert blas._set_openblas_threads(1)
        assert blas.single_threaded()
    finally:
        blas._set_openblas_threads(blas.default_blas_threads())


def test_blas_keeps_a_core_for_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    from mtor_p2p.compute import blas

    for name in (*blas.USER_SETTINGS, blas.OVERRIDE):
        monkeypatch.delenv(name, raising=False)
    assert blas.default_blas_threads(2) == 1
    assert blas.default_blas_threads(1) == 1
    assert blas.default_blas_threads(16) == 15
    monkeypatch.setenv(blas.OVERRIDE, "3")
    assert blas.default_blas_threads(2) == 3
    monkeypatch.delenv(blas.OVERRIDE)
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    assert blas.limit_blas_threads() is None  # the user's choice stands


def test_blas_cap_reaches_numpys_openblas() -> None:
    import ctypes

    from mtor_p2p.compute import blas

    libraries = blas._loaded_libraries("openblas")
    if not libraries:
        pytest.skip("NumPy is not linked against OpenBLAS here")
    library = ctypes.CDLL(libraries[0])
    getter = next(
        (getattr(library, n) for n in ("scipy_openblas_get_num_threads64_",
                                       "openblas_get_num_threads") if hasattr(library, n)),
        None,
    )  # fmt: skip
    if getter is None:
        pytest.skip("this OpenBLAS does not report its thread count")
    before = getter()
    try:
        assert blas.limit_blas_threads(1) == 1
        assert getter() == 1
    finally:
        blas.limit_blas_threads(before)


# -- receipts: group commit -------------------------------------------------------------------


def test_sigkill_during_group_commits_loses_no_acknowledged_receipt(tmp_path: Any) -> None:
    """16 tasks store receipts through one group commit in a real subprocess, SIGKILLed at a
    random moment, three times over: every receipt whose add_async had returned is on disk."""
    import os
    import random
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from mtor_p2p.compute.receipt_store import ReceiptStore

    root = Path(__file__).resolve().parent.parent
    path = tmp_path / "receipts.sqlite"
    rng = random.Random(11)
    acknowledged: list[str] = []
    for seed in range(3):
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.receipt_writer", str(path), str(seed)],
            cwd=root,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert process.stdout is not None
        first = process.stdout.readline()
        assert first, process.stderr.read() if process.stderr else "writer died"
        acknowledged.append(first.strip())
        time.sleep(rng.uniform(0.3, 1.0))
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        lines = process.stdout.read().split("\n")
        acknowledged += [line for line in lines[:-1] if line]  # the last may be cut short
        store = ReceiptStore(path)
        try:
            held = {r.receipt_id for r in store.receipts(limit=10**7)}
        finally:
            store.close()
        assert set(acknowledged) <= held, f"lost {len(set(acknowledged) - held)} receipts"
    assert len(acknowledged) > 100  # it really was writing when killed


async def test_a_burst_of_receipts_takes_few_commits(tmp_path: Any) -> None:
    from mtor_p2p.compute.receipt_store import ReceiptStore
    from mtor_p2p.runtime import Runtime
    from tests.receipt_writer import make_receipt

    store = ReceiptStore(tmp_path / "receipts.sqlite")
    runtime = Runtime.production()
    results: list[bool] = []
    # What SQLite is asked, in order: every INSERT must fall inside a BEGIN ... COMMIT (the
    # connection runs without implicit transactions, so an INSERT outside one commits, and
    # fsyncs, on its own: a batch of 64 had made 64 commits while `batches` said 1).
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)

    async def add(number: int) -> None:
        results.append(await store.add_async(make_receipt(7, number), runtime.run_blocking))  # type: ignore[arg-type]

    async with trio.open_nursery() as nursery:
        for number in range(64):
            nursery.start_soon(add, number)
    writer = store.group_commit(runtime.run_blocking)
    assert results == [True] * 64 and store.count() == 64
    assert writer.items == 64 and writer.batches <= 8, writer.batches
    in_transaction, inserts, commits = False, 0, 0
    for statement in statements:
        verb = statement.split()[0].upper()
        if verb == "BEGIN":
            assert not in_transaction
            in_transaction = True
        elif verb == "COMMIT":
            in_transaction, commits = False, commits + 1
        elif verb == "INSERT":
            assert in_transaction, "an INSERT committed on its own"
            inserts += 1
    assert inserts == 64 and commits == writer.batches
    store._db.set_trace_callback(None)
    # A receipt that does not verify is refused alone; the others of its batch are stored.
    bad = make_receipt(7, 100)
    bad = type(bad)(bad.body, b"\x00" * 64, None)  # type: ignore[attr-defined, call-arg]
    with pytest.raises(Exception, match="signature"):
        await store.add_async(bad, runtime.run_blocking)  # type: ignore[arg-type]
    store.close()


def test_a_receipt_batch_is_stored_whole_or_not_at_all(tmp_path: Any) -> None:
    """A batch is one transaction: a write failing midway (a full disk) leaves none of it, so
    that no caller of the group commit is told "failed" about a receipt that is stored."""
    from mtor_p2p.compute.receipt_store import ReceiptStore
    from tests.receipt_writer import make_receipt

    store = ReceiptStore(tmp_path / "receipts.sqlite")
    insert = store._insert
    calls = 0

    def insert_then_fail(receipt: Any) -> bool:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise sqlite3.OperationalError("database or disk is full")
        return insert(receipt)

    store._insert = insert_then_fail  # type: ignore[method-assign]
    with pytest.raises(sqlite3.OperationalError):
        store.add_many([make_receipt(8, number) for number in range(5)])  # type: ignore[misc]
    assert calls == 3 and store.count() == 0
    store._insert = insert  # type: ignore[method-assign]
    assert store.add_many([make_receipt(8, number) for number in range(5)]) == [True] * 5  # type: ignore[misc]
    assert store.count() == 5
    store.close()


def test_the_peer_book_writes_its_changes_in_one_commit(tmp_path: Any) -> None:
    from mtor_p2p.compute.reputation import PeerBook

    book = PeerBook(tmp_path / "peers.sqlite")
    for number in range(20):
        book.accepted(f"peer-{number}", flops=10**9, seconds=0.1, now=1.0)
    statements: list[str] = []
    assert book._db is not None
    book._db.set_trace_callback(statements.append)
    assert book.flush() == 20
    verbs = [statement.split()[0].upper() for statement in statements]
    assert verbs[0] == "BEGIN" and verbs[-1] == "COMMIT" and verbs.count("COMMIT") == 1, verbs
    assert book.flush() == 0  # nothing changed: nothing written, no empty transaction
    assert len(statements) == len(verbs)
    book.close()
    assert len(PeerBook(tmp_path / "peers.sqlite").known()) == 20


def test_a_refused_commit_is_rolled_back_and_the_connection_goes_on(tmp_path: Any) -> None:
    """A COMMIT refused as busy (a reader holds a rollback-journal file) leaves SQLite's
    transaction open: sqlite_transaction rolls it back, so the batch is not written by a later
    commit and the next transaction can begin."""
    from mtor_p2p.config import sqlite_transaction

    path = tmp_path / "t.sqlite"
    writer = sqlite3.connect(path, isolation_level=None, timeout=0.05)
    writer.execute("PRAGMA journal_mode=DELETE")
    writer.execute("CREATE TABLE t (x INTEGER)")
    reader = sqlite3.connect(path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT COUNT(*) FROM t").fetchone()  # holds a shared lock
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        with sqlite_transaction(writer):
            writer.execute("INSERT INTO t VALUES (1)")
    assert not writer.in_transaction
    reader.execute("COMMIT")
    with sqlite_transaction(writer):
        writer.execute("INSERT INTO t VALUES (2)")
    assert [row[0] for row in reader.execute("SELECT x FROM t")] == [2]
    writer.close()
    reader.close()


def test_a_peer_book_write_that_fails_is_tried_again(tmp_path: Any) -> None:
    from mtor_p2p.compute.reputation import PeerBook

    book = PeerBook(tmp_path / "peers.sqlite")
    for number in range(5):
        book.accepted(f"peer-{number}", flops=10**9, seconds=0.1, now=1.0)
    assert book._db is not None
    book._db.execute("PRAGMA query_only=1")  # every write refused, as by a failing disk
    with pytest.raises(sqlite3.OperationalError):
        book.flush()
    book._db.execute("PRAGMA query_only=0")
    assert book.flush() == 5  # still marked: nothing was lost with the failed write
    book.close()
    assert len(PeerBook(tmp_path / "peers.sqlite").known()) == 5


# -- pipelining -------------------------------------------------------------------------------


async def test_a_shard_costs_one_round_trip_the_uploads_travel_beside_the_run(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Requester in West Europe, worker in Japan (241 ms): a one-shard job, both operands
    sent, takes the compute and one round trip (operands this requester never uploaded there
    go at once, beside the run request), where it took two (a question about B first) and
    four before that; with B resident, one round trip too (A's upload, the question about B
    and the run request all together)."""
    from tests.test_virtual_time import ACCESS, TABLE

    async with one_worker(worker_region="JPE") as (requester, worker):
        operands = {
            "a": RNG.standard_normal((16, 250)).astype("float32"),
            "b": RNG.standard_normal((250, 250)).astype("float32"),
        }
        started = trio.current_time()
        result = await requester.submit("matmul", operands, shards=1, max_workers=1)
        elapsed = trio.current_time() - started
        compute = worker.worker.stats.compute_seconds
        # Carried a second time, a one-shard job's B is kept (see _JobRun._keep).
        fresh_a = {"a": RNG.standard_normal((16, 250)).astype("float32"), "b": operands["b"]}
        await requester.submit("matmul", fresh_a, shards=1, max_workers=1)
        computed = worker.worker.stats.compute_seconds
        # B is resident now: a new A goes beside the question about B and the run request.
        warm = {"a": RNG.standard_normal((16, 250)).astype("float32"), "b": operands["b"]}
        received = worker.worker.stats.bytes_received
        started = trio.current_time()
        again = await requester.submit("matmul", warm, shards=1, max_workers=1)
        warm_elapsed = trio.current_time() - started
        warm_compute = worker.worker.stats.compute_seconds - computed
        # Asked about, not sent again: only the new A crossed.
        assert worker.worker.stats.bytes_received - received == warm["a"].nbytes
    assert_product_close(result.output, operands["a"] @ operands["b"])
    assert_product_close(again.output, warm["a"] @ warm["b"])
    rtt = 2 * (TABLE.one_way("WEU", "JPE") + 2 * ACCESS)
    assert compute + rtt < elapsed < compute + 1.5 * rtt, (elapsed, compute, rtt)
    assert warm_compute + rtt < warm_elapsed < warm_compute + 1.5 * rtt, (warm_elapsed, rtt)


@pytest.mark.parametrize(("k", "seen"), [(250, [True, False]), (8, [True, True, False])])
async def test_a_worker_that_does_not_wait_for_operands_gets_the_run_again(
    autojump_clock: trio.testing.MockClock, k: int, seen: list[bool]
) -> None:
    """A worker of an earlier version refuses a run request carrying operands as too large
    (over its 64 KiB limit; k=250), or takes a small one and ignores its body (k=8: it
    lacks what the request carried); and it ignores ``wait_operands``. The requester uploads
    the operands instead (and from then on), the worker refuses the run while the uploads
    are on their way, the requester asks again once they are done, and the shard is not
    counted as a failure."""
    from mtor_p2p.compute.protocol import PROTOCOL_RUN
    from mtor_p2p.network import RemoteError
    from mtor_p2p.records.arrays import pack, unpack

    async with cluster(["requester", "worker"]) as c:
        worker = await c.start("worker", "WEU")
        requester = await c.start("requester", "GWC", serve=False)
        await c.settle()
        runs: list[bool] = []

        async def older(sender: str, request: bytes) -> bytes:
            if len(request) > 64 * 1024:  # that version's limit, as its host refused it
                raise RemoteError("request too large")
            header, _ = unpack(request)  # the body and "inline" mean nothing to it
            header.pop("inline", None)
            runs.append(bool(header.pop("wait_operands", False)))
            return await worker.worker._on_run(sender, pack(header))

        c.world.network(worker.peer_id).handle(PROTOCOL_RUN, older)
        operands = {
            "a": RNG.standard_normal((16, k)).astype("float32"),
            "b": RNG.standard_normal((k, 250)).astype("float32"),
        }
        result = await requester.submit("matmul", operands, shards=1, max_workers=1)
        assert_product_close(result.output, operands["a"] @ operands["b"])
        # (k=8: first the small request carrying them, "missing"); refused while the uploads
        # ran, then asked again.
        assert runs == seen
        assert result.shards[0].attempts == 1
        assert requester.peers.get(worker.peer_id).failed == 0
        assert worker.peer_id in requester.scheduler.no_inline


async def test_a_worker_pair_keeps_its_device_busy_and_admits_the_pipeline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The requester's uplink carries one shard's operands in about one shard's compute: with
    shards in flight the next upload overlaps the current compute, so the worker's device is
    busy nearly all of the job, and no request of the honest pipeline is refused."""
    from mtor_p2p.memnet import LinkProfile
    from tests.test_virtual_time import ACCESS, attempt_log

    async with cluster(["requester", "worker"]) as c:
        worker = await c.start("worker", "WEU")
        requester = await c.start("requester", "WEU", serve=False)
        await c.settle()
        b = RNG.standard_normal((250, 250)).astype("float32")
        # A first job measures the worker (a newcomer gets one shard at a time) and leaves B
        # resident there (two shards: a one-shard job's B is not kept).
        await requester.submit("matmul", {"a": b[:32], "b": b}, shards=2, max_workers=1)
        # 64 KB per slice at 128 KB/s: 0.5 s, as long as its 8 MFLOP compute.
        network = c.world.network(requester.peer_id)
        network.link = LinkProfile("WEU", access_delay=ACCESS, uplink_bps=128 * 1024)
        attempts = attempt_log(requester)
        device = c.peers["worker"].device
        busy_before = device.busy_seconds
        a = RNG.standard_normal((16 * 64, 250)).astype("float32")
        started = trio.current_time()
        result = await requester.submit("matmul", {"a": a, "b": b}, shards=16, max_workers=1)
        elapsed = trio.current_time() - started
        busy = device.busy_seconds - busy_before
    np.testing.assert_allclose(result.output, a @ b, rtol=1e-4, atol=1e-4)
    assert {x.outcome for x in attempts} == {"accepted"}, [x.outcome for x in attempts]
    assert worker.worker.stats.uploads_refused == 0
    # 16 shards of 0.5 s: sequential upload-then-compute would take 16 s or more.
    assert busy >= 0.85 * elapsed, (busy, elapsed)


async def test_receipts_settling_together_share_one_ledger_ingest(tmp_path: Any) -> None:
    """Twenty receipt entries recorded at once: one or two ingests (commits), each new entry
    in the ledger, a repeated one reported as not new (so it is not gossiped again)."""
    import blake3

    from mtor_p2p.clock import NetClock
    from mtor_p2p.identity import Identity
    from mtor_p2p.ledger.service import LedgerService
    from mtor_p2p.ledger.store import Ledger
    from mtor_p2p.memnet import MemWorld
    from tests.ledger_data import PEERS, genesis, receipt

    world = MemWorld()
    identity = Identity.generate()
    ledger = Ledger(tmp_path / "ledger.sqlite", genesis())
    service = LedgerService(world.add_peer(identity), identity, NetClock(), ledger)
    ingests: list[int] = []
    ingest = ledger.ingest

    def counted(wires: list[bytes]) -> Any:
        ingests.append(len(wires))
        return ingest(wires)

    ledger.ingest = counted  # type: ignore[method-assign]
    wires = [receipt(PEERS[0], PEERS[2], shard=i, price=0.5) for i in range(20)]
    results: list[bool] = []

    async def record(wire: bytes) -> None:
        results.append(await service._receipts.submit(wire))

    async with trio.open_nursery() as nursery:
        for wire in wires:
            nursery.start_soon(record, wire)
    assert results == [True] * 20 and sum(ingests) == 20 and len(ingests) <= 2
    assert len(ledger.held([blake3.blake3(w).hexdigest() for w in wires])) == 20
    assert await service._receipts.submit(wires[0]) is False
    ledger.close()


async def test_the_freivalds_sketch_is_made_while_the_worker_computes(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job's sketch of B needs no answer: it is made once a shard's operands have left
    (not before: it would compete with sending them), beside the worker's compute (on a
    simulated host, its charged time overlaps the worker's); A's side of every shard's check
    (A z, A's row norms) right after it, so that the check on an answer's arrival is only
    the products with C."""
    from mtor_kernels import verify as checks
    from mtor_p2p.compute import client
    from mtor_p2p.compute.worker import WorkerService

    events: list[tuple[str, float]] = []
    sketch, run_shard = checks.freivalds_sketch, client.run_shard
    a_side, check = checks.freivalds_rows, checks.freivalds
    on_run = WorkerService._on_run

    async def arrived(self: Any, sender: str, request: bytes) -> bytes:
        events.append(("run arrived", trio.current_time()))
        return await on_run(self, sender, request)

    monkeypatch.setattr(WorkerService, "_on_run", arrived)

    def timed_sketch(*args: Any, **kwargs: Any) -> Any:
        events.append(("sketch", trio.current_time()))
        return sketch(*args, **kwargs)

    async def timed_run(*args: Any, **kwargs: Any) -> Any:
        answer = await run_shard(*args, **kwargs)
        events.append(("answer", trio.current_time()))
        return answer

    def timed_a_side(*args: Any, **kwargs: Any) -> Any:
        events.append(("a side", trio.current_time()))
        return a_side(*args, **kwargs)

    def checked(*args: Any, **kwargs: Any) -> Any:
        rows = kwargs.get("rows")
        events.append(("check with a side" if rows is not None else "check", 0.0))
        assert rows is None or rows.w64.shape[0] == args[0].shape[0]
        return check(*args, **kwargs)

    monkeypatch.setattr(checks, "freivalds_sketch", timed_sketch)
    monkeypatch.setattr(checks, "freivalds_rows", timed_a_side)
    monkeypatch.setattr(checks, "freivalds", checked)
    monkeypatch.setattr(client, "run_shard", timed_run)
    async with one_worker(worker_region="JPE") as (requester, _):
        operands = small_operands()
        result = await requester.submit("matmul", operands, shards=2, max_workers=1)
    assert_product_close(result.output, operands["a"] @ operands["b"])
    kinds = [kind for kind, _ in events]
    assert kinds.count("sketch") == 1  # one per job, shared by its shards
    assert kinds.index("sketch") < kinds.index("answer"), events
    assert kinds.count("a side") == 1 and kinds.index("a side") < kinds.index("answer"), events
    assert kinds.count("check with a side") == 2 and "check" not in kinds, events
    # Memnet sets ``sent`` as the request's last byte reaches the worker (JPE to WEU: far).
    assert events[kinds.index("run arrived")][1] <= events[kinds.index("sketch")][1], events


async def test_a_one_shard_jobs_b_is_kept_from_its_second_use_on(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A one-shard job's B is carried without asking the worker to keep it (most such Bs
    are used once: keeping cost a copy into fresh pages per job); carried there a second
    time, it is kept, and a third job sends only its A."""
    async with one_worker() as (requester, worker):
        b = RNG.standard_normal((48, 32)).astype("float32")
        digest = arrays.meta_of(b).digest
        received = []
        for _ in range(3):
            a = RNG.standard_normal((16, 48)).astype("float32")
            before = worker.worker.stats.bytes_received
            result = await requester.submit("matmul", {"a": a, "b": b}, shards=1)
            assert_product_close(result.output, a @ b)
            received.append(worker.worker.stats.bytes_received - before)
            if len(received) == 1:
                assert digest not in worker.worker.operands
        assert digest in worker.worker.operands
        assert received == [a.nbytes + b.nbytes, a.nbytes + b.nbytes, a.nbytes]


async def test_weights_every_worker_holds_are_never_carried(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A B the requester knows every worker holds (``resident_everywhere``: the simulator's
    preloaded weights) is neither carried nor uploaded, from the first job on, although this
    requester never sent it; a worker that lacks it after all says so, and gets it uploaded."""
    uploads = count_uploads(monkeypatch)
    async with one_worker() as (requester, worker):
        b = RNG.standard_normal((48, 32)).astype("float32")
        digest = arrays.meta_of(b).digest
        worker.worker.operands.put(b, digest)
        requester.scheduler.resident_everywhere = frozenset({digest})
        received = []
        for _ in range(2):
            a = RNG.standard_normal((16, 48)).astype("float32")
            before = worker.worker.stats.bytes_received
            result = await requester.submit("matmul", {"a": a, "b": b}, shards=1)
            assert_product_close(result.output, a @ b)
            received.append(worker.worker.stats.bytes_received - before)
        assert received == [a.nbytes, a.nbytes] and uploads == []
        worker.worker.operands.discard(digest)
        result = await requester.submit("matmul", {"a": a, "b": b}, shards=1)
        assert_product_close(result.output, a @ b)
        assert uploads == [b.nbytes]
        assert requester.peers.get(worker.peer_id).failed == 0


async def test_answers_in_run_replies_are_placed_as_they_are_accepted(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An answer that came in its run reply is copied into the job's output when it is
    accepted, while other shards compute: nothing is left to copy once the last shard is in
    (issue 9: 200 MiB of 512² answers copied at the end took 0.5 s of a 2.8 s job)."""
    from mtor_p2p.compute import scheduler

    left_at_end: list[int] = []
    place = scheduler._JobRun.place_outputs

    def counted(self: Any) -> np.ndarray:
        left_at_end.append(len(self.outputs))
        return place(self)

    monkeypatch.setattr(scheduler._JobRun, "place_outputs", counted)
    async with two_workers() as requester:
        operands = {
            "a": RNG.standard_normal((96, 48)).astype("float32"),
            "b": RNG.standard_normal((48, 32)).astype("float32"),
        }
        result = await requester.submit("matmul", operands, shards=6)
    assert_product_close(result.output, operands["a"] @ operands["b"])
    assert left_at_end == [0]


async def test_a_cold_shard_travels_as_one_message_and_b_stays_resident(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Operands the worker lacks that fit INLINE_OPERAND_BYTES travel in the run request: no
    upload request at all; B is kept resident (a job of more than one shard), so the next
    job's shards carry only A; when they do not all fit, they are all uploaded beside the run
    as before."""
    from mtor_p2p.compute.protocol import INLINE_OPERAND_BYTES

    uploads = count_uploads(monkeypatch)
    async with one_worker() as (requester, worker):
        b = RNG.standard_normal((48, 32)).astype("float32")
        first = {"a": RNG.standard_normal((64, 48)).astype("float32"), "b": b}
        result = await requester.submit("matmul", first, shards=2, max_workers=1)
        assert_product_close(result.output, first["a"] @ b)
        assert uploads == []
        received = worker.worker.stats.bytes_received
        second = {"a": RNG.standard_normal((64, 48)).astype("float32"), "b": b}
        result = await requester.submit("matmul", second, shards=2, max_workers=1)
        assert_product_close(result.output, second["a"] @ b)
        assert uploads == []
        assert worker.worker.stats.bytes_received - received == second["a"].nbytes
        # B over the limit: both uploaded (a run carrying operands waits for no upload).
        big_b = RNG.standard_normal((1040, 1024)).astype("float32")
        assert big_b.nbytes > INLINE_OPERAND_BYTES
        third = {"a": RNG.standard_normal((4, 1040)).astype("float32"), "b": big_b}
        result = await requester.submit("matmul", third, shards=1, max_workers=1)
        np.testing.assert_allclose(result.output, third["a"] @ big_b, rtol=1e-4, atol=1e-3)
        assert sorted(uploads) == [third["a"].nbytes, big_b.nbytes]


async def test_a_resident_b_is_not_asked_about_and_is_sent_again_once_dropped(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shards carrying their slice inline do not ask whether the worker still holds the B
    sent to it before (a "has" request each); a worker that dropped it says so in its answer,
    gets B uploaded, and the shard is run again, with no fault recorded."""
    from mtor_p2p.compute import client

    asked: list[int] = []
    missing_operands = client.missing_operands

    async def counted(network: Any, worker: str, metas: Any, **kwargs: Any) -> Any:
        asked.append(len(metas))
        return await missing_operands(network, worker, metas, **kwargs)

    monkeypatch.setattr(client, "missing_operands", counted)
    uploads = count_uploads(monkeypatch)
    async with one_worker() as (requester, worker):
        b = RNG.standard_normal((48, 32)).astype("float32")
        for shards in (1, 3):
            operands = {"a": RNG.standard_normal((60, 48)).astype("float32"), "b": b}
            result = await requester.submit("matmul", operands, shards=shards, max_workers=1)
            assert_product_close(result.output, operands["a"] @ b)
        assert asked == [] and uploads == []
        # The worker drops B (its store's eviction, a restart): the next shard's answer
        # names it, B is uploaded, and the run is asked again.
        worker.worker.operands.discard(arrays.meta_of(b).digest)
        operands = {"a": RNG.standard_normal((60, 48)).astype("float32"), "b": b}
        result = await requester.submit("matmul", operands, shards=1, max_workers=1)
        assert_product_close(result.output, operands["a"] @ b)
        assert uploads == [b.nbytes]
        assert arrays.meta_of(b).digest in worker.worker.operands
        assert requester.peers.get(worker.peer_id).failed == 0


async def test_only_a_small_sketch_is_made_on_the_event_loop(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sketch's cost is mostly B's conversion and norms, whatever the rounds: it runs on
    the event loop only for a B of at most CHEAP_SKETCH_ELEMENTS (a 1024x600 B, within the
    check's flop bound at 20 rounds, still goes to a thread)."""
    from mtor_p2p.compute import blas, scheduler

    monkeypatch.setattr(blas, "single_threaded", lambda: True)
    async with one_worker() as (requester, _):
        seen = cheap_flags(monkeypatch, requester, lambda name: "_freivalds_sketch" in name)
        for k, n in ((48, 32), (1024, 600)):
            assert (k * n <= scheduler.CHEAP_SKETCH_ELEMENTS) is (k == 48)
            assert 2 * 20 * k * n <= scheduler.CHEAP_CHECK_FLOPS
            operands = {
                "a": RNG.standard_normal((8, k)).astype("float32"),
                "b": RNG.standard_normal((k, n)).astype("float32"),
            }
            result = await requester.submit("matmul", operands, shards=1, max_workers=1)
            np.testing.assert_allclose(
                result.output, operands["a"] @ operands["b"], rtol=1e-4, atol=1e-4
            )
    assert seen == [True, False]


async def test_checks_beside_other_shards_go_to_a_thread_a_lone_one_stays_inline(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A check with no other shard of its job under way runs on the event loop (the round
    trip's latency); beside others it goes to a thread, off the loop that sends and receives
    for them (B-shared 512² jobs: the loop was runnable 95% of the job, BENCHMARKS.md).
    One-shard jobs at once keep theirs inline (on threads they cost two cores more)."""
    from mtor_p2p.compute import blas

    monkeypatch.setattr(blas, "single_threaded", lambda: True)
    async with one_worker() as (requester, _):
        inline = cheap_flags(monkeypatch, requester, lambda name: name == "_JobRun._verified_check")
        operands = small_operands()
        await requester.submit("matmul", operands, shards=1, max_workers=1)
        assert inline == [True]
        # The worker is measured now: two shards at a time, and their checks beside others.
        result = await requester.submit("matmul", operands, shards=8, max_workers=1)
        assert_product_close(result.output, operands["a"] @ operands["b"])
        assert len(inline) == 9
        assert inline[1:].count(False) >= 4, inline
        inline.clear()

        async def one_job(b: np.ndarray) -> None:
            job = {"a": operands["a"], "b": b}
            result = await requester.submit("matmul", job, shards=1, max_workers=1)
            assert_product_close(result.output, job["a"] @ b)

        async with trio.open_nursery() as nursery:
            for scale in (2.0, 3.0):
                nursery.start_soon(one_job, operands["b"] * np.float32(scale))
    assert inline == [True, True]


async def test_the_next_shard_leaves_while_an_answer_is_judged(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An answer being judged no longer holds its place at the worker: with one shard in
    flight and checks that take 0.5 s, the next shard computes while the last is checked,
    and the worker never holds more than the one."""
    async with one_worker() as (requester, worker):
        requester.scheduler.max_in_flight = 1
        await requester.submit("matmul", small_operands(), shards=1, max_workers=1)  # trial
        runtime = requester.scheduler.runtime
        original = runtime.run_blocking

        async def slow_checks(fn: Any, *args: Any, **kwargs: Any) -> Any:
            if getattr(fn, "__name__", "") == "_check":
                await trio.sleep(0.5)
            return await original(fn, *args, **kwargs)

        monkeypatch.setattr(runtime, "run_blocking", slow_checks)
        held = most = 0
        serve = worker.worker._on_run

        async def counted(sender: str, request: bytes) -> Any:
            nonlocal held, most
            held += 1
            most = max(most, held)
            try:
                return await serve(sender, request)
            finally:
                held -= 1

        monkeypatch.setattr(worker.worker, "_on_run", counted)
        worker.network.handle(
            worker_module.PROTOCOL_RUN, counted, max_request_bytes=1 << 30, timeout=60.0
        )
        started = trio.current_time()
        operands = small_operands()
        result = await requester.submit("matmul", operands, shards=6, max_workers=1)
        elapsed = trio.current_time() - started
    assert_product_close(result.output, operands["a"] @ operands["b"])
    assert most == 1
    # Each check holding the worker's one place, the job takes over 3 s (3.14 measured, the
    # six checks one after the other); with the next shard computing meanwhile, 1.59 s.
    assert elapsed < 2.5, elapsed


async def test_a_jobs_output_reuses_the_memory_of_an_output_dropped_before(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job's output is made on memory.RECYCLED: once the caller drops a result, the next
    job of that size writes its answers into the same, already mapped memory."""
    from mtor_p2p import memory

    arrays = memory.RecycledArrays(min_bytes=4096)  # the 8 KiB outputs here qualify
    monkeypatch.setattr(memory, "RECYCLED", arrays)
    operands = small_operands()
    expected = operands["a"] @ operands["b"]
    async with one_worker() as (requester, _):
        first = await requester.submit("matmul", operands, shards=2, max_workers=1)
        assert_product_close(first.output, expected)
        address = first.output.ctypes.data
        kept = await requester.submit("matmul", operands, shards=2, max_workers=1)
        assert kept.output.ctypes.data != address  # the first is still held
        del first
        again = await requester.submit("matmul", operands, shards=2, max_workers=1)
    assert again.output.ctypes.data == address
    assert_product_close(again.output, expected)
    assert_product_close(kept.output, expected)
    assert (arrays.fresh, arrays.reused) == (2, 1)


async def test_a_twin_judged_while_the_first_answer_settles_is_not_accepted_again(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a courier, settling an accepted answer waits for its commits: a hedged twin's
    answer judged meanwhile is not accepted (nor paid) a second time."""
    from mtor_p2p.compute import scheduler

    settled: list[str] = []
    settle, accept = scheduler.Scheduler.settle, scheduler._JobRun._accept

    async def slow_settle(self: Any, worker: str, receipt: Any) -> Any:
        settled.append(worker)
        await trio.sleep(1.0)  # commits on a slow disk
        return await settle(self, worker, receipt)

    async def with_twin(self: Any, worker: str, index: int, *args: Any) -> None:
        # The same answer judged twice at once, as a hedged twin's would be.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(accept, self, worker, index, *args)
            await trio.sleep(0.1)
            nursery.start_soon(accept, self, "twin", index, *args)

    monkeypatch.setattr(scheduler.Scheduler, "settle", slow_settle)
    monkeypatch.setattr(scheduler._JobRun, "_accept", with_twin)
    async with one_worker() as (requester, _):
        operands = {
            "a": RNG.standard_normal((16, 8)).astype("float32"),
            "b": RNG.standard_normal((8, 4)).astype("float32"),
        }
        result = await requester.submit("matmul", operands, shards=1, max_workers=1)
    assert result.workers != ["twin"]
    assert "twin" not in settled and len(settled) == 1


async def test_a_worker_over_its_cap_of_carried_bytes_gets_uploads_instead(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs carrying operands hold their bytes while queued and computing: past the worker's
    cap it refuses the next at once (INLINE_REFUSED), and the requester uploads that shard's
    operands instead, without counting it against the worker."""
    monkeypatch.setattr(worker_module, "SMALL_RUN_REQUEST_BYTES", 64)
    monkeypatch.setattr(worker_module, "MAX_INLINE_HELD_BYTES_PER_SENDER", 1000)
    uploads = count_uploads(monkeypatch)
    async with one_worker() as (requester, worker):
        operands = small_operands()
        result = await requester.submit("matmul", operands, shards=2, max_workers=1)
        assert_product_close(result.output, operands["a"] @ operands["b"])
        assert uploads  # refused inline, uploaded
        assert requester.peers.get(worker.peer_id).failed == 0
        assert worker.peer_id not in requester.scheduler.no_inline
        assert worker.worker._inline_held == {} and worker.worker._inline_held_total == 0


async def test_a_run_carrying_operands_does_not_wait_for_the_others(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A run request that carries some operands and lacks another is answered "missing
    operands" at once, even with ``wait_operands``: it would hold its bytes meanwhile."""
    from mtor_p2p.compute.protocol import PROTOCOL_RUN
    from mtor_p2p.network import RemoteError
    from mtor_p2p.records.arrays import as_bytes, meta_of, pack

    async with one_worker() as (requester, worker):
        a = RNG.standard_normal((16, 8)).astype("float32")
        b = RNG.standard_normal((8, 4)).astype("float32")
        header = {
            "ledger_rules": LEDGER_RULES,
            "job_id": "ab" * 32,
            "shard": 0,
            "kernel": "matmul",
            "operands": {"a": meta_of(a).to_json(), "b": meta_of(b).to_json()},
            "wait_operands": True,
            "inline": ["a"],
        }
        began = trio.current_time()
        with pytest.raises(RemoteError, match="missing operands"):
            await requester.network.request(
                worker.peer_id, PROTOCOL_RUN, pack(header, as_bytes(a)), timeout=30
            )
        assert trio.current_time() - began < 1.0  # not the 2 s grace for an upload to start


async def delivered(worker: Node, count: int) -> list[Any]:
    """Wait (virtual time) until ``worker`` holds ``count`` countersigned receipts."""
    with trio.fail_after(60):
        while True:
            held = [r for r in worker.worker.receipts.receipts() if r.requester_signature]
            if len(held) >= count:
                return held
            await trio.sleep(0.5)


@pytest.mark.parametrize("worker_kind", ["batches", "before batches", "busy"])
async def test_countersigned_receipts_reach_their_worker_in_batches(
    autojump_clock: trio.testing.MockClock, worker_kind: str
) -> None:
    """A job's receipts settle together and reach their worker in a few requests, not one
    each (each cost both peers a request's handling). A worker from before batches refuses
    the first and gets every receipt one by one from then on; a batch refused for another
    reason (busy) goes one by one, and the next batch is tried again."""
    async with one_worker() as (requester, worker):
        batches: list[int] = []
        take_batch = worker.worker._on_countersigned_batch

        async def counted(sender: str, header: dict[str, Any], body: bytes) -> bytes:
            batches.append(len(header["receipts"]))
            if worker_kind == "before batches":  # as such a worker answers the batch form
                raise RemoteError("header field 'receipt' missing or of the wrong type")
            if worker_kind == "busy" and len(batches) == 1:
                raise RemoteError("busy: too many requests in progress")
            return await take_batch(sender, header, body)

        worker.worker._on_countersigned_batch = counted  # type: ignore[method-assign]
        b = RNG.standard_normal((32, 24)).astype("float32")
        shards = []
        for _ in range(2):  # two jobs, two settlement batches
            a = RNG.standard_normal((16 * 8, 32)).astype("float32")
            result = await requester.submit("matmul", {"a": a, "b": b}, shards=16)
            await requester.scheduler.settled()
            shards += result.shards
            held = await delivered(worker, len(shards))
        assert {r.receipt_id for r in held} >= {s.receipt.receipt_id for s in shards}
        if worker_kind == "batches":
            assert sum(batches) == 32 and len(batches) <= 8
        elif worker_kind == "before batches":
            assert len(batches) == 1  # refused once, then one by one
        else:
            assert len(batches) >= 2  # tried again after the refusal
        assert (worker.peer_id in requester.scheduler._unbatched) == (
            worker_kind == "before batches"
        )


async def test_a_worker_that_cannot_be_reached_holds_up_no_more_than_one_request(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Delivering one by one to a worker that does not answer stops at its first timeout:
    its other receipts would each wait as long, holding up the courier (a review: 32 such
    receipts held a deliverer 160 s). They stay stored here, and in the ledger."""
    from mtor_p2p.compute import client

    async with one_worker() as (requester, worker):
        a = RNG.standard_normal((16 * 4, 32)).astype("float32")
        b = RNG.standard_normal((32, 24)).astype("float32")
        result = await requester.submit("matmul", {"a": a, "b": b}, shards=4)
        receipts = [s.receipt for s in result.shards]
        calls: list[int] = []

        async def silent(*args: Any, **kwargs: Any) -> None:
            calls.append(len(args[2]))
            return None  # as for a NetworkError: not reached

        monkeypatch.setattr(client, "deliver_countersigned", silent)
        requester.scheduler._unbatched[worker.peer_id] = None
        assert await requester.scheduler._deliver(worker.peer_id, receipts) is False
        assert calls == [1]


def test_countersign_batches_keep_to_the_count_and_the_bytes() -> None:
    """Batches hold at most MAX_COUNTERSIGN_BATCH receipts and MAX_COUNTERSIGN_BATCH_BYTES of
    them (a receipt may have up to 4 KiB: 32 of those would pass the worker's request limit)."""
    from mtor_p2p.compute import client
    from mtor_p2p.compute.protocol import MAX_COUNTERSIGN_BATCH, MAX_COUNTERSIGN_BATCH_BYTES

    class Sized:
        def __init__(self, size: int) -> None:
            self.size = size

        def encode(self) -> bytes:
            return bytes(self.size)

    small = [Sized(700) for _ in range(70)]
    assert [len(b) for b in client.countersign_batches(small)] == [32, 32, 6]  # type: ignore[arg-type]
    large = [Sized(4000) for _ in range(30)]
    sizes = [sum(r.size for r in b) for b in client.countersign_batches(large)]  # type: ignore[arg-type]
    assert all(size <= MAX_COUNTERSIGN_BATCH_BYTES for size in sizes) and sum(sizes) == 120_000
    assert MAX_COUNTERSIGN_BATCH == 32


def tampered_answer(reply: bytes, how: str) -> bytes:
    """A worker's run answer with its inline output's first byte flipped (``how`` =
    "output") or its receipt's worker signature changed (``"signature"``); both still parse."""
    import base64
    import json

    header, body = arrays.unpack_view(reply)
    data = bytearray(body)
    if how == "output":
        data[0] ^= 0x40
    else:
        receipt = json.loads(base64.b64decode(header["receipt"]))
        signature = bytearray(base64.b64decode(receipt["w"]))
        signature[5] ^= 0x01
        receipt["w"] = base64.b64encode(bytes(signature)).decode("ascii")
        encoded = json.dumps(receipt, sort_keys=True, separators=(",", ":")).encode()
        header["receipt"] = base64.b64encode(encoded).decode("ascii")
    return arrays.pack(header, bytes(data))


@pytest.mark.parametrize("how", ["output", "signature"])
async def test_an_answer_whose_hash_or_signature_fails_beside_other_shards_is_the_workers_fault(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """An answer's output hash and receipt signature are verified with its check (on the
    check's thread beside other shards of the job, not on the event loop): a worker whose
    answer fails either is out of the job as malformed, its shards are done elsewhere, and
    nothing of its answers is paid for or kept."""
    from mtor_p2p.compute import blas

    monkeypatch.setattr(blas, "single_threaded", lambda: True)
    async with cluster(["requester", "honest", "liar"]) as c:
        honest = await c.start("honest", "WEU")
        liar = await c.start("liar", "WEU")
        requester = await c.start("requester", "WEU", serve=False)
        await c.settle()
        serve = liar.worker._on_run

        async def lying(sender: str, request: bytes) -> Any:
            return tampered_answer(bytes(await serve(sender, request)), how)

        liar.network.handle(
            worker_module.PROTOCOL_RUN, lying, max_request_bytes=1 << 30, timeout=60.0
        )
        threaded = cheap_flags(
            monkeypatch, requester, lambda name: name == "_JobRun._verified_check"
        )
        operands = small_operands()
        result = await requester.submit("matmul", operands, shards=8, max_workers=2)
    assert_product_close(result.output, operands["a"] @ operands["b"])
    assert result.workers == [honest.peer_id], result.workers
    reason = result.workers_out[liar.peer_id]
    expected = "hash mismatch" if how == "output" else "worker signature does not verify"
    assert "malformed answer" in reason and expected in reason, reason
    assert False in threaded  # at least one answer was verified off the event loop


async def test_a_hedged_twins_late_answer_is_still_checked_as_the_workers_word() -> None:
    """(A hostile review's finding.) An answer that comes after its shard was accepted from
    a hedged twin is dropped, but not unchecked: a twin whose bytes or receipt do not hold
    is blamed (malformed), not counted as a good answer."""
    from types import SimpleNamespace

    from mtor_p2p.compute import client
    from mtor_p2p.compute.scheduler import _JobRun
    from mtor_p2p.wire import RecordError

    verified: list[str] = []

    def forged() -> None:
        verified.append("forged")
        raise RecordError("worker signature does not verify")

    late = client.ShardAnswer(np.zeros((2, 2), np.float32), None, forged)  # type: ignore[arg-type]
    run = SimpleNamespace(accepted={0: object()})
    with pytest.raises(client.WorkerMisbehaved, match="worker signature does not verify"):
        await _JobRun._judge(run, "liar", 0, {}, late, 0.1)  # type: ignore[arg-type]
    assert verified == ["forged"]
    honest = client.ShardAnswer(np.zeros((2, 2), np.float32), None, lambda: None)  # type: ignore[arg-type]
    await _JobRun._judge(run, "honest", 0, {}, honest, 0.1)  # type: ignore[arg-type]


async def test_the_requesters_own_failure_while_verifying_an_answer_is_not_the_workers(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(A hostile review's finding.) Only bytes that do not hold (RecordError) make an
    answer malformed: the requester running out of memory while hashing one is its own
    failure, raised to the caller, and the honest worker keeps its standing."""
    from mtor_p2p.compute import client

    real = client.check_hash
    failures = [MemoryError()]

    def failing(meta: Any, array: np.ndarray) -> None:
        if failures:
            raise failures.pop()
        real(meta, array)

    monkeypatch.setattr(client, "check_hash", failing)
    async with one_worker() as (requester, worker):
        raised: list[BaseException] = []
        try:
            await requester.submit("matmul", small_operands(), shards=1, max_workers=1)
        except* MemoryError as group:  # the job's nursery carries it
            raised.extend(group.exceptions)
        assert len(raised) == 1
        standing = requester.scheduler.book.get(worker.peer_id)
        assert standing.misbehaved == 0 and standing.failed == 0, standing
        result = await requester.submit("matmul", small_operands(), shards=1, max_workers=1)
        assert result.workers == [worker.peer_id]


@pytest.mark.parametrize(("rows", "k"), [(64, 48), (61, 48), (9, 47)])
async def test_operands_and_outputs_viewed_in_received_messages_are_aligned(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch, rows: int, k: int
) -> None:
    """A run request's inline operands and a shard's inline output are viewed in place in
    the message that carried them: its header is padded so that they start 16-byte aligned
    (unaligned, NumPy copied them for every product and every check)."""
    from mtor_kernels.backend import NumpyBackend
    from mtor_p2p.compute import scheduler

    multiplied: list[bool] = []
    checked: list[bool] = []
    product, freivalds = NumpyBackend.matmul, scheduler.checks.freivalds

    def spied_product(self: Any, a: np.ndarray, b: np.ndarray, **kwargs: Any) -> Any:
        # The body starts 16-aligned (A); B follows A at whole elements: aligned for float32.
        multiplied.append(a.ctypes.data % 16 == 0 and b.flags.aligned)
        return product(self, a, b, **kwargs)

    def spied_check(a: np.ndarray, b: np.ndarray, c: np.ndarray, **kwargs: Any) -> Any:
        checked.append(c.ctypes.data % 16 == 0 and c.flags.aligned)
        return freivalds(a, b, c, **kwargs)

    monkeypatch.setattr(NumpyBackend, "matmul", spied_product)
    monkeypatch.setattr(scheduler.checks, "freivalds", spied_check)
    async with one_worker() as (requester, _):
        for shards in (1, 3):
            operands = {
                "a": RNG.standard_normal((rows, k)).astype("float32"),
                "b": RNG.standard_normal((k, 32)).astype("float32"),
            }
            result = await requester.submit("matmul", operands, shards=shards, max_workers=1)
            assert_product_close(result.output, operands["a"] @ operands["b"])
    assert multiplied and all(multiplied), multiplied
    assert checked and all(checked), checked


def test_a_header_padded_for_alignment_parses_the_same_and_stays_within_the_limit() -> None:
    """Padding (``~pad``) places every body at a multiple of BODY_ALIGNMENT and changes no
    field a receiver reads; a header that padding would push past MAX_HEADER_BYTES is sent
    unpadded rather than refused at the other end."""
    from mtor_p2p.records.arrays import BODY_ALIGNMENT, MAX_HEADER_BYTES, PAD_FIELD

    for width in range(40):
        header = {"job_id": "f" * width, "shard": width}
        data = bytes(arrays.pack_gathered(header, [b"\x00" * 8]))
        parsed, body = arrays.unpack_view(data)
        assert (len(data) - len(body)) % BODY_ALIGNMENT == 0
        assert {k: v for k, v in parsed.items() if k != PAD_FIELD} == header
        assert set(parsed.get(PAD_FIELD, "")) <= {" "}
    near = {"x": "a" * (MAX_HEADER_BYTES - 10)}
    parsed, body = arrays.unpack_view(bytes(arrays.pack_gathered(near, [b"body"])))
    assert parsed == near and bytes(body) == b"body"


async def test_a_worker_gets_no_more_slots_than_its_job_has_shards(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A one-shard job over two workers runs one slot on each (the second stays to hedge),
    not max_in_flight + 1: idle slots wake with every attempt that ends (a one-shard job's
    requester spent 25 task steps on six slots)."""

    class SlotCount(trio.abc.Instrument):
        def __init__(self) -> None:
            self.slots = 0

        def task_spawned(self, task: trio.lowlevel.Task) -> None:
            self.slots += task.name.endswith("._slot")

    async with two_workers() as requester:
        counted = SlotCount()
        trio.lowlevel.add_instrument(counted)
        operands = small_operands()
        result = await requester.submit("matmul", operands, shards=1, max_workers=2)
        one_shard = counted.slots
        counted.slots = 0
        await requester.submit("matmul", small_operands(), shards=8, max_workers=2)
        trio.lowlevel.remove_instrument(counted)
    assert_product_close(result.output, operands["a"] @ operands["b"])
    assert one_shard == 2
    assert counted.slots == 2 * (requester.scheduler.max_in_flight + 1)


def test_a_large_job_gets_two_shards_per_worker_and_a_small_one_does_not() -> None:
    """Without --shards, equal workers got one shard each, so nothing hid the upload before a
    shard or the download and check after it. A large job now gets two per worker; one whose
    shards would fall under the row or FLOP floor keeps the speed-based count."""
    from types import SimpleNamespace

    from mtor_p2p.compute.scheduler import (
        PIPELINE_MIN_SHARD_FLOPS,
        PIPELINE_MIN_SHARD_ROWS,
        _shard_count,
    )

    default = SimpleNamespace(shards=None)
    product_8192 = 2.0 * 8192**3
    assert _shard_count(default, [1.0, 1.0], 8192, product_8192) == 4
    assert _shard_count(default, [1.0] * 4, 8192, product_8192) == 8
    assert _shard_count(default, [1.0], 8192, product_8192) == 2
    # Small jobs: rows or FLOPs too few to split further than one per worker.
    assert _shard_count(default, [1.0, 1.0], 4096, 2.0 * 4096 * 256 * 256) == 2
    assert _shard_count(default, [1.0] * 4, 2 * PIPELINE_MIN_SHARD_ROWS, product_8192) == 4
    assert _shard_count(default, [1.0] * 2, 8192, 3 * PIPELINE_MIN_SHARD_FLOPS) == 3
    # Unequal speeds still plan by speed (up to four per worker), and --shards still wins.
    assert _shard_count(default, [1.0, 5.0], 8192, 2.0 * 4096 * 256 * 256) == 6
    assert _shard_count(default, [1.0, 1.5], 8192, 2.0 * 4096 * 256 * 256) == 3
    # Equal workers measured a few percent apart: one shard each, not a third for one of them
    # (speeds a new user's devnet advertised; the job got 3 shards, split 1 and 2).
    assert _shard_count(default, [0.200, 0.199], 2048, 2.0 * 2048 * 512 * 512) == 2
    assert _shard_count(default, [1.0, 1.04, 0.98], 4096, 2.0 * 4096 * 256 * 256) == 3
    assert _shard_count(SimpleNamespace(shards=3), [1.0] * 4, 8192, product_8192) == 3


@ORDERS
async def test_a_two_shard_job_over_two_measured_workers_runs_one_shard_on_each(
    autojump_clock: trio.testing.MockClock,
    trio_seed: int,  # noqa: F811 (the fixture, imported above)
) -> None:
    """A worker's pipeline (max_in_flight shards) took both shards of a two-shard job while
    the other worker idled; a worker running a shard now leaves the queue to an idle one."""
    async with two_workers() as requester:
        # Measured workers only: an unmeasured one gets one shard at a time anyway.
        await requester.submit("matmul", small_operands(), shards=8, max_workers=2)
        spread = []
        for _ in range(4):
            operands = small_operands()
            result = await requester.submit("matmul", operands, shards=2, max_workers=2)
            assert_product_close(result.output, operands["a"] @ operands["b"])
            spread.append(sorted(Counter(s.worker for s in result.shards).values()))
    assert spread == [[1, 1]] * 4, spread


async def test_jobs_submitted_together_share_each_workers_shards_in_flight(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A worker's shards in flight from one requester are counted across its jobs: with 24
    one-shard jobs submitted at once over two measured workers, neither is sent more than
    ``SHARED_IN_FLIGHT x max_in_flight`` of them ahead of the answers it gave (one more may
    be under way while an answer is judged), and both run a fair share. Counted per job
    only, the worker ranked first took nearly every job (its slots ask first) while the
    other idled."""
    async with two_workers() as requester:
        operands = small_operands()
        # Both workers measured first (a newcomer takes one shard at a time, its trial).
        await requester.submit("matmul", operands, shards=4, max_workers=2)
        scheduler = requester.scheduler
        held: Counter[str] = Counter()
        most: Counter[str] = Counter()
        ran: Counter[str] = Counter()
        note_sent = scheduler.note_sent

        def sent(worker: str) -> None:
            held[worker] += 1
            most[worker] = max(most[worker], held[worker])
            note_sent(worker)

        def ended(attempt: Any) -> None:
            held[attempt.worker] -= 1
            ran[attempt.worker] += attempt.outcome == "accepted"

        scheduler.note_sent = sent  # type: ignore[method-assign]
        scheduler.observer = ended
        outputs: list[tuple[np.ndarray, np.ndarray]] = []
        jobs = 24

        async def one(i: int) -> None:
            a = operands["a"] + i
            result = await requester.submit(
                "matmul", {"a": a, "b": operands["b"]}, shards=1, max_workers=2
            )
            outputs.append((result.output, a))

        async with trio.open_nursery() as nursery:
            for i in range(jobs):
                nursery.start_soon(one, i)
    for output, a in outputs:
        np.testing.assert_allclose(output, a @ operands["b"], rtol=1e-4, atol=1e-4)
    assert sum(ran.values()) == jobs, ran
    assert min(ran.values()) >= jobs // 4, ran
    assert max(most.values()) <= SHARED_IN_FLIGHT * scheduler.max_in_flight + 1, most


async def test_a_worker_busy_with_other_jobs_does_not_hold_back_the_others(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Jobs B1 and B2 hold every one of worker w's tokens of shards in flight (shared by the
    requester's jobs) with long shards; job A runs over w and x. In A, w holds no attempt but
    cannot be sent one either: it does not count as idle, so x keeps two of A's shards in
    flight rather than one at a time, the rule for a worker that could take the next shard
    (a review: A took 0.43 s with x held to one, 0.22 s without)."""
    from mtor_p2p.compute.scheduler import JobSpec
    from tests.test_virtual_time import shard_operands

    async with cluster(["requester", "w", "x"]) as c:
        w = await c.start("w", "WEU", price=0.5)
        await c.start("x", "WEU", price=1.0)
        requester = await c.start("requester", "WEU", serve=False)
        await c.settle()
        await requester.submit("matmul", small_operands(), shards=4, max_workers=2)
        log: list[Any] = []
        requester.scheduler.observer = log.append
        long = shard_operands()
        spec_b = JobSpec(
            kernel="matmul",
            operands={"a": np.concatenate([long["a"]] * 8), "b": long["b"]},
            verify="freivalds",
            shards=8,
            max_workers=1,
            only=(w.peer_id,),
        )
        small = small_operands()
        a_ops = {"a": np.concatenate([small["a"]] * 8), "b": small["b"]}
        async with trio.open_nursery() as nursery:
            for _ in range(SHARED_IN_FLIGHT):  # each job holds max_in_flight of w's tokens
                nursery.start_soon(requester.scheduler.run, spec_b)
            await trio.sleep(0.5)  # B's shards in flight on w, all its tokens held
            result = await requester.submit("matmul", a_ops, shards=16, max_workers=2)
            nursery.cancel_scope.cancel()
    np.testing.assert_allclose(result.output, a_ops["a"] @ a_ops["b"], rtol=1e-4, atol=1e-4)
    spans = [(x.started, x.ended) for x in log if x.job_id == result.job_id]
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    in_flight = most = 0
    for _, step in events:
        in_flight += step
        most = max(most, in_flight)
    assert most >= 2, spans


def spy_beside(monkeypatch: pytest.MonkeyPatch, node: Node) -> list[str]:
    """The names of the functions ``node``'s scheduler begins beside its event loop."""
    runtime = node.scheduler.runtime
    original = runtime.beside
    names: list[str] = []

    def spy(fn: Any, *args: Any) -> Any:
        names.append(fn.__name__)
        return original(fn, *args)

    monkeypatch.setattr(runtime, "beside", spy)
    return names


async def test_a_lone_jobs_first_slice_and_answer_checks_are_begun_beside_the_loop(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The requester's only job: its first shard's slice of A is hashed beside the event
    loop while the loop hashes B (once: the first attempt takes that description), and the
    answer's hash and signature are begun as it is read. Two jobs at once: only the first
    job's start, alone when it began; nothing of the second, and no answer's checks, since
    both cores have work then."""
    async with one_worker() as (requester, _):
        counts = count_hashing(monkeypatch)
        begun = spy_beside(monkeypatch, requester)
        operands = small_operands()
        result = await requester.submit("matmul", operands, shards=1, max_workers=1)
        assert_product_close(result.output, operands["a"] @ operands["b"])
        assert begun == ["_describe_arrays", "_verify_later"]
        assert counts == {"whole": 6}  # as test_each_operand_is_hashed_once_per_side
        begun.clear()
        async with trio.open_nursery() as nursery:
            for _ in range(2):
                nursery.start_soon(
                    lambda: requester.submit("matmul", small_operands(), shards=1, max_workers=1)
                )
        assert begun == ["_describe_arrays"]
