"""Ledger convergence between real py-libp2p hosts on loopback: pull sync and gossip."""

from __future__ import annotations

import itertools

import pytest
import trio
import trio.testing

from mtor_p2p.clock import NetClock
from mtor_p2p.identity import Identity
from mtor_p2p.ledger.service import SYNC_PROTOCOL, LedgerService
from mtor_p2p.ledger.store import Ledger
from mtor_p2p.network import RemoteError
from mtor_p2p.records.arrays import pack
from mtor_p2p.wire import canonical_json
from tests.conftest import open_networks
from tests.ledger_data import PEERS, genesis, receipt, stake

A, B, C, D = PEERS


def service(network, tmp_path, name, gen) -> LedgerService:
    ledger = Ledger(tmp_path / f"{name}.sqlite", gen)
    return LedgerService(network, Identity.generate(), NetClock(), ledger, sync_interval=1.0)


async def test_pull_sync_brings_a_peer_to_the_same_balances(tmp_path):
    gen = genesis()
    async with open_networks(2) as (net_a, net_b):
        a, b = service(net_a, tmp_path, "a", gen), service(net_b, tmp_path, "b", gen)
        wires = [receipt(A, C, shard=i, price=0.5) for i in range(2500)] + [stake(B, 10, gen)]
        a.ledger.ingest(wires)
        assert await b.sync_from(net_a.peer_id) == len(wires)  # several batches
        assert b.ledger.state().balances == a.ledger.state().balances
        assert b.ledger.state().stakes == a.ledger.state().stakes
        # The cursor remembers where we stopped: only what is new comes next time.
        a.ledger.ingest([receipt(B, D)])
        assert await b.sync_from(net_a.peer_id) == 1
        assert await b.sync_from(net_a.peer_id) == 0
        a.ledger.close()
        b.ledger.close()


async def test_gossip_carries_new_receipts_and_stakes(tmp_path):
    gen = genesis()
    async with open_networks(2) as (net_a, net_b):
        a, b = service(net_a, tmp_path, "a", gen), service(net_b, tmp_path, "b", gen)
        async with trio.open_nursery() as nursery:
            await nursery.start(a.run)
            await nursery.start(b.run)
            await trio.sleep(1.5)  # let the GossipSub mesh form
            from mtor_p2p.records.receipts import decode_receipt

            for shard in range(5):
                await a.record_receipt(decode_receipt(receipt(A, C, shard=shard)[1:]))
            with trio.fail_after(15):
                while b.ledger.count("receipt") < 5:
                    await trio.sleep(0.1)
            assert b.ledger.state().balances == a.ledger.state().balances
            nursery.cancel_scope.cancel()


async def test_hostile_sync_requests_get_errors_and_the_peer_keeps_serving(tmp_path):
    gen = genesis()
    async with open_networks(2) as (net_a, net_b):
        a = service(net_a, tmp_path, "a", gen)
        a.ledger.ingest([receipt(A, C)])
        bad_requests = [
            b"not json",
            canonical_json({"after": 0}),
            canonical_json({"after": "0", "genesis": gen.hash, "instance": "", "max": 1}),
            canonical_json({"after": 0, "genesis": "00" * 32, "instance": "", "max": 1 << 20}),
            b"{" * 5000,
        ]
        for request in bad_requests:
            with pytest.raises(RemoteError):
                await net_b.request(net_a.peer_id, SYNC_PROTOCOL, request, timeout=5)
        b = service(net_b, tmp_path, "b", gen)
        assert await b.sync_from(net_a.peer_id) == 1


async def test_forged_entries_from_a_sync_peer_are_dropped(tmp_path):
    gen = genesis()
    good, victim = receipt(A, C), receipt(A, D, price=1.0)
    forged = victim.replace(b'"price":1.0', b'"price":0.0')  # signatures no longer match

    async def lying_peer(sender: str, request: bytes) -> bytes:
        entries = [good, forged]
        header = {"instance": "liar", "next": 2, "more": False, "sizes": [len(e) for e in entries]}
        return pack(header, b"".join(entries))

    async with open_networks(2) as (net_a, net_b):
        net_a.handle(SYNC_PROTOCOL, lying_peer)
        b = service(net_b, tmp_path, "b", gen)
        assert await b.sync_from(net_a.peer_id) == 1
        assert b.ledger.count() == 1
        assert b.ledger.verify()["ok"]


async def test_a_sync_peer_that_never_advances_is_cut_off(tmp_path):
    gen = genesis()
    good = receipt(A, C)

    async def endless_peer(sender: str, request: bytes) -> bytes:
        header = {"instance": "loop", "next": 1, "more": True, "sizes": [len(good)]}
        return pack(header, good)

    async with open_networks(2) as (net_a, net_b):
        net_a.handle(SYNC_PROTOCOL, endless_peer)
        b = service(net_b, tmp_path, "b", gen)
        from mtor_p2p.wire import RecordError

        with trio.fail_after(10), pytest.raises(RecordError, match="advance"):
            await b.sync_from(net_a.peer_id)
        assert b.ledger.count() == 1


async def test_a_sync_answer_with_an_absurd_cursor_is_refused(tmp_path):
    gen = genesis()
    good = receipt(A, C)

    async def absurd_peer(sender: str, request: bytes) -> bytes:
        header = {"instance": "x", "next": 2**64, "more": False, "sizes": [len(good)]}
        return pack(header, good)

    async with open_networks(2) as (net_a, net_b):
        net_a.handle(SYNC_PROTOCOL, absurd_peer)
        b = service(net_b, tmp_path, "b", gen)
        from mtor_p2p.wire import RecordError

        with pytest.raises(RecordError, match="malformed"):
            await b.sync_from(net_a.peer_id)


