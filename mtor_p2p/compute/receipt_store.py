"""Receipts and fault proofs kept on disk (SQLite, WAL) in the node's data directory.

Only verified records go in; inserting the same receipt twice changes nothing, and a complete
(countersigned) receipt replaces the worker-only half of the same shard.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from mtor_p2p.config import private_sqlite
from mtor_p2p.records.receipts import Receipt, decode_receipt, verify_receipt

SCHEMA = """
CREATE TABLE IF NOT EXISTS receipts (
    receipt_id TEXT PRIMARY KEY,      -- job_id:shard
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

    def add(self, receipt: Receipt) -> bool:
        """Verify and store ``receipt``; True if it changed the store."""
        verify_receipt(receipt, require_complete=False)
        body = receipt.body
        with self._db:
            held = self._db.execute(
                "SELECT complete FROM receipts WHERE receipt_id = ?", (receipt.receipt_id,)
            ).fetchone()
            if held is not None and (held[0] or not receipt.complete):
                return False
            self._db.execute(
                "INSERT OR REPLACE INTO receipts VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    receipt.receipt_id,
                    body.job_id,
                    body.worker,
                    body.requester,
                    int(receipt.complete),
                    body.ended,
                    receipt.encode(),
                ),
            )
        return True

    def add_fault_proof(self, proof_id: str, worker: str, encoded: bytes) -> bool:
        """Store an (already checked) fault proof; True if it was new."""
        with self._db:
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO fault_proofs VALUES (?, ?, ?)", (proof_id, worker, encoded)
            )
        return cursor.rowcount > 0

    def receipts(self, *, limit: int = 1000, job_id: str | None = None) -> list[Receipt]:
        """Stored receipts, newest first."""
        if job_id is None:
            rows = self._db.execute(
                "SELECT encoded FROM receipts ORDER BY ended DESC LIMIT ?", (limit,)
            )
        else:
            rows = self._db.execute(
                "SELECT encoded FROM receipts WHERE job_id = ? ORDER BY ended DESC LIMIT ?",
                (job_id, limit),
            )
        return [decode_receipt(bytes(row[0]), require_complete=False) for row in rows]

    def fault_proofs(self) -> list[tuple[str, str, bytes]]:
        """Stored fault proofs as (proof_id, worker, encoded)."""
        rows = self._db.execute("SELECT proof_id, worker, encoded FROM fault_proofs")
        return [(r[0], r[1], bytes(r[2])) for r in rows]

    def count(self) -> int:
        """Number of stored receipts."""
        return int(self._db.execute("SELECT COUNT(*) FROM receipts").fetchone()[0])

    def close(self) -> None:
        """Close the database."""
        self._db.close()
