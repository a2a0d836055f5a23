"""Keep the overlay connected: a target number of connections, re-dialled when below it.

Gossip travels over connections, and a peer learns addresses mostly from gossip (capacity
records). A peer that dials only what its view holds therefore never finds a part of the
network that its connections do not reach: restarting devnet peers one after another split a
devnet into two halves that never healed, because the bootstrap peer came back alone (its own
bootstrap list is empty) after its record had expired everywhere, and the peers that still had
a connection never dialled the bootstrap list again.

:class:`MeshKeeper` closes that gap. Whenever this peer has fewer than ``target`` connections
it dials, concurrently and each under a deadline:

1. the bootstrap list (always a candidate when below target, not only when isolated: the
   bootstrap peers are the one rendezvous every part of a split network knows);
2. peers it has dialled successfully before (remembered, bounded, most recent kept);
3. peers it has seen in capacity records (remembered beyond the records' lifetime, bounded),
   so that a peer whose record expired while it was down can still be found.

Every address that fails is backed off exponentially (bounded, with jitter), so that dead
peers are not hammered and unreachable addresses advertised by Sybils cost at most a few dials
each per back-off period rather than the whole loop; addresses that worked before are tried
before addresses only claimed in a record.

It uses only the :class:`~mtor_p2p.network.Network` port (``connect``, ``connected_peers``,
``peer_id``), trio's clock and the random generator it is given, so it runs the same on
py-libp2p and on memnet (virtual time).

Known limit: a part of the network in which every peer already has ``target`` connections does
not look for the rest; with the bootstrap list as a candidate of every peer below target, that
needs parts of more than ``target`` peers that all lost the bootstrap peers at once.
"""

from __future__ import annotations

import logging
import random
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import trio

from mtor_p2p.network import Network, NetworkError

log = logging.getLogger(__name__)

#: One candidate: a peer ID and the addresses it claims (multiaddrs ending in ``/p2p/<id>``).
Candidate = tuple[str, Sequence[str]]

#: Longest address kept (the limit of capacity records).
MAX_ADDR_CHARS = 256


@dataclass(frozen=True)
class MeshSettings:
    """How the keeper behaves (seconds, counts). The node derives them from its timing."""

    #: Connections to keep open; below it, the keeper dials.
    target: int = 8
    #: Seconds between two rounds while connected to someone.
    interval: float = 2.0
    #: Seconds between two rounds while connected to nobody (rejoining is urgent).
    isolated_interval: float = 5.0
    #: Deadline of one dial.
    dial_timeout: float = 3.0
    #: Addresses of one peer tried per round (one failing peer cannot stretch a round).
    addrs_per_round: int = 2
    #: Dials in flight at once in one round.
    max_dials: int = 8
    #: Back-off after the first failure of an address; doubles with each further failure.
    backoff_base: float = 5.0
    #: Longest back-off of an address seen in a record.
    backoff_max: float = 300.0
    #: Longest back-off of a bootstrap address: the rendezvous of last resort is retried
    #: sooner (py-libp2p caches a failed dial for 60 s anyway).
    bootstrap_backoff_max: float = 60.0
    #: Peers remembered after a successful dial.
    max_known: int = 256
    #: Peers remembered from capacity records.
    max_seen: int = 1024
    #: Addresses kept per remembered peer.
    max_addrs_per_peer: int = 4
    #: Addresses with a back-off remembered (the oldest is forgotten beyond it).
    max_backoffs: int = 4096

    def __post_init__(self) -> None:
        if self.target < 1 or self.max_dials < 1 or self.addrs_per_round < 1:
            raise ValueError("target, max_dials and addrs_per_round must be at least 1")
        if min(self.interval, self.isolated_interval, self.dial_timeout, self.backoff_base) <= 0:
            raise ValueError("intervals, the dial timeout and the back-off must be positive")


