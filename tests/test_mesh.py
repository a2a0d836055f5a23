"""The mesh heals: peers keep a target number of connections and re-dial known peers and the
bootstrap list, so a devnet whose peers restart one after another converges again.

The regression test runs whole :class:`~mtor_p2p.node.Node` s on memnet under
``trio.testing.MockClock`` (deterministic, a few seconds of CPU). memnet delivers gossip to
every subscriber whatever the connections, which would hide a split overlay (every view stays
complete, and the mesh then dials from it); :class:`ConnectedGossipWorld` delivers a
publication only within the publisher's connected component, as GossipSub does, so a split
connection graph also splits the views, as it did on the real devnet.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from mtor_p2p.capacity.service import CapacityTiming
from mtor_p2p.clock import NetClock
from mtor_p2p.compute.receipt_store import ReceiptStore
from mtor_p2p.config import NodeConfig
from mtor_p2p.identity import Identity
from mtor_p2p.ledger.genesis import NANO, Genesis, LedgerParams
from mtor_p2p.ledger.store import Ledger
from mtor_p2p.memnet import LatencyModel, LinkProfile, MemNetwork, MemWorld
from mtor_p2p.mesh import MeshKeeper, MeshSettings
from mtor_p2p.node import Node, NodeTiming
from mtor_p2p.runtime import Runtime

EPOCH = 1_800_000_000.0


@pytest.fixture(autouse=True)
def trio_seed() -> Iterator[None]:
    """Seed trio's scheduling order (as tests/test_virtual_time.py does) so a failure replays."""
    from trio._core import _run

    flag, state = _run._ALLOW_DETERMINISTIC_SCHEDULING, _run._r.getstate()
    _run._ALLOW_DETERMINISTIC_SCHEDULING = True  # type: ignore[misc]
    _run._r.seed(7)
    yield
    _run._ALLOW_DETERMINISTIC_SCHEDULING = flag  # type: ignore[misc]
    _run._r.setstate(state)


def ident(label: str) -> Identity:
    """A deterministic identity."""
    return Identity(hashlib.sha256(f"mesh {label}".encode()).digest())


class ConnectedGossipWorld(MemWorld):
    """A memnet world whose gossip travels over connections only: a publication reaches the
    subscribers in the publisher's connected component (GossipSub floods along its mesh, and
    its mesh is made of connections)."""

    def component(self, peer_id: str) -> set[str]:
        """Alive peers reachable from ``peer_id`` over open connections."""
        seen, todo = {peer_id}, [peer_id]
        while todo:
            for other in self.peers[todo.pop()]._conns:
                if other not in seen and self.alive(other):
                    seen.add(other)
                    todo.append(other)
        return seen

    def _publish(self, publisher: MemNetwork, topic: str, data: bytes) -> None:
        subscribers = self._subscribers.get(topic)
        if not subscribers:
            super()._publish(publisher, topic, data)
            return
        reach = self.component(publisher.peer_id)
        self._subscribers[topic] = {p: n for p, n in subscribers.items() if p in reach}
        try:
            super()._publish(publisher, topic, data)
        finally:
            # _publish may have dropped the topic (no subscriber left); put the full set back.
            self._subscribers[topic] = subscribers


