"""What this peer has measured of every worker it used: the only capacity it trusts.

A capacity record's TFLOP/s is a claim. The :class:`PeerBook` keeps, per worker, what this
peer saw for itself: verified shards (challenges and real work) with the TFLOP/s they delivered,
failures, timeouts, failed dials and proven wrong results. The scheduler ranks workers by it,
demotes the unreachable, the failing and the cheating for every later job, and gives workers it
has never measured only a bounded trial. The book outlives jobs and, through a SQLite file in
the data directory, restarts.

Times in the book are network time (:class:`~mtor_p2p.clock.NetClock`), so that a demotion
survives a restart and a simulation replays exactly.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mtor_p2p.config import private_sqlite, read_only_sqlite, sqlite_transaction

log = logging.getLogger(__name__)

#: Recent measurements kept per worker (shard round trips and delivered TFLOP/s).
RECENT = 32
#: Workers remembered; beyond, the least recently updated ones without a proven fault go first.
MAX_PEERS = 10_000
#: What a worker never measured counts as, at most, whatever it advertises (TFLOP/s). A claim
#: earns a trial, not a rank: the scheduler orders unmeasured workers at random.
UNMEASURED_TFLOPS_CAP = 1.0
#: Back-off after a failed dial: 30 s, doubling per failure in a row, at most an hour.
UNREACHABLE_BACKOFF = 30.0
#: Consecutive failures (errors, timeouts) before a worker is demoted, and its back-off.
FAILURES_BEFORE_DEMOTION = 3
FAILURE_BACKOFF = 60.0
#: A malformed answer: demoted at once, ten minutes doubling.
MISBEHAVED_BACKOFF = 600.0
MAX_BACKOFF = 3600.0
#: A proven wrong result (a fault proof was made) excludes a worker for this long.
REJECTED_EXCLUSION = 7 * 24 * 3600.0

OUTCOMES = (
    "accepted", "failed", "timeout", "unreachable", "misbehaved", "rejected", "slow", "busy"
)  # fmt: skip
#: A worker that stayed busy through a job's patience is skipped this long (not growing: it
#: is overloaded, perhaps by someone else's flood, not at fault).
BUSY_BACKOFF = 30.0
#: How a straggler demotion's reason starts (the scheduler tells it from other demotions).
STRAGGLER = "cut off as a straggler"
#: Trials cut off as a straggler (a hedged twin answered first) before an unmeasured worker
#: is demoted: once may be bad luck or a slow honest card, twice in a row is a pattern.
SLOW_TRIALS_BEFORE_DEMOTION = 2


@dataclass
class Standing:
    """One worker's record in the book."""

    peer_id: str
    accepted: int = 0
    failed: int = 0
    timeouts: int = 0
    unreachable: int = 0
    misbehaved: int = 0
    rejected: int = 0
    #: Attempts cut off as a straggler: still running long after a twin answered.
    slow: int = 0
    #: Jobs it left for answering "busy" again and again.
    busy: int = 0
    #: Failures of any kind since the last accepted shard (drives the back-off).
    in_a_row: int = 0
    #: Recent shard round trips (seconds) and delivered TFLOP/s, verified shards only.
    seconds: list[float] = field(default_factory=list)
    delivered: list[float] = field(default_factory=list)
    #: Network time until which the worker is not chosen, and why.
    demoted_until: float = 0.0
    reason: str = ""
    #: What the last failure was ("timeout: request ... timed out"), demoted or not.
    last_error: str = ""
    updated: float = 0.0

    @property
    def measured(self) -> bool:
        """True once at least one of its results was verified here."""
        return bool(self.delivered)

    def measured_tflops(self) -> float | None:
        """Median TFLOP/s this worker delivered on our verified shards (network and queueing
        included); None before the first."""
        return statistics.median(self.delivered) if self.delivered else None

    def reliability(self) -> float:
        """Share of its attempts that ended in a verified result (Laplace-smoothed)."""
        bad = self.failed + self.timeouts + self.unreachable + self.misbehaved + self.rejected
        return (self.accepted + 1) / (self.accepted + bad + self.slow + 2)

    def penalty(self) -> float:
        """Multiplier on the price per TFLOP/s: failures cost, proven cheating costs a lot."""
        bad = self.failed + self.timeouts + self.unreachable + self.misbehaved + self.slow / 2
        return (1 + bad / (1 + self.accepted)) * (1 + 100 * self.rejected)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form (the control API's and the SQLite file's)."""
        body = asdict(self)
        body["measured_tflops"] = self.measured_tflops()
        body["reliability"] = round(self.reliability(), 4)
        return body

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Standing:
        """Inverse of :meth:`to_json` (derived fields are ignored)."""
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        standing = cls(**known)
        standing.seconds = [float(s) for s in standing.seconds][-RECENT:]
        standing.delivered = [float(s) for s in standing.delivered][-RECENT:]
        return standing


class PeerBook:
    """Per-worker measurements and demotions, in memory, optionally kept in a SQLite file.

    The node flushes changed entries with :meth:`flush` (through its blocking-work hook) and on
    close; a crash loses at most the changes since the last flush.
    """

    def __init__(self, path: Path | None = None, *, max_peers: int = MAX_PEERS) -> None:
        self.path = path
        self._max_peers = max_peers
        self._peers: dict[str, Standing] = {}
        self._dirty: set[str] = set()
        self._gone: set[str] = set()
        self._db: sqlite3.Connection | None = None
        if path is not None:
            private_sqlite(path)  # data directory files are 0600 (and so its WAL files)
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS peers (peer_id TEXT PRIMARY KEY, standing TEXT)"
            )
            for peer_id, text in self._db.execute("SELECT peer_id, standing FROM peers"):
                try:
                    self._peers[peer_id] = Standing.from_json(json.loads(text))
                except (ValueError, TypeError) as exc:
                    log.warning("peer book: dropping unreadable entry %s: %s", peer_id, exc)

    @classmethod
    def read_only(cls, path: Path) -> PeerBook:
        """The book saved at ``path``, loaded without writing anything there (for reading a
        stopped node's book); raises ``sqlite3.Error`` if the file cannot be read.

        Opened by :func:`~mtor_p2p.config.read_only_sqlite` (after a crash its ``-wal``
        is read as it is).
        """
        book = cls()
        db = read_only_sqlite(path)
        try:
            rows = db.execute("SELECT peer_id, standing FROM peers").fetchall()
        finally:
            db.close()
        for peer_id, text in rows:
            try:
                book._peers[peer_id] = Standing.from_json(json.loads(text))
            except (ValueError, TypeError):
                continue
        return book

    # -- reading ----------------------------------------------------------------------------

    def get(self, peer_id: str) -> Standing:
        """The worker's standing (a blank one if never seen; not stored until it changes)."""
        return self._peers.get(peer_id) or Standing(peer_id)

    def known(self) -> list[Standing]:
        """Every remembered worker."""
        return list(self._peers.values())

    def report(self, now: float) -> list[dict[str, Any]]:
        """Every worker's standing as the control API shows it (with whether it is out now,
        and for how many more seconds), by peer ID."""
        entries = []
        for standing in sorted(self._peers.values(), key=lambda s: s.peer_id):
            entry = standing.to_json()
            entry["excluded"] = self.excluded(standing.peer_id, now)
            entry["demoted_for_s"] = round(max(0.0, standing.demoted_until - now), 1)
            entries.append(entry)
        return entries

    def excluded(self, peer_id: str, now: float) -> str | None:
        """Why the worker must not be chosen now, or None if it may be."""
        standing = self._peers.get(peer_id)
        if standing is None or standing.demoted_until <= now:
            return None
        return standing.reason or "demoted"

    def effective_tflops(self, peer_id: str, advertised: float) -> float:
        """The speed to plan with: what we measured, else the claim capped at
        :data:`UNMEASURED_TFLOPS_CAP`."""
        measured = self.get(peer_id).measured_tflops()
        if measured is not None:
            return measured
        return max(1e-6, min(advertised, UNMEASURED_TFLOPS_CAP))

    # -- recording --------------------------------------------------------------------------

    def _entry(self, peer_id: str, now: float) -> Standing:
        standing = self._peers.get(peer_id)
        if standing is None:
            if len(self._peers) >= self._max_peers:
                self._evict()
            standing = self._peers[peer_id] = Standing(peer_id)
        standing.updated = now
        self._dirty.add(peer_id)
        return standing

    def _evict(self) -> None:
        # Forget a tenth: first workers never measured (what Sybil churn adds), those no
        # longer demoted before those still serving a back-off; then measured workers, the
        # stalest first; workers caught cheating last of all.
        now = max((s.updated for s in self._peers.values()), default=0.0)
        order = sorted(
            self._peers.values(),
            key=lambda s: (s.rejected > 0, s.measured, s.demoted_until > now, s.updated),
        )
        for standing in order[: max(1, len(order) // 10)]:
            del self._peers[standing.peer_id]
            self._dirty.discard(standing.peer_id)
            self._gone.add(standing.peer_id)

    def accepted(self, peer_id: str, *, flops: int, seconds: float, now: float) -> None:
        """A verified result: ``flops`` delivered in ``seconds`` (request to answer)."""
        standing = self._entry(peer_id, now)
        standing.accepted += 1
        standing.in_a_row = 0
        seconds = max(seconds, 1e-6)
        standing.seconds = [*standing.seconds[-(RECENT - 1) :], seconds]
        standing.delivered = [*standing.delivered[-(RECENT - 1) :], flops / seconds / 1e12]
        if standing.rejected == 0:
            standing.demoted_until, standing.reason = 0.0, ""

    def failed(self, peer_id: str, outcome: str, now: float, detail: str = "") -> None:
        """A failed attempt: ``outcome`` is one of failed, timeout, unreachable, misbehaved,
        rejected, slow. Demotes the worker as the module's constants say."""
        if outcome not in OUTCOMES or outcome == "accepted":
            raise ValueError(f"unknown failure outcome {outcome!r}")
        standing = self._entry(peer_id, now)
        attribute = {"timeout": "timeouts"}.get(outcome, outcome)
        setattr(standing, attribute, getattr(standing, attribute) + 1)
        if outcome == "busy":
            # Not a failure: no streak, no doubling; a short pause for every later job.
            if now + BUSY_BACKOFF > standing.demoted_until:
                standing.demoted_until, standing.reason = now + BUSY_BACKOFF, "busy"
            standing.last_error = "busy"
            return
        standing.in_a_row += 1
        standing.last_error = f"{outcome}: {detail[:160]}" if detail else outcome
        k = standing.in_a_row
        until, reason = 0.0, ""
        if outcome == "rejected":
            until, reason = now + REJECTED_EXCLUSION, "returned a wrong result (fault proof)"
        elif outcome == "unreachable":
            until = now + min(MAX_BACKOFF, UNREACHABLE_BACKOFF * 2 ** (k - 1))
            reason = "unreachable"
        elif outcome == "misbehaved":
            until = now + min(MAX_BACKOFF, MISBEHAVED_BACKOFF * 2 ** (k - 1))
            reason = "malformed answers"
        elif outcome == "slow":
            limit = FAILURES_BEFORE_DEMOTION if standing.measured else SLOW_TRIALS_BEFORE_DEMOTION
            if k >= limit:
                until = now + min(MAX_BACKOFF, FAILURE_BACKOFF * 2 ** (k - limit))
                reason = f"{STRAGGLER} {k} times in a row"
        elif not standing.measured:
            # A failed trial: nothing verified speaks for this worker yet.
            until = now + min(MAX_BACKOFF, FAILURE_BACKOFF * 2 ** (k - 1))
            reason = "failed its trial"
        elif k >= FAILURES_BEFORE_DEMOTION:
            until = now + min(MAX_BACKOFF, FAILURE_BACKOFF * 2 ** (k - FAILURES_BEFORE_DEMOTION))
            reason = f"{k} failures in a row"
        if detail and reason:
            reason = f"{reason}: {detail[:120]}"
        if until > standing.demoted_until:
            if standing.reason.startswith(STRAGGLER) and standing.demoted_until > now:
                # Still a straggler, now failing too: a running job reads the reason's first
                # word to take it out (a review: two timeouts of its stalled shards renamed
                # the demotion, and the job sent it two more).
                reason = f"{STRAGGLER}, then {reason}"
            standing.demoted_until, standing.reason = until, reason

    def forget(self, peer_id: str) -> bool:
        """Drop everything known about ``peer_id`` (an operator's pardon)."""
        if self._peers.pop(peer_id, None) is None:
            return False
        self._dirty.discard(peer_id)
        self._gone.add(peer_id)
        return True

    # -- persistence ------------------------------------------------------------------------

    def flush(self) -> int:
        """Write changed entries to the file (a blocking call, on a thread while the event
        loop goes on changing entries); the number written."""
        # Copies (one C call each, atomic under the GIL), not iterations of sets the loop may
        # grow meanwhile; an entry changed after the copy stays marked for the next flush.
        dirty = self._dirty.copy()
        gone = self._gone.copy()
        self._dirty -= dirty
        self._gone -= gone
        if self._db is None:
            return 0
        rows = []
        for pid in sorted(dirty):
            standing = self._peers.get(pid)
            if standing is not None:
                rows.append((pid, json.dumps(standing.to_json())))
        if not rows and not gone:
            return 0
        try:
            with sqlite_transaction(self._db):  # one commit (and fsync) for all of them
                self._db.executemany("INSERT OR REPLACE INTO peers VALUES (?, ?)", rows)
                self._db.executemany(
                    "DELETE FROM peers WHERE peer_id = ?", [(g,) for g in sorted(gone)]
                )
        except BaseException:
            self._dirty |= dirty  # not written: the next flush tries again
            self._gone |= gone
            raise
        return len(rows)

    def close(self) -> None:
        """Flush and close the file."""
        if self._db is not None:
            self.flush()
            self._db.close()
            self._db = None
