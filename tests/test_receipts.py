"""Contribution receipts: both signatures verify, and any altered field breaks them."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtor_p2p.identity import Identity
from mtor_p2p.records.receipts import (
    MAX_RECEIPT_BYTES,
    Receipt,
    ReceiptBody,
    countersign,
    decode_receipt,
    parse_receipt,
    sign_as_worker,
    verify_receipt,
)
from mtor_p2p.wire import RecordError, canonical_json

WORKER = Identity(b"\x01" * 32)
REQUESTER = Identity(b"\x02" * 32)


def body(**changes: object) -> ReceiptBody:
    fields: dict[str, object] = {
        "job_id": "ab" * 32,
        "shard": 3,
        "kernel": "matmul",
        "inputs": {"a": "01" * 32, "b": "02" * 32},
        "output": "03" * 32,
        "flops": 2 * 512**3,
        "started": 1_800_000_000.0,
        "ended": 1_800_000_000.5,
        "worker": WORKER.peer_id,
        "requester": REQUESTER.peer_id,
        "price": 1.5,
    }
    fields.update(changes)
    return ReceiptBody(**fields)  # type: ignore[arg-type]


def complete_receipt(**changes: object) -> Receipt:
    return countersign(REQUESTER, sign_as_worker(WORKER, body(**changes)))


def test_complete_receipt_round_trips_and_verifies():
    receipt = complete_receipt()
    decoded = decode_receipt(receipt.encode())
    assert decoded == receipt
    assert decoded.complete
    assert decoded.body.cost == pytest.approx(1.5 * 2 * 512**3 / 1e12)
    # What the ledger moves, in credits: a tiny paid shard still costs one nano-credit.
    assert decoded.body.cost == decoded.body.cost_nano / 1e9
    tiny = dataclasses.replace(decoded.body, flops=2 * 64 * 32 * 8, price=0.01)
    assert tiny.cost_nano == 1 and tiny.cost == 1e-9
    assert decoded.encode() == receipt.encode()  # one encoding per receipt


def test_worker_half_is_not_complete():
    half = sign_as_worker(WORKER, body())
    assert decode_receipt(half.encode(), require_complete=False) == half
    with pytest.raises(RecordError, match="not countersigned"):
        decode_receipt(half.encode())


def test_only_the_named_peers_can_sign():
    with pytest.raises(RecordError, match="worker"):
        sign_as_worker(REQUESTER, body())
    with pytest.raises(RecordError, match="requester"):
        countersign(WORKER, sign_as_worker(WORKER, body()))


ALTERATIONS = {
    "job_id": "cd" * 32,
    "shard": 4,
    "kernel": "mlp",
    "inputs": {"a": "01" * 32, "b": "04" * 32},
    "output": "05" * 32,
    "flops": 1,
    "started": 1_700_000_000.0,
    "ended": 1_800_000_001.0,
    "worker": Identity(b"\x03" * 32).peer_id,
    "requester": Identity(b"\x04" * 32).peer_id,
    "price": 0.1,
}


@pytest.mark.parametrize("field", sorted(ALTERATIONS))
def test_altering_any_field_breaks_the_signatures(field):
    receipt = complete_receipt()
    altered = dataclasses.replace(
        receipt, body=dataclasses.replace(receipt.body, **{field: ALTERATIONS[field]})
    )
    with pytest.raises(RecordError, match="signature"):
        verify_receipt(altered)
    with pytest.raises(RecordError, match="signature"):
        decode_receipt(altered.encode())


def test_altered_bytes_fail_and_swapped_signatures_fail():
    receipt = complete_receipt()
    obj = json.loads(receipt.encode())
    obj["b"]["price"] = 99.0
    with pytest.raises(RecordError, match="signature"):
        decode_receipt(canonical_json(obj))
    obj = json.loads(receipt.encode())
    obj["w"], obj["r"] = obj["r"], obj["w"]
    with pytest.raises(RecordError, match="signature"):
        decode_receipt(canonical_json(obj))


def test_countersignature_binds_the_worker_signature():
    first = complete_receipt()
    # Re-signing by the worker gives the same bytes (Ed25519 is deterministic), so build a
    # receipt whose worker signature differs: a different body, then graft the signatures.
    other = complete_receipt(shard=9)
    grafted = Receipt(first.body, first.worker_signature, other.requester_signature)
    with pytest.raises(RecordError, match="requester signature"):
        verify_receipt(grafted)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("job_id", "XYZ"),
        ("shard", -1),
        ("flops", True),
        ("price", -2),
        ("ended", 1_799_999_999.0),
        ("inputs", {}),
        ("worker", "not-a-peer-id"),
    ],
)
def test_malformed_bodies_are_rejected(field, value):
    obj = json.loads(complete_receipt().encode())
    obj["b"][field] = value
    with pytest.raises(RecordError):
        decode_receipt(canonical_json(obj))


def test_non_canonical_and_oversized_receipts_are_rejected():
    raw = complete_receipt().encode()
    with pytest.raises(RecordError, match="canonical"):
        decode_receipt(json.dumps(json.loads(raw), indent=1).encode())
    with pytest.raises(RecordError, match="limit"):
        decode_receipt(b" " * (MAX_RECEIPT_BYTES + 1))


@settings(max_examples=60, deadline=None)
@given(
    shard=st.integers(min_value=0, max_value=2**40),
    flops=st.integers(min_value=0, max_value=2**62),
    price=st.floats(min_value=0, max_value=1e6, allow_nan=False),
    kernel=st.text(min_size=1, max_size=64),
)
def test_any_valid_receipt_round_trips(shard, flops, price, kernel):
    receipt = complete_receipt(shard=shard, flops=flops, price=price, kernel=kernel)
    assert decode_receipt(receipt.encode()) == receipt


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ({"price": 1.6}, "charges"),
        ({"flops": 2 * 512**3 + 1}, "FLOPs"),
        ({"requester": WORKER.peer_id}, "another requester"),
        ({"started": 1_800_000_000.0 - 120}, "times"),
        ({"ended": 1_800_000_000.0 + 120}, "times"),
    ],
)
def test_requester_checks_the_workers_terms_before_countersigning(change, complaint):
    from mtor_p2p.compute.client import ShardTerms, WorkerMisbehaved

    terms = ShardTerms(
        requester=REQUESTER.peer_id,
        max_price=1.5,
        flops=2 * 512**3,
        sent_at=1_800_000_000.0,
        now=lambda: 1_800_000_001.0,
    )
    terms.check(sign_as_worker(WORKER, body()))  # the agreed terms pass
    terms.check(sign_as_worker(WORKER, body(price=1.0)))  # cheaper is fine
    with pytest.raises(WorkerMisbehaved, match=complaint):
        terms.check(sign_as_worker(WORKER, body(**change)))


@pytest.mark.parametrize("field", ["price", "started", "ended"])
def test_receipt_numbers_out_of_range_are_rejected(field):
    bad = complete_receipt(**{field: 1e300})
    with pytest.raises(RecordError, match="between"):
        decode_receipt(bad.encode())


def test_a_worker_signature_is_verified_once_per_receipt_and_never_skipped_unverified(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Countersigning a receipt whose worker signature was verified in this process does not
    verify it again (its object is immutable); one parsed but not verified, or built with a
    forged signature, is verified, and refused."""
    import mtor_p2p.records.receipts as receipts

    calls: list[bytes] = []
    real = receipts.verify_signature

    def counted(key: object, signature: bytes, message: bytes) -> bool:
        calls.append(signature)
        return real(key, signature, message)  # type: ignore[arg-type]

    monkeypatch.setattr(receipts, "verify_signature", counted)
    # A shard no other test signs: decode_receipt's cache has not seen these bytes.
    worker_half = sign_as_worker(WORKER, body(shard=987_654)).encode()
    received = decode_receipt(worker_half, require_complete=False)
    assert len(calls) == 1
    countersigned = countersign(REQUESTER, received)
    assert len(calls) == 1  # not again
    verify_receipt(countersigned)
    assert len(calls) == 2  # the requester's signature only

    parsed = parse_receipt(worker_half)  # fields only: no signature verified yet
    assert len(calls) == 2
    countersign(REQUESTER, parsed)
    assert len(calls) == 3

    forged = dataclasses.replace(received, worker_signature=bytes(64))
    with pytest.raises(RecordError, match="worker signature does not verify"):
        countersign(REQUESTER, forged)
    unverified = parse_receipt(forged.encode())
    with pytest.raises(RecordError, match="worker signature does not verify"):
        verify_receipt(unverified, require_complete=False)
    with pytest.raises(RecordError, match="worker signature does not verify"):
        verify_receipt(unverified, require_complete=False)  # and again: nothing was cached


def test_a_bodys_inputs_cannot_change_under_its_signatures() -> None:
    """(A hostile review's finding.) A body's canonical bytes are made once and both
    signatures cover them: its inputs are read-only, so a verified receipt cannot be
    countersigned over bytes that no longer say what its fields say."""
    receipt = sign_as_worker(WORKER, body())
    with pytest.raises(TypeError):
        receipt.body.inputs["a"] = "ff" * 32  # type: ignore[index]
    assert dict(receipt.body.inputs) == {"a": "01" * 32, "b": "02" * 32}
    assert dataclasses.replace(receipt.body, shard=4).inputs == receipt.body.inputs