async def test_a_restarted_peer_resumes_sync_from_its_saved_cursor(tmp_path):
    gen = genesis()
    asked: list[int] = []
    async with open_networks(2) as (net_a, net_b):
        a = service(net_a, tmp_path, "a", gen)
        serve = a._serve_sync

        async def watched(sender: str, request: bytes) -> bytes:
            import json

            asked.append(json.loads(request)["after"])
            return await serve(sender, request)

        net_a.handle(SYNC_PROTOCOL, watched)
        a.ledger.ingest([receipt(A, C, shard=i) for i in range(10)])
        b = service(net_b, tmp_path, "b", gen)
        assert await b.sync_from(net_a.peer_id) == 10
        b.ledger.close()
        # "Restart": a new service on the same ledger file.
        again = LedgerService(
            net_b, Identity.generate(), NetClock(), Ledger(tmp_path / "b.sqlite", gen)
        )
        a.ledger.ingest([receipt(A, C, shard=99)])
        assert await again.sync_from(net_a.peer_id) == 1
        assert asked == [0, 10]  # the second pull started where the first had stopped


async def test_a_sync_peer_serving_only_invalid_entries_is_backed_off(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """On memnet and virtual time: a sync peer whose every answer holds only forged entries is
    pulled with doubling gaps (not every sync interval), counted in stats; once it answers
    valid entries the back-off is gone and it is pulled at the ordinary pace again."""
    from mtor_p2p.memnet import LatencyModel, MemWorld
    from mtor_p2p.runtime import Runtime

    gen = genesis()
    good, victim = receipt(A, C), receipt(A, D, price=1.0)
    forged = victim.replace(b'"price":1.0', b'"price":0.0')  # signatures no longer match
    pulls: list[float] = []
    honest = False

    async def peer(sender: str, request: bytes) -> bytes:
        pulls.append(trio.current_time())
        entries = [good] if honest else [forged, forged]
        header = {"instance": "liar", "next": 1, "more": False, "sizes": [len(e) for e in entries]}
        return pack(header, b"".join(entries))

    world = MemWorld(latency=LatencyModel(default_rtt_ms=10.0))
    liar_net, my_net = world.add_peer(Identity.generate()), world.add_peer(Identity.generate())
    liar_net.handle(SYNC_PROTOCOL, peer)
    await my_net.connect(liar_net.addrs()[0])
    me = LedgerService(
        my_net,
        Identity.generate(),
        NetClock(),
        Ledger(":memory:", gen),
        sync_interval=1.0,
        runtime=Runtime.simulated(1),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(me.run)
        await trio.sleep(300)
        # Every second before the fix (about 300 pulls); now 1, 3, 7, 15, ... seconds in.
        assert 5 <= len(pulls) <= 10, pulls
        gaps = [b - a for a, b in itertools.pairwise(pulls)]
        assert all(later >= 1.8 * earlier for earlier, later in itertools.pairwise(gaps))
        assert me.stats["sync_faults"] == len(pulls)
        assert me.stats["sync_backoff_peers"] == 1
        assert me.ledger.count() == 0
        honest = True
        before = len(pulls)
        with trio.fail_after(gaps[-1] * 2 + 5):
            while len(pulls) == before:
                await trio.sleep(1)
        await trio.sleep(20)
        assert len(pulls) - before >= 10  # about one a second again
        assert me.stats["sync_backoff_peers"] == 0
        assert me.ledger.count() == 1
        nursery.cancel_scope.cancel()
    me.ledger.close()


async def test_a_peer_of_another_network_is_named_once_and_counted(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A node started without the network's genesis beside peers that have it follows a
    network of its own, and nothing told its operator (a new user's walkthrough). Each side
    now warns once, naming its own network and the flag, and counts the other side's peers
    (``balance`` shows the count); their sync refusals are not logged again as failures."""
    import logging

    from mtor_p2p.memnet import LatencyModel, MemWorld
    from mtor_p2p.runtime import Runtime

    world = MemWorld(latency=LatencyModel(default_rtt_ms=10.0))
    nets = [world.add_peer(Identity.generate()) for _ in range(3)]
    for net in nets[1:]:
        await net.connect(nets[0].addrs()[0])
    ours, theirs = genesis(), genesis([5, 5, 5, 5])
    services = [
        LedgerService(
            net,
            Identity.generate(),
            NetClock(),
            Ledger(":memory:", gen),
            sync_interval=1.0,
            runtime=Runtime.simulated(i),
        )
        for i, (net, gen) in enumerate(zip(nets, [ours, theirs, theirs], strict=True))
    ]
    caplog.set_level(logging.INFO, logger="mtor_p2p.ledger.service")
    async with trio.open_nursery() as nursery:
        for ledger_service in services:
            await nursery.start(ledger_service.run)
        await trio.sleep(60)
        assert services[0].stats["other_network_peers"] == 2
        # Only connected peers count: one leaves, and the count follows.
        nets[0].disconnect(nets[2].peer_id)
        await trio.sleep(5)
        assert services[0].stats["other_network_peers"] == 1
        nursery.cancel_scope.cancel()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    # The lone node: one warning though two peers refused it; each of the others: one.
    assert len(warnings) == 3, [r.getMessage() for r in warnings]
    for record in warnings:
        text = record.getMessage()
        assert "follows another network" in text and "--genesis" in text
        assert "mtor-test" in text
        assert "genesis.json in its data directory" in text  # where to find the other's
    assert services[1].stats["other_network_peers"] == 1
    failures = [r.getMessage() for r in caplog.records if "sync from" in r.getMessage()]
    assert not any("differ" in text for text in failures), failures
