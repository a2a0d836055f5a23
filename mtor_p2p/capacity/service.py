"""The capacity service: announce our own record, and keep a view of everyone else's.

Two sources feed the view, because gossip alone may drop messages (py-libp2p's GossipSub does,
silently) and the DHT alone is slow to notice change:

* GossipSub topic :data:`CAPACITY_TOPIC`: every peer publishes its record when it changes and
  at least every ``announce_interval``; each message is validated before it is forwarded.
* The DHT key ``/mtor/cap/<peer-id>``: a periodic sweep fetches the records of connected peers
  that the view lacks or holds close to expiry. A record goes there when it is renewed (one
  renewal interval after the last put that completed, or at half the stored copy's lifetime
  if sooner; a failed put is retried a quarter interval later) and when what peers plan by
  changes (addresses, price, kernels, relay service); a change of load or free memory, a
  newly connected peer or a request to announce is gossiped only. Each DHT put is a lookup and a
  store on every close peer (a dozen stream openings in a small network, dozens in a large
  one), and a busy worker's load moves every second: a worker whose load changed every
  second put its record 54 times a minute, now 3 (`tests/test_capacity_dht_puts.py`). A
  reader of the DHT gets a record at most one renewal old, whose load is a claim anyway.

Sequence numbers are milliseconds of network time (at least one more than the last), so they
keep increasing across restarts without any stored state.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import trio

from mtor_p2p.capacity.record import (
    DHT_NAMESPACE,
    MAX_TTL_SECONDS,
    CapacityRecord,
    CapacityRecordValidator,
    Device,
    capacity_key,
    decode_capacity_record,
)
from mtor_p2p.capacity.view import CapacityView
from mtor_p2p.clock import NetClock
from mtor_p2p.identity import Identity
from mtor_p2p.network import DHT_PUT_MAX_S, Message, Network, NetworkError
from mtor_p2p.wire import RecordError

log = logging.getLogger(__name__)

CAPACITY_TOPIC = "mtor/capacity/1"


#: Longest renewal interval a receive budget may stretch to (seconds).
MAX_RENEWAL_STRETCH = 600.0


def capacity_topic(region: str | None = None) -> str:
    """The gossip topic of capacity records: one for everyone, or one per region."""
    return CAPACITY_TOPIC if region is None else f"{CAPACITY_TOPIC}/{region}"


MIN_TTL_SECONDS = 2.0


@dataclass(frozen=True)
class Offer:
    """What this peer offers right now; the service turns it into signed records."""

    devices: tuple[Device, ...]
    tflops: float
    mem_free: int
    load: float
    price: float
    kernels: tuple[str, ...] = ()
    #: This peer serves as a circuit relay (said in its record).
    relay: bool = False


@dataclass(frozen=True)
class CapacityTiming:
    """How often to announce, sweep and prune, and how long a record lives (seconds)."""

    ttl: float = 60.0
    announce_interval: float = 20.0
    change_check_interval: float = 1.0
    sweep_interval: float = 2.0
    prune_interval: float = 1.0
    #: ``global``: one topic for every record. ``region``: a topic per region, so that a
    #: peer hears only its own region's gossip; other peers' records it pulls from the DHT
    #: as it connects to them.
    scope: str = "global"
    #: Records per second a peer should have to check on its topic. When set, each peer
    #: stretches its renewal interval (and TTL) with the number of peers it sees, and spaces
    #: out change-triggered announcements, so that gossip per peer stays bounded however large
    #: the network grows. None: renew every ``announce_interval``.
    max_receive_rate: float | None = None

    def __post_init__(self) -> None:
        if not MIN_TTL_SECONDS <= self.ttl <= MAX_TTL_SECONDS:
            raise ValueError(f"record TTL must be in [{MIN_TTL_SECONDS}, {MAX_TTL_SECONDS}] s")
        if self.announce_interval >= self.ttl / 2:
            raise ValueError("announce interval must be under half the TTL, to renew in time")
        if self.scope not in ("global", "region"):
            raise ValueError("capacity gossip scope must be 'global' or 'region'")
        if self.max_receive_rate is not None and self.max_receive_rate <= 0:
            raise ValueError("max_receive_rate must be positive")


class CapacityService:
    """Announces this peer's capacity and maintains the merged :class:`CapacityView`."""

    def __init__(
        self,
        network: Network,
        identity: Identity,
        clock: NetClock,
        *,
        region: str,
        offer: Callable[[], Offer],
        timing: CapacityTiming | None = None,
    ) -> None:
        self._network = network
        self._identity = identity
        self._clock = clock
        self._region = region
        self._offer = offer
        self.timing = timing or CapacityTiming()
        #: The last record stored in the DHT (a put that completed), and when a failed put
        #: may be tried again (trio time).
        self._stored: CapacityRecord | None = None
        self._dht_retry_at = -math.inf
        self.view = CapacityView()
        self.validator = CapacityRecordValidator(clock.now)
        self._own: CapacityRecord | None = None
        self._own_raw: bytes | None = None
        self._last_seq = -1
        self._announced_to: set[str] = set()
        self._announce_now = trio.Event()
        self.changed = trio.Event()  # set (and replaced) whenever the view changes
        self.topic = capacity_topic(region if self.timing.scope == "region" else None)
        network.register_dht_validator(DHT_NAMESPACE, self.validator)
        network.set_topic_validator(self.topic, self._accept_gossip)

    # -- our own record --------------------------------------------------------------------

    @property
    def own_record(self) -> CapacityRecord | None:
        """The record we last announced."""
        return self._own

    def _next_seq(self) -> int:
        self._last_seq = max(self._last_seq + 1, int(self._clock.now() * 1000))
        return self._last_seq

    def renewal_interval(self) -> float:
        """Seconds between renewals of our record: the configured interval, stretched so that
        the peers we see, renewing at the same pace, send each of us at most
        ``max_receive_rate`` records per second (bounded by what the maximum TTL allows)."""
        base = self.timing.announce_interval
        rate = self.timing.max_receive_rate
        if rate is None:
            return base
        # Capped: records anyone can sign (Sybils) inflate the view, and must not be able to
        # stretch honest peers' renewals (and the life of a crashed peer's record) without end.
        return min(max(base, len(self.view) / rate), max(base, MAX_RENEWAL_STRETCH))

    def record_ttl(self) -> float:
        """Lifetime of the records we sign: long enough to outlive two renewal intervals."""
        return min(MAX_TTL_SECONDS, max(self.timing.ttl, 2.5 * self.renewal_interval()))

    def _build(self, offer: Offer, *, withdrawn: bool = False) -> CapacityRecord:
        now = self._clock.now()
        return CapacityRecord(
            peer_id=self._identity.peer_id,
            addrs=tuple(self._network.addrs()[:16]),
            region=self._region,
            devices=offer.devices,
            tflops=offer.tflops,
            mem_free=offer.mem_free,
            load=offer.load,
            price=offer.price,
            seq=self._next_seq(),
            issued=now,
            expires=now + self.record_ttl(),
            kernels=offer.kernels,
            withdrawn=withdrawn,
            relay=offer.relay,
        )

    def _change(self, offer: Offer) -> str | None:
        """What changed enough to announce before the next renewal: ``"record"`` (what peers
        plan by: gossip and the DHT), ``"gossip"`` (load or free memory only, or a newly
        connected peer, which gossip reaches: the DHT's copy does not depend on who is
        connected), or None."""
        own = self._own
        if own is None:
            return "record"
        connected = set(self._network.connected_peers())
        newcomers = connected - self._announced_to
        self._announced_to = connected
        if (
            tuple(self._network.addrs()[:16]) != own.addrs
            or offer.price != own.price
            or offer.kernels != own.kernels
            or offer.relay != own.relay
        ):
            return "record"
        if (
            newcomers  # a newly connected peer should hear from us without waiting
            or abs(offer.load - own.load) >= 0.1
            or abs(offer.mem_free - own.mem_free) > max(own.mem_free, 1) * 0.1
        ):
            return "gossip"
        return None

    async def announce(self, *, withdrawn: bool = False, to_dht: bool = True) -> CapacityRecord:
        """Sign a fresh record, gossip it and (unless ``to_dht`` is false: a change of load
        alone) store it in the DHT; return it."""
        record = self._build(self._offer(), withdrawn=withdrawn)
        raw = record.sign(self._identity)
        self._own, self._own_raw = record, raw
        self._merge(record)
        try:
            await self._network.publish(self.topic, raw)
        except Exception as exc:  # gossip is best effort; the DHT and renewal cover a miss
            log.info("capacity gossip failed: %s", exc)
        if not to_dht:
            return record
        stored = False
        try:
            # A quarter of the copy's life, and not less than a put may take (a put cut off
            # while its late stores go out would count as failed and be made again), but at
            # most half the life of the record it stores: the next renewal (gossip included)
            # waits for this put, and must come before the record lapses (an interval plus
            # half a life is under a life, which is at least 2.5 intervals).
            budget = min(max(self.timing.ttl / 4, DHT_PUT_MAX_S), self.record_ttl() / 2)
            with trio.move_on_after(budget):
                await self._network.dht_put(capacity_key(record.peer_id), raw)
                stored = True
        except NetworkError as exc:
            log.info("capacity DHT put failed: %s", exc)
        if stored:
            self._stored = record
        else:
            # Tried again, not at once (a failing DHT would be asked every second), yet well
            # before the copy there expires: its TTL is at least 2.5 renewal intervals.
            self._dht_retry_at = trio.current_time() + self.renewal_interval() / 4
        return record

    def _dht_due(self) -> bool:
        """Whether our record should go to the DHT now: none is there, or the copy there is
        one renewal interval old, or half its lifetime has passed (the interval may have
        grown with the view since it was signed: a review found a busy peer's copy lapsing);
        not before a failed put's retry time."""
        if trio.current_time() < self._dht_retry_at:
            return False
        stored = self._stored
        if stored is None:
            return True
        now = self._clock.now()
        half_life = (stored.expires - stored.issued) / 2
        return now - stored.issued >= min(self.renewal_interval(), half_life)

    async def withdraw(self, *, timeout: float = 3.0) -> None:
        """Tell the network we are leaving: a withdrawn record with a higher ``seq``."""
        if self._own is None:
            return
        with trio.move_on_after(timeout):
            await self.announce(withdrawn=True)

    def request_announce(self) -> None:
        """Announce at the next opportunity (call after the offer changed)."""
        self._announce_now.set()

    # -- others' records -------------------------------------------------------------------

    def _accept_gossip(self, sender: str, data: bytes) -> bool:
        try:
            record = decode_capacity_record(data, now=self._clock.now(), expected_peer=sender)
        except RecordError as exc:
            log.debug("rejected capacity gossip from %s: %s", sender, exc)
            return False
        if self.timing.scope == "region" and record.region != self._region:
            return False  # another region's record has no business on this region's topic
        # Forward only news: our own records, and records newer than what we hold.
        own = record.peer_id == self._identity.peer_id
        return own or record.seq > self.view.held_seq(record.peer_id)

    def _merge(self, record: CapacityRecord) -> None:
        if self.view.offer(record, self._clock.now()):
            self._signal_change()

    def _signal_change(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def offer_raw(self, data: bytes, *, expected_peer: str | None = None) -> bool:
        """Verify a record from any source and merge it; True if it changed the view."""
        try:
            record = decode_capacity_record(
                data, now=self._clock.now(), expected_peer=expected_peer
            )
        except RecordError as exc:
            log.debug("rejected capacity record: %s", exc)
            return False
        before = self.view.held_seq(record.peer_id)
        self._merge(record)
        return self.view.held_seq(record.peer_id) != before

    # -- loops -----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run every loop of the service until cancelled."""
        messages = await self._network.subscribe(self.topic)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._receive_loop, messages)
            nursery.start_soon(self._prune_loop)
            nursery.start_soon(self._sweep_loop)
            await self.announce()
            nursery.start_soon(self._announce_loop)
            task_status.started()

    async def _announce_loop(self) -> None:
        last = trio.current_time()  # the last announcement (gossip), for the spacing below
        while True:
            with trio.move_on_after(self.timing.change_check_interval):
                await self._announce_now.wait()
            forced = self._announce_now.is_set()
            self._announce_now = trio.Event()
            if self._own is not None and self._own.withdrawn:
                continue  # we said goodbye: a renewal now would put us back in every view
            due = self._dht_due()
            # With a receive budget, changes (price moves included) wait half the interval
            # between announcements: at most twice the budget, however busy the market.
            spaced = (
                self.timing.max_receive_rate is None
                or trio.current_time() - last >= self.renewal_interval() / 2
            )
            if not (due or spaced):
                continue
            change = self._change(self._offer())
            if due or change == "record":
                await self.announce()
                last = trio.current_time()
            elif forced or change == "gossip":
                # Gossip only (module docstring); a request to announce (the price loop asks
                # every price interval) reaches the DHT only if what it holds must change.
                await self.announce(to_dht=False)
                last = trio.current_time()

    async def _receive_loop(self, messages: trio.MemoryReceiveChannel[Message]) -> None:
        async for message in messages:
            if message.sender == self._identity.peer_id:
                continue
            self.offer_raw(message.data, expected_peer=message.sender)

    async def _prune_loop(self) -> None:
        while True:
            await trio.sleep(self.timing.prune_interval)
            gone = self.view.prune(self._clock.now())
            if gone:
                log.info("capacity records expired: %s", ", ".join(p[-8:] for p in gone))
                self._signal_change()

    async def _sweep_loop(self) -> None:
        """Pull records from the DHT for connected peers we lack or hold near expiry."""
        limiter = trio.CapacityLimiter(8)

        async def fetch(peer_id: str) -> None:
            async with limiter:
                raw = await self._network.dht_get(
                    capacity_key(peer_id), timeout=self.timing.sweep_interval
                )
            if raw is not None:
                self.offer_raw(raw, expected_peer=peer_id)

        while True:
            await trio.sleep(self.timing.sweep_interval)
            now = self._clock.now()
            wanted = []
            for peer_id in self._network.connected_peers():
                held = self.view.get(peer_id, now)
                if self.view.held_seq(peer_id) >= 0 and held is None:
                    continue  # withdrawn: do not pull its old record back
                if held is None or held.expires - now < self.timing.ttl / 3:
                    wanted.append(peer_id)
            async with trio.open_nursery() as nursery:
                for peer_id in wanted[:64]:
                    nursery.start_soon(fetch, peer_id)
