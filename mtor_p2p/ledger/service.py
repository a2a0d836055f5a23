"""The ledger on the network: gossip of new entries, pull sync of missed ones, checkpoints.

* **Gossip**: new receipts, transfers, stakes, votes and checkpoints are published on
  ``mtor/ledger/<rules>/<genesis prefix>`` (one topic per network and version of the ledger's
  rules, :data:`~mtor_p2p.ledger.names.LEDGER_RULES`) and checked before they are
  forwarded. Fault proofs and large checkpoints travel by sync only.
* **Pull sync** (``/mtor/ledger/sync/<rules>``): a peer asks another for the entries it stored after
  a cursor, in the remote's own arrival order, a few MiB per request, and remembers the cursor
  (with the remote's ledger instance) on disk. Every connected peer is pulled once when it is
  first seen, and a random one every ``sync_interval``; so anything one peer holds reaches
  every peer connected to it, whatever gossip dropped, and sets converge. A peer whose answer
  is malformed, refused, or holds only invalid entries is backed off: its next pull waits
  ``sync_interval * 2**faults`` (at most ``SYNC_BACKOFF_MAX``); an answer with a valid entry
  (or none invalid) clears it. Network failures neither add nor clear a fault.
* **Checkpoints**: once an epoch is ``checkpoint_delay`` old, each staked peer signs the Merkle
  root of the entries it holds for that epoch (a vote, BLS); a peer holding the same set that
  sees votes on it from signers with the quorum of weight aggregates them into a checkpoint.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import blake3
import trio

from mtor_p2p.clock import NetClock
from mtor_p2p.compute.group_commit import GroupCommit
from mtor_p2p.identity import Identity
from mtor_p2p.ledger.entries import (
    KINDS,
    MAX_ENTRY_BYTES,
    Entry,
    decode_entry,
    epoch_root_of,
    fault_entry,
    make_checkpoint,
    make_stake,
    make_transfer,
    make_vote,
    receipt_entry,
)
from mtor_p2p.ledger.genesis import GENESIS_WHERE
from mtor_p2p.ledger.names import LEDGER_RULES
from mtor_p2p.ledger.store import MAX_VOTES_PER_EPOCH, IngestResult, Ledger
from mtor_p2p.network import Message, Network, NetworkError, RemoteError
from mtor_p2p.records.arrays import pack, unpack
from mtor_p2p.records.receipts import Receipt
from mtor_p2p.runtime import Runtime
from mtor_p2p.wire import RecordError, canonical_json, parse_canonical

log = logging.getLogger(__name__)

SYNC_PROTOCOL = f"/mtor/ledger/sync/{LEDGER_RULES}"
#: Balances are kept as a snapshot of entries older than this plus a fold of the rest.
HORIZON_SECONDS = 600.0
MAX_GOSSIP_ENTRY = 60 * 1024
#: Receipt entries gossiped as one message at most (bytes, entries; pubsub's limit is 1 MiB).
#: Each gossip message costs every peer of the mesh several milliseconds in py-libp2p's
#: pubsub (measured: a 200-shard job's receipts, one message each, took each of its two
#: workers 1.1-1.3 CPU-s, as much as the work), whatever it carries.
MAX_BUNDLE_BYTES = 256 * 1024
MAX_BUNDLE_ENTRIES = 128
BUNDLE_VERSION = b"\x01"
GOSSIP_RATE = 100.0  # entries per second per sending peer
GOSSIP_BURST = 500.0
SYNC_BATCH_BYTES = 4 << 20
SYNC_BATCH_COUNT = 2000
#: One response holds at least one entry, however large (a fault proof, a checkpoint).
MAX_SYNC_RESPONSE = MAX_ENTRY_BYTES + SYNC_BATCH_BYTES + (64 << 10)
#: Longest wait (seconds) before a faulty sync peer is pulled again.
SYNC_BACKOFF_MAX = 900.0
#: Peers with a back-off remembered at once; beyond it the longest-expired are forgotten.
SYNC_BACKOFF_PEERS = 4096


@dataclass
class _Pull:
    """What one :meth:`LedgerService.sync_from` brought: new entries, entries that passed the
    checks (new, already held or parked), and entries refused as invalid."""

    new: int = 0
    valid: int = 0
    invalid: int = 0


#: The start of a sync refusal for another genesis (matched by the puller; a peer's word, so
#: it only names and counts that peer, which any peer could truly be).
OTHER_NETWORK = "different network"
#: Peers of other networks remembered for the count.
OTHER_NETWORK_PEERS = 1024


def ledger_topic(genesis_hash: str) -> str:
    """The gossip topic of one network's ledger, under this version's rules."""
    return f"mtor/ledger/{LEDGER_RULES}/{genesis_hash[:16]}"


def bundle_topic(genesis_hash: str) -> str:
    """The topic on which receipt entries travel in bundles (see :func:`encode_bundle`)."""
    return f"mtor/ledger-bundle/{LEDGER_RULES}/{genesis_hash[:16]}"


def encode_bundle(wires: list[bytes]) -> bytes:
    """Entries as one gossip message: a version byte, then each entry as a 4-byte
    big-endian length and its wire bytes."""
    parts = [BUNDLE_VERSION]
    for wire in wires:
        parts += [len(wire).to_bytes(4, "big"), wire]
    return b"".join(parts)


def decode_bundle(data: bytes) -> list[bytes]:
    """The entries of a bundle (their wire bytes, not yet checked); RecordError unless the
    bundle is well formed, within MAX_BUNDLE_BYTES and MAX_BUNDLE_ENTRIES, every entry
    within MAX_GOSSIP_ENTRY."""
    if len(data) > MAX_BUNDLE_BYTES:
        raise RecordError(f"bundle of {len(data)} bytes, at most {MAX_BUNDLE_BYTES}")
    if data[:1] != BUNDLE_VERSION:
        raise RecordError("unknown bundle version")
    view = memoryview(data)
    wires: list[bytes] = []
    at = 1
    while at < len(data):
        if len(wires) == MAX_BUNDLE_ENTRIES:
            raise RecordError(f"bundle of more than {MAX_BUNDLE_ENTRIES} entries")
        if at + 4 > len(data):
            raise RecordError("bundle cut inside a length")
        size = int.from_bytes(view[at : at + 4], "big")
        at += 4
        if not 0 < size <= MAX_GOSSIP_ENTRY or at + size > len(data):
            raise RecordError("bundle entry of a bad length")
        wires.append(bytes(view[at : at + size]))
        at += size
    if not wires:
        raise RecordError("empty bundle")
    return wires


class LedgerService:
    """Runs one node's ledger on ``network``."""

    def __init__(
        self,
        network: Network,
        identity: Identity,
        clock: NetClock,
        ledger: Ledger,
        *,
        sync_interval: float = 10.0,
        checkpoint_tick: float = 2.0,
        runtime: Runtime | None = None,
    ) -> None:
        self._runtime = runtime or Runtime.production()
        self._blocking = self._runtime.run_blocking
        self._network = network
        self._identity = identity
        self._clock = clock
        self.ledger = ledger
        self.genesis = ledger.genesis
        self.topic = ledger_topic(ledger.genesis_hash)
        self.sync_interval = sync_interval
        self.checkpoint_tick = checkpoint_tick
        self._synced: set[str] = set()
        #: Connected peers that refused our sync for another genesis (insertion-ordered,
        #: bounded; a peer leaves it when it disconnects or a later pull from it succeeds).
        self._other_network: dict[str, None] = {}
        self._warned_other_network = False  # once per service: a peer cannot make it repeat
        #: peer -> (faults in a row, trio time before which it is not pulled).
        self._backoff: dict[str, tuple[int, float]] = {}
        self._voted: dict[int, list[str]] = {}  # epoch -> roots we signed
        self._buckets: dict[str, tuple[float, float]] = {}  # sender -> (tokens, updated)
        self.stats: dict[str, int] = {
            "gossip_in": 0,
            "gossip_rejected": 0,
            "synced_entries": 0,
            "sync_failures": 0,
            # Sync answers that were malformed, refused, or held only invalid entries.
            "sync_faults": 0,
            # Peers backed off now (not pulled until their back-off has passed).
            "sync_backoff_peers": 0,
            # Connected peers that refused our sync as another network's (their genesis
            # differs, by their word), up to OTHER_NETWORK_PEERS.
            "other_network_peers": 0,
            "votes": 0,
            "checkpoints_made": 0,
        }
        #: Receipt entries of shards settling together share one ingest (one commit).
        self._receipts = GroupCommit(self._ingest_receipts, self._blocking)
        network.handle(SYNC_PROTOCOL, self._serve_sync, max_request_bytes=4096, timeout=30)
        network.set_topic_validator(self.topic, self._accept_gossip)
        self.bundle_topic = bundle_topic(ledger.genesis_hash)
        network.set_topic_validator(self.bundle_topic, self._accept_bundle)
        #: Receipt entries waiting to be gossiped in the next bundle (see _publish_loop);
        #: None while that loop does not run (then each is published alone).
        self._outgoing: list[bytes] | None = None
        self._outgoing_ready = trio.Event()

    # -- entries we make -------------------------------------------------------------------

    async def _store(self, wires: list[bytes]) -> IngestResult:
        return await self._blocking(self.ledger.ingest, wires)

    async def _store_and_announce(self, wire: bytes) -> IngestResult:
        result = await self._store([wire])
        if result.invalid:
            raise RecordError(result.invalid[0])
        if result.new and len(wire) <= MAX_GOSSIP_ENTRY:
            try:
                await self._network.publish(self.topic, wire)
            except NetworkError as exc:  # sync will carry it
                log.info("ledger gossip failed: %s", exc)
        return result

    async def record_receipt(self, receipt: Receipt, *, announce: bool = True) -> None:
        """Enter a countersigned receipt (and gossip it when ``announce``).

        Group-committed: the receipts of shards settling at the same time share one
        :meth:`Ledger.ingest` (one commit); this returns once the receipt is durable.
        """
        try:
            wire = receipt_entry(receipt)
        except RecordError as exc:
            log.info("receipt not entered into the ledger: %s", exc)
            return
        if not await self._receipts.submit(wire):
            return
        if not announce or len(wire) > MAX_GOSSIP_ENTRY:
            return
        if self._outgoing is not None:
            # Receipts settling together go out as one bundle (the scheduler settles them
            # in batches): one gossip message instead of one each.
            self._outgoing.append(wire)
            self._outgoing_ready.set()
            return
        try:
            await self._network.publish(self.topic, wire)
        except NetworkError as exc:  # sync will carry it
            log.info("ledger gossip failed: %s", exc)

    async def _publish_loop(self) -> None:
        """Gossip queued receipt entries, everything queued since the last bundle at once
        (split at MAX_BUNDLE_ENTRIES or MAX_BUNDLE_BYTES)."""
        self._outgoing = []
        try:
            while True:
                await self._outgoing_ready.wait()
                self._outgoing_ready = trio.Event()
                queued, self._outgoing = self._outgoing, []
                while queued:
                    size, count = 1, 0
                    while count < min(len(queued), MAX_BUNDLE_ENTRIES):
                        if size + 4 + len(queued[count]) > MAX_BUNDLE_BYTES:
                            break
                        size += 4 + len(queued[count])
                        count += 1
                    bundle, queued = queued[:count], queued[count:]
                    try:
                        await self._network.publish(self.bundle_topic, encode_bundle(bundle))
                    except NetworkError as exc:  # sync will carry them
                        log.info("ledger gossip failed: %s", exc)
        finally:
            self._outgoing = None

    def _ingest_receipts(self, wires: list[bytes]) -> list[bool]:
        """One ingest (one commit) for a batch of receipt entries: for each, True if it was
        new here. Refusals are logged: the receipt stays in the receipt store, and the ledger
        only takes receipts that move credits (a shard priced below one nano-credit does not)."""
        result = self.ledger.ingest(wires)
        for reason in result.invalid:
            log.info("receipt not entered into the ledger: %s", reason)
        new = {entry.entry_id for entry in result.new_entries}
        return [blake3.blake3(wire).hexdigest() in new for wire in wires]

    async def record_fault(self, proof: bytes) -> bool:
        """Enter a fault proof (peers fetch it by sync); False if the ledger refused it."""
        result = await self._store([fault_entry(proof)])
        if result.invalid:  # e.g. over the ledger's size limit for proofs
            log.warning("fault proof not entered into the ledger: %s", result.invalid[0])
        return not result.invalid

    async def stake(self, amount: int) -> dict[str, Any]:
        """Stake ``amount`` nano-credits of our balance (raises RecordError if we cannot)."""
        params = self.genesis.params
        if amount < params.min_stake:
            raise RecordError(f"the smallest stake is {params.min_stake} nano-credits")

        def make(at: float, nonce: str) -> bytes:
            return make_stake(self._identity, amount, at, self.ledger.genesis_hash, nonce)

        return await self._debit("stake", amount, make)

    async def transfer(self, to: str, amount: int) -> dict[str, Any]:
        """Send ``amount`` nano-credits of our balance to peer ``to`` (RecordError if we
        cannot)."""

        def make(at: float, nonce: str) -> bytes:
            return make_transfer(self._identity, to, amount, at, self.ledger.genesis_hash, nonce)

        return {"to": to, **await self._debit("send", amount, make)}

    async def _debit(
        self, verb: str, amount: int, make: Callable[[float, str], bytes]
    ) -> dict[str, Any]:
        """Sign, store and announce an entry that spends ``amount`` of our balance."""
        me = self._identity.peer_id
        balance = (await self._blocking(self.ledger.account, me))["balance"]
        if amount > balance:
            raise RecordError(f"balance is {balance} nano-credits, cannot {verb} {amount}")
        wire = await self._blocking(make, round(self._clock.now(), 3), self._runtime.token_hex(8))
        await self._store_and_announce(wire)
        account = await self._blocking(self.ledger.account, me)
        entry_id = decode_entry(wire, self.ledger.genesis_hash, check_bls=False).entry_id
        return {"entry": entry_id, "amount": amount, **account}

    def available_credit(self, peer: str) -> int:
        """What ``peer`` may still spend: its balance plus its credit limit (call it from a
        worker thread: a ledger read may wait for a write)."""
        return self.ledger.state().spendable(peer)

    def available_credit_now(self, peer: str) -> int | None:
        """:meth:`available_credit` without waiting (safe on the event loop), or None when
        that would mean waiting for a write or refolding the ledger."""
        return self.ledger.spendable_if_ready(peer)

    # -- gossip ----------------------------------------------------------------------------

    def _within_budget(self, sender: str, entries: int = 1) -> bool:
        """A token bucket per gossiping peer: ``GOSSIP_RATE`` entries per second, bursts of
        ``GOSSIP_BURST``. A busy requester publishes a few dozen receipts a second; a peer
        flooding the topic is cut to that, and what it sent beyond reaches us by sync, if at
        all, at the pace we pull."""
        now = trio.current_time()
        tokens, since = self._buckets.get(sender, (GOSSIP_BURST, now))
        tokens = min(GOSSIP_BURST, tokens + (now - since) * GOSSIP_RATE)
        if tokens < entries:
            self._buckets[sender] = (tokens, now)
            return False
        self._buckets[sender] = (tokens - entries, now)
        if len(self._buckets) > 10_000:  # forget the quietest senders first
            for peer, _ in sorted(self._buckets.items(), key=lambda kv: -kv[1][0])[:1000]:
                del self._buckets[peer]
        return True

    def _accept_gossip(self, sender: str, data: bytes) -> bool:
        kind = KINDS.get(data[:1])
        if kind is None or kind == "fault" or len(data) > MAX_GOSSIP_ENTRY:
            return False
        if not self._within_budget(sender):
            self.stats["gossip_rejected"] += 1
            return False
        return self._entry_acceptable(sender, data)

    def _accept_bundle(self, sender: str, data: bytes) -> bool:
        """A bundle passes if it is well formed, holds receipt entries only, each passing
        the checks a single entry gets, and its sender's budget covers every one of them
        (else it is refused whole: sync brings what it held, at the pace we pull)."""
        try:
            wires = decode_bundle(data)
        except RecordError as exc:
            log.debug("rejected ledger bundle from %s: %s", sender[-8:], exc)
            self.stats["gossip_rejected"] += 1
            return False
        if any(KINDS.get(w[:1]) != "receipt" for w in wires):
            self.stats["gossip_rejected"] += 1
            return False
        if not self._within_budget(sender, len(wires)):
            self.stats["gossip_rejected"] += 1
            return False
        return all(self._entry_acceptable(sender, w) for w in wires)

    def _entry_acceptable(self, sender: str, data: bytes) -> bool:
        try:
            # Cheap checks only, on the event loop: Ed25519, formats, sizes. BLS signatures
            # (stake proofs of possession, votes, aggregates) are checked in a worker thread
            # when the entry is stored, so a flood of them cannot stall the node.
            entry = decode_entry(data, self.ledger.genesis_hash, check_bls=False)
            reason = None
            if entry.kind in ("vote", "checkpoint") and any(
                self.ledger.bls_key(s) is None for s in entry.signers
            ):
                reason = "signed by a peer that has not staked"
        except RecordError as exc:
            log.debug("rejected ledger gossip from %s: %s", sender[-8:], exc)
            self.stats["gossip_rejected"] += 1
            return False
        if reason is not None:
            self.stats["gossip_rejected"] += 1
            return False
        return True

    async def _receive_loop(
        self, messages: trio.MemoryReceiveChannel[Message], *, bundles: bool = False
    ) -> None:
        """Store what arrives on a ledger topic (``bundles``: the bundle topic, whose
        messages passed :meth:`_accept_bundle`)."""

        def entries(message: Message) -> list[bytes]:
            if not bundles:
                return [message.data]
            try:
                return decode_bundle(message.data)
            except RecordError:  # the validator let it through; never stop the loop
                return []

        batch: list[bytes] = []
        async for message in messages:
            if message.sender == self._identity.peer_id:
                continue
            batch += entries(message)
            # Take whatever else is queued too: one transaction for a burst of receipts.
            while len(batch) < 256:
                try:
                    batch += entries(messages.receive_nowait())
                except trio.WouldBlock:
                    break
            if not batch:
                continue
            self.stats["gossip_in"] += len(batch)
            try:
                await self._store(batch)
            except Exception as exc:  # remote data must never stop the loop
                log.warning("ledger gossip batch failed: %s: %s", type(exc).__name__, exc)
            batch = []

    # -- pull sync -------------------------------------------------------------------------

    async def _serve_sync(self, sender: str, request: bytes) -> bytes:
        try:
            query = parse_canonical(request, max_bytes=4096)
        except RecordError as exc:
            raise RemoteError(f"bad sync request: {exc}") from exc
        if not isinstance(query, dict) or set(query) != {"after", "genesis", "instance", "max"}:
            raise RemoteError("sync request must have exactly after, genesis, instance, max")
        if query["genesis"] != self.ledger.genesis_hash:
            raise RemoteError(f"{OTHER_NETWORK}: genesis hashes differ")
        after, limit, instance = query["after"], query["max"], query["instance"]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (after, limit)):
            raise RemoteError("after and max must be integers")
        if instance != self.ledger.instance:
            after = 0  # the requester's cursor was for another copy of our ledger
        limit = max(1024, min(limit, SYNC_BATCH_BYTES))
        rows, more = await self._blocking(
            lambda: self.ledger.entries_after(
                max(0, after), max_bytes=limit, max_count=SYNC_BATCH_COUNT
            )
        )
        header = {
            "instance": self.ledger.instance,
            "next": rows[-1][0] if rows else max(0, after),
            "more": more,
            "sizes": [len(wire) for _, wire in rows],
        }
        return pack(header, b"".join(wire for _, wire in rows))

    async def sync_from(self, peer: str, *, timeout: float = 30.0) -> int:
        """Pull every entry ``peer`` holds that we lack; the number of new entries."""
        return (await self._pull(peer, timeout=timeout)).new

    async def _pull(self, peer: str, *, timeout: float = 30.0) -> _Pull:
        """:meth:`sync_from`, with the counts the back-off needs."""
        pulled = _Pull()
        changes = 0
        while True:
            # The cursor survives restarts, so a restarted node resumes where it stopped.
            instance, after = await self._blocking(self.ledger.cursor, peer)
            request = canonical_json(
                {
                    "after": after,
                    "genesis": self.ledger.genesis_hash,
                    "instance": instance,
                    "max": SYNC_BATCH_BYTES,
                }
            )
            response = await self._network.request(
                peer, SYNC_PROTOCOL, request, timeout=timeout, max_response_bytes=MAX_SYNC_RESPONSE
            )
            header, body = unpack(response)
            sizes, more, next_seq = header.get("sizes"), header.get("more"), header.get("next")
            remote_instance = header.get("instance")
            if (
                not isinstance(sizes, list)
                or not all(isinstance(s, int) and s > 0 for s in sizes)
                or sum(sizes) != len(body)
                or not isinstance(more, bool)
                or not isinstance(next_seq, int)
                or not 0 <= next_seq < 2**62
                or not isinstance(remote_instance, str)
                or not 0 < len(remote_instance) <= 64
            ):
                raise RecordError("malformed sync response")
            if remote_instance == instance and (next_seq < after or (more and next_seq == after)):
                raise RecordError("sync response does not advance the cursor")
            if remote_instance != instance:
                # First contact, or the peer's ledger was replaced: it answered from its start.
                changes += 1
                if changes > 1:
                    raise RecordError("the peer's ledger instance keeps changing")
            wires, offset = [], 0
            for size in sizes:
                wires.append(body[offset : offset + size])
                offset += size
            try:
                result = await self._store(wires)
            except Exception as exc:  # whatever remote data causes is its error
                raise RecordError(f"entries from {peer[-8:]} broke ingest: {exc!r}") from exc
            pulled.new += result.new
            pulled.valid += result.new + result.duplicate + result.parked
            pulled.invalid += len(result.invalid)
            self.stats["synced_entries"] += result.new
            if result.invalid:
                log.info("sync from %s: %d invalid entries", peer[-8:], len(result.invalid))
            await self._blocking(self.ledger.set_cursor, peer, remote_instance, next_seq)
            if not more:
                return pulled

    def _note_other_network(self, peer: str) -> None:
        """``peer`` keeps another network's ledger: said once as a warning (a node started
        without the network's genesis beside peers that have it joins its own network, and
        nothing else would tell; a new user's walkthrough), then counted."""
        self._other_network[peer] = None
        while len(self._other_network) > OTHER_NETWORK_PEERS:
            del self._other_network[next(iter(self._other_network))]
        self.stats["other_network_peers"] = len(self._other_network)
        if not self._warned_other_network:
            self._warned_other_network = True
            log.warning(
                "peer %s follows another network: its ledger's genesis is not this node's "
                "(%s, genesis %s), so neither sees the other's credits; if this node is to join "
                "that network, start it with that network's genesis in a new data directory "
                "(--genesis FILE --data-dir DIR: a data directory keeps the network it began "
                f"with; {GENESIS_WHERE})",
                peer[-12:],
                self.genesis.network,
                self.ledger.genesis_hash[:16],
            )
        else:
            log.info("peer %s follows another network", peer[-12:])

    def _backed_off(self, peer: str, now: float) -> bool:
        entry = self._backoff.get(peer)
        return entry is not None and now < entry[1]

    def _sync_fault(self, peer: str) -> None:
        """Count a faulty answer of ``peer`` and push its next pull back (doubling)."""
        self.stats["sync_faults"] += 1
        faults = self._backoff.get(peer, (0, 0.0))[0] + 1
        delay = min(SYNC_BACKOFF_MAX, self.sync_interval * 2.0**faults)
        self._backoff[peer] = (faults, trio.current_time() + delay)
        if len(self._backoff) > SYNC_BACKOFF_PEERS:
            # Forget the peers whose back-off ends first: at worst one more pull each.
            for forgotten, _ in sorted(self._backoff.items(), key=lambda kv: kv[1][1])[
                : len(self._backoff) - SYNC_BACKOFF_PEERS
            ]:
                del self._backoff[forgotten]
        self._count_backoff()

    def other_network_peers(self) -> set[str]:
        """Connected peers whose ledgers refused our sync as another network's (by their
        word: see :meth:`_note_other_network`)."""
        return set(self._other_network)

    def _sync_ok(self, peer: str) -> None:
        if self._backoff.pop(peer, None) is not None:
            self._count_backoff()
        if self._other_network.pop(peer, None) is not None:
            self.stats["other_network_peers"] = len(self._other_network)

    def _count_backoff(self) -> None:
        now = trio.current_time()
        self.stats["sync_backoff_peers"] = sum(1 for _, t in self._backoff.values() if now < t)

    async def _sync_loop(self) -> None:
        last_random = trio.current_time()
        while True:
            await trio.sleep(1.0)
            now = trio.current_time()
            if self._backoff:
                self._count_backoff()
            connected = self._network.connected_peers()
            if self._other_network:  # only peers still connected count
                here = set(connected)
                for gone in [p for p in self._other_network if p not in here]:
                    del self._other_network[gone]
                self.stats["other_network_peers"] = len(self._other_network)
            peers = [p for p in connected if not self._backed_off(p, now)]
            targets = [p for p in peers if p not in self._synced]
            if peers and now - last_random >= self.sync_interval:
                targets.append(self._runtime.random.choice(peers))
                last_random = now
            for peer in dict.fromkeys(targets):
                try:
                    with trio.fail_after(120):
                        pulled = await self._pull(peer)
                    self._synced.add(peer)
                except (RemoteError, RecordError) as exc:
                    # The peer answered, wrongly (malformed, looping) or refused: its fault.
                    self.stats["sync_failures"] += 1
                    self._synced.add(peer)
                    self._sync_fault(peer)
                    if isinstance(exc, RemoteError) and str(exc).startswith(OTHER_NETWORK):
                        self._note_other_network(peer)
                    else:
                        log.info("ledger sync from %s failed: %s", peer[-8:], exc)
                except (NetworkError, trio.TooSlowError) as exc:
                    self.stats["sync_failures"] += 1
                    self._synced.add(peer)  # retried by the periodic pull, not every second
                    log.info("ledger sync from %s failed: %s", peer[-8:], exc)
                else:
                    if pulled.invalid and not pulled.valid:
                        self._sync_fault(peer)
                    else:
                        self._sync_ok(peer)

    # -- checkpoints -----------------------------------------------------------------------

    def closed_epoch(self, now: float) -> int:
        """The newest epoch that may be checkpointed at ``now`` (-1 if none)."""
        params = self.genesis.params
        return int((now - params.checkpoint_delay) // params.epoch_seconds) - 1

    async def checkpoint_step(self) -> None:
        """Vote on closed epochs (if we are staked) and aggregate votes that reach quorum."""
        me = self._identity.peer_id
        closed = self.closed_epoch(self._clock.now())
        epochs = await self._blocking(self.ledger.entry_epochs)
        recent = [e for e in epochs if closed - 3 < e <= closed]
        state = await self._blocking(self.ledger.state)
        if state.stakes.get(me, 0) > 0 and self.ledger.bls_key(me) is not None:
            for epoch in recent:
                root, count = await self._blocking(self.ledger.epoch_root, epoch)
                voted = self._voted.setdefault(epoch, [])
                # Vote once per epoch, and again if late entries changed what we hold (peers
                # whose sets differed at the first vote then meet on the fuller set).
                if root in voted or len(voted) >= MAX_VOTES_PER_EPOCH:
                    continue
                wire = await self._blocking(
                    make_vote, self._identity, self.ledger.genesis_hash, epoch, root, count
                )
                try:
                    await self._store_and_announce(wire)
                except RecordError as exc:
                    log.info("vote on epoch %d not stored: %s", epoch, exc)
                voted.append(root)
                self.stats["votes"] += 1
        for epoch in recent:
            await self._maybe_aggregate(epoch)

    async def _maybe_aggregate(self, epoch: int) -> None:
        votes = await self._blocking(self.ledger.votes, epoch)
        groups: dict[tuple[str, int], dict[str, Entry]] = {}
        for vote in votes:
            groups.setdefault((vote.claim, vote.count), {})[vote.payer] = vote
        state = await self._blocking(self.ledger.state)
        total = state.total_weight()
        if not total:
            return
        held = await self._blocking(self.ledger.checkpoints, epoch)
        leaves = await self._blocking(self.ledger.epoch_leaves, epoch)
        local_root = epoch_root_of(leaves)
        for (root, count), by_signer in groups.items():
            # A checkpoint lists its entries: only a peer holding exactly the voted set can
            # make it (others will, or will receive it).
            if root != local_root or count != len(leaves):
                continue
            weight = sum(state.weight(s) for s in by_signer)
            if weight * 10_000 < self.genesis.params.quorum_bps * total:
                continue
            signers = set(by_signer)
            if any(c.entry.claim == root and signers <= set(c.entry.signers) for c in held):
                continue
            wire = make_checkpoint(
                self.ledger.genesis_hash,
                epoch,
                leaves,
                {s: v.signature for s, v in by_signer.items()},
            )
            await self._store_and_announce(wire)
            self.stats["checkpoints_made"] += 1

    async def _checkpoint_loop(self) -> None:
        while True:
            await trio.sleep(self.checkpoint_tick * self._runtime.random.uniform(0.8, 1.2))
            # Refolds start from a snapshot this old: later entries rarely arrive after it.
            horizon = self._clock.now() - max(
                HORIZON_SECONDS, 2 * self.genesis.params.epoch_seconds
            )
            await self._blocking(self.ledger.set_horizon, horizon)
            try:
                await self.checkpoint_step()
            except RecordError as exc:
                log.warning("checkpoint step failed: %s", exc)

    # -- running ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run gossip, sync and checkpoint loops until cancelled."""
        messages = await self._network.subscribe(self.topic, buffer=4096)
        # 64 bundles of at most 256 KiB: the 16 MiB that 4096 single receipts of 4 KiB take.
        bundles = await self._network.subscribe(self.bundle_topic, buffer=64)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._receive_loop, messages)
            nursery.start_soon(functools.partial(self._receive_loop, bundles, bundles=True))
            nursery.start_soon(self._publish_loop)
            nursery.start_soon(self._sync_loop)
            nursery.start_soon(self._checkpoint_loop)
            task_status.started()
