"""The ledger on disk: SQLite (WAL) in the data directory, holding only verified entries.

Nothing but entries is stored: balances are derived from them (:mod:`mtor_p2p.ledger.state`)
and kept in memory, updated entry by entry as entries arrive in order; an entry that arrives
out of order makes the next read refold from a snapshot (see :meth:`Ledger.set_horizon`).
Inserting an entry twice changes nothing (its ID is the hash of its bytes). Each insert batch is
one transaction with ``synchronous=FULL``: once :meth:`Ledger.ingest` returns, its entries
survive a crash or SIGKILL.

The local sequence number (``seq``) orders entries by arrival here; pull sync hands them out
by ``seq`` so that a peer can resume where it stopped (see :mod:`mtor_p2p.ledger.service`).
"""

from __future__ import annotations

import os
import re
import sqlite3
import stat
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3

from mtor_p2p.config import private_sqlite, read_only_sqlite, sqlite_transaction
from mtor_p2p.ledger import bls
from mtor_p2p.ledger.entries import (
    Entry,
    checkpoint_message,
    decode_entry,
    epoch_root_of,
)
from mtor_p2p.ledger.genesis import Genesis
from mtor_p2p.ledger.merkle import (
    inclusion_proof,
    verify_inclusion,
)
from mtor_p2p.ledger.names import LEDGER_RULES, OtherNetworkLedger
from mtor_p2p.ledger.names import MIN_ENTRY_PREFIX as MIN_ENTRY_PREFIX
from mtor_p2p.ledger.names import LedgerError as LedgerError
from mtor_p2p.ledger.names import is_entry_prefix as is_entry_prefix
from mtor_p2p.ledger.state import CheckpointLeaves, Event, LedgerState, fold
from mtor_p2p.wire import RecordError

LEDGER_FILE_NAME = "ledger.sqlite"

#: A peer may vote again on an epoch whose entry set grew after its vote (late entries), at
#: most this many times: enough for stragglers, too few to flood the ledger.
MAX_VOTES_PER_EPOCH = 3
#: Votes and checkpoints waiting for their signers' stakes, at most this many.
MAX_PARKED = 4096
_NOT_STAKED = "signed by a peer that has not staked"
_FOLD_KINDS = ("receipt", "transfer", "stake", "fault")
#: The walk is copied every this many events (a *mark*), and the newest MAX_MARKS marks are
#: kept, so that an entry arriving out of order refolds from the last mark before it rather
#: than from the horizon's snapshot. Receipts of several workers arrive a little out of order
#: all the time, and a refold from a snapshot 10 minutes old walks every entry since: 63 ms
#: per late entry (and read) with 20,000 entries held, against 0.4-0.7 ms with marks, on the
#: project's VM. 32 x 64 events cover about 14 s of a requester paying 150 shards/s; an entry
#: later than that refolds from the snapshot, as before.
#:
#: A mark is a full copy of the state, which grows with the peers and the entries without
#: effect that the ledger holds, and anyone can add to those. So marks are at least one event
#: apart per MARK_COPY_SHARE items of state (each event walked pays for copying at most
#: that many items), and kept only while all of them together hold at most MARK_BUDGET_ITEMS
#: items (about 40 MB), 2 at least. With 25,150 peers and 20,000 entries held, a read after a
#: valid entry 1 s late took 3.4 ms (43.7 without marks), 5 minutes late 28.6 ms (45.4), and
#: after an in-order one with 4,000 future-dated entries held 21.1 ms (56.2); marks every 64
#: events whatever the state's size had made the last two 67.7 and 93.3 ms (a review's
#: figures, the project's VM).
MARK_EVERY = 64
MAX_MARKS = 32
MARK_COPY_SHARE = 32
MARK_BUDGET_ITEMS = 1_000_000

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    seq    INTEGER PRIMARY KEY,       -- arrival order here (the sync cursor)
    id     TEXT NOT NULL UNIQUE,      -- blake3 of wire
    kind   TEXT NOT NULL,
    at     REAL NOT NULL,
    rank   INTEGER NOT NULL,
    payer  TEXT NOT NULL,
    payee  TEXT NOT NULL,
    amount INTEGER NOT NULL,
    claim  TEXT NOT NULL,
    epoch  INTEGER NOT NULL,          -- receipts: epoch of their end time; votes/checkpoints
    bls    BLOB NOT NULL,             -- stake: its BLS public key (empty otherwise)
    wire   BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_kind_epoch ON entries(kind, epoch);