class Devnet:
    """``count`` whole nodes on a :class:`ConnectedGossipWorld`; peer 0 is the bootstrap."""

    def __init__(self, count: int, nursery: trio.Nursery) -> None:
        self.world = ConnectedGossipWorld(
            seed=3, latency=LatencyModel(default_rtt_ms=20.0), quantum=0.001
        )
        self.nursery = nursery
        self.identities = [ident(str(i)) for i in range(count)]
        self.genesis = Genesis(
            "mtor-mesh", {i.peer_id: 1000 * NANO for i in self.identities}, LedgerParams()
        )
        self.runtime = Runtime.simulated("mesh")
        self.timing = NodeTiming(capacity=CapacityTiming(ttl=60.0, announce_interval=20.0))
        self.nodes: dict[int, Node] = {}
        self.scopes: dict[int, trio.CancelScope] = {}
        self.bootstrap = ""

    async def start(self, index: int) -> Node:
        """Start (or restart after a crash) peer ``index`` with a fresh process state."""
        identity = self.identities[index]
        if identity.peer_id in self.world.peers:
            network = self.world.restart(identity.peer_id)
        else:
            network = self.world.add_peer(identity, LinkProfile("local"))
        if not self.bootstrap:
            self.bootstrap = network.addrs()[0]
        config = NodeConfig(
            data_dir=Path("/nonexistent/mtor-mesh"),
            bootstrap=[self.bootstrap],
            use_default_bootstrap=False,
        )
        runtime = self.runtime.child(f"{index}:{trio.current_time()}")
        node = Node(
            config,
            identity,
            network,
            NetClock(epoch_offset=EPOCH),
            Ledger(":memory:", self.genesis, instance=runtime.token_hex(8)),
            receipts=ReceiptStore(Path(":memory:")),
            runtime=runtime,
            timing=self.timing,
            serve=False,
            # No ledger loops: their requests would dial peers too (memnet dials on demand),
            # and this test is about what the mesh alone does.
            ledger_light=True,
        )
        scope = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[None]) -> None:
            with scope:
                async with node.running():
                    task_status.started()
                    await trio.sleep_forever()

        await self.nursery.start(run)
        self.nodes[index], self.scopes[index] = node, scope
        return node

    def crash(self, index: int) -> None:
        """Kill peer ``index``'s process: no goodbye, its connections drop."""
        self.nodes[index].withdraw_on_exit = False
        self.world.crash(self.identities[index].peer_id)
        self.scopes[index].cancel()

    def connected(self) -> bool:
        """Whether the connection graph of the alive peers is one component."""
        alive = [i.peer_id for i in self.identities if self.world.alive(i.peer_id)]
        return self.world.component(alive[0]) == set(alive)

    def views_complete(self) -> bool:
        """Whether every node's capacity view holds every node (and its current record)."""
        everyone = {i.peer_id for i in self.identities}
        return all(n.capacity.view.peer_ids(n.clock.now()) == everyone for n in self.nodes.values())

    def converged(self) -> bool:
        """Connected overlay and complete views."""
        return self.connected() and self.views_complete()


#: (seconds each peer is down, seconds between one restart and the next crash, order).
ROLLING = [
    # Outages longer than a record's lifetime (60 s), one peer at a time, the bootstrap in
    # the middle. Before the mesh keeper: peers 1-5 stayed connected among themselves (so
    # they never re-dialled the bootstrap), the bootstrap came back alone (its own bootstrap
    # list is empty) after its record had expired everywhere, 6-11 came back through it, and
    # the two halves {1..5} and {0, 6..11} never heard of each other again.
    pytest.param(90.0, 10.0, [1, 2, 3, 4, 5, 0, 6, 7, 8, 9, 10, 11], id="long-outages"),
    # Short, overlapping outages (up to two peers down at once), the bootstrap first.
    pytest.param(30.0, -15.0, list(range(12)), id="overlapping"),
]


@pytest.mark.parametrize(("down", "gap", "order"), ROLLING)
async def test_a_devnet_restarted_peer_by_peer_converges_again(
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    down: float,
    gap: float,
    order: list[int],
) -> None:
    """Twelve peers, peer 0 the bootstrap of all, converged. Every peer, the bootstrap
    included, is killed and restarted ``down`` seconds later, one after another. Within 90 s
    of the last restart (a record lifetime and a half) the overlay is one component again and
    every view holds all twelve records, and it stays so."""
    caplog.set_level(logging.ERROR)
    count = len(order)
    async with trio.open_nursery() as nursery:
        net = Devnet(count, nursery)
        for index in range(count):
            await net.start(index)
            await trio.sleep(1.0)
        with trio.fail_after(120):
            while not net.converged():
                await trio.sleep(1.0)

        async def bounce(index: int) -> None:
            net.crash(index)
            await trio.sleep(down)
            await net.start(index)

        async with trio.open_nursery() as restarts:
            for index in order:
                restarts.start_soon(bounce, index)
                await trio.sleep(down + gap)
        healed_by = trio.current_time() + 90.0
        while not net.converged():
            views = [len(n.capacity.view.peer_ids(n.clock.now())) for n in net.nodes.values()]
            assert trio.current_time() < healed_by, (
                f"not converged 90 s after the last restart: connected={net.connected()}, "
                f"views={views}"
            )
            await trio.sleep(1.0)
        # And it stays so (no flapping) for a few record lifetimes.
        for _ in range(60):
            await trio.sleep(3.0)
            assert net.converged()
        nursery.cancel_scope.cancel()


# -- the keeper on its own ------------------------------------------------------------------


