"""The capacity service over real libp2p hosts: spread, forgery, withdrawal, expiry, queries."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from mtor_p2p.capacity.record import capacity_key
from mtor_p2p.capacity.service import CAPACITY_TOPIC, CapacityService, CapacityTiming, Offer
from mtor_p2p.capacity.view import GIB, CapacityQuery, CapacityView
from mtor_p2p.clock import NetClock
from mtor_p2p.identity import Identity
from mtor_p2p.libp2p_host import Libp2pNetwork
from tests.conftest import CPU, GPU, make_record, open_networks

FAST = CapacityTiming(ttl=4.0, announce_interval=1.0, sweep_interval=0.5, prune_interval=0.2)


def offer_for(index: int) -> Offer:
    return Offer(
        devices=(GPU if index % 2 else CPU,),
        tflops=10.0 * (index + 1),
        mem_free=(4 + 8 * index) * GIB,
        load=0.0,
        price=1.0 + index,
    )


@asynccontextmanager
async def running_services(
    networks: list[Libp2pNetwork], timing: CapacityTiming = FAST
) -> AsyncIterator[list[CapacityService]]:
    clock = NetClock()
    async with trio.open_nursery() as nursery:
        services = []
        for index, network in enumerate(networks):
            service = CapacityService(
                network,
                network._identity,
                clock,
                region="WEU" if index % 2 else "EUS",
                offer=lambda i=index: offer_for(i),
                timing=timing,
            )
            await nursery.start(service.run)
            services.append(service)
        yield services
        nursery.cancel_scope.cancel()


async def wait_until(predicate, timeout: float = 15.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.05)


def view_ids(service: CapacityService) -> set[str]:
    return service.view.peer_ids(service._clock.now())


async def test_every_view_converges_and_answers_queries():
    async with open_networks(5) as networks, running_services(networks) as services:
        everyone = {n.peer_id for n in networks}
        await wait_until(lambda: all(view_ids(s) == everyone for s in services))
        now = services[0]._clock.now()
        found = services[0].view.query(CapacityQuery(min_mem_free=12 * GIB, min_tflops=20), now)
        # offers: index i has (4 + 8i) GiB free and 10(i+1) TFLOP/s -> i >= 1 qualify
        assert {r.peer_id for r in found} == {n.peer_id for n in networks[1:]}
        assert [r.tflops for r in found] == sorted((r.tflops for r in found), reverse=True)


async def test_forged_gossip_is_rejected_and_not_forwarded():
    async with open_networks(3) as networks, running_services(networks) as services:
        everyone = {n.peer_id for n in networks}
        await wait_until(lambda: all(view_ids(s) == everyone for s in services))
        victim = Identity.generate()
        now = services[0]._clock.now()
        # networks[2] publishes a record about another peer that it signed itself...
        mallory = networks[2]._identity
        forged = make_record(victim, now=now).to_body()
        from mtor_p2p.capacity.record import RECORD_TYPE
        from mtor_p2p.wire import seal

        await networks[2].publish(CAPACITY_TOPIC, seal(mallory, RECORD_TYPE, forged))
        # ...and an expired record of its own, and bytes that are not a record at all.
        expired = make_record(mallory, now=now - 100, expires=now - 50, seq=10**15)
        await networks[2].publish(CAPACITY_TOPIC, expired.sign(mallory))
        await networks[2].publish(CAPACITY_TOPIC, b"\x00not a record")
        await trio.sleep(2)
        for service in services:
            assert victim.peer_id not in view_ids(service)
            assert mallory.peer_id in view_ids(service)  # its genuine record still stands
        assert sum(n.stats.gossip_rejected for n in networks) >= 3


async def test_dht_refuses_forged_records_and_serves_genuine_ones():
    async with open_networks(4) as networks, running_services(networks) as services:
        now = services[0]._clock.now()
        victim = Identity.generate()
        forged = make_record(victim, now=now).to_body()
        from mtor_p2p.capacity.record import RECORD_TYPE
        from mtor_p2p.wire import seal

        raw = seal(networks[1]._identity, RECORD_TYPE, forged)
        with pytest.raises(Exception):  # noqa: B017 - the local validator refuses before sending
            await networks[1].dht_put(capacity_key(victim.peer_id), raw)
        assert await networks[3].dht_get(capacity_key(victim.peer_id), timeout=3) is None
        # The genuine record is stored once its service has published it: on a loaded machine
        # that may come after the first look (a suite beside a devnet and a benchmark, load
        # 5-11, failed here once), so look again within a generous deadline.
        genuine = None
        with trio.move_on_after(60):
            while genuine is None:
                genuine = await networks[3].dht_get(capacity_key(networks[1].peer_id), timeout=5)
                if genuine is None:
                    await trio.sleep(0.5)
        assert genuine is not None and services[3].offer_raw(genuine) in (True, False)


async def test_stale_record_does_not_roll_a_peer_back():
    identity = Identity.generate()
    view = CapacityView()
    now = 1000.0
    assert view.offer(make_record(identity, now=now, seq=5, tflops=50.0), now)
    assert not view.offer(make_record(identity, now=now, seq=4, tflops=1.0), now)
    assert not view.offer(make_record(identity, now=now, seq=5, tflops=2.0), now)
    assert view.get(identity.peer_id, now).tflops == 50.0


async def test_withdrawn_peer_leaves_every_view_before_its_ttl():
    async with (
        open_networks(4) as networks,
        running_services(
            networks, CapacityTiming(ttl=60, announce_interval=5, sweep_interval=0.5)
        ) as services,
    ):
        everyone = {n.peer_id for n in networks}
        await wait_until(lambda: all(view_ids(s) == everyone for s in services))
        await services[3].withdraw()
        leaver = networks[3].peer_id
        # Well before the 60 s TTL, so it is the withdrawal that travelled (by gossip and the
        # DHT) over real hosts; that it takes one gossip delay is tested on virtual time.
        await wait_until(lambda: all(leaver not in view_ids(s) for s in services[:3]), timeout=30)


async def test_crashed_peer_ages_out_of_every_view():
    """A real host stopped dead (no withdrawal) leaves every survivor's view: nothing in the
    real gossip or DHT keeps its record alive. The exact instant (its record's expiry, within
    a prune interval) is tested on virtual time (tests/test_virtual_time.py)."""
    async with open_networks(2) as networks, running_services(networks) as services:
        crash = trio.CancelScope()
        crashed_id: list[str] = []

        async def doomed_peer(task_status=trio.TASK_STATUS_IGNORED) -> None:
            with crash:
                async with Libp2pNetwork.open(Identity.generate()) as network:
                    await network.connect(networks[0].addrs()[0])
                    async with running_services([network]):
                        crashed_id.append(network.peer_id)
                        task_status.started()
                        await trio.sleep_forever()

        async with trio.open_nursery() as nursery:
            await nursery.start(doomed_peer)
            await wait_until(lambda: all(crashed_id[0] in view_ids(s) for s in services))
            # Cancelling the peer's scope stops it dead: no withdrawal is sent.
            crash.cancel()
        await wait_until(lambda: all(crashed_id[0] not in view_ids(s) for s in services))


async def test_view_is_bounded():
    view = CapacityView(max_peers=3)
    now = 1000.0
    identities = [Identity.generate() for _ in range(5)]
    accepted = [view.offer(make_record(i, now=now), now) for i in identities]
    assert accepted == [True, True, True, False, False]
    # Once records expire, newcomers fit again.
    assert view.offer(make_record(identities[4], now=now + 100, seq=2), now + 100)
    assert len(view) == 1


def test_timing_rejects_renewal_slower_than_half_the_ttl():
    with pytest.raises(ValueError, match="half"):
        CapacityTiming(ttl=10, announce_interval=6)
    with pytest.raises(ValueError, match="TTL"):
        CapacityTiming(ttl=1, announce_interval=0.1)


async def test_dht_keeps_the_newest_record_when_an_older_one_is_put():
    async with open_networks(4) as networks:
        clock = NetClock()
        from mtor_p2p.capacity.record import CapacityRecordValidator

        for network in networks:
            network.register_dht_validator("mtor", CapacityRecordValidator(clock.now))
        with trio.fail_after(10):
            while any(n.routing_table_size() == 0 for n in networks):
                await trio.sleep(0.05)
        owner = networks[1]._identity
        key = capacity_key(owner.peer_id)
        now = clock.now()
        newer = make_record(owner, now=now, seq=20, tflops=20.0).sign(owner)
        older = make_record(owner, now=now, seq=10, tflops=10.0).sign(owner)
        await networks[1].dht_put(key, newer)
        # A replay of an older, still unexpired record must not roll the key back anywhere.
        try:
            await networks[2].dht_put(key, older)
        except Exception:
            pass
        for reader in (networks[0], networks[3]):
            assert await reader.dht_get(key, timeout=5) == newer