CREATE INDEX IF NOT EXISTS entries_order ON entries(at, rank, id);
CREATE TABLE IF NOT EXISTS peer_cursors (
    peer     TEXT PRIMARY KEY,        -- one row per remote peer: its ledger instance ...
    instance TEXT NOT NULL,
    seq      INTEGER NOT NULL         -- ... and how far we have pulled from it
);
"""


@dataclass
class IngestResult:
    """What one :meth:`Ledger.ingest` call did."""

    new: int = 0
    duplicate: int = 0
    invalid: list[str] = field(default_factory=list)  # one reason per rejected entry
    parked: int = 0  # votes/checkpoints kept aside until their signers' stakes arrive
    new_entries: list[Entry] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """Counts for logs and the control API."""
        return {
            "new": self.new,
            "duplicate": self.duplicate,
            "invalid": len(self.invalid),
            "parked": self.parked,
        }


@dataclass(frozen=True)
class CheckpointInfo:
    """A stored checkpoint and what this ledger makes of it."""

    entry: Entry
    weight_bps: int  # signers' share of all stake now
    final: bool  # weight reaches the genesis quorum
    local_count: int  # receipts of that epoch held here
    local_root: str

    @property
    def matches(self) -> bool:
        """True if this ledger holds exactly the checkpointed receipt set."""
        return self.local_root == self.entry.claim and self.local_count == self.entry.count

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "epoch": self.entry.epoch,
            "root": self.entry.claim,
            "count": self.entry.count,
            "signers": len(self.entry.signers),
            "weight_bps": self.weight_bps,
            "final": self.final,
            "matches_local": self.matches,
            "local_count": self.local_count,
        }


#: SQLite's result codes that say nothing of the file itself: busy, locked, out of memory.
_TRANSIENT_SQLITE_CODES = frozenset({5, 6, 7})


def _not_the_files_fault(exc: sqlite3.Error) -> bool:
    """Whether SQLite's error ``exc`` is the moment's (busy, locked, out of memory), not the
    file's, so that it is raised as it is rather than as an unreadable ledger."""
    return getattr(exc, "sqlite_errorcode", None) in _TRANSIENT_SQLITE_CODES


def _unreadable(path: Path, exc: BaseException) -> LedgerError:
    return LedgerError(
        f"{path} is not a readable ledger ({exc}): move it aside, and the node starts a new "
        "one, which its peers fill again by sync"
    )


