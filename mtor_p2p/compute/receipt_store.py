"""Receipts and fault proofs kept on disk (SQLite, WAL) in the node's data directory.

Only verified records go in; inserting the same receipt twice changes nothing, and a complete
(countersigned) receipt replaces its own worker-only half. Receipts are keyed by job, shard,
worker, requester and body (:func:`store_key`): a ``redundant`` job pays two workers for every
shard, and a requester keeps both receipts; a worker keeps each requester's apart, job IDs
being theirs to choose, and each run of a shard apart, each being paid. (Keyed by job and
shard alone until 2026-12-06, the second receipt overwrote or was refused by the first; a
file's keys of an older form are rewritten when it is opened for writing.)

Receipts are group-committed (:class:`~mtor_p2p.compute.group_commit.GroupCommit`,
:meth:`ReceiptStore.add_async`): each
caller waits for the commit that holds its receipt, and a commit takes every receipt that
arrived while the one before it was being written. A burst of N receipts costs one or two
``synchronous=FULL`` commits (fsyncs) instead of N, and nothing is acknowledged before it is on
disk: a worker answers "stored" to a countersign only after that commit.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mtor_p2p.compute.group_commit import GroupCommit
from mtor_p2p.config import private_sqlite, read_only_sqlite, sqlite_transaction
from mtor_p2p.records.receipts import Receipt, decode_receipt, parse_receipt, verify_receipt
from mtor_p2p.runtime import BlockingRunner
from mtor_p2p.wire import RecordError

SCHEMA = """
CREATE TABLE IF NOT EXISTS receipts (
    receipt_id TEXT PRIMARY KEY,      -- job_id:shard:worker:requester:body (store_key)
    job_id     TEXT NOT NULL,
    worker     TEXT NOT NULL,
    requester  TEXT NOT NULL,
    complete   INTEGER NOT NULL,
    ended      REAL NOT NULL,
    encoded    BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS receipts_job ON receipts(job_id);
CREATE TABLE IF NOT EXISTS fault_proofs (
    proof_id   TEXT PRIMARY KEY,      -- job_id:shard:worker
    worker     TEXT NOT NULL,
    encoded    BLOB NOT NULL
);
"""


log = logging.getLogger(__name__)

#: The receipt store's file in a node's data directory.
RECEIPTS_FILE_NAME = "receipts.sqlite"


def store_key(receipt: Receipt) -> str:
    """A receipt's key in the store: its job, shard, worker and requester, and a hash of its
    body (``job_id:shard:worker:requester:body``).

    - The requester is part of it because a job ID is the requester's own hash, which a
      worker cannot check: another requester reusing it must not take the place of the first
      one's receipt (and of its ledger entry).
    - The body's hash is part of it because each run of a shard is owed and paid on its own
      (the worker reserves it by job, shard and start): a requester running one shard again
      on one worker must pay for every run, where a key without the run made every later
      receipt "not new", left out of the worker's ledger while its reservation was released
      (a hostile review, 2026-12-06). The same body countersigned again (other signature
      bytes) keeps its key: not another payment.
    """
    body = receipt.body
    digest = hashlib.blake2b(body.canonical(), digest_size=16).hexdigest()
    return f"{receipt.receipt_id}:{body.worker}:{body.requester}:{digest}"


#: Rows keyed in an older form, rekeyed when a file is opened: ``job_id:shard`` (before
#: 2026-12-06), ``job_id:shard:worker`` and ``job_id:shard:worker:requester`` (on 2026-12-06),
#: also when written by such a version into a file rekeyed since. Peer IDs, job IDs and
#: digests hold no colon, so a key of the current form has four.
_OLD_KEYS = "SELECT rowid FROM receipts WHERE receipt_id NOT LIKE '%:%:%:%:%'"


def _stored_receipt(encoded: object) -> Receipt | None:
    """The receipt a row's bytes hold (parsed, signatures unchecked: a local file), or None
    for a row that holds none (hand-made, or another type than bytes)."""
    if not isinstance(encoded, bytes):
        return None
    try:
        return parse_receipt(encoded)
    except (ValueError, TypeError):  # RecordError among the first
        return None


def _rekey(db: sqlite3.Connection) -> None:
    """Give every row keyed in an older form its :func:`store_key`, and its other columns,
    from the receipt's own bytes. A receipt held under two keys (a restored or hand-merged
    file) is kept once, its more complete copy as its bytes say, so a rekey never fails on
    the primary key and a node starts; a row whose bytes hold no receipt is left as it is.
    Row by row: a file's old rows are not all held in memory at once."""
    for (rowid,) in db.execute(_OLD_KEYS).fetchall():
        row = db.execute("SELECT encoded FROM receipts WHERE rowid = ?", (rowid,)).fetchone()
        receipt = None if row is None else _stored_receipt(row[0])
        if receipt is None:
            continue
        new_key = store_key(receipt)
        twin = db.execute(
            "SELECT rowid, encoded FROM receipts WHERE receipt_id = ?", (new_key,)
        ).fetchone()
        if twin is not None:
            held = _stored_receipt(twin[1])
            if held is not None and held.complete >= receipt.complete:
                db.execute("DELETE FROM receipts WHERE rowid = ?", (rowid,))
                continue
            db.execute("DELETE FROM receipts WHERE rowid = ?", (twin[0],))
        body = receipt.body
        db.execute(
            "UPDATE receipts SET receipt_id = ?, job_id = ?, worker = ?, requester = ?,"
            " complete = ?, ended = ? WHERE rowid = ?",
            (new_key, body.job_id, body.worker, body.requester, int(receipt.complete),
             body.ended, rowid),
        )  # fmt: skip


