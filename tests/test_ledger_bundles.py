"""Receipt entries gossiped in bundles (issue 9): one pubsub message carries the receipts of
shards settled together. The bundle's format and limits, the checks a bundle passes before
it is forwarded or stored, and the budget it draws on, on memnet under the mock clock."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from mtor_p2p.clock import NetClock
from mtor_p2p.ledger.service import (
    BUNDLE_VERSION,
    GOSSIP_BURST,
    MAX_BUNDLE_BYTES,
    MAX_BUNDLE_ENTRIES,
    MAX_GOSSIP_ENTRY,
    LedgerService,
    decode_bundle,
    encode_bundle,
)
from mtor_p2p.ledger.store import Ledger
from mtor_p2p.memnet import LatencyModel, MemWorld
from mtor_p2p.records.receipts import decode_receipt
from mtor_p2p.runtime import Runtime
from mtor_p2p.wire import RecordError
from tests.ledger_data import PEERS, genesis, receipt, stake
from tests.test_virtual_time import EPOCH, ident

A, B, C, D = PEERS


def test_a_bundle_decodes_to_the_entries_it_was_made_of() -> None:
    wires = [receipt(A, C, shard=i) for i in range(5)]
    assert decode_bundle(encode_bundle(wires)) == wires


@pytest.mark.parametrize(
    "data",
    [
        b"",  # nothing
        BUNDLE_VERSION,  # no entry
        b"\x02" + (3).to_bytes(4, "big") + b"abc",  # another version
        BUNDLE_VERSION + b"\x00\x00",  # cut inside a length
        BUNDLE_VERSION + (10).to_bytes(4, "big") + b"abc",  # cut inside an entry
        BUNDLE_VERSION + (0).to_bytes(4, "big"),  # an empty entry
        BUNDLE_VERSION + (MAX_GOSSIP_ENTRY + 1).to_bytes(4, "big") + bytes(MAX_GOSSIP_ENTRY + 1),
        BUNDLE_VERSION + ((1).to_bytes(4, "big") + b"x") * (MAX_BUNDLE_ENTRIES + 1),
        BUNDLE_VERSION + bytes(MAX_BUNDLE_BYTES),  # too large, whatever it holds
    ],
)
def test_a_malformed_bundle_is_refused(data: bytes) -> None:
    with pytest.raises(RecordError):
        decode_bundle(data)


def ledger_peer(world: MemWorld, name: str) -> LedgerService:
    me = ident(name)
    return LedgerService(
        world.add_peer(me),
        me,
        NetClock(epoch_offset=EPOCH),
        Ledger(":memory:", genesis(), instance=name),
        runtime=Runtime.simulated(name),
    )


def receiver() -> tuple[MemWorld, LedgerService]:
    world = MemWorld(latency=LatencyModel(default_rtt_ms=50.0), gossip_hops=1.0, quantum=0.0)
    return world, ledger_peer(world, "bundle receiver")


async def test_a_bundle_passes_only_if_every_entry_would_and_the_budget_covers_all(
    autojump_clock: trio.testing.MockClock,
) -> None:
    _, service = receiver()
    accept, sender = service._accept_bundle, ident("bundler").peer_id
    good = [receipt(A, C, shard=i, price=0.001) for i in range(4)]
    assert accept(sender, encode_bundle(good))
    forged = bytearray(good[1])
    forged[-1] ^= 1  # a signature bit
    assert not accept(sender, encode_bundle([good[0], bytes(forged)]))
    # Receipts only: other kinds travel alone on the ledger topic.
    assert not accept(sender, encode_bundle([good[0], stake(B, 1, service.genesis)]))
    assert not accept(sender, b"\x01garbage")
    assert service.stats["gossip_rejected"] == 3
    # Each entry draws one token: what is left of the burst passes, one more does not.
    spent = 4 + 2  # the good bundle, and the forged one (its budget was taken before checking)
    rest = int(GOSSIP_BURST) - spent
    wires = [receipt(A, C, shard=100 + i, price=0.001) for i in range(MAX_BUNDLE_ENTRIES)]
    while rest >= MAX_BUNDLE_ENTRIES:
        assert accept(sender, encode_bundle(wires))
        rest -= MAX_BUNDLE_ENTRIES
    assert not accept(sender, encode_bundle(wires[: rest + 1]))
    assert accept(sender, encode_bundle(wires[:rest]))
    assert accept(ident("another sender").peer_id, encode_bundle(wires))  # per sender


async def test_receipts_recorded_together_travel_as_one_bundle_and_are_stored(
    autojump_clock: trio.testing.MockClock,
) -> None:
    world, service = receiver()
    publisher = ledger_peer(world, "requester")
    published: list[str] = []
    network = publisher._network
    publish = network.publish

    async def counted(topic: str, data: bytes) -> None:
        published.append(topic)
        await publish(topic, data)

    network.publish = counted  # type: ignore[method-assign]
    receipts = [decode_receipt(receipt(A, C, shard=i, price=0.001)[1:]) for i in range(20)]
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        await nursery.start(publisher.run)
        async with trio.open_nursery() as settling:  # settled together, as the courier does
            for r in receipts:
                settling.start_soon(publisher.record_receipt, r)
        with trio.fail_after(10):
            while service.ledger.count("receipt") < len(receipts):
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert published == [publisher.bundle_topic]  # one message for twenty receipts
    assert service.ledger.state().balances == publisher.ledger.state().balances