def _recorded_rules(path: Path) -> Any:
    """The ledger rules recorded in the ledger file at ``path`` (see :data:`LEDGER_RULES`),
    read without writing anything to it (a WAL file's ``-shm`` may be made beside it, as any
    reader makes it); None for a file without the record (none yet, or one of a version
    before it), or a symbolic link (refused where the node opens it, as before). LedgerError
    for something that is no ledger (not a regular file, not a database, a ``meta`` of
    another shape); OSError (permission denied) as the system says it."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(info.st_mode):
        return None
    if not stat.S_ISREG(info.st_mode):  # a FIFO would hold the open, a device be read
        raise LedgerError(f"{path} is not a regular file: move it aside")
    if info.st_size == 0:
        return None
    os.close(os.open(path, os.O_RDONLY | os.O_NOFOLLOW))  # unreadable: said as the OS says it
    try:
        db = read_only_sqlite(path)
    except sqlite3.Error as exc:
        if _not_the_files_fault(exc):
            raise
        raise _unreadable(path, exc) from None
    try:
        # Table names are case-blind in SQL: "META" is the table ``meta`` names.
        kinds = [
            kind
            for (kind,) in db.execute("SELECT type FROM sqlite_master WHERE lower(name) = 'meta'")
        ]
        if not kinds:
            return None
        if kinds != ["table"]:
            raise LedgerError(f"{path} is not a ledger: its meta is a {kinds[0]}, not a table")
        row = db.execute("SELECT value FROM meta WHERE key = 'rules'").fetchone()
    except sqlite3.Error as exc:  # not a database, a damaged one, a meta of another shape
        if _not_the_files_fault(exc):
            raise
        raise _unreadable(path, exc) from None
    finally:
        db.close()
    return None if row is None else row[0]


def check_ledger_file(path: Path) -> None:
    """Raise LedgerError if the ledger file at ``path`` follows rules this version does not
    know, reading it without writing anything (a missing file passes): what a node checks
    before it starts anything, so that its refusal is its first and only line."""
    _check_rules(path, _recorded_rules(path))


def _check_rules(path: Path, rules: Any) -> None:
    """Raise LedgerError unless ``rules`` (a file's record, None for none) is this version's
    or an older one: folded under this version's rules, the entries of a file of newer ones
    could mean other balances than the peers that wrote it agree on (and this version cannot
    hear those peers)."""
    if rules is None:
        return
    if isinstance(rules, str) and re.fullmatch(r"[0-9]{1,9}", rules) and int(rules) <= LEDGER_RULES:
        return
    shown = str(rules)[:20] + ("..." if len(str(rules)) > 20 else "")
    raise LedgerError(
        f"{path} was written under ledger rules {shown!r}; this version of MTOR follows rules "
        f"{LEDGER_RULES} (upgrade MTOR: git pull in its checkout; or use another data directory)"
    )


class Ledger:
    """Verified ledger entries in one SQLite file, and the balances they imply."""

    def __init__(
        self,
        path: Path | str,
        genesis: Genesis,
        *,
        backend: bls.BlsBackend | None = None,
        instance: str | None = None,
    ):
        """Open (or create) the ledger at ``path`` (``":memory:"``: in memory, for simulation).

        ``instance`` names a new ledger file (random by default; a simulation passes a seeded
        one); an existing file keeps the name it was created with.
        """
        self.path = Path(path)
        self.genesis = genesis
        self.genesis_hash = genesis.hash
        self.bls = backend or bls.default_backend()
        self._lock = threading.RLock()
        if str(path) != ":memory:":
            # Before anything writes to it (its mode, the journal, the schema): a file this
            # version refuses is left exactly as it was (a hostile review).
            check_ledger_file(self.path)
        # 0600 before SQLite opens it: its -wal and -shm files then get the same mode.
        private_sqlite(path)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            self._prepare_file(instance)
        except sqlite3.DatabaseError as exc:
            self._db.close()
            if _not_the_files_fault(exc):
                raise
            # A hand-made or damaged file (a ``meta`` of another shape...): the data's fault,
            # said as such (a hostile review found "unexpected error ... a bug" for them).
            raise _unreadable(self.path, exc) from None
        except BaseException:
            self._db.close()
            raise
        # A peer's BLS key is the one in its earliest stake entry, by (at, id): chosen from the
        # entry set, never from the order of arrival, so every peer agrees on it.
        self._keys: dict[str, tuple[tuple[float, str], bytes]] = {}
        # The walk over every entry (late entries of final epochs still set aside), a snapshot
        # of the walk up to the horizon, and the finished state that reads return.
        self._state: LedgerState | None = None  # None: walk again on the next read
        self._base: LedgerState | None = None
        self._finished: LedgerState | None = None
        self._horizon: float | None = None
        #: Copies of the walk (oldest first), each of every stored entry up to its ``last``
        #: (see MARK_EVERY); an entry sorting before a mark's ``last`` drops that mark.
        self._marks: list[LedgerState] = []
        self._unmarked = 0  # events walked since the newest mark
        self._mark_spacing = MARK_EVERY  # events between marks (see MARK_COPY_SHARE)
        self._max_marks = MAX_MARKS  # marks kept (see MARK_BUDGET_ITEMS)
        self._checkpoints: dict[int, list[CheckpointLeaves]] = {}
        self._parked: dict[str, bytes] = {}  # entry ID -> wire, oldest first
        try:
            self._load_rows()
        except BaseException:
            self._db.close()  # a row this version cannot read: not left to the collector
            raise

    def _load_rows(self) -> None:
        """What the ledger keeps in memory of its stored rows: stakes' BLS keys, checkpoints."""
        for peer, at, entry_id, key in self._db.execute(
            "SELECT payer, at, id, bls FROM entries WHERE kind = 'stake'"
        ):
            self._register(peer, (at, entry_id), bytes(key))
        for (wire,) in self._db.execute("SELECT wire FROM entries WHERE kind = 'checkpoint'"):
            self._remember_checkpoint(decode_entry(bytes(wire), self.genesis_hash))

    def _prepare_file(self, instance: str | None) -> None:
        """Set the opened file up (journal, schema, its first rows) and check that it is this
        network's, under rules this version knows (LedgerError otherwise)."""
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # acknowledged means on disk
        self._db.executescript(SCHEMA)
        with sqlite_transaction(self._db):  # both rows or neither (a crash between them)
            held = self._meta("genesis")
            if held is None:
                self._db.execute("INSERT INTO meta VALUES ('genesis', ?)", (self.genesis_hash,))
                self._db.execute(
                    "INSERT INTO meta VALUES ('instance', ?)", (instance or os.urandom(8).hex(),)
                )
                self._db.execute("INSERT INTO meta VALUES ('rules', ?)", (str(LEDGER_RULES),))
        if held is not None and held != self.genesis_hash:
            raise OtherNetworkLedger(
                f"{self.path} belongs to the network with genesis {held[:16]}..., not "
                f"{self.genesis_hash[:16]}... (use that genesis, or another data directory: a data "
                "directory keeps the network it began with; to keep this node's peer ID, move "
                "its identity.key there and run only the new one)",
                held,
                self.genesis_hash,
            )
        rules = self._meta("rules")
        # Again, on this connection: the file may have changed since it was read.
        _check_rules(self.path, rules)
        self.instance = self._meta("instance") or ""
        if rules != str(LEDGER_RULES):
            self._adopt_rules()

    def _remember_checkpoint(self, entry: Entry) -> None:
        self._checkpoints.setdefault(entry.epoch, []).append(
            CheckpointLeaves(entry.entry_id, entry.epoch, entry.signers, frozenset(entry.leaves))
        )

    def _adopt_rules(self) -> None:
        """Bring a file of older rules (or of a version before the record) to this version's:
        its stored fault proofs get the claim and rank this version derives from their bytes
        (since 2026-12-06 the claim names the requester, and a proof that rewards nobody ranks
        after the others; the fold orders and deduplicates by these columns, and ``verify``
        compares them with the bytes), and the file records this version's rules, in one
        transaction. Once per file, one row at a time: a proof is re-checked in full to be
        decoded, and a peer can hold many of up to 16 MiB each (a hostile review: every open
        re-checked them all, all in memory at once)."""
        ids = [row[0] for row in self._db.execute("SELECT id FROM entries WHERE kind = 'fault'")]
        stale = []
        for entry_id in ids:
            row = self._db.execute(
                "SELECT claim, rank, wire FROM entries WHERE id = ?", (entry_id,)
            ).fetchone()
            if not isinstance(row[2], bytes):  # a damaged row: ``verify`` reports it
                continue
            try:
                entry = decode_entry(row[2], self.genesis_hash, check_bls=False)
            except Exception:  # as damaged, whatever the decoder made of it
                continue
            if entry.kind == "fault" and (entry.claim, entry.rank) != (row[0], row[1]):
                stale.append((entry.claim, entry.rank, entry_id))
        with sqlite_transaction(self._db):
            self._db.executemany("UPDATE entries SET claim = ?, rank = ? WHERE id = ?", stale)
            self._db.execute(
                "INSERT OR REPLACE INTO meta VALUES ('rules', ?)", (str(LEDGER_RULES),)
            )

    def _register(self, peer: str, order: tuple[float, str], key: bytes) -> None:
        held = self._keys.get(peer)
        if held is None or order < held[0]:
            self._keys[peer] = (order, key)

    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    # -- writing ---------------------------------------------------------------------------

    def ingest(self, wires: Iterable[bytes]) -> IngestResult:
        """Verify and store entries (any kinds, any order); invalid ones are reported, not kept.

        Returns once the new entries are durable.
        """
        result = IngestResult()
        candidates: dict[str, bytes] = {}
        for wire in wires:
            candidates.setdefault(blake3.blake3(wire).hexdigest(), bytes(wire))
        held = self.held(list(candidates))
        result.duplicate = len(held)
        fresh = [wire for entry_id, wire in candidates.items() if entry_id not in held]
        # Signature checks run outside the lock: readers are not held up by verification.
        decoded: list[Entry] = []
        for outcome in _decode_many(fresh, self.genesis_hash):
            if isinstance(outcome, Entry):
                decoded.append(outcome)
            else:
                result.invalid.append(outcome)
        with self._lock:
            batch_keys: dict[str, tuple[tuple[float, str], bytes]] = {}
            # One transaction (one fsync) per batch (config.sqlite_transaction).
            with sqlite_transaction(self._db):
                for entry in decoded:
                    reason = self._check_stateful(entry, batch_keys)
                    if reason == _NOT_STAKED:
                        self._park(entry)  # its signer's stake may still be on its way
                        result.parked += 1
                    elif reason is not None:
                        result.invalid.append(reason)
                    elif self._insert(entry):
                        result.new_entries.append(entry)
                        if entry.kind == "stake":
                            order = (entry.at, entry.entry_id)
                            held_key = batch_keys.get(entry.payer)
                            if held_key is None or order < held_key[0]:
                                batch_keys[entry.payer] = (order, entry.bls_key)
                    else:
                        result.duplicate += 1  # another ingest stored it meanwhile
            for entry in result.new_entries:
                if entry.kind == "stake":
                    self._register(entry.payer, (entry.at, entry.entry_id), entry.bls_key)
                elif entry.kind == "checkpoint":
                    # It may finalise an epoch already walked: walk everything again.
                    self._remember_checkpoint(entry)
                    self._state = self._base = self._finished = None
                    self._marks.clear()
            result.new = len(result.new_entries)
            self._advance(result.new_entries)
            retry = self._unpark() if any(e.kind == "stake" for e in result.new_entries) else []
        if retry:
            again = self.ingest(retry)
            result.new += again.new
            result.new_entries += again.new_entries
            result.invalid += again.invalid
        return result

    def _park(self, entry: Entry) -> None:
        """Keep a vote or checkpoint whose signer has not staked yet, to retry it when stakes
        arrive: entries come in any order, and dropping it would leave this peer without it.
        Bounded: the oldest parked entry goes first."""
        self._parked[entry.entry_id] = entry.wire
        while len(self._parked) > MAX_PARKED:
            self._parked.pop(next(iter(self._parked)))

    def _unpark(self) -> list[bytes]:
        ready = [
            wire
            for wire in self._parked.values()
            if all(
                self._key_of(s) is not None
                for s in decode_entry(wire, self.genesis_hash, check_bls=False).signers
            )
        ]
        for wire in ready:
            self._parked.pop(blake3.blake3(wire).hexdigest(), None)
        return ready

    def flows(self, peer: str) -> list[tuple[str, str, str, str, int]]:
        """Every balance-moving entry that names ``peer`` (receipts, transfers and faults as
        payer or payee, stakes as staker) as (kind, entry ID, payer, payee, amount), in fold
        order. Whether each took effect is the state's to say (``state().ineffective``)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT kind, id, payer, payee, amount FROM entries "
                "WHERE (payer = ? OR payee = ?) "
                "AND kind IN ('receipt', 'transfer', 'stake', 'fault') ORDER BY at, rank, id",
                (peer, peer),
            ).fetchall()
        return [(str(k), str(i), str(a), str(b), int(n)) for k, i, a, b, n in rows]

    def state_and_flows(
        self, peer: str
    ) -> tuple[LedgerState, list[tuple[str, str, str, str, int]]]:
        """:meth:`state` and :meth:`flows` of ``peer`` read together, so that no entry lands
        between the two (an account reconciled against its flows must see the same entries)."""
        with self._lock:
            return self.state(), self.flows(peer)

    def held(self, ids: Sequence[str]) -> set[str]:
        """Which of ``ids`` this ledger holds."""
        with self._lock:
            return self._existing(ids)

    def _existing(self, ids: Sequence[str]) -> set[str]:
        held: set[str] = set()
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(f"SELECT id FROM entries WHERE id IN ({marks})", chunk)
            held.update(row[0] for row in rows)
        return held

    def _insert(self, entry: Entry) -> bool:
        # Balance-moving entries are filed under the epoch of their time; votes and
        # checkpoints under the epoch they vouch for. Only stakes carry a key (their BLS key).
        if entry.kind in _FOLD_KINDS:
            epoch = int(entry.at // self.genesis.params.epoch_seconds)
        else:
            epoch = entry.epoch
        cursor = self._db.execute(
            "INSERT OR IGNORE INTO entries "
            "(id, kind, at, rank, payer, payee, amount, claim, epoch, bls, wire) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                entry.entry_id,
                entry.kind,
                entry.at,
                entry.rank,
                entry.payer,
                entry.payee,
                entry.amount,
                entry.claim,
                epoch,
                entry.bls_key,
                entry.wire,
            ),
        )
        return cursor.rowcount > 0

    def _key_of(
        self, peer: str, batch: dict[str, tuple[tuple[float, str], bytes]] | None = None
    ) -> bytes | None:
        """``peer``'s BLS key, counting the stakes of the batch being stored (``batch``)."""
        best = self._keys.get(peer)
        pending = (batch or {}).get(peer)
        if pending is not None and (best is None or pending[0] < best[0]):
            best = pending
        return None if best is None else best[1]

    def _check_stateful(
        self, entry: Entry, batch: dict[str, tuple[tuple[float, str], bytes]]
    ) -> str | None:
        """The checks that need ledger state (signers' BLS keys, votes held): None if
        ``entry`` passes, else the reason. ``batch``: keys staked earlier in this batch."""
        if entry.kind == "vote":
            key = self._key_of(entry.payer, batch)
            if key is None:
                return _NOT_STAKED
            held = self._db.execute(
                "SELECT COUNT(*) FROM entries WHERE kind = 'vote' AND payer = ? AND epoch = ?",
                (entry.payer, entry.epoch),
            ).fetchone()[0]
            if held >= MAX_VOTES_PER_EPOCH:
                return f"more than {MAX_VOTES_PER_EPOCH} votes from one peer on one epoch"
            message = checkpoint_message(self.genesis_hash, entry.epoch, entry.claim, entry.count)
            if not self.bls.verify(key, message, entry.signature):
                return "vote signature does not verify"
        elif entry.kind == "checkpoint":
            return self._check_aggregate(entry, batch)
        return None

    def _check_aggregate(
        self, entry: Entry, batch: dict[str, tuple[tuple[float, str], bytes]] | None = None
    ) -> str | None:
        keys = [self._key_of(s, batch) for s in entry.signers]
        if any(k is None for k in keys):
            return _NOT_STAKED
        message = checkpoint_message(self.genesis_hash, entry.epoch, entry.claim, entry.count)
        if not self.bls.fast_aggregate_verify([k for k in keys if k], message, entry.signature):
            return "checkpoint aggregate signature does not verify"
        return None

    def _advance(self, entries: list[Entry]) -> None:
        """Keep the in-memory state current without a refold while entries come in order."""
        for entry in entries:
            if entry.kind not in _FOLD_KINDS:
                continue
            event = _event(entry)
            if self._base is not None and not self._base.follows(event):
                self._base = None  # older than the snapshot: the next read refolds it all
            while self._marks and not self._marks[-1].follows(event):
                self._marks.pop()  # it lacks this entry
            if self._state is not None and self._state.follows(event):
                self._state.walk(event, self._checkpoints)
                self._walked_one(self._state)
            else:
                # Out of order: the next read walks again from the last mark before it (or
                # from the snapshot).
                self._state = None
            self._finished = None

    def set_horizon(self, at: float) -> None:
        """Let refolds start from a snapshot of every entry up to time ``at``.

        Entries arrive out of order within seconds or minutes, rarely older than an epoch or
        two; a snapshot of the state up to such a horizon makes a refold cost only the entries
        after it. An entry older than the horizon still arrives correctly: it discards the
        snapshot, and the next read folds everything again.
        """
        with self._lock:
            if self._horizon is not None and at <= self._horizon:
                return
            self._horizon = at
            if self._base is not None:
                self._base = self._fold_from(self._base.copy(), until=at)

    def _walked_one(self, walk: LedgerState) -> None:
        """Note one more event walked into ``walk`` (the live walk): mark it when due."""
        self._unmarked += 1
        if self._unmarked >= self._mark_spacing:
            self._unmarked = 0
            size = walk.size()
            self._mark_spacing = max(MARK_EVERY, size // MARK_COPY_SHARE)
            self._max_marks = max(2, min(MAX_MARKS, MARK_BUDGET_ITEMS // max(1, size)))
            self._marks.append(walk.copy())
            del self._marks[: -self._max_marks]

    def _fold_from(
        self, state: LedgerState, *, until: float | None = None, marking: bool = False
    ) -> LedgerState:
        """Apply to ``state`` the stored events after ``state.last`` (up to time ``until``);
        ``marking``: ``state`` is to be the live walk, marked as it goes."""
        # "+kind": the kind index must not be used here (SQLite prefers it, then reads every
        # balance-moving entry and sorts them); the order index finds where ``last`` ends.
        sql = (
            "SELECT at, rank, id, kind, payer, payee, amount, claim FROM entries "
            "WHERE +kind IN ('receipt', 'transfer', 'stake', 'fault')"
        )
        params: list[object] = []
        if state.last is not None:
            sql += " AND (at, rank, id) > (?, ?, ?)"
            params += list(state.last)
        if until is not None:
            sql += " AND at <= ?"
            params.append(until)
        # Marks only where they can be kept: among the newest events of a long refold.
        unmarked = 0
        if marking:
            count_sql = "SELECT COUNT(*) FROM entries" + sql[sql.index(" WHERE") :]
            (total,) = self._db.execute(count_sql, params).fetchone()
            unmarked = max(0, total - self._max_marks * self._mark_spacing)
        for row in self._db.execute(sql + " ORDER BY at, rank, id", params):
            state.walk(Event(*row), self._checkpoints)
            if not marking:
                continue
            if unmarked:
                unmarked -= 1
            else:
                self._walked_one(state)
        return state

    def set_cursor(self, peer: str, instance: str, seq: int) -> None:
        """Remember how far we have pulled from ``peer``'s ledger ``instance``."""
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO peer_cursors VALUES (?, ?, ?)", (peer, instance, seq)
            )

    def cursor(self, peer: str) -> tuple[str, int]:
        """``peer``'s ledger instance and the last ``seq`` pulled from it (("", 0): none)."""
        with self._lock:
            row = self._db.execute(
                "SELECT instance, seq FROM peer_cursors WHERE peer = ?", (peer,)
            ).fetchone()
        return ("", 0) if row is None else (str(row[0]), int(row[1]))

    # -- reading ---------------------------------------------------------------------------

    def state(self) -> LedgerState:
        """The balances after every stored entry: a snapshot that later ingests leave alone
        (do not modify it; it is shared by readers until the next change)."""
        with self._lock:
            if self._finished is None:
                if self._state is None:
                    self._state = self._refold()
                # Readers keep what they get while later ingests move the walk on: give them
                # a copy (one per change), never the walk itself.
                walk = self._state
                self._finished = walk.finished() if walk.pending else walk.copy()
            return self._finished

    def spendable_if_ready(self, peer: str) -> int | None:
        """``state().spendable(peer)`` if it can be read at once, else None: never waits for
        a write in progress and never refolds, so an event loop may call it (and read the
        ledger from a thread only when it returns None)."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            state = self._finished
            if state is None:
                walk = self._state
                if walk is None or walk.pending:
                    return None  # a refold, or late entries to apply: work for a thread
                state = walk  # current and complete: read in place, under the lock
            return state.spendable(peer)
        finally:
            self._lock.release()

    def _refold(self) -> LedgerState:
        if self._base is None:
            self._base = self._fold_from(LedgerState(self.genesis), until=self._horizon or -1.0)
        start = self._base
        if self._marks and (start.last is None or self._marks[-1].last > start.last):
            start = self._marks[-1]
        self._unmarked = 0
        return self._fold_from(start.copy(), marking=True)

    def account(self, peer: str) -> dict[str, int]:
        """A peer's balance, stake and slashed total (nano-credits)."""
        return self.state().account(peer)

    def count(self, kind: str | None = None) -> int:
        """Number of stored entries (of one kind)."""
        with self._lock:
            if kind is None:
                row = self._db.execute("SELECT COUNT(*) FROM entries").fetchone()
            else:
                row = self._db.execute(
                    "SELECT COUNT(*) FROM entries WHERE kind = ?", (kind,)
                ).fetchone()
        return int(row[0])

    def entries_after(
        self, seq: int, *, max_bytes: int, max_count: int = 5000
    ) -> tuple[list[tuple[int, bytes]], bool]:
        """Entries with local ``seq`` above ``seq``, in order, up to ``max_bytes`` (at least
        one), and whether more remain."""
        out: list[tuple[int, bytes]] = []
        size = 0
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, wire FROM entries WHERE seq > ? ORDER BY seq LIMIT ?",
                (seq, max_count + 1),
            ).fetchall()
        for number, wire in rows[:max_count]:
            if out and size + len(wire) > max_bytes:
                return out, True
            out.append((int(number), bytes(wire)))
            size += len(wire)
        return out, len(rows) > max_count

    def bls_key(self, peer: str) -> bytes | None:
        """The BLS key a peer registered with its (earliest) stake."""
        return self._key_of(peer)

    def epoch_receipts(self, epoch: int) -> list[bytes]:
        """The canonical bytes of every receipt whose end time falls in ``epoch``."""
        with self._lock:
            rows = self._db.execute(
                "SELECT wire FROM entries WHERE kind = 'receipt' AND epoch = ?", (epoch,)
            ).fetchall()
        return [bytes(r[0])[1:] for r in rows]

    def epoch_leaves(self, epoch: int) -> list[str]:
        """IDs of every balance-moving entry (receipt, transfer, stake, fault) dated in
        ``epoch``, sorted: what a checkpoint of the epoch covers."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id FROM entries WHERE epoch = ? "
                "AND kind IN ('receipt', 'transfer', 'stake', 'fault') ORDER BY id",
                (epoch,),
            ).fetchall()
        return [r[0] for r in rows]

    def epoch_root(self, epoch: int) -> tuple[str, int]:
        """The Merkle root (hex) and size of ``epoch``'s entry set held here."""
        leaves = self.epoch_leaves(epoch)
        return epoch_root_of(leaves), len(leaves)

    def entry_epochs(self) -> list[int]:
        """Epochs in which some balance-moving entry is dated, ascending."""
        with self._lock:
            rows = self._db.execute(
                "SELECT DISTINCT epoch FROM entries "
                "WHERE kind IN ('receipt', 'transfer', 'stake', 'fault') ORDER BY epoch"
            ).fetchall()
        return [int(r[0]) for r in rows]

    def _decoded(self, kind: str, epoch: int | None) -> list[Entry]:
        with self._lock:
            if epoch is None:
                rows = self._db.execute(
                    "SELECT wire FROM entries WHERE kind = ? ORDER BY epoch, seq", (kind,)
                ).fetchall()
            else:
                rows = self._db.execute(
                    "SELECT wire FROM entries WHERE kind = ? AND epoch = ? ORDER BY seq",
                    (kind, epoch),
                ).fetchall()
        return [decode_entry(bytes(r[0]), self.genesis_hash) for r in rows]

    def votes(self, epoch: int) -> list[Entry]:
        """Stored (verified) votes on ``epoch``."""
        return self._decoded("vote", epoch)

    def checkpoints(self, epoch: int | None = None) -> list[CheckpointInfo]:
        """Stored (verified) checkpoints, with their weight now, whether the fold took each as
        final for its epoch, and whether it matches the entries held here."""
        state = self.state()
        total = state.total_weight()
        infos = []
        for entry in self._decoded("checkpoint", epoch):
            weight = sum(state.weight(s) for s in entry.signers)
            root, count = self.epoch_root(entry.epoch)
            infos.append(
                CheckpointInfo(
                    entry,
                    weight * 10_000 // total if total else 0,
                    state.final_epochs.get(entry.epoch) == entry.entry_id,
                    count,
                    root,
                )
            )
        return infos

    def prove(self, entry_id: str) -> dict[str, Any]:
        """A Merkle path from an entry (a receipt, say) to a checkpoint that lists it: the final
        checkpoint of its epoch if that lists it, else the heaviest that does.

        ``entry_id`` may be a prefix of at least :data:`MIN_ENTRY_PREFIX` hex digits (as
        tables print them) that names one provable entry. Raises LedgerError when the entry
        is unknown or ambiguous, or no checkpoint lists it.
        """
        entry_id = entry_id.strip().lower()
        if not is_entry_prefix(entry_id):
            raise LedgerError(
                f"an entry ID is {MIN_ENTRY_PREFIX}-64 hex digits (a prefix names the entry "
                f"it alone starts), not {entry_id[:70]!r}"
            )
        # A prefix as a key range (hex IDs are lower case): the ID column's index, no scan.
        upper = entry_id + "g"
        with self._lock:
            rows = self._db.execute(
                "SELECT id, epoch, kind FROM entries WHERE id >= ? AND id < ? "
                "AND kind IN ('receipt', 'transfer', 'stake', 'fault') LIMIT 2",
                (entry_id, upper),
            ).fetchall()
        if not rows:
            raise LedgerError(f"no entry {entry_id} in this ledger")
        if len(rows) > 1:
            raise LedgerError(f"more than one entry starts with {entry_id}: give more digits")
        entry_id, epoch, kind = rows[0][0], int(rows[0][1]), str(rows[0][2])
        listing = [c for c in self.checkpoints(epoch) if entry_id in c.entry.leaves]
        if not listing:
            raise LedgerError(f"no checkpoint of epoch {epoch} lists {entry_id[:16]} (yet)")
        checkpoint = max(listing, key=lambda c: (c.final, c.weight_bps, len(c.entry.signers)))
        leaves = [bytes.fromhex(i) for i in checkpoint.entry.leaves]
        proof = inclusion_proof(leaves, bytes.fromhex(entry_id))
        assert verify_inclusion(proof, bytes.fromhex(checkpoint.entry.claim))
        return {
            "entry": entry_id,
            "kind": kind,
            "epoch": epoch,
            "proof": proof.to_json(),
            "checkpoint": checkpoint.to_json(),
            "checkpoint_entry": checkpoint.entry.entry_id,
        }

    # -- auditing --------------------------------------------------------------------------

    def verify(self) -> dict[str, Any]:
        """Re-check everything from the stored bytes: every signature and fault proof, the
        balances (refolded and compared), conservation of supply, and every checkpoint."""
        problems: list[str] = []
        with self._lock:  # the rows and the state they are compared with, at one instant
            integrity = self._db.execute("PRAGMA integrity_check").fetchone()[0]
            if integrity != "ok":
                problems.append(f"sqlite integrity check: {integrity}")
            rows = self._db.execute(
                "SELECT id, kind, at, rank, payer, payee, amount, claim, wire FROM entries"
            ).fetchall()
            current = self.state().copy()
        events: list[Event] = []
        keys: dict[str, tuple[tuple[float, str], bytes]] = {}
        bls_entries: list[Entry] = []
        counts: dict[str, int] = {}
        decoded = _decode_many([bytes(row[-1]) for row in rows], self.genesis_hash)
        for (entry_id, kind, at, rank, payer, payee, amount, claim, wire), entry in zip(
            rows, decoded, strict=True
        ):
            counts[kind] = counts.get(kind, 0) + 1
            if blake3.blake3(bytes(wire)).hexdigest() != entry_id:
                problems.append(f"entry {entry_id[:16]}: bytes do not match its ID")
                continue
            if not isinstance(entry, Entry):
                problems.append(f"entry {entry_id[:16]} ({kind}): {entry}")
                continue
            stored = (kind, at, rank, payer, payee, amount, claim)
            derived = (
                entry.kind, entry.at, entry.rank, entry.payer, entry.payee, entry.amount,
                entry.claim,
            )  # fmt: skip
            if stored != derived:
                problems.append(f"entry {entry_id[:16]}: stored columns disagree with its bytes")
            if entry.kind == "stake":
                order = (entry.at, entry.entry_id)
                if entry.payer not in keys or order < keys[entry.payer][0]:
                    keys[entry.payer] = (order, entry.bls_key)
            if entry.kind in _FOLD_KINDS:
                events.append(_event(entry))
            elif entry.kind in ("vote", "checkpoint"):
                bls_entries.append(entry)
        checkpoints_by_epoch: dict[int, list[CheckpointLeaves]] = {}
        for entry in bls_entries:  # every BLS signature, against keys from the stored stakes
            signer_keys = [keys.get(s, (None, None))[1] for s in entry.signers]
            message = checkpoint_message(self.genesis_hash, entry.epoch, entry.claim, entry.count)
            if any(k is None for k in signer_keys):
                problems.append(f"{entry.kind} {entry.entry_id[:16]}: signer has not staked")
            elif not self.bls.fast_aggregate_verify(
                [k for k in signer_keys if k], message, entry.signature
            ):
                problems.append(f"{entry.kind} {entry.entry_id[:16]}: BLS signature is bad")
            elif entry.kind == "checkpoint":
                checkpoints_by_epoch.setdefault(entry.epoch, []).append(
                    CheckpointLeaves(
                        entry.entry_id, entry.epoch, entry.signers, frozenset(entry.leaves)
                    )
                )
        refolded = fold(self.genesis, events, checkpoints_by_epoch)
        if (refolded.balances, refolded.stakes, refolded.burned) != (
            current.balances,
            current.stakes,
            current.burned,
        ):
            problems.append("balances held in memory differ from a refold of the entries")
        if refolded.total() != self.genesis.supply:
            problems.append(
                f"supply not conserved: {refolded.total()} != genesis {self.genesis.supply}"
            )
        checkpoints = []
        for info in self.checkpoints():
            reason = self._check_aggregate(info.entry)
            checkpoints.append({**info.to_json(), "signature_ok": reason is None})
        return {
            "ok": not problems,
            "problems": problems[:100],
            "final_epochs": len(refolded.final_epochs),
            "late_entries": refolded.late,
            "entries": counts,
            "supply": self.genesis.supply,
            "total": refolded.total(),
            "burned": refolded.burned,
            "checkpoints": checkpoints,
        }


#: Signature checks release the GIL: a large batch is decoded on a few threads (1.7x on two
#: cores, measured in benchmarks/bench_ledger.py).
_DECODERS = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="ledger")
_PARALLEL_FROM = 64


def _decode_one(wire: bytes, genesis_hash: str) -> Entry | str:
    try:
        return decode_entry(wire, genesis_hash)
    except RecordError as exc:
        return str(exc)
    except Exception as exc:  # a hostile entry costs its sender, nothing more
        return f"undecodable entry: {type(exc).__name__}"


def _decode_many(wires: list[bytes], genesis_hash: str) -> list[Entry | str]:
    """Decode and verify entries, in order; an error message in place of each invalid one."""
    if len(wires) < _PARALLEL_FROM or _DECODERS._max_workers < 2:
        return [_decode_one(w, genesis_hash) for w in wires]
    size = -(-len(wires) // _DECODERS._max_workers)
    chunks = [wires[i : i + size] for i in range(0, len(wires), size)]
    done = _DECODERS.map(lambda chunk: [_decode_one(w, genesis_hash) for w in chunk], chunks)
    return [outcome for chunk in done for outcome in chunk]


def _event(entry: Entry) -> Event:
    return Event(
        entry.at,
        entry.rank,
        entry.entry_id,
        entry.kind,
        entry.payer,
        entry.payee,
        entry.amount,
        entry.claim,
    )
