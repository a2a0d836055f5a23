"""Attacks on a worker by the requesters it serves (issue 8, items 3 and 4).

A requester that quotes a price of zero, sends shards too small to cost anything, never
countersigns the work it gets, or starts many uploads that announce large arrays and send
nothing: each must be refused with a one-line :class:`RemoteError`, and honest requesters must
keep getting served. The worker runs unmodified on memnet under ``MockClock`` (pytest-trio's
``autojump_clock``), so that expiry on a timer is tested at exact virtual instants.
"""

from __future__ import annotations

import base64
import hashlib
import os
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
import trio.testing

from mtor_kernels import get_kernel
from mtor_kernels.backend import NumpyBackend
from mtor_p2p.clock import NetClock
from mtor_p2p.compute import client
from mtor_p2p.compute.protocol import (
    CHUNK_BYTES,
    MAX_PENDING_UPLOAD_BYTES,
    MAX_PENDING_UPLOAD_BYTES_PER_PEER,
    PROTOCOL_COUNTERSIGN,
    PROTOCOL_RUN,
    PROTOCOL_UPLOAD,
)
from mtor_p2p.compute.receipt_store import ReceiptStore
from mtor_p2p.compute.worker import (
    CREDIT_REFUSED,
    HOUSEKEEPING_INTERVAL,
    NETWORK_REFUSED,
    OWED_MEMORY_SECONDS,
    PRICE_MEMORY_SECONDS,
    PRICE_TOLERANCE,
    RULES_REFUSED,
    RUN_TIMEOUT,
    UPLOAD_IDLE_TIMEOUT,
    WorkerService,
    refusing_network,
    refusing_network_name,
)
from mtor_p2p.identity import Identity
from mtor_p2p.ledger.names import LEDGER_RULES
from mtor_p2p.memnet import MemNetwork, MemWorld
from mtor_p2p.network import NetworkError, RemoteError
from mtor_p2p.records.arrays import OperandStore, meta_of, pack, pack_parts, unpack
from mtor_p2p.records.receipts import Receipt, countersign, shard_cost_nano
from mtor_p2p.runtime import Runtime
from tests.products import assert_product_close

EPOCH = 1_800_000_000.0
JOB = "ab" * 32
RNG = np.random.default_rng(11)


def ident(label: str) -> Identity:
    """A deterministic identity."""
    return Identity(hashlib.sha256(f"worker attacks {label}".encode()).digest())


@dataclass
class Requester:
    """One requesting peer: its identity and network."""

    identity: Identity
    network: MemNetwork

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id


@dataclass
class Bench:
    """A worker on memnet, the price it asks (change ``price[0]``), and requesters."""

    world: MemWorld
    worker: WorkerService
    worker_id: str
    price: list[float]
    clock: NetClock
    requesters: dict[str, Requester] = field(default_factory=dict)

    async def requester(self, label: str) -> Requester:
        """A new requester connected to the worker."""
        identity = ident(label)
        network = self.world.add_peer(identity)
        await network.connect(self.world.network(self.worker_id).addrs()[0])
        peer = self.requesters[label] = Requester(identity, network)
        return peer


@asynccontextmanager
async def bench(
    *,
    price: float = 1.0,
    credit: Callable[[str], int] | None = None,
    runtime: Runtime | None = None,
    **limits: int,
) -> AsyncIterator[Bench]:
    """A worker serving on memnet with its housekeeping loop running (``runtime``: its
    blocking hook and randomness, inline and seeded unless given)."""
    world = MemWorld(seed=1)
    identity = ident("worker")
    network = world.add_peer(identity)
    box = [price]
    clock = NetClock(epoch_offset=EPOCH)
    worker = WorkerService(
        network,
        identity,
        clock,
        OperandStore(),
        ReceiptStore(Path(":memory:")),
        price=lambda: box[0],
        backend=NumpyBackend(),
        runtime=runtime or Runtime.simulated("worker attacks"),
        credit=credit,
        **limits,  # type: ignore[arg-type]
    )
    worker.register()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker.run)
        yield Bench(world, worker, identity.peer_id, box, clock)
        nursery.cancel_scope.cancel()


def matmul_operands(rows: int = 16, inner: int = 64, cols: int = 48) -> dict[str, np.ndarray]:
    return {
        "a": RNG.standard_normal((rows, inner)).astype("float32"),
        "b": RNG.standard_normal((inner, cols)).astype("float32"),
    }


def hand_made_run(operands: dict[str, np.ndarray], **fields: object) -> dict[str, object]:
    """The header of a run request of JOB written by hand, not by the client: shard 0 of a
    matmul of ``operands``, with ``fields`` added or replaced."""
    described = {name: meta_of(a).to_json() for name, a in operands.items()}
    return {"job_id": JOB, "shard": 0, "kernel": "matmul", "operands": described, **fields}


def job_of(who: Requester) -> str:
    """Each requester's own job (job IDs are content hashes: two requesters never share one)."""
    return hashlib.sha256(who.peer_id.encode()).hexdigest()


def cost_of(operands: dict[str, np.ndarray], price: float) -> int:
    return shard_cost_nano(price, int(get_kernel("matmul").flops(operands)))


async def run(
    b: Bench,
    who: Requester,
    operands: dict[str, np.ndarray],
    *,
    shard: int,
    quote: float,
) -> Receipt:
    """Upload what the worker lacks, run one shard at ``quote``; the worker's receipt."""
    await client.ensure_operands(who.network, b.worker_id, operands, timeout=10)
    terms = client.ShardTerms(
        requester=who.peer_id,
        max_price=quote,
        flops=int(get_kernel("matmul").flops(operands)),
        sent_at=b.clock.now(),
        now=b.clock.now,
    )
    answer = await client.run_shard(
        who.network,
        b.worker_id,
        job_id=job_of(who),
        shard=shard,
        kernel="matmul",
        operands=operands,
        timeout=10,
        transfer_timeout=10,
        terms=terms,
    )
    assert_product_close(answer.output, operands["a"] @ operands["b"])
    return answer.receipt


@pytest.mark.parametrize("runtime", ["production", "simulated"])
async def test_a_carried_resident_operand_is_kept_in_memory_of_its_own(
    autojump_clock: trio.testing.MockClock, runtime: str
) -> None:
    """A run carrying B keeps it for the next shards: first as a view of the request, then
    (copied while the kernel runs, on a thread in production) in memory of its own, so that
    the store does not hold the request's other bytes; also when the kernel fails."""
    async with bench() as b:
        if runtime == "production":
            # Real threads: the clock jumps only once nothing has happened for a while (a
            # thread at work is idleness to trio).
            autojump_clock.autojump_threshold = 0.2
            b.worker._runtime = Runtime.production()
            b.worker.executor._runtime = b.worker._runtime
        alice = await b.requester("alice")
        operands = matmul_operands()
        digest = meta_of(operands["b"]).digest

        async def carry(job: str) -> client.ShardAnswer:
            return await client.run_shard(
                alice.network, b.worker_id, job_id=job, shard=0, kernel="matmul",
                operands=operands, timeout=10, transfer_timeout=10, inline=("a", "b"),
            )  # fmt: skip

        answer = await carry(job_of(alice))
        assert_product_close(answer.output, operands["a"] @ operands["b"])
        kept = b.worker.operands.get(digest)
        assert kept is not None and kept.flags.owndata and not kept.flags.writeable
        np.testing.assert_array_equal(kept, operands["b"])

        b.worker.operands.discard(digest)

        async def broken(*args: object) -> np.ndarray:
            raise MemoryError("out of memory")

        b.worker.executor.execute = broken  # type: ignore[method-assign]
        with pytest.raises(RemoteError, match="kernel failed: MemoryError"):
            await carry("cd" * 32)
        # The copy may have been made before the kernel failed: then it is kept, never the
        # view of the request.
        left = b.worker.operands.get(digest)
        assert left is None or left.flags.owndata


