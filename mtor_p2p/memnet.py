"""An in-memory :class:`~mtor_p2p.network.Network` on trio's (virtual) time: the simulator's net.

One :class:`MemWorld` holds every peer of a simulation in one process; each peer gets a
:class:`MemNetwork` that implements the :class:`~mtor_p2p.network.Network` port with the same
observable semantics as :class:`mtor_p2p.libp2p_host.Libp2pNetwork` (error types and messages,
size limits, busy refusals, handler guards, validators, bounded subscription buffers). It runs
on any trio clock; under ``trio.testing.MockClock(autojump_threshold=0)`` a simulated hour costs
only the CPU of the events in it, and a thousand peers fit in one process.

What is modelled
----------------
* **Latency.** The one-way delay of a message is half the round-trip time between the two
  peers' regions (:class:`LatencyModel`, e.g. the 14-region table in
  ``shared/data/region-rtt-p95-ms.csv``) plus each end's ``access_delay`` (home broadband),
  multiplied by ``max(0.5, 1 + N(0, jitter))``. A connection set-up takes one round trip.
* **Bandwidth.** Each peer has an uplink and a downlink (bytes/s, or unlimited). A transfer of
  ``n`` payload bytes occupies the sender's uplink for ``n / uplink`` and the receiver's
  downlink for ``n / downlink``; each link keeps a "busy until" time, so concurrent transfers
  on one link queue behind each other (first come, first served, not fair-shared). The last
  byte arrives when both links have carried it, plus the one-way delay: a fast uplink feeds
  several slow downlinks in parallel. Framing overhead is not counted.
* **Loss.** Every request, response and gossip delivery is lost independently with
  probability ``loss``; a lost request or response shows as silence (the requester's deadline
  fires). Connection set-up and stream resets are not lost (TCP retransmits them).
* **Crash vs partition.** :meth:`MemWorld.crash` is a dead process: its connections drop, new
  dials and requests are refused after at most one round trip, requests it was serving fail
  for their requesters, its subscriptions end, its DHT store is gone.
  :meth:`MemWorld.partition` is a network split: nothing crosses between groups and nobody is
  told (requests and dials wait for their deadlines); connections stay listed as open.
* **DHT.** A consistent-hashing ring of the alive peers (SHA-256 of the peer ID): a key is held
  by the ``dht_replication`` peers that follow the key's hash on the ring. A lookup costs
  ``max(1, ceil(log2(N_alive) / 2))`` sequential round trips to random alive peers, then one
  parallel round trip to the holders; a holder that stays silent (partitioned, or its message
  lost) costs the query timeout of py-libp2p (10 s), as it does there. As in py-libp2p, the
  putter also keeps the value in its own store, a getter answers from its own store first, a
  put that would replace a better local value fails, and holders keep the best value by the
  namespace validator's ``select`` (a holder without a validator for the namespace refuses
  the value). Values do not move when the ring changes: like Kademlia records they must be
  put again periodically; they are lost when every peer holding them has crashed.
* **Gossip.** A publication reaches every alive subscriber of the topic in the publisher's
  partition after ``gossip_hops`` times the one-way delay (the mesh's average path length),
  each delivery lost independently. The publisher's own validator runs first (a rejected
  message goes nowhere) and its own subscription gets the message at once, as in GossipSub;
  each receiver's validator runs before delivery.

What is not modelled
--------------------
TCP congestion control and slow start, NAT and relays, GossipSub mesh maintenance (grafts,
prunes, IHAVE/IWANT, scores, a validator on a forwarding peer blocking its subtree), Kademlia
routing tables (any alive peer can be a hop; :meth:`MemNetwork.routing_table_size` is the
number of connections), record and provider expiry, the cost of computation (handlers take
exactly the simulated time they sleep), and bandwidth used by gossip and DHT traffic.

Tasks and time
--------------
A :class:`MemNetwork` needs no background task of its own and nothing to start. Work that must
outlive the caller runs in trio *system tasks* (cancelled when the main task of ``trio.run``
exits): one task per served request (the handler, so that a requester giving up does not
cancel the handler, as with a real stream reset) and, per publishing peer with deliveries
pending, one task walking them in time order (ties in publication order, so one publisher's
messages sent in the same quantum arrive in order, as over GossipSub's single stream per peer;
never a task per delivery). Every delivery time is rounded up to a multiple of ``quantum`` so
that many events share one wake-up of trio's run loop. Handlers run in a copy of the
``contextvars`` context in which :meth:`MemNetwork.handle` was called (the receiver's), not the
requester's.

Determinism: all randomness comes from one ``random.Random(seed)`` owned by the world, and
every collection whose order matters is a dict (never a set of strings, whose order changes
with ``PYTHONHASHSEED``). A run is reproducible when the order in which tasks draw from the
world's generator is: trio itself shuffles tasks woken at the same instant (its module-level
``trio._core._run._r``), which a simulator that needs bit-exact reruns must seed as well.
"""

from __future__ import annotations

import bisect
import contextvars
import hashlib
import heapq
import logging
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import trio

from mtor_p2p.identity import Identity
from mtor_p2p.network import (
    DEFAULT_MAX_PENDING_BYTES_PER_PEER,
    DEFAULT_MAX_PENDING_BYTES_TOTAL,
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_MAX_RESPONSE_BYTES,
    DEFAULT_MAX_STREAMS_PER_PEER,
    MAX_ERROR_BYTES,
    DhtValidator,
    Gathered,
    HostStats,
    Message,
    NetworkError,
    Payload,
    RemoteError,
    RequestHandler,
    RoundTrips,
    TopicValidator,
    remote_reason,
)

log = logging.getLogger(__name__)

#: py-libp2p's per-peer DHT query timeout: what a silent holder costs a lookup.
DHT_QUERY_TIMEOUT = 10.0
#: find_providers returns at most this many peers (py-libp2p's default count).
MAX_PROVIDERS_RETURNED = 20
#: Provider records kept per key and holder (the most recent ones).
MAX_PROVIDERS_PER_KEY = 64
#: Values (and provider keys) kept per peer; the oldest entry is evicted beyond it.
MAX_STORE_ENTRIES = 50_000
#: Capacity records accept at most 16 addresses of at most 256 characters each.
MAX_ADDRS = 16
MAX_ADDR_CHARS = 256
#: The port written into memnet addresses (addresses are names only; nothing listens).
MEMNET_PORT = 4001
_UNGROUPED = -1


