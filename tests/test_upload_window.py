"""Uploads with several chunks in flight (issue 9, the data plane).

A requester sends an upload's first chunk alone; the worker's reply names its ``window``, and
up to that many chunks (at most ``UPLOAD_CHUNKS_IN_FLIGHT``) then travel at once, each handed
to the transport before the next. The worker holds a chunk that came ahead of its turn until
the chunks before it are taken, within the window and for at most ``UPLOAD_AHEAD_WAIT``; any
other disorder ends the upload as before. A worker from before windows gets one chunk at a
time. Everything runs on memnet under ``MockClock``: the times asserted are virtual.
"""

from __future__ import annotations

import numpy as np
import pytest
import trio
import trio.testing

from mtor_p2p.compute import client
from mtor_p2p.compute.protocol import CHUNK_BYTES, MAX_MESSAGE_BYTES, PROTOCOL_UPLOAD
from mtor_p2p.compute.worker import (
    MAX_AHEAD_CHUNKS_PER_SENDER,
    UPLOAD_AHEAD_WAIT,
    UPLOAD_WINDOW_CHUNKS,
)
from mtor_p2p.identity import Identity
from mtor_p2p.memnet import LatencyModel, LinkProfile, MemWorld
from mtor_p2p.network import RemoteError
from mtor_p2p.records.arrays import meta_of, pack, unpack
from mtor_p2p.runtime import Runtime
from tests.test_worker_attacks import Requester, bench

RNG = np.random.default_rng(29)