@dataclass
class MeshStats:
    """Counters of the keeper's work (for ``status`` and tests)."""

    rounds: int = 0
    dials: int = 0
    dial_failures: int = 0
    #: Dials skipped because the address was backing off.
    backed_off: int = 0


@dataclass
class _Backoff:
    failures: int = 0
    until: float = 0.0


@dataclass
class _Pick:
    peer_id: str
    addrs: list[str] = field(default_factory=list)
    bootstrap: bool = False


def peer_id_of(addr: str) -> str | None:
    """The peer ID at the end of a ``.../p2p/<id>`` multiaddr, or None."""
    head, sep, tail = addr.rpartition("/p2p/")
    if not sep or not head or not tail or "/" in tail:
        return None
    return tail


class MeshKeeper:
    """Keeps this peer's connection count at ``settings.target`` (see the module docstring).

    ``candidates`` returns the peers the node currently knows of (from its capacity view);
    ``bootstrap`` is the bootstrap list (multiaddrs with ``/p2p/<id>``; our own is ignored);
    ``rng`` supplies every random choice (the node's runtime generator, seeded in a
    simulation).
    """

    def __init__(
        self,
        network: Network,
        *,
        candidates: Callable[[], Iterable[Candidate]],
        bootstrap: Sequence[str],
        rng: random.Random,
        settings: MeshSettings | None = None,
    ) -> None:
        self.network = network
        self.settings = settings or MeshSettings()
        self.stats = MeshStats()
        self._candidates = candidates
        self._rng = rng
        self._me = network.peer_id
        #: Bootstrap peer ID -> its addresses, in the order given.
        self._bootstrap: dict[str, list[str]] = {}
        for addr in bootstrap:
            peer_id = peer_id_of(addr)
            if peer_id is None or peer_id == self._me:
                continue
            self._bootstrap.setdefault(peer_id, []).append(addr)
        #: Peers we dialled successfully, least recently successful first.
        self._known: OrderedDict[str, list[str]] = OrderedDict()
        #: Peers seen in capacity records, oldest first.
        self._seen: OrderedDict[str, list[str]] = OrderedDict()
        self._backoff: OrderedDict[str, _Backoff] = OrderedDict()

    # -- the loop --------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run rounds until cancelled; the first round starts at once (joining the network
        should not wait an interval)."""
        task_status.started()
        while True:
            await self.round()
            isolated = not self.network.connected_peers()
            s = self.settings
            await trio.sleep(min(s.interval, s.isolated_interval) if isolated else s.interval)

    async def round(self) -> int:
        """One round: when below target, dial up to the missing number of candidates at once.
        Returns the number of new connections. Takes at most ``addrs_per_round`` dial
        timeouts."""
        s = self.settings
        self.stats.rounds += 1
        connected = set(self.network.connected_peers())
        self._learn(self._candidates())
        missing = s.target - len(connected)
        if missing <= 0:
            await trio.lowlevel.checkpoint()
            return 0
        picks = self._pick(connected, min(missing, s.max_dials))
        if not picks:
            await trio.lowlevel.checkpoint()
            return 0
        made: list[str] = []
        # Each dial has its own deadline; this one only bounds the round as a whole.
        with trio.move_on_after(s.dial_timeout * s.addrs_per_round + 1.0):
            async with trio.open_nursery() as nursery:
                for pick in picks:
                    nursery.start_soon(self._dial, pick, made)
        return len(made)

    # -- memory ----------------------------------------------------------------------------

    def _clean(self, peer_id: str, addrs: Iterable[str]) -> list[str]:
        suffix = f"/p2p/{peer_id}"
        kept: list[str] = []
        for addr in addrs:
            if not isinstance(addr, str) or len(addr) > MAX_ADDR_CHARS:
                continue
            if addr.endswith(suffix) and addr not in kept:
                kept.append(addr)
                if len(kept) >= self.settings.max_addrs_per_peer:
                    break
        return kept

    def _learn(self, candidates: Iterable[Candidate]) -> None:
        """Remember the peers of capacity records (addresses kept past the records' expiry)."""
        limit = self.settings.max_seen
        for peer_id, addrs in candidates:
            if peer_id == self._me:
                continue
            kept = self._clean(peer_id, addrs)
            if not kept:
                continue
            if peer_id in self._seen:
                self._seen[peer_id] = kept  # a record's addresses may change; keep its place
                continue
            self._seen[peer_id] = kept
            while len(self._seen) > limit:
                self._seen.popitem(last=False)

    def _remember(self, peer_id: str, addr: str) -> None:
        """A dial to ``addr`` worked: that address first, the peer most recent."""
        addrs = [addr] + [a for a in self._known.pop(peer_id, []) if a != addr]
        self._known[peer_id] = addrs[: self.settings.max_addrs_per_peer]
        while len(self._known) > self.settings.max_known:
            self._known.popitem(last=False)
        self._backoff.pop(addr, None)

    def _failed(self, addr: str, *, bootstrap: bool) -> None:
        s = self.settings
        entry = self._backoff.pop(addr, None) or _Backoff()
        entry.failures += 1
        cap = s.bootstrap_backoff_max if bootstrap else s.backoff_max
        delay = min(cap, s.backoff_base * 2 ** min(entry.failures - 1, 30))
        # Jitter (between half and all of the delay), so that peers that lost the same peer
        # at the same moment do not all re-dial it in the same instant.
        entry.until = trio.current_time() + delay * (0.5 + 0.5 * self._rng.random())
        self._backoff[addr] = entry  # most recent last: the oldest is forgotten first
        while len(self._backoff) > s.max_backoffs:
            self._backoff.popitem(last=False)

    def backing_off(self, addr: str) -> bool:
        """Whether ``addr`` failed recently and must not be dialled yet."""
        entry = self._backoff.get(addr)
        return entry is not None and trio.current_time() < entry.until

    def known_peers(self) -> list[str]:
        """Peer IDs remembered from successful dials, most recent last."""
        return list(self._known)

    # -- choosing and dialling -------------------------------------------------------------

    def _ready(self, addrs: Iterable[str]) -> list[str]:
        ready = []
        for addr in addrs:
            if self.backing_off(addr):
                self.stats.backed_off += 1
            else:
                ready.append(addr)
        return ready[: self.settings.addrs_per_round]

    def _pick(self, connected: set[str], count: int) -> list[_Pick]:
        """Up to ``count`` peers to dial: bootstrap peers first (at least half the slots when
        there are any), then peers that answered before, then peers only seen in records;
        random within each group."""
        skip = connected | {self._me}
        groups: list[list[_Pick]] = []
        taken = set(skip)
        sources = ((self._bootstrap, True), (self._known, False), (self._seen, False))
        for source, bootstrap in sources:
            group = []
            for peer_id, addrs in source.items():
                if peer_id in taken:
                    continue
                taken.add(peer_id)
                ready = self._ready(addrs)
                if ready:
                    group.append(_Pick(peer_id, ready, bootstrap))
            self._rng.shuffle(group)
            groups.append(group)
        boot, known, seen = groups
        first = max(1, count // 2)
        ordered = boot[:first] + known + seen + boot[first:]
        return ordered[:count]

    async def _dial(self, pick: _Pick, made: list[str]) -> None:
        for addr in pick.addrs:
            self.stats.dials += 1
            try:
                await self.network.connect(addr, timeout=self.settings.dial_timeout)
            except NetworkError as exc:
                self.stats.dial_failures += 1
                self._failed(addr, bootstrap=pick.bootstrap)
                log.debug("mesh dial to %s failed: %s", addr, exc)
                continue
            self._remember(pick.peer_id, addr)
            made.append(pick.peer_id)
            if pick.bootstrap:
                log.info("connected to bootstrap peer %s", addr)
            return
        if pick.bootstrap:
            log.warning("bootstrap peer %s unreachable", pick.peer_id)