class ReceiptStore:
    """A SQLite file of verified receipts and fault proofs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # 0600 before SQLite opens it: its -wal and -shm files then get the same mode.
        private_sqlite(path)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # an acknowledged receipt survives a crash
        self._db.executescript(SCHEMA)
        if self._db.execute(_OLD_KEYS + " LIMIT 1").fetchone() is not None:
            with sqlite_transaction(self._db):
                _rekey(self._db)
        self._writers: dict[int, GroupCommit[Receipt, bool]] = {}
        # Writes run on worker threads, from a group-commit writer that outlives the node's
        # tasks: close() must wait for a write in progress (closing a connection in use
        # crashes the process).
        self._lock = threading.Lock()

    def add(self, receipt: Receipt) -> bool:
        """Verify and store ``receipt``; True if it changed the store."""
        result = self.add_many([receipt])[0]
        if isinstance(result, BaseException):
            try:
                raise result
            finally:  # raised, the error's traceback holds this frame: not the reverse
                result = False
        return result

    def add_many(self, receipts: list[Receipt]) -> list[bool | Exception]:
        """Verify and store ``receipts`` in one transaction (one commit); for each, True if it
        changed the store, False if not, or the exception that refused it (it alone)."""
        results: list[bool | Exception] = []
        with self._lock, sqlite_transaction(self._db):
            for receipt in receipts:
                try:
                    verify_receipt(receipt, require_complete=False)
                except Exception as exc:
                    # Without its traceback, which holds this frame and so ``results``.
                    results.append(exc.with_traceback(None))
                    continue
                results.append(self._insert(receipt))
        return results

    def _insert(self, receipt: Receipt) -> bool:
        body = receipt.body
        key = store_key(receipt)
        held = self._db.execute(
            "SELECT complete FROM receipts WHERE receipt_id = ?", (key,)
        ).fetchone()
        if held is not None and (held[0] or not receipt.complete):
            return False
        self._db.execute(
            "INSERT OR REPLACE INTO receipts VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                key,
                body.job_id,
                body.worker,
                body.requester,
                int(receipt.complete),
                body.ended,
                receipt.encode(),
            ),
        )
        return True

    def group_commit(self, run_blocking: BlockingRunner) -> GroupCommit[Receipt, bool]:
        """A :class:`GroupCommit` of :meth:`add_many` (one per store and runtime)."""
        writer = self._writers.get(id(run_blocking))
        if writer is None:
            writer = self._writers[id(run_blocking)] = GroupCommit(self.add_many, run_blocking)
        return writer

    async def add_async(self, receipt: Receipt, run_blocking: BlockingRunner) -> bool:
        """:meth:`add`, group-committed with every other receipt arriving meanwhile; returns
        once the receipt is on disk (raises RecordError if it does not verify)."""
        return await self.group_commit(run_blocking).submit(receipt)

    def add_fault_proof(self, proof_id: str, worker: str, encoded: bytes) -> bool:
        """Store an (already checked) fault proof; True if it was new."""
        with self._lock, self._db:
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO fault_proofs VALUES (?, ?, ?)", (proof_id, worker, encoded)
            )
        return cursor.rowcount > 0

    def receipts(self, *, limit: int = 1000, job_id: str | None = None) -> list[Receipt]:
        """Stored receipts, newest first."""
        # Reads take the lock too: on the one connection, a batch being written is visible
        # before its commit (and may yet be rolled back).
        with self._lock:
            if job_id is None:
                rows = self._db.execute(
                    "SELECT encoded FROM receipts ORDER BY ended DESC LIMIT ?", (limit,)
                ).fetchall()
            else:
                rows = self._db.execute(
                    "SELECT encoded FROM receipts WHERE job_id = ? ORDER BY ended DESC LIMIT ?",
                    (job_id, limit),
                ).fetchall()
        return _decoded_rows(rows, self.path)[0]

    def fault_proofs(self) -> list[tuple[str, str, bytes]]:
        """Stored fault proofs as (proof_id, worker, encoded)."""
        with self._lock:
            rows = self._db.execute("SELECT proof_id, worker, encoded FROM fault_proofs").fetchall()
        return [(r[0], r[1], bytes(r[2])) for r in rows]

    def count(self) -> int:
        """Number of stored receipts."""
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM receipts").fetchone()[0])

    def report(self, *, limit: int) -> dict[str, Any]:
        """The newest ``limit`` receipts and the count, as the control API returns them."""
        with self._lock:
            held, skipped = _newest_receipts(self._db, limit, self.path)
        return receipts_report(held, self.count(), skipped=skipped)

    @staticmethod
    def read_only_report(path: Path, *, limit: int) -> dict[str, Any]:
        """:meth:`report` of the store saved at ``path``, written nothing to (a stopped
        node's receipts, through :func:`~mtor_p2p.config.read_only_sqlite`); raises
        ``sqlite3.Error`` if the file cannot be read. Rows that hold no receipt are skipped
        and counted, as the running node's listing does."""
        db = read_only_sqlite(path)
        try:
            held, skipped = _newest_receipts(db, limit, path)
            count = int(db.execute("SELECT COUNT(*) FROM receipts").fetchone()[0])
        finally:
            db.close()
        return receipts_report(held, count, skipped=skipped)

    def close(self) -> None:
        """Close the database (after any write in progress)."""
        with self._lock:
            self._db.close()


#: Rows that hold no receipt passed over by one listing at most (a damaged file's).
MAX_SKIPPED_ROWS = 10_000


def _decoded_rows(
    rows: Iterable[tuple[Any, ...]], path: Path, limit: int | None = None
) -> tuple[list[Receipt], int]:
    """The receipts in stored rows (each row's first column; at most ``limit``), and how many
    rows held none (at most MAX_SKIPPED_ROWS are passed over).

    Only a hand-edited or damaged file holds such a row: the node's listing, its earnings, its
    dashboard and the offline listing go on without it, and the log says so. They do not use
    up ``limit``: a listing of the newest receipt shows one while there is one."""
    held = []
    skipped = 0
    for row in rows:
        if (limit is not None and len(held) >= limit) or skipped >= MAX_SKIPPED_ROWS:
            break
        encoded = row[0]
        try:
            if not isinstance(encoded, bytes):  # bytes(an integer) would allocate it
                raise RecordError(f"a stored receipt is {type(encoded).__name__}")
            held.append(decode_receipt(encoded, require_complete=False))
        except ValueError as exc:  # RecordError among them
            skipped += 1
            log.warning("receipt store %s: a row skipped, not a receipt: %s", path, exc)
    return held, skipped


def _newest_receipts(db: sqlite3.Connection, limit: int, path: Path) -> tuple[list[Receipt], int]:
    """The newest ``limit`` receipts in ``db`` and the rows passed over on the way (read one
    at a time: no more rows in memory than it takes)."""
    cursor = db.execute("SELECT encoded FROM receipts ORDER BY ended DESC")
    try:
        return _decoded_rows(cursor, path, limit)
    finally:
        cursor.close()


def receipts_report(receipts: list[Receipt], count: int, *, skipped: int = 0) -> dict[str, Any]:
    """Receipts in the control API's shape: each body, its cost in credits, whether both
    sides signed, and its ledger entry ID (``mtor-peer ledger prove`` takes it) once they
    have; ``count``: all rows held; ``skipped``: rows passed over on the way to these because
    they hold no receipt (a damaged or hand-edited file)."""
    from mtor_p2p.ledger.entries import receipt_entry_id

    return {
        "count": count,
        "skipped": skipped,
        "receipts": [
            {
                **r.body.to_json(),
                "cost": r.body.cost,
                "complete": r.complete,
                "entry": receipt_entry_id(r) if r.complete else None,
            }
            for r in receipts
        ],
    }
