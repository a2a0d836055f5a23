"""The signed capacity record: one peer's offer of compute, as gossiped and stored in the DHT.

A record is versioned (envelope version plus ``schema``), size-limited
(:data:`MAX_CAPACITY_RECORD_BYTES`), signed by the peer it describes and valid only until its
``expires`` time. Within one peer, records are ordered by ``seq``: a higher sequence number
replaces a lower one and nothing replaces an equal or higher one. A *withdrawn* record (sent on
clean shutdown) carries a higher ``seq`` and tells every view to drop the peer at once.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from mtor_p2p.identity import Identity
from mtor_p2p.ledger.names import LEDGER_RULES
from mtor_p2p.wire import RecordError, open_envelope, seal

RECORD_TYPE = "mtor/capacity"
#: Schema 2 added ``relay``; schema 3 ``ledger_rules``. Records of older schemas are still
#: read: as relay=False and ledger_rules=1 (every version before schema 3 followed rules 1).
#: Versions before schema 3 refuse schema-3 records, so peers of those versions never
#: schedule peers of rules 2 or later.
SCHEMA_VERSION = 3
_FIELDS_ADDED_AFTER = {1: {"relay", "ledger_rules"}, 2: {"ledger_rules"}, 3: set()}
#: Largest ledger rules version a record may state (LEDGER_RULES is a small integer).
_MAX_LEDGER_RULES = 10**9 - 1
MAX_CAPACITY_RECORD_BYTES = 8 * 1024
#: A record may not claim to live longer than this; a peer re-announces well before expiry.
MAX_TTL_SECONDS = 3600.0
#: Tolerated clock skew between peers when checking ``issued``.
MAX_CLOCK_SKEW_SECONDS = 120.0
DHT_NAMESPACE = "mtor"
DHT_KEY_PREFIX = "/mtor/cap/"

_MAX_DEVICES = 16
_MAX_ADDRS = 16
_MAX_KERNELS = 32
_MAX_TEXT = 128


def capacity_key(peer_id: str) -> str:
    """The DHT key under which ``peer_id`` publishes its capacity record: the prefix and the
    first 128 bits of SHA-256 of the peer ID, 42 bytes in all. Not the peer ID itself (62
    bytes): py-libp2p 0.8.1 refuses FIND_NODE for keys longer than 50 bytes that are not
    multihashes, so puts under such keys were routed only as far as the putter's own table,
    and every peer asked logged a warning."""
    return DHT_KEY_PREFIX + hashlib.sha256(peer_id.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Device:
    """One compute device as seen by the probe: a GPU through NVML, or the host CPU."""

    kind: str  # "gpu" or "cpu"
    name: str
    mem_total: int  # bytes
    mem_free: int  # bytes
    utilization: float | None = None  # percent, 0-100; None when unknown
    compute_capability: str | None = None  # "9.0" for GPUs
    driver: str | None = None
    cores: int | None = None  # CPU cores; None for GPUs


@dataclass(frozen=True)
class CapacityRecord:
    """The body of a capacity record. Field units are in the comments."""

    peer_id: str
    addrs: tuple[str, ...]
    region: str
    devices: tuple[Device, ...]
    tflops: float  # measured, achieved TFLOP/s of the best device
    mem_free: int  # bytes available for shards
    load: float  # 0.0 idle ... 1.0 fully busy
    price: float  # asking price, credits per TFLOP of delivered work
    seq: int
    issued: float  # seconds since the epoch (network clock)
    expires: float
    kernels: tuple[str, ...] = ()
    withdrawn: bool = False
    #: The peer serves as a circuit relay for peers behind NATs (issue 10). A claim: a node
    #: that tries to reserve on it finds out.
    relay: bool = False
    #: The ledger rules the peer follows (:data:`~mtor_p2p.ledger.names.LEDGER_RULES`): a
    #: requester schedules only workers of its own rules, since a receipt between peers of
    #: different rules would be paid in two ledgers that never hear each other.
    ledger_rules: int = LEDGER_RULES
    schema: int = field(default=SCHEMA_VERSION)

    def to_body(self) -> dict[str, Any]:
        """The record as a JSON-ready dict (the envelope body)."""
        body = asdict(self)
        body["addrs"] = list(self.addrs)
        body["kernels"] = list(self.kernels)
        body["devices"] = [asdict(d) for d in self.devices]
        return body

    def sign(self, identity: Identity) -> bytes:
        """Seal this record with ``identity``, which must be the peer it describes."""
        if identity.peer_id != self.peer_id:
            raise RecordError("a capacity record must be signed by the peer it describes")
        data = seal(identity, RECORD_TYPE, self.to_body())
        if len(data) > MAX_CAPACITY_RECORD_BYTES:
            raise RecordError(f"record is {len(data)} bytes, limit is {MAX_CAPACITY_RECORD_BYTES}")
        return data

    def is_live(self, now: float) -> bool:
        """True while the record is neither expired nor withdrawn."""
        return not self.withdrawn and now < self.expires


#: The class of a peer that advertises no GPU (it computes on its CPU).
CPU_CLASS = "cpu"


def gpu_class(devices: tuple[Device, ...] | list[Device]) -> str:
    """The class a peer competes in: its best GPU's model name (the one with the most
    memory; ties by name), or :data:`CPU_CLASS` for a peer with no GPU. A class is what an
    operator compares prices and demand within ("NVIDIA H100 80GB HBM3"), so it is the
    model name as NVML reports it, not a coarser family."""
    gpus = [d for d in devices if d.kind == "gpu"]
    if not gpus:
        return CPU_CLASS
    return max(gpus, key=lambda d: (d.mem_total, d.name)).name


# -- validation -------------------------------------------------------------------------------


def _text(value: Any, name: str, *, limit: int = _MAX_TEXT) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise RecordError(f"{name} must be a string of at most {limit} characters")
    return value


def _optional_text(value: Any, name: str, *, limit: int = _MAX_TEXT) -> str | None:
    return None if value is None else _text(value, name, limit=limit)


def _number(value: Any, name: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RecordError(f"{name} must be a number")
    if not (math.isfinite(value) and lo <= value <= hi):
        raise RecordError(f"{name} must lie in [{lo}, {hi}]")
    return float(value)


def _integer(value: Any, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise RecordError(f"{name} must be an integer in [{lo}, {hi}]")
    return value


def _list(value: Any, name: str, limit: int) -> list[Any]:
    if not isinstance(value, list) or len(value) > limit:
        raise RecordError(f"{name} must be a list of at most {limit} items")
    return value


_DEVICE_FIELDS = set(Device.__dataclass_fields__)
_RECORD_FIELDS = set(CapacityRecord.__dataclass_fields__)
_BYTES_LIMIT = 1 << 50  # a pebibyte: anything above is a lie or a bug


def _device_from_body(item: Any) -> Device:
    if not isinstance(item, dict) or set(item) != _DEVICE_FIELDS:
        raise RecordError(f"a device must have exactly the fields {sorted(_DEVICE_FIELDS)}")
    kind = _text(item["kind"], "device.kind")
    if kind not in ("gpu", "cpu"):
        raise RecordError("device.kind must be 'gpu' or 'cpu'")
    utilization = item["utilization"]
    cores = item["cores"]
    return Device(
        kind=kind,
        name=_text(item["name"], "device.name"),
        mem_total=_integer(item["mem_total"], "device.mem_total", 0, _BYTES_LIMIT),
        mem_free=_integer(item["mem_free"], "device.mem_free", 0, _BYTES_LIMIT),
        utilization=None
        if utilization is None
        else _number(utilization, "device.utilization", 0, 100),
        compute_capability=_optional_text(item["compute_capability"], "device.cc", limit=16),
        driver=_optional_text(item["driver"], "device.driver", limit=64),
        cores=None if cores is None else _integer(cores, "device.cores", 1, 1 << 16),
    )


def record_from_body(body: dict[str, Any]) -> CapacityRecord:
    """Validate a decoded body field by field and build the record (raises RecordError)."""
    schema = body.get("schema")
    if type(schema) is not int or schema not in _FIELDS_ADDED_AFTER:
        raise RecordError(f"unsupported capacity schema {schema!r}")
    expected = _RECORD_FIELDS - _FIELDS_ADDED_AFTER[schema]
    if set(body) != expected:
        missing = sorted(expected - set(body))
        extra = sorted(set(body) - expected)
        raise RecordError(f"capacity record fields differ: missing {missing}, unexpected {extra}")
    relay = body.get("relay", False)
    if not isinstance(relay, bool):
        raise RecordError("relay must be a boolean")
    issued = _number(body["issued"], "issued", 0, 1e11)
    expires = _number(body["expires"], "expires", 0, 1e11)
    if not 0 < expires - issued <= MAX_TTL_SECONDS:
        raise RecordError(f"lifetime must be in (0, {MAX_TTL_SECONDS}] seconds")
    withdrawn = body["withdrawn"]
    if not isinstance(withdrawn, bool):
        raise RecordError("withdrawn must be a boolean")
    ledger_rules = 1
    if "ledger_rules" in expected:
        ledger_rules = _integer(body["ledger_rules"], "ledger_rules", 1, _MAX_LEDGER_RULES)
    return CapacityRecord(
        peer_id=_text(body["peer_id"], "peer_id", limit=64),
        addrs=tuple(_text(a, "addr", limit=256) for a in _list(body["addrs"], "addrs", _MAX_ADDRS)),
        region=_text(body["region"], "region", limit=32),
        devices=tuple(
            _device_from_body(d) for d in _list(body["devices"], "devices", _MAX_DEVICES)
        ),
        tflops=_number(body["tflops"], "tflops", 0, 1e6),
        mem_free=_integer(body["mem_free"], "mem_free", 0, _BYTES_LIMIT),
        load=_number(body["load"], "load", 0, 1),
        price=_number(body["price"], "price", 0, 1e9),
        seq=_integer(body["seq"], "seq", 0, (1 << 63) - 1),
        issued=issued,
        expires=expires,
        kernels=tuple(
            _text(k, "kernel", limit=64) for k in _list(body["kernels"], "kernels", _MAX_KERNELS)
        ),
        withdrawn=withdrawn,
        relay=relay,
        ledger_rules=ledger_rules,
        schema=SCHEMA_VERSION,
    )


#: Records whose encoding and signature were checked, by content. A record travels to a
#: peer several times (gossip, DHT sweeps, DHT selection, validator then view), and to every
#: peer of a simulation: its bytes are decoded and verified once. Only the checks that depend
#: on time or on who is asking run again each time.
_DECODED: OrderedDict[bytes, CapacityRecord | str] = OrderedDict()
_DECODED_MAX = 16_384
_decoded_lock = threading.Lock()


def _decode_signed(data: bytes) -> CapacityRecord:
    if len(data) > MAX_CAPACITY_RECORD_BYTES:
        raise RecordError(
            f"record of {len(data)} bytes exceeds the limit of {MAX_CAPACITY_RECORD_BYTES}"
        )
    key = hashlib.blake2b(data, digest_size=32).digest()
    with _decoded_lock:
        known = _DECODED.get(key)
        if known is not None:
            _DECODED.move_to_end(key)
    if known is None:
        try:
            envelope = open_envelope(
                data, expected_type=RECORD_TYPE, max_bytes=MAX_CAPACITY_RECORD_BYTES
            )
            known = record_from_body(envelope.body)
            if known.peer_id != envelope.signer:
                raise RecordError("record describes a different peer than the one that signed it")
        except RecordError as exc:
            # The message only: an exception would keep its frames (and the bytes) alive.
            known = str(exc)
        with _decoded_lock:
            _DECODED[key] = known
            if len(_DECODED) > _DECODED_MAX:
                _DECODED.popitem(last=False)
    if isinstance(known, str):
        raise RecordError(known)
    return known


def decode_capacity_record(
    data: bytes, *, now: float, expected_peer: str | None = None
) -> CapacityRecord:
    """Decode, verify and check a capacity record; raise :class:`RecordError` if anything fails.

    Checks, in order: size, canonical encoding, envelope, signature, that the signer is the
    peer the record describes (and ``expected_peer`` if given), the schema, that it was not
    issued in the future, and that it has not expired.
    """
    record = _decode_signed(data)
    if expected_peer is not None and record.peer_id != expected_peer:
        raise RecordError("record is for a different peer than its key names")
    if record.issued > now + MAX_CLOCK_SKEW_SECONDS:
        raise RecordError("record was issued in the future")
    if record.expires <= now:
        raise RecordError("record has expired")
    return record


class CapacityRecordValidator:
    """DHT validator for keys ``/mtor/cap/<peer-id>`` (the ``mtor`` namespace).

    ``validate`` raises for anything that must not be stored or returned; ``select`` picks the
    newest (highest ``seq``) valid record among several, so an older record never replaces a
    newer one in a peer's store.
    """

    def __init__(self, now: Callable[[], float]) -> None:
        self._now = now

    def validate(self, key: str, value: bytes) -> None:
        """Raise RecordError unless ``value`` is a valid, live record for ``key``."""
        if not key.startswith(DHT_KEY_PREFIX):
            raise RecordError(f"unknown key in the mtor namespace: {key[:80]!r}")
        record = decode_capacity_record(value, now=self._now())
        if capacity_key(record.peer_id) != key:
            raise RecordError("the record describes another peer than its key names")

    def select(self, key: str, values: list[bytes]) -> int:
        """Index of the best value: the valid record with the highest sequence number."""
        best_index, best_seq = 0, -1
        for index, value in enumerate(values):
            try:
                record = decode_capacity_record(value, now=self._now())
            except RecordError:
                continue
            if capacity_key(record.peer_id) != key:
                continue
            if record.seq > best_seq:
                best_index, best_seq = index, record.seq
        return best_index
