"""Capacity records: canonical, signed, versioned, size-limited; forged/stale/expired rejected."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtor_p2p.capacity.record import (
    MAX_CAPACITY_RECORD_BYTES,
    RECORD_TYPE,
    CapacityRecordValidator,
    Device,
    capacity_key,
    decode_capacity_record,
)
from mtor_p2p.identity import Identity
from mtor_p2p.ledger.names import LEDGER_RULES
from mtor_p2p.wire import RecordError, canonical_json, seal
from tests.conftest import make_record

NOW = 1_800_000_000.0


def test_valid_record_round_trips(identity):
    record = make_record(identity, now=NOW)
    decoded = decode_capacity_record(record.sign(identity), now=NOW + 1)
    assert decoded == record


def test_record_signed_by_another_key_is_rejected(identity):
    mallory = Identity.generate()
    record = make_record(identity, now=NOW)
    # Mallory signs a record that claims to describe `identity`.
    forged = seal(mallory, RECORD_TYPE, record.to_body())
    with pytest.raises(RecordError, match="different peer"):
        decode_capacity_record(forged, now=NOW)


def test_record_with_altered_body_is_rejected(identity):
    raw = make_record(identity, now=NOW, tflops=30.0).sign(identity)
    altered = raw.replace(b'"tflops":30.0', b'"tflops":90.0')
    assert altered != raw
    with pytest.raises(RecordError, match="signature"):
        decode_capacity_record(altered, now=NOW)


def test_record_of_other_type_cannot_be_replayed_as_capacity(identity):
    raw = seal(identity, "mtor/receipt", make_record(identity, now=NOW).to_body())
    with pytest.raises(RecordError, match="expected"):
        decode_capacity_record(raw, now=NOW)
    # Re-labelling the type breaks the signature, which covers it.
    relabelled = raw.replace(b'"t":"mtor/receipt"', b'"t":"mtor/capacity"')
    with pytest.raises(RecordError, match="signature"):
        decode_capacity_record(relabelled, now=NOW)


def test_expired_record_is_rejected(identity):
    raw = make_record(identity, now=NOW).sign(identity)
    with pytest.raises(RecordError, match="expired"):
        decode_capacity_record(raw, now=NOW + 61)


def test_record_from_the_future_is_rejected(identity):
    raw = make_record(identity, now=NOW + 3600, expires=NOW + 3601).sign(identity)
    with pytest.raises(RecordError, match="future"):
        decode_capacity_record(raw, now=NOW)


def test_overlong_lifetime_is_rejected(identity):
    raw = make_record(identity, now=NOW, expires=NOW + 7200).sign(identity)
    with pytest.raises(RecordError, match="lifetime"):
        decode_capacity_record(raw, now=NOW)


def test_oversized_record_is_rejected_on_both_sides(identity):
    device = Device(kind="gpu", name="g" * 128, mem_total=1, mem_free=1, driver="d" * 64)
    huge = make_record(
        identity, now=NOW, addrs=tuple("/x" * 128 for _ in range(16)), devices=(device,) * 16
    )
    with pytest.raises(RecordError, match="limit"):
        huge.sign(identity)
    body = make_record(identity, now=NOW).to_body()
    body["padding"] = "x" * MAX_CAPACITY_RECORD_BYTES
    with pytest.raises(RecordError, match="limit"):
        decode_capacity_record(seal(identity, RECORD_TYPE, body), now=NOW)


def test_unknown_or_missing_fields_are_rejected(identity):
    body = make_record(identity, now=NOW).to_body()
    body["extra"] = 1
    with pytest.raises(RecordError, match="unexpected"):
        decode_capacity_record(seal(identity, RECORD_TYPE, body), now=NOW)
    body = make_record(identity, now=NOW).to_body()
    del body["price"]
    with pytest.raises(RecordError, match="missing"):
        decode_capacity_record(seal(identity, RECORD_TYPE, body), now=NOW)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("load", 1.5),
        ("tflops", -1),
        ("seq", -1),
        ("seq", True),
        ("price", "free"),
        ("schema", 4),
        ("schema", True),
        ("schema", 3.0),
        ("schema", [3]),
        ("schema", {}),
        ("ledger_rules", 0),
        ("ledger_rules", True),
        ("ledger_rules", "2"),
        ("ledger_rules", 10**9),
        ("relay", "yes"),
        ("addrs", "not a list"),
        ("devices", [{"kind": "tpu"}]),
    ],
)
def test_out_of_range_fields_are_rejected(identity, field, value):
    body = make_record(identity, now=NOW).to_body()
    body[field] = value
    with pytest.raises(RecordError):
        decode_capacity_record(seal(identity, RECORD_TYPE, body), now=NOW)


def test_non_canonical_encoding_is_rejected(identity):
    raw = make_record(identity, now=NOW).sign(identity)
    spaced = json.dumps(json.loads(raw), sort_keys=True).encode()  # same content, other spacing
    with pytest.raises(RecordError, match="canonical"):
        decode_capacity_record(spaced, now=NOW)
    duplicated = raw[:-1] + b',"v":1}'
    with pytest.raises(RecordError, match="duplicate"):
        decode_capacity_record(duplicated, now=NOW)


def test_envelope_version_is_checked(identity):
    envelope = json.loads(make_record(identity, now=NOW).sign(identity))
    envelope["v"] = 2
    with pytest.raises(RecordError, match="version"):
        decode_capacity_record(canonical_json(envelope), now=NOW)


def test_dht_validator_checks_key_and_prefers_the_newest(identity):
    validator = CapacityRecordValidator(lambda: NOW)
    old = make_record(identity, now=NOW, seq=5).sign(identity)
    new = make_record(identity, now=NOW, seq=9).sign(identity)
    key = capacity_key(identity.peer_id)
    validator.validate(key, new)
    with pytest.raises(RecordError, match="another peer"):
        validator.validate(capacity_key(Identity.generate().peer_id), new)
    with pytest.raises(RecordError):
        validator.validate("/mtor/other/x", new)
    assert validator.select(key, [old, new]) == 1
    assert validator.select(key, [new, old]) == 0
    assert validator.select(key, [b"garbage", old]) == 1


@settings(max_examples=200, deadline=None)
@given(position=st.integers(min_value=0), byte=st.integers(min_value=0, max_value=255))
def test_any_single_byte_change_is_rejected_or_harmless(position, byte):
    identity = Identity(b"\x07" * 32)
    record = make_record(identity, now=NOW)
    raw = bytearray(record.sign(identity))
    index = position % len(raw)
    raw[index] = byte
    try:
        decoded = decode_capacity_record(bytes(raw), now=NOW)
    except RecordError:
        return
    # The only accepted change is no change at all.
    assert bytes(raw) == record.sign(identity)
    assert decoded == record


def test_a_signature_in_non_canonical_base64_is_rejected() -> None:
    """The last base64 character of a 64-byte signature carries 4 unused bits: changing them
    (the character next to it in the alphabet, e.g. 'g' to 'h') decodes to the same
    signature. A record has one byte form only."""
    import base64
    import string

    alphabet = (string.ascii_uppercase + string.ascii_lowercase + string.digits + "+/").encode()
    identity = Identity(b"\x07" * 32)
    raw = bytearray(make_record(identity, now=NOW).sign(identity))
    end = raw.index(b'==","t"')
    start = raw.rindex(b'"', 0, end) + 1
    original = bytes(raw[start : end + 2])
    raw[end - 1] = alphabet[alphabet.index(raw[end - 1]) ^ 1]
    assert base64.b64decode(bytes(raw[start : end + 2])) == base64.b64decode(original)
    with pytest.raises(RecordError, match="canonical"):
        decode_capacity_record(bytes(raw), now=NOW)


@settings(max_examples=50, deadline=None)
@given(
    tflops=st.floats(min_value=0, max_value=1e5, allow_nan=False),
    load=st.floats(min_value=0, max_value=1),
    name=st.text(max_size=128),
    region=st.text(max_size=32),
    seq=st.integers(min_value=0, max_value=2**63 - 1),
)
def test_records_round_trip_for_any_valid_content(tflops, load, name, region, seq):
    identity = Identity(b"\x09" * 32)
    device = Device(kind="cpu", name=name, mem_total=1, mem_free=1, cores=1)
    record = make_record(
        identity, now=NOW, tflops=tflops, load=load, region=region, seq=seq, devices=(device,)
    )
    assert decode_capacity_record(record.sign(identity), now=NOW) == record


def test_signature_field_must_be_base64(identity):
    envelope = json.loads(make_record(identity, now=NOW).sign(identity))
    envelope["s"] = "!!!" + envelope["s"][3:]
    with pytest.raises(RecordError, match="base64"):
        decode_capacity_record(canonical_json(envelope), now=NOW)
    envelope["s"] = base64.b64encode(b"\x00" * 64).decode()
    with pytest.raises(RecordError, match="signature"):
        decode_capacity_record(canonical_json(envelope), now=NOW)


def test_schema_1_records_without_relay_are_still_read(identity):
    body = make_record(identity, now=NOW).to_body()
    del body["relay"], body["ledger_rules"]
    body["schema"] = 1
    record = decode_capacity_record(seal(identity, RECORD_TYPE, body), now=NOW)
    assert record.relay is False and record.ledger_rules == 1
    body["relay"] = True  # schema 1 has no such field
    with pytest.raises(RecordError, match="unexpected"):
        decode_capacity_record(seal(identity, RECORD_TYPE, body), now=NOW)


def test_records_state_their_ledger_rules_and_older_schemas_read_as_rules_1(identity):
    """Every version before schema 3 followed ledger rules 1 and wrote no such field: its
    records read as rules 1, which a requester of other rules does not schedule
    (tests/test_compute_rules.py). A schema-3 record must state its rules."""
    record = make_record(identity, now=NOW)
    assert record.ledger_rules == LEDGER_RULES and record.schema == 3
    assert decode_capacity_record(record.sign(identity), now=NOW).ledger_rules == LEDGER_RULES
    body = record.to_body()
    del body["ledger_rules"]
    with pytest.raises(RecordError, match="missing"):
        decode_capacity_record(seal(identity, RECORD_TYPE, body), now=NOW)
    body["schema"] = 2
    assert decode_capacity_record(seal(identity, RECORD_TYPE, body), now=NOW).ledger_rules == 1
    body["ledger_rules"] = LEDGER_RULES  # schema 2 has no such field
    with pytest.raises(RecordError, match="unexpected"):
        decode_capacity_record(seal(identity, RECORD_TYPE, body), now=NOW)


@pytest.mark.parametrize(
    "shape",
    [[65536, 65536, 65536, 65536], [2**31 - 1] * 6, [2**16, 2**16, 2**16, 2**16, 4, 4]],
)
def test_an_array_description_whose_size_overflows_int64_is_refused(shape: list[int]) -> None:
    """Sizes are exact: a shape whose element count wraps an int64 (2^64 -> 0) must not pass
    the size limit as a small, or empty, array."""
    from mtor_p2p.records.arrays import ArrayMeta

    with pytest.raises(RecordError, match="exceeds the limit"):
        ArrayMeta.from_json(
            {"hash": "ab" * 32, "dtype": "float32", "shape": shape}, max_bytes=1 << 30
        )
