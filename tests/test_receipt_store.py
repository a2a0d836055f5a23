"""The receipt store keeps one receipt per job, shard, worker, requester and run: a ``redundant``
job pays two workers for each shard, and its requester keeps both receipts; a worker keeps two
requesters' receipts apart even under one job ID, and each run of a shard apart (real SQLite
files)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

from mtor_p2p.compute.receipt_store import ReceiptStore, store_key
from mtor_p2p.identity import Identity
from mtor_p2p.records.receipts import Receipt, countersign, sign_as_worker
from tests.test_receipts import REQUESTER, WORKER, body

OTHER_WORKER = Identity(b"\x03" * 32)
OTHER_REQUESTER = Identity(b"\x04" * 32)


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


def job_and_shard(receipt: Receipt) -> str:
    """The key of before 2026-12-06."""
    return receipt.receipt_id


def job_shard_and_worker(receipt: Receipt) -> str:
    """A key of 2026-12-06 (one requester's receipt could stand in for another's)."""
    return f"{receipt.receipt_id}:{receipt.body.worker}"


def job_shard_worker_and_requester(receipt: Receipt) -> str:
    """A key of 2026-12-06 (a shard's second run could not be stored beside its first)."""
    return f"{receipt.receipt_id}:{receipt.body.worker}:{receipt.body.requester}"


def old_keyed(
    path: Path, *receipts: Receipt, key: Callable[[Receipt], str] = job_and_shard
) -> None:
    """Write ``receipts`` into the file at ``path`` under an older form of key, as a version
    from then did (also into a file rekeyed since)."""
    db = sqlite3.connect(path)
    with db:
        for receipt in receipts:
            body = receipt.body
            db.execute(
                "INSERT OR REPLACE INTO receipts VALUES (?, ?, ?, ?, ?, ?, ?)",
                (key(receipt), body.job_id, body.worker, body.requester,
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


def test_two_requesters_under_one_job_id_keep_their_own_receipts_at_a_worker(
    tmp_path: Path,
) -> None:
    """A job ID is the requester's own hash, which a worker cannot check. Another requester
    reusing one (seen in a receipt) and countersigning first must not make the worker refuse
    the first requester's receipt as "not new": the worker would answer "stored: false" and
    leave its payment out of the ledger (a hostile review, 2026-12-06)."""
    store = ReceiptStore(tmp_path / "receipts.sqlite")
    hostile = countersign(
        OTHER_REQUESTER, sign_as_worker(WORKER, body(requester=OTHER_REQUESTER.peer_id))
    )
    honest = paid_by(WORKER)
    assert hostile.receipt_id == honest.receipt_id  # the same job ID and shard
    assert store.add(hostile)
    assert store.add(honest)  # new here: stored, and entered into the ledger by the worker
    assert {r.body.requester for r in store.receipts()} == {
        REQUESTER.peer_id,
        OTHER_REQUESTER.peer_id,
    }
    store.close()


def test_a_file_keyed_in_every_older_form_is_rekeyed_with_twins_kept_once(
    tmp_path: Path,
) -> None:
    """Keys of the forms of 2026-12-06 (``job_id:shard:worker``, ``…:requester``) and of before
    (``job_id:shard``) in one file, two of them one receipt's halves: each is rekeyed, the
    complete copy kept."""
    path = tmp_path / "receipts.sqlite"
    half = sign_as_worker(WORKER, body())
    complete = countersign(REQUESTER, half)
    other = paid_by(OTHER_WORKER, shard=5)
    third = paid_by(OTHER_WORKER, shard=6)
    ReceiptStore(path).close()
    old_keyed(path, half, other, key=job_shard_and_worker)
    old_keyed(path, third, key=job_shard_worker_and_requester)
    old_keyed(path, complete)
    assert len(keys_of(path)) == 4

    store = ReceiptStore(path)
    assert keys_of(path) == sorted([store_key(complete), store_key(other), store_key(third)])
    assert all(r.complete for r in store.receipts())
    store.close()


def test_a_row_that_names_no_receipt_does_not_stop_a_rekey(tmp_path: Path) -> None:
    """A hand-made row (a key without colons, bytes that are no receipt) is left as it is;
    the rows around it are rekeyed and the store opens."""
    path = tmp_path / "receipts.sqlite"
    ReceiptStore(path).close()
    db = sqlite3.connect(path)
    with db:
        db.execute("INSERT INTO receipts VALUES ('handmade', 'x', 'y', 'z', 1, 0.0, X'00ff')")
    db.close()
    receipt = paid_by(WORKER)
    old_keyed(path, receipt)

    store = ReceiptStore(path)
    assert keys_of(path) == sorted(["handmade", store_key(receipt)])
    assert store.add(paid_by(WORKER, shard=9))
    # The listing goes on without it (the earnings and the dashboard read it too).
    assert {r.body.shard for r in store.receipts()} == {receipt.body.shard, 9}
    store.close()


def test_each_run_of_a_shard_is_kept_and_a_run_signed_again_is_not(tmp_path: Path) -> None:
    """Two runs of one shard by one worker for one requester are two receipts (each is paid);
    one run's receipt countersigned again is the same receipt."""
    store = ReceiptStore(tmp_path / "receipts.sqlite")
    first = paid_by(WORKER, started=1_800_000_000.0, ended=1_800_000_000.5)
    again = paid_by(WORKER, started=1_800_000_010.0, ended=1_800_000_010.5)
    assert first.receipt_id == again.receipt_id
    assert store.add(first) and store.add(again)
    assert not store.add(paid_by(WORKER, started=1_800_000_000.0, ended=1_800_000_000.5))
    assert store.count() == 2
    store.close()


def test_a_rekey_goes_by_what_the_bytes_say_not_the_columns(tmp_path: Path) -> None:
    """An old row's columns are not trusted: a countersigned receipt whose row says
    "incomplete" still wins over its worker half, and the rekeyed row's columns come from its
    bytes (``receipts(job_id=…)`` filters on them)."""
    path = tmp_path / "receipts.sqlite"
    half = sign_as_worker(WORKER, body())
    complete = countersign(REQUESTER, half)
    store = ReceiptStore(path)
    store.add(half)
    store.close()
    db = sqlite3.connect(path)
    with db:
        db.execute(
            "INSERT INTO receipts VALUES (?, 'wrong-job', 'x', 'y', 0, 0.0, ?)",
            (complete.receipt_id, complete.encode()),
        )
    db.close()

    store = ReceiptStore(path)
    [held] = store.receipts(job_id=complete.body.job_id)
    assert held.complete
    store.close()


def test_rows_of_other_types_do_not_stop_a_store_opening(tmp_path: Path) -> None:
    """A hand-edited file: an old row whose bytes are an integer, and an old twin whose
    "complete" is text. The store opens; the receipt is kept once."""
    path = tmp_path / "receipts.sqlite"
    receipt = paid_by(WORKER)
    ReceiptStore(path).close()
    db = sqlite3.connect(path)
    with db:
        db.execute("INSERT INTO receipts VALUES ('a:1', 'j', 'w', 'r', 1, 0.0, ?)", (2**63 - 1,))
        db.execute(
            "INSERT INTO receipts VALUES (?, 'j', 'w', 'r', 'yes', 0.0, ?)",
            (receipt.receipt_id, receipt.encode()),
        )
    db.close()
    old_keyed(path, receipt, key=job_shard_and_worker)

    store = ReceiptStore(path)
    assert keys_of(path) == sorted(["a:1", store_key(receipt)])
    assert [r.body.shard for r in store.receipts()] == [receipt.body.shard]  # no 2**63 bytes
    store.close()
