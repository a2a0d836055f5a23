"""Security review of issue 8 ("Trust under attack"): attacks that still break what was built.

Each test is a strict expected failure until its defect is fixed; the reason names the finding
of the review and the code responsible. They run on memnet under ``MockClock``.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from mtor_p2p.compute import client
from mtor_p2p.compute.protocol import MAX_ARRAY_BYTES, PROTOCOL_UPLOAD
from mtor_p2p.compute.worker import (
    HOUSEKEEPING_INTERVAL,
    OWED_MEMORY_SECONDS,
    UPLOAD_IDLE_TIMEOUT,
)
from mtor_p2p.network import RemoteError
from mtor_p2p.records.arrays import pack
from tests.test_worker_attacks import RNG, bench, cost_of, matmul_operands, run

# -- unpaid work: one (job_id, shard) key reused for ever -----------------------------------


async def test_reusing_one_job_and_shard_does_not_escape_the_unpaid_bound(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Mallory never countersigns and sends every run request with the same job ID and shard
    index. The worker computes every one of them and hands out a receipt each time, but
    remembers at most one unpaid shard: the bound of 2 unpaid shards never bites."""
    async with bench(price=1.0, unpaid_shards=2) as b:
        mallory = await b.requester("mallory")
        operands = matmul_operands()
        served = 0
        with pytest.raises(RemoteError, match="never countersigned"):
            for _ in range(6):
                await run(b, mallory, operands, shard=0, quote=1.0)
                served += 1
                await trio.sleep(OWED_MEMORY_SECONDS + HOUSEKEEPING_INTERVAL)
        assert served <= 2