def keeper_for(
    network: MemNetwork,
    *,
    seen: list[tuple[str, list[str]]] | None = None,
    bootstrap: list[str] | None = None,
    **settings: float,
) -> MeshKeeper:
    """A keeper of ``network`` whose capacity view always holds ``seen``."""
    return MeshKeeper(
        network,
        candidates=lambda: list(seen or []),
        bootstrap=bootstrap or [],
        rng=random.Random(5),
        settings=MeshSettings(**settings),  # type: ignore[arg-type]
    )


def ghost(label: str) -> tuple[str, list[str]]:
    """A record's claim: a peer ID nobody runs, at an address nothing listens on."""
    peer_id = ident(f"ghost {label}").peer_id
    return peer_id, [f"/ip4/10.9.9.9/tcp/4001/p2p/{peer_id}"]


async def test_the_bootstrap_list_is_dialled_whenever_below_target(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A peer with one connection, below target, dials the bootstrap peer in its first round
    (before the keeper, only a peer with no connection at all did)."""
    world = MemWorld()
    me, friend, boot = (world.add_peer(ident(n)) for n in ("me", "friend", "boot"))
    await me.connect(friend.addrs()[0])
    keeper = keeper_for(me, bootstrap=[boot.addrs()[0], me.addrs()[0]])
    assert await keeper.round() == 1
    assert set(me.connected_peers()) == {friend.peer_id, boot.peer_id}
    assert keeper.known_peers() == [boot.peer_id]


async def test_dead_addresses_are_backed_off_exponentially(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Twenty advertised peers that refuse every dial: over ten minutes each address is
    dialled about log2(600 / 5) times, not once per round (300 rounds)."""
    world = MemWorld()
    me = world.add_peer(ident("me"))
    ghosts = [ghost(str(i)) for i in range(20)]
    keeper = keeper_for(me, seen=ghosts)
    with trio.move_on_after(600):
        await keeper.run()
    per_addr = keeper.stats.dials / len(ghosts)
    assert keeper.stats.rounds >= 100
    assert keeper.stats.dial_failures == keeper.stats.dials
    assert 4 <= per_addr <= 10, per_addr


async def test_silent_sybil_addresses_cost_one_deadline_and_do_not_hide_known_peers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Two hundred records whose addresses swallow dials (silence until the deadline) and
    one honest peer. A round lasts at most its deadline however many liars there are; once
    the honest peer has answered, it is re-dialled first after losing the connection."""
    world = MemWorld()
    me, honest = world.add_peer(ident("me")), world.add_peer(ident("honest"))
    sybils = [world.add_peer(ident(f"sybil {i}")) for i in range(200)]
    world.partition([s.peer_id for s in sybils])  # they swallow every packet
    seen = [(s.peer_id, s.addrs()) for s in sybils] + [(honest.peer_id, honest.addrs())]
    keeper = keeper_for(me, seen=seen, target=2, dial_timeout=3.0)
    with trio.fail_after(900):
        while honest.peer_id not in me.connected_peers():
            started = trio.current_time()
            await keeper.round()
            assert trio.current_time() - started <= 3.0 * 2 + 1.0
            await trio.sleep(keeper.settings.interval)
    me.disconnect(honest.peer_id)
    started = trio.current_time()
    await keeper.round()
    assert honest.peer_id in me.connected_peers()
    assert trio.current_time() - started <= 3.0 * 2 + 1.0


def test_what_the_keeper_remembers_is_bounded() -> None:
    """A flood of records and failures cannot grow the keeper's memory past its bounds; an
    address must end in the peer's own /p2p/ ID to be kept."""
    network = MemWorld().add_peer(ident("me"))
    flood = [ghost(str(i)) for i in range(3000)]
    keeper = keeper_for(network, max_seen=100, max_backoffs=50, max_addrs_per_peer=2)
    peer_id = flood[0][0]
    keeper._learn([*flood, (peer_id, [f"/ip4/1.2.3.{i}/tcp/1/p2p/{peer_id}" for i in range(9)])])
    keeper._learn([(ident("x").peer_id, ["/ip4/1.2.3.4/tcp/1/p2p/someone-else"])])
    assert len(keeper._seen) == 100
    assert all(len(addrs) <= 2 for addrs in keeper._seen.values())

    async def fail_all() -> None:
        for _, addrs in flood[:500]:
            keeper._failed(addrs[0], bootstrap=False)

    trio.run(fail_all)
    assert len(keeper._backoff) == 50