# -- models ---------------------------------------------------------------------------------


class LatencyModel:
    """Round-trip times between regions; :meth:`one_way` gives the one-way delay in seconds.

    ``rtt_ms`` maps ``(region_a, region_b)`` to a round-trip time in milliseconds; a pair is
    looked up in both orders, and a pair absent in both falls back to ``default_rtt_ms``.
    """

    def __init__(
        self,
        rtt_ms: dict[tuple[str, str], float] | None = None,
        *,
        default_rtt_ms: float = 1.0,
    ) -> None:
        if default_rtt_ms < 0:
            raise ValueError("default_rtt_ms must not be negative")
        self._rtt_ms: dict[tuple[str, str], float] = {}
        #: Regions named in the table, in order of first appearance.
        self.regions: list[str] = []
        for (a, b), rtt in (rtt_ms or {}).items():
            if rtt < 0 or math.isnan(rtt):
                raise ValueError(f"round-trip time {a}-{b} must be a non-negative number")
            self._rtt_ms[(a, b)] = float(rtt)
            for region in (a, b):
                if region not in self.regions:
                    self.regions.append(region)
        self.default_rtt_ms = float(default_rtt_ms)
        self._one_way: dict[tuple[str, str], float] = {}

    @classmethod
    def from_csv(cls, path: str | Path, *, default_rtt_ms: float = 1.0) -> LatencyModel:
        """Read a square RTT table: ``#`` comments, a ``region,A,B,...`` header, one row per
        region with milliseconds (the format of ``shared/data/region-rtt-p95-ms.csv``)."""
        lines = [
            line.strip()
            for line in Path(path).read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        ]
        if not lines:
            raise ValueError(f"{path}: no table")
        header = [cell.strip() for cell in lines[0].split(",")]
        if header[0] != "region" or len(header) < 2:
            raise ValueError(f"{path}: the header must be 'region,<region>,...'")
        columns = header[1:]
        if len(set(columns)) != len(columns):
            raise ValueError(f"{path}: a region appears twice in the header")
        table: dict[tuple[str, str], float] = {}
        rows: list[str] = []
        for line in lines[1:]:
            cells = [cell.strip() for cell in line.split(",")]
            if len(cells) != len(header):
                raise ValueError(f"{path}: row {cells[0]!r} has {len(cells) - 1} values")
            rows.append(cells[0])
            for column, cell in zip(columns, cells[1:], strict=True):
                try:
                    table[(cells[0], column)] = float(cell)
                except ValueError as exc:
                    raise ValueError(f"{path}: {cells[0]}-{column}: {cell!r}") from exc
        if rows != columns:
            raise ValueError(f"{path}: rows {rows} do not match the header {columns}")
        return cls(table, default_rtt_ms=default_rtt_ms)

    def rtt_ms(self, a_region: str, b_region: str) -> float:
        """Round-trip time between two regions in milliseconds (same region: the diagonal)."""
        rtt = self._rtt_ms.get((a_region, b_region))
        if rtt is None:
            rtt = self._rtt_ms.get((b_region, a_region), self.default_rtt_ms)
        return rtt

    def one_way(self, a_region: str, b_region: str) -> float:
        """One-way delay between two regions in seconds: half the round-trip time."""
        key = (a_region, b_region)
        delay = self._one_way.get(key)
        if delay is None:
            delay = self._one_way[key] = self.rtt_ms(a_region, b_region) / 2 / 1000
        return delay


@dataclass
class LinkProfile:
    """Where a peer sits and what its access link can carry."""

    #: A region of the world's :class:`LatencyModel`.
    region: str = "local"
    #: Seconds added to every message at this end, one way (home broadband, Wi-Fi).
    access_delay: float = 0.0
    #: Bytes per second this peer can send; None: unlimited.
    uplink_bps: float | None = None
    #: Bytes per second this peer can receive; None: unlimited.
    downlink_bps: float | None = None


@dataclass
class MemWorldStats:
    """World-wide counters (every peer together)."""

    #: Requests sent (that reached the wire: after a successful dial).
    requests: int = 0
    #: Responses sent, error replies included.
    responses: int = 0
    #: Payload bytes carried: requests, responses and gossip deliveries.
    bytes: int = 0
    gossip_published: int = 0
    #: Messages put into a subscription's buffer (one per channel).
    gossip_delivered: int = 0
    #: Messages dropped because a subscription's buffer was full.
    gossip_dropped: int = 0
    #: Messages a topic validator refused (at the publisher or a receiver).
    gossip_rejected: int = 0
    #: Messages lost to the world's ``loss`` probability.
    lost: int = 0
    #: Messages silenced by a partition.
    blocked: int = 0
    #: Connection attempts (explicit and implicit).
    dials: int = 0
    dht_gets: int = 0
    dht_puts: int = 0
    dht_provides: int = 0
    dht_find_providers: int = 0
    #: Sequential lookup round trips spent by DHT operations.
    dht_hops: int = 0


# -- helpers --------------------------------------------------------------------------------


def _ring_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def _namespace(key: str) -> str | None:
    """The namespace of a ``/<namespace>/...`` key, as py-libp2p's ``split_key`` parses it."""
    if not key.startswith("/"):
        return None
    end = key.find("/", 1)
    return key[1:end] if end > 1 else None


def _peer_id_of(addr: str) -> str | None:
    """The peer ID of a multiaddr ending in ``/p2p/<id>``, or None."""
    parts = addr.split("/")
    if len(parts) < 3 or parts[0] != "" or parts[-2] != "p2p" or not parts[-1]:
        return None
    return parts[-1]


def _shared_link(network: MemNetwork, attribute: str, now: float, size: int, rate: float) -> float:
    """When a transfer of ``size`` bytes started ``now`` on one of ``network``'s links ends.

    The link shares its rate between the transfers on it, as multiplexed streams over TCP
    do: a new transfer is done once it has had its share alongside each transfer still in
    progress (at most its own size from each, at most the backlog in all), so that a small
    message is not stuck behind a bulk one, and the link never carries more than its rate.
    """
    free = max(now, getattr(network, attribute))
    backlog = (free - now) * rate
    ends = network._link_ends.setdefault(attribute, [])
    ends[:] = [end for end in ends if end > now]
    setattr(network, attribute, free + size / rate)
    done = now + (size + min(backlog, len(ends) * size)) / rate
    ends.append(done)
    return done


