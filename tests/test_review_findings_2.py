"""Second security review of issue 8: attacks on the fixes of the first review.

Each test is a strict expected failure until its defect is fixed; the reason names the finding
and the code responsible. They run on memnet under ``MockClock`` unless they say otherwise.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from mtor_p2p.compute.protocol import (
    CHUNK_BYTES,
    MAX_ARRAY_BYTES,
    MAX_PENDING_UPLOAD_BYTES,
    PROTOCOL_UPLOAD,
)
from mtor_p2p.network import RemoteError
from mtor_p2p.records.arrays import pack
from tests.test_worker_attacks import bench

# -- uploads: _make_room lets a newcomer evict the honest upload ----------------------------


def _array(index: int, nbytes: int) -> dict[str, object]:
    """The description of an array (a made-up hash: the worker checks it only at the end)."""
    return {"hash": f"{index:064x}", "dtype": "float32", "shape": [nbytes // 4]}


async def test_a_newcomer_cannot_evict_an_honest_large_upload_in_progress(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Alice uploads a 1 GiB weight matrix (MAX_ARRAY_BYTES, the largest operand there is) at
    4 MiB a second. Mallory announces just under 1 GiB and sends one chunk (4 MiB: "fast"
    for the next 16 s); Trudy then announces 8 MiB. The cap is full, Trudy is under an equal
    share (a third of 2 GiB), and the sender holding the most was Alice: her upload was
    evicted, whatever she had sent. 12 MiB of attacker traffic per eviction, repeatable for
    ever; Alice's retry from offset 0 is then refused outright (1 GiB is over the share)."""
    async with bench() as b:
        alice, mallory, trudy = (
            await b.requester("alice"),
            await b.requester("mallory"),
            await b.requester("trudy"),
        )
        chunk = b"x" * CHUNK_BYTES
        weights = _array(1, MAX_ARRAY_BYTES)
        offset = 0

        async def alice_sends() -> None:
            nonlocal offset
            message = pack({"array": weights, "offset": offset}, chunk)
            await alice.network.request(b.worker_id, PROTOCOL_UPLOAD, message, timeout=10)
            offset += CHUNK_BYTES

        for _ in range(3):
            await alice_sends()
            await trio.sleep(1.0)
        held = MAX_PENDING_UPLOAD_BYTES - MAX_ARRAY_BYTES - CHUNK_BYTES
        await mallory.network.request(
            b.worker_id, PROTOCOL_UPLOAD, pack({"array": _array(2, held), "offset": 0}, chunk)
        )
        await trudy.network.request(
            b.worker_id,
            PROTOCOL_UPLOAD,
            pack({"array": _array(3, 2 * CHUNK_BYTES), "offset": 0}, chunk),
        )
        # Alice, moving at 4 MiB/s (64 times the minimum rate), goes on; if anything had to
        # make room for Trudy, it was Mallory's upload, the slower of the two over their share.
        await alice_sends()
        pending = {p.sender for p in b.worker._pending.values()}
        assert alice.peer_id in pending
        if b.worker.stats.uploads_evicted:
            assert mallory.peer_id not in pending


# -- the scheduler: "busy" for ever -----------------------------------------------------------


async def _sybil_workers(c, requester, count: int, *, label: str, on_run, on_has=None):  # type: ignore[no-untyped-def]
    """``count`` reachable Sybil workers on memnet that dial the requester (so they count as
    connected newcomers), serve has/run with ``on_has``/``on_run`` and advertise a price of 1
    (the honest market price) in records the requester's view holds."""
    from mtor_p2p.compute.protocol import PROTOCOL_HAS, PROTOCOL_RUN
    from mtor_p2p.memnet import LinkProfile
    from tests.conftest import make_record
    from tests.test_virtual_time import ident

    async def claims_everything(sender: str, request: bytes) -> bytes:
        from mtor_p2p.records.arrays import unpack

        header, _ = unpack(request)
        return pack({"have": list(header["hashes"])})

    ids = []
    now = requester.clock.now()
    for i in range(count):
        sybil = ident(f"{label} {i}")
        network = c.world.add_peer(sybil, LinkProfile("WEU"))
        network.handle(PROTOCOL_HAS, on_has or claims_everything, max_request_bytes=64 << 10)
        network.handle(PROTOCOL_RUN, on_run, max_request_bytes=64 << 10, timeout=600)
        await network.connect(c.world.network(requester.peer_id).addrs()[0])
        record = make_record(
            sybil,
            now=now,
            price=1.0,
            kernels=("matmul",),
            addrs=(network.addrs()[0],),
            expires=now + 3600,
        )
        assert requester.capacity.view.offer(record, now)
        ids.append(sybil.peer_id)
    return ids


