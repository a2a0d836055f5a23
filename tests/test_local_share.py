"""Operands handed to a worker on the same machine through sealed shared memory (issue 9).

Real memfds, real ``/proc``, a real second process for the cross-process case; the worker's
handler runs unmodified on memnet (its peers share this process, so the requester's
descriptors are this process's), and whole jobs run between real py-libp2p hosts on
loopback, whose lanes say the peers are on one machine.
"""

from __future__ import annotations

import fcntl
import os
import random
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
import trio.testing

from mtor_p2p.compute import client, local_share
from mtor_p2p.compute import worker as worker_module
from mtor_p2p.compute.local_share import (
    MIN_LOCAL_BYTES,
    NOT_LOCAL,
    LocalShareError,
    LocalShares,
    host_token,
    map_shared,
    memfd_name,
    sealed_copy,
)
from mtor_p2p.compute.protocol import (
    PROTOCOL_DOWNLOAD,
    PROTOCOL_DOWNLOAD_LOCAL,
    PROTOCOL_UPLOAD_LOCAL,
)
from mtor_p2p.dashboard.snapshot import node_summary as dashboard_node
from mtor_p2p.memory import RecycledArrays
from mtor_p2p.network import PeerMisbehaved, RemoteError
from mtor_p2p.records.arrays import ArrayMeta, meta_of, pack, pack_gathered, unpack
from mtor_p2p.runtime import Runtime
from tests.conftest import open_networks
from tests.test_compute import devnet
from tests.test_worker_attacks import Bench, bench, ident, job_of

pytestmark = pytest.mark.skipif(not local_share.usable(), reason="needs Linux memfds")

RNG = np.random.default_rng(23)


def view_of(array: np.ndarray) -> memoryview:
    return memoryview(array).cast("B")


DIGEST = "ab" * 32  # the content hash the unit tests' copies are named for
OWNER = "12D3KooWRequester"  # and the requester that made them


def expect_refusal(
    pid: int, fd: int, nbytes: int, reason: str, digest: str = DIGEST, owner: str = OWNER
) -> None:
    with pytest.raises(LocalShareError, match=reason):
        map_shared(pid, fd, nbytes, digest, owner)


def named_memfd(size: int = 4096, *, digest: str = DIGEST, flags: int = 0) -> int:
    """A memfd named as a sealed copy of ``digest`` is, written in full, not yet sealed."""
    fd = os.memfd_create(memfd_name(digest, OWNER), os.MFD_ALLOW_SEALING | flags)
    os.pwrite(fd, b"w" * size, 0)
    return fd


# -- mapping another process's sealed copy -------------------------------------------------


def test_a_sealed_copy_made_in_another_process_maps_read_only_with_its_bytes() -> None:
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from mtor_p2p.compute.local_share import sealed_copy\n"
            f"fd = sealed_copy(memoryview(bytes(range(256)) * 4096), {DIGEST!r}, {OWNER!r})\n"
            "print(fd, flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=str(Path(__file__).resolve().parents[1]),
    )
    try:
        assert child.stdout is not None
        fd = int(child.stdout.readline())
        mapped = map_shared(child.pid, fd, 1 << 20, DIGEST, OWNER)
        assert bytes(mapped) == bytes(range(256)) * 4096
        assert mapped.readonly
        expect_refusal(child.pid, fd, (1 << 20) + 1, "bytes where")
        # Named for another operand, or made by another requester: not the copy this
        # request is about.
        expect_refusal(child.pid, fd, 1 << 20, "not this operand's sealed copy", "cd" * 32)
        expect_refusal(child.pid, fd, 1 << 20, "not this operand's sealed copy", owner="x")
    finally:
        child.kill()
        child.wait()


def test_a_copy_cannot_change_or_shrink_once_sealed() -> None:
    fd = sealed_copy(memoryview(b"x" * 4096), DIGEST, OWNER)
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        assert seals & local_share.REQUIRED_SEALS == local_share.REQUIRED_SEALS
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"y", 0)
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 1)
    finally:
        os.close(fd)