async def test_reusing_one_job_and_shard_does_not_escape_the_credit_check(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Mallory can spend exactly one shard's cost. Each run under the same (job_id, shard)
    replaces the previous reservation instead of adding to it: all five are served, none
    paid, inside the owed window."""
    operands = matmul_operands()
    cost = cost_of(operands, 1.0)
    async with bench(price=1.0, credit=lambda requester: cost) as b:
        mallory = await b.requester("mallory")
        served = 0
        with pytest.raises(RemoteError, match="credit refused"):
            for _ in range(5):
                await run(b, mallory, operands, shard=0, quote=1.0)
                served += 1
        assert served == 1


# -- uploads: a trickle holds a reservation for ever ----------------------------------------


async def test_trickled_uploads_cannot_lock_honest_requesters_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Two attackers each announce a 1 GiB array and send one byte of it every 50 s. After
    an hour (72 bytes sent in all) an honest requester's 1 MiB upload is still refused
    "busy: too many uploads in progress"."""
    async with bench() as b:
        attackers = [await b.requester("mallory"), await b.requester("trudy")]
        alice = await b.requester("alice")
        shape = [MAX_ARRAY_BYTES // 4]
        described = [
            {"hash": f"{i + 1:064x}", "dtype": "float32", "shape": shape} for i in range(2)
        ]

        offsets = [0, 0]

        async def trickle() -> None:
            # Whenever the worker drops its upload, the attacker starts it again.
            for i, (who, array) in enumerate(zip(attackers, described, strict=True)):
                request = pack({"array": array, "offset": offsets[i]}, b"x")
                try:
                    await who.network.request(b.worker_id, PROTOCOL_UPLOAD, request)
                    offsets[i] += 1
                except RemoteError:
                    offsets[i] = 0

        for _ in range(72):
            await trickle()
            await trio.sleep(UPLOAD_IDLE_TIMEOUT - 10)
        honest = RNG.standard_normal((512, 512)).astype("float32")
        await client.upload(alice.network, b.worker_id, honest, timeout=5)
        assert b.worker.stats.uploads_expired + b.worker.stats.uploads_evicted >= 2


# -- prices: the challenger pays whatever a newcomer asks -----------------------------------


async def test_the_challenger_pays_no_more_than_its_owner_would(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from mtor_p2p.capacity.service import CapacityTiming
    from mtor_p2p.node import NodeTiming
    from tests.test_virtual_time import cluster, shard_operands

    timing = NodeTiming(
        mesh_interval=3600.0,
        challenge_interval=30.0,
        capacity=CapacityTiming(ttl=3000.0, announce_interval=600.0),
    )
    async with cluster(["requester", "w1", "gouger"], timing=timing) as c:
        await c.start("w1", "WEU", price=1.0)
        gouger = await c.start("gouger", "WEU", price=1e6)
        requester = await c.start("requester", "WEU", serve=False)
        await c.settle()
        paid: list[tuple[str, float]] = []
        settle = requester.scheduler.settle

        async def recording_settle(worker, receipt):  # type: ignore[no-untyped-def]
            paid.append((worker, receipt.body.cost))
            return await settle(worker, receipt)

        requester.scheduler.settle = recording_settle  # type: ignore[method-assign]
        # The owner's only job: at most 10 credits per TFLOP (the gouger is not eligible).
        result = await requester.submit("matmul", shard_operands(), shards=2, max_price=10.0)
        assert gouger.peer_id not in result.workers
        await trio.sleep(300)  # the challenger runs while its owner is an active requester
        gouged = sum(cost for worker, cost in paid if worker == gouger.peer_id)
        assert gouged == 0, f"the challenger paid the gouger {gouged:.1f} credits"


def test_a_trial_place_does_not_go_to_a_worker_priced_far_above_the_market() -> None:
    from mtor_p2p.capacity.view import CapacityView
    from mtor_p2p.clock import NetClock
    from mtor_p2p.compute.reputation import PeerBook
    from mtor_p2p.compute.scheduler import JobSpec, Scheduler
    from mtor_p2p.runtime import Runtime
    from tests.conftest import make_record
    from tests.test_virtual_time import ident

    now = 1_800_000_000.0
    view, book = CapacityView(), PeerBook()
    for i in range(8):
        worker = ident(f"measured{i}")
        view.offer(make_record(worker, now=now, tflops=20.0, price=1.0, kernels=("matmul",)), now)
        book.accepted(worker.peer_id, flops=int(1e12), seconds=1.0, now=now)
    gouger = ident("gouger")
    view.offer(make_record(gouger, now=now, tflops=20.0, price=1e6, kernels=("matmul",)), now)

    class FixedClock(NetClock):
        def now(self) -> float:
            return now

    scheduler = Scheduler(
        None,  # type: ignore[arg-type]
        ident("planner"),
        FixedClock(epoch_offset=0.0),
        view,
        None,  # type: ignore[arg-type]
        runtime=Runtime.simulated(1),
        book=book,
    )
    plan = scheduler.plan_workers(JobSpec(kernel="matmul", operands={}, max_workers=8))
    assert gouger.peer_id not in {r.peer_id for r in plan.chosen}


# -- demotions: an honest but slower newcomer fails its trial by being hedged ---------------


async def test_an_honest_slower_worker_is_not_demoted_for_being_hedged(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from tests.test_trust import QUIET
    from tests.test_virtual_time import cluster, shard_operands

    async with cluster(["requester", "f1", "f2", "slow"], timing=QUIET) as c:
        await c.start("f1", "WEU")
        await c.start("f2", "WEU")
        slow = await c.start("slow", "WEU")
        c.peers["slow"].device.flop_scale = 6.0  # an honest card six times slower
        requester = await c.start("requester", "WEU", serve=False)
        await c.settle()
        result = await requester.submit("matmul", shard_operands(), shards=6)
        assert result.output.shape == (256, 250)
        standing = requester.peers.get(slow.peer_id)
        assert standing.timeouts == 0, standing.reason
        assert requester.peers.excluded(slow.peer_id, requester.clock.now()) is None


# -- the peer book: Sybil churn evicts what was measured ------------------------------------


def test_sybil_churn_does_not_evict_measured_workers_from_the_peer_book() -> None:
    from mtor_p2p.compute.reputation import PeerBook

    book = PeerBook(max_peers=100)
    honest = [f"honest{i}" for i in range(10)]
    for peer in honest:
        book.accepted(peer, flops=int(1e12), seconds=1.0, now=0.0)
    for i in range(1000):  # each Sybil record costs the requester one failed dial
        book.failed(f"sybil{i}", "unreachable", 100.0 + i)
    assert all(book.get(peer).measured for peer in honest)


# -- Sybils whose addresses swallow dials ---------------------------------------------------


async def test_silent_sybil_addresses_do_not_outlast_a_fresh_requesters_job(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Two honest workers and 200 Sybil records (price 0, 16 addresses each, all of which
    swallow packets: a partition, as an unrouted IP does). Nobody is measured yet, so every
    place of the job goes to a random newcomer; the job must still finish."""
    from mtor_p2p.compute.scheduler import JobFailed
    from mtor_p2p.memnet import LinkProfile
    from tests.conftest import make_record
    from tests.test_trust import QUIET
    from tests.test_virtual_time import cluster, ident, shard_operands

    async with cluster(["requester", "w1", "w2"], timing=QUIET) as c:
        await c.start("w1", "WEU")
        await c.start("w2", "WEU")
        requester = await c.start("requester", "WEU", serve=False)
        await c.settle()
        now = requester.clock.now()
        sybils = [ident(f"silent sybil {i}") for i in range(200)]
        for sybil in sybils:
            c.world.add_peer(sybil, LinkProfile("WEU"))
            addrs = tuple(f"/ip4/10.255.{i}.1/tcp/4001/p2p/{sybil.peer_id}" for i in range(16))
            record = make_record(
                sybil,
                now=now,
                price=0.0,
                tflops=10_000.0,
                kernels=("matmul",),
                addrs=addrs,
                expires=now + 3600,
            )
            assert requester.capacity.view.offer(record, now)
        c.world.partition([s.peer_id for s in sybils])
        started = trio.current_time()
        try:
            await requester.submit("matmul", shard_operands(), shards=4)
        except JobFailed as exc:
            pytest.fail(f"job failed after {trio.current_time() - started:.0f} s: {exc}")


# -- uploads: many tiny half-sent ones (hostile review, 2026-12-07) -------------------------


async def test_uploads_in_progress_are_bounded_in_number(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Half-sent uploads of 8 bytes reserve almost nothing, yet each holds a buffer and a
    record, and each new upload scans them all (8,000 held 33 MiB and made an honest upload
    15-35 times slower): one sender has at most MAX_PENDING_UPLOADS_PER_SENDER at once, and
    others are not locked out by it."""
    from mtor_p2p.compute.worker import MAX_PENDING_UPLOADS_PER_SENDER

    async with bench() as b:
        mallory = await b.requester("mallory")
        alice = await b.requester("alice")
        refused = 0
        for i in range(MAX_PENDING_UPLOADS_PER_SENDER + 10):
            array = {"hash": f"{i + 1:064x}", "dtype": "float32", "shape": [4]}
            request = pack({"array": array, "offset": 0}, b"x" * 8)  # 8 of 16 bytes
            try:
                await mallory.network.request(b.worker_id, PROTOCOL_UPLOAD, request)
            except RemoteError as exc:
                assert str(exc).startswith("busy")
                refused += 1
        assert refused == 10
        honest = RNG.standard_normal((64, 64)).astype("float32")
        await client.upload(alice.network, b.worker_id, honest, timeout=5)


async def test_identities_that_fill_the_uploads_in_progress_do_not_lock_others_out(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the table of uploads in progress full, a newcomer's upload makes room by dropping
    the least recently moved upload of whoever holds the most beyond a fair share (a second
    review: 16 identities x 64 tiny uploads refused every honest upload)."""
    import mtor_p2p.compute.worker as worker_module

    monkeypatch.setattr(worker_module, "MAX_PENDING_UPLOADS", 8)
    async with bench() as b:
        mallory = await b.requester("mallory")
        alice = await b.requester("alice")
        for i in range(8):
            array = {"hash": f"{i + 1:064x}", "dtype": "float32", "shape": [4]}
            await mallory.network.request(
                b.worker_id, PROTOCOL_UPLOAD, pack({"array": array, "offset": 0}, b"x" * 8)
            )
        extra = {"hash": f"{99:064x}", "dtype": "float32", "shape": [4]}
        with pytest.raises(RemoteError, match=r"^busy"):  # its own: no room made for it
            await mallory.network.request(
                b.worker_id, PROTOCOL_UPLOAD, pack({"array": extra, "offset": 0}, b"x" * 8)
            )
        evicted = b.worker.stats.uploads_evicted
        honest = RNG.standard_normal((64, 64)).astype("float32")
        await client.upload(alice.network, b.worker_id, honest, timeout=5)
        assert b.worker.stats.uploads_evicted == evicted + 1