async def test_workers_answering_busy_for_ever_do_not_stall_a_job_to_its_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Two honest workers and 60 Sybils that claim to hold every operand (no upload needed)
    and answer every run request "busy: too many uploads in progress" (the worker's own
    transient refusal). A fresh requester gives all eight places to newcomers at random;
    "busy" is waited out for ever and recorded nowhere, so no Sybil ever leaves the job, the
    honest workers wait in the reserve, and the job fails at its deadline (600 s). The next
    job draws the Sybils again: nothing was held against them."""
    from mtor_p2p.compute.scheduler import JobFailed
    from tests.test_trust import QUIET
    from tests.test_virtual_time import cluster, shard_operands

    async def busy(sender: str, request: bytes) -> bytes:
        raise RemoteError("busy: too many uploads in progress")

    async with cluster(["requester", "w1", "w2"], timing=QUIET) as c:
        await c.start("w1", "WEU")
        await c.start("w2", "WEU")
        requester = await c.start("requester", "WEU", serve=False)
        await c.settle()
        await _sybil_workers(c, requester, 60, label="busy sybil", on_run=busy)
        started = trio.current_time()
        try:
            await requester.submit("matmul", shard_operands(), shards=4)
        except JobFailed as exc:
            pytest.fail(f"job failed after {trio.current_time() - started:.0f} s: {exc}")


# -- the scheduler: "price refused" at the advertised price ---------------------------------


async def test_a_worker_refusing_its_own_advertised_price_is_not_fed_every_job(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A Sybil advertises price 1 (the market), takes every operand upload, and answers every
    run request "price refused". The requester quotes exactly the price in the Sybil's
    current record, so the refusal cannot be a stale quote. Nothing is recorded: the Sybil
    stays an unmeasured newcomer, is chosen for every job's trial place, and receives the
    job's operands each time (a requester's 1 GiB of weights, job after job)."""
    from mtor_p2p.records.arrays import unpack
    from tests.test_trust import QUIET
    from tests.test_virtual_time import cluster, shard_operands

    received = [0]

    async def lacks_everything(sender: str, request: bytes) -> bytes:
        return pack({"have": []})

    async def refuse(sender: str, request: bytes) -> bytes:
        raise RemoteError("price refused: max_price 1 is below this worker's price 1")

    async with cluster(["requester", "w1"], timing=QUIET) as c:
        await c.start("w1", "WEU")
        requester = await c.start("requester", "WEU", serve=False)
        await c.settle()
        (sybil,) = await _sybil_workers(
            c, requester, 1, label="price liar", on_run=refuse, on_has=lacks_everything
        )

        async def swallow(sender: str, request: bytes) -> bytes:
            header, chunk = unpack(request)
            received[0] += len(chunk)
            return pack({"complete": True, "received": header["offset"] + len(chunk)})

        c.world.network(sybil).handle(PROTOCOL_UPLOAD, swallow, max_request_bytes=8 << 20)
        fed = []
        for _ in range(4):
            await requester.submit("matmul", shard_operands(), shards=4)
            fed.append(received[0])
        assert fed[-1] == fed[0], f"operand bytes sent to the liar after each job: {fed}"


# -- the host: two identities hold the whole request-byte budget -----------------------------


async def test_two_identities_announcing_and_sending_nothing_do_not_lock_out_the_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Real py-libp2p hosts on loopback; budgets scaled down (64 KiB per peer, 128 KiB in
    all, 0.5 s grace and first-bytes deadline, 1 MiB/s minimum rate) so that the test runs in
    seconds. Two attackers
    announce a request of exactly their per-peer budget, send no byte of its body, and open
    the next one as soon as the host cuts the stream. An honest peer asking ten times over
    two seconds should be served most of the time; it is refused "busy" every time but in
    the instant between a cut and the next announcement."""
    from libp2p.custom_types import TProtocol
    from libp2p.peer.id import ID

    from mtor_p2p import libp2p_host
    from tests.conftest import open_networks

    monkeypatch.setattr(libp2p_host, "REQUEST_GRACE_S", 0.5)
    monkeypatch.setattr(libp2p_host, "FIRST_BODY_BYTES_S", 0.5)
    monkeypatch.setattr(libp2p_host, "MIN_REQUEST_BYTES_PER_S", 1 << 20)
    echo_protocol = "/mtor/test/echo/1"

    async def echo(sender: str, data: bytes) -> bytes:
        return data

    budget = 64 << 10
    served = 0
    async with open_networks(
        4, max_pending_bytes_per_peer=budget, max_pending_bytes_total=2 * budget
    ) as (server, mallory, trudy, alice):
        server.handle(echo_protocol, echo, max_request_bytes=1 << 20, timeout=60)

        async def hold(attacker) -> None:  # type: ignore[no-untyped-def]
            while True:
                try:
                    stream = await attacker._host.new_stream(
                        ID.from_base58(server.peer_id), [TProtocol(echo_protocol)]
                    )
                    await stream.write(budget.to_bytes(4, "big"))
                    while await stream.read(1024):
                        pass
                except Exception:
                    await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hold, mallory)
            nursery.start_soon(hold, trudy)
            with trio.fail_after(5):
                while server.stats.request_bytes_pending < 2 * budget:
                    await trio.sleep(0.02)
            for _ in range(10):
                try:
                    await alice.request(server.peer_id, echo_protocol, b"honest", timeout=2)
                    served += 1
                except RemoteError:
                    pass
                await trio.sleep(0.2)
            nursery.cancel_scope.cancel()
    assert served >= 5, f"the honest peer was served {served} times of 10"
