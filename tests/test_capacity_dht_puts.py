"""Which announcements go to the DHT (issue 9: DHT puts were most of a busy worker's event-loop
traffic): a change of load alone is gossiped only; renewals, and changes of what peers plan
by, go to the DHT too. On memnet and MockClock: the counts are exact and need no quiet machine."""

from __future__ import annotations

import trio
import trio.testing

from mtor_p2p.capacity.record import DHT_NAMESPACE, CapacityRecordValidator, capacity_key
from mtor_p2p.capacity.service import CAPACITY_TOPIC, CapacityService, CapacityTiming, Offer
from mtor_p2p.capacity.view import GIB
from mtor_p2p.clock import NetClock
from mtor_p2p.identity import Identity
from mtor_p2p.memnet import LatencyModel, MemWorld
from tests.conftest import CPU

TIMING = CapacityTiming(ttl=60.0, announce_interval=20.0)


async def test_load_changes_are_gossiped_only_and_the_dht_copy_is_renewed_on_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    world = MemWorld(latency=LatencyModel(default_rtt_ms=20.0), quantum=0.0)
    me, listener = Identity.generate(), Identity.generate()
    network, other = world.add_peer(me), world.add_peer(listener)
    await network.connect(other.addrs()[0])
    offer = {"load": 0.0, "price": 1.0}

    def current() -> Offer:
        return Offer(
            devices=(CPU,), tflops=1.0, mem_free=8 * GIB, load=offer["load"], price=offer["price"]
        )

    heard = await other.subscribe(CAPACITY_TOPIC)
    other.register_dht_validator(DHT_NAMESPACE, CapacityRecordValidator(NetClock().now))
    service = CapacityService(network, me, NetClock(), region="WEU", offer=current, timing=TIMING)
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        puts = world.stats.dht_puts  # the first announcement's
        # A busy worker: its load moves every second for a minute.
        for second in range(60):
            offer["load"] = 0.5 * (second % 2)
            await trio.sleep(1.0)
        gossiped = 0
        while True:
            try:
                heard.receive_nowait()
            except trio.WouldBlock:
                break
            gossiped += 1
        # Every change was heard; the DHT got the renewals only (every 20 s), so its copy
        # (TTL 60 s) never lapsed.
        assert gossiped >= 55
        assert world.stats.dht_puts - puts == 3
        stored = await other.dht_get(capacity_key(me.peer_id), timeout=5.0)
        assert stored is not None
        # What peers plan by goes to the DHT at once.
        offer["price"] = 2.0
        await trio.sleep(1.5)
        assert world.stats.dht_puts - puts == 4
        nursery.cancel_scope.cancel()
