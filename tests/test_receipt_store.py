"""The receipt store keeps one receipt per job, shard and worker: a ``redundant`` job pays two
workers for each shard, and its requester keeps both receipts (real SQLite files)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from mtor_p2p.compute.receipt_store import SCHEMA_VERSION, ReceiptStore, store_key
from mtor_p2p.identity import Identity
from mtor_p2p.records.receipts import Receipt, countersign, sign_as_worker
from tests.test_receipts import REQUESTER, WORKER, body

OTHER_WORKER = Identity(b"\x03" * 32)


def paid_by(worker: Identity, **changes: object) -> Receipt:
    return countersign(REQUESTER, sign_as_worker(worker, body(worker=worker.peer_id, **changes)))


def test_both_workers_of_a_redundant_shard_are_kept(tmp_path: Path) -> None:
    store = ReceiptStore(tmp_path / "receipts.sqlite")
    first, second = paid_by(WORKER), paid_by(OTHER_WORKER)
    assert first.receipt_id == second.receipt_id  # the same job and shard
    assert store.add(first) and store.add(second)
    assert not store.add(second)  # the same receipt again changes nothing
    held = store.receipts(job_id=first.body.job_id)
    assert {r.body.worker for r in held} == {WORKER.peer_id, OTHER_WORKER.peer_id}
    assert store.count() == 2
    store.close()


def test_a_complete_receipt_still_replaces_its_own_worker_half_only(tmp_path: Path) -> None:
    store = ReceiptStore(tmp_path / "receipts.sqlite")
    half = sign_as_worker(WORKER, body())
    assert store.add(half)
    assert store.add(paid_by(OTHER_WORKER))  # another worker's receipt for the shard
    assert store.add(countersign(REQUESTER, half))  # completes the first worker's
    assert not store.add(half)  # a worker half never replaces a complete receipt
    held = {r.body.worker: r.complete for r in store.receipts()}
    assert held == {WORKER.peer_id: True, OTHER_WORKER.peer_id: True}
    store.close()


def test_a_file_keyed_by_job_and_shard_alone_is_rekeyed_when_opened(tmp_path: Path) -> None:
    """A file written before the worker was part of the key (user_version 0, keys
    ``job_id:shard``) is rewritten once: its receipts stay, and a complete receipt for a
    worker-only half it holds replaces that half instead of sitting beside it."""
    path = tmp_path / "receipts.sqlite"
    store = ReceiptStore(path)
    half = sign_as_worker(WORKER, body())
    store.add(half)
    store.close()
    db = sqlite3.connect(path)
    with db:
        db.execute("UPDATE receipts SET receipt_id = ?", (half.receipt_id,))  # the old key
        db.execute("PRAGMA user_version = 0")
    db.close()

    store = ReceiptStore(path)
    assert store.add(countersign(REQUESTER, half))
    assert store.count() == 1 and store.receipts()[0].complete
    store.close()
    db = sqlite3.connect(path)
    keys = [row[0] for row in db.execute("SELECT receipt_id FROM receipts")]
    version = db.execute("PRAGMA user_version").fetchone()[0]
    db.close()
    assert keys == [store_key(half)] and version == SCHEMA_VERSION