class _Handler:
    __slots__ = ("active", "context", "fn", "max_request_bytes", "timeout")

    def __init__(self, fn: RequestHandler, max_request_bytes: int, timeout: float) -> None:
        self.fn = fn
        self.max_request_bytes = max_request_bytes
        self.timeout = timeout
        self.active = 0
        self.context = contextvars.copy_context()


class _Reply:
    """How one request ended at the server, and when its answer reaches the requester."""

    __slots__ = ("body", "byte_scale", "done", "first_byte", "kind", "last_byte")

    def __init__(self, byte_scale: float = 1.0) -> None:
        self.done = trio.Event()
        #: Bytes on the wire per byte of the response (see ``MemWorld.byte_scale``).
        self.byte_scale = byte_scale
        #: "ok", "error" (a RemoteError reply), "reset" (stream reset) or "silent".
        self.kind = "silent"
        self.body = b""
        self.first_byte = 0.0
        self.last_byte = 0.0


# -- the world ------------------------------------------------------------------------------


class MemWorld:
    """Every peer of one simulation, the links between them, and the failures among them."""

    def __init__(
        self,
        *,
        seed: int = 0,
        latency: LatencyModel | None = None,
        jitter: float = 0.0,
        loss: float = 0.0,
        quantum: float = 0.001,
        dht_replication: int = 3,
        max_concurrent_requests: int = 64,
        gossip_hops: float = 1.5,
        request_overhead: float = 0.0,
        byte_scale: dict[str, float] | None = None,
        max_streams_per_peer: int = DEFAULT_MAX_STREAMS_PER_PEER,
        max_pending_bytes_per_peer: int = DEFAULT_MAX_PENDING_BYTES_PER_PEER,
        max_pending_bytes_total: int = DEFAULT_MAX_PENDING_BYTES_TOTAL,
    ) -> None:
        """Build an empty world.

        ``jitter`` is the relative standard deviation of each one-way delay, ``loss`` the
        probability that any one message is lost, ``quantum`` the grid (seconds) delivery
        times are rounded up to, ``dht_replication`` the number of ring successors holding a
        key, ``max_concurrent_requests`` the per-protocol limit of requests a peer serves at
        once (more are refused "busy"), ``gossip_hops`` the mean path length of gossip in
        one-way delays. ``request_overhead`` (seconds) is the protocol stack's own cost of one
        request (opening a stream, negotiating, framing), charged before the handler runs.
        ``byte_scale`` maps a protocol to the bytes its messages stand for per byte sent: the
        simulator ships small real operands for large declared ones, and the links must carry
        the declared size. ``max_streams_per_peer`` and ``max_pending_bytes_per_peer`` bound
        what one requester may have in a peer's handlers at once, all protocols together:
        requests and their (real, unscaled) payload bytes; more are refused "busy", as
        :class:`~mtor_p2p.libp2p_host.HostSettings` of the same names do.
        """
        if jitter < 0:
            raise ValueError("jitter must not be negative")
        if not 0.0 <= loss <= 1.0:
            raise ValueError("loss is a probability")
        if quantum < 0:
            raise ValueError("quantum must not be negative")
        if dht_replication < 1:
            raise ValueError("dht_replication must be at least 1")
        if max_concurrent_requests < 1:
            raise ValueError("max_concurrent_requests must be at least 1")
        if gossip_hops <= 0:
            raise ValueError("gossip_hops must be positive")
        if max_streams_per_peer < 1 or max_pending_bytes_per_peer < 0:
            raise ValueError("per-peer limits must be positive")
        self.max_streams_per_peer = max_streams_per_peer
        self.max_pending_bytes_per_peer = max_pending_bytes_per_peer
        self.max_pending_bytes_total = max_pending_bytes_total
        self.seed = seed
        self.latency = latency or LatencyModel()
        self.jitter = jitter
        self.loss = loss
        self.quantum = quantum
        self.dht_replication = dht_replication
        self.max_concurrent_requests = max_concurrent_requests
        self.gossip_hops = gossip_hops
        if request_overhead < 0:
            raise ValueError("request_overhead must not be negative")
        self.request_overhead = request_overhead
        self.byte_scale = dict(byte_scale or {})
        self.stats = MemWorldStats()
        #: The current network of every peer ever added, crashed ones included.
        self.peers: dict[str, MemNetwork] = {}
        self._rng = random.Random(seed)
        self._groups: dict[str, int] | None = None
        self._ring_keys: list[int] = []
        self._ring_ids: list[str] = []
        #: topic -> subscribed peer ID -> network (a dict: delivery order is deterministic).
        self._subscribers: dict[str, dict[str, MemNetwork]] = {}
        self._gossip_seq = 0

    # -- membership -----------------------------------------------------------------------

    def add_peer(self, identity: Identity, link: LinkProfile | None = None) -> MemNetwork:
        """Add a peer (alive, unconnected) and return its network."""
        link = link or LinkProfile()
        if self.latency.regions and link.region not in self.latency.regions:
            raise ValueError(
                f"region {link.region!r} is not in the latency table {self.latency.regions}"
            )
        if link.access_delay < 0:
            raise ValueError("access_delay must not be negative")
        for rate in (link.uplink_bps, link.downlink_bps):
            if rate is not None and rate <= 0:
                raise ValueError("link rates must be positive (or None for unlimited)")
        network = MemNetwork(self, identity, link)
        if network.peer_id in self.peers:
            raise ValueError(f"peer {network.peer_id} is already in this world")
        self.peers[network.peer_id] = network
        self._ring_add(network.peer_id)
        return network

    def network(self, peer_id: str) -> MemNetwork:
        """The current network of ``peer_id`` (KeyError if it was never added)."""
        return self.peers[peer_id]

    def alive(self, peer_id: str) -> bool:
        """Whether ``peer_id`` is in the world and not crashed."""
        network = self.peers.get(peer_id)
        return network is not None and network._alive

    def crash(self, peer_id: str) -> None:
        """Kill the peer's process: connections drop, served requests fail, subscriptions
        end (their channels close), its DHT store is lost. A crashed peer stays crashed."""
        network = self.peers[peer_id]
        if not network._alive:
            return
        network._alive = False
        self._ring_remove(peer_id)
        for other in network._conns:
            other_network = self.peers.get(other)
            if other_network is not None:
                other_network._conns.pop(peer_id, None)
        network._conns.clear()
        for scope in list(network._serving):
            scope.cancel()
        for topic, channels in network._subscriptions.items():
            for channel in channels:
                channel.close()
            self._unsubscribe(topic, network)
        network._subscriptions.clear()
        network._values.clear()
        network._providers.clear()

    def restart(self, peer_id: str) -> MemNetwork:
        """Bring a crashed peer back with a fresh network (same identity and link)."""
        old = self.peers[peer_id]
        if old._alive:
            raise ValueError(f"peer {peer_id} is alive; crash it first")
        network = MemNetwork(self, old._identity, old.link)
        self.peers[peer_id] = network
        self._ring_add(peer_id)
        return network

    # -- partitions -----------------------------------------------------------------------

    def partition(self, *groups: Iterable[str]) -> None:
        """Split the world: peers in different groups cannot exchange anything (silence, not
        errors); peers named in no group form one more group together."""
        mapping: dict[str, int] = {}
        for index, group in enumerate(groups):
            for peer_id in group:
                if mapping.setdefault(peer_id, index) != index:
                    raise ValueError(f"peer {peer_id} is in two groups")
        self._groups = mapping

    def heal(self) -> None:
        """End the partition."""
        self._groups = None

    def reachable(self, a: str, b: str) -> bool:
        """Whether no partition separates ``a`` from ``b`` (crashes aside)."""
        groups = self._groups
        return groups is None or groups.get(a, _UNGROUPED) == groups.get(b, _UNGROUPED)

    # -- DHT ring -------------------------------------------------------------------------

    def _ring_add(self, peer_id: str) -> None:
        key = _ring_hash(peer_id)
        index = bisect.bisect_left(self._ring_keys, key)
        self._ring_keys.insert(index, key)
        self._ring_ids.insert(index, peer_id)

    def _ring_remove(self, peer_id: str) -> None:
        key = _ring_hash(peer_id)
        index = bisect.bisect_left(self._ring_keys, key)
        while index < len(self._ring_ids) and self._ring_keys[index] == key:
            if self._ring_ids[index] == peer_id:
                del self._ring_keys[index]
                del self._ring_ids[index]
                return
            index += 1

    def dht_holders(self, key: str, *, count: int | None = None) -> list[str]:
        """The alive peers that hold ``key`` now: its ``dht_replication`` successors on the
        ring, or its first ``count`` successors (the order in which churn hands it on)."""
        alive = len(self._ring_ids)
        wanted = min(self.dht_replication if count is None else count, alive)
        start = bisect.bisect_right(self._ring_keys, _ring_hash(key))
        return [self._ring_ids[(start + i) % alive] for i in range(wanted)]

    # -- time -----------------------------------------------------------------------------

    def _quantise(self, when: float) -> float:
        quantum = self.quantum
        if quantum <= 0:
            return when
        return math.ceil(when / quantum - 1e-9) * quantum

    def _delay(self, src: MemNetwork, dst: MemNetwork) -> float:
        """One one-way delay from ``src`` to ``dst``, jittered."""
        delay = (
            self.latency.one_way(src.link.region, dst.link.region)
            + src.link.access_delay
            + dst.link.access_delay
        )
        if self.jitter:
            delay *= max(0.5, 1.0 + self._rng.gauss(0.0, self.jitter))
        return delay

    def _lost(self) -> bool:
        if self.loss and self._rng.random() < self.loss:
            self.stats.lost += 1
            return True
        return False

    def _transfer(self, src: MemNetwork, dst: MemNetwork, size: int) -> tuple[float, float] | None:
        """Send ``size`` bytes now; return when the first and the last byte arrive, or None if
        the message is lost or a partition silences it. Reserves both links."""
        if not self.reachable(src.peer_id, dst.peer_id):
            self.stats.blocked += 1
            return None
        now = trio.current_time()
        delay = self._delay(src, dst)
        start = end = now
        if size:
            # Each limited link shares its rate between the transfers on it, as multiplexed
            # streams over TCP do: a new transfer arriving while the link still has a backlog
            # gets half the rate until it is done (so a small message is not stuck behind a
            # bulk one), and delays the backlog by its own size. The transfer is complete when
            # both of its links have carried it.
            uplink = src.link.uplink_bps
            downlink = dst.link.downlink_bps
            if uplink is not None:
                start, end = now, _shared_link(src, "_uplink_free", now, size, uplink)
            if downlink is not None:
                end = max(end, _shared_link(dst, "_downlink_free", now, size, downlink))
        if self._lost():
            return None
        self.stats.bytes += size
        return self._quantise(start + delay), self._quantise(end + delay)

    def _signal(self, src: MemNetwork, dst: MemNetwork) -> float | None:
        """When a connection-level signal (a refusal, a reset) sent now reaches ``dst``."""
        if not self.reachable(src.peer_id, dst.peer_id):
            self.stats.blocked += 1
            return None
        return self._quantise(trio.current_time() + self._delay(src, dst))

    # -- gossip ---------------------------------------------------------------------------

    def _subscribe(self, topic: str, network: MemNetwork) -> None:
        self._subscribers.setdefault(topic, {})[network.peer_id] = network

    def _unsubscribe(self, topic: str, network: MemNetwork) -> None:
        subscribers = self._subscribers.get(topic)
        if subscribers is not None and subscribers.get(network.peer_id) is network:
            del subscribers[network.peer_id]
            if not subscribers:
                del self._subscribers[topic]

    def _publish(self, publisher: MemNetwork, topic: str, data: bytes) -> None:
        self.stats.gossip_published += 1
        message = Message(sender=publisher.peer_id, topic=topic, data=data)
        validator = publisher._topic_validators.get(topic)
        if validator is not None and not publisher._accepts(validator, message):
            return
        if topic in publisher._subscriptions:
            publisher._deliver(message, validate=False)
        subscribers = self._subscribers.get(topic)
        if not subscribers:
            return
        now = trio.current_time()
        hops = self.gossip_hops
        heap = publisher._gossip_heap
        earliest = math.inf
        for peer_id, network in subscribers.items():
            if network is publisher:
                continue
            if not self.reachable(publisher.peer_id, peer_id):
                self.stats.blocked += 1
                continue
            delay = self._delay(publisher, network) * hops
            if self._lost():
                continue
            when = self._quantise(now + delay)
            earliest = min(earliest, when)
            self._gossip_seq += 1
            heapq.heappush(heap, (when, self._gossip_seq, network, message))
        if earliest == math.inf:
            return
        if not publisher._gossip_walking:
            publisher._gossip_walking = True
            trio.lowlevel.spawn_system_task(self._walk, publisher, name="memnet gossip")
        elif publisher._gossip_wake is not None and earliest < publisher._gossip_wake.deadline:
            publisher._gossip_wake.deadline = earliest

    async def _walk(self, publisher: MemNetwork) -> None:
        """Deliver a publisher's messages in time order, ties in publication order. One task
        per publishing peer, alive while it has deliveries pending; a publication due sooner
        than the one it sleeps for moves its wake-up earlier."""
        heap = publisher._gossip_heap
        try:
            while heap:
                when = heap[0][0]
                if when > trio.current_time():
                    with trio.CancelScope(deadline=when) as wake:
                        publisher._gossip_wake = wake
                        await trio.sleep_forever()
                    publisher._gossip_wake = None
                    continue
                _, _, network, message = heapq.heappop(heap)
                if not network._alive:
                    continue
                if not self.reachable(publisher.peer_id, network.peer_id):
                    self.stats.blocked += 1
                    continue
                self.stats.bytes += len(message.data)
                try:
                    network._deliver(message, validate=True)
                except Exception:  # a bug here must not take the whole simulation down
                    log.exception("gossip delivery to %s failed", network.peer_id)
        finally:
            publisher._gossip_walking = False
            publisher._gossip_wake = None

    # -- DHT ------------------------------------------------------------------------------

    def _random_peer(self, origin: MemNetwork) -> MemNetwork | None:
        ids = self._ring_ids
        for _ in range(8):
            peer_id = ids[self._rng.randrange(len(ids))]
            if peer_id != origin.peer_id and self.reachable(origin.peer_id, peer_id):
                return self.peers[peer_id]
        return None

    async def _dht_walk(self, origin: MemNetwork) -> None:
        """The lookup: ``max(1, ceil(log2(N) / 2))`` sequential round trips to random peers."""
        alive = len(self._ring_ids)
        if alive < 2:
            await trio.lowlevel.checkpoint()
            return
        hops = max(1, math.ceil(math.log2(alive) / 2))
        finish = trio.current_time()
        for _ in range(hops):
            peer = self._random_peer(origin)
            if peer is None:
                break
            finish += self._delay(origin, peer) + self._delay(peer, origin)
            self.stats.dht_hops += 1
        await trio.sleep_until(self._quantise(finish))

    async def _dht_ask(
        self, origin: MemNetwork, key: str, apply: Callable[[MemNetwork], None] | None = None
    ) -> list[MemNetwork]:
        """One parallel round trip to the key's holders; ``apply`` runs at each holder the
        request reaches. Returns the holders whose answer came back (alive at the end)."""
        now = trio.current_time()
        finish = now
        silent = False
        answered: list[MemNetwork] = []
        for peer_id in self.dht_holders(key):
            holder = self.peers[peer_id]
            if holder is origin:
                continue
            if not self.reachable(origin.peer_id, peer_id):
                self.stats.blocked += 1
                silent = True
                continue
            there = self._delay(origin, holder)
            if self._lost():
                silent = True
                continue
            if apply is not None:
                apply(holder)
            back = self._delay(holder, origin)
            if self._lost():
                silent = True
                continue
            finish = max(finish, now + there + back)
            answered.append(holder)
        if silent:
            finish = max(finish, now + DHT_QUERY_TIMEOUT)
        await trio.sleep_until(self._quantise(finish))
        return [holder for holder in answered if holder._alive]


