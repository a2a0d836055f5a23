"""Canonical encoding and signed envelopes for everything MTOR puts on the wire.

Every record is a JSON object encoded one way only (sorted keys, no whitespace, ASCII, no NaN),
so that a signature covers exactly one byte string and two peers always agree on a record's
bytes. A decoder re-encodes what it parsed and rejects the input unless the bytes match, which
rules out duplicate keys, odd spacing and alternative number spellings.

Envelope (version 1)::

    {"b": <body object>, "k": "<base64 Ed25519 public key>", "s": "<base64 signature>",
     "t": "<record type>", "v": 1}

The signature covers ``b"mtor/record/v1\\n" + type + b"\\n" + canonical(body)``: the type is part
of the signed message so that a record of one kind can never be replayed as another.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from mtor_p2p.identity import Identity, peer_id_from_public_key, verify_signature

ENVELOPE_VERSION = 1
_SIGNING_DOMAIN = b"mtor/record/v1\n"
#: No record type may exceed this, whatever its own limit.
ABSOLUTE_MAX_RECORD_BYTES = 64 * 1024


class RecordError(ValueError):
    """A record failed to decode or validate; the message says why, in one line."""


def canonical_json(obj: Any) -> bytes:
    """Encode ``obj`` the single canonical way (sorted keys, compact, ASCII, finite numbers)."""
    try:
        return json.dumps(
            obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
        ).encode("ascii")
    except (TypeError, ValueError) as exc:
        raise RecordError(f"not encodable: {exc}") from exc


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise RecordError(f"duplicate key {key!r}")
        result[key] = value
    return result


def parse_canonical(data: bytes, *, max_bytes: int) -> Any:
    """Parse canonical JSON, refusing oversized, malformed or non-canonical input."""
    if len(data) > max_bytes:
        raise RecordError(f"record is {len(data)} bytes, limit is {max_bytes}")
    try:
        obj = json.loads(data.decode("ascii"), object_pairs_hook=_reject_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise RecordError(f"not JSON: {exc}") from exc
    if canonical_json(obj) != data:
        raise RecordError("not canonically encoded")
    return obj


def _signing_message(record_type: str, body_bytes: bytes) -> bytes:
    return _SIGNING_DOMAIN + record_type.encode("ascii") + b"\n" + body_bytes


def b64_field(value: Any, what: str, length: int | None = None) -> bytes:
    """Decode a base64 field of a record (of exactly ``length`` bytes, if given); raise
    :class:`RecordError` naming ``what`` otherwise."""
    if not isinstance(value, str):
        raise RecordError(f"{what} must be a base64 string")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RecordError(f"{what} is not base64") from exc
    # One encoding per value: unused bits in the last character must be zero, or a signed
    # record would have several byte forms (found by tests/test_records.py's fuzzing).
    if base64.b64encode(raw).decode("ascii") != value:
        raise RecordError(f"{what} is not canonical base64")
    if length is not None and len(raw) != length:
        raise RecordError(f"{what} must be {length} bytes")
    return raw


@dataclass(frozen=True)
class SignedEnvelope:
    """A verified envelope: its type, its body and the signer's peer ID."""

    record_type: str
    body: dict[str, Any]
    signer: str
    raw: bytes


def seal(identity: Identity, record_type: str, body: dict[str, Any]) -> bytes:
    """Sign ``body`` as a record of ``record_type`` and return the envelope's canonical bytes."""
    body_bytes = canonical_json(body)
    signature = identity.sign(_signing_message(record_type, body_bytes))
    envelope = {
        "b": body,
        "k": base64.b64encode(identity.public_key).decode("ascii"),
        "s": base64.b64encode(signature).decode("ascii"),
        "t": record_type,
        "v": ENVELOPE_VERSION,
    }
    return canonical_json(envelope)


def open_envelope(data: bytes, *, expected_type: str, max_bytes: int) -> SignedEnvelope:
    """Decode and verify an envelope; raise :class:`RecordError` unless all of it holds."""
    obj = parse_canonical(data, max_bytes=min(max_bytes, ABSOLUTE_MAX_RECORD_BYTES))
    if not isinstance(obj, dict) or set(obj) != {"b", "k", "s", "t", "v"}:
        raise RecordError("envelope must have exactly the fields b, k, s, t, v")
    if obj["v"] != ENVELOPE_VERSION:
        raise RecordError(f"unsupported envelope version {obj['v']!r}")
    if obj["t"] != expected_type:
        raise RecordError(f"expected a {expected_type!r} record, got {obj['t']!r}")
    body = obj["b"]
    if not isinstance(body, dict):
        raise RecordError("body must be an object")
    public_key = b64_field(obj["k"], "key")
    signature = b64_field(obj["s"], "signature")
    if len(public_key) != 32 or len(signature) != 64:
        raise RecordError("key or signature has the wrong length")
    if not verify_signature(
        public_key, signature, _signing_message(expected_type, canonical_json(body))
    ):
        raise RecordError("signature does not verify")
    return SignedEnvelope(expected_type, body, peer_id_from_public_key(public_key), data)
