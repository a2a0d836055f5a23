"""A peer's view of everyone's capacity: merged from gossip and the DHT, expired entries dropped."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from mtor_p2p.capacity.record import CapacityRecord
from mtor_p2p.ledger.names import LEDGER_RULES

GIB = 1 << 30


@dataclass(frozen=True)
class CapacityQuery:
    """What a requester needs; every bound is optional."""

    min_mem_free: int = 0  # bytes
    min_tflops: float = 0.0
    max_price: float | None = None
    region: str | None = None
    kernel: str | None = None
    max_load: float | None = None
    #: Only peers following these ledger rules (None: any). A receipt between peers of
    #: different rules would enter two ledgers that never hear each other (see
    #: :data:`~mtor_p2p.ledger.names.LEDGER_RULES`), so by default a query finds only the
    #: peers this version can pay and be paid by.
    ledger_rules: int | None = LEDGER_RULES

    def matches(self, record: CapacityRecord) -> bool:
        """True if ``record`` satisfies every bound of this query."""
        return (
            record.mem_free >= self.min_mem_free
            and record.tflops >= self.min_tflops
            and (self.max_price is None or record.price <= self.max_price)
            and (self.region is None or record.region == self.region)
            and (self.kernel is None or self.kernel in record.kernels)
            and (self.max_load is None or record.load <= self.max_load)
            and (self.ledger_rules is None or record.ledger_rules == self.ledger_rules)
        )


class CapacityView:
    """Newest live record per peer, bounded in size.

    Records must already be verified (see :func:`decode_capacity_record`); the view only orders
    them. A record replaces the held one only if its ``seq`` is higher, so a replayed or delayed
    older record never rolls a peer back. A withdrawn record removes the peer but is remembered
    (by its ``seq``) until it would have expired, so the older records still circulating in gossip
    and DHT stores cannot resurrect a peer that said goodbye.
    """

    def __init__(self, *, max_peers: int = 100_000) -> None:
        self._records: dict[str, CapacityRecord] = {}
        self._max_peers = max_peers

    def offer(self, record: CapacityRecord, now: float) -> bool:
        """Merge a verified record; return True if it changed the view."""
        held = self._records.get(record.peer_id)
        if held is not None and record.seq <= held.seq:
            return False
        if record.expires <= now:
            return False
        if held is None and len(self._records) >= self._max_peers:
            self.prune(now)
            if len(self._records) >= self._max_peers:
                return False  # full of live records: refuse newcomers, never evict live ones
        self._records[record.peer_id] = record
        return True

    def prune(self, now: float) -> list[str]:
        """Forget every record that has expired; return the peers whose entry went away."""
        gone = [pid for pid, rec in self._records.items() if rec.expires <= now]
        for pid in gone:
            del self._records[pid]
        return gone

    def get(self, peer_id: str, now: float) -> CapacityRecord | None:
        """The live record of ``peer_id``, or None."""
        record = self._records.get(peer_id)
        return record if record is not None and record.is_live(now) else None

    def held_seq(self, peer_id: str) -> int:
        """Sequence number of what we hold for ``peer_id`` (withdrawn or not); -1 if nothing."""
        record = self._records.get(peer_id)
        return -1 if record is None else record.seq

    def live(self, now: float) -> list[CapacityRecord]:
        """Every live record, sorted by peer ID."""
        return sorted(
            (r for r in self._records.values() if r.is_live(now)), key=lambda r: r.peer_id
        )

    def live_unsorted(self, now: float) -> Iterator[CapacityRecord]:
        """Every live record, in no order: one pass, without sorting the view."""
        return (r for r in self._records.values() if r.is_live(now))

    def peer_ids(self, now: float) -> set[str]:
        """IDs of every peer with a live record."""
        return {r.peer_id for r in self._records.values() if r.is_live(now)}

    def query(self, query: CapacityQuery, now: float) -> list[CapacityRecord]:
        """Live records matching ``query``, cheapest per TFLOP/s first, then fastest."""
        found: Iterable[CapacityRecord] = (r for r in self.live(now) if query.matches(r))
        return sorted(found, key=lambda r: (r.price / max(r.tflops, 1e-9), -r.tflops, r.peer_id))

    def __len__(self) -> int:
        return len(self._records)