def operand(chunks: float) -> np.ndarray:
    """A float32 array of ``chunks`` upload chunks."""
    return RNG.standard_normal(int(chunks * CHUNK_BYTES) // 4).astype("float32")


def chunk_message(array: np.ndarray, offset: int, length: int = CHUNK_BYTES) -> bytes:
    """An upload request carrying ``array``'s bytes from ``offset``."""
    data = memoryview(array).cast("B")[offset : offset + length]
    return pack({"array": meta_of(array).to_json(), "offset": offset}, data)


async def test_a_chunk_ahead_of_its_turn_waits_for_the_one_before(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Chunk 2 sent before chunk 1 (as on two streams) is held, then stored in order: the
    upload completes with the right bytes, and the reply to chunk 2 says where it ends."""
    async with bench() as b:
        alice = await b.requester("alice")
        array = operand(3)
        meta = meta_of(array)
        reply = unpack(await alice.network.request(b.worker_id, PROTOCOL_UPLOAD,
                                                    chunk_message(array, 0)))[0]  # fmt: skip
        assert reply == {"complete": False, "received": CHUNK_BYTES, "window": UPLOAD_WINDOW_CHUNKS}
        replies: dict[int, dict] = {}

        async def send(offset: int) -> None:
            message = chunk_message(array, offset)
            replies[offset] = unpack(await alice.network.request(b.worker_id, PROTOCOL_UPLOAD,
                                                                 message))[0]  # fmt: skip

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send, 2 * CHUNK_BYTES)
            await trio.sleep(1.0)  # chunk 2 waits at the worker
            (pending,) = b.worker._pending.values()
            assert pending.ahead == {2 * CHUNK_BYTES} and 2 * CHUNK_BYTES not in replies
            nursery.start_soon(send, CHUNK_BYTES)
        assert replies[CHUNK_BYTES] == {"complete": False, "received": 2 * CHUNK_BYTES,
                                        "window": UPLOAD_WINDOW_CHUNKS}  # fmt: skip
        assert replies[2 * CHUNK_BYTES]["complete"] is True
        np.testing.assert_array_equal(b.worker.operands.get(meta.digest), array)
        assert b.worker.reserved_upload_bytes == 0


async def test_disorder_beyond_the_window_ends_the_upload_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A chunk further ahead than the window, one ahead but not a whole chunk (or at no whole
    chunk's offset), a second chunk waiting for the same turn, a chunk behind: each ends the
    upload at once and gives its reservation back."""
    async with bench() as b:
        alice = await b.requester("alice")
        array = operand(4)
        far = (UPLOAD_WINDOW_CHUNKS + 1) * CHUNK_BYTES  # one chunk past what may wait
        short = chunk_message(array, 2 * CHUNK_BYTES, length=8)
        odd = chunk_message(array, 2 * CHUNK_BYTES - 4)
        for bad in (far, short, odd, "twice", "behind"):
            await alice.network.request(b.worker_id, PROTOCOL_UPLOAD, chunk_message(array, 0))
            start = trio.current_time()
            if bad == "twice":
                ahead = chunk_message(array, 2 * CHUNK_BYTES)
                first = await refused_while_another_waits(alice, b.worker_id, ahead)
                assert "dropped" in first  # the chunk that waited is let go too
            elif bad == "behind":
                second = chunk_message(array, CHUNK_BYTES)
                await alice.network.request(b.worker_id, PROTOCOL_UPLOAD, second)
                with pytest.raises(RemoteError, match="in order"):
                    await alice.network.request(b.worker_id, PROTOCOL_UPLOAD, second)
            elif isinstance(bad, bytes):
                with pytest.raises(RemoteError, match="in order"):
                    await alice.network.request(b.worker_id, PROTOCOL_UPLOAD, bad)
            else:
                with pytest.raises(RemoteError, match="in order"):
                    await alice.network.request(b.worker_id, PROTOCOL_UPLOAD,
                                                chunk_message(array, bad))  # fmt: skip
            assert trio.current_time() - start < 1.0
            assert b.worker.reserved_upload_bytes == 0 and not b.worker._pending


async def refused_while_another_waits(requester: Requester, worker: str, ahead: bytes) -> str:
    """Send ``ahead`` twice, the second while the first waits for its turn; the second must
    be refused "in order". Return what the first was answered."""
    first: list[str] = []

    async def waiting() -> None:
        try:
            await requester.network.request(worker, PROTOCOL_UPLOAD, ahead)
        except RemoteError as exc:
            first.append(str(exc))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiting)
        await trio.sleep(0.5)
        with pytest.raises(RemoteError, match="in order"):
            await requester.network.request(worker, PROTOCOL_UPLOAD, ahead)
    assert first
    return first[0]


async def test_a_sender_holds_few_chunks_waiting_in_all(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Each of many uploads may hold one chunk waiting for its turn, but one sender holds at
    most MAX_AHEAD_CHUNKS_PER_SENDER at once: the next is refused at once as "busy" (the
    sender's own concurrency, not the worker's fault; its upload ends), so a peer cannot pin
    the worker's handlers with chunks that wait."""
    async with bench() as b:
        alice = await b.requester("alice")
        arrays = [operand(3) for _ in range(MAX_AHEAD_CHUNKS_PER_SENDER + 1)]
        for array in arrays:
            await alice.network.request(b.worker_id, PROTOCOL_UPLOAD, chunk_message(array, 0))
        answers: list[str] = []

        async def ahead(array: np.ndarray) -> None:
            try:
                message = chunk_message(array, 2 * CHUNK_BYTES)
                await alice.network.request(b.worker_id, PROTOCOL_UPLOAD, message)
            except RemoteError as exc:
                answers.append(str(exc))

        async with trio.open_nursery() as nursery:
            for array in arrays[:-1]:
                nursery.start_soon(ahead, array)
            await trio.sleep(0.5)
            assert b.worker._ahead_by_sender == {alice.peer_id: MAX_AHEAD_CHUNKS_PER_SENDER}
            start = trio.current_time()
            with pytest.raises(RemoteError, match=r"^busy: too many upload chunks waiting"):
                message = chunk_message(arrays[-1], 2 * CHUNK_BYTES)
                await alice.network.request(b.worker_id, PROTOCOL_UPLOAD, message)
            assert trio.current_time() - start < 0.5
        assert len(answers) == MAX_AHEAD_CHUNKS_PER_SENDER  # the waiting ones: turn never came
        assert b.worker._ahead_by_sender == {}


async def test_an_upload_started_again_at_offset_zero_is_a_fresh_upload(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A sender whose upload failed midway (a chunk refused "busy", a reply lost) starts again
    at offset 0: the worker takes that as a new upload rather than a chunk out of order."""
    async with bench() as b:
        alice = await b.requester("alice")
        array = operand(3)
        for offset in (0, CHUNK_BYTES):
            await alice.network.request(b.worker_id, PROTOCOL_UPLOAD, chunk_message(array, offset))
        await client.upload(alice.network, b.worker_id, array, timeout=30)
        np.testing.assert_array_equal(b.worker.operands.get(meta_of(array).digest), array)
        assert b.worker.reserved_upload_bytes == 0


async def test_a_chunk_cancelled_after_taking_its_place_ends_the_upload(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A chunk's handler cancelled after it took its offset, while queued behind the chunk
    before it (a review's finding): the upload ends, so the next chunk is not written in its
    place, and the sender hears so."""
    async with bench() as b:
        worker = b.worker

        async def slow(fn: object, *args: object, **kw: object) -> object:
            await trio.sleep(1)
            return fn(*args)  # type: ignore[operator]

        worker._runtime = Runtime(run_blocking=slow, random=worker._runtime.random, seeded=True)
        array = operand(3)
        answers: dict[int, object] = {}

        async def send(offset: int) -> None:
            try:
                reply = await worker._on_upload("peer", chunk_message(array, offset))
                answers[offset] = unpack(reply)[0]
            except RemoteError as exc:
                answers[offset] = str(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send, 0)
            await trio.sleep(0.1)  # chunk 0 is being written
            doomed = trio.CancelScope()

            async def cancelled_chunk() -> None:
                with doomed:
                    await send(CHUNK_BYTES)

            nursery.start_soon(cancelled_chunk)
            await trio.sleep(0.1)  # chunk 1 took its offset and waits for the lock
            doomed.cancel()
            await trio.sleep(0.1)
            nursery.start_soon(send, 2 * CHUNK_BYTES)
        assert CHUNK_BYTES not in answers
        assert "offset 0" in str(answers[2 * CHUNK_BYTES])  # the upload is gone
        assert not worker._pending and worker.reserved_upload_bytes == 0
        assert meta_of(array).digest not in worker.operands


async def test_a_turn_that_never_comes_ends_the_upload_after_the_wait(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The chunk before a waiting one never arrives: after UPLOAD_AHEAD_WAIT the waiting chunk
    is refused and the upload ends; nothing is stored and the reservation is given back."""
    async with bench() as b:
        alice = await b.requester("alice")
        array = operand(3)
        await alice.network.request(b.worker_id, PROTOCOL_UPLOAD, chunk_message(array, 0))
        start = trio.current_time()
        with pytest.raises(RemoteError, match=r"^busy: .* did not come within"):
            await alice.network.request(b.worker_id, PROTOCOL_UPLOAD,
                                        chunk_message(array, 2 * CHUNK_BYTES))  # fmt: skip
        assert UPLOAD_AHEAD_WAIT <= trio.current_time() - start < UPLOAD_AHEAD_WAIT + 1
        assert b.worker.reserved_upload_bytes == 0 and not b.worker._pending
        assert meta_of(array).digest not in b.worker.operands


async def test_a_waiting_chunk_of_a_dropped_upload_is_refused_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An upload dropped (here: a chunk with another description) while a chunk waits for its
    turn: the waiting chunk is answered at once, not after the whole wait."""
    async with bench() as b:
        alice = await b.requester("alice")
        array = operand(3)
        await alice.network.request(b.worker_id, PROTOCOL_UPLOAD, chunk_message(array, 0))
        outcome: list[str] = []

        async def wait_ahead() -> None:
            try:
                await alice.network.request(b.worker_id, PROTOCOL_UPLOAD,
                                            chunk_message(array, 2 * CHUNK_BYTES))  # fmt: skip
            except RemoteError as exc:
                outcome.append(str(exc))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait_ahead)
            await trio.sleep(0.5)
            (key,) = b.worker._pending
            b.worker._drop_upload(key)  # as an eviction or expiry would
            start = trio.current_time()
        assert trio.current_time() - start < 0.5
        assert outcome and "dropped" in outcome[0]


async def test_the_client_keeps_chunks_in_flight_and_saves_round_trips_on_a_long_path(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Over a 100 ms round trip and a 50 MiB/s uplink, a 64 MiB upload one chunk at a time
    pays a round trip per chunk (16 x (0.1 + 0.08) s). With two in flight, each chunk leaves
    once the one before it is handed to the transport, which memnet models as its arrival
    at the worker (``sent``): a one-way delay per chunk instead of a round trip (a lane's
    socket takes a chunk at once, so the real gap is smaller). Virtual time: the figures
    are the model's, not this machine's."""
    async with bench() as b:
        # The same worker, reached over a long, narrow path.
        world: MemWorld = b.world
        world.latency = LatencyModel(default_rtt_ms=100.0)
        rate = 50 * (1 << 20)
        times = {}
        for label, window in (("one at a time", 1), ("windowed", None)):
            requester = world.add_peer(Identity(bytes([len(times) + 1]) * 32),
                                       LinkProfile(uplink_bps=rate))  # fmt: skip
            await requester.connect(world.network(b.worker_id).addrs()[0])
            array = operand(16)
            start = trio.current_time()
            if window == 1:
                saved = client.UPLOAD_CHUNKS_IN_FLIGHT
                client.UPLOAD_CHUNKS_IN_FLIGHT = 1
                try:
                    await client.upload(requester, b.worker_id, array, timeout=30)
                finally:
                    client.UPLOAD_CHUNKS_IN_FLIGHT = saved
            else:
                await client.upload(requester, b.worker_id, array, timeout=30)
            times[label] = trio.current_time() - start
            np.testing.assert_array_equal(b.worker.operands.get(meta_of(array).digest), array)
        on_the_link = CHUNK_BYTES / rate
        serial = 16 * (0.1 + on_the_link)
        assert times["one at a time"] == pytest.approx(serial, rel=0.1)
        # The first chunk alone, then 15 each a link time and a one-way delay apart, the
        # last one's reply a one-way delay later.
        windowed = (0.1 + on_the_link) + 15 * (0.05 + on_the_link) + 0.05
        assert times["windowed"] == pytest.approx(windowed, rel=0.1), times
        assert times["windowed"] < 0.8 * times["one at a time"], times


async def test_a_worker_from_before_windows_gets_one_chunk_at_a_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A worker whose replies carry no ``window`` and that refuses any chunk not at the offset
    it expects (as every worker did before windows) receives the whole upload, one chunk in
    flight at a time."""
    world = MemWorld(seed=3, latency=LatencyModel(default_rtt_ms=20.0))
    old = world.add_peer(Identity(b"\x07" * 32))
    requester = world.add_peer(Identity(b"\x08" * 32))
    received = bytearray()
    in_flight = [0, 0]  # now, most

    async def old_upload(sender: str, request: bytes) -> bytes:
        in_flight[0] += 1
        in_flight[1] = max(in_flight[1], in_flight[0])
        try:
            header, chunk = unpack(request)
            if header["offset"] != len(received):
                raise RemoteError("upload chunks must arrive in order with the same description")
            await trio.sleep(0.01)
            received.extend(chunk)
            done = len(received) == header["array"]["shape"][0] * 4
            return pack({"complete": done, "received": len(received)})
        finally:
            in_flight[0] -= 1

    old.handle(PROTOCOL_UPLOAD, old_upload, max_request_bytes=MAX_MESSAGE_BYTES)
    await requester.connect(old.addrs()[0])
    array = operand(5)
    await client.upload(requester, old.peer_id, array, timeout=30)
    assert bytes(received) == array.tobytes()
    assert in_flight[1] == 1


@pytest.mark.parametrize("window", [0, -3, True, "2", 2.5])
async def test_a_worker_naming_a_bad_window_is_at_fault(
    autojump_clock: trio.testing.MockClock, window: object
) -> None:
    """``window`` that is not a positive integer is the worker's fault, named as such."""
    world = MemWorld(seed=4)
    worker = world.add_peer(Identity(b"\x09" * 32))
    requester = world.add_peer(Identity(b"\x0a" * 32))

    async def bogus(sender: str, request: bytes) -> bytes:
        header, chunk = unpack(request)
        return pack({"complete": False, "received": header["offset"] + len(chunk),
                     "window": window})  # fmt: skip

    worker.handle(PROTOCOL_UPLOAD, bogus, max_request_bytes=MAX_MESSAGE_BYTES)
    await requester.connect(worker.addrs()[0])
    with pytest.raises(client.WorkerMisbehaved, match="window"):
        await client.upload(requester, worker.peer_id, operand(2), timeout=30)


async def test_starting_again_keeps_the_first_start_for_the_rate_check(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An upload started again at offset 0 is judged at the minimum rate from its first
    start (a review: restarting every 20 s otherwise held a reservation for ever)."""
    async with bench() as b:
        alice = await b.requester("alice")
        array = operand(3)
        await alice.network.request(b.worker_id, PROTOCOL_UPLOAD, chunk_message(array, 0, 8))
        (first,) = b.worker._pending.values()
        await trio.sleep(20)
        await alice.network.request(b.worker_id, PROTOCOL_UPLOAD, chunk_message(array, 0, 8))
        (again,) = b.worker._pending.values()
        assert again is not first and again.started == first.started


async def test_an_upload_of_an_operand_held_meanwhile_gives_its_reservation_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A chunk of an operand the worker has come to hold (carried by a run, uploaded by
    another) is answered "complete", and the sender's upload of it in progress ends then,
    not at its idle expiry."""
    async with bench() as b:
        alice, bob = await b.requester("alice"), await b.requester("bob")
        array = operand(2)
        await alice.network.request(b.worker_id, PROTOCOL_UPLOAD, chunk_message(array, 0))
        assert b.worker.reserved_upload_bytes == array.nbytes
        await client.upload(bob.network, b.worker_id, array, timeout=30)
        reply = await alice.network.request(b.worker_id, PROTOCOL_UPLOAD,
                                            chunk_message(array, CHUNK_BYTES))  # fmt: skip
        assert unpack(reply)[0]["complete"] is True
        assert b.worker.reserved_upload_bytes == 0 and not b.worker._pending