def test_an_unsealed_half_sealed_or_sparse_memfd_is_refused() -> None:
    unsealed = named_memfd()
    half = named_memfd()
    # Sealed, but never written: reading its holes would fill them with the worker's memory.
    sparse = os.memfd_create(memfd_name(DIGEST, OWNER), os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(sparse, 64 << 20)
        fcntl.fcntl(sparse, fcntl.F_ADD_SEALS, local_share.REQUIRED_SEALS)
        # Sealed against resizing only: its bytes could still change after they are hashed.
        fcntl.fcntl(half, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        expect_refusal(os.getpid(), unsealed, 4096, "not sealed")
        expect_refusal(os.getpid(), half, 4096, "not sealed")
        expect_refusal(os.getpid(), sparse, 64 << 20, "not every byte")
    finally:
        for fd in (unsealed, half, sparse):
            os.close(fd)


def test_what_is_not_a_named_memfd_is_refused_before_anything_is_opened(
    tmp_path: Path,
) -> None:
    regular = tmp_path / "operand"
    regular.write_bytes(b"z" * 4096)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    opened = {
        "file": os.open(regular, os.O_RDONLY),
        # Held open non-blocking by this process: opening it again for reading would block
        # a worker's thread if the worker did not check first.
        "fifo": os.open(fifo, os.O_RDONLY | os.O_NONBLOCK),
        "null": os.open("/dev/null", os.O_RDONLY),
        # A memfd, but not one named for this operand (another process's memory).
        "memfd": os.memfd_create("someone-else", os.MFD_ALLOW_SEALING),
    }
    read_end, write_end = os.pipe()
    me = os.getpid()
    try:
        # On a thread with a deadline: a refusal that blocked would fail here, not hang.
        # Every refusal is the same words: the worker's own descriptors are no oracle.
        with ThreadPoolExecutor(1) as pool:
            for fd in (*opened.values(), read_end):
                check = pool.submit(expect_refusal, me, fd, 4096, "not this operand's sealed")
                check.result(timeout=5)
    finally:
        for fd in (*opened.values(), read_end, write_end):
            os.close(fd)


def test_names_that_point_nowhere_are_refused() -> None:
    fd = sealed_copy(memoryview(b"q" * 4096), DIGEST, OWNER)
    try:
        closed = os.dup(fd)
        os.close(closed)
        # The same answer as any descriptor that is not the copy: no oracle.
        expect_refusal(os.getpid(), closed, 4096, "not this operand's sealed copy")
        expect_refusal(2**22 + 7, fd, 4096, "not this operand's sealed copy")  # no process
        expect_refusal(0, fd, 4096, "out of range")
        expect_refusal(os.getpid(), -1, 4096, "out of range")
        expect_refusal(os.getpid(), fd, 0, "out of range")
    finally:
        os.close(fd)


def test_the_host_token_binds_both_peers_and_names_neither_the_machine() -> None:
    token = host_token("requester", "worker")
    assert token == host_token("requester", "worker")
    assert token not in {host_token("worker", "requester"), host_token("requester", "other")}
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert boot not in token and len(token) == 64


# -- the requester's copies ----------------------------------------------------------------


async def counting_runner() -> tuple[Callable[..., Any], list[str]]:
    calls: list[str] = []

    async def run_blocking(fn: Callable[..., Any], *args: Any, **_: Any) -> Any:
        calls.append(fn.__name__)
        await trio.sleep(0.01)  # a thread hop: a second caller arrives meanwhile
        return fn(*args)

    return run_blocking, calls


async def test_one_copy_per_operand_shared_by_callers_and_closed_with_its_last_job() -> None:
    run_blocking, calls = await counting_runner()
    shares = LocalShares(run_blocking, OWNER)
    array = RNG.standard_normal((1024, 1024)).astype("float32")
    meta = meta_of(array)
    got: list[int | None] = []

    async def take(holder: str) -> None:
        got.append(await shares.descriptor(meta, array, holder))

    async with trio.open_nursery() as nursery:
        for holder in ("job 1", "job 2", "job 1"):
            nursery.start_soon(take, holder)
    assert calls == ["_sealed_copy_of"]  # one copy, made on the blocking hook
    assert len(set(got)) == 1 and got[0] is not None
    fd = got[0]
    assert bytes(map_shared(os.getpid(), fd, meta.nbytes, meta.digest, OWNER)) == array.tobytes()
    assert shares.nbytes == meta.nbytes
    shares.release("job 1")
    os.fstat(fd)  # job 2 still uses it
    shares.release("job 2")
    assert shares.nbytes == 0
    with pytest.raises(OSError):
        os.fstat(fd)


async def test_copies_stop_at_their_byte_cap() -> None:
    run_blocking, _ = await counting_runner()
    array = RNG.standard_normal((512, 512)).astype("float32")
    shares = LocalShares(run_blocking, OWNER, max_bytes=array.nbytes)
    assert await shares.descriptor(meta_of(array), array, "job") is not None
    other = array + 1
    assert await shares.descriptor(meta_of(other), other, "job") is None
    shares.close()
    assert shares.nbytes == 0


# -- the worker's handler, as a hostile or honest requester sees it --------------------------


async def share_request(b: Bench, label: str, header: dict[str, Any]) -> dict[str, Any]:
    requester = b.requesters.get(label) or await b.requester(label)
    reply = await requester.network.request(
        b.worker_id, PROTOCOL_UPLOAD_LOCAL, pack(header), timeout=10
    )
    return unpack(reply)[0]


def shared_header(b: Bench, label: str, meta: Any, fd: int, **changes: Any) -> dict[str, Any]:
    """The request an honest requester ``label`` on this machine sends for ``meta``."""
    token = host_token(ident(label).peer_id, b.worker_id)
    header = {"array": meta.to_json(), "host": token, "pid": os.getpid(), "fd": fd}
    header.update(changes)
    return header


@asynccontextmanager
async def sealed(data: bytes | memoryview, digest: str, label: str) -> AsyncIterator[int]:
    """A sealed copy as requester ``label`` makes it."""
    fd = sealed_copy(memoryview(data), digest, ident(label).peer_id)
    try:
        yield fd
    finally:
        os.close(fd)


def big(value: float, rows: int = 2048) -> np.ndarray:
    """An operand of ``rows`` x 1024 float32 (8 MiB at 2048 rows: the smallest shared)."""
    return np.full((rows, 1024), value, dtype="float32")


async def test_a_worker_holds_a_shared_operand_it_hashed_and_refuses_one_that_lies() -> None:
    array = RNG.standard_normal((3072, 1024)).astype("float32")
    meta = meta_of(array)
    async with bench() as b:
        other = array.copy()
        other[5, 5] += 1
        # Named for the operand, holding other bytes: the hash says so.
        async with sealed(view_of(other), meta.digest, "liar") as fd:
            with pytest.raises(RemoteError, match="shared operand refused: hash mismatch"):
                await share_request(b, "liar", shared_header(b, "liar", meta, fd))
        assert meta.digest not in b.worker.operands
        async with sealed(view_of(array), meta.digest, "honest") as fd:
            # Another requester naming the honest one's copy: not its copy to name.
            with pytest.raises(RemoteError, match="not this operand's sealed copy"):
                await share_request(b, "thief", shared_header(b, "thief", meta, fd))
            with pytest.raises(RemoteError, match=f"^{NOT_LOCAL}"):
                # A token made for another pair of peers (or another machine).
                header = shared_header(b, "far", meta, fd, host=host_token("x", b.worker_id))
                await share_request(b, "far", header)
            shorter = meta_of(array[:2048])
            async with sealed(view_of(array), shorter.digest, "honest") as wrong_size:
                with pytest.raises(RemoteError, match=r"shared operand refused: .*bytes where"):
                    header = shared_header(b, "honest", shorter, wrong_size)
                    await share_request(b, "honest", header)
            assert await share_request(b, "honest", shared_header(b, "honest", meta, fd)) == {
                "complete": True,
                "received": meta.nbytes,
            }
        held = b.worker.operands.get(meta.digest)
        assert held is not None and np.array_equal(held, array)
        assert not held.flags.writeable
        assert b.worker.stats.local_uploads == 1
        assert b.worker.stats.uploads_refused == 3
        assert b.worker.reserved_upload_bytes == 0  # reserved while checked, then given back


async def test_malformed_or_unfit_shared_upload_requests_cost_the_sender_a_clear_error() -> None:
    small = RNG.standard_normal((8, 8)).astype("float32")
    array = big(1.0)
    meta = meta_of(array)
    async with bench() as b:
        token = host_token(ident("garbage").peer_id, b.worker_id)
        async with sealed(view_of(array), meta.digest, "garbage") as fd:
            for header, reason in [
                ({"array": meta.to_json(), "host": token, "pid": "1", "fd": 3}, "pid"),
                ({"array": meta.to_json(), "host": token, "pid": 1}, "fd"),
                ({"array": {"dtype": "object"}, "host": token, "pid": 1, "fd": 3}, "described by"),
                (shared_header(b, "garbage", meta, 10**9), "out of range"),
                (shared_header(b, "garbage", meta, fd, pid=-5), "out of range"),
                (shared_header(b, "garbage", meta_of(small), fd), "too small to share"),
            ]:
                with pytest.raises(RemoteError, match=reason):
                    await share_request(b, "garbage", header)
            b.worker.operands.max_bytes = meta.nbytes - 1
            with pytest.raises(RemoteError, match="larger than this worker's operand cache"):
                await share_request(b, "garbage", shared_header(b, "garbage", meta, fd))
        assert b.worker.operands.nbytes == 0


async def test_shared_operands_checked_at_once_are_bounded_per_sender(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gate = trio.Event()

    async def gated(fn: Callable[..., Any], *args: Any, **_: Any) -> Any:
        await gate.wait()  # every check in progress waits here until the test lets it go
        return fn(*args)

    runtime = Runtime(run_blocking=gated, random=random.Random(1), seeded=True)
    arrays = [big(float(i)) for i in range(3)]
    fds = [sealed_copy(view_of(a), meta_of(a).digest, ident("eager").peer_id) for a in arrays]
    outcomes: list[str] = []
    try:
        async with bench(runtime=runtime) as b:

            async def send(array: np.ndarray, fd: int) -> None:
                try:
                    await share_request(b, "eager", shared_header(b, "eager", meta_of(array), fd))
                    outcomes.append("held")
                except RemoteError as exc:
                    outcomes.append(str(exc))

            await b.requester("eager")
            async with trio.open_nursery() as nursery:
                for array, fd in zip(arrays, fds, strict=True):
                    nursery.start_soon(send, array, fd)
                    await trio.sleep(0.01)
                with trio.fail_after(5):
                    while not outcomes:
                        await trio.sleep(0.01)
                # Two checks wait at the gate; the third was refused without waiting. The
                # two in progress are reserved as uploads are.
                assert outcomes == ["busy: too many shared operands being checked"]
                assert b.worker.reserved_upload_bytes == 2 * arrays[0].nbytes
                gate.set()
            assert (
                sorted(outcomes) == ["busy: too many shared operands being checked"] + ["held"] * 2
            )
            assert b.worker.operands.nbytes == 2 * arrays[0].nbytes
            assert b.worker.reserved_upload_bytes == 0
    finally:
        for fd in fds:
            os.close(fd)


# -- whole jobs between real hosts on loopback --------------------------------------------


def requester_and_worker(nodes: list[Any]) -> tuple[Any, Any]:
    """The devnet's second node dialled the first: it is the requester (a requester counts
    only connections it made as being on this machine, until its lane is open)."""
    return nodes[1][0], nodes[0][0]


async def test_a_job_between_hosts_on_one_machine_shares_its_large_operand(
    tmp_path: Path,
) -> None:
    a = RNG.standard_normal((64, 2048)).astype("float32")
    b = RNG.standard_normal((2048, 1280)).astype("float32")  # 10 MiB: over MIN_LOCAL_BYTES
    assert b.nbytes >= MIN_LOCAL_BYTES
    async with devnet(tmp_path, count=2) as nodes:
        requester, worker = requester_and_worker(nodes)
        result = await requester.submit("matmul", {"a": a, "b": b}, shards=1, max_workers=1)
        np.testing.assert_allclose(result.output, a @ b, rtol=1e-4, atol=1e-3)
        assert worker.worker.stats.local_uploads == 1
        assert worker.worker.stats.bytes_shared == b.nbytes
        # The job says so too (what `submit` prints): B only, A is under the threshold.
        assert (result.shared_operands, result.shared_bytes) == (1, b.nbytes)
        assert result.summary()["shared_memory"] == {
            "operands": 1,
            "bytes": b.nbytes,
            "outputs": 0,  # its output came in the run's answer
            "output_bytes": 0,
        }
        # And the worker's dashboard.
        shown = dashboard_node(worker, worker.clock.now())
        assert (shown["operands_shared"], shown["bytes_shared"]) == (1, b.nbytes)
        assert worker.peer_id not in requester.scheduler.local_shares.refused
        # The job is over: its sealed copy is closed, the worker still holds the operand.
        assert requester.scheduler.local_shares.nbytes == 0
        assert meta_of(b).digest in worker.worker.operands


async def test_a_worker_that_takes_no_shared_memory_gets_chunks(tmp_path: Path) -> None:
    """A worker elsewhere, or one whose operator turned the path off, answers NOT_LOCAL: the
    requester uploads in chunks and never asks that worker again."""
    a = RNG.standard_normal((64, 2048)).astype("float32")
    b = RNG.standard_normal((2048, 1280)).astype("float32")
    # The worker's operator turned the path off (its config's shared_memory): it answers as
    # a worker on another machine does.
    async with devnet(tmp_path, count=2, **{"0": {"shared_memory": False}}) as nodes:
        requester, worker = requester_and_worker(nodes)
        assert not worker.worker.local_uploads
        result = await requester.submit("matmul", {"a": a, "b": b}, shards=1, max_workers=1)
        np.testing.assert_allclose(result.output, a @ b, rtol=1e-4, atol=1e-3)
        assert worker.worker.stats.local_uploads == 0
        assert worker.worker.stats.bytes_received >= b.nbytes
        assert result.summary()["shared_memory"]["operands"] == 0
        assert worker.peer_id in requester.scheduler.local_shares.refused
        # Never asked again: the next large operand goes in chunks at once.
        before = worker.worker.stats.uploads_refused
        c = RNG.standard_normal((2048, 1280)).astype("float32")
        await requester.submit("matmul", {"a": a, "b": c}, shards=1, max_workers=1)
        assert worker.worker.stats.uploads_refused == before


async def test_only_connections_a_peer_dialled_say_the_other_is_on_this_machine() -> None:
    # A peer reaching us through an ngrok agent arrives from 127.0.0.1 too: an inbound
    # connection proves nothing, so only the side that dialled counts it (until a lane opens).
    async with open_networks(2) as (first, second):
        assert second.same_host(first.peer_id)  # second dialled first, on loopback
        assert not first.same_host(second.peer_id)
        assert not first.same_host("not a peer id")


async def test_a_worker_that_failed_to_answer_is_asked_again_later(
    autojump_clock: trio.testing.MockClock,
) -> None:
    run_blocking, _ = await counting_runner()
    shares = LocalShares(run_blocking, OWNER)
    meta = meta_of(big(2.0))
    shares.refuse("old worker", for_good=False)
    shares.refuse("elsewhere", for_good=True)
    assert not shares.wanted("old worker", meta) and not shares.wanted("elsewhere", meta)
    await trio.sleep(local_share.RETRY_AFTER_S)
    assert shares.wanted("old worker", meta)
    assert not shares.wanted("elsewhere", meta)


def test_only_plain_memfds_are_on_the_memfd_mount(tmp_path: Path) -> None:
    # What lets the worker refuse a file that only reads like a memfd (one named
    # "memfd:mtor-..." on a lazily unmounted file system) without asking its file system.
    memfd = os.memfd_create("any", 0)
    regular = os.open(tmp_path / "file", os.O_CREAT | os.O_RDWR)
    try:
        assert local_share._mount_id(memfd) == local_share._MEMFD_MOUNT is not None
        assert local_share._mount_id(regular) != local_share._MEMFD_MOUNT
    finally:
        os.close(memfd)
        os.close(regular)


async def test_the_workers_remembered_as_refusing_are_bounded() -> None:
    run_blocking, _ = await counting_runner()
    shares = LocalShares(run_blocking, OWNER)
    for index in range(local_share.MAX_REFUSED + 10):
        shares.refuse(f"worker {index}", for_good=True)
    assert len(shares.refused) == local_share.MAX_REFUSED
    assert f"worker {local_share.MAX_REFUSED + 9}" in shares.refused
    assert "worker 0" not in shares.refused  # the oldest went first


# -- outputs taken from a worker's sealed copy --------------------------------------------


def fd_count() -> int:
    """Descriptors this process has open."""
    return len(os.listdir("/proc/self/fd"))


def fd_names(fd: int) -> str | None:
    """What this process's descriptor ``fd`` is (None: closed)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def memfd_mapping_names(start: int, nbytes: int) -> list[str]:
    """The names of this process's mappings of MTOR's memfds that begin in the range."""
    found = []
    with open("/proc/self/maps", encoding="ascii") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            low = int(fields[0].split("-")[0], 16)
            if start <= low < start + nbytes and "/memfd:mtor-" in line:
                found.append(fields[5].strip())
    return found


def memfd_mappings(start: int, nbytes: int) -> list[tuple[str, int]]:
    """The permissions and sizes of this process's mappings of MTOR's memfds that begin in
    ``[start, start + nbytes)``."""
    found = []
    with open("/proc/self/maps", encoding="ascii") as maps:
        for line in maps:
            span, perms = line.split()[:2]
            low, high = (int(x, 16) for x in span.split("-"))
            if start <= low < start + nbytes and "/memfd:mtor-" in line:
                found.append((perms, high - low))
    return found


async def output_request(b: Bench, label: str, digest: str, **changes: Any) -> dict[str, Any]:
    requester = b.requesters.get(label) or await b.requester(label)
    header = {"hash": digest, "host": host_token(requester.peer_id, b.worker_id), **changes}
    reply = await requester.network.request(
        b.worker_id, PROTOCOL_DOWNLOAD_LOCAL, pack(header), timeout=10
    )
    return unpack(reply)[0]


async def test_a_worker_shares_an_output_once_and_only_with_the_requester_whose_run_made_it(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An 8 MiB output: too large for the run's answer, large enough to share.
    operands = {
        "a": RNG.standard_normal((2048, 256)).astype("float32"),
        "b": RNG.standard_normal((256, 1024)).astype("float32"),
    }
    async with bench() as b:
        owner = await b.requester("owner")
        await client.ensure_operands(owner.network, b.worker_id, operands, timeout=10)
        answer = await client.run_shard(
            owner.network,
            b.worker_id,
            job_id=job_of(owner),
            shard=0,
            kernel="matmul",
            operands=operands,
            timeout=10,
            transfer_timeout=10,
        )
        digest = answer.receipt.body.output
        stored = b.worker.operands.get(digest)
        assert stored is not None and stored.nbytes >= MIN_LOCAL_BYTES
        meta = meta_of(stored)
        held_bytes = b.worker.operands.nbytes
        del stored
        with pytest.raises(RemoteError, match="no such output"):
            await output_request(b, "thief", digest)  # not its run
        with pytest.raises(RemoteError, match="no such output"):
            await output_request(b, "owner", "cd" * 32)
        with pytest.raises(RemoteError, match=f"^{NOT_LOCAL}"):
            await output_request(b, "owner", digest, host=host_token("x", b.worker_id))
        with pytest.raises(RemoteError, match="field 'host'"):
            await output_request(b, "owner", digest, host=7)
        with monkeypatch.context() as patch:  # as many sealed copies open as it holds
            patch.setattr(worker_module, "MAX_OPEN_COPIES_PER_SENDER", 0)
            with pytest.raises(RemoteError, match=r"^busy: .*download it"):
                await output_request(b, "owner", digest)
        assert b.worker.reserved_upload_bytes == 0
        fds_before = fd_count()
        first = await output_request(b, "owner", digest)
        assert first["pid"] == os.getpid()
        # The store holds the sealed copy in the output's place: no second copy is kept.
        assert b.worker.operands.nbytes == held_bytes
        assert b.worker.reserved_upload_bytes == 0
        assert await output_request(b, "owner", digest) == first  # made once
        assert b.worker.stats.outputs_shared == 2
        assert fd_names(first["fd"]) == f"/memfd:{memfd_name(digest, b.worker_id)} (deleted)"
        data, got, mapped = local_share.take_shared_output(
            first["pid"], first["fd"], meta, b.worker_id, None, False
        )
        assert got == digest and not mapped
        np.testing.assert_array_equal(np.frombuffer(data, "float32"), answer.output.ravel())
        # A chunked download still serves it (a requester elsewhere, or one that cannot map).
        again = await client.download(owner.network, b.worker_id, meta, timeout=10)
        np.testing.assert_array_equal(again, answer.output)
        # Its descriptor is closed once its grace is over; the store keeps the copy's pages
        # (chunks still served, and no descriptor held for them), and a later ask makes a new
        # copy of them, though not at once (each copy costs the worker a copy of the output).
        await trio.sleep(worker_module.SHARED_OUTPUT_GRACE_S + worker_module.HOUSEKEEPING_INTERVAL)
        assert fd_names(first["fd"]) is None and b.worker.open_output_copies == 0
        again = await client.download(owner.network, b.worker_id, meta, timeout=10)
        np.testing.assert_array_equal(again, answer.output)
        assert fd_count() == fds_before
        with pytest.raises(RemoteError, match=r"^busy: this output was shared a moment ago"):
            await output_request(b, "owner", digest)
        await trio.sleep(worker_module.RESEAL_AFTER_S)
        second = await output_request(b, "owner", digest)
        assert b.worker.open_output_copies == 1
        assert fd_names(second["fd"]) == f"/memfd:{memfd_name(digest, b.worker_id)} (deleted)"
        # And at once when the store drops the output.
        b.worker.operands.discard(digest)
        await trio.sleep(worker_module.HOUSEKEEPING_INTERVAL)
        assert fd_names(second["fd"]) is None and b.worker.open_output_copies == 0
        b.worker.local_uploads = False  # the operator turned shared memory off
        with pytest.raises(RemoteError, match=f"^{NOT_LOCAL}"):
            await output_request(b, "owner", digest)


async def test_copies_open_for_a_requester_are_bounded_and_lapse_so_its_next_jobs_share_again(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One open copy per requester here (32 by default): the second output is refused while
    # the first's descriptor is open, and shared once that one's grace is over (a review
    # found copies counted for as long as the store kept them: a requester's later jobs got
    # none).
    monkeypatch.setattr(worker_module, "MAX_OPEN_COPIES_PER_SENDER", 1)
    b_operand = RNG.standard_normal((256, 1024)).astype("float32")
    async with bench() as b:
        owner = await b.requester("owner")
        digests = []
        for shard in range(2):
            operands = {"a": RNG.standard_normal((2048, 256)).astype("float32"), "b": b_operand}
            await client.ensure_operands(owner.network, b.worker_id, operands, timeout=10)
            answer = await client.run_shard(
                owner.network, b.worker_id, job_id=job_of(owner), shard=shard, kernel="matmul",
                operands=operands, timeout=10, transfer_timeout=10,
            )  # fmt: skip
            digests.append(answer.receipt.body.output)
        first = await output_request(b, "owner", digests[0])
        with pytest.raises(RemoteError, match=r"^busy: too many outputs being shared"):
            await output_request(b, "owner", digests[1])
        # Half a second on, at its cap, its oldest copy is closed to make room (it had time to
        # open it), though that copy's grace is not over.
        await trio.sleep(worker_module.SHARED_OUTPUT_MIN_OPEN_S)
        assert worker_module.SHARED_OUTPUT_MIN_OPEN_S < worker_module.SHARED_OUTPUT_GRACE_S
        second = await output_request(b, "owner", digests[1])
        assert fd_names(first["fd"]) is None or first["fd"] == second["fd"]
        assert b.worker.open_output_copies == 1


async def test_an_output_stored_again_while_it_was_copied_is_not_answered_with_a_dying_copy(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The store dropped the output while it was moved into a sealed copy, and a run stored
    the same bytes again: that copy never takes the new array's place, so its descriptor
    would close as the handler returns. The worker says busy (the requester downloads), not a
    descriptor about to close (which would cost an honest worker its shared outputs)."""
    gate = trio.Event()
    sealing = trio.Event()

    async def gated(fn: Callable[..., Any], *args: Any, **_: Any) -> Any:
        if fn is local_share.sealed_output:
            sealing.set()
            await gate.wait()
        return fn(*args)

    runtime = Runtime(run_blocking=gated, random=random.Random(1), seeded=True)
    operands = {
        "a": RNG.standard_normal((2048, 256)).astype("float32"),
        "b": RNG.standard_normal((256, 1024)).astype("float32"),
    }
    async with bench(runtime=runtime) as b:
        owner = await b.requester("owner")
        await client.ensure_operands(owner.network, b.worker_id, operands, timeout=10)
        answer = await client.run_shard(
            owner.network, b.worker_id, job_id=job_of(owner), shard=0, kernel="matmul",
            operands=operands, timeout=10, transfer_timeout=10,
        )  # fmt: skip
        digest = answer.receipt.body.output
        outcome: list[str] = []

        async def ask() -> None:
            try:
                outcome.append(str(await output_request(b, "owner", digest)))
            except RemoteError as exc:
                outcome.append(str(exc))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask)
            await sealing.wait()
            stored = b.worker.operands.get(digest)
            assert stored is not None
            b.worker.operands.discard(digest)
            b.worker.operands.put(stored.copy(), digest)  # the same bytes, another array
            gate.set()
        assert outcome == ["busy: the output was stored again meanwhile; download it"]
        assert b.worker.open_output_copies == 0
        assert b.worker.reserved_upload_bytes == 0


async def shared_download(
    peers: tuple[Any, Any, LocalShares], meta: ArrayMeta, out: np.ndarray, **options: Any
) -> np.ndarray:
    """``client.download`` of ``meta`` into ``out`` as a requester with shared memory does,
    between the peers :func:`fake_worker` gives."""
    requester, worker, local = peers
    return await client.download(
        requester,
        worker.peer_id,
        meta,
        timeout=10,
        out=out,
        run_blocking=local._run_blocking,
        local=local,
        **options,
    )


@asynccontextmanager
async def fake_worker(
    answer: Callable[[ArrayMeta], dict[str, Any]], output: np.ndarray
) -> AsyncIterator[tuple[Any, Any, LocalShares]]:
    """A requester's network and a worker that answers shared downloads with ``answer(meta)``
    and serves ``output`` honestly in chunks; the requester takes memnet's peers as being on
    its machine."""
    from mtor_p2p.memnet import MemWorld

    world = MemWorld(seed=3)
    worker = world.add_peer(ident("fake worker"))
    requester = world.add_peer(ident("requester"))
    meta = meta_of(output)

    async def on_local(sender: str, request: bytes) -> bytes:
        return pack(answer(meta))

    async def on_download(sender: str, request: bytes) -> Any:
        header, _ = unpack(request)
        start, length = header["offset"], header["length"]
        chunk = view_of(output)[start : start + length]
        return pack_gathered({"total": output.nbytes}, [bytes(chunk)])

    worker.handle(PROTOCOL_DOWNLOAD_LOCAL, on_local, max_request_bytes=4096)
    worker.handle(PROTOCOL_DOWNLOAD, on_download, max_request_bytes=4096)
    await requester.connect(worker.addrs()[0])
    requester.same_host = lambda peer: True  # type: ignore[method-assign]
    run_blocking, _ = await counting_runner()
    yield requester, worker, LocalShares(run_blocking, requester.peer_id)


async def test_a_shared_output_is_checked_like_a_download_and_one_not_there_is_downloaded(
    autojump_clock: trio.testing.MockClock,
) -> None:
    output = RNG.standard_normal((2048, 1024)).astype("float32")
    meta = meta_of(output)
    other = output.copy()
    other[7, 7] += 1
    worker_id = ident("fake worker").peer_id
    # Named as the worker's copy of that output, holding other bytes: its fault.
    liar = local_share.sealed_copy(view_of(other), meta.digest, worker_id)
    honest = local_share.sealed_copy(view_of(output), meta.digest, worker_id)
    try:
        for answer, outcome in [
            (lambda m: {"pid": os.getpid(), "fd": liar}, "hash mismatch"),
            (lambda m: {"pid": "me", "fd": liar}, "field 'pid'"),
            # Not its copy (a descriptor of this process that is no memfd of it): downloaded.
            (lambda m: {"pid": os.getpid(), "fd": 0}, "downloaded"),
            (lambda m: {"pid": os.getpid(), "fd": honest}, "shared"),
        ]:
            async with fake_worker(answer, output) as (requester, worker, local):
                target = np.empty_like(output)
                peers = (requester, worker, local)
                if outcome in ("downloaded", "shared"):
                    got = await shared_download(peers, meta, target, holder="job")
                    np.testing.assert_array_equal(got, output)
                    assert np.shares_memory(got, target)
                    taken = local.taken("job")
                    assert taken == ((1, meta.nbytes) if outcome == "shared" else (0, 0))
                    assert local.output_wanted(worker.peer_id, meta) == (outcome == "shared")
                else:
                    with pytest.raises(PeerMisbehaved, match=outcome):
                        await shared_download(peers, meta, target)
    finally:
        os.close(liar)
        os.close(honest)


async def test_a_lying_copy_mapped_in_place_is_unmapped_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A copy whose hash is not the announced one leaves no mapping behind in the rows: the
    liar's pages are not kept alive by rows the next attempt writes again."""
    output = RNG.standard_normal((2048, 1024)).astype("float32")
    meta = meta_of(output)
    other = output.copy()
    other[9, 9] += 1
    liar = local_share.sealed_copy(view_of(other), meta.digest, ident("fake worker").peer_id)
    rows = RecycledArrays(min_bytes=1 << 20).empty(output.shape, output.dtype)
    try:
        async with fake_worker(lambda m: {"pid": os.getpid(), "fd": liar}, output) as peers:
            mapped: list[bool] = []
            with pytest.raises(PeerMisbehaved, match="hash mismatch"):
                await shared_download(
                    peers, meta, rows, in_place=True, on_mapped=lambda: mapped.append(True)
                )
            assert mapped == []
            assert memfd_mappings(rows.ctypes.data, rows.nbytes) == []
            rows[:] = output  # fresh pages of the rows' own, writable
            # The honest copy is mapped, and said to be.
            honest = local_share.sealed_copy(
                view_of(output), meta.digest, ident("fake worker").peer_id
            )
            try:
                async with fake_worker(lambda m: {"pid": os.getpid(), "fd": honest}, output) as p2:
                    await shared_download(
                        p2, meta, rows, in_place=True, on_mapped=lambda: mapped.append(True)
                    )
            finally:
                os.close(honest)
            assert mapped == [True]
            assert [perms for perms, _ in memfd_mappings(rows.ctypes.data, rows.nbytes)] == ["rw-p"]
            assert local_share.fresh_pages(rows)
            assert memfd_mappings(rows.ctypes.data, rows.nbytes) == []
    finally:
        os.close(liar)


async def test_rows_a_rejected_answer_was_mapped_into_are_freed_before_the_next_attempt(
    tmp_path: Path,
) -> None:
    # Node 0 corrupts every output (its copies pass their hash and fail Freivalds' check);
    # node 1 is honest and shares nothing, so its answers are written into the rows (chunks).
    # Whatever node 0's copies were mapped into is given fresh pages before that: the job's
    # output holds no page of node 0's (written over in place, each page would have stayed
    # beside its new copy until the output is dropped).
    a = RNG.standard_normal((8192, 256)).astype("float32")
    b = RNG.standard_normal((256, 1024)).astype("float32")
    changes = {"0": {"fault_rate": 1.0}, "1": {"shared_memory": False}}
    async with devnet(tmp_path, count=3, **changes) as nodes:
        _, honest, requester = (node for node, _ in nodes)
        result = await requester.submit("matmul", {"a": a, "b": b}, shards=2, max_workers=2)
        np.testing.assert_allclose(result.output, a @ b, rtol=1e-4, atol=1e-3)
        assert result.rejected >= 1 and result.workers == [honest.peer_id]
        assert result.summary()["shared_memory"]["outputs"] >= 1  # the liar's, mapped
        assert memfd_mapping_names(result.output.ctypes.data, result.output.nbytes) == []


async def test_a_job_between_hosts_on_one_machine_maps_large_outputs_into_its_rows(
    tmp_path: Path,
) -> None:
    # Two shards of 16 MiB output each, into a 32 MiB job output (memory of the job's own:
    # mtor_p2p.memory.RECYCLED), so that each worker's sealed copy is mapped over its rows.
    a = RNG.standard_normal((8192, 256)).astype("float32")
    b = RNG.standard_normal((256, 1024)).astype("float32")
    async with devnet(tmp_path, count=2) as nodes:
        requester, worker = requester_and_worker(nodes)
        result = await requester.submit("matmul", {"a": a, "b": b}, shards=2, max_workers=1)
        np.testing.assert_allclose(result.output, a @ b, rtol=1e-4, atol=1e-3)
        output_bytes = result.output.nbytes
        assert result.summary()["shared_memory"]["outputs"] == 2
        assert result.summary()["shared_memory"]["output_bytes"] == output_bytes
        assert worker.worker.stats.outputs_shared == 2
        shown = dashboard_node(worker, worker.clock.now())
        assert (shown["outputs_shared"], shown["output_bytes_shared"]) == (2, output_bytes)
        # The rows are private mappings of the worker's copies (no byte copied), and still
        # the requester's to write (a write copies that page only).
        mapped = memfd_mappings(result.output.ctypes.data, output_bytes)
        assert {perms for perms, _ in mapped} == {"rw-p"}
        assert sum(size for _, size in mapped) == output_bytes
        expected = a[:4] @ b
        result.output[:4] = 0
        np.testing.assert_array_equal(result.output[:4], 0)
        result.output[:4] = expected
        # The worker can no longer change them: its copies are sealed, ours private.
        np.testing.assert_allclose(result.output, a @ b, rtol=1e-4, atol=1e-3)