async def test_a_carried_b_is_kept_only_when_its_requester_asks(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """``keep`` names the carried operands to keep for later shards; without the field every
    carried B is kept (requesters before it); a malformed one is the sender's error."""
    async with bench() as b:
        alice = await b.requester("alice")

        async def carry(job: str, keep: Any) -> str:
            operands = matmul_operands()
            await client.run_shard(
                alice.network, b.worker_id, job_id=job, shard=0, kernel="matmul",
                operands=operands, timeout=10, transfer_timeout=10, inline=("a", "b"),
                keep=keep,
            )  # fmt: skip
            return meta_of(operands["b"]).digest

        assert await carry("a1" * 32, ()) not in b.worker.operands
        assert await carry("a2" * 32, ("b",)) in b.worker.operands
        assert await carry("a3" * 32, None) in b.worker.operands
        operands = matmul_operands()
        header = {
            "ledger_rules": LEDGER_RULES,
            "job_id": "a4" * 32, "shard": 0, "kernel": "matmul", "inline": ["a", "b"],
            "operands": {name: meta_of(x).to_json() for name, x in operands.items()},
            "keep": "b",
        }  # fmt: skip
        body = [memoryview(operands[name]).cast("B") for name in ("a", "b")]
        with pytest.raises(RemoteError, match="field 'keep'"):
            await alice.network.request(b.worker_id, PROTOCOL_RUN, pack_parts(header, body))


async def test_no_view_of_a_run_request_stays_in_a_small_operand_store(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A worker with a small operand store (``operand_cache_mib`` may be 1) gets runs carrying
    small resident operands first and one larger than the whole store last (a review's
    attack: that last put failed, leaving the views stored before it, each pinning its whole
    request). The large one is not kept, the others are kept as copies, never as views."""
    async with bench() as b:
        b.worker.operands.max_bytes = 1 << 20
        mallory = await b.requester("mallory")
        for i in range(10):
            rng = np.random.default_rng(i)
            operands = {
                "w1": rng.standard_normal((1, 1024)).astype("float32"),
                "b1": rng.standard_normal(1024).astype("float32"),
                "b2": rng.standard_normal(300).astype("float32"),
                "w2": rng.standard_normal((1024, 300)).astype("float32"),  # 1.2 MiB
                "x": rng.standard_normal((2, 1)).astype("float32"),
            }
            order = ["w1", "b1", "b2", "w2", "x"]
            header = {
                "ledger_rules": LEDGER_RULES,
                "job_id": f"{i:064x}", "shard": 0, "kernel": "mlp", "inline": order,
                "operands": {name: meta_of(x).to_json() for name, x in operands.items()},
            }  # fmt: skip
            body = [memoryview(operands[name]).cast("B") for name in order]
            await mallory.network.request(b.worker_id, PROTOCOL_RUN, pack_parts(header, body))
            assert meta_of(operands["w2"]).digest not in b.worker.operands
        held = list(b.worker.operands._arrays.values())
        assert held and all(array.flags.owndata for array in held)


async def pay(b: Bench, who: Requester, receipt: Receipt) -> None:
    """Countersign ``receipt`` and give it to the worker."""
    assert await client.send_countersigned(
        who.network, b.worker_id, countersign(who.identity, receipt), timeout=5
    )


# -- price floor ----------------------------------------------------------------------------


async def test_a_quote_below_the_workers_price_is_refused(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A requester that quotes 0, or half the price, gets a refusal naming both prices; one
    that quotes the price or more is charged the worker's price, never more than its quote."""
    async with bench(price=2.0) as b:
        alice = await b.requester("alice")
        operands = matmul_operands()
        for quote in (0.0, 1.0, 2.0 * (1 - 2 * PRICE_TOLERANCE)):
            with pytest.raises(RemoteError, match="below") as refused:
                await run(b, alice, operands, shard=0, quote=quote)
            assert f"{quote:g}" in str(refused.value) and "2" in str(refused.value)
        assert b.worker.stats.price_refusals == 3
        assert b.worker.stats.shards_run == 0
        receipt = await run(b, alice, operands, shard=1, quote=2.0)
        assert receipt.body.price == 2.0
        receipt = await run(b, alice, operands, shard=2, quote=50.0)
        assert receipt.body.price == 2.0  # the worker's own price, not the (higher) quote
        # A missing quote is not a licence to charge anything: the worker's own price.
        await client.ensure_operands(alice.network, b.worker_id, operands, timeout=10)
        request = hand_made_run(operands, shard=3, ledger_rules=LEDGER_RULES)
        await alice.network.request(b.worker_id, PROTOCOL_RUN, pack(request))
        assert b.worker.stats.shards_run == 3


async def test_a_requester_of_other_ledger_rules_is_refused(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A run request that states no ledger rules (a version before them: rules 1), other
    rules, or a value that is no version is refused in one line naming both sides' rules,
    before anything runs: its receipt would be paid in a ledger this worker never hears. A
    request through the client states this version's rules and is served."""
    async with bench(price=1.0) as b:
        alice = await b.requester("alice")
        operands = matmul_operands()
        await client.ensure_operands(alice.network, b.worker_id, operands, timeout=10)
        request = hand_made_run(operands, max_price=1.0)
        cases: list[tuple[object, str]] = [
            (None, "1"),
            (LEDGER_RULES + 1, str(LEDGER_RULES + 1)),
            (str(LEDGER_RULES), "unreadable"),
            (True, "unreadable"),
            (10**40, "unreadable"),
            (0, "unreadable"),
        ]
        for rules, stated in cases:
            header = request if rules is None else {**request, "ledger_rules": rules}
            with pytest.raises(RemoteError, match=RULES_REFUSED) as refused:
                await alice.network.request(b.worker_id, PROTOCOL_RUN, pack(header))
            assert f"rules {LEDGER_RULES}, the requester {stated};" in str(refused.value)
        assert b.worker.stats.shards_run == 0
        receipt = await run(b, alice, operands, shard=1, quote=1.0)
        assert receipt.body.shard == 1 and b.worker.stats.shards_run == 1


async def test_a_requester_of_another_network_is_refused(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A run request naming another network (genesis prefix), or a value that is none, is
    refused in one line naming both, before anything runs: its receipt would be paid in a
    ledger this worker never hears (a new user's walkthrough: a node started without the
    devnet's genesis was served by the devnet's workers). The same network, and a request
    that names none (a version before it), are served."""
    mine, other = "0123456789abcdef", "fedcba9876543210"
    async with bench(price=1.0) as b:
        b.worker.network_id = mine
        alice = await b.requester("alice")
        operands = matmul_operands()
        await client.ensure_operands(alice.network, b.worker_id, operands, timeout=10)
        request = hand_made_run(operands, max_price=1.0, ledger_rules=LEDGER_RULES)
        cases: list[tuple[object, str]] = [
            (other, other),
            (mine.upper(), "unreadable"),
            (mine + "0", "unreadable"),
            (other + "\n", "unreadable"),  # one line: "$" would have taken the newline
            (16, "unreadable"),
            (None, "unreadable"),
            ("\x1b[31m", "unreadable"),
        ]
        for network, stated in cases:
            with pytest.raises(RemoteError, match=NETWORK_REFUSED) as refused:
                header = {**request, "network": network}
                await alice.network.request(b.worker_id, PROTOCOL_RUN, pack(header))
            assert f"genesis {mine}…, the requester's {stated};" in str(refused.value)
        # The worker's network name is said too when it is a plain name, and read back by
        # the requester; anything else is left out of the refusal.
        for name, said in [("mtor-devnet", "mtor-devnet"), ("a\nb", None), ("x" * 65, None)]:
            b.worker.network_name = name
            with pytest.raises(RemoteError, match=NETWORK_REFUSED) as refused:
                await alice.network.request(
                    b.worker_id, PROTOCOL_RUN, pack({**request, "network": other})
                )
            words = str(refused.value)
            assert refusing_network(words) == mine
            assert refusing_network_name(words) == said
            if said is None:
                assert f"genesis {mine}…, the requester's {other};" in words
            else:
                assert f"genesis {mine}… (network {said}), the requester's {other};" in words
        b.worker.network_name = None
        assert b.worker.stats.shards_run == 0
        receipt = await run(b, alice, operands, shard=1, quote=1.0)  # names no network
        assert receipt.body.shard == 1 and b.worker.stats.shards_run == 1
        await client.ensure_operands(alice.network, b.worker_id, operands, timeout=10)
        served = await alice.network.request(
            b.worker_id, PROTOCOL_RUN, pack({**request, "shard": 2, "network": mine})
        )
        assert served and b.worker.stats.shards_run == 2


async def test_a_recently_advertised_price_is_honoured_then_forgotten(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The requester quotes the price it read in the worker's capacity record, which may be
    older than the worker's latest price step: a price the worker asked within
    PRICE_MEMORY_SECONDS is honoured (and charged), an older one is refused."""
    async with bench(price=1.0) as b:
        alice = await b.requester("alice")
        operands = matmul_operands()
        await trio.sleep(HOUSEKEEPING_INTERVAL)  # the worker has seen its price of 1.0
        b.price[0] = 1.25  # the price loop raised it; the record in alice's view is older
        receipt = await run(b, alice, operands, shard=0, quote=1.0)
        assert receipt.body.price == 1.0  # what was agreed, not the new price
        # Rounded to 6 places in the record: a quote a hair under the price passes.
        receipt = await run(b, alice, operands, shard=1, quote=0.9999995)
        assert receipt.body.price == 0.9999995
        await trio.sleep(PRICE_MEMORY_SECONDS + HOUSEKEEPING_INTERVAL)
        with pytest.raises(RemoteError, match="below"):
            await run(b, alice, operands, shard=2, quote=1.0)
        receipt = await run(b, alice, operands, shard=3, quote=1.25)
        assert receipt.body.price == 1.25


async def test_a_shard_that_costs_nothing_is_refused_to_a_requester_without_credit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """At one credit per TFLOP, a 1x1 product (2 FLOPs) is worth 2e-12 credits, which used to
    round to 0 nano-credits: its receipt moved nothing (the ledger refuses such receipts) and
    the shard passed every credit check. Any paid shard now costs at least one nano-credit:
    a requester that cannot spend it is refused; one that can is served, the shard is held
    against it until countersigned, and its receipt moves one nano-credit."""
    tiny = matmul_operands(1, 1, 1)
    assert cost_of(tiny, 1.0) == 1
    async with bench(price=1.0, credit=lambda requester: 0) as b:
        alice = await b.requester("alice")
        with pytest.raises(RemoteError, match="credit refused: this shard costs 1 nano-credits"):
            await run(b, alice, tiny, shard=0, quote=1.0)
        assert b.worker.stats.shards_run == 0
    async with bench(price=1.0, credit=lambda requester: 1) as b:
        alice = await b.requester("alice")
        receipt = await run(b, alice, tiny, shard=0, quote=1.0)
        assert receipt.body.cost_nano == 1
        with pytest.raises(RemoteError, match="credit refused"):  # the one nano-credit is held
            await run(b, alice, tiny, shard=1, quote=1.0)
        await pay(b, alice, receipt)
        await run(b, alice, tiny, shard=1, quote=1.0)


async def test_unpaid_tiny_shards_reach_the_unpaid_bound(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Without a ledger, free shards are still bounded by the unpaid record."""
    async with bench(price=1.0, unpaid_shards=2) as b:
        mallory = await b.requester("mallory")
        tiny = matmul_operands(1, 1, 1)
        for shard in range(2):
            await run(b, mallory, tiny, shard=shard, quote=1.0)
        await trio.sleep(OWED_MEMORY_SECONDS + HOUSEKEEPING_INTERVAL)
        assert b.worker.unpaid(mallory.peer_id) == (2, 2)
        with pytest.raises(RemoteError, match="never countersigned"):
            await run(b, mallory, tiny, shard=2, quote=1.0)


async def test_a_volunteer_worker_asking_nothing_serves_free_shards(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A worker whose own price is 0 gives its work away by its own choice: no refusal."""
    async with bench(price=0.0) as b:
        alice = await b.requester("alice")
        receipt = await run(b, alice, matmul_operands(), shard=0, quote=0.0)
        assert receipt.body.price == 0.0


# -- unpaid work ----------------------------------------------------------------------------


async def test_unpaid_work_is_remembered_refused_past_the_bound_and_cleared_by_paying(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Shards never countersigned stop being "owed" after OWED_MEMORY_SECONDS but are not
    forgotten: past the bound the requester is refused (as a credit refusal, which the
    scheduler treats as the requester's own fault), and countersigning late clears them."""
    async with bench(price=1.0, unpaid_shards=3) as b:
        mallory, alice = await b.requester("mallory"), await b.requester("alice")
        operands = matmul_operands()
        receipts = [await run(b, mallory, operands, shard=i, quote=1.0) for i in range(3)]
        # Within the owed window nothing is unpaid yet: the countersign may be on its way.
        assert b.worker.unpaid(mallory.peer_id) == (0, 0)
        await run(b, mallory, operands, shard=3, quote=1.0)
        await trio.sleep(OWED_MEMORY_SECONDS + HOUSEKEEPING_INTERVAL)
        cost = cost_of(operands, 1.0)
        assert b.worker.unpaid(mallory.peer_id) == (4, 4 * cost)
        with pytest.raises(RemoteError, match="never countersigned") as refused:
            await run(b, mallory, operands, shard=4, quote=1.0)
        assert str(refused.value).startswith(CREDIT_REFUSED)
        assert b.worker.stats.unpaid_refusals == 1
        # Another requester is not affected.
        await pay(b, alice, await run(b, alice, operands, shard=0, quote=1.0))
        # Paying late clears what was paid; under the bound again, mallory is served.
        await pay(b, mallory, receipts[0])
        await pay(b, mallory, receipts[1])
        assert b.worker.unpaid(mallory.peer_id) == (2, 2 * cost)
        await pay(b, mallory, await run(b, mallory, operands, shard=5, quote=1.0))


async def test_unpaid_work_past_the_nano_credit_bound_is_refused(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The bound holds in nano-credits too: one large unpaid shard is enough."""
    operands = matmul_operands()
    async with bench(price=1.0, unpaid_nano=cost_of(operands, 1.0)) as b:
        mallory = await b.requester("mallory")
        await run(b, mallory, operands, shard=0, quote=1.0)
        await trio.sleep(OWED_MEMORY_SECONDS + HOUSEKEEPING_INTERVAL)
        with pytest.raises(RemoteError, match="never countersigned"):
            await run(b, mallory, operands, shard=1, quote=1.0)


async def test_the_unpaid_table_tracks_a_bounded_number_of_requesters(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Past ``unpaid_requesters`` the requester owing least is forgotten first, so that a
    crowd of identities each owing a little cannot flush out the one that owes most."""
    async with bench(price=1.0, unpaid_requesters=2) as b:
        operands = matmul_operands()
        owing = {"small": 1, "big": 3, "medium": 2}
        for label, shards in owing.items():
            who = await b.requester(label)
            for shard in range(shards):
                await run(b, who, operands, shard=shard, quote=1.0)
        await trio.sleep(OWED_MEMORY_SECONDS + HOUSEKEEPING_INTERVAL)
        counts = {label: b.worker.unpaid(b.requesters[label].peer_id)[0] for label in owing}
        assert counts == {"small": 0, "big": 3, "medium": 2}


async def test_a_reservation_is_released_by_its_own_countersign(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Regression: ``_reserve_credit`` re-used its ``key`` parameter as a loop variable, so a
    shard reserved just after an older reservation expired was stored under the old key, its
    countersign released nothing, and the requester was refused credit it had."""
    operands = matmul_operands()
    cost = cost_of(operands, 1.0)
    async with bench(price=1.0, credit=lambda requester: cost * 3 // 2) as b:
        alice = await b.requester("alice")
        await run(b, alice, operands, shard=0, quote=1.0)  # never countersigned
        await trio.sleep(OWED_MEMORY_SECONDS + 1)
        await pay(b, alice, await run(b, alice, operands, shard=1, quote=1.0))
        # Shard 1 is paid: the requester owes nothing now and may spend its credit again.
        await pay(b, alice, await run(b, alice, operands, shard=2, quote=1.0))
        assert b.worker.stats.credit_refusals == 0


async def test_a_cancelled_shard_is_not_counted_as_owed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A run whose handler is cut off (deadline, requester gone) produced no receipt: its
    reservation must not become unpaid work against the requester."""
    async with bench(price=1.0) as b:
        alice = await b.requester("alice")
        operands = matmul_operands()
        await client.ensure_operands(alice.network, b.worker_id, operands, timeout=10)

        async def never_finish(*args: object, **kwargs: object) -> np.ndarray:
            await trio.sleep_forever()
            raise AssertionError

        b.worker.executor.execute = never_finish  # type: ignore[method-assign]
        described = {name: meta_of(a).to_json() for name, a in operands.items()}
        request = {
            "ledger_rules": LEDGER_RULES,
            "job_id": JOB,
            "shard": 0,
            "kernel": "matmul",
            "operands": described,
        }
        with pytest.raises(NetworkError, match="timed out"):
            await alice.network.request(
                b.worker_id, PROTOCOL_RUN, pack({**request, "max_price": 1.0}), timeout=1
            )
        # The requester gave up; the handler's own deadline cuts it off later.
        await trio.sleep(RUN_TIMEOUT + OWED_MEMORY_SECONDS + HOUSEKEEPING_INTERVAL)
        assert b.worker.stats.active == 0
        assert b.worker.unpaid(alice.peer_id) == (0, 0)


async def test_a_countersign_for_another_requester_is_refused(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Mallory cannot clear alice's record (or its own) with a receipt that names alice."""
    async with bench(price=1.0) as b:
        alice, mallory = await b.requester("alice"), await b.requester("mallory")
        receipt = await run(b, alice, matmul_operands(), shard=0, quote=1.0)
        complete = countersign(alice.identity, receipt)
        with pytest.raises(RemoteError, match="other peers"):
            await mallory.network.request(
                b.worker_id,
                PROTOCOL_COUNTERSIGN,
                pack({"receipt": base64.b64encode(complete.encode()).decode()}),
            )


def countersign_batch(receipts: list[Receipt]) -> bytes:
    """A batched countersign request (``protocol.py``): sizes in the header, receipts after."""
    encoded = [receipt.encode() for receipt in receipts]
    return pack({"receipts": [len(data) for data in encoded]}, b"".join(encoded))


async def test_countersigned_receipts_delivered_together_are_each_taken(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A batch of countersigned receipts clears each shard it pays, as one by one would, and
    says which were new; delivered again, none is."""
    async with bench(price=1.0, unpaid_shards=3) as b:
        alice = await b.requester("alice")
        operands = matmul_operands()
        receipts = [await run(b, alice, operands, shard=i, quote=1.0) for i in range(3)]
        await trio.sleep(OWED_MEMORY_SECONDS + HOUSEKEEPING_INTERVAL)
        assert b.worker.unpaid(alice.peer_id)[0] == 3
        complete = [countersign(alice.identity, r) for r in receipts]
        reply = await alice.network.request(
            b.worker_id, PROTOCOL_COUNTERSIGN, countersign_batch(complete)
        )
        assert unpack(reply)[0] == {"stored": [True, True, True]}
        assert b.worker.unpaid(alice.peer_id) == (0, 0)
        held = {r.receipt_id for r in b.worker.receipts.receipts()}
        assert {r.receipt_id for r in complete} <= held
        stored = await client.send_countersigned_batch(
            alice.network, b.worker_id, complete, timeout=10
        )
        assert stored == [False, False, False]


async def test_a_batch_with_one_bad_receipt_is_refused_whole(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Every receipt of a batch is checked before any is taken: one naming another requester,
    or sizes that do not cut the body into receipts, or too many, refuse the request."""
    async with bench(price=1.0) as b:
        alice, mallory = await b.requester("alice"), await b.requester("mallory")
        mine = countersign(
            mallory.identity, await run(b, mallory, matmul_operands(), shard=0, quote=1.0)
        )
        theirs = countersign(
            alice.identity, await run(b, alice, matmul_operands(), shard=0, quote=1.0)
        )
        with pytest.raises(RemoteError, match="other peers"):
            await mallory.network.request(
                b.worker_id, PROTOCOL_COUNTERSIGN, countersign_batch([mine, theirs])
            )
        assert not b.worker.receipts.receipts()
        data = mine.encode()
        for sizes in ([len(data) + 1], [len(data) - 1], [], [True], [len(data)] * 33, "x"):
            with pytest.raises(RemoteError, match="field 'receipts'"):
                await mallory.network.request(
                    b.worker_id, PROTOCOL_COUNTERSIGN, pack({"receipts": sizes}, data)
                )
        assert not b.worker.receipts.receipts()


async def test_a_receipt_enters_the_ledger_once_however_often_it_is_delivered(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Only a receipt new to this worker goes on to its ledger: delivered again (alone or in
    a batch), or countersigned again with other bytes, it is not another payment (a review:
    re-signed copies of one shard each became a ledger entry)."""
    async with bench(price=1.0) as b:
        alice = await b.requester("alice")
        entered: list[str] = []

        async def on_receipt(receipt: Receipt) -> None:
            entered.append(receipt.receipt_id)

        b.worker._on_receipt = on_receipt
        complete = countersign(
            alice.identity, await run(b, alice, matmul_operands(), shard=0, quote=1.0)
        )
        assert await client.send_countersigned(alice.network, b.worker_id, complete, timeout=5)
        assert not await client.send_countersigned(alice.network, b.worker_id, complete, timeout=5)
        assert await client.send_countersigned_batch(
            alice.network, b.worker_id, [complete, complete], timeout=5
        ) == [False, False]
        assert entered == [complete.receipt_id]


async def test_each_run_of_one_shard_is_paid_on_its_own(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A requester running one shard again and again on one worker pays for every run: each
    run is reserved on its own (job, shard, start), so each countersigned receipt is new and
    goes on to the ledger. (A hostile review, 2026-12-06: the store keyed receipts without the
    run, so every run after the first answered "stored: false", never reached the ledger, and
    still released its reservation: unlimited work for one payment.)"""
    async with bench(price=1.0, unpaid_shards=2) as b:
        mallory = await b.requester("mallory")
        entered: list[Receipt] = []

        async def on_receipt(receipt: Receipt) -> None:
            entered.append(receipt)

        b.worker._on_receipt = on_receipt
        operands = matmul_operands()  # the same shard each time: only the run differs
        answers = []
        for _ in range(4):
            receipt = await run(b, mallory, operands, shard=0, quote=1.0)
            complete = countersign(mallory.identity, receipt)
            answers.append(
                await client.send_countersigned(mallory.network, b.worker_id, complete, timeout=5)
            )
            await trio.sleep(1)
        assert answers == [True] * 4
        assert len({r.body.started for r in entered}) == len(entered) == 4
        assert b.worker.unpaid(mallory.peer_id) == (0, 0)


@pytest.mark.parametrize("copies", ["twice in one batch", "in a batch and alone at once"])
async def test_a_receipt_delivered_twice_at_once_buys_nothing_past_the_credit(
    autojump_clock: trio.testing.MockClock, copies: str
) -> None:
    """One countersigned receipt delivered twice at once: the copy that finds it stored
    waits for the delivery storing it, rather than release the run while that one's ledger
    write is still queued. A shard asked for meanwhile is judged against the credit left once
    the first is paid (a hostile review, 2026-12-06: the copy released the run at once, and a
    requester with credit for one shard got a second)."""
    operands = matmul_operands()
    cost = cost_of(operands, 1.0)
    spent: dict[str, int] = {}

    def credit(peer: str) -> int:
        return cost - spent.get(peer, 0)  # enough for one shard

    async with bench(price=1.0, credit=credit) as b:

        async def slow_ledger(receipt: Receipt) -> None:
            await trio.sleep(0.5)  # the ledger's own commit
            requester = receipt.body.requester
            spent[requester] = spent.get(requester, 0) + receipt.body.cost_nano

        b.worker._on_receipt = slow_ledger
        mallory = await b.requester("mallory")
        complete = countersign(
            mallory.identity, await run(b, mallory, operands, shard=0, quote=1.0)
        )
        second: list[object] = []

        async def deliver() -> None:
            if copies == "twice in one batch":
                answers = await client.send_countersigned_batch(
                    mallory.network, b.worker_id, [complete, complete], timeout=5
                )
                assert sorted(answers) == [False, True]
                return
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    partial(
                        client.send_countersigned,
                        mallory.network,
                        b.worker_id,
                        complete,
                        timeout=5,
                    )
                )
                nursery.start_soon(
                    partial(
                        client.send_countersigned_batch,
                        mallory.network,
                        b.worker_id,
                        [complete],
                        timeout=5,
                    )
                )

        async def run_again() -> None:
            await trio.sleep(0.1)  # while the first receipt's ledger write is queued
            try:
                second.append(await run(b, mallory, operands, shard=1, quote=1.0))
            except RemoteError as exc:
                second.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(deliver)
            nursery.start_soon(run_again)
        assert isinstance(second[0], RemoteError) and CREDIT_REFUSED in str(second[0])
        assert spent == {mallory.peer_id: cost}


async def test_a_copy_waiting_for_a_delivery_that_failed_stores_the_receipt_itself(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A copy of a receipt that waited for another delivery of it does not take that one's
    outcome for its own: when the other's store failed (a disk error), the copy stores the
    receipt and enters it into the ledger (a review: it answered "not new", and the receipt
    reached neither)."""
    async with bench(price=1.0) as b:
        alice = await b.requester("alice")
        entered: list[Receipt] = []

        async def on_receipt(receipt: Receipt) -> None:
            entered.append(receipt)

        b.worker._on_receipt = on_receipt
        complete = countersign(
            alice.identity, await run(b, alice, matmul_operands(), shard=0, quote=1.0)
        )
        add_async = b.worker.receipts.add_async
        calls = []

        async def failing_once(receipt: Receipt, run_blocking: Any) -> bool:
            calls.append(receipt)
            if len(calls) == 1:
                await trio.sleep(0.5)
                raise OSError("disk I/O error")
            return await add_async(receipt, run_blocking)

        b.worker.receipts.add_async = failing_once  # type: ignore[method-assign]
        answers: list[bool] = []

        async def deliver(after: float) -> None:
            await trio.sleep(after)
            try:
                answers.append(
                    await client.send_countersigned(alice.network, b.worker_id, complete, timeout=5)
                )
            except RemoteError:  # the failed store: the worker's internal error
                answers.append(False)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(deliver, 0.0)
            nursery.start_soon(deliver, 0.1)  # while the first is storing
        assert sorted(answers) == [False, True]
        assert [r.receipt_id for r in entered] == [complete.receipt_id]
        assert b.worker.receipts.count() == 1


async def test_a_countersign_cut_off_while_storing_still_releases_what_it_pays(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A countersign whose handler is cut off (its deadline) while the store's commit is slow
    releases the shard's reservation once that wait ends: nothing stays owed, to count as
    unpaid work later (a review: stored, yet still owed)."""
    async with bench(price=1.0) as b:
        alice = await b.requester("alice")
        receipts = [await run(b, alice, matmul_operands(), shard=i, quote=1.0) for i in range(2)]
        assert len(b.worker._owed.get(alice.peer_id, {})) == 2
        add_async = b.worker.receipts.add_async

        async def slow_add(receipt: Receipt, run_blocking: Any) -> bool:
            await trio.sleep(30)  # past the handler's 10 s deadline
            return await add_async(receipt, run_blocking)

        b.worker.receipts.add_async = slow_add  # type: ignore[method-assign]
        complete = [countersign(alice.identity, r) for r in receipts]
        # Answered or reset, whichever: what matters is what the worker still holds after.
        await client.deliver_countersigned(
            alice.network, b.worker_id, complete, timeout=60, batch=True
        )
        await trio.sleep(60)
        assert not b.worker._owed.get(alice.peer_id)


async def test_a_download_chunk_does_not_keep_the_stored_array_alive(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A download answer holds a copy of its chunk, not a view of the stored array: an answer
    waiting behind others on a slow reader's lane would otherwise keep the whole array (up to
    1 GiB) alive after the store dropped it (a review)."""
    async with bench(price=1.0) as b:
        array = RNG.standard_normal((256, 1024)).astype("float32")
        digest = b.worker.operands.put(array)
        request = pack({"hash": digest, "offset": 0, "length": 1})
        answer = await b.worker._on_download("peer", request)
        parts = answer.parts if hasattr(answer, "parts") else [memoryview(answer)]
        assert not any(isinstance(part.obj, np.ndarray) for part in parts)


# -- uploads --------------------------------------------------------------------------------

#: An operand of 64 MiB as announced; the attacker sends none of its bytes.
BIG = 64 << 20


def announced(index: int, nbytes: int = BIG) -> dict[str, object]:
    """The description of an array the attacker never sends (a made-up hash)."""
    return {"hash": f"{index:064x}", "dtype": "float32", "shape": [nbytes // 4]}


async def start_empty_upload(network: MemNetwork, worker: str, index: int) -> None:
    """Announce an array of BIG bytes with an empty first chunk."""
    await network.request(
        worker, PROTOCOL_UPLOAD, pack({"array": announced(index), "offset": 0}, b"")
    )


async def test_many_uploads_that_start_empty_cannot_pass_the_cap(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The attack that took a worker from 145 MiB to 2.5 GiB: many uploads announce large
    arrays and start empty. The worker reserves what each announces, one peer gets at most
    its share, all peers together at most the total; an honest upload evicts the stalled
    ones it needs room from, and the rest expire on the worker's timer (no request needed)."""
    async with bench() as b:
        mallory, trudy, alice = (
            await b.requester("mallory"),
            await b.requester("trudy"),
            await b.requester("alice"),
        )
        per_peer = MAX_PENDING_UPLOAD_BYTES_PER_PEER // BIG
        for index in range(per_peer):
            await start_empty_upload(mallory.network, b.worker_id, index)
        assert b.worker.reserved_upload_bytes == per_peer * BIG
        with pytest.raises(RemoteError, match="busy"):
            await start_empty_upload(mallory.network, b.worker_id, per_peer)
        # A second attacker may take the rest of the total, never more.
        rest = (MAX_PENDING_UPLOAD_BYTES - per_peer * BIG) // BIG
        for index in range(rest):
            await start_empty_upload(trudy.network, b.worker_id, 1000 + index)
        with pytest.raises(RemoteError, match="busy"):
            await start_empty_upload(trudy.network, b.worker_id, 2000)
        assert b.worker.reserved_upload_bytes <= MAX_PENDING_UPLOAD_BYTES
        # An honest upload, moving at an honest rate, evicts the stalled ones it needs room
        # from (the slowest first), and only those.
        honest = RNG.standard_normal((512, 512)).astype("float32")
        await client.upload(alice.network, b.worker_id, honest, timeout=5)
        assert meta_of(honest).digest in b.worker.operands
        assert b.worker.stats.uploads_evicted == 1
        # Nobody sends anything: the worker's own timer frees the other reservations.
        await trio.sleep(UPLOAD_IDLE_TIMEOUT + HOUSEKEEPING_INTERVAL)
        assert b.worker.reserved_upload_bytes == 0
        assert b.worker.stats.uploads_expired == per_peer + rest - 1


async def test_upload_reservations_are_released_when_uploads_end(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Completed, corrupted and out-of-order uploads all give their reservation back."""
    async with bench() as b:
        alice = await b.requester("alice")
        array = RNG.standard_normal((1536, 1024)).astype("float32")  # 6 MiB: two chunks
        meta = meta_of(array)
        await client.upload(alice.network, b.worker_id, array, timeout=5)
        assert b.worker.reserved_upload_bytes == 0
        # Bytes whose hash does not match.
        wrong = np.ones((4, 4), dtype="float32")
        fake = {**meta_of(wrong).to_json(), "hash": "0" * 64}
        with pytest.raises(RemoteError, match="hash mismatch"):
            await alice.network.request(
                b.worker_id, PROTOCOL_UPLOAD, pack({"array": fake, "offset": 0}, wrong.tobytes())
            )
        assert b.worker.reserved_upload_bytes == 0
        # A chunk out of order after a good start.
        other = RNG.standard_normal((1536, 1024)).astype("float32")
        described = meta_of(other).to_json()
        data = other.tobytes()
        await alice.network.request(
            b.worker_id, PROTOCOL_UPLOAD, pack({"array": described, "offset": 0}, data[:1024])
        )
        assert b.worker.reserved_upload_bytes == other.nbytes
        with pytest.raises(RemoteError, match="in order"):
            await alice.network.request(
                b.worker_id, PROTOCOL_UPLOAD, pack({"array": described, "offset": 4096}, b"x")
            )
        assert b.worker.reserved_upload_bytes == 0
        assert meta.digest in b.worker.operands


async def test_a_node_runs_the_worker_timer(autojump_clock: trio.testing.MockClock) -> None:
    """``Node.running`` starts the worker's own loop: an idle upload to a node expires with no
    further request."""
    from tests.test_virtual_time import cluster

    async with cluster(["requester", "worker"]) as c:
        worker = await c.start("worker", "WEU")
        requester = await c.start("requester", "WEU", serve=False)
        await c.settle()
        await start_empty_upload(c.world.network(requester.peer_id), worker.peer_id, 0)
        assert worker.worker.reserved_upload_bytes == BIG
        await trio.sleep(UPLOAD_IDLE_TIMEOUT + HOUSEKEEPING_INTERVAL)
        assert worker.worker.reserved_upload_bytes == 0
        assert worker.worker.stats.uploads_expired == 1


async def test_uploads_in_progress_are_spooled_to_disk_not_held_in_memory(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """With a spool directory (a production node's ``uploads/``) and its memory share for
    uploads used up (here: none at all), a multi-chunk upload in progress is written to an
    unnamed file there, not kept in memory: what peers announce (up to the reservation cap)
    costs disk, while the worker's memory holds one chunk at a time. The finished array is
    read back, checked against its hash and stored."""
    async with bench() as b:
        b.worker.spool_dir = tmp_path
        b.worker.upload_memory_bytes = 0
        alice = await b.requester("alice")
        array = RNG.standard_normal((3 * CHUNK_BYTES // 4 // 1024 + 1, 1024)).astype("float32")
        meta = meta_of(array)
        data = memoryview(array).cast("B")
        first = pack({"array": meta.to_json(), "offset": 0}, bytes(data[:CHUNK_BYTES]))
        await alice.network.request(b.worker_id, PROTOCOL_UPLOAD, first)
        (pending,) = b.worker._pending.values()
        assert pending.buffer._memory is None and pending.buffer.size == CHUNK_BYTES
        assert os.fstat(pending.buffer._file.fileno()).st_size == CHUNK_BYTES
        for offset in range(CHUNK_BYTES, meta.nbytes, CHUNK_BYTES):
            chunk = bytes(data[offset : offset + CHUNK_BYTES])
            message = pack({"array": meta.to_json(), "offset": offset}, chunk)
            await alice.network.request(b.worker_id, PROTOCOL_UPLOAD, message)
        assert meta.digest in b.worker.operands
        np.testing.assert_array_equal(b.worker.operands.get(meta.digest), array)
        assert b.worker.reserved_upload_bytes == 0


async def test_uploads_wait_in_memory_within_the_workers_share_and_spool_beyond_it(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """Spooling costs 3-5 times the CPU of memory, so uploads in progress wait in memory
    while they fit the worker's memory share for them (reserved when an upload starts, at the
    size it announces), one sender at most half of it; the rest spool. Finishing an upload
    gives its share back."""
    array = RNG.standard_normal((2 * CHUNK_BYTES // 4 // 1024 + 1, 1024)).astype("float32")
    meta = meta_of(array)
    data = memoryview(array).cast("B")

    def first_chunk(of: np.ndarray) -> bytes:
        return pack({"array": meta_of(of).to_json(), "offset": 0},
                    bytes(memoryview(of).cast("B")[:CHUNK_BYTES]))  # fmt: skip

    async with bench() as b:
        b.worker.spool_dir = tmp_path
        b.worker.upload_memory_bytes = 2 * meta.nbytes + 1
        alice, mallory = await b.requester("alice"), await b.requester("mallory")
        # Mallory's first upload fits her half; her second does not, and goes to disk.
        other = array + 1
        for upload in (array, other):
            await mallory.network.request(b.worker_id, PROTOCOL_UPLOAD, first_chunk(upload))
        spooled = {p.meta.digest: p.buffer.spooled for p in b.worker._pending.values()}
        assert spooled == {meta.digest: False, meta_of(other).digest: True}
        # Alice's upload still waits in memory, and completes from there.
        await alice.network.request(b.worker_id, PROTOCOL_UPLOAD, first_chunk(array))
        mine = b.worker._pending[(alice.peer_id, meta.digest)]
        assert not mine.buffer.spooled and mine.memory == meta.nbytes
        for offset in range(CHUNK_BYTES, meta.nbytes, CHUNK_BYTES):
            chunk = bytes(data[offset : offset + CHUNK_BYTES])
            message = pack({"array": meta.to_json(), "offset": offset}, chunk)
            await alice.network.request(b.worker_id, PROTOCOL_UPLOAD, message)
        np.testing.assert_array_equal(b.worker.operands.get(meta.digest), array)
        # Its share is back: a third sender's upload fits in memory again.
        assert b.worker._memory_total == meta.nbytes
        trudy = await b.requester("trudy")
        await trudy.network.request(b.worker_id, PROTOCOL_UPLOAD, first_chunk(other))
        assert not b.worker._pending[(trudy.peer_id, meta_of(other).digest)].buffer.spooled
        assert b.worker._memory_total == 2 * meta.nbytes
        # An upload of one chunk or less stays in memory, share or no share (its bytes come
        # as one message, which the host's budgets bound), as before the share existed.
        b.worker.upload_memory_bytes = 0
        small = RNG.standard_normal((CHUNK_BYTES // 8, 1)).astype("float32")  # half a chunk
        half = memoryview(small).cast("B")[: small.nbytes // 2]
        message = pack({"array": meta_of(small).to_json(), "offset": 0}, bytes(half))
        await trudy.network.request(b.worker_id, PROTOCOL_UPLOAD, message)
        assert not b.worker._pending[(trudy.peer_id, meta_of(small).digest)].buffer.spooled


def test_an_upload_buffer_closed_during_an_append_is_released_when_it_ends() -> None:
    """An eviction or an expiry (on the event loop) closing an upload while its chunk is being
    hashed and stored on a thread neither waits for that chunk (the event loop would stall)
    nor pulls the buffer from under it (a review found a close landing mid-append
    re-allocating the whole buffer): the append finishes and then gives the memory back."""
    from mtor_p2p.compute.worker import _UploadBuffer
    from mtor_p2p.records.arrays import ArrayMeta

    buffer = _UploadBuffer(ArrayMeta("0" * 64, "float32", (4 * CHUNK_BYTES // 4,)), None,
                           in_memory=True)  # fmt: skip
    buffer.append(b"\0" * CHUNK_BYTES)  # the buffer is allocated
    hashing, go_on = threading.Event(), threading.Event()
    hasher = buffer._hasher

    class Slow:
        def update(self, chunk: bytes) -> None:
            hashing.set()
            go_on.wait(5)
            hasher.update(chunk)

    buffer._hasher = Slow()
    appending = threading.Thread(target=buffer.append, args=(b"\1" * CHUNK_BYTES,))
    appending.start()
    assert hashing.wait(5)
    closing = threading.Thread(target=buffer.close)
    closing.start()
    closing.join(2)
    assert not closing.is_alive()  # returned at once, the append still in progress
    assert buffer._memory is not None  # still the append's to write into
    refused: list[Exception] = []

    def late_append() -> None:
        try:
            buffer.append(b"x")
        except ValueError as exc:
            refused.append(exc)

    late = threading.Thread(target=late_append)
    late.start()
    late.join(2)
    assert not late.is_alive() and refused  # refused at once, not after the append running
    go_on.set()
    appending.join(5)
    assert not appending.is_alive()
    assert buffer.written == 2 * CHUNK_BYTES  # the append in progress completed whole
    assert buffer._memory is None and buffer._whole is None  # and then gave it all back
    buffer.close()  # closing again is harmless


def test_an_upload_buffer_closed_between_appends_is_released_at_once(tmp_path) -> None:
    from mtor_p2p.compute.worker import _UploadBuffer
    from mtor_p2p.records.arrays import ArrayMeta

    buffer = _UploadBuffer(ArrayMeta("0" * 64, "float32", (4 * CHUNK_BYTES // 4,)), tmp_path,
                           in_memory=False)  # fmt: skip
    buffer.append(b"\0" * CHUNK_BYTES)
    assert buffer.spooled
    buffer.close()
    assert buffer._file is None
    with pytest.raises(ValueError):
        buffer.append(b"x")


def _spool_onto_a_full_disk(buffer: Any) -> None:
    """Point a spool file's descriptor at /dev/full: every later write fails with ENOSPC."""
    full = os.open("/dev/full", os.O_WRONLY)
    try:
        os.dup2(full, buffer._file.fileno())
    finally:
        os.close(full)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
async def test_a_dropped_upload_on_a_full_disk_gives_its_reservation_back(tmp_path) -> None:
    """A sender's tiny chunks spooled to disk, then the disk fills and the sender breaks the
    order: the drop neither raises on the worker's event loop nor keeps the reservation (a
    review found buffered bytes made closing the file fail, leaking it for good)."""
    array = RNG.standard_normal((2 * CHUNK_BYTES // 4 + 1024,)).astype("float32")
    meta, data = meta_of(array), bytes(memoryview(array).cast("B"))
    async with bench() as b:
        b.worker.spool_dir = tmp_path
        b.worker.upload_memory_bytes = 0  # everything spools
        mallory = await b.requester("mallory")
        for offset in range(20):  # 1-byte chunks, in order
            message = pack({"array": meta.to_json(), "offset": offset}, data[offset : offset + 1])
            await mallory.network.request(b.worker_id, PROTOCOL_UPLOAD, message)
        key = (mallory.peer_id, meta.digest)
        assert b.worker._pending[key].buffer.spooled
        assert b.worker.reserved_upload_bytes == meta.nbytes
        _spool_onto_a_full_disk(b.worker._pending[key].buffer)
        with pytest.raises(RemoteError, match="order"):
            message = pack({"array": meta.to_json(), "offset": 5}, b"x")
            await mallory.network.request(b.worker_id, PROTOCOL_UPLOAD, message)
        assert key not in b.worker._pending
        assert b.worker.reserved_upload_bytes == 0


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
async def test_an_upload_expiring_on_a_full_disk_does_not_stop_the_worker(
    tmp_path, autojump_clock: trio.testing.MockClock
) -> None:
    array = RNG.standard_normal((2 * CHUNK_BYTES // 4 + 1024,)).astype("float32")
    meta, data = meta_of(array), bytes(memoryview(array).cast("B"))
    async with bench() as b:
        b.worker.spool_dir = tmp_path
        b.worker.upload_memory_bytes = 0
        mallory = await b.requester("mallory")
        for offset in range(10):
            message = pack({"array": meta.to_json(), "offset": offset}, data[offset : offset + 1])
            await mallory.network.request(b.worker_id, PROTOCOL_UPLOAD, message)
        _spool_onto_a_full_disk(b.worker._pending[(mallory.peer_id, meta.digest)].buffer)
        await trio.sleep(2 * UPLOAD_IDLE_TIMEOUT)  # idle: the worker's own loop expires it
        assert b.worker.reserved_upload_bytes == 0 and not b.worker._pending
        # And it still serves: a fresh upload from another sender goes through.
        alice = await b.requester("alice")
        small = RNG.standard_normal((64,)).astype("float32")
        message = pack({"array": meta_of(small).to_json(), "offset": 0}, small.tobytes())
        assert unpack(await alice.network.request(b.worker_id, PROTOCOL_UPLOAD, message))


def test_an_upload_buffer_tolerates_a_file_that_fails_to_close(tmp_path) -> None:
    from mtor_p2p.compute.worker import _UploadBuffer
    from mtor_p2p.records.arrays import ArrayMeta

    buffer = _UploadBuffer(ArrayMeta("0" * 64, "float32", (4 * CHUNK_BYTES // 4,)), tmp_path,
                           in_memory=False)  # fmt: skip
    buffer.append(b"\0" * 10)

    class Failing:
        def close(self) -> None:
            raise OSError(28, "No space left on device")

    real, buffer._file = buffer._file, Failing()
    buffer.close()  # logged, not raised
    real.close()
    assert buffer._file is None


async def test_identities_uploading_at_an_honest_rate_keep_only_their_share(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Two identities fill the whole upload cap with uploads that move at an honest rate (so
    none is evicted as stalled). A newcomer still gets in: it may take room up to an equal
    share of the cap, from the sender holding the most, that sender's newest upload first."""
    async with bench() as b:
        mallory, trudy, alice = (
            await b.requester("mallory"),
            await b.requester("trudy"),
            await b.requester("alice"),
        )
        chunk = b"x" * CHUNK_BYTES
        per_peer = MAX_PENDING_UPLOAD_BYTES_PER_PEER // BIG
        for offset, who in ((0, mallory), (1000, trudy)):
            for index in range(per_peer):
                message = pack({"array": announced(offset + index), "offset": 0}, chunk)
                await who.network.request(b.worker_id, PROTOCOL_UPLOAD, message)
        assert b.worker.reserved_upload_bytes == MAX_PENDING_UPLOAD_BYTES
        honest = RNG.standard_normal((512, 512)).astype("float32")
        await client.upload(alice.network, b.worker_id, honest, timeout=5)
        assert meta_of(honest).digest in b.worker.operands
        assert b.worker.stats.uploads_evicted == 1
        # The newest upload of one of the two was the one to go; the other keeps all of its.
        held = sorted(len([p for p in b.worker._pending.values() if p.sender == w.peer_id])
                      for w in (mallory, trudy))  # fmt: skip
        assert held == [per_peer - 1, per_peer]


@pytest.mark.parametrize("header_pad", range(4))
async def test_a_one_chunk_upload_from_a_sender_that_does_not_pad_is_held_aligned(
    autojump_clock: trio.testing.MockClock, header_pad: int
) -> None:
    """(A review's finding.) A one-chunk upload is held as a view of its message: from a
    sender that does not pad its header (an older peer, or one that will not), it would be
    held unaligned and copied by NumPy for every product on it, by every requester whose
    operand has that hash. It is copied once, aligned, instead."""
    array = RNG.standard_normal((64, 32)).astype("float32")
    meta = meta_of(array)
    async with bench() as b:
        mallory = await b.requester("mallory")
        # pack() does not pad: the body lands wherever the header ends ("x" moves it).
        header = {"array": meta.to_json(), "offset": 0, "x": "x" * header_pad}
        reply = await mallory.network.request(
            b.worker_id, PROTOCOL_UPLOAD, pack(header, array.tobytes())
        )
        assert unpack(reply)[0]["complete"] is True
        held = b.worker.operands.get(meta.digest)
        assert held is not None and held.ctypes.data % 16 == 0 and held.flags.aligned
        np.testing.assert_array_equal(held, array)


# -- carried operands checked beside the kernel ---------------------------------------------


@pytest.mark.parametrize("runtime", ["production", "simulated"])
async def test_carried_bytes_that_do_not_match_their_hash_are_refused_and_their_sender_marked(
    autojump_clock: trio.testing.MockClock, runtime: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run served alone has its carried operands hashed beside its kernel (on a helper
    thread in production). One whose bytes do not match the hash it names is refused all the
    same, once its kernel has run: nothing signed, kept, or given to the backend under the
    hash it named; the kernel it cost stays owed (unpaid work, as a shard never
    countersigned). From then on its sender's carried operands are checked before the kernel
    runs, as they are for a run that asks the worker to keep one."""
    from mtor_p2p.compute import worker as worker_module

    async with bench() as b:
        if runtime == "production":
            autojump_clock.autojump_threshold = 0.2  # real threads: see the test above
            b.worker._runtime = Runtime.production()
            b.worker.executor._runtime = b.worker._runtime
        kernels: list[dict[str, str]] = []
        execute = b.worker.executor.execute

        async def counted(kernel: Any, arrays: Any, keys: dict[str, str]) -> Any:
            kernels.append(dict(keys))
            return await execute(kernel, arrays, keys)

        b.worker.executor.execute = counted  # type: ignore[method-assign]

        async def carry(who: Requester, job: str, keep: list[str], *, lie: bool) -> bytes:
            operands = matmul_operands()
            sent = dict(operands)
            if lie:
                sent["b"] = operands["b"].copy()
                sent["b"][0, 0] += 1.0  # the bytes sent are not the ones the hash names
            header = {
                "ledger_rules": LEDGER_RULES,
                "job_id": job, "shard": 0, "kernel": "matmul", "inline": ["a", "b"],
                "operands": {name: meta_of(x).to_json() for name, x in operands.items()},
                "keep": keep,
            }  # fmt: skip
            body = [memoryview(sent[name]).cast("B") for name in ("a", "b")]
            return await who.network.request(b.worker_id, PROTOCOL_RUN, pack_parts(header, body))

        honest, mallory, eve = [await b.requester(n) for n in ("honest", "mallory", "eve")]
        await carry(honest, job_of(honest), [], lie=False)  # a lone run: checked beside
        assert len(kernels) == 1 and kernels[0] == {}  # unchecked operands get no key
        assert not b.worker._hash_liars

        with pytest.raises(RemoteError, match="operand 'b': hash mismatch"):
            await carry(mallory, job_of(mallory), [], lie=True)
        assert len(kernels) == 2  # it ran, beside the check
        assert list(b.worker._hash_liars) == [mallory.peer_id]
        assert len(b.worker._owed.get(mallory.peer_id, {})) == 1  # the kernel it cost
        assert b.worker.stats.shards_run == 1 and b.worker.stats.shards_failed == 0

        with pytest.raises(RemoteError, match="operand 'b': hash mismatch"):
            await carry(mallory, "ee" * 32, [], lie=True)
        assert len(kernels) == 2  # checked first this time: no kernel
        with pytest.raises(RemoteError, match="operand 'b': hash mismatch"):
            await carry(eve, job_of(eve), ["b"], lie=True)  # asks to keep B: checked first
        assert len(kernels) == 2
        assert not b.worker.operands._arrays
        assert eve.peer_id in b.worker._hash_liars and not b.worker._owed.get(eve.peer_id)

        # A run refused before its kernel (here: no credit for it) costs no hash at all.
        checks: list[int] = []
        check = worker_module._check_carried
        monkeypatch.setattr(worker_module, "_check_carried", lambda c: checks.append(1) or check(c))
        b.worker._credit = lambda peer: 0
        with pytest.raises(RemoteError, match="credit"):
            await carry(honest, "ab" * 32, [], lie=False)
        assert checks == [] and len(kernels) == 2


async def test_checks_beside_the_kernel_back_off_while_they_keep_the_loop_waiting(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A check beside a kernel that was not done with it, by more than
    CHECK_BESIDE_MAX_WAIT, means the cores were busy: the next runs are checked first (none
    of them runs its kernel on bytes that do not match), for a stretch that doubles while such
    waits recur and halves back with each run that did not wait."""
    from mtor_p2p.compute import worker as worker_module

    async with bench() as b:
        w = b.worker
        first = worker_module.CHECK_FIRST_RUNS
        w._note_wait(worker_module.CHECK_BESIDE_MAX_WAIT * 2)
        assert (w._check_first_runs, w._check_first_backoff) == (first, 2 * first)
        w._note_wait(worker_module.CHECK_BESIDE_MAX_WAIT * 2)
        assert (w._check_first_runs, w._check_first_backoff) == (2 * first, 4 * first)
        w._note_wait(0.0)
        assert w._check_first_backoff == 2 * first
        for _ in range(10):
            w._note_wait(worker_module.CHECK_BESIDE_MAX_WAIT * 2)
        assert w._check_first_backoff == worker_module.CHECK_FIRST_MAX_RUNS

        w._check_first_runs = 1
        kernels = 0
        execute = w.executor.execute

        async def counted(*args: Any) -> Any:
            nonlocal kernels
            kernels += 1
            return await execute(*args)

        w.executor.execute = counted  # type: ignore[method-assign]
        mallory = await b.requester("mallory")
        operands = matmul_operands()
        header = {
            "ledger_rules": LEDGER_RULES,
            "job_id": job_of(mallory), "shard": 0, "kernel": "matmul", "inline": ["a", "b"],
            "operands": {name: meta_of(x).to_json() for name, x in operands.items()},
            "keep": [],
        }  # fmt: skip
        wrong = operands["b"] + 1.0
        body = [memoryview(operands["a"]).cast("B"), memoryview(wrong).cast("B")]
        with pytest.raises(RemoteError, match="operand 'b': hash mismatch"):
            await mallory.network.request(b.worker_id, PROTOCOL_RUN, pack_parts(header, body))
        assert kernels == 0  # checked first: its kernel never ran
        assert w._check_first_runs == 0 and not w._hash_liars  # caught before any kernel
