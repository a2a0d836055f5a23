"""memnet on virtual time: the modelled latency, bandwidth, failures, determinism and scale.

Every test runs on ``trio.testing.MockClock(autojump_threshold=0)`` (pytest-trio's
``autojump_clock`` fixture): ``trio.current_time()`` is simulated time and starts at 0.
"""

from __future__ import annotations

import contextvars
import hashlib
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
import trio.testing

from mtor_p2p.identity import Identity
from mtor_p2p.memnet import LatencyModel, LinkProfile, MemNetwork, MemWorld
from mtor_p2p.network import Message, NetworkError

RTT_CSV = Path(__file__).resolve().parents[1] / "simulations" / "data" / "region-rtt-p95-ms.csv"
TABLE = LatencyModel.from_csv(RTT_CSV)
ECHO = "/mtor/test/echo/1"
MIB = 1 << 20
T = TypeVar("T")
QUANTUM = 0.001


def ident(i: int) -> Identity:
    """A deterministic identity (Identity.generate() reads os.urandom)."""
    return Identity(hashlib.sha256(b"memnet test %d" % i).digest())


async def echo(sender: str, data: bytes) -> bytes:
    return data


async def empty(sender: str, data: bytes) -> bytes:
    return b""


async def timed(fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> tuple[T, float]:
    """``fn``'s result and the simulated seconds it took."""
    start = trio.current_time()
    result = await fn(*args, **kwargs)
    return result, trio.current_time() - start


class Newest:
    def validate(self, key: str, value: bytes) -> None:
        if not value.startswith(b"v"):
            raise ValueError("not a v-value")

    def select(self, key: str, values: list[bytes]) -> int:
        return max(range(len(values)), key=lambda i: values[i])


# -- the latency model ----------------------------------------------------------------------


def test_latency_model_reads_the_region_table(tmp_path: Path) -> None:
    assert len(TABLE.regions) == 14 and TABLE.regions[0] == "WUS"
    assert TABLE.one_way("WEU", "JPE") == pytest.approx(0.1205)
    assert TABLE.one_way("JPE", "WEU") == pytest.approx(0.1205)
    assert TABLE.one_way("WEU", "WEU") == 0.0
    assert TABLE.one_way("WEU", "elsewhere") == pytest.approx(0.0005)  # default 1 ms RTT
    table = LatencyModel({("a", "b"): 40.0}, default_rtt_ms=10.0)
    assert table.one_way("b", "a") == pytest.approx(0.02)
    assert table.one_way("a", "a") == pytest.approx(0.005)
    bad = tmp_path / "bad.csv"
    bad.write_text("# comment\nregion,A,B\nA,0,10\nC,10,0\n")
    with pytest.raises(ValueError, match="do not match"):
        LatencyModel.from_csv(bad)
    bad.write_text("region,A,B\nA,0,10\nB,10\n")
    with pytest.raises(ValueError, match="values"):
        LatencyModel.from_csv(bad)


def test_world_checks_its_peers() -> None:
    world = MemWorld(latency=TABLE)
    world.add_peer(ident(1), LinkProfile("WEU"))
    with pytest.raises(ValueError, match="already"):
        world.add_peer(ident(1), LinkProfile("WEU"))
    with pytest.raises(ValueError, match="not in the latency table"):
        world.add_peer(ident(2), LinkProfile("Atlantis"))
    with pytest.raises(ValueError):
        MemWorld(loss=1.5)


async def test_request_costs_the_region_round_trip(autojump_clock: trio.testing.MockClock) -> None:
    world = MemWorld(latency=TABLE, quantum=QUANTUM)
    client = world.add_peer(ident(1), LinkProfile("WEU", access_delay=0.005))
    server = world.add_peer(ident(2), LinkProfile("JPE", access_delay=0.015))
    server.handle(ECHO, echo)
    expected = 0.241 + 2 * (0.005 + 0.015)  # the table's RTT plus both access delays, both ways
    peer, dial = await timed(client.connect, server.addrs()[0])
    assert peer == server.peer_id
    assert client.connected_peers() == [server.peer_id]
    assert server.connected_peers() == [client.peer_id]
    assert dial == pytest.approx(expected, abs=2 * QUANTUM)
    reply, elapsed = await timed(client.request, server.peer_id, ECHO, b"ping")
    assert reply == b"ping"
    assert elapsed == pytest.approx(expected, abs=2 * QUANTUM)
    # A request to a peer we are not connected to dials first: one more round trip.
    other = world.add_peer(ident(3), LinkProfile("JPE", access_delay=0.015))
    other.handle(ECHO, echo)
    _, implicit = await timed(client.request, other.peer_id, ECHO, b"ping")
    assert implicit == pytest.approx(2 * expected, abs=4 * QUANTUM)
    assert other.peer_id in client.connected_peers()


# -- bandwidth ------------------------------------------------------------------------------


async def test_payloads_serialise_on_the_uplink_and_queue(
    autojump_clock: trio.testing.MockClock,
) -> None:
    world = MemWorld(latency=TABLE, quantum=QUANTUM)
    client = world.add_peer(ident(1), LinkProfile("WEU", uplink_bps=MIB))
    server = world.add_peer(ident(2), LinkProfile("UKS"))
    server.handle(ECHO, empty, max_request_bytes=4 * MIB)
    await client.connect(server.addrs()[0])
    _, small = await timed(client.request, server.peer_id, ECHO, b"")
    _, big = await timed(client.request, server.peer_id, ECHO, bytes(MIB))
    assert big - small == pytest.approx(1.0, abs=2 * QUANTUM)

    finished: list[float] = []
    start = trio.current_time()

    async def send() -> None:
        await client.request(server.peer_id, ECHO, bytes(MIB))
        finished.append(trio.current_time() - start)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        nursery.start_soon(send)
    # The second transfer waits for the first on the shared uplink.
    assert finished[0] == pytest.approx(small + 1.0, abs=2 * QUANTUM)
    assert finished[1] == pytest.approx(small + 2.0, abs=2 * QUANTUM)


async def test_a_fast_uplink_feeds_slow_downlinks_in_parallel(
    autojump_clock: trio.testing.MockClock,
) -> None:
    world = MemWorld(quantum=QUANTUM)  # 1 ms RTT everywhere
    sender = world.add_peer(ident(1), LinkProfile(uplink_bps=10 * MIB))
    slow = [world.add_peer(ident(i), LinkProfile(downlink_bps=MIB)) for i in (2, 3)]
    for network in slow:
        network.handle(ECHO, empty, max_request_bytes=2 * MIB)
        await sender.connect(network.addrs()[0])
    start = trio.current_time()
    finished: list[float] = []

    async def send(network: MemNetwork) -> None:
        await sender.request(network.peer_id, ECHO, bytes(MIB))
        finished.append(trio.current_time() - start)

    async with trio.open_nursery() as nursery:
        for network in slow:
            nursery.start_soon(send, network)
    # Each transfer is held by its receiver's 1 MiB/s downlink, not by each other.
    assert finished == [pytest.approx(1.0, abs=3 * QUANTUM)] * 2


# -- failures -------------------------------------------------------------------------------


async def test_crash_refuses_at_once(autojump_clock: trio.testing.MockClock) -> None:
    world = MemWorld(latency=TABLE, quantum=QUANTUM)
    client = world.add_peer(ident(1), LinkProfile("WEU"))
    server = world.add_peer(ident(2), LinkProfile("EUS"))
    rtt = 0.090
    entered = trio.Event()

    async def stuck(sender: str, data: bytes) -> bytes:
        entered.set()
        await trio.sleep(600)
        return b"never"

    server.handle("/stuck", stuck)
    await client.connect(server.addrs()[0])
    failures: list[tuple[str, float]] = []

    async def call() -> None:
        start = trio.current_time()
        try:
            await client.request(server.peer_id, "/stuck", b"", timeout=60)
        except NetworkError as exc:
            failures.append((str(exc), trio.current_time() - start))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(call)
        await entered.wait()
        crashed_at = trio.current_time()
        world.crash(server.peer_id)
    # The request it was serving fails one way later, not at the 60 s deadline.
    assert len(failures) == 1 and "reset" in failures[0][0]
    assert trio.current_time() - crashed_at == pytest.approx(rtt / 2, abs=2 * QUANTUM)
    assert not world.alive(server.peer_id) and not server.alive
    assert client.connected_peers() == []
    start = trio.current_time()
    with pytest.raises(NetworkError, match="refused"):
        await client.request(server.peer_id, "/stuck", b"", timeout=10)
    assert trio.current_time() - start == pytest.approx(rtt, abs=2 * QUANTUM)
    start = trio.current_time()
    with pytest.raises(NetworkError, match="refused"):
        await client.connect(server.addrs()[0], timeout=10)
    assert trio.current_time() - start == pytest.approx(rtt, abs=2 * QUANTUM)
    with pytest.raises(NetworkError, match="closed"):
        await server.request(client.peer_id, "/stuck", b"")


async def test_partition_is_silence_and_heal_restores(
    autojump_clock: trio.testing.MockClock,
) -> None:
    world = MemWorld(latency=TABLE, quantum=QUANTUM)
    a = world.add_peer(ident(1), LinkProfile("WEU"))
    b = world.add_peer(ident(2), LinkProfile("GWC"))
    c = world.add_peer(ident(3), LinkProfile("UKS"))
    b.handle(ECHO, echo)
    await a.connect(b.addrs()[0])
    inbound = await b.subscribe("t")
    world.partition([a.peer_id], [b.peer_id])  # c, in no group, is a group of its own
    assert not world.reachable(a.peer_id, c.peer_id) and world.reachable(c.peer_id, c.peer_id)
    start = trio.current_time()
    with pytest.raises(NetworkError, match="timed out"):
        await a.request(b.peer_id, ECHO, b"x", timeout=5)
    assert trio.current_time() - start == pytest.approx(5.0)
    start = trio.current_time()
    with pytest.raises(NetworkError, match="timed out"):
        await c.connect(b.addrs()[0], timeout=3)
    assert trio.current_time() - start == pytest.approx(3.0)
    assert b.peer_id in a.connected_peers()  # nobody was told
    await a.publish("t", b"lost in the split")
    await trio.sleep(5)
    assert inbound.statistics().current_buffer_used == 0
    world.heal()
    assert await a.request(b.peer_id, ECHO, b"back") == b"back"
    await a.publish("t", b"heard")
    assert (await inbound.receive()).data == b"heard"
    assert world.stats.blocked >= 3


async def test_loss_of_one_loses_everything(autojump_clock: trio.testing.MockClock) -> None:
    world = MemWorld(loss=1.0)
    a, b = world.add_peer(ident(1)), world.add_peer(ident(2))
    b.handle(ECHO, echo)
    await a.connect(b.addrs()[0])  # connection set-up is not lost
    with pytest.raises(NetworkError, match="timed out"):
        await a.request(b.peer_id, ECHO, b"x", timeout=2)
    inbound = await b.subscribe("t")
    for _ in range(10):
        await a.publish("t", b"gone")
    await trio.sleep(10)
    assert inbound.statistics().current_buffer_used == 0
    assert world.stats.lost == 11
    assert world.stats.gossip_delivered == 0


async def test_restart_gives_a_fresh_network(autojump_clock: trio.testing.MockClock) -> None:
    world = MemWorld()
    client, server = world.add_peer(ident(1)), world.add_peer(ident(2))
    server.handle(ECHO, echo)
    inbound = await server.subscribe("t")
    await client.connect(server.addrs()[0])
    world.crash(server.peer_id)
    assert [m async for m in inbound] == []  # the subscription ended
    with pytest.raises(ValueError):
        world.add_peer(ident(2))
    fresh = world.restart(server.peer_id)
    assert fresh is not server and fresh is world.network(server.peer_id)
    assert fresh.peer_id == server.peer_id and world.alive(fresh.peer_id)
    assert fresh.connected_peers() == [] and client.connected_peers() == []
    with pytest.raises(NetworkError):  # no handler any more
        await client.request(fresh.peer_id, ECHO, b"x")
    fresh.handle(ECHO, echo)
    assert await client.request(fresh.peer_id, ECHO, b"again") == b"again"
    with pytest.raises(NetworkError, match="closed"):
        await server.publish("t", b"from the dead")


async def test_requester_giving_up_does_not_cancel_the_handler(
    autojump_clock: trio.testing.MockClock,
) -> None:
    world = MemWorld()
    client, server = world.add_peer(ident(1)), world.add_peer(ident(2))
    done: list[str | None] = []
    where: contextvars.ContextVar[str | None] = contextvars.ContextVar("where", default=None)

    async def slow(sender: str, data: bytes) -> bytes:
        await trio.sleep(3)
        done.append(where.get())
        return b"late"

    where.set("server")
    server.handle("/slow", slow)
    where.set("client")
    with pytest.raises(NetworkError, match="timed out"):
        await client.request(server.peer_id, "/slow", b"", timeout=1)
    await trio.sleep(5)
    assert done == ["server"]  # it ran to the end, in the receiver's context


# -- determinism ----------------------------------------------------------------------------


async def scripted_trace(seed: int) -> bytes:
    """A scripted exchange with jitter: connect, five requests, five publications."""
    world = MemWorld(seed=seed, latency=TABLE, jitter=0.3)
    server = world.add_peer(ident(1), LinkProfile("WEU", access_delay=0.01))
    client = world.add_peer(ident(2), LinkProfile("EUS", access_delay=0.02, uplink_bps=1e6))
    listener = world.add_peer(ident(3), LinkProfile("SEA", access_delay=0.005))
    server.handle(ECHO, echo)
    inbound = await listener.subscribe("t")
    trace: list[tuple[float, str]] = []

    async def listen() -> None:
        async for message in inbound:
            trace.append((trio.current_time(), f"gossip {message.data!r}"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(listen)
        await client.connect(server.addrs()[0])
        trace.append((trio.current_time(), "connected"))
        for i in range(5):
            await client.request(server.peer_id, ECHO, bytes(20_000 * i))
            trace.append((trio.current_time(), f"reply {i}"))
            await client.publish("t", b"%d" % i)
        await trio.sleep(5)
        nursery.cancel_scope.cancel()
    return repr(sorted(trace)).encode()


def run_trace(seed: int) -> bytes:
    """One run of the script on a fresh virtual clock, as the simulator runs a scenario."""
    clock = trio.testing.MockClock(autojump_threshold=0)
    return trio.run(scripted_trace, seed, clock=clock)


def test_same_seed_same_trace() -> None:
    first = run_trace(seed=7)
    assert first.count(b"gossip") == 5 and first.count(b"reply") == 5
    assert run_trace(seed=7) == first
    assert run_trace(seed=8) != first


# -- DHT ------------------------------------------------------------------------------------


async def test_dht_values_die_with_their_holders(autojump_clock: trio.testing.MockClock) -> None:
    world = MemWorld(latency=TABLE, quantum=QUANTUM)
    regions = random.Random(3).choices(TABLE.regions, k=20)
    networks = [world.add_peer(ident(i), LinkProfile(r)) for i, r in enumerate(regions)]
    for network in networks:
        network.register_dht_validator("mtor", Newest())
    key = "/mtor/test/k"
    holders = world.dht_holders(key)
    ring = world.dht_holders(key, count=len(networks))  # successors in ring order
    assert len(holders) == 3 and ring[:3] == holders
    # Far from the key on the ring: neither becomes a holder when three peers crash.
    putter, getter = world.network(ring[-1]), world.network(ring[-2])
    await putter.dht_put(key, b"v1")
    assert world.stats.dht_hops == 3  # max(1, ceil(log2(20) / 2))
    value, elapsed = await timed(getter.dht_get, key)
    assert value == b"v1"
    assert 0 < elapsed < 2.0
    for peer_id in holders[:2]:
        world.crash(peer_id)
    assert await getter.dht_get(key) == b"v1"  # the third holder still has it
    world.crash(holders[2])
    assert await getter.dht_get(key) is None
    assert await putter.dht_get(key) == b"v1"  # the putter keeps its own copy, as libp2p does
    # provider records live on the same ring
    await putter.provide("/mtor/operand/x")
    assert await getter.find_providers("/mtor/operand/x") == [putter.peer_id]


async def test_dht_get_gives_up_at_its_deadline(autojump_clock: trio.testing.MockClock) -> None:
    world = MemWorld(latency=TABLE)
    networks = [world.add_peer(ident(i), LinkProfile("WEU")) for i in range(6)]
    for network in networks:
        network.register_dht_validator("mtor", Newest())
    key = "/mtor/test/k"
    holders = world.dht_holders(key)
    putter = next(n for n in networks if n.peer_id not in holders)
    await putter.dht_put(key, b"v1")
    getter = next(n for n in networks if n.peer_id not in holders and n is not putter)
    world.partition([getter.peer_id])  # everyone else in the other group
    value, elapsed = await timed(getter.dht_get, key, timeout=4)
    assert value is None and elapsed == pytest.approx(4.0)


# -- scale ----------------------------------------------------------------------------------


async def test_three_hundred_peers_gossip(autojump_clock: trio.testing.MockClock) -> None:
    count = 300
    world = MemWorld(latency=TABLE, jitter=0.1, seed=5)
    rng = random.Random(5)
    networks = [
        world.add_peer(ident(i), LinkProfile(rng.choice(TABLE.regions), access_delay=0.01))
        for i in range(count)
    ]
    channels = [await n.subscribe("capacity", buffer=count + 10) for n in networks]
    received = [0] * count

    async def drain(i: int, channel: trio.MemoryReceiveChannel[Message]) -> None:
        async for _ in channel:
            received[i] += 1
            if received[i] == count:
                return

    wall = time.perf_counter()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for i, channel in enumerate(channels):
                nursery.start_soon(drain, i, channel)
            for network in networks:
                await network.publish("capacity", network.peer_id.encode())
    print(
        f"\n{count} peers x {count} messages: {world.stats.gossip_delivered} deliveries in "
        f"{time.perf_counter() - wall:.2f} s wall, {trio.current_time():.3f} s simulated"
    )
    assert received == [count] * count  # own publication included, as GossipSub does
    assert world.stats.gossip_delivered == count * count
    assert world.stats.gossip_dropped == 0
