"""The receipt store keeps one receipt per job, shard and worker: a ``redundant`` job pays two
workers for each shard, and its requester keeps both receipts (real SQLite files)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from mtor_p2p.compute.receipt_store import ReceiptStore, store_key
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


def old_keyed(path: Path, *receipts: Receipt) -> None:
    """Write ``receipts`` into the file at ``path`` under the keys of before 2026-12-06
    (``job_id:shard``), as a version from then did (also into a file rekeyed since)."""
    db = sqlite3.connect(path)
    with db:
        for receipt in receipts:
            body = receipt.body
            db.execute(
                "INSERT OR REPLACE INTO receipts VALUES (?, ?, ?, ?, ?, ?, ?)",
                (receipt.receipt_id, body.job_id, body.worker, body.requester,
                 int(receipt.complete), body.ended, receipt.encode()),
            )  # fmt: skip
    db.close()


def keys_of(path: Path) -> list[str]:
    db = sqlite3.connect(path)
    keys = sorted(row[0] for row in db.execute("SELECT receipt_id FROM receipts"))
    db.close()
    return keys


def test_a_file_keyed_by_job_and_shard_alone_is_rekeyed_when_opened(tmp_path: Path) -> None:
    """A file with ``job_id:shard`` keys is rekeyed when opened: its receipts stay, and a
    complete receipt for a worker-only half it holds replaces that half instead of sitting
    beside it."""
    path = tmp_path / "receipts.sqlite"
    ReceiptStore(path).close()
    half = sign_as_worker(WORKER, body())
    old_keyed(path, half)
    store = ReceiptStore(path)
    assert keys_of(path) == [store_key(half)]
    assert store.add(countersign(REQUESTER, half))
    assert store.count() == 1 and store.receipts()[0].complete
    store.close()


def test_a_receipt_held_under_both_keys_keeps_its_complete_copy_and_the_node_starts(
    tmp_path: Path,
) -> None:
    """A file holding one receipt under its old and its new key (a version from before wrote
    into a rekeyed file, or files were merged): opening it must not fail on the primary key;
    the more complete copy stays, once."""
    path = tmp_path / "receipts.sqlite"
    half = sign_as_worker(WORKER, body())
    complete = countersign(REQUESTER, half)
    other_half = sign_as_worker(OTHER_WORKER, body(worker=OTHER_WORKER.peer_id, shard=4))
    other_complete = countersign(REQUESTER, other_half)
    store = ReceiptStore(path)
    store.add(half)  # new key, worker half; its complete copy under the old key
    store.add(other_complete)  # new key, complete; its worker half under the old key
    store.close()
    old_keyed(path, complete, other_half)
    assert len(keys_of(path)) == 4

    store = ReceiptStore(path)
    assert keys_of(path) == sorted([store_key(half), store_key(other_half)])
    held = {r.body.worker: r.complete for r in store.receipts()}
    assert held == {WORKER.peer_id: True, OTHER_WORKER.peer_id: True}
    store.close()
    ReceiptStore(path).close()  # nothing left to rekey: opens as it is
    assert keys_of(path) == sorted([store_key(half), store_key(other_half)])