# -- one peer -------------------------------------------------------------------------------


class MemNetwork:
    """One peer's view of a :class:`MemWorld`: the :class:`~mtor_p2p.network.Network` port
    plus the extras the node uses (``routing_table_size``, ``listen_ports``,
    ``add_announce_addr``, ``peer_addrs``, ``stats``). Made by :meth:`MemWorld.add_peer`.

    ``async with network:`` (or :meth:`close`) stops the peer on exit, as leaving
    ``Libp2pNetwork.open`` does; in the world that is a crash.
    """

    def __init__(self, world: MemWorld, identity: Identity, link: LinkProfile) -> None:
        self._world = world
        self._identity = identity
        self._peer_id = identity.peer_id  # derived from the key: compute it once
        self.link = link
        self.stats = HostStats()
        self._alive = True
        self._addrs = [
            f"/dns4/{self._peer_id[-16:].lower()}.memnet/tcp/{MEMNET_PORT}/p2p/{self._peer_id}"
        ]
        self._conns: dict[str, None] = {}
        self._handlers: dict[str, _Handler] = {}
        self._serving: dict[trio.CancelScope, None] = {}
        #: requester -> [requests in our handlers, their payload bytes]; a requester leaves
        #: the table when it has none, so it never outgrows the requests being served.
        self._inbound: dict[str, list[int]] = {}
        self._subscriptions: dict[str, list[trio.MemorySendChannel[Message]]] = {}
        self._topic_validators: dict[str, TopicValidator] = {}
        self._dht_validators: dict[str, DhtValidator] = {}
        self._values: dict[str, bytes] = {}
        self._providers: dict[str, dict[str, None]] = {}
        self._uplink_free = 0.0
        self._downlink_free = 0.0
        #: End times of the transfers in progress on each link (see _shared_link).
        self._link_ends: dict[str, list[float]] = {}
        #: Our publications in flight: (due, sequence, receiver, message), walked by _walk.
        self._gossip_heap: list[tuple[float, int, MemNetwork, Message]] = []
        self._gossip_walking = False
        self._gossip_wake: trio.CancelScope | None = None
        #: Our small requests' round trips, per peer (see connection_kind and round_trip).
        self.round_trips = RoundTrips()

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def world(self) -> MemWorld:
        """The world this network belongs to."""
        return self._world

    @property
    def alive(self) -> bool:
        """False once the peer has crashed or been closed (a restart makes a new network)."""
        return self._alive

    def close(self) -> None:
        """Stop this peer (the world sees a crash); a no-op if it is already down."""
        if self._alive and self._world.peers.get(self._peer_id) is self:
            self._world.crash(self._peer_id)

    async def __aenter__(self) -> MemNetwork:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _check_open(self) -> None:
        if not self._alive:
            raise NetworkError(f"host {self._peer_id} is closed")

    # -- identity and addresses -----------------------------------------------------------

    @property
    def peer_id(self) -> str:
        """This node's peer ID."""
        return self._peer_id

    def addrs(self) -> list[str]:
        """``/dns4/<id tail>.memnet/tcp/4001/p2p/<id>`` and any announced addresses."""
        return list(self._addrs)

    def listen_ports(self) -> list[int]:
        """No TCP ports: nothing listens in memory (so no tunnel is ever opened)."""
        return []

    def add_announce_addr(self, addr: str) -> None:
        """Advertise one more address; ignored beyond 16 addresses or 256 characters (the
        limits of capacity records)."""
        full = f"{addr.split('/p2p/')[0]}/p2p/{self._peer_id}"
        if full in self._addrs or len(self._addrs) >= MAX_ADDRS or len(full) > MAX_ADDR_CHARS:
            return
        self._addrs.append(full)

    def peer_addrs(self, peer_id: str) -> list[str]:
        """The addresses of any peer in the world (memnet's peerstore knows everyone)."""
        network = self._world.peers.get(peer_id)
        return network.addrs() if network is not None else []

    def connected_peers(self) -> list[str]:
        """Peer IDs with an open connection (both ends list each other)."""
        return list(self._conns) if self._alive else []

    def routing_table_size(self) -> int:
        """The number of connected peers (libp2p fills its table from connections)."""
        return len(self._conns) if self._alive else 0

    # -- dialing --------------------------------------------------------------------------

    async def connect(self, addr: str, *, timeout: float = 5.0) -> str:
        """Dial the peer named by the ``/p2p/<id>`` at the end of ``addr`` (the rest of the
        address is not looked at); one round trip. Unknown or crashed peers refuse after a
        round trip; a partition is silence until ``timeout``."""
        self._check_open()
        peer_id = _peer_id_of(addr)
        if peer_id is None:
            raise NetworkError(f"not a dialable multiaddr with /p2p/: {addr!r}")
        try:
            with trio.fail_after(timeout):
                await self._dial(peer_id, explicit=True)
        except trio.TooSlowError:
            raise NetworkError(f"dial to {addr} timed out after {timeout} s") from None
        return peer_id

    def connection_kind(self, peer_id: str) -> str:
        """``"direct"`` while connected to ``peer_id``, else ``"none"``: memnet has no NATs,
        so no relayed connections (:class:`~mtor_p2p.network.PeerLinks`)."""
        return "direct" if self._alive and peer_id in self._conns else "none"

    def same_host(self, peer_id: str) -> bool:
        """Never: memnet's peers stand for machines of their own, though they share this
        process (:class:`~mtor_p2p.network.PeerLinks`)."""
        return False

    def round_trip(self, peer_id: str) -> float | None:
        """The lowest recent small request round trip to ``peer_id`` in seconds of virtual
        time, None if none was measured (:class:`~mtor_p2p.network.RoundTrips`)."""
        return self.round_trips.lowest(peer_id)

    def disconnect(self, peer_id: str) -> None:
        """Close the connection to ``peer_id`` on both ends (if there is one)."""
        self._conns.pop(peer_id, None)
        other = self._world.peers.get(peer_id)
        if other is not None:
            other._conns.pop(self._peer_id, None)

    async def _dial(self, peer_id: str, *, explicit: bool) -> None:
        world = self._world
        if peer_id == self._peer_id:
            raise NetworkError("cannot dial ourselves")
        if peer_id in self._conns:
            await trio.lowlevel.checkpoint()
            return
        world.stats.dials += 1
        target = world.peers.get(peer_id)
        if target is None:
            if not explicit:
                raise NetworkError(f"no addresses known for {peer_id}")
            # Nobody listens there: refused after our own local round trip.
            await trio.sleep_until(
                world._quantise(trio.current_time() + 2 * world._delay(self, self))
            )
            raise NetworkError(f"dial to {peer_id} failed: connection refused")
        if not world.reachable(self._peer_id, peer_id):
            world.stats.blocked += 1
            await trio.sleep_forever()
        round_trip = world._delay(self, target) + world._delay(target, self)
        await trio.sleep_until(world._quantise(trio.current_time() + round_trip))
        self._check_open()
        current = world.peers[peer_id]
        if not current._alive:
            raise NetworkError(f"dial to {peer_id} failed: connection refused")
        if not world.reachable(self._peer_id, peer_id):
            world.stats.blocked += 1
            await trio.sleep_forever()
        self._conns[peer_id] = None
        current._conns[self._peer_id] = None

    # -- request / response ---------------------------------------------------------------

    def handle(
        self,
        protocol: str,
        handler: RequestHandler,
        *,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        timeout: float = 30.0,
        max_answer_bytes: int = 0,
    ) -> None:
        """Serve ``protocol``; each call runs under ``timeout`` in a task of its own, in the
        contextvars context current now, and at most ``max_concurrent_requests`` at once.
        ``max_answer_bytes`` is not enforced here: memnet's answers are handed over whole, no
        client reads slowly (the libp2p adapter bounds answers in hand)."""
        self._handlers[protocol] = _Handler(handler, max_request_bytes, timeout)

    async def request(
        self,
        peer_id: str,
        protocol: str,
        payload: Payload,
        *,
        timeout: float = 10.0,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        sent: trio.Event | None = None,
    ) -> bytes:
        """Send one request (dialling first if not connected); raise NetworkError or
        RemoteError on failure, exactly as the libp2p adapter does (``sent``: set once the
        request's last byte is on the link)."""
        self._check_open()
        payload = bytes(payload)
        # Only an exchange on an open connection measures a round trip (a dial adds one).
        connected, began = peer_id in self._conns, trio.current_time()
        try:
            with trio.fail_after(timeout):
                reply = await self._exchange(peer_id, protocol, payload, sent)
                if reply.kind == "silent":
                    await trio.sleep_forever()
                if reply.kind == "reset":
                    await trio.sleep_until(reply.last_byte)
                    raise NetworkError(
                        f"request {protocol} to {peer_id} failed: {reply.body.decode()}"
                    )
                await trio.sleep_until(reply.first_byte)
                limit = MAX_ERROR_BYTES if reply.kind == "error" else max_response_bytes
                if len(reply.body) > limit:
                    raise NetworkError(f"response of {len(reply.body)} bytes exceeds limit {limit}")
                await trio.sleep_until(reply.last_byte)
        except trio.TooSlowError:
            raise NetworkError(
                f"request {protocol} to {peer_id} timed out after {timeout} s"
            ) from None
        self._check_open()
        if connected:
            self.round_trips.observe(
                peer_id, trio.current_time() - began, len(payload), len(reply.body)
            )
        if reply.kind == "ok":
            return reply.body
        raise RemoteError(remote_reason(reply.body))

    async def _exchange(
        self, peer_id: str, protocol: str, payload: bytes, sent: trio.Event | None = None
    ) -> _Reply:
        """Dial if needed, carry the request to the server and wait for it to answer."""
        world = self._world
        if peer_id not in self._conns:
            await self._dial(peer_id, explicit=False)
        server = world.peers[peer_id]
        scale = world.byte_scale.get(protocol, 1.0)
        reply = _Reply(scale)
        world.stats.requests += 1
        times = world._transfer(self, server, round(len(payload) * scale))
        if times is None:
            return reply  # silent
        await trio.sleep_until(times[1] + world.request_overhead)
        if sent is not None:
            sent.set()
        self._check_open()
        if not server._alive:
            server._reset(reply, self, "connection reset by peer")
            return reply
        if not world.reachable(peer_id, self._peer_id):
            world.stats.blocked += 1
            return reply  # silent
        server._accept(self, protocol, payload, reply)
        await reply.done.wait()
        return reply

    def _accept(self, requester: MemNetwork, protocol: str, payload: bytes, reply: _Reply) -> None:
        """A request arrived: refuse it at once or start its handler."""
        handler = self._handlers.get(protocol)
        if handler is None:
            self._reset(reply, requester, f"protocol not supported: {protocol}")
            return
        world = self._world
        size = len(payload)
        # The checks in the order libp2p makes them: the requester's stream slot, the size
        # announced in the length prefix, the requester's byte budget, the busy permit.
        inbound = self._inbound.get(requester._peer_id, [0, 0])
        if inbound[0] >= world.max_streams_per_peer:
            self.stats.requests_refused_peer_streams += 1
            self._answer(reply, requester, "error", b"busy")
            return
        if size > handler.max_request_bytes:
            self.stats.requests_refused_size += 1
            self._answer(reply, requester, "error", b"request too large")
            return
        if inbound[1] + size > world.max_pending_bytes_per_peer:
            self.stats.requests_refused_peer_bytes += 1
            self._answer(reply, requester, "error", b"busy")
            return
        if self.stats.request_bytes_pending + size > world.max_pending_bytes_total:
            self.stats.requests_refused_total_bytes += 1
            self._answer(reply, requester, "error", b"busy")
            return
        if handler.active >= world.max_concurrent_requests:
            self.stats.requests_refused_busy += 1
            self._answer(reply, requester, "error", b"busy")
            return
        handler.active += 1
        inbound[0] += 1
        inbound[1] += size
        self._inbound[requester._peer_id] = inbound
        stats = self.stats
        stats.request_bytes_pending += size
        stats.request_bytes_pending_peak = max(
            stats.request_bytes_pending_peak, stats.request_bytes_pending
        )
        trio.lowlevel.spawn_system_task(
            self._serve,
            handler,
            requester,
            payload,
            reply,
            name=f"memnet handler {protocol}",
            context=handler.context.copy(),
        )

    async def _serve(
        self, handler: _Handler, requester: MemNetwork, payload: bytes, reply: _Reply
    ) -> None:
        """Run one handler call under its deadline; nothing it raises leaves this task."""
        kind, body = "reset", b"stream reset"
        scope = trio.CancelScope()
        self._serving[scope] = None
        try:
            with scope:
                with trio.move_on_after(handler.timeout) as deadline:
                    try:
                        response = await handler.fn(requester._peer_id, payload)
                    except RemoteError as exc:
                        kind, body = "error", str(exc).encode()[:MAX_ERROR_BYTES]
                    except Exception as exc:
                        self.stats.handler_errors += 1
                        log.warning("handler raised %s: %s", type(exc), exc)
                        kind, body = "error", b"internal error"
                    else:
                        if isinstance(response, bytes | bytearray | memoryview | Gathered):
                            kind, body = "ok", bytes(response)
                        else:  # libp2p fails writing it and resets the stream
                            self.stats.handler_errors += 1
                            log.info("handler returned %s, not bytes", type(response))
                if deadline.cancelled_caught:
                    # libp2p: the handler deadline's TooSlowError is caught by the guard.
                    self.stats.handler_errors += 1
                    kind, body = "reset", b"stream reset (handler timed out)"
        finally:
            handler.active -= 1
            self._serving.pop(scope, None)
            self._release(requester._peer_id, len(payload))
        if scope.cancelled_caught:
            kind, body = "reset", b"connection reset by peer"
        if kind == "reset":
            self._reset(reply, requester, body.decode())
        else:
            self._answer(reply, requester, kind, body)

    def _release(self, requester: str, size: int) -> None:
        """A request of ``requester``'s left our handlers: give back its slot and bytes."""
        inbound = self._inbound[requester]
        inbound[0] -= 1
        inbound[1] -= size
        if inbound[0] == 0:
            del self._inbound[requester]
        self.stats.request_bytes_pending -= size

    def _answer(self, reply: _Reply, requester: MemNetwork, kind: str, body: bytes) -> None:
        self._world.stats.responses += 1
        times = self._world._transfer(self, requester, round(len(body) * reply.byte_scale))
        if times is not None:
            reply.kind = kind
            reply.body = body
            reply.first_byte, reply.last_byte = times
        reply.done.set()

    def _reset(self, reply: _Reply, requester: MemNetwork, reason: str) -> None:
        when = self._world._signal(self, requester)
        if when is not None:
            reply.kind = "reset"
            reply.body = reason.encode()
            reply.last_byte = when
        reply.done.set()

    # -- pubsub ---------------------------------------------------------------------------

    async def publish(self, topic: str, data: bytes) -> None:
        """Gossip ``data`` on ``topic`` (best effort); our own subscription gets it at once."""
        self._check_open()
        await trio.lowlevel.checkpoint()
        self._world._publish(self, topic, bytes(data))

    async def subscribe(
        self, topic: str, *, buffer: int = 256
    ) -> trio.MemoryReceiveChannel[Message]:
        """Receive messages on ``topic`` into a channel of ``buffer`` slots; when it is full
        the newest message is dropped (counted in ``stats.gossip_dropped``)."""
        self._check_open()
        await trio.lowlevel.checkpoint()
        send, receive = trio.open_memory_channel[Message](buffer)
        self._subscriptions.setdefault(topic, []).append(send)
        self._world._subscribe(topic, self)
        return receive

    def set_topic_validator(self, topic: str, validator: TopicValidator) -> None:
        """Check every message on ``topic`` we publish or receive; False or an exception
        rejects it (counted in ``stats.gossip_rejected``)."""
        self._topic_validators[topic] = validator

    def _accepts(self, validator: TopicValidator, message: Message) -> bool:
        try:
            ok = bool(validator(message.sender, message.data))
        except Exception as exc:
            log.debug("topic validator for %s raised %s", message.topic, exc)
            ok = False
        if not ok:
            self.stats.gossip_rejected += 1
            self._world.stats.gossip_rejected += 1
        return ok

    def _deliver(self, message: Message, *, validate: bool) -> None:
        channels = self._subscriptions.get(message.topic)
        if not channels:
            return
        if validate:
            validator = self._topic_validators.get(message.topic)
            if validator is not None and not self._accepts(validator, message):
                return
        stats = self._world.stats
        for channel in list(channels):
            try:
                channel.send_nowait(message)
            except trio.WouldBlock:
                self.stats.gossip_dropped += 1
                stats.gossip_dropped += 1
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                channels.remove(channel)
            else:
                stats.gossip_delivered += 1
        if not channels:
            del self._subscriptions[message.topic]
            self._world._unsubscribe(message.topic, self)

    # -- DHT ------------------------------------------------------------------------------

    def register_dht_validator(self, namespace: str, validator: DhtValidator) -> None:
        """Validate every value under ``/<namespace>/`` (keys of other namespaces are
        refused, as py-libp2p's strict validation does)."""
        self._dht_validators[namespace] = validator

    def _dht_validator(self, key: str) -> DhtValidator | None:
        namespace = _namespace(key)
        return None if namespace is None else self._dht_validators.get(namespace)

    def _store_value(self, key: str, value: bytes) -> None:
        if key not in self._values and len(self._values) >= MAX_STORE_ENTRIES:
            del self._values[next(iter(self._values))]
        self._values[key] = value

    def _offer_value(self, key: str, value: bytes) -> None:
        """A PUT_VALUE arrived: keep it if our validator accepts it and it beats ours."""
        validator = self._dht_validator(key)
        if validator is None:
            return
        try:
            validator.validate(key, value)
            existing = self._values.get(key)
            if existing is not None and existing != value:
                if validator.select(key, [existing, value]) == 0:
                    return
        except Exception as exc:
            log.debug("refused DHT value for %s: %s", key, exc)
            return
        self._store_value(key, value)

    async def dht_put(self, key: str, value: bytes) -> None:
        """Store ``value`` here and at the key's holders; NetworkError if our validator for
        the namespace is missing or refuses it, or if it would replace a better local value."""
        self._check_open()
        value = bytes(value)
        validator = self._dht_validator(key)
        if validator is None:
            raise NetworkError(f"DHT put of {key} failed: no validator for its namespace")
        try:
            validator.validate(key, value)
            old = self._values.get(key)
            if old is not None and old != value and validator.select(key, [value, old]) != 0:
                raise ValueError("Refusing to replace newer value with the older one")
        except Exception as exc:
            raise NetworkError(f"DHT put of {key} failed: {exc}") from exc
        world = self._world
        world.stats.dht_puts += 1
        self._store_value(key, value)
        await world._dht_walk(self)
        self._check_open()
        await world._dht_ask(self, key, lambda holder: holder._offer_value(key, value))

    async def dht_get(self, key: str, *, timeout: float = 10.0) -> bytes | None:
        """Our own value for ``key`` if we hold one, else the best valid value the holders
        return (by our validator's ``select``), or None if none is found in ``timeout``."""
        self._check_open()
        world = self._world
        world.stats.dht_gets += 1
        with trio.move_on_after(timeout):
            local = self._values.get(key)
            if local is not None:
                await trio.lowlevel.checkpoint()
                return local
            await world._dht_walk(self)
            holders = await world._dht_ask(self, key)
            validator = self._dht_validator(key)
            if validator is None or not self._alive:
                return None
            values = []
            for holder in holders:
                value = holder._values.get(key)
                if value is None:
                    continue
                try:
                    validator.validate(key, value)
                except Exception:
                    continue
                values.append(value)
            if not values:
                return None
            try:
                return values[validator.select(key, values)]
            except Exception as exc:
                log.debug("DHT select for %s failed: %s", key, exc)
                return None
        return None

    def _add_provider(self, key: str, peer_id: str) -> None:
        providers = self._providers.get(key)
        if providers is None:
            if len(self._providers) >= MAX_STORE_ENTRIES:
                del self._providers[next(iter(self._providers))]
            providers = self._providers[key] = {}
        providers.pop(peer_id, None)
        providers[peer_id] = None
        if len(providers) > MAX_PROVIDERS_PER_KEY:
            del providers[next(iter(providers))]

    async def provide(self, key: str) -> None:
        """Announce here and at the key's holders that this node provides ``key``."""
        self._check_open()
        world = self._world
        world.stats.dht_provides += 1
        self._add_provider(key, self._peer_id)
        await world._dht_walk(self)
        self._check_open()
        peer_id = self._peer_id
        await world._dht_ask(self, key, lambda holder: holder._add_provider(key, peer_id))

    async def find_providers(self, key: str, *, timeout: float = 10.0) -> list[str]:
        """Up to 20 providers of ``key``: our own record if we have one (as py-libp2p does),
        else those the holders return; [] if none is found in ``timeout``."""
        self._check_open()
        world = self._world
        world.stats.dht_find_providers += 1
        with trio.move_on_after(timeout):
            local = self._providers.get(key)
            if local:
                await trio.lowlevel.checkpoint()
                return list(local)[:MAX_PROVIDERS_RETURNED]
            await world._dht_walk(self)
            found: dict[str, None] = {}
            for holder in await world._dht_ask(self, key):
                found.update(holder._providers.get(key, {}))
            return list(found)[:MAX_PROVIDERS_RETURNED]
        return []
